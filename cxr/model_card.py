"""Model cards (Markdown) for registered models: lineage, metrics with CIs, operating points, subgroups,
calibration, the promotion decision, use."""

from __future__ import annotations

from typing import Any

from cxr.evaluate import RATES, with_ci

INTENDED_USE = """\
Research and engineering use: triage-support experiments, benchmarking and MLOps development on chest
X-rays (frontal PA/AP views) in the ChestX-ray14 label space. **Not a medical device**; not for
diagnosis or treatment decisions without clinical validation under the applicable regulations."""

LIMITS = """\
- Labels of ChestX-ray14 were mined from radiology reports by NLP and are noisy (estimated >90%
  accuracy for most findings, lower for some); AUROC against them is bounded by that noise.
- One source hospital (NIH Clinical Center); performance on other sites, scanners and populations
  must be measured before use. Subgroup gaps below show where performance differs.
- Patient-level split: no patient is in two splits, but follow-up images of a patient share a split.
- Probabilities are calibrated only as far as the ECE below says; thresholds were chosen on validation.
- A model trained on the synthetic demo set says nothing about real chest X-rays."""


def render_model_card(
    version: int | str,
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    decision: str,
    training: dict[str, Any] | None = None,
    at_production_thresholds: list[dict[str, Any]] | None = None,
) -> str:
    """The model card text for one version, from an evaluation report dict and its lineage; with the gate's
    table of both models at production's thresholds (`cxr.gate.threshold_table`) when there was one."""
    ci = metrics.get("mean_auroc_ci", [float("nan")] * 2)
    lines = [
        f"# Model card: cxr chest X-ray classifier, version {version}",
        "",
        "DenseNet121 → global average pooling → FC 1024→512 + ReLU + Dropout → FC 512→14,"
        " sigmoid outputs for the 14 ChestX-ray14 findings.",
        "",
        "## Data lineage",
        *(f"- **{key}**: `{value}`" for key, value in lineage.items()),
        "",
        "## Performance (test split)",
        f"Mean AUROC **{metrics['mean_auroc']:.4f}** (95% bootstrap CI {ci[0]:.4f}–{ci[1]:.4f}, "
        f"{_resampled(metrics)}) on {metrics.get('n_images', '?')} images;"
        f" thresholds from {metrics.get('thresholds_from', 'validation')}.",
        "",
        "| finding | positives | AUROC (95% CI) | AUPRC | sensitivity | specificity | PPV | ECE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in metrics.get("per_class", []):
        lines.append(
            f"| {row['finding']} | {row['n_pos']} | {_f(row['auroc'])}"
            f" ({_f(row['auroc_lo'])}–{_f(row['auroc_hi'])})"
            f" | {_f(row['auprc'])} | {_f(row['sensitivity'])} | {_f(row['specificity'])} | {_f(row['ppv'])}"
            f" | {_f(row['ece'])} |"
        )
    lines += ["", "## Operating points", *_operating_point_lines(metrics.get("operating_points"))]
    lines += [
        "",
        "## Calibration",
        f"Expected calibration error over all findings: **{_f(metrics.get('ece'))}**.",
        *_calibration_lines(metrics.get("calibration")),
    ]
    lines += ["", "## External validation", *_external_lines(metrics.get("external"))]
    lines += _expert_lines(metrics.get("expert_labels"))
    lines += ["", "## Input gate", *_input_gate_lines(metrics.get("input_gate"))]
    lines += ["", "## Subgroups", *_subgroup_lines(metrics)]
    if training:
        lines += ["", "## Training", *(f"- {key}: `{value}`" for key, value in training.items())]
    lines += ["", "## Promotion decision", decision or "(none)"]
    lines += _production_threshold_lines(at_production_thresholds)
    lines += ["", "## Intended use", INTENDED_USE]
    lines += ["", "## Limits", LIMITS, ""]
    return "\n".join(lines)


def _f(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if number != number else f"{number:.3f}"


def _subgroup_lines(metrics: dict[str, Any]) -> list[str]:
    rows = metrics.get("subgroups", [])
    if not rows:
        return ["No subgroup metadata was available."]
    lines = ["| dimension | group | images | mean AUROC |", "|---|---|---|---|"]
    lines += [f"| {r['dimension']} | {r['group']} | {r['n']} | {_f(r['mean_auroc'])} |" for r in rows]
    gap = metrics.get("largest_gap") or {}
    if gap:
        lines += [
            "",
            f"Largest gap: **{gap['gap']:.3f}** mean AUROC by {gap['dimension']} "
            f"({gap['best']} vs {gap['worst']}).",
        ]
    return lines


def _resampled(metrics: dict[str, Any]) -> str:
    """What the bootstrap drew: "resampling 1,234 patients" (or images)."""
    boot = metrics.get("bootstrap") or {}
    units = boot.get("units")
    return f"resampling {units:,} {boot.get('resampled', 'images')}" if units else "resampling images"


def _external_lines(sets: dict[str, Any] | None) -> list[str]:
    """Per external set: what it is, mean AUROC, and per labelled finding its prevalence, AUROC (patient
    CI), sensitivity and specificity at the model's own thresholds, and ECE."""
    if not sets:
        return ["No external test set was evaluated (`evaluate.external`): performance on other sites is"
                " unknown."]  # fmt: skip
    lines = []
    for name, result in sets.items():
        spec, ci = result["set"], result.get("mean_auroc_ci", [None, None])
        lines += [
            f"**{name}** ({spec.get('dataset') or 'dataset'} at `{spec['root']}`, {spec['rows']} rows,"
            f" {spec['views']} views; {result['n_images']} images): mean AUROC **{_f(result['mean_auroc'])}**"
            f" ({_f(ci[0])}–{_f(ci[1])}, {_resampled(result)}) over the"
            f" {len(result['labelled_findings'])} findings it labels; ECE {_f(result.get('ece'))}.",
            "",
            "| finding | labelled | prevalence | AUROC (95% CI) | sensitivity | specificity | ECE |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = {row["finding"]: row for row in result.get("per_class", [])}
        for finding in result["labelled_findings"]:
            row = rows[finding]
            lines.append(
                f"| {finding} | {row['n_labelled']} | {_f(result['prevalence'][finding])}"
                f" | {_f(row['auroc'])} ({_f(row['auroc_lo'])}–{_f(row['auroc_hi'])})"
                f" | {_f(row['sensitivity'])} | {_f(row['specificity'])} | {_f(row['ece'])} |"
            )
        lines.append("")
    return lines


def _expert_lines(result: dict[str, Any] | None) -> list[str]:
    """The test images radiologists adjudicated (NIH's Google 2019 labels), when the data root has them."""
    if not result:
        return []
    lines = ["", "## Against radiologists' labels"]
    if not result["n_images"]:
        return [*lines, f"No test image is among those adjudicated in `{result['file']}`."]
    rows = [r for r in result.get("per_class", []) if r["n_labelled"]] + result.get("joint", [])
    lines += [
        f"{result['n_images']} test images adjudicated by radiologists (`{result['file']}`); joint findings"
        " are scored by the highest member probability.",
        "",
        "| finding | labelled | positives | AUROC (95% CI) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['finding']} | {r['n_labelled']} | {r['n_pos']} | {_f(r['auroc'])}"
        f" ({_f(r['auroc_lo'])}–{_f(r['auroc_hi'])}) |"
        for r in rows
    ]
    return lines


def _calibration_lines(summary: dict[str, Any] | None) -> list[str]:
    """Test ECE before and after the shipped calibration, with the map used per finding."""
    if not summary:
        return ["Served probabilities are the network's own (no calibration fitted)."]
    lines = [
        f"Served probabilities are calibrated per finding on validation; test ECE "
        f"{_f(summary['ece_before'])} before, {_f(summary['ece_after'])} after.",
        "",
        "| finding | map | ECE before | ECE after |",
        "|---|---|---|---|",
    ]
    for finding, row in summary["per_finding"].items():
        lines.append(f"| {finding} | {row['method']} | {_f(row['ece_before'])} | {_f(row['ece_after'])} |")
    return lines


def _operating_point_lines(points: dict[str, Any] | None) -> list[str]:
    """Per operating point: how its thresholds were chosen, then per finding the threshold and the test
    sensitivity, specificity, PPV and NPV with 95% CIs."""
    if not points:
        return ["Only the Youden thresholds in the table above were evaluated."]
    lines = [
        "Each threshold was chosen per finding; a finding is called positive when its probability is at"
        " least the threshold. Test figures with 95% bootstrap CIs (same resampling as AUROC)."
    ]
    for name, point in points.items():
        lines += [
            "",
            f"**{name}**: {_goal(point)}, on {point['thresholds_from']}.",
            "",
            "| finding | threshold | sensitivity (95% CI) | specificity (95% CI) | PPV (95% CI)"
            " | NPV (95% CI) |",
            "|---|---|---|---|---|---|",
        ]
        for finding, row in point["findings"].items():
            rates = " | ".join(with_ci(row, rate) for rate in RATES)
            lines.append(f"| {finding} | {_f(row['threshold'])} | {rates} |")
    return lines


def _goal(point: dict[str, Any]) -> str:
    """How an operating point's thresholds were chosen, in words."""
    if point["metric"] == "youden":
        return "Youden's J (maximum sensitivity + specificity − 1)"
    extreme = "highest" if point["metric"] == "sensitivity" else "lowest"
    overrides = f" (per finding: {point['per_finding']})" if point.get("per_finding") else ""
    return f"the {extreme} threshold with {point['metric']} ≥ {point['target']}{overrides}"


def _production_threshold_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    """The gate's table: production and this version at production's thresholds, and this version at its
    own, on the same test images."""
    if not rows:
        return []
    lines = [
        "",
        "At production's thresholds, on the same test images (sensitivity / specificity):",
        "",
        "| point | finding | positives | production threshold | production | this version"
        " | own threshold | this version at own |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pair = {who: f"{_f(r.get(f'{who}_sensitivity'))} / {_f(r.get(f'{who}_specificity'))}"
                for who in ("production", "candidate", "candidate_own")}  # fmt: skip
        lines.append(
            f"| {r['point']} | {r['finding']} | {r['positives']} | {_f(r['threshold'])}"
            f" | {pair['production']} | {pair['candidate']} | {_f(r.get('candidate_threshold'))}"
            f" | {pair['candidate_own']} |"
        )
    return lines


def _input_gate_lines(report: dict[str, Any] | None) -> list[str]:
    """OOD AUROC per corpus group and the share of real test images refused at the shipped threshold."""
    if not report:
        return ["No input gate was fitted: every image is answered, with the verdict `unchecked`."]
    lines = [
        f"Out-of-distribution score: Mahalanobis distances on the penultimate embedding and on the input's"
        f" appearance, fitted on {report.get('fitted_on', '?')} training images, thresholds set on"
        f" {report.get('thresholds_from', '?')} validation images to refuse {_pct(report.get('refuse_rate'))}"
        f" of them. On {report['real_images']} real test images it refuses"
        f" **{_pct(report['real_refused'])}**;"
        f" against {report['ood_images']} out-of-distribution images its AUROC is **{_f(report['auroc'])}**"
        f" and it catches {_pct(report['caught'])} of them.",
        "",
        "| out-of-distribution group | images | AUROC vs real test images | caught |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {g['images']} | {_f(g['auroc'])} | {_pct(g['caught'])} |"
              for name, g in report.get("groups", {}).items()]  # fmt: skip
    return lines


def _pct(value: Any) -> str:
    try:
        return f"{100 * float(value):.1f}%"
    except (TypeError, ValueError):
        return "n/a"
