"""Monitor captured endpoint traffic for drift, on a schedule.

python flows/monitor_flow.py run --capture_uri ./capture --window_hours 24
python flows/monitor_flow.py run --capture_uri s3://bucket/capture --labels postgresql://... --notify https://hooks/...
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
from cxr.metaflow_cards import keep_cards_with_datastore
from cxr.monitor import report
from cxr.monitor.acquisition import acquisition_checks
from cxr.monitor.baseline import Baseline
from cxr.monitor.checks import MonitorConfig, check_variant, constraint_violations, violations
from cxr.monitor.notify import make_notifier
from cxr.monitor.reader import list_variants, read_traffic
from cxr.monitor.references import References
from cxr.monitor.shadow import shadow_agreement
from cxr.registry import DEFAULT_GROUP, open_registry
from cxr.reviews import default_database_url, is_database_url, read_reviews
from cxr.serve.headers import SHADOW

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
keep_cards_with_datastore()  # cards where the client and the UI find them, wherever the run started

REPO = Path(__file__).resolve().parent.parent


@schedule(daily=True)
class CXRMonitorFlow(FlowSpec):
    """Captured traffic → drift report.

    Stages:
    1. start: the time window and the variants.
    2. check (foreach variant): read the window's capture; each model version that served it is checked
       against its own baseline from the registry (input, embedding, prediction, performance with ground
       truth), the variant's traffic as a whole for data quality.
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
    shadow_endpoint = Parameter(
        "shadow_endpoint", default="",
        help="the endpoint a gateway mirrors requests to (cxr gateway --shadow-endpoint): its captured "
        "answers are paired with this endpoint's by inference id (a server's own --shadow needs nothing)",
    )  # fmt: skip
    acquisition_reference_hours = Parameter(
        "acquisition_reference_hours", default=0.0, type=float,
        help="hours of traffic before the window that its DICOM acquisition attributes are compared with "
        "(0: as long as the window)",
    )  # fmt: skip
    baseline = Parameter(
        "baseline",
        default="registry",
        help="'registry' (each served model version's own baseline), or one baseline directory for all",
    )
    group = Parameter("group", default=DEFAULT_GROUP, help="registry model group of the served versions")
    variant_versions = Parameter(
        "variant_versions",
        default="",
        help="model version each variant serves, e.g. A=3,B=4, for capture records that name none",
    )
    registry = Parameter(
        "registry",
        default=os.environ.get("CXR_REGISTRY", "local"),
        help="'local', or the s3:// prefix of the SageMaker Model Registry's files (default: $CXR_REGISTRY)",
    )
    labels = Parameter(
        "labels",
        default="reviews",
        help="ground truth: 'reviews' (the web app's reviews, at $CXR_APP_DATABASE or ~/.cxr/app.db), a "
        "database URL holding them, a CSV/JSONL keyed by inference_id or image_id (optional patient_id "
        "column), or 'none'",
    )
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
        """Resolve the window and the variants to check."""
        self.config = parse_config(self.config_file)
        MonitorConfig.from_dict(self.config)  # fail early on a bad configuration
        self.served_versions = parse_variant_versions(self.variant_versions)
        end = dt.datetime.fromisoformat(self.window_end) if self.window_end else dt.datetime.now(dt.UTC)
        end = end if end.tzinfo else end.replace(tzinfo=dt.UTC)
        self.window = (end - dt.timedelta(hours=self.window_hours), end)
        self._references()  # fail early on a bad registry group or a missing baseline directory
        self.variants = list_variants(self.capture_uri, self.endpoint) or ["A"]
        print(f"window {self.window[0].isoformat()} → {self.window[1].isoformat()}, variants {self.variants}")
        self.next(self.check, foreach="variants")

    def _references(self) -> References:
        """Each model version's baseline and package: its registry folder, or the --baseline directory."""
        if self.baseline != "registry":
            if not Path(self.baseline).is_dir():
                raise FileNotFoundError(f"--baseline {self.baseline}: no such directory")
            return References(directory=self.baseline)
        if self.registry.startswith("s3://"):
            return References(open_registry(self.group, "sagemaker", s3_prefix=self.registry))
        return References(open_registry(self.group))

    @step
    def check(self):
        """Read one variant's traffic; check each model version's part against its own baseline."""
        self.variant = self.input
        references = self._references()
        window = (self.capture_uri, self.endpoint, *self.window)
        traffic = read_traffic(
            *window, variants=[self.variant], model=references.package, versions=self.served_versions
        )[self.variant]
        found = references.baselines(traffic.model_versions)
        labels = read_labels(self.labels)
        self.labelled_cases = 0 if labels is None else len(labels)
        config = MonitorConfig.from_dict(self.config)
        self.results = check_variant(traffic, found, config, labels)
        if any(traffic.acquisition):  # DICOM traffic: scanners and protocols against the traffic before
            acquisition = pd.DataFrame(acquisition_checks(self._earlier(), traffic, config))
            self.results = pd.concat(
                [self.results, acquisition.assign(variant=self.variant)], ignore_index=True
            )
        self.baselines = {v: b for v, b in found.items() if isinstance(b, Baseline)}  # for the card
        self.baseline_sources = {
            v: str(references.folder(v)) if isinstance(b, Baseline) else f"none: {b}"
            for v, b in found.items()
        }
        self.traffic_summary = traffic.summary()
        self.traffic = traffic
        print(self.traffic_summary, self.baseline_sources)
        self.next(self.join)

    def _earlier(self):
        """This variant's traffic in the hours before the window (its acquisition attributes)."""
        hours = self.acquisition_reference_hours or self.window_hours
        start = self.window[0] - dt.timedelta(hours=hours)
        return read_traffic(self.capture_uri, self.endpoint, start, self.window[0], variants=[self.variant])[
            self.variant
        ]

    @card(type="blank")
    @step
    def join(self, inputs):
        """Collect results: violations, reports, drift summary and the card."""
        self.merge_artifacts(inputs, include=["config", "window", "served_versions"])
        self.baseline_sources = {i.variant: i.baseline_sources for i in inputs}
        self.results = pd.concat([i.results for i in inputs], ignore_index=True)
        self.shadow_agreement = self._shadow_agreement(inputs)  # champion vs shadow on the same requests
        if self.shadow_agreement:
            self.results = pd.concat([self.results, pd.DataFrame(self.shadow_agreement)], ignore_index=True)
        self.traffic_summary = [i.traffic_summary for i in inputs]
        self.labelled_cases = max(i.labelled_cases for i in inputs)  # reviewed or given ground truth
        self.violations = violations(self.results)
        self.constraint_violations = constraint_violations(self.violations)
        self.drift_summary = report.drift_summary(self.results)
        out = cxr_home() / "monitoring" / self.endpoint / current.run_id
        self.report_files = [str(p) for p in report.write_reports(out, self.results, self.violations)]
        self._card([(i.traffic, i.baselines) for i in inputs])
        self.next(self.alert)

    def _shadow_agreement(self, inputs) -> list[dict]:
        """Rows per finding pairing each variant's answers with the shadow model's: variant `shadow` of
        this endpoint, or every variant of `--shadow_endpoint`."""
        traffic = {i.variant: i.traffic for i in inputs}
        shadows = {SHADOW: traffic.pop(SHADOW)} if SHADOW in traffic else {}
        if self.shadow_endpoint:
            found = read_traffic(self.capture_uri, self.shadow_endpoint, *self.window)
            shadows.update({f"{self.shadow_endpoint}/{v}": t for v, t in found.items()})
        least = MonitorConfig.from_dict(self.config).min_shadow_agreement
        return [{**row, "variant": name, "shadow": source} for name, champion in traffic.items()
                for source, shadow in shadows.items()
                for row in shadow_agreement(champion, shadow, least)]  # fmt: skip

    def _card(self, checked) -> None:
        verdict = f"{len(self.violations)} violation(s)" if self.violations else "no drift"
        current.card.append(
            Markdown(f"## {verdict} — window {self.window[0]:%Y-%m-%d %H:%M} to {self.window[1]:%H:%M} UTC")
        )
        current.card.append(
            Table.from_dataframe(pd.DataFrame(self.traffic_summary).drop(columns=["model_versions"]))
        )
        if self.violations:
            current.card.append(Table.from_dataframe(pd.DataFrame(self.violations).round(5)))
        estimated = self.results[
            self.results["check"].eq("label_free") & self.results["feature"].str.startswith("auroc.")
        ]
        if len(estimated):  # what the window's AUROC is estimated to be, without labels
            columns = [c for c in ("variant", "model_version", "feature", "estimate", "ci_low", "ci_high",
                                   "baseline_value", "violation") if c in estimated]  # fmt: skip
            current.card.append(Markdown("### Label-free AUROC estimates"))
            current.card.append(Table.from_dataframe(estimated[columns].round(4)))
        if self.shadow_agreement:
            current.card.append(Markdown("### Champion vs shadow: decisions agreeing, per finding"))
            current.card.append(Table.from_dataframe(pd.DataFrame(self.shadow_agreement).round(4)))
        for traffic, baselines in checked:
            for version, baseline in sorted(baselines.items()):
                mine = (self.results["variant"] == traffic.variant) & (
                    self.results["model_version"] == version
                )
                drifted = self.results[mine & self.results["check"].eq("prediction_drift")]
                top = drifted.nlargest(3, "statistic")["feature"].tolist() if len(drifted) else []
                features = [f"image.{n}" for n in ("mean", "std", "p5", "p95")] + top
                title = f"Baseline vs window, variant {traffic.variant}, model version {version}"
                chart = report.distribution_chart(
                    baseline, traffic.of_version(version), features, title=title
                )
                current.card.append(VegaChart(chart))
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


def parse_variant_versions(text: str) -> dict[str, str]:
    """ "A=3,B=4" → {"A": "3", "B": "4"} (the model version each variant serves)."""
    pairs = [part.strip() for part in text.split(",") if part.strip()]
    versions = {}
    for pair in pairs:
        variant, _, version = pair.partition("=")
        if not variant.strip() or not version.strip().isdigit():
            raise ValueError(f"--variant_versions: expected VARIANT=VERSION pairs like A=3,B=4, got {pair!r}")
        versions[variant.strip()] = version.strip()
    return versions


def read_labels(source: str) -> pd.DataFrame | None:
    """Ground truth, or None without any: the web app's reviews (`reviews`: its default database; or a
    database URL), or a CSV/JSONL file with `inference_id` or `image_id`, one 0/1 column per finding and,
    for CIs that resample patients, an optional pseudonymous `patient_id`."""
    if source in ("", "none"):
        return None
    if source == "reviews":
        source = default_database_url()
        if source.startswith("sqlite:///") and not Path(source.removeprefix("sqlite:///")).is_file():
            return None
    if is_database_url(source):
        reviewed = read_reviews(source)
        return reviewed if len(reviewed) else None
    path = source
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
