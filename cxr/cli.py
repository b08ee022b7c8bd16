"""The `cxr` command line: data tools (more subcommands arrive with training, evaluation and serving)."""

from __future__ import annotations

import argparse
import logging
import sys

from cxr.config import cxr_home


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `cxr` command."""
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="report what an NIH root holds and how it splits")
    ingest.add_argument("--data", required=True, help="NIH root directory or s3:// prefix")
    ingest.add_argument("--seed", type=int, default=0, help="split seed")
    ingest.set_defaults(func=_ingest)

    pre = commands.add_parser("preprocess", help="build (or reuse) the shard cache for an NIH root")
    pre.add_argument("--data", required=True, help="NIH root directory or s3:// prefix")
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

    demo = commands.add_parser("demo-data", help="write the synthetic demo dataset in the NIH layout")
    demo.add_argument("--dest", default=str(cxr_home() / "demo" / "custom"), help="output directory")
    demo.add_argument("--patients", type=int, default=600, help="number of patients")
    demo.add_argument("--size", type=int, default=256, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(func=_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cxr` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args))
    except (ValueError, RuntimeError, OSError) as error:
        print(f"cxr {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
