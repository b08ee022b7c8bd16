"""Monitor captured endpoint traffic for drift, on a schedule.

python flows/monitor_flow.py run --capture_uri ./capture --window_hours 24
python flows/monitor_flow.py run --capture_uri s3://bucket/capture --labels truth.csv --notify https://hooks/...
python flows/monitor_flow.py step-functions create      # daily, per @schedule
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

import pandas as pd
from metaflow import FlowSpec, IncludeFile, Parameter, card, current, schedule, step
from metaflow.cards import Markdown, Table, VegaChart

from cxr.config import cxr_home, parse_config
from cxr.monitor import report
from cxr.monitor.baseline import Baseline
from cxr.monitor.checks import MonitorConfig, constraint_violations, run_checks, violations
from cxr.monitor.notify import make_notifier
from cxr.monitor.reader import list_variants, read_traffic
from cxr.registry import DEFAULT_GROUP, RegistryError, open_registry

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

REPO = Path(__file__).resolve().parent.parent


@schedule(daily=True)
class CXRMonitorFlow(FlowSpec):
    """Captured traffic → drift report.

    Stages:
    1. start: the time window, the baseline (by default the production model's) and the variants.
    2. check (foreach variant): read the window's capture; input, embedding, prediction, performance
       (with ground truth) and data-quality checks.
    3. join: `violations`, Model Monitor-like reports, a card with distributions and drift over time.
    4. alert: notify when there are violations; optionally retrain.
    5. end.
    """

    # Defaults come from the environment where the flow is run or deployed (`step-functions create`), so
    # a scheduled monitor reads the right capture, endpoint and registry without a code change.
    capture_uri = Parameter(
        "capture_uri",
        default=os.environ.get("CXR_CAPTURE", str(cxr_home() / "capture")),
        help="capture directory or s3:// prefix (default: $CXR_CAPTURE)",
    )
    endpoint = Parameter(
        "endpoint",
        default=os.environ.get("CXR_ENDPOINT_NAME", "cxr-endpoint"),
        help="endpoint name in the capture layout (default: $CXR_ENDPOINT_NAME)",
    )
    window_hours = Parameter("window_hours", default=24.0, type=float, help="length of the window, hours")
    window_end = Parameter("window_end", default="", help="end of the window (ISO 8601, UTC); default: now")
    baseline = Parameter(
        "baseline", default="registry", help="baseline directory, or 'registry' (production)"
    )
    group = Parameter("group", default=DEFAULT_GROUP, help="registry model group for the default baseline")
    registry = Parameter(
        "registry",
        default=os.environ.get("CXR_REGISTRY", "local"),
        help="'local', or the s3:// prefix of the SageMaker Model Registry's files (default: $CXR_REGISTRY)",
    )
    labels = Parameter("labels", default="", help="ground truth CSV/JSONL keyed by inference_id or image_id")
    notify = Parameter("notify", default="log", help="'log', a webhook URL, or an SNS topic ARN")
    retrain = Parameter("retrain", default=False, type=bool, help="run the train flow when drift is found")
    retrain_config = Parameter(
        "retrain_config", default="", help="config file for the triggered training run"
    )
    config_file = IncludeFile(
        "config_file", default=str(REPO / "config" / "monitor.yaml"), help="check thresholds"
    )

    @step
    def start(self):
        """Resolve the window, the baseline and the variants to check."""
        self.config = parse_config(self.config_file)
        MonitorConfig.from_dict(self.config)  # fail early on a bad configuration
        end = dt.datetime.fromisoformat(self.window_end) if self.window_end else dt.datetime.now(dt.UTC)
        end = end if end.tzinfo else end.replace(tzinfo=dt.UTC)
        self.window = (end - dt.timedelta(hours=self.window_hours), end)
        self.baseline_dir, self.baseline_version = self._resolve_baseline()
        self.variants = list_variants(self.capture_uri, self.endpoint) or ["A"]
        print(f"window {self.window[0].isoformat()} → {self.window[1].isoformat()}, variants {self.variants}")
        self.next(self.check, foreach="variants")

    def _open_registry(self):
        if self.registry.startswith("s3://"):
            return open_registry(self.group, "sagemaker", s3_prefix=self.registry)
        return open_registry(self.group)

    def _resolve_baseline(self) -> tuple[str, int | None]:
        if self.baseline != "registry":
            return self.baseline, None
        production = self._open_registry().production()
        if production is None:
            raise RegistryError(f"no production model in registry group {self.group!r}; pass --baseline DIR")
        return str(production.directory), production.version

    def _baseline_path(self) -> str:
        """The baseline folder on this machine: fetched again from the registry when a step runs
        elsewhere (on Batch under Step Functions) and the start step's folder is not here."""
        if Path(self.baseline_dir).is_dir() or self.baseline_version is None:
            return self.baseline_dir
        return str(self._open_registry().get(self.baseline_version).directory)

    @step
    def check(self):
        """Read one variant's traffic and run every check against the baseline."""
        self.variant = self.input
        traffic = read_traffic(
            self.capture_uri, self.endpoint, *self.window, variants=[self.variant], model=self._package()
        )[self.variant]
        labels = read_labels(self.labels) if self.labels else None
        self.results = run_checks(
            Baseline.load(self._baseline_path()), traffic, MonitorConfig.from_dict(self.config), labels
        )
        self.traffic_summary = traffic.summary()
        self.traffic = traffic
        print(self.traffic_summary)
        self.next(self.join)

    def _package(self) -> str | None:
        """The model package beside the baseline (the production version's), which featurizes
        SageMaker-native capture records; None when the baseline directory holds none."""
        package = Path(self._baseline_path()) / "model.tar.gz"
        return str(package) if package.is_file() else None

    @card(type="blank")
    @step
    def join(self, inputs):
        """Collect results: violations, reports, drift summary and the card."""
        self.merge_artifacts(inputs, include=["config", "window", "baseline_dir", "baseline_version"])
        self.results = pd.concat([i.results for i in inputs], ignore_index=True)
        self.traffic_summary = [i.traffic_summary for i in inputs]
        self.violations = violations(self.results)
        self.constraint_violations = constraint_violations(self.violations)
        self.drift_summary = report.drift_summary(self.results)
        out = cxr_home() / "monitoring" / self.endpoint / current.run_id
        self.report_files = [str(p) for p in report.write_reports(out, self.results, self.violations)]
        self._card([i.traffic for i in inputs])
        self.next(self.alert)

    def _card(self, traffic) -> None:
        baseline = Baseline.load(self._baseline_path())
        verdict = f"{len(self.violations)} violation(s)" if self.violations else "no drift"
        current.card.append(
            Markdown(f"## {verdict} — window {self.window[0]:%Y-%m-%d %H:%M} to {self.window[1]:%H:%M} UTC")
        )
        current.card.append(
            Table.from_dataframe(pd.DataFrame(self.traffic_summary).drop(columns=["model_versions"]))
        )
        if self.violations:
            current.card.append(Table.from_dataframe(pd.DataFrame(self.violations).round(5)))
        for t in traffic:
            drifted = self.results[
                (self.results["variant"] == t.variant) & self.results["check"].eq("prediction_drift")
            ]
            top = drifted.nlargest(3, "statistic")["feature"].tolist() if len(drifted) else []
            features = [f"image.{n}" for n in ("mean", "std", "p5", "p95")] + top
            current.card.append(VegaChart(report.distribution_chart(baseline, t, features)))
        current.card.append(VegaChart(report.history_chart(self._history())))

    def _history(self) -> list[dict]:
        from metaflow import Flow

        rows = [{"run": current.run_id, "time": dt.datetime.now(dt.UTC).isoformat(), **self.drift_summary}]
        for run in list(Flow(current.flow_name).runs())[:50]:
            if run.id != current.run_id and run.successful and "drift_summary" in run["join"].task:
                rows.append(
                    {
                        "run": run.id,
                        "time": run.created_at.isoformat(),
                        **run["join"].task["drift_summary"].data,
                    }
                )
        return rows

    @step
    def alert(self):
        """Notify on violations; with --retrain, run the train flow and record its run id."""
        self.alert_receipt, self.retrain_run = None, None
        if self.violations:
            subject = f"cxr drift: {len(self.violations)} violation(s) on {self.endpoint}"
            body = {
                "violations": self.violations,
                "traffic": self.traffic_summary,
                "reports": self.report_files,
            }
            self.alert_receipt = make_notifier(self.notify).send(subject, body)
            if self.retrain:
                self.retrain_run = trigger_training(self.retrain_config)
        self.next(self.end)

    @step
    def end(self):
        """Summary."""
        print(f"{len(self.violations)} violation(s); reports: {self.report_files[0]}")
        if self.retrain_run:
            print(f"retraining run: {self.retrain_run}")


def read_labels(path: str) -> pd.DataFrame:
    """Ground truth: CSV or JSONL with `inference_id` or `image_id` and one 0/1 column per finding."""
    table = pd.read_json(path, lines=True) if path.endswith((".jsonl", ".json")) else pd.read_csv(path)
    if "inference_id" not in table.columns and "image_id" not in table.columns:
        raise ValueError(f"{path}: ground truth needs an 'inference_id' or 'image_id' column")
    return table


def trigger_training(config_file: str = "") -> str:
    """Run the train flow now (blocking) and return its pathspec."""
    from metaflow import Runner

    params = {"config_file": config_file} if config_file else {}
    env = {**os.environ}
    with Runner(str(REPO / "flows" / "train_flow.py"), show_output=False, env=env).run(**params) as running:
        if running.status != "successful":
            raise RuntimeError(f"triggered training failed:\n{running.stderr[-2000:]}")
        return running.run.pathspec


if __name__ == "__main__":
    CXRMonitorFlow()
