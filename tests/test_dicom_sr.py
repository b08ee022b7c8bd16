"""The study's answer as a DICOM Structured Report (TID 1500), built from real NIH films wrapped as DX
instances, read back with pydicom and highdicom and validated with dicom3tools' dciodvfy."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from cxr.data.findings import FINDINGS
from cxr.data.images import decode_xray
from cxr.serve.dicom import read_dicom, render
from cxr.serve.limits import Limits
from cxr_dicom.sr import (
    FINDING_CODES,
    GATE_REASON,
    GATE_VALUES,
    GATE_VERDICT,
    PROBABILITY,
    SCHEME,
    THRESHOLD,
    ModelInfo,
    build_sr,
)
from tests.dicom_support import dciodvfy_errors, dicom_file, nih_dx, nih_study

FILMS = ("00000442_000.png", "00000574_000.png")  # one AP and one PA film
WHEN = dt.datetime(2024, 5, 6, 7, 8, 9)
FAR = "image embedding far from the training films (score 3.4 > 1.0)"


def answer(count: int, out_of_distribution: tuple[int, ...] = (), seed: int = 0) -> dict:
    """An `/invocations` answer (`cxr.serve.app`, README "Serving") for `count` images: rounded
    probabilities, decisions at the served thresholds, the input gate's check, the model."""
    rng = np.random.default_rng(seed)
    thresholds = {f: round(float(t), 4) for f, t in zip(FINDINGS, rng.uniform(0.1, 0.6, 14), strict=True)}
    predictions = []
    for index in range(count):
        probabilities = {f: round(float(p), 6) for f, p in zip(FINDINGS, rng.uniform(0, 1, 14), strict=True)}
        out = index in out_of_distribution
        check = {
            "score": 3.4 if out else 0.41,
            "threshold": 1.0,
            "verdict": "out_of_distribution" if out else "in_distribution",
            "reasons": [FAR] if out else [],
        }
        decisions = {f: bool(probabilities[f] >= thresholds[f]) for f in FINDINGS}
        predictions.append({"probabilities": probabilities, "decisions": decisions, "input_check": check})
    model = {"name": "cxr-demo", "version": 3, "variant": "A", "backend": "onnx"}
    return {"inference_id": "6f1c0d2e", "model": model, "predictions": predictions, "thresholds": thresholds,
            "latency_ms": 31.2}  # fmt: skip


def written(sr: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def texts(item: pydicom.Dataset) -> list[str]:
    """Every TEXT value in a content tree."""
    found = [str(item.TextValue)] if item.get("ValueType") == "TEXT" else []
    for child in item.get("ContentSequence", []):
        found += texts(child)
    return found


@pytest.fixture(scope="module")
def study(nih_root: Path) -> list[pydicom.Dataset]:
    return nih_study(nih_root, FILMS)


def test_a_wrapped_nih_film_is_a_valid_frontal_chest_dx_showing_the_png(nih_root: Path, tmp_path: Path):
    ds = nih_dx(nih_root, FILMS[1])
    data = dicom_file(ds)
    assert dciodvfy_errors(data, tmp_path) == []
    header = read_dicom(data, Limits())  # as the server reads it
    assert header.acquisition.problems == ()
    assert header.acquisition.attributes["ViewPosition"] == "PA"
    assert header.acquisition.attributes["Modality"] == "DX"
    png = decode_xray((nih_root / "images_001" / "images" / FILMS[1]).read_bytes())
    assert np.array_equal(render(header), png)
    assert ds.PatientID == "NIH00000574" and ds.PatientAge == "063Y" and ds.PatientSex == "F"
    assert nih_dx(nih_root, FILMS[0]).ViewPosition == "AP"


def test_report_carries_every_finding_verdict_and_reference_and_validates(
    study: list[pydicom.Dataset], tmp_path: Path
):
    result = answer(len(study))
    model = ModelInfo.from_answer(result["model"])
    data = written(build_sr(study, result, model, when=WHEN))
    assert dciodvfy_errors(data, tmp_path) == []

    plain = pydicom.dcmread(io.BytesIO(data))
    assert plain.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and plain.Modality == "SR"
    assert plain.StudyInstanceUID == study[0].StudyInstanceUID
    assert plain.SeriesInstanceUID not in {s.SeriesInstanceUID for s in study}
    assert plain.SOPInstanceUID not in {s.SOPInstanceUID for s in study}
    for keyword in ("PatientID", "PatientName", "PatientSex", "PatientAge", "AccessionNumber", "StudyDate"):
        assert plain.get(keyword) == study[0].get(keyword), keyword
    assert (plain.VerificationFlag, plain.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert plain.Manufacturer == "cxr" and plain.ManufacturerModelName == "cxr-demo"
    assert "cxr-demo 3" in plain.SoftwareVersions
    assert SCHEME in {item.CodingSchemeDesignator for item in plain.CodingSchemeIdentificationSequence}
    assert any("not verified by a physician" in text for text in texts(plain))

    sr = hd.sr.srread(io.BytesIO(data))
    evidence = {instance for _, _, instance, _ in sr.get_evidence()}
    assert evidence == {s.SOPInstanceUID for s in study}
    report = sr.content
    (observer,) = [c for c in report.get_observer_contexts() if c.observer_type == codes.DCM.Device]
    attributes = observer.observer_identifying_attributes
    assert (attributes.name, attributes.uid) == ("cxr-demo", model.uid)
    for source, prediction in zip(study, result["predictions"], strict=True):
        for finding in FINDINGS:
            (group,) = report.get_image_measurement_groups(
                finding_type=FINDING_CODES[finding], referenced_sop_instance_uid=source.SOPInstanceUID
            )
            (probability,) = group.get_measurements(name=PROBABILITY)
            (threshold,) = group.get_measurements(name=THRESHOLD)
            (verdict,) = group.get_qualitative_evaluations(name=FINDING_CODES[finding])
            assert probability.value == pytest.approx(prediction["probabilities"][finding], abs=1e-6)
            assert threshold.value == pytest.approx(result["thresholds"][finding], abs=1e-6)
            expected = codes.SCT.Positive if prediction["decisions"][finding] else codes.SCT.Negative
            assert verdict.value == expected
            assert probability.unit == codes.UCUM.NoUnits
            assert [i.referenced_sop_instance_uid for i in group.source_images] == [source.SOPInstanceUID]
            assert _algorithm(group) == ("cxr-demo", "3")
    gates = report.get_image_measurement_groups()
    assert len(gates) == len(study) * (1 + len(FINDINGS))


def test_an_image_the_gate_refused_gets_no_findings_but_the_reason(study, tmp_path: Path):
    result = answer(len(study), out_of_distribution=(1,))
    data = written(build_sr(study, result, ModelInfo.from_answer(result["model"]), when=WHEN))
    assert dciodvfy_errors(data, tmp_path) == []
    report = hd.sr.srread(io.BytesIO(data)).content
    judged, refused = (report.get_image_measurement_groups(referenced_sop_instance_uid=s.SOPInstanceUID)
                       for s in study)  # fmt: skip
    assert len(judged) == 1 + len(FINDINGS)
    (gate,) = refused
    assert gate.finding_type is None
    values = {e.name.meaning: e.value for e in gate.get_qualitative_evaluations()}
    assert values[GATE_VERDICT.meaning] == GATE_VALUES["out_of_distribution"]
    assert values["ChestX-ray14 findings"] == codes.SCT.NotEvaluated
    assert FAR in texts(gate[0])
    assert any(text.startswith("Not judged") for text in texts(gate[0]))
    (in_gate,) = [g for g in judged if g.finding_type is None]
    assert {e.value for e in in_gate.get_qualitative_evaluations(name=GATE_VERDICT)} == {
        GATE_VALUES["in_distribution"]
    }


def test_a_package_without_a_gate_reports_findings_and_an_unchecked_gate_without_a_score(study, tmp_path):
    result = answer(1)
    result["predictions"][0]["input_check"] = {"score": None, "threshold": 1.0, "verdict": "unchecked",
                                               "reasons": []}  # fmt: skip
    data = written(build_sr(study[:1], result, when=WHEN))
    assert dciodvfy_errors(data, tmp_path) == []
    groups = hd.sr.srread(io.BytesIO(data)).content.get_image_measurement_groups()
    (gate,) = [g for g in groups if g.finding_type is None]
    assert len(groups) == 1 + len(FINDINGS)
    assert [e.value for e in gate.get_qualitative_evaluations()] == [GATE_VALUES["unchecked"]]
    assert gate.get_measurements() == []


def test_a_refused_request_reports_every_image_not_judged_with_the_servers_message(study, tmp_path: Path):
    message = "input refused, not a frontal chest radiograph like those the model was trained on: " + FAR
    refusal = {"error": message, "input_gate": [{"score": 3.4, "verdict": "out_of_distribution"},
                                                {"score": 0.2, "verdict": "in_distribution"}]}  # fmt: skip
    data = written(build_sr(study, refusal, ModelInfo("cxr-demo", "3"), when=WHEN))
    assert dciodvfy_errors(data, tmp_path) == []
    report = hd.sr.srread(io.BytesIO(data)).content
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(study) and all(g.finding_type is None for g in groups)
    for group in groups:
        reasons = [i.value for i in group[0].ContentSequence if i.name == GATE_REASON]
        assert reasons == [message]
        assert codes.SCT.NotEvaluated in {e.value for e in group.get_qualitative_evaluations()}


def test_one_answer_per_image_each_reported_under_the_model_that_gave_it(study, nih_root: Path, tmp_path):
    """As a DICOM node sends a study, one `application/dicom` request per instance: each answer names
    its model (A/B variants may differ); a 422 refusal of one image leaves it not judged."""
    first, second = answer(1, seed=1), answer(1, seed=2)
    second["model"] = {**second["model"], "version": 4, "variant": "B"}
    refusal = {"error": FAR, "input_gate": [{"score": 3.4, "verdict": "out_of_distribution"}]}
    third = nih_dx(nih_root, FILMS[0], study_uid=study[0].StudyInstanceUID, instance_number=3)
    sources = [*study, third]
    data = written(build_sr(sources, [first, second, refusal], when=WHEN))  # the model: the first answer's
    assert dciodvfy_errors(data, tmp_path) == []
    report = hd.sr.srread(io.BytesIO(data)).content
    (observer,) = report.get_observer_contexts()
    assert observer.observer_identifying_attributes.uid == ModelInfo("cxr-demo", "3").uid
    versions = [
        {
            _algorithm(g)[1]
            for g in report.get_image_measurement_groups(referenced_sop_instance_uid=s.SOPInstanceUID)
        }
        for s in sources
    ]
    assert versions == [{"3"}, {"4"}, {"3"}]
    groups = [len(report.get_image_measurement_groups(referenced_sop_instance_uid=s.SOPInstanceUID))
              for s in sources]  # fmt: skip
    assert groups == [1 + len(FINDINGS), 1 + len(FINDINGS), 1]
    with pytest.raises(ValueError, match="pass `model`"):
        build_sr(study[:1], [refusal])


def test_same_inputs_and_uids_give_the_same_bytes_and_the_model_uid_is_stable(study):
    result, model = answer(len(study)), ModelInfo("cxr-demo", "3")
    uids = {"series_uid": pydicom.uid.generate_uid(), "sop_uid": pydicom.uid.generate_uid(), "when": WHEN}
    assert written(build_sr(study, result, model, **uids)) == written(build_sr(study, result, model, **uids))
    assert model.uid == ModelInfo.from_answer(result["model"]).uid != ModelInfo("cxr-demo", "4").uid
    assert pydicom.uid.UID(model.uid).is_valid


def test_sources_with_sparse_headers_still_give_a_valid_report(nih_root: Path, tmp_path: Path):
    """A CR-like source without orientation, detector spacing, study ID or accession number: the image
    library is left out, the groups still reference the image, the document stays valid."""
    source = nih_dx(nih_root, FILMS[1])
    for keyword in ("PatientOrientation", "ImagerPixelSpacing", "StudyID", "AccessionNumber", "PatientSex"):
        delattr(source, keyword)
    header_only = pydicom.dcmread(io.BytesIO(dicom_file(source)), stop_before_pixels=True)
    data = written(build_sr([header_only], answer(1), ModelInfo("cxr-demo", "3"), when=WHEN))
    assert dciodvfy_errors(data, tmp_path) == []
    sr = hd.sr.srread(io.BytesIO(data))
    assert [g.source_images[0].referenced_sop_instance_uid
            for g in sr.content.get_image_measurement_groups()] == [source.SOPInstanceUID] * 15  # fmt: skip


def test_mismatched_or_mixed_inputs_are_refused(nih_root: Path, study):
    model = ModelInfo("cxr-demo", "3")
    with pytest.raises(ValueError, match="2 answers for 1 source"):
        build_sr(study[:1], answer(2), model)
    with pytest.raises(ValueError, match="one report per study"):
        build_sr([study[0], nih_dx(nih_root, FILMS[1])], answer(2), model)
    with pytest.raises(ValueError, match="neither an answer"):
        build_sr(study, {"error": "boom"}, model)
    broken = answer(2)
    del broken["predictions"][0]["probabilities"]["Hernia"]
    with pytest.raises(ValueError, match="lacks Hernia"):
        build_sr(study, broken, model)


def _algorithm(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> tuple[str, str]:
    """The (name, version) of a group's algorithm identification (TID 4019)."""
    values = {item.name.value: item.value for item in group[0].ContentSequence if item.ValueType == "TEXT"}
    return values[codes.DCM.AlgorithmName.value], values[codes.DCM.AlgorithmVersion.value]
