"""Train a chest X-ray classifier on NIH ChestX-ray14 (or the synthetic demo set) with Metaflow.

python flows/train_flow.py run                          # synthetic demo data, local, CPU
python flows/train_flow.py run --data ../shared/nih     # an NIH root (partial downloads are fine)
python flows/train_flow.py resume                       # continue a failed run
"""

from __future__ import annotations

import logging
from pathlib import Path

from metaflow import FlowSpec, IncludeFile, Parameter, card, current, step
from metaflow.cards import Markdown, Table

from cxr.config import parse_config
from cxr.data import cache_store
from cxr.data.cache import (
    TABLE_FILES,
    PreprocessSettings,
    build_shard,
    finalize_cache,
    plan_cache,
    shard_path,
)
from cxr.data.catalog import load_catalog
from cxr.data.prepare import resolve_data_root, split_catalog
from cxr.data.split import split_summary

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def remote_cache_prefix(setting: str | None) -> str | None:
    """S3 prefix for shared caches: explicit, or under Metaflow's S3 root when S3 is the datastore."""
    from metaflow.metaflow_config import DATATOOLS_S3ROOT, DEFAULT_DATASTORE

    if not setting or setting == "none":
        return None
    if setting != "auto":
        return setting
    return (
        f"{DATATOOLS_S3ROOT.rstrip('/')}/cxr-cache"
        if DEFAULT_DATASTORE == "s3" and DATATOOLS_S3ROOT
        else None
    )


DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "config" / "default.yaml")


class CXRTrainFlow(FlowSpec):
    """NIH ChestX-ray14 → classifier.

    Stages:
    1. start: resolve the configuration (config file + Parameters) and the data root.
    2. ingest: match the NIH metadata with the images present; report what is missing.
    3. split: patient-level, finding-stratified train/val/test split.
    4. plan_preprocess → preprocess (foreach over shards) → join_preprocess: decode and resize every
       image once into memory-mapped shards of a content-addressed cache, shared through S3 when the
       S3 datastore is configured.
    5. end: print where to look next.
    """

    config_file = IncludeFile(
        "config_file", default=DEFAULT_CONFIG, help="YAML pipeline configuration (config/default.yaml)"
    )
    data = Parameter(
        "data", default=None, help='NIH root directory or s3:// prefix; "demo" for the synthetic set'
    )
    image_size = Parameter("image_size", default=None, type=int, help="cached image side in pixels")
    seed = Parameter("seed", default=None, type=int, help="split seed")

    @step
    def start(self):
        """Resolve the configuration and the data root (generating the demo set if asked for)."""
        overrides = {"data.root": self.data, "preprocess.size": self.image_size, "split.seed": self.seed}
        self.config = parse_config(self.config_file, overrides)
        self.data_root = resolve_data_root(self.config["data"])
        self.next(self.ingest)

    @step
    def ingest(self):
        """Match metadata rows with images; a partial download is reported, not fatal."""
        self.catalog, report = load_catalog(self.data_root)
        self.ingest_report = report.__dict__
        print(report.summary())
        self.next(self.split)

    @card(type="blank")
    @step
    def split(self):
        """Split by patient, stratified on the 14 findings; record per-split counts and prevalence."""
        self.split_rows, self.split_method = split_catalog(self.catalog, self.data_root, self.config["split"])
        summary = split_summary(
            self.split_rows, self.catalog.meta["patient_id"].to_numpy(), self.catalog.labels
        )
        self.split_summary = summary.reset_index().to_dict(orient="records")
        current.card.append(Markdown(f"## Split ({self.split_method})"))
        current.card.append(Table.from_dataframe(summary.reset_index().round(4)))
        self.next(self.plan_preprocess)

    @step
    def plan_preprocess(self):
        """Lay out the content-addressed cache and its shards; find out whether it already exists."""
        pre = self.config["preprocess"]
        settings = PreprocessSettings(size=int(pre["size"]), shard_size=int(pre["shard_size"]))
        self.cache_plan = plan_cache(self.catalog, settings)
        self.data_cache_key = self.cache_plan.key
        remote = remote_cache_prefix(pre.get("remote", "auto"))
        self.cache_uri = cache_store.cache_uri(remote, self.data_cache_key) if remote else None
        self.cache_complete = self.cache_plan.complete or bool(
            self.cache_uri and cache_store.is_complete(self.cache_uri)
        )
        self.shard_indices = list(range(len(self.cache_plan.shards)))
        print(
            f"cache {self.data_cache_key}: {len(self.shard_indices)} shards, complete: {self.cache_complete}"
        )
        self.next(self.preprocess, foreach="shard_indices")

    @step
    def preprocess(self):
        """Build one shard (reused when an earlier or interrupted run already wrote it) and share it."""
        self.shard_result = None
        if not self.cache_complete:
            self.shard_result = build_shard(self.cache_plan, self.input, self.catalog.source)
            if self.cache_uri:
                names = [shard_path(self.cache_plan.directory, self.input, s).name for s in (".npy", ".json")]
                cache_store.publish(self.cache_plan.directory, self.cache_uri, names)
        self.next(self.join_preprocess)

    @step
    def join_preprocess(self, inputs):
        """Finalize the cache (table, labels, manifest over all shards) and record where it lives."""
        self.merge_artifacts(inputs, exclude=["shard_result"])
        plan = self.cache_plan
        if not self.cache_complete:
            finalize_cache(plan, self.catalog, [inp.shard_result for inp in inputs])
            if self.cache_uri:
                cache_store.publish(plan.directory, self.cache_uri, TABLE_FILES)
        self.data_cache = {
            "key": self.data_cache_key,
            "local_dir": str(plan.directory),
            "uri": self.cache_uri,
        }
        self.next(self.end)

    @step
    def end(self):
        """Point to the results."""
        print(
            f"Data cache {self.data_cache_key} at {self.data_cache['local_dir']} ({self.data_cache['uri']})"
        )
        print(f"Inspect: from metaflow import Flow; Flow('{current.flow_name}')['{current.run_id}']")


if __name__ == "__main__":
    CXRTrainFlow()
