"""cxr's answer for a study as a DICOM Structured Report: a TID 1500 Measurement Report (highdicom) that
a PACS stores beside the images and that reporting systems read.

One report per study, in a new series of the source study (Comprehensive SR IOD, the SR storage class
PACS viewers read TID 1500 from). The document is marked as machine output that no physician has
checked: VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY, and a comment saying so.

Content tree (DICOM PS3.16):
- TID 1001 observation context: the model as the device observer (TID 1004): its name, manufacturer
  "cxr", version, and a UID derived from name and version (`ModelInfo.uid`);
- procedure reported: plain X-ray of chest;
- TID 1600 image library: the source instances (when their headers describe them);
- per source image, a TID 1501 group for the input gate: its verdict, score, threshold and reasons;
- per judged image and finding, a TID 1501 group: the finding, its probability (NUM, UCUM "1"), the
  threshold of the served operating point (NUM, UCUM "1") and the verdict at it (CODE: SNOMED CT
  positive / negative), with the algorithm identification (TID 4019) and a reference to the image;
  an image the gate judged out of distribution gets no finding group: its gate group says the findings
  were not evaluated, and why;
- "Qualitative Evaluations": the unverified-result notice.

Probabilities and thresholds are dimensionless, so their unit is UCUM's unity "1" ("no units", in DICOM
CID 7181), which every SR reader knows, rather than an annotation such as "{probability}".
Findings use SNOMED CT (and DCM for "Infiltrate") where a concept exists; the rest of the vocabulary, and
pleural thickening and hernia, use the private scheme "99CXR", declared in the
CodingSchemeIdentificationSequence.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from cxr.data.findings import FINDINGS
from cxr.serve.trust import IN, OUT, UNCHECKED

log = logging.getLogger(__name__)

MANUFACTURER = "cxr"
SCHEME = "99CXR"
CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=SCHEME,
    name="cxr chest radiograph classifier terms",
    responsible_organization="cxr",
)


def _private(value: str, meaning: str) -> Code:
    return Code(value, SCHEME, meaning)


# The 14 ChestX-ray14 findings. SNOMED CT concepts (SCT), where the DICOM content mapping resource lists
# one taken from pydicom's `codes`; DCM "Infiltrate" is DICOM's own chest CAD term (CID 6104).
FINDING_CODES: dict[str, Code] = {
    "Atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "Cardiomegaly": Code("8186001", "SCT", "Cardiomegaly"),
    "Effusion": codes.SCT.PleuralEffusion,
    "Infiltration": codes.DCM.Infiltrate,
    "Mass": codes.SCT.Mass,
    "Nodule": codes.SCT.Nodule,
    "Pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "Pneumothorax": codes.SCT.Pneumothorax,
    "Consolidation": Code("95436008", "SCT", "Lung consolidation"),
    "Edema": codes.SCT.PulmonaryEdema,
    "Emphysema": Code("87433001", "SCT", "Pulmonary emphysema"),
    "Fibrosis": Code("51615001", "SCT", "Fibrosis of lung"),
    "Pleural_Thickening": _private("PLEURAL-THICK", "Pleural thickening"),
    "Hernia": _private("HERNIA", "Hernia"),
}
CHEST_XRAY = Code("399208008", "SCT", "Plain X-ray of chest")
UNITY = codes.UCUM.NoUnits  # UCUM "1"
PROBABILITY = codes.DCM.Probability
THRESHOLD = codes.DCM.ThresholdValue
VERDICTS = {True: codes.SCT.Positive, False: codes.SCT.Negative}
GATE_VERDICT = _private("GATE", "Input gate verdict")
GATE_SCORE = _private("GATE-SCORE", "Input gate score")
GATE_REASON = _private("GATE-REASON", "Input gate reason")
GATE_VALUES = {
    IN: _private("GATE-IN", "In distribution"),
    OUT: _private("GATE-OUT", "Out of distribution"),
    UNCHECKED: _private("GATE-UNCHECKED", "Not checked"),
}
FINDINGS_EVALUATED = _private("CXR14-FINDINGS", "ChestX-ray14 findings")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500's container
MAX_TEXT = 1024  # characters of one reason kept in the report


@dataclass(frozen=True)
class ModelInfo:
    """The model that answered: its registry name and version."""

    name: str
    version: str

    @classmethod
    def from_answer(cls, model: Mapping[str, Any]) -> ModelInfo:
        """From the `model` object of a `/invocations` answer (name, version, variant, backend)."""
        return cls(str(model.get("name") or "cxr"), str(model.get("version")))

    @property
    def uid(self) -> str:
        """A UID of this name and version, the same wherever and whenever it is derived."""
        return str(generate_uid(entropy_srcs=[MANUFACTURER, self.name, self.version]))


@dataclass(frozen=True)
class ImageAnswer:
    """What the server said of one image: the gate's check and, when it was judged, its findings."""

    check: Mapping[str, Any]
    model: ModelInfo | None = None
    probabilities: Mapping[str, Any] | None = None
    decisions: Mapping[str, Any] | None = None
    thresholds: Mapping[str, Any] | None = None

    @property
    def judged(self) -> bool:
        """Scored and not judged out of distribution."""
        return self.probabilities is not None and self.check.get("verdict") != OUT


def build_sr(
    sources: Sequence[Dataset],
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    model: ModelInfo | None = None,
    *,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    when: dt.datetime | None = None,
    series_number: int = 901,
    instance_number: int = 1,
    previous: Sequence[Dataset] | None = None,
) -> hd.sr.ComprehensiveSR:
    """The Measurement Report of one study's answers.

    `sources` are the study's instances (headers suffice: pixel data is never read). `results` is the
    server's answer for all of them, in order (a 200 answer's `predictions`, or a 422 refusal's
    `input_gate`), or a list of answers, one per source; a refused image is reported as not judged.
    `model` is the device observer: by default the model of the first answer that names one. UIDs and
    the time are new unless given; given them, the output is the same byte for byte. A report replacing
    earlier ones names them in `previous` (their study, series, SOP class and instance UIDs).
    """
    references = [source_header(source) for source in sources]
    _check_one_study(references)
    answers = image_answers(results, len(references))
    model = model or next((a.model for a in answers if a.model is not None), None)
    if model is None:
        raise ValueError("no answer names its model: pass `model`")
    series_uid, sop_uid = series_uid or generate_uid(), sop_uid or generate_uid()
    when = when or dt.datetime.now()
    groups = []
    for index, (reference, answer) in enumerate(zip(references, answers, strict=True), start=1):
        scorer = answer.model or model
        groups.append(_gate_group(reference, index, answer, scorer, sop_uid))
        if answer.judged:
            groups += [_finding_group(reference, index, finding, answer, scorer, sop_uid)
                       for finding in FINDINGS]  # fmt: skip
    report = _measurement_report(references, groups, model)
    sr = hd.sr.ComprehensiveSR(
        evidence=references,
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name[:64],
        software_versions=[f"cxr {_cxr_version()}", f"{model.name} {model.version}"[:64]],
        series_description="cxr findings (unverified)",
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=[CODING_SCHEME],
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        previous_versions=previous,
    )
    stamp_time(sr, when)
    return sr


def image_answers(results: Mapping[str, Any] | Sequence[Mapping[str, Any]], count: int) -> list[ImageAnswer]:
    """One `ImageAnswer` per image from one answer for all `count` images or one answer per image."""
    if isinstance(results, Mapping):
        answers = _from_answer(results)
    else:
        answers = [answer for result in results for answer in _from_answer(result)]
    if len(answers) != count:
        raise ValueError(f"results hold {len(answers)} answers for {count} source instances")
    return answers


def _from_answer(result: Mapping[str, Any]) -> list[ImageAnswer]:
    """The images of one server answer: a 200's predictions, or a 422's refused images."""
    if "predictions" in result:
        model = ModelInfo.from_answer(result["model"]) if result.get("model") else None
        return [ImageAnswer(p.get("input_check") or {}, model, p.get("probabilities"), p.get("decisions"),
                            result.get("thresholds")) for p in result["predictions"]]  # fmt: skip
    if "input_gate" in result:  # a 422: the request was refused as a whole, by the named model's gate
        reason = str(result.get("error") or "input refused")
        model = ModelInfo.from_answer(result["model"]) if result.get("model") else None
        return [ImageAnswer({**gate, "verdict": gate.get("verdict", OUT), "reasons": [reason]}, model)
                for gate in result["input_gate"]]  # fmt: skip
    raise ValueError("a result is neither an answer (predictions) nor a refusal (input_gate)")


def _measurement_report(
    references: list[Dataset], groups: list[hd.sr.MeasurementsAndQualitativeEvaluations], model: ModelInfo
) -> hd.sr.MeasurementReport:
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.uid, name=model.name, manufacturer_name=MANUFACTURER,
            model_name=f"{model.name} {model.version}"[:64],
        ),
    )  # fmt: skip
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=groups,
        referenced_images=references if _describable(references) else None,
    )
    report[0].ContentSequence.append(_notice(model))
    return report


def _notice(model: ModelInfo) -> hd.sr.ContainerContentItem:
    """TID 1500's "Qualitative Evaluations" container with the unverified-result comment."""
    text = (
        f"Automated result of the machine-learning model {model.name} version {model.version} (cxr): "
        "not verified by a physician. It supports, and does not replace, a physician's reading."
    )
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(name=codes.DCM.Comment, value=text,
                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)]
    )  # fmt: skip
    return container


def _gate_group(
    reference: Dataset, index: int, answer: ImageAnswer, model: ModelInfo, sop_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The input gate's verdict on one image, its score against its threshold, and its reasons; for an
    image not judged, that its findings were not evaluated."""
    check = answer.check
    verdict = str(check.get("verdict") or UNCHECKED)
    evaluations = [hd.sr.QualitativeEvaluation(GATE_VERDICT, GATE_VALUES.get(verdict, GATE_VALUES[OUT]))]
    if not answer.judged:
        evaluations.append(hd.sr.QualitativeEvaluation(FINDINGS_EVALUATED, codes.SCT.NotEvaluated))
    measurements = []  # a package without a gate has no score, and its threshold means nothing
    if check.get("score") is not None:
        measurements = [
            hd.sr.Measurement(name=name, value=float(check[key]), unit=UNITY)
            for name, key in ((GATE_SCORE, "score"), (THRESHOLD, "threshold"))
            if check.get(key) is not None
        ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(f"Input gate, image {index}", sop_uid, reference, "gate"),
        algorithm_id=_algorithm(model),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(reference)],
    )
    texts = [_text(GATE_REASON, reason) for reason in check.get("reasons") or []]
    if not answer.judged:
        texts.append(_text(codes.DCM.Comment, "Not judged: the input gate found this image unlike the "
                                              "frontal chest radiographs the model was trained on, so "
                                              "no finding is reported for it."))  # fmt: skip
    group[0].ContentSequence.extend(texts)
    return group


def _finding_group(
    reference: Dataset, index: int, finding: str, answer: ImageAnswer, model: ModelInfo, sop_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One finding on one image: probability, threshold, and the verdict the server gave at it."""
    code = FINDING_CODES[finding]
    try:
        probability = float((answer.probabilities or {})[finding])
        threshold = float((answer.thresholds or {})[finding])
        positive = bool((answer.decisions or {})[finding])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"answer for image {index} lacks {finding}: {error}") from error
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(f"{code.meaning}, image {index}", sop_uid, reference, finding),
        finding_type=code,
        algorithm_id=_algorithm(model),
        measurements=[hd.sr.Measurement(name=PROBABILITY, value=probability, unit=UNITY),
                      hd.sr.Measurement(name=THRESHOLD, value=threshold, unit=UNITY)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(code, VERDICTS[positive])],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(reference)],
    )  # fmt: skip


def _tracking(label: str, sop_uid: str, reference: Dataset, what: str) -> hd.sr.TrackingIdentifier:
    """A tracking identifier whose UID follows from the report's UID, the image and what is tracked."""
    uid = generate_uid(entropy_srcs=[sop_uid, str(reference.SOPInstanceUID), what])
    return hd.sr.TrackingIdentifier(uid=uid, identifier=label)


def _algorithm(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version, manufacturer=MANUFACTURER)


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    """A TEXT item of printable ASCII (any character set encodes it), at most `MAX_TEXT` characters."""
    safe = "".join(c if c.isprintable() and c.isascii() else "?" for c in str(value))[:MAX_TEXT]
    return hd.sr.TextContentItem(name=name, value=safe or "?",
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)  # fmt: skip


# Patient and study attributes the SR document must carry (type 2): empty when a source lacks them.
REQUIRED_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                  "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")  # fmt: skip


def source_header(source: Dataset) -> Dataset:
    """A source's header without its pixel data, with empty values for the patient and study attributes
    a derived instance must carry (type 2) that the source lacks."""
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
        if not source.get(keyword):
            raise ValueError(f"source instance has no {keyword}")
    reference = without_pixels(source)
    for keyword in REQUIRED_EMPTY:
        if keyword not in reference:
            setattr(reference, keyword, "")
    return reference


def without_pixels(dataset: Dataset) -> Dataset:
    """A copy of a data set's elements, its pixel data left out."""
    kept = Dataset()
    for element in dataset:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            kept.add(copy.deepcopy(element))
    return kept


def _check_one_study(references: list[Dataset]) -> None:
    if not references:
        raise ValueError("no source instance to report on")
    studies = {str(r.StudyInstanceUID) for r in references}
    if len(studies) > 1:
        raise ValueError(f"one report per study: sources belong to {len(studies)} studies")


def _describable(references: list[Dataset]) -> bool:
    """Whether highdicom can describe every source in the image library (projection radiographs need
    Patient Orientation and Imager Pixel Spacing); the library is left out otherwise, and the groups
    still reference their images."""
    try:
        hd.sr.ImageLibrary(references)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
        log.info("image library left out of the report: %s", error)
        return False
    return True


def stamp_time(ds: Dataset, when: dt.datetime) -> None:
    """Every creation date and time of a new instance is `when` (highdicom stamps them with the clock)."""
    ds.InstanceCreationDate, ds.InstanceCreationTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f")


def _cxr_version() -> str:
    try:
        return version("cxr")
    except PackageNotFoundError:
        return "unknown"
