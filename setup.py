"""Packaging for cxr: NIH ChestX-ray14 to a monitored chest X-ray classifier in production."""

from pathlib import Path

from setuptools import find_packages, setup

# Versions are pinned to releases that install on a CPU-only machine from the package registries;
# torch 2.13.0 and torchvision 0.28.0 are the matching pair.
INSTALL_REQUIRES = [
    "metaflow==2.19.39",  # pipeline orchestration, artifact versioning, cards
    "torch==2.13.0",  # model and training
    "torchvision==0.28.0",  # DenseNet121 and its ImageNet weights
    "numpy>=2.0,<3",  # arrays and memory-mapped shards
    "pandas>=2.2,<4",  # NIH metadata tables
    "scikit-learn>=1.5,<2",  # metrics (AUROC, AUPRC, ROC curves)
    "scipy>=1.11",  # vectorised rank statistics for bootstrap AUROC CIs
    "opencv-python-headless==5.0.0.93",  # fast PNG decode, resize and augmentation warps
    "pillow>=10",  # image writing for the synthetic demo set and plots
    "tqdm>=4.66",  # progress bars on long work
    "pyyaml>=6",  # config/ files
    "boto3>=1.34",  # s3:// image sources and cache stores
    "onnx==1.23.2",  # exporting the serving graph at package time
    "onnxruntime==1.32.0",  # verifying the export; a CPU serving backend
    "openvino==2026.4.1",  # the fastest CPU serving backends (FP32, BF16, INT8), verified at registration
    "nncf==3.4.0",  # OpenVINO's post-training INT8 quantiser, calibrated on training images
    "threadpoolctl>=3",  # one BLAS thread for the operating points' bootstrap products
    "pydicom==3.0.2",  # DICOM requests; its bundled CT/MR files in the input gate's evaluation corpus
    "scikit-image==0.26.0",  # its bundled photographs in the input gate's evaluation corpus
]

SERVE = [
    "aiohttp==3.14.5",  # the HTTP server (SageMaker container contract)
    "prometheus_client==0.26.0",  # /metrics
    "limits==5.8.0",  # the gateway's per-client rate limits
]

DICOM = [
    "highdicom==0.28.2",  # the DICOM SR (TID 1500) the node sends back to the PACS, built and checked
    "pynetdicom==3.0.4",  # the node's DIMSE side: Storage SCP for studies, C-STORE of the SR
    "dicomweb-client==0.61.2",  # the node's DICOMweb side: WADO-RS pulls, STOW-RS of the SR
]

APP = [
    "flask==3.1.3",  # the web application (cxr_app): routes, templates, signed session cookies
    "flask-wtf==1.3.0",  # CSRF tokens on every form and fetch that changes state
    "argon2-cffi==25.1.0",  # password hashes (Argon2id)
    "sqlalchemy==2.1.9",  # accounts, reviews and the audit log: SQLite by default, PostgreSQL by URL
    "waitress==3.0.2",  # the production WSGI server `cxr app` runs on
    "matplotlib==3.11.2",  # the watch page's drift and latency plots (SVG, drawn on the server)
]

EXTRAS_REQUIRE = {
    "serve": SERVE,
    "app": [*SERVE, *APP],
    "dicom": DICOM,
    "aws": ["boto3>=1.34", "moto[server]==5.2.1"],
    "dev": [
        *SERVE,
        *APP,
        *DICOM,
        "playwright==1.65.2",  # browser tests drive Debian's chromium through it
        "pytest>=8",
        "pytest-timeout>=2.3",
        "moto[server]==5.2.1",  # the S3 API on loopback for tests
        "ruff==0.17.6",
        "mypy==2.4.1",
        "bandit==1.9.4",
        "vermin==1.9.2",  # the minimum Python the code needs, checked against python_requires
        "types-PyYAML",
        "types-tqdm",
    ],
}

setup(
    name="cxr",
    version="0.1.0",
    description="NIH ChestX-ray14 to a monitored chest X-ray classifier in production",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",  # datetime.UTC; tests/test_python_requires.py checks it
    packages=find_packages(include=["cxr", "cxr.*", "cxr_app", "cxr_app.*", "cxr_dicom", "cxr_dicom.*"]),
    include_package_data=True,
    package_data={"cxr_app": ["templates/*.html", "static/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["cxr=cxr.cli:main"]},
)
