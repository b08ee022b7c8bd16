"""The `cxr` command line: data tools, evaluation of any predictions file, and the model registry."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cxr.config import DEFAULT_CONFIG, cxr_home
from cxr.serve.backends import BACKENDS
from cxr.serve.limits import add_limit_arguments, limits_from_args

BACKEND_HELP = "inference backend; auto: the fastest the package verified and this CPU runs"
DATA_HELP = (
    "NIH root directory or s3:// prefix, or a CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR or RSNA root"
)

DEFAULT_DEPLOY = DEFAULT_CONFIG.parent / "deploy.yaml"


def _ingest(args: argparse.Namespace) -> int:
    from cxr.data.catalog import load_catalog
    from cxr.data.prepare import split_catalog
    from cxr.data.split import split_summary

    catalog, report = load_catalog(args.data)
    print(report.summary())
    split, method = split_catalog(catalog, args.data, {"seed": args.seed})
    summary = split_summary(split, catalog.meta["patient_id"].to_numpy(), catalog.labels)
    print(f"split: {method}")
    print(summary.drop(columns=[c for c in summary.columns if c.startswith("n_")]).round(4).T.to_string())
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from cxr.data.cache import PreprocessSettings, build_cache
    from cxr.data.catalog import load_catalog

    catalog, report = load_catalog(args.data)
    print(report.summary())
    cache = build_cache(
        catalog, PreprocessSettings(args.size, args.shard_size), args.cache_root, args.workers
    )
    print(f"cache {cache.key}: {len(cache):,} images at {cache.directory}")
    for failure in cache.failures:
        print(f"  could not use {failure['image_id']}: {failure['reason']}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from cxr.data.download import download_nih

    for path in download_nih(args.dest, args.archives, metadata=not args.no_metadata):
        print(path)
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from cxr.data.synthetic import make_demo_dataset

    print(make_demo_dataset(args.dest, n_patients=args.patients, size=args.size, seed=args.seed))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cxr.evaluate import evaluate_files

    report = evaluate_files(args.predictions, args.labels, args.thresholds_from, args.bootstrap, args.seed)
    print(report.table())
    for kind, path in report.write(args.out).items():
        print(f"{kind}: {path}")
    return 0


def _registry(args: argparse.Namespace) -> int:
    from cxr.registry import open_registry

    if args.s3_prefix:
        registry = open_registry(args.group, "sagemaker", s3_prefix=args.s3_prefix)
    else:
        registry = open_registry(args.group, root=args.registry_root)
    if args.action == "list":
        print(f"{'version':>7}  {'status':<10}  {'mean AUROC':>10}  created")
        for v in registry.versions():
            auroc = f"{v.mean_auroc:.4f}" if v.mean_auroc is not None else "n/a"
            print(f"{v.version:>7}  {v.status:<10}  {auroc:>10}  {_when(v.created)}")
        return 0
    if args.version is None:
        raise ValueError(f"'cxr registry {args.action}' needs a VERSION")
    if args.action == "approve":
        version = registry.approve(args.version)
        print(f"version {version.version} is now {version.status}")
    elif args.action == "archive":
        print(f"version {registry.set_status(args.version, 'archived').version} archived")
    elif args.action == "card":
        print(registry.get(args.version).card.read_text())
    else:
        version = registry.get(args.version)
        print(f"version {version.version}: {version.status}, mean AUROC {version.mean_auroc}")
        print(f"package: {version.package}\ncard: {version.card}\ndecision: {version.decision}")
        for key, value in version.lineage.items():
            print(f"{key}: {value}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from cxr.serve.app import ServerConfig, serve
    from cxr.serve.resolve import model_dir, resolve_models

    models = resolve_models(args.model, args.challenger, args.group, args.registry_root)
    weights = _parse_weights(args.weights) if args.weights else None
    config = ServerConfig(
        models=models, weights=weights, host=args.host, port=args.port, capture=args.capture,
        capture_sample_percent=args.capture_sample, endpoint_name=args.endpoint_name, backend=args.backend,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, threads=args.threads, sessions=args.sessions,
        max_body_mb=args.max_body_mb, limits=limits_from_args(args), input_gate=args.input_gate,
        shadow=model_dir(args.shadow) if args.shadow else None, admin_token_file=args.admin_token_file,
    )  # fmt: skip
    print(f"serving {', '.join(f'{k}={v}' for k, v in models.items())} on http://{args.host}:{args.port}")
    _print_admin_token_source(args.admin_token_file)
    serve(config)
    return 0


def _parse_weights(text: str) -> dict[str, float]:
    try:
        return {name.strip(): float(value) for name, value in (part.split("=") for part in text.split(","))}
    except ValueError as error:
        raise ValueError(f"--weights must look like A=90,B=10, got {text!r}") from error


def _gateway(args: argparse.Namespace) -> int:
    from cxr.serve.gateway import GatewayConfig, run_gateway
    from cxr.serve.ratelimit import DEFAULT_RATE_LIMIT

    endpoints = _parse_endpoints(args.endpoint)
    weights = _parse_weights(args.weights) if args.weights else None
    config = GatewayConfig(
        endpoints=endpoints, weights=weights, host=args.host, port=args.port, region=args.region,
        max_body_mb=args.max_body_mb, read_timeout=args.read_timeout, shadow_endpoint=args.shadow_endpoint,
        rate_limit=args.rate_limit or DEFAULT_RATE_LIMIT, trusted_proxies=tuple(args.trusted_proxy),
        admin_token_file=args.admin_token_file,
    )  # fmt: skip
    print(f"gateway {', '.join(f'{k}={v}' for k, v in endpoints.items())} on http://{args.host}:{args.port}")
    _print_admin_token_source(args.admin_token_file)
    run_gateway(config)
    return 0


def _print_admin_token_source(path: Path | None) -> None:
    from cxr.serve.admin import admin_token_source

    print(f"/admin/* needs 'Authorization: Bearer <token>' with the token from {admin_token_source(path)}")


def _admin_token_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-token-file", type=Path, default=None,
        help="file holding the bearer token that /admin/* requires (default: $CXR_ADMIN_TOKEN, else "
        "$CXR_HOME/admin-token, created with a random token on first start)",
    )  # fmt: skip


def _parse_endpoints(specs: list[str]) -> dict[str, str]:
    endpoints: dict[str, str] = {}
    for spec in specs:
        name, sep, endpoint = (part.strip() for part in spec.partition("="))
        if not (sep and name and endpoint):
            raise ValueError(f"--endpoint must look like A=cxr-a (variant=endpoint name), got {spec!r}")
        if name in endpoints:
            raise ValueError(f"--endpoint names variant {name!r} twice")
        endpoints[name] = endpoint
    return endpoints


def _deploy(args: argparse.Namespace) -> int:
    import json

    from cxr.aws import deploy as dp
    from cxr.aws.endpoints import EndpointSettings, describe, history, set_weights
    from cxr.config import load_config
    from cxr.registry import open_registry

    config = load_config(args.config)
    reg = dict(config.get("registry") or {})
    registry = open_registry(reg.pop("group", "chestx-ray14"), reg.pop("backend", "local"), **reg)
    if args.action == "release":
        report = dp.release_configured(
            config, registry, args.version, approve=args.approve, challenger=args.challenger,
            weights=_parse_weights(args.weights) if args.weights else None, keep_staging=args.keep_staging,
        )  # fmt: skip
        print(
            f"staging {report.staging.endpoint}: {report.staging.action}; smoke {report.smoke.latency_ms} ms"
        )
        print(report.message)
        return 0
    settings = EndpointSettings.from_dict(config["endpoint"])
    endpoint = args.endpoint or settings.name
    clients = dp.Clients.create(settings.region)
    if args.action == "rollback":
        done = dp.rollback(clients, settings, endpoint, registry)
        print(f"{endpoint} rolled back to {done.config}: {done.variants}")
    elif args.action == "weights":
        print(json.dumps(set_weights(clients.sagemaker, endpoint, _parse_weights(args.weights))))
    else:
        state = describe(clients.sagemaker, endpoint)
        if state is None:
            raise ValueError(f"no endpoint {endpoint}")
        variants = [{k: v.get(k) for k in ("VariantName", "CurrentWeight", "CurrentInstanceCount")}
                    for v in state.get("ProductionVariants", [])]  # fmt: skip
        summary = {"endpoint": endpoint, "status": state["EndpointStatus"],
                   "config": state["EndpointConfigName"], "variants": variants,
                   "history": history(clients.sagemaker, state["EndpointArn"])}  # fmt: skip
        print(json.dumps(summary, indent=1))
    return 0


def _iam(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from cxr.aws.iam import AwsSettings, policies

    settings = AwsSettings(
        bucket=args.bucket, account=args.account, region=args.region, kms_key_arn=args.kms_key_arn,
        batch_trains_on_sagemaker=args.batch_trains_on_sagemaker,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for role, document in policies(settings).items():
        (out / f"{role}.json").write_text(json.dumps(document, indent=1))
        print(f"{out / f'{role}.json'}: {len(document['Statement'])} statements")
    return 0


def _deploy_checked(args: argparse.Namespace) -> int:
    if args.action == "release" and args.version is None:
        raise ValueError("release needs --version")
    if args.action == "weights" and not args.weights:
        raise ValueError("weights needs --weights, e.g. A=0.5,B=0.5")
    return _deploy(args)


def _predict(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from cxr.inference import prepare
    from cxr.serve.decoder import decode_one, media_type
    from cxr.serve.predictor import load_predictor
    from cxr.serve.resolve import resolve_models

    model_dir = resolve_models(args.model, None, args.group, args.registry_root)["A"]
    predictor = load_predictor(model_dir, args.backend)
    path = Path(args.file)
    kind = media_type(args.content_type) if args.content_type else _guess_type(path)
    crop = prepare(decode_one(path.read_bytes(), kind).pixels, predictor.metadata)
    probabilities, _ = predictor.predict(crop[None])
    thresholds = predictor.metadata.get("thresholds") or {}
    result = {}
    for finding, p in zip(predictor.metadata["findings"], probabilities[0], strict=True):
        result[finding] = {
            "probability": round(float(p), 4),
            "positive": bool(p >= thresholds.get(finding, 0.5)),
        }
    model = {"model": predictor.metadata.get("name"), "version": predictor.metadata.get("version")}
    print(json.dumps({"file": str(path), **model, "findings": result}, indent=1))
    if args.heatmap:
        from cxr.inference import load_model
        from cxr.serve.explain import grad_cam, overlay_png

        finding = args.finding or max(result, key=lambda f: result[f]["probability"])
        heat = grad_cam(load_model(model_dir)[0], crop, finding)
        Path(args.heatmap).write_bytes(overlay_png(crop[0], heat))
        print(f"Grad-CAM for {finding} written to {args.heatmap}")
    return 0


def _guess_type(path: object) -> str:
    suffix = str(path).lower().rsplit(".", 1)[-1]
    types = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "dcm": "application/dicom",
             "npy": "application/x-npy"}  # fmt: skip
    if suffix not in types:
        raise ValueError(f"cannot tell the type of {path}; pass --content-type")
    return types[suffix]


def _when(timestamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def _registry_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--group", default="chestx-ray14", help="registry model group ('demo' for the demo run)"
    )
    parser.add_argument(
        "--registry-root", "--root", dest="registry_root", default=None,
        help="registry root (default: $CXR_HOME/registry)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `cxr` command."""
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="report what a data root holds and how it splits")
    ingest.add_argument("--data", required=True, help=DATA_HELP)
    ingest.add_argument("--seed", type=int, default=0, help="split seed")
    ingest.set_defaults(func=_ingest)

    pre = commands.add_parser("preprocess", help="build (or reuse) the shard cache for a data root")
    pre.add_argument("--data", required=True, help=DATA_HELP)
    pre.add_argument("--size", type=int, default=256, help="cached image side in pixels")
    pre.add_argument("--shard-size", type=int, default=2048, help="images per shard")
    pre.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    pre.add_argument("--cache-root", default=None, help="cache directory (default: $CXR_HOME/cache)")
    pre.set_defaults(func=_preprocess)

    down = commands.add_parser("download", help="download the official NIH archives (resumable, MD5-checked)")
    down.add_argument("--dest", required=True, help="directory to download into")
    down.add_argument(
        "--archives", type=int, nargs="+", default=list(range(1, 13)), help="archive numbers 1-12"
    )
    down.add_argument("--no-metadata", action="store_true", help="skip the metadata and split files")
    down.set_defaults(func=_download)

    ev = commands.add_parser("evaluate", help="evaluate a predictions CSV against NIH or other labels")
    ev.add_argument(
        "--predictions", required=True, help="CSV: 'Image Index' + one column per finding (or prob_X)"
    )
    ev.add_argument(
        "--labels",
        required=True,
        help="Data_Entry_2017[_v2020].csv[.gz], NIH's adjudicated google2019_nih-chest-xray-labels.csv.gz, "
        "or a dataset root (CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, RSNA: images named by path)",
    )
    ev.add_argument(
        "--thresholds-from", default=None, help="validation predictions CSV to choose thresholds on"
    )
    ev.add_argument(
        "--out", default="evaluation", help="directory for report.json, per_class.csv, subgroups.csv"
    )
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    ev.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ev.set_defaults(func=_evaluate)

    reg = commands.add_parser("registry", help="list, show, approve or archive registered models")
    reg.add_argument("action", choices=["list", "show", "card", "approve", "archive"], help="what to do")
    reg.add_argument("version", type=int, nargs="?", help="model version")
    _registry_options(reg)
    reg.add_argument(
        "--s3-prefix", default=None,
        help="use the SageMaker Model Registry whose version files live under this s3:// prefix",
    )  # fmt: skip
    reg.set_defaults(func=_registry)

    srv = commands.add_parser("serve", help="serve the production model (SageMaker contract) with capture")
    srv.add_argument(
        "--model", default=None, help="package (.tar.gz or unpacked dir); default: registry production"
    )
    srv.add_argument("--challenger", default=None, help="variant B package; default: newest approved version")
    srv.add_argument(
        "--shadow", default=None,
        help="a package scoring a copy of every answered request; its answers are captured (variant "
        "'shadow', same inference id), never returned",
    )  # fmt: skip
    srv.add_argument("--weights", default=None, help="A/B traffic weights, e.g. A=90,B=10")
    _registry_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 inside a container)")
    srv.add_argument(
        "--port", type=int, default=int(os.environ.get("SAGEMAKER_BIND_TO_PORT", 8080)), help="port"
    )
    srv.add_argument(
        "--capture",
        "--capture-dir",
        dest="capture",
        default=os.environ.get("CXR_CAPTURE"),
        help="capture directory or s3:// prefix (default: $CXR_CAPTURE, set on SageMaker by cxr deploy)",
    )
    srv.add_argument("--capture-sample", type=float, default=100.0, help="percent of requests captured")
    srv.add_argument(
        "--endpoint-name",
        default=os.environ.get("CXR_ENDPOINT_NAME", "cxr-endpoint"),
        help="endpoint name in the capture layout (default: $CXR_ENDPOINT_NAME)",
    )
    srv.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    srv.add_argument("--max-batch", type=int, default=16, help="largest dynamic batch")
    srv.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    srv.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads per ONNX Runtime session or OpenVINO request (default: all cores)",
    )
    srv.add_argument(
        "--sessions", type=int, default=2, help="ONNX Runtime sessions or OpenVINO requests scoring at once"
    )
    srv.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body accepted")
    srv.add_argument(
        "--input-gate", choices=["refuse", "flag"], default="refuse",
        help="an image the input gate judges out of distribution: refuse the request (422) or answer with "
        "the verdict",
    )  # fmt: skip
    add_limit_arguments(srv)
    _admin_token_option(srv)
    srv.set_defaults(func=_serve)

    gw = commands.add_parser("gateway", help="A/B gateway in front of serverless SageMaker endpoints")
    gw.add_argument(
        "--endpoint", action="append", required=True, metavar="VARIANT=NAME",
        help="a variant and its SageMaker endpoint, e.g. A=cxr-a (repeat per variant)",
    )  # fmt: skip
    gw.add_argument("--weights", default=None, help="traffic weights, e.g. A=0.9,B=0.1 (default as serve)")
    gw.add_argument("--host", default="127.0.0.1", help="bind address")
    gw.add_argument("--port", type=int, default=8080, help="port")
    gw.add_argument("--region", default=None, help="AWS region of the endpoints (default: AWS config)")
    gw.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body accepted")
    gw.add_argument("--read-timeout", type=float, default=70.0, help="seconds to wait for an endpoint")
    gw.add_argument(
        "--shadow-endpoint", default=None,
        help="a SageMaker endpoint sent a copy of every answered request (same inference id); its answers "
        "are captured by its container, never returned",
    )  # fmt: skip
    gw.add_argument(
        "--rate-limit", default=None,
        help="requests per client, e.g. 20/second or 20/second;1000/hour, or none (default 20/second); "
        "beyond it 429 with Retry-After",
    )  # fmt: skip
    gw.add_argument(
        "--trusted-proxy", action="append", default=[], metavar="NETWORK",
        help="a proxy (address or network, repeat per proxy) whose X-Forwarded-For names the client to limit "
        "(default: none; the peer address is the client)",
    )  # fmt: skip
    _admin_token_option(gw)
    gw.set_defaults(func=_gateway)

    iam = commands.add_parser("iam", help="write least-privilege IAM policy documents, one per role")
    iam.add_argument("--bucket", required=True, help="the project's S3 bucket")
    iam.add_argument("--account", required=True, help="AWS account id")
    iam.add_argument("--region", default="us-east-1", help="AWS region")
    iam.add_argument("--kms-key-arn", default=None, help="KMS key for SSE-KMS (default: SSE-S3)")
    iam.add_argument(
        "--batch-trains-on-sagemaker", action="store_true",
        help="let scheduled train flows on Batch launch SageMaker training jobs",
    )  # fmt: skip
    iam.add_argument("--out", default="iam", help="folder for <role>.json")
    iam.set_defaults(func=_iam)

    dep = commands.add_parser("deploy", help="SageMaker endpoints: release, rollback, A/B weights, status")
    dep.add_argument("action", choices=["release", "rollback", "weights", "status"], help="what to do")
    dep.add_argument("--config", default=str(DEFAULT_DEPLOY), help="deployment settings (config/deploy.yaml)")
    dep.add_argument("--version", type=int, default=None, help="release: registry version to deploy")
    dep.add_argument("--challenger", type=int, default=None, help="release: version served as variant B")
    dep.add_argument("--weights", default=None, help="A/B weights, e.g. A=0.9,B=0.1")
    dep.add_argument("--approve", action="store_true", help="release: approve here (manual approval)")
    dep.add_argument("--keep-staging", action="store_true", help="release: keep the staging endpoint")
    dep.add_argument("--endpoint", default=None, help="endpoint (default: endpoint.name of the config)")
    dep.set_defaults(func=_deploy_checked)

    pred = commands.add_parser("predict", help="score one image file (PNG, JPEG, DICOM, .npy)")
    pred.add_argument("file", help="image file")
    pred.add_argument("--model", default=None, help="package; default: registry production")
    _registry_options(pred)
    pred.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    pred.add_argument("--content-type", default=None, help="override the type guessed from the file name")
    pred.add_argument("--heatmap", default=None, help="write a Grad-CAM overlay PNG here")
    pred.add_argument("--finding", default=None, help="finding to explain (default: the most likely)")
    pred.set_defaults(func=_predict)

    commands.add_parser("app", help="the web application: read, review, watch (`cxr app --help`)")
    commands.add_parser("dicom-node", help="a DICOM node: studies from a PACS scored, SR back (`--help`)")
    demo = commands.add_parser("demo-data", help="write the synthetic demo dataset in the NIH layout")
    demo.add_argument("--dest", default=str(cxr_home() / "demo" / "custom"), help="output directory")
    demo.add_argument("--patients", type=int, default=600, help="number of patients")
    demo.add_argument("--size", type=int, default=256, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(func=_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cxr` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["app"]:  # the web application has its own options and subcommands
        from cxr_app.cli import main as app_main

        return app_main(argv[1:])
    if argv[:1] == ["dicom-node"]:  # so has the DICOM node
        from cxr_dicom.cli import main as node_main

        return node_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args))
    except (ValueError, RuntimeError, OSError) as error:
        print(f"cxr {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
