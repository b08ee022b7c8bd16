"""Train, evaluate and register a chest X-ray classifier on NIH ChestX-ray14 (or the demo set).

python flows/train_flow.py run                          # synthetic demo data, local, CPU
python flows/train_flow.py run --data ../shared/nih     # an NIH root (partial downloads are fine)
python flows/train_flow.py resume                       # continue a failed run
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from functools import partial
from pathlib import Path

import pandas as pd
from metaflow import FlowSpec, IncludeFile, Parameter, card, current, resources, retry, schedule, step
from metaflow.cards import Markdown, Table, VegaChart

from cxr import plots, s3sync
from cxr.aws.deploy import release_configured
from cxr.aws.training_job import train_on_sagemaker
from cxr.calibration import CalibratedPredictor, calibration_summary, fit_calibration
from cxr.config import parse_config
from cxr.data import cache_store
from cxr.data.cache import (
    TABLE_FILES,
    PreprocessSettings,
    build_shard,
    cache_rows,
    finalize_cache,
    plan_cache,
    shard_path,
)
from cxr.data.combined import combine_catalogs, split_combined
from cxr.data.findings import FINDINGS
from cxr.data.loader import ShardDataset
from cxr.data.prepare import load_parts, resolve_data_root, split_catalog
from cxr.data.split import split_summary
from cxr.evaluate import choose_thresholds, parse_operating_points, report_thresholds, youden_thresholds
from cxr.evaluate import evaluate as evaluate_predictions
from cxr.external import expert_validation, external_summary, parse_external_sets, validate_external
from cxr.gate import DEFAULT_MAX_SENSITIVITY_DROP, promotion_gate, require_external_floors
from cxr.metaflow_cards import keep_cards_with_datastore
from cxr.model import CXRNet
from cxr.monitor.baseline import compute_baseline
from cxr.ood import GATE_FILE
from cxr.ood_corpus import fit_run_gate
from cxr.progress import Progress
from cxr.registry import DEFAULT_GROUP, open_registry
from cxr.release import (
    SPLIT_FILE,
    compare_with_production,
    monitoring_rows,
    registration_status,
    release_model,
    split_record,
)
from cxr.scoring import fastest_predictor, score, score_fast
from cxr.train import BEST, LAST, TrainConfig, TrainResult, checkpoint_dir
from cxr.train import train as train_model
from cxr.uncertainty import HeadSampler

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
keep_cards_with_datastore()  # cards where the client and the UI find them, wherever the run started


def remote_prefix(setting: str | None, name: str = "cxr-cache") -> str | None:
    """S3 prefix for state shared between machines (caches, checkpoints): explicit, or `<name>` under
    Metaflow's S3 root when S3 is the datastore; None keeps it local."""
    from metaflow.metaflow_config import DATATOOLS_S3ROOT, DEFAULT_DATASTORE

    if not setting or setting == "none":
        return None
    if setting != "auto":
        return setting
    return (
        f"{DATATOOLS_S3ROOT.rstrip('/')}/{name}" if DEFAULT_DATASTORE == "s3" and DATATOOLS_S3ROOT else None
    )


def registry_group(setting: str, data: dict) -> str:
    """The registry's model group: as configured, or "demo" for the demo set and "chestx-ray14" otherwise."""
    if setting and setting != "auto":
        return setting
    return "demo" if (data.get("root") or "demo") == "demo" else DEFAULT_GROUP


def open_configured_registry(rules: dict, data: dict):
    """The registry of the `registry:` config section: local, or SageMaker Model Registry (files in S3)."""
    group = registry_group(rules.get("group", "auto"), data)
    if rules.get("backend", "local") != "sagemaker":
        return open_registry(group)
    prefix = remote_prefix(rules.get("s3_prefix", "auto"), "cxr-registry")
    if not prefix:
        raise ValueError("registry.backend sagemaker needs registry.s3_prefix (or the S3 datastore for auto)")
    return open_registry(group, "sagemaker", s3_prefix=prefix, kms_key_id=rules.get("kms_key_id"))


def shard_groups(shards: int, tasks: int | str = "auto") -> list[list[int]]:
    """Shard indices dealt round-robin into at most `tasks` preprocess tasks ("auto": this machine's CPUs),
    so the fan-out fits the machine whatever the scheduler's parallelism."""
    count = (os.cpu_count() or 1) if tasks in ("auto", None) else int(tasks)
    count = max(1, min(count, shards))
    return [list(range(first, shards, count)) for first in range(count)] if shards else [[]]


DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "config" / "default.yaml")


# Retraining on a schedule when deployed with `step-functions create`: a cron expression in
# CXR_TRAIN_SCHEDULE at deploy time (e.g. "0 3 ? * SUN *", Sundays 03:00 UTC); unset, no schedule.
@schedule(cron=os.environ.get("CXR_TRAIN_SCHEDULE"), daily=False)
class CXRTrainFlow(FlowSpec):
    """NIH ChestX-ray14 → classifier.

    Stages:
    1. start: resolve the configuration (config file + Parameters) and the data root.
    2. ingest: match the NIH metadata with the images present; report what is missing.
    3. split: patient-level, finding-stratified train/val/test split.
    4. plan_preprocess → preprocess (foreach over shards) → join_preprocess: decode and resize every
       image once into memory-mapped shards of a content-addressed cache, shared through S3 when the
       S3 datastore is configured.
    5. train: DenseNet121 classifier, checkpointed every epoch (`resume` continues mid-training), in
       the step itself (locally or on AWS Batch) or as a SageMaker managed spot training job.
    6. evaluate: AUROC with CIs, AUPRC, operating points, calibration, subgroups; cards with plots;
       the monitoring baseline (input, embedding and prediction distributions of held-out images).
    7. register: package (SageMaker layout), gate against production on the same test split, register
       (local registry or SageMaker Model Registry); with a deploy step, a promoted version is `approved`.
    8. deploy: when enabled, release a promoted version to SageMaker (staging → smoke test → production);
       only a version that serves becomes `production` in the registry.
    9. end: the run's `headline` (version, status, test mean AUROC) and where to look next.
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
        parse_operating_points(self.config["evaluate"].get("operating_points"))  # fail before training
        parse_external_sets(self.config["evaluate"].get("external"))
        self.data_root = resolve_data_root(self.config["data"])
        self.next(self.ingest)

    @step
    def ingest(self):
        """Match metadata rows with images (a partial download is reported, not fatal); with `data.also`,
        the other datasets' too, combined into one catalog."""
        self.data_parts = load_parts(self.data_root, self.config["data"])
        self.ingest_reports = {name: report.__dict__ for name, _, _, report in self.data_parts}
        self.ingest_report = self.data_parts[0][3].__dict__
        for name, _, _, report in self.data_parts:
            print(f"{name}: {report.summary()}")
        parts = [(name, catalog) for name, catalog, _, _ in self.data_parts]
        self.catalog = parts[0][1] if len(parts) == 1 else combine_catalogs(parts)
        self.next(self.split)

    @card(type="blank")
    @step
    def split(self):
        """Split by patient, stratified on the 14 findings; record per-split counts and prevalence."""
        if len(self.data_parts) == 1:
            self.split_rows, self.split_method = split_catalog(
                self.catalog, self.data_root, self.config["split"]
            )
        else:
            parts = [(name, catalog, root) for name, catalog, root, _ in self.data_parts]
            self.split_rows, self.split_method = split_combined(parts, self.config["split"])
        summary = split_summary(
            self.split_rows, self.catalog.meta["patient_id"].to_numpy(), self.catalog.labels
        )
        self.split_summary = summary.reset_index().to_dict(orient="records")
        current.card.append(Markdown(f"## Split ({self.split_method})"))
        current.card.append(VegaChart(plots.prevalence_chart(self.split_summary, list(FINDINGS))))
        counts = [[name, int(r["images"]), int(r["patients"])] for name, r in summary.iterrows()]
        current.card.append(Table(counts, headers=["split", "images", "patients"]))
        self.next(self.plan_preprocess)

    @step
    def plan_preprocess(self):
        """Lay out the content-addressed cache and its shards; find out whether it already exists."""
        pre = self.config["preprocess"]
        settings = PreprocessSettings(size=int(pre["size"]), shard_size=int(pre["shard_size"]))
        self.cache_plan = plan_cache(self.catalog, settings)
        self.data_cache_key = self.cache_plan.key
        remote = remote_prefix(pre.get("remote", "auto"))
        self.cache_uri = cache_store.cache_uri(remote, self.data_cache_key) if remote else None
        self.cache_complete = self.cache_plan.complete or bool(
            self.cache_uri and cache_store.is_complete(self.cache_uri)
        )
        self.shard_groups = shard_groups(len(self.cache_plan.shards), pre.get("tasks", "auto"))
        shards, tasks = len(self.cache_plan.shards), len(self.shard_groups)
        print(f"cache {self.data_cache_key}: {shards} shards, {tasks} tasks, complete: {self.cache_complete}")
        self.next(self.preprocess, foreach="shard_groups")

    @retry(times=2)  # a shard stopped by a store that keeps failing is read again; finished shards are kept
    @step
    def preprocess(self):
        """Build this task's shards one after another (each reused when an earlier or interrupted run
        already wrote it) and share them."""
        self.shard_results = []
        if self.cache_complete:
            self.next(self.join_preprocess)
            return
        plan, source = self.cache_plan, self.catalog.source
        with Progress(f"preprocess task {self.index}", sum(len(plan.shards[i]) for i in self.input)) as bar:
            for index in self.input:
                self.shard_results.append(build_shard(plan, index, source))
                if self.cache_uri:
                    names = [shard_path(plan.directory, index, s).name for s in (".npy", ".json")]
                    cache_store.publish(plan.directory, self.cache_uri, names)
                bar.update(len(plan.shards[index]))
        self.next(self.join_preprocess)

    @step
    def join_preprocess(self, inputs):
        """Finalize the cache (table, labels, manifest over all shards) and record where it lives."""
        self._finish_cache(inputs)
        self.next(self.train)

    def _finish_cache(self, inputs):
        self.merge_artifacts(inputs, exclude=["shard_results"])
        plan = self.cache_plan
        if not self.cache_complete:
            results = sorted((r for inp in inputs for r in inp.shard_results), key=lambda r: r.index)
            finalize_cache(plan, self.catalog, results)
            if self.cache_uri:
                cache_store.publish(plan.directory, self.cache_uri, TABLE_FILES)
        self.data_cache = {
            "key": self.data_cache_key,
            "local_dir": str(plan.directory),
            "uri": self.cache_uri,
        }

    @card(type="blank")
    @resources(gpu=1, cpu=8, memory=32000)
    @retry(times=1)
    @step
    def train(self):
        """Train the classifier here (or on Batch) or as a SageMaker managed spot job; both checkpoint every
        epoch to S3 when it is configured, so a killed step, job or spot instance resumes, not restarts."""
        self._train_and_record()
        self.next(self.evaluate)

    def _train_and_record(self):
        """Train (here or on SageMaker) and keep the model, its history and its card; on a node other than
        the first of a multi-node run, nothing (the first node's process rank 0 has the model)."""
        cache = cache_store.open_cache(self.data_cache["local_dir"], self.data_cache["uri"])
        self.cache_rows = cache_rows(cache, self.catalog.meta["image_id"], self.split_rows)
        run = current.origin_run_id or current.run_id
        if self.config.get("compute", {}).get("train", "local") == "sagemaker":
            result = self._train_on_sagemaker(run)
        else:
            result = self._train_here(cache, run)
        if result is None:
            return
        self.model_state, self.history = result.best_state, result.history
        self.val_probabilities = result.val_probabilities  # the best epoch's, reused by evaluate
        self.best_epoch, self.best_val_auroc = result.best_epoch, result.best_val_auroc
        self.resumed_from_epoch, self.train_device = result.resumed_from_epoch, result.device
        self.train_data_path = result.data_path  # loader (CPU workers) or device (cache on the GPU)
        current.card.append(Markdown(f"## Training on {result.device}: best epoch {result.best_epoch}"))
        current.card.append(VegaChart(plots.training_curves(self.history)))
        current.card.append(Table.from_dataframe(pd.DataFrame(self.history).round(4)))

    def _train_here(self, cache, run):
        settings = TrainConfig.from_dict(self.config["train"])
        checkpoints = checkpoint_dir(current.flow_name, run)
        remote = remote_prefix(self.config["preprocess"].get("remote", "auto"), "cxr-checkpoints")
        sync = None
        if remote:  # checkpoints also go to S3, so a retry or resume on another machine continues too
            self.checkpoint_uri = f"{remote}/{current.flow_name}/{run}/train/"
            s3sync.download(self.checkpoint_uri, checkpoints)
            sync = partial(s3sync.upload, uri=self.checkpoint_uri, names=[LAST, BEST])
        rows = self.cache_rows
        return train_model(cache, rows["train"], rows["val"], settings, checkpoints, on_checkpoint=sync)

    def _train_on_sagemaker(self, run):
        if not self.data_cache["uri"]:
            raise ValueError(
                "SageMaker training reads the shard cache from S3: use the S3 datastore or set "
                "preprocess.remote to an s3:// prefix"
            )
        section = dict(self.config.get("sagemaker", {}))
        section["output"] = remote_prefix(section.get("output", "auto"), "cxr-sagemaker")
        split = {name: self.cache_rows[name].tolist() for name in ("train", "val")}
        model = train_on_sagemaker(
            section, self.data_cache["uri"], split, self.config["train"], current.flow_name, run
        )
        self.training_job = model["job"]
        self.checkpoint_uri = model["job"]["checkpoints"]
        print(f"training job {self.training_job['name']}: spot saving {self.training_job['saving_fraction']}")
        return TrainResult(
            model["state"],
            model["history"],
            model["best_epoch"],
            model["best_val_auroc"],
            model["resumed_from_epoch"],
            f"sagemaker:{model['device']}",
        )

    @card(type="blank")
    @resources(gpu=1, cpu=8, memory=32000)
    @step
    def evaluate(self):
        """Thresholds from the validation probabilities of training's best epoch; test scored once with the
        fastest verified backend (GPU, else ONNX Runtime); AUROC with CIs, AUPRC, operating points,
        calibration; the input gate (fitted on training images, thresholds on validation, judged on test
        images and a corpus of foreign ones); the monitoring baseline from held-out images, scored the same
        way, with the gate's scores and the uncertainty the server would answer."""
        cache = cache_store.open_cache(self.data_cache["local_dir"], self.data_cache["uri"])
        model = CXRNet(pretrained=False, dropout=float(self.config["train"].get("dropout", 0.3)))
        model.load_state_dict(self.model_state)
        crop = int(self.config["train"]["crop"])
        val, test = (ShardDataset(cache, self.cache_rows[s], crop=crop) for s in ("val", "test"))
        val_probs = getattr(self, "val_probabilities", None)
        if val_probs is None or len(val_probs) != len(val):  # e.g. trained by a SageMaker job
            val_probs = score_fast(model, val, "validation").probabilities
        method = self.config["evaluate"].get("calibration", "auto")
        calibrator = fit_calibration(val.labels, val_probs, method)
        self.calibration = calibrator.to_dict()  # shipped in the package: served probabilities are calibrated
        val_calibrated = calibrator.apply(val_probs)
        thresholds = youden_thresholds(val.labels, val_calibrated)
        targets = parse_operating_points(self.config["evaluate"].get("operating_points"))
        target_thresholds = choose_thresholds(val.labels, val_calibrated, targets)  # each target's, on val
        with tempfile.TemporaryDirectory() as work:  # the session keeps the exported graph in memory
            predictor, self.scoring = fastest_predictor(model, test, work)
        print(f"scoring {len(test):,} test images with {self.scoring}")
        tested = score(predictor, test, "test", embeddings=True, appearances=True)
        raw_test_probs = tested.probabilities
        test_probs = calibrator.apply(raw_test_probs)
        test_meta = cache.meta.iloc[self.cache_rows["test"]].reset_index(drop=True)
        report = evaluate_predictions(test.labels, test_probs, test_meta, thresholds,
                                      int(self.config["evaluate"]["n_boot"]), targets=targets,
                                      target_thresholds=target_thresholds)  # fmt: skip
        summary = calibration_summary(calibrator, test.labels, raw_test_probs)
        settings = self.config["evaluate"].get("input_gate") or {}
        self.input_gate, gate_report = fit_run_gate(
            predictor, cache, self.cache_rows, crop, tested, **settings
        )
        print(f"input gate: OOD AUROC {gate_report['auroc']:.3f}, real test images refused "
              f"{gate_report['real_refused']:.2%}")  # fmt: skip
        served = CalibratedPredictor(predictor, calibrator)  # what the server answers
        self.external_validation = self._validate_externally(served, thresholds, targets, target_thresholds)
        experts = expert_validation(self.data_root, test_meta, test_probs, thresholds,
                                    int(self.config["evaluate"]["n_boot"]))  # fmt: skip
        self.metrics = {**report.to_dict(), "calibration": summary, "input_gate": gate_report,
                        "external": self.external_validation, "expert_labels": experts}  # fmt: skip
        self.mean_auroc = shown_number(report.mean_auroc)  # headline artifacts: small enough for the UI
        self.mean_auroc_ci = [shown_number(bound) for bound in report.mean_auroc_ci]
        self.test_predictions = pd.DataFrame(test_probs, columns=[f"prob_{f}" for f in FINDINGS])
        self.test_predictions.insert(0, "Image Index", test_meta["image_id"])
        thresholds = {row["finding"]: row["threshold"] for row in self.metrics["per_class"]}
        rows = monitoring_rows(self.cache_rows)
        sampler = HeadSampler.from_state(self.model_state, float(self.config["train"].get("dropout", 0.3)),
                                         calibrator)  # fmt: skip
        self.baseline = compute_baseline(served, cache, rows, crop, thresholds, self.metrics["auroc"],
                                         sampler=sampler, gate=self.input_gate)  # fmt: skip
        print(report.table())
        _metrics_card(report, self.external_validation)
        self.next(self.register)

    def _validate_externally(self, served, thresholds, targets, target_thresholds) -> dict:
        """Each `evaluate.external` set scored as the server would, at this model's own thresholds."""
        pre, results = self.config["preprocess"], {}
        settings = PreprocessSettings(size=int(pre["size"]), shard_size=int(pre["shard_size"]))
        for spec in parse_external_sets(self.config["evaluate"].get("external")):
            report, _ = validate_external(served, spec, settings, int(self.config["train"]["crop"]),
                                          thresholds=thresholds, targets=targets,
                                          target_thresholds=target_thresholds,
                                          n_boot=int(self.config["evaluate"]["n_boot"]))  # fmt: skip
            results[spec.name] = external_summary(spec, report)
            print(f"external set {spec.name}: mean AUROC {report.mean_auroc:.4f} on {report.n_images} images")
        return results

    @resources(gpu=1, cpu=8, memory=32000)  # re-scoring production on the test images
    @step
    def register(self):
        """Compare with production on this run's test images that production never trained on, package
        (ONNX and OpenVINO exports verified, INT8 calibrated on training images), register (gated) with
        the images this version was fitted to and tested on."""

        rules = self.config["registry"]
        registry = open_configured_registry(rules, self.config["data"])
        cache = cache_store.open_cache(self.data_cache["local_dir"], self.data_cache["uri"])
        test_rows = self.cache_rows["test"]
        probs = self.test_predictions[[f"prob_{f}" for f in FINDINGS]].to_numpy()
        own = report_thresholds(self.metrics)  # the candidate's thresholds, beside production's in the gate
        comparison = compare_with_production(registry, cache, test_rows, probs, candidate_thresholds=own)
        self.production_auroc = comparison.production
        sensitivity_drop = rules.get("max_sensitivity_drop", DEFAULT_MAX_SENSITIVITY_DROP)  # null: unchecked
        decision = promotion_gate(
            comparison.candidate,
            comparison.production,
            float(rules["min_improvement"]),
            float(rules["max_finding_drop"]),
            bool(rules["manual_approval"]),
            comparison.refused,
            comparison.at_production_thresholds,
            None if sensitivity_drop is None else float(sensitivity_drop),
        )
        floors = {name: float(v) for name, v in (rules.get("external_floors") or {}).items()}
        decision = require_external_floors(decision, self.metrics.get("external") or {}, floors)
        self.gate = {**decision.__dict__, "images": comparison.images, "excluded": comparison.excluded}
        lineage = {
            "flow run": current.pathspec.rsplit("/", 2)[0],
            "data root": self.data_root,
            "datasets": json.dumps({name: report["root"] for name, report in self.ingest_reports.items()}),
            "data cache key": self.data_cache_key,
            "split": self.split_method,
            "config": json.dumps(self.config, sort_keys=True),
        }
        train = self.config["train"]
        settings = {"image_size": int(self.config["preprocess"]["size"]), "crop": int(train["crop"]),
                    "dropout": float(train.get("dropout", 0.3)), "calibration": self.calibration}  # fmt: skip
        status = registration_status(decision, deploys=self._deploys())
        with tempfile.TemporaryDirectory() as work:  # the baseline: what MonitorFlow compares traffic with
            files = {path.name: path for path in self.baseline.save(work)}
            files[SPLIT_FILE] = split_record(cache.meta["image_id"], self.cache_rows)  # for later gates
            gate_file = {GATE_FILE: self.input_gate.save(Path(work) / GATE_FILE)}  # shipped in the package
            release = release_model(registry, self.model_state, settings, self.metrics, lineage, decision,
                                    cache, test_rows, status, files, gate_file,
                                    calibration_rows=self.cache_rows["train"])  # fmt: skip
        self.onnx_check, self.openvino_checks = release.onnx_check, release.openvino_checks
        self.model_version, self.model_status = release.version.version, release.version.status
        self.model_group, self.model_package = registry.group, str(release.version.package)
        print(f"model version {self.model_version}: {self.model_status} ({decision.text()})")
        print(f"ONNX export: {self.onnx_check}")
        for precision, check in self.openvino_checks.items():
            print(f"OpenVINO {precision}: {check}")
        self.next(self.deploy)

    @step
    def deploy(self):
        """Release the version to SageMaker when `deploy.enabled` and the gate promoted it: staging →
        smoke test → production (the same path as `cxr deploy release`); otherwise nothing."""
        self.deployment = None
        section = self.config.get("deploy") or {}
        if not self._deploys() or self.model_status != "approved":
            print("deploy: skipped (deploy.enabled is false or the gate did not promote the version)")
            self.next(self.end)
            return
        registry = open_configured_registry(self.config["registry"], self.config["data"])
        artifacts = remote_prefix(section.get("artifacts", "auto"), "cxr-deploy")
        report = release_configured({**section, "artifacts": artifacts}, registry, self.model_version)
        self.model_status = registry.get(self.model_version).status  # production once it serves
        self.deployment = {
            "endpoints": [d.endpoint for d in report.production],
            "actions": [d.action for d in report.production],
            "smoke_ms": report.production_smoke.latency_ms if report.production_smoke else None,
            "message": report.message,
        }
        print(report.message)
        self.next(self.end)

    def _deploys(self) -> bool:
        return bool((self.config.get("deploy") or {}).get("enabled"))

    @step
    def end(self):
        """Sum the run up in one line (the `headline` artifact) and point to the results."""
        run = f"Flow('{current.flow_name}')['{current.run_id}']"
        self.headline = headline(self.metrics, self.model_group, self.model_version, self.model_status)
        print(self.headline)
        print(f"model version {self.model_version} ({self.model_status}): {self.model_package}")
        print(f"metrics:  python -c \"from metaflow import Flow; print({run}['end'].task['metrics'].data)\"")
        flow_file = os.path.relpath(__file__)
        print(f"cards:    python {flow_file} card view evaluate   (or: python {flow_file} card server)")
        print(f"registry: cxr registry list --group {self.model_group}")


def shown_number(value: float) -> float | None:
    """A metric as the Metaflow UI can show it: a plain float, None when not finite (JSON has no NaN)."""
    return float(value) if math.isfinite(value) else None


def headline(metrics: dict, group: str, version: int, status: str) -> str:
    """One line for a run's artifact table: the registered version, its status and its test mean AUROC."""
    lo, hi = metrics["mean_auroc_ci"]
    return (
        f"{group} version {version} ({status}): test mean AUROC {metrics['mean_auroc']:.4f} "
        f"(95% CI {lo:.4f}-{hi:.4f}) on {metrics['n_images']} images"
    )


def _metrics_card(report, external: dict) -> None:
    """The evaluate step's card: metrics with CIs, ROC curves, reliability, subgroups, external sets."""
    lo, hi = report.mean_auroc_ci
    current.card.append(
        Markdown(
            f"## Test: mean AUROC {report.mean_auroc:.4f} (95% CI {lo:.4f}–{hi:.4f}), ECE {report.ece:.4f}"
        )
    )
    headers = ["finding", "positives", "AUROC (95% CI)", "AUPRC", "sensitivity", "specificity", "PPV", "ECE"]
    rows = [
        [name, int(r.n_pos), f"{r.auroc:.3f} ({r.auroc_lo:.3f}–{r.auroc_hi:.3f})"]
        + [f"{v:.3f}" for v in (r.auprc, r.sensitivity, r.specificity, r.ppv, r.ece)]
        for name, r in report.per_class.iterrows()
    ]
    current.card.append(Table(rows, headers=headers))
    current.card.append(VegaChart(plots.roc_chart(report.roc_curves, report.auroc)))
    current.card.append(VegaChart(plots.reliability_chart(report.reliability.to_dict("records"), report.ece)))
    if len(report.subgroups):
        gap = report.largest_gap
        text = (
            f"largest gap {gap['gap']:.3f} by {gap['dimension']} ({gap['best']} vs {gap['worst']})"
            if gap
            else ""
        )
        current.card.append(Markdown(f"## Subgroup mean AUROC {text}"))
        subgroup_rows = [
            [r["dimension"], r["group"], int(r["n"]), f"{r['mean_auroc']:.3f}"]
            for _, r in report.subgroups.iterrows()
        ]
        current.card.append(Table(subgroup_rows, headers=["dimension", "group", "images", "mean AUROC"]))
    if external:
        current.card.append(Markdown("## External validation"))
        rows = [[name, r["set"]["root"], r["set"]["rows"], r["n_images"], len(r["labelled_findings"]),
                 f"{r['mean_auroc']:.3f} ({r['mean_auroc_ci'][0]:.3f}–{r['mean_auroc_ci'][1]:.3f})"]
                for name, r in external.items()]  # fmt: skip
        current.card.append(Table(rows, headers=["set", "root", "rows", "images", "findings", "mean AUROC"]))
        sets = {"test": report.to_dict()["per_class"], **{n: r["per_class"] for n, r in external.items()}}
        current.card.append(VegaChart(plots.auroc_forest_chart(sets, list(FINDINGS))))


if __name__ == "__main__":
    CXRTrainFlow()
