"""Another dataset as an external test set, end to end on a CheXpert fixture in its published layout:
catalog (frontal images, labels only where CheXpert labels), shard cache, a model's scores, and the
report on the findings the dataset labels; `cxr evaluate --labels <root>` on a predictions CSV."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.data.findings import FINDINGS
from cxr.data.loader import ShardDataset
from cxr.evaluate import evaluate
from cxr.model import CXRNet
from cxr.train import predict

from .test_datasets_chexpert import write_chexpert
from .test_datasets_rsna import write_rsna
from .test_datasets_vindr import write_vindr

LABELLED = ("Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax", "Consolidation", "Edema")


@pytest.fixture
def chexpert(tmp_path, nih_root):
    return write_chexpert(tmp_path, nih_root, "small")


def test_catalog_keeps_frontal_images_and_only_the_labels_the_dataset_gives(chexpert):
    catalog, report = load_catalog(chexpert)
    assert report.dataset == "chexpert" and report.matched == len(catalog) == 5
    assert report.other_views == 4 and "left out for their view" in report.summary()  # 2 lateral, LL, RL
    assert report.unlisted_images == 0 and report.missing_images == 0  # their files are not "unlisted"
    assert set(catalog.meta["view"]) <= {"AP", "PA"} and set(catalog.meta["dataset"]) == {"chexpert"}
    assert all((chexpert / image_id).is_file() for image_id in catalog.meta["image_id"])
    unlabelled = [FINDINGS.index(f) for f in FINDINGS if f not in LABELLED]
    assert np.isnan(catalog.labels[:, unlabelled]).all()
    assert catalog.prevalence()[list(LABELLED)].notna().all() and catalog.prevalence()["Hernia"] != 0
    everything, _ = load_catalog(chexpert, views="all")
    assert len(everything) == 9


def test_a_model_is_validated_on_the_findings_the_dataset_labels(chexpert, tmp_path):
    catalog, _ = load_catalog(chexpert)
    cache = build_cache(
        catalog, PreprocessSettings(size=64, shard_size=4), root=tmp_path / "c", progress=False
    )
    assert len(cache) == 5 and not cache.failures
    probs = predict(CXRNet(pretrained=False).eval(), ShardDataset(cache, np.arange(len(cache)), crop=56))
    report = evaluate(cache.labels, probs, cache.meta, n_boot=20)
    table = report.per_class
    assert (table.loc[[f for f in FINDINGS if f not in LABELLED], "n_labelled"] == 0).all()
    assert table.loc[[f for f in FINDINGS if f not in LABELLED], "auroc"].isna().all()
    assert (table.loc[list(LABELLED), "n_labelled"] > 0).all()
    assert report.resampled == "patients" and report.n_resampled == catalog.meta["patient_id"].nunique()


def test_cli_evaluates_predictions_against_a_dataset_root(chexpert, tmp_path):
    catalog, _ = load_catalog(chexpert)
    rng = np.random.default_rng(0)
    known = np.nan_to_num(catalog.labels)
    p = np.clip(0.5 * known + rng.random(known.shape) * 0.6, 0, 1)
    frame = pd.DataFrame(p, columns=list(FINDINGS)).assign(**{"Image Index": catalog.meta["image_id"]})
    frame.to_csv(tmp_path / "preds.csv", index=False)
    out = tmp_path / "report"
    command = [sys.executable, "-m", "cxr.cli", "evaluate", "--predictions", str(tmp_path / "preds.csv"),
               "--labels", str(chexpert), "--out", str(out), "--bootstrap", "20"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = json.loads((out / "report.json").read_text())
    assert written["n_images"] == 5
    for finding in LABELLED:
        k, y = FINDINGS.index(finding), catalog.labels[:, FINDINGS.index(finding)]
        keep = ~np.isnan(y)
        expected = roc_auc_score(y[keep], p[keep, k]) if 0 < y[keep].sum() < keep.sum() else None
        assert written["auroc"][finding] == pytest.approx(expected) if expected else True


@pytest.mark.slow
def test_the_flow_trains_on_two_datasets_and_validates_on_a_third(chexpert, tmp_path, nih_root):
    """The train flow on the demo set and CheXpert together (weighted half and half), with VinDr-CXR's
    published test set as the external set: one catalog and split with each dataset's patients kept
    apart, the external report (on the findings VinDr labels) in the run, its card and the model card; a
    floor on a set that was not evaluated holds the version back; the monitoring baseline of the
    combined model checks its own held-out images without a violation."""
    from metaflow import Runner

    from cxr.monitor.baseline import Baseline
    from cxr.monitor.checks import MonitorConfig, run_checks
    from cxr.monitor.reader import Traffic
    from cxr.registry import Registry

    from .test_train_flow import FLOW, card_contents, flow_env, write_config

    write_vindr(tmp_path / "vindr", nih_root)
    config = write_config(tmp_path, epochs=1)
    text = config.read_text().replace(
        "  n_boot: 50\n",
        f"  n_boot: 50\n  external: [{{name: vindr-test, root: '{tmp_path / 'vindr'}', rows: test}}]\n",
    )
    text = text.replace(
        "  root: demo\n", f"  root: demo\n  also: [{{root: '{chexpert}', uncertain: ones}}]\n"
    )
    text = text.replace("lr: 0.003}", "lr: 0.003, dataset_weights: {nih: 1, chexpert: 1}}")
    text = text.replace("registry: {", "registry: {external_floors: {vindr-test: 0.0, mimic-test: 0.7}, ")
    config.write_text(text)
    with Runner(str(FLOW), show_output=False, env=flow_env(tmp_path), cwd=str(tmp_path)).run(
        config_file=str(config)
    ) as running:
        assert running.status == "successful", running.stderr
        run = running.run

    ingest = run["ingest"].task
    assert list(ingest["ingest_reports"].data) == ["nih", "chexpert"]
    meta = ingest["catalog"].data.meta
    assert meta["dataset"].value_counts().to_dict()["chexpert"] == 5  # CheXpert's frontal images
    split = run["split"].task["split_rows"].data
    patients = [set(meta["patient_id"].to_numpy()[rows]) for rows in (split.train, split.val, split.test)]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert run["train"].task["config"].data["train"]["dataset_weights"] == {"nih": 1, "chexpert": 1}
    assert np.isfinite(run["train"].task["history"].data[0]["train_loss"])

    evaluate = run["evaluate"].task
    result = evaluate["external_validation"].data["vindr-test"]
    assert result["n_images"] == 2 and result["set"]["rows"] == "test"  # VinDr's published test set
    assert "Hernia" not in result["labelled_findings"] and "Cardiomegaly" in result["labelled_findings"]
    assert result["bootstrap"]["resampled"] == "patients"
    (content,) = card_contents(evaluate)
    assert "External validation" in content and "vindr-test" in content
    assert "AUROC (95% CI) on the test split and external sets" in content  # the forest plot
    gate = run["register"].task["gate"].data
    assert not gate["promote"] and "external set mimic-test: not evaluated (floor 0.700)" in gate["reasons"]
    assert any(r.startswith("external set vindr-test: mean AUROC") for r in gate["reasons"])
    version = Registry(group="demo").get(run["end"].task["model_version"].data)
    card = version.card.read_text()
    assert "## External validation" in card and "**vindr-test** (dataset at" in card
    assert '"chexpert"' in version.lineage["datasets"]

    baseline = Baseline.load(version.directory)
    traffic = Traffic("A", records=len(baseline.image), image=baseline.image, embedding=baseline.embedding,
                      probabilities=baseline.probabilities)  # fmt: skip
    checks = run_checks(baseline, traffic, MonitorConfig(min_images=10))
    assert len(checks) and not checks["violation"].any(), checks[checks["violation"]]


def test_dicom_datasets_reach_the_cache_and_their_published_split(tmp_path, nih_root):
    """VinDr-CXR (DICOM, MONOCHROME1 among them) and RSNA (DICOM headers give the view): catalogs with
    the reader rule passed through, missing files reported as missing whatever their view, VinDr's
    published test set kept as the test split, and every DICOM decoded into the shard cache."""
    from cxr.data.prepare import split_catalog

    write_vindr(tmp_path / "vindr", nih_root)
    majority, report = load_catalog(tmp_path / "vindr")
    anyone, _ = load_catalog(tmp_path / "vindr", options={"readers": "any"})
    assert report.dataset == "vindr" and len(majority) == len(anyone) and report.missing_images == 0
    assert np.nansum(anyone.labels) > np.nansum(majority.labels)  # one reader is enough for a positive
    split, method = split_catalog(majority, str(tmp_path / "vindr"), {"ratios": [0.7, 0.1, 0.2]})
    official = majority.meta["official_split"].to_numpy()
    assert "published split" in method and set(official[split.test]) == {"test"}
    assert set(official[np.concatenate([split.train, split.val])]) == {"train"}
    cache = build_cache(majority, PreprocessSettings(size=64), root=tmp_path / "c", progress=False)
    assert len(cache) == len(majority) and not cache.failures
    assert set(cache.meta["dataset"]) == {"vindr"}

    (tmp_path / "rsna").mkdir()
    write_rsna(tmp_path / "rsna", nih_root)
    catalog, report = load_catalog(tmp_path / "rsna")
    assert report.dataset == "rsna" and report.missing_images >= 1 and report.other_views == 0
    k = FINDINGS.index("Pneumonia")
    assert not np.isnan(catalog.labels[:, k]).any() and np.isnan(np.delete(catalog.labels, k, axis=1)).all()
    cache = build_cache(catalog, PreprocessSettings(size=64), root=tmp_path / "c", progress=False)
    assert len(cache) == len(catalog) and not cache.failures


def test_test_images_radiologists_adjudicated_are_reported_against_them(nih_root, tmp_path):
    """With the Google 2019 file beside NIH's metadata, the test images among its 4,376 are evaluated
    against the radiologists: Pneumothorax directly, the joint findings by their members; no file: None."""
    from cxr.data.metadata import read_metadata
    from cxr.external import expert_validation

    table, labels = read_metadata(nih_root / "Data_Entry_2017_v2020.csv.gz")
    expert = pd.read_csv(nih_root / "google2019_nih-chest-xray-labels.csv.gz")
    adjudicated = np.flatnonzero(table["image_id"].isin(expert["Image Index"]).to_numpy())
    rows = np.union1d(adjudicated[::2], np.arange(0, len(table), 50))  # a test split, half of them in it
    meta = table.iloc[rows].reset_index(drop=True)
    rng = np.random.default_rng(1)
    probs = np.clip(0.5 * labels[rows] + rng.random((len(rows), 14)) * 0.6, 0, 1)
    result = expert_validation(str(nih_root), meta, probs, n_boot=50)
    inside = meta["image_id"].isin(expert["Image Index"]).to_numpy()
    assert result["n_images"] == inside.sum() > 1000
    truth = expert.set_index("Image Index").loc[meta["image_id"][inside]]
    k = FINDINGS.index("Pneumothorax")
    assert result["auroc"]["Pneumothorax"] == pytest.approx(
        roc_auc_score(truth["Pneumothorax"] == "YES", probs[inside, k])
    )
    joint = {row["finding"]: row for row in result["joint"]}
    assert joint["Nodule or mass"]["n_labelled"] == inside.sum()
    assert expert_validation(str(tmp_path), meta, probs) is None


def test_external_sets_are_checked_before_any_work(tmp_path, nih_root):
    """`evaluate.external` entries: clear errors for what cannot work; adapter options reach the adapter."""
    from cxr.external import ExternalSetError, parse_external_sets

    assert parse_external_sets(None) == []
    for bad, message in (
        ({"root": "/x"}, "needs name and root"),
        ({"name": "a", "root": "/x", "colour": 1}, "needs name and root"),
        ({"name": "a b", "root": "/x"}, "letters, digits"),
        ({"name": "a", "root": "/x", "rows": "holdout"}, "rows is one of"),
        ({"name": "a", "root": "/x", "uncertain": "maybe"}, "uncertain must be one of"),
        ({"name": "a", "root": "/x", "options": "any"}, "options map"),
    ):
        with pytest.raises((ExternalSetError, ValueError), match=message):
            parse_external_sets([bad])
    with pytest.raises(ExternalSetError, match="unique"):
        parse_external_sets([{"name": "a", "root": "/x"}, {"name": "a", "root": "/y"}])
    write_vindr(tmp_path / "vindr", nih_root)
    vindr = {"root": str(tmp_path / "vindr"), "rows": "train"}
    entries = [{"name": "v", **vindr}, {"name": "w", **vindr, "options": {"readers": "any"}}]
    majority, anyone = (spec.catalog() for spec in parse_external_sets(entries))
    assert set(majority.meta["official_split"]) == {"train"} and np.nansum(anyone.labels) > np.nansum(
        majority.labels
    )


def test_cli_ingests_another_dataset(chexpert):
    """`cxr ingest --data <CheXpert root>`: what it holds, the frontal images, and a split."""
    result = subprocess.run(
        [sys.executable, "-m", "cxr.cli", "ingest", "--data", str(chexpert)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "5 usable" in result.stdout and "4 rows left out for their view" in result.stdout
    assert "split:" in result.stdout and "Cardiomegaly" in result.stdout
