import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cxr.cli", *args], capture_output=True, text=True)


def test_ingest_reports_partial_download_and_split(nih_root):
    result = run_cli("ingest", "--data", str(nih_root))
    assert result.returncode == 0, result.stderr
    assert "112,000 rows have no image" in result.stdout and "Hernia" in result.stdout


def test_preprocess_builds_the_cache(nih_root, tmp_path):
    result = run_cli("preprocess", "--data", str(nih_root), "--size", "32", "--cache-root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "120 images" in result.stdout and len(list(tmp_path.glob("*/manifest.json"))) == 1


def test_bad_root_is_a_clear_error(tmp_path):
    result = run_cli("ingest", "--data", str(tmp_path / "missing"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_serve_reads_container_settings_from_the_environment(monkeypatch):
    """On SageMaker, `cxr deploy` sets where the container captures and under which endpoint name."""
    from cxr.cli import build_parser

    monkeypatch.setenv("CXR_CAPTURE", "s3://bucket/capture")
    monkeypatch.setenv("CXR_ENDPOINT_NAME", "cxr-b")
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "8081")
    args = build_parser().parse_args(["serve"])
    assert (args.capture, args.endpoint_name, args.port) == ("s3://bucket/capture", "cxr-b", 8081)


def test_iam_writes_one_policy_per_role(tmp_path):
    result = run_cli("iam", "--bucket", "cxr-bucket", "--account", "123456789012", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    roles = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert roles == ["batch_job", "eventbridge", "flow", "sagemaker_execution", "step_functions"]
