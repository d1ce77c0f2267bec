"""Run a trained model on a CT study: gated segmentation, masks, DICOM SEG, overlays, report.

    python -m tfcovseg.predict --model (saved_models/tfcovseg[/N] | runs/NAME)
        --input (DICOM folder | NIfTI volume | PNG/JPEG folder) --out DIR [--no-gate]
        [--threshold T] [--mask-threshold 0.5] [--series UID] [--batch-size 8]

The study is read with `data_tools` exactly as training data are (DICOM grouping and
sorting along the slice normal, Hounsfield units, padding, the NIfTI orientation, the
classical lung mask). The slice classifier (the gate) scores every slice; only slices at or
above the gate threshold are segmented (``--no-gate`` segments all), in batches. Per series,
into ``OUT/<series pseudonym>/``:

- ``lesions.nii.gz``: one label volume (0 background, 1.. the classes in the model's order)
  on the DICOM series' grid and affine (a NIfTI input: its voxels in the closest canonical
  RAS+ orientation, the same physical space); ``probability_<class>.nii.gz``: per-class
  probabilities;
- ``segmentation.dcm``: a DICOM SEG object (highdicom) referencing the source series
  (DICOM input only; as DICOM requires, it carries the source's patient module);
- ``overlay.png``: a montage of the slices with the most lesion (red GGO, green
  consolidation, blue fibrosis);
- ``report.json`` and ``report.html``: per lesion type the volume in mL and the percentage
  of lung volume, the slices with lesions, one patient-level verdict with the rule that
  made it (`tfcovseg.evaluation.verdict`: the slice classifier's any-slice rule when the export
  validated it, else the lesion burden) and the other rule's figure as evidence, the
  severity grade for a patient called COVID-19 from the thresholds fitted on the
  training and validation patients (`tfcovseg.evaluation.severity`), the
  model version, what was skipped and why, and "Research use, not a medical device."

A folder of windowed 2-D PNG/JPEG slices (COVID-SemiSeg's, Inf-Net's) goes to
`tfcovseg.inference.images`: label and probability PNGs named like the inputs, and a report,
in ``OUT/<folder pseudonym>/``.

``OUT/index.json`` lists the series processed and the files skipped. File and folder names
carry pseudonyms only. Files that cannot be used (not DICOM, not CT, corrupt, undecodable)
and slices beyond a gap in the slice positions are skipped with a warning and listed in the
report; nothing usable is an error (exit code 2).

Research use, not a medical device.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import html
import json
import time
from pathlib import Path

import numpy as np

from data_tools import dicom_io
from data_tools.convert import IMAGE_SUFFIXES, read_nifti_volume
from data_tools.ct_values import ct_value_problem
from data_tools.dicom_io import SkipFile
from data_tools.files import (
    OutputError,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    exclusive_folder,
    files_sha256,
    remove_partial_directories,
)
from data_tools.lung import (
    LESION_MARGIN_MM,
    LESION_RULE,
    lung_mask,
)
from data_tools.masks import RAS_FROM_LPS
from data_tools.privacy import Redactor, pseudonym, redacted_warnings, resolve_salt
from tfcovseg import __version__, require_tensorflow
from tfcovseg.constants import DISCLAIMER
from tfcovseg.evaluation.burden import burden, burden_masks
from tfcovseg.evaluation.metrics import patient_score
from tfcovseg.evaluation.severity import grade_severity
from tfcovseg.evaluation.verdict import patient_verdict, severity_for_verdict
from tfcovseg.evaluation.verdict import summary as verdict_summary
from tfcovseg.inference.images import (
    ImageInputError,
    image_files_digest,
    intensity_setting,
    is_image_folder,
    label_map,
    predict_images,
    read_image_folder,
)
from tfcovseg.reporting.figures import DEFAULT_WINDOW

tf = require_tensorflow("python -m tfcovseg.predict")

MONTAGE_SLICES = 12
DICOM_SUFFIXES_IGNORED = (".csv", ".txt", ".md", ".json", ".png", ".jpg", ".jpeg", ".html")

# Segmented property codes of the DICOM SEG segments (DICOM CID 7150 / 6104, SNOMED CT).
_SEG_CODES = {
    "ggo": ("112120", "DCM", "Ground glass opacity"),
    "consolidation": ("95436008", "SCT", "Lung consolidation"),
    "fibrosis": ("112674009", "SCT", "Fibrosis"),
}
_LESION_CODE = ("52988006", "SCT", "Lesion")
_CATEGORY_CODE = ("49755003", "SCT", "Morphologically Abnormal Structure")


class PredictionError(Exception):
    """Prediction cannot go on; the message says why (exit code 2)."""


# ----------------------------------------------------------------------------- models


class SavedModelPredictor:
    """A tfcovseg SavedModel (``tfcovseg.export``) loaded with `tf.saved_model.load`."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._model = tf.saved_model.load(str(path))
        except Exception as e:  # not a SavedModel, corrupt, missing variables
            raise PredictionError(f"cannot load the SavedModel {path}: {e}") from None
        missing = [
            s for s in ("classify", "segment", "metadata") if s not in self._model.signatures
        ]
        if missing:
            raise PredictionError(
                f"{path} is not a tfcovseg export: it lacks the signatures {missing}"
            )
        self.metadata = json.loads(self._model.signatures["metadata"]()["json"].numpy().decode())
        self.source = f"SavedModel {path.parent.name}/{path.name}"
        # Results kept in an output folder are this model's only if the files are the same
        # (another model copied to the same folder name is another model).
        self.sha256 = files_sha256(sorted(p for p in path.rglob("*") if p.is_file()), path)

    def classify(self, hu: np.ndarray) -> np.ndarray:
        out = self._model.signatures["classify"](hu=tf.constant(hu, tf.float32))
        return out["covid_probability"].numpy()

    def segment(self, hu: np.ndarray) -> np.ndarray:
        return self._model.signatures["segment"](hu=tf.constant(hu, tf.float32))["masks"].numpy()

    def serve(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._model.signatures["serving_default"](hu=tf.constant(hu, tf.float32))
        return out["covid_probability"].numpy(), out["masks"].numpy()

    def serve_image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if "serve_image" not in self._model.signatures:
            raise PredictionError(
                f"{self.path} has no serve_image signature (exported by an older tfcovseg): "
                "export its run again to predict on PNG/JPEG slices"
            )
        out = self._model.signatures["serve_image"](image=tf.constant(image, tf.float32))
        return out["covid_probability"].numpy(), out["masks"].numpy()


class RunPredictor:
    """A training run folder, through the same graph functions the export saves."""

    def __init__(self, run: Path):
        from tfcovseg.inference.export import ExportError, prepare_run

        try:
            graph = prepare_run(run)
        except ExportError as e:
            raise PredictionError(str(e)) from None
        spec = [tf.TensorSpec([None, None, None], tf.float32)]
        self._classify = tf.function(graph.classify, input_signature=spec)
        self._segment = tf.function(graph.segment, input_signature=spec)
        self._serve = tf.function(graph.serve, input_signature=spec)
        self._serve_image = tf.function(graph.serve_image, input_signature=spec)
        self.metadata = graph.metadata
        self.source = f"run folder {run.name}"
        files = [run / "config.yaml", *sorted(run.glob("*.keras"))]
        self.sha256 = files_sha256([p for p in files if p.is_file()], run)

    def classify(self, hu: np.ndarray) -> np.ndarray:
        return self._classify(tf.constant(hu, tf.float32))["covid_probability"].numpy()

    def segment(self, hu: np.ndarray) -> np.ndarray:
        return self._segment(tf.constant(hu, tf.float32))["masks"].numpy()

    def serve(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._serve(tf.constant(hu, tf.float32))
        return out["covid_probability"].numpy(), out["masks"].numpy()

    def serve_image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._serve_image(tf.constant(image, tf.float32))
        return out["covid_probability"].numpy(), out["masks"].numpy()


def open_model(path) -> SavedModelPredictor | RunPredictor:
    """A predictor from a SavedModel version folder, a model folder (its newest version)
    or a training run folder."""
    path = Path(path)
    if not path.exists():
        raise PredictionError(f"--model {path} does not exist")
    if (path / "saved_model.pb").is_file():
        return SavedModelPredictor(path)
    if (path / "config.yaml").is_file():
        return RunPredictor(path)
    from tfcovseg.inference.export import existing_versions

    for version in reversed(existing_versions(path)):
        if (path / str(version) / "saved_model.pb").is_file():
            return SavedModelPredictor(path / str(version))
    raise PredictionError(
        f"--model {path} is neither a SavedModel (saved_model.pb), a folder of numbered "
        f"versions nor a training run (config.yaml)"
    )


# ----------------------------------------------------------------------------- input


@dataclasses.dataclass
class Volume:
    """One series or volume, ready to predict: HU [K, H, W] and how to write results back."""

    kind: str  # dicom | nifti
    hu: np.ndarray
    spacing_mm: tuple[float, float, float]  # row, column, slice
    patient: str  # pseudonyms
    series: str
    series_obj: dicom_io.DicomSeries | None = None  # DICOM: the kept slices, sorted
    datasets: list | None = None  # DICOM: headers of the kept slices (for the SEG)
    affine: np.ndarray | None = None  # NIfTI: canonical (RAS+) affine of the input
    unreadable: list = dataclasses.field(default_factory=list)  # slice indices left empty
    skipped: list = dataclasses.field(default_factory=list)  # (file, reason)
    warnings: list = dataclasses.field(default_factory=list)
    tilt_deg: float = 0.0  # angle between the slice normal and the patient's long axis

    def fingerprint(self) -> str:
        """SHA-256 of what is predicted: the HU voxels, their geometry and the slices left
        empty. A rerun keeps a series' results only for the same input (slices that
        arrived or changed since are another input)."""
        h = hashlib.sha256(np.ascontiguousarray(self.hu).tobytes())
        affine = None if self.affine is None else np.asarray(self.affine).tolist()
        geometry = [list(self.hu.shape), [float(v) for v in self.spacing_mm], affine]
        h.update(json.dumps([geometry, sorted(int(i) for i in self.unreadable)]).encode())
        return h.hexdigest()


def _scan(root: Path, redactor) -> tuple[list, list]:
    """(header, dataset) of every DICOM image under `root`, and the files skipped."""
    skipped, headers = [], []
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        rel = path.name if root.is_file() else path.relative_to(root).as_posix()
        if path.name.startswith("."):
            continue  # hidden files (.DS_Store, ...)
        if path.suffix.lower() in DICOM_SUFFIXES_IGNORED or path.name.endswith(
            (".nii", ".nii.gz")  # masks beside a series
        ):
            skipped.append((rel, "not a DICOM file (by its name), ignored"))
            continue
        try:
            kind, item, ds = dicom_io.scan_file(path, redactor)
        except SkipFile as e:
            skipped.append((rel, str(e)))
            continue
        if kind == "seg":
            skipped.append((rel, "a DICOM SEG object, not an image"))
            continue
        headers.append((item, ds))
    return headers, skipped


def _chosen_series(series_list, series_uid, salt, skipped) -> list:
    """The series `--series` names (UID or pseudonym; all when None); the others are
    listed in `skipped`."""
    if series_uid is None:
        return series_list
    chosen = [s for s in series_list if series_uid in (s.uid, pseudonym("S", s.uid, salt))]
    if not chosen:
        names = ", ".join(pseudonym("S", s.uid, salt) for s in series_list) or "none"
        raise PredictionError(
            f"--series {series_uid} is not among the {len(series_list)} CT series of "
            f"the input (pseudonyms: {names})"
        )
    for s in series_list:
        if s not in chosen:
            skipped.append((f"series {pseudonym('S', s.uid, salt)}", "not the --series chosen"))
    return chosen


def _dicom_volumes(root: Path, series_uid: str | None, salt: bytes, redactor) -> tuple[list, list]:
    """Reads every CT series under `root` (or the one chosen); (volumes, skipped files).

    The identities met in the headers are taught to `redactor`."""
    headers, skipped = _scan(root, redactor)
    series_list, dropped = dicom_io.build_series(headers)
    base = root.parent if root.is_file() else root
    skipped += [(p.relative_to(base).as_posix(), r) for p, r in dropped]
    by_path = {h.path: ds for h, ds in headers}
    volumes = []
    for series in _chosen_series(series_list, series_uid, salt, skipped):
        volume = _series_volume(series, base, by_path, salt, redactor, skipped)
        if volume is not None:
            volumes.append(volume)
    return volumes, [(redactor(f), redactor(r)) for f, r in skipped]


def _series_volume(series, base, by_path, salt, redactor, skipped):
    """One series as a `Volume` (its longest gap-free run of slices, unreadable slices
    left as air), or None with the reason added to `skipped`."""
    pseudo = pseudonym("S", series.uid, salt)
    own_skips, warnings = [], []
    # Gaps are in the geometry (the header positions), not in which files decode.
    block, gap = dicom_io.gap_free_run(series.positions)
    for i, header in enumerate(series.slices):
        if not block.start <= i < block.stop:
            own_skips.append(
                (
                    header.path.relative_to(base).as_posix(),
                    "beyond a gap in slice positions (the longest gap-free run is kept)",
                )
            )
    if gap:
        warnings.append(f"{gap}: kept the longest run of {block.stop - block.start} slices")
    sub = dataclasses.replace(
        series, slices=series.slices[block], positions=series.positions[block]
    )
    hu, unreadable = [], []
    for i, header in enumerate(sub.slices):
        try:
            hu.append(header.read_hu())
        except SkipFile as e:
            # Kept in place (as air, not segmented) so the grid stays regular.
            hu.append(np.full((header.rows, header.columns), dicom_io.HU_FLOOR, np.float32))
            unreadable.append(i)
            own_skips.append(
                (header.path.relative_to(base).as_posix(), f"{e}; left empty in the outputs")
            )
    if len(unreadable) == len(sub.slices):
        skipped += own_skips
        skipped.append((f"series {pseudo}", "no slice of the series could be read"))
        return None
    problem = ct_value_problem(np.stack(hu))
    if problem:
        skipped += own_skips
        skipped.append((f"series {pseudo}", problem))
        return None
    if unreadable:
        warnings.append(
            f"{len(unreadable)} unreadable slice(s) left empty: lesion and lung volumes "
            "leave them out"
        )
    first = sub.slices[0]
    return Volume(
        kind="dicom",
        hu=np.stack(hu).astype(np.float32),
        spacing_mm=(first.spacing[0], first.spacing[1], abs(sub.slice_spacing)),
        patient=pseudonym("P", f"dicom:{series.patient_id or series.uid}", salt),
        series=pseudo,
        series_obj=sub,
        datasets=[by_path[h.path] for h in sub.slices],
        unreadable=unreadable,
        skipped=[(redactor(f), redactor(r)) for f, r in own_skips],
        warnings=[redactor(w) for w in warnings],
        tilt_deg=dicom_io.tilt_deg(sub.normal),
    )


def read_input(path, series_uid=None, salt=None, redactor=None) -> tuple[list[Volume], list]:
    """The volumes to predict on and the files skipped, from a DICOM folder or a NIfTI file.

    ``redactor``: a `Redactor` to teach the input's identities (for the console).

    Raises:
        PredictionError: missing input, nothing usable in it, or a NIfTI volume that is
            not CT in Hounsfield units (`data_tools.ct_values`).
    """
    path = Path(path)
    salt = resolve_salt(salt)
    redactor = Redactor() if redactor is None else redactor
    if not path.exists():
        raise PredictionError(f"--input {path} does not exist")
    if path.is_file() and (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        try:
            hu, spacing, affine = read_nifti_volume(path)
        except SkipFile as e:
            raise PredictionError(f"{path.name}: {e}") from None
        problem = ct_value_problem(hu)
        if problem:
            raise PredictionError(f"{path.name} is refused: {problem}")
        key = path.resolve().as_posix()
        volume = Volume(
            kind="nifti",
            hu=np.maximum(hu.astype(np.float32), dicom_io.HU_FLOOR),
            spacing_mm=spacing,
            patient=pseudonym("P", f"nifti:{key}", salt),
            series=pseudonym("S", key, salt),
            affine=affine,
            tilt_deg=dicom_io.tilt_deg(affine[:3, 2]),
        )
        return [volume], []
    volumes, skipped = _dicom_volumes(path, series_uid, salt, redactor)
    if not volumes:
        reasons = "; ".join(f"{f}: {r}" for f, r in skipped[:5]) or "no files"
        raise PredictionError(f"no usable CT series in {path} ({reasons}){_hint(path)}")
    return volumes, skipped


def _hint(path: Path) -> str:
    """What a file given as --input may have been meant as, when it is no DICOM slice."""
    if not path.is_file():
        return ""
    if path.suffix.lower() in (".txt", ".csv", ".lst"):
        return "; a list of studies is read by the batch prediction: add --runner direct"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "; PNG/JPEG slices are read as a folder: give the folder that holds them"
    return ""


# ----------------------------------------------------------------------------- inference


def run_model(predictor, hu: np.ndarray, gate: bool, threshold: float, batch_size: int):
    """Slice probabilities [K], masks [K, H, W, C] (zeros where the gate said no), and the
    indices segmented.

    With the gate, the classifier scores every slice and only the slices it passes are
    segmented. Without, one pass of the serving graph gives both outputs for every slice
    (the encoder runs once), the cheapest way to segment everything.
    """
    k = hu.shape[0]
    if not gate or threshold <= 0.0:  # a gate that passes everything: one pass is cheaper
        outs = [predictor.serve(hu[i : i + batch_size]) for i in range(0, k, batch_size)]
        probs = np.concatenate([p for p, _ in outs]).astype(np.float32, copy=False)
        masks = np.concatenate([m for _, m in outs]).astype(np.float32, copy=False)
        return probs, masks, np.arange(k)
    probs = np.concatenate(
        [predictor.classify(hu[i : i + batch_size]) for i in range(0, k, batch_size)]
    ).astype(np.float32)
    passed = np.nonzero(probs >= threshold)[0]
    masks = None
    for i in range(0, len(passed), batch_size):
        idx = passed[i : i + batch_size]
        out = predictor.segment(hu[idx])
        if masks is None:
            masks = np.zeros((k, *out.shape[1:]), np.float32)
        masks[idx] = out
    return probs, masks, passed


def _label_volume(masks: np.ndarray | None, shape, mask_threshold: float) -> np.ndarray:
    """[K, H, W] uint8: the most probable class among those at or above the threshold."""
    if masks is None:
        return np.zeros(shape, np.uint8)
    return label_map(masks, mask_threshold)


MIN_LUNG_ML = 300.0  # less is partial coverage, not a chest CT, or a failed lung mask
# More than any adult's total lung capacity (about 6-8 L, 10 L in the tallest): a slice
# or pixel spacing that is wrong in the header (a NIfTI's pixdim, positions in cm).
MAX_LUNG_ML = 12000.0


def grading_limits(volume: Volume, lung_ml: float) -> list[str]:
    """Why the study cannot support a severity grade (empty when it can)."""
    limits = []
    if volume.hu.shape[0] < 2:
        limits.append("a single slice: lesion and lung volumes need a series of slices")
    if volume.tilt_deg > dicom_io.MAX_TILT_DEG:
        limits.append(
            f"not an axial series (slices {volume.tilt_deg:.0f} degrees from axial): the "
            "model and the lung mask work on axial slices"
        )
    if lung_ml <= 0:
        limits.append("no lung found in the study")
    elif lung_ml < MIN_LUNG_ML:
        limits.append(
            f"lungs of {lung_ml:.0f} mL, below the {MIN_LUNG_ML:.0f} mL a chest CT covers "
            "(partial coverage, not a chest CT, or the lung mask failed)"
        )
    elif lung_ml > MAX_LUNG_ML:
        limits.append(
            f"lungs of {lung_ml:.0f} mL, above the {MAX_LUNG_ML:.0f} mL of any adult's "
            f"lungs: the voxel spacing read from the input ({_spacing_text(volume)} mm) is "
            "likely wrong (slice positions, thickness or a NIfTI's pixdim)"
        )
    return limits


def _spacing_text(volume: Volume) -> str:
    return " x ".join(f"{float(v):g}" for v in volume.spacing_mm)


def lung_sides(lung: np.ndarray, volume: Volume) -> dict:
    """{"right": mask, "left": mask}: the lung voxels on each side of the midline between
    the lungs (the middle of the lung mask's extent across the columns), the patient's
    side read from the series orientation; {} when the columns do not run right-left."""
    markers, _ = display_geometry(volume)
    columns = np.nonzero(lung.any(axis=(0, 1)))[0]
    if markers["right"] not in ("L", "R") or columns.size == 0:
        return {}
    beyond = np.arange(lung.shape[2]) > (columns.min() + columns.max()) / 2
    far = "left" if markers["right"] == "L" else "right"
    near = "right" if far == "left" else "left"
    return {near: lung & ~beyond, far: lung & beyond}


def measure(volume: Volume, labels: np.ndarray, classes, severity_rule) -> tuple[dict, np.ndarray]:
    """Lung and lesion volumes (mL), percentages of lung, lesion slices and severity.

    Only lesion voxels in the lung (within `LESION_MARGIN_MM` of the lung mask, for
    pleural consolidation) count; the others are dropped and their volume reported.

    Returns:
        (the measures, the label volume with the lesions outside the lung removed).
    """
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    lung = lung_mask(volume.hu, volume.spacing_mm[:2])
    counted, region = burden_masks(labels > 0, lung, volume.spacing_mm[:2])
    dropped = int((labels > 0).sum() - counted.sum())
    labels = np.where(counted, labels, 0).astype(np.uint8)
    lung_voxels = int(region.sum())
    sides = lung_sides(region, volume)
    lesions = {}
    total = 0.0
    for c, name in enumerate(classes):
        on = labels == c + 1
        voxels = int(on.sum())
        ratio = burden(voxels, lung_voxels)
        total += ratio
        lesions[name] = {
            "volume_ml": round(voxels * voxel_ml, 3),
            "percent_of_lung": round(100.0 * ratio, 3),
            "percent_of_each_lung": {
                side: round(100.0 * int((on & mask).sum()) / max(int(mask.sum()), 1), 3)
                for side, mask in sides.items()
            },
            "mean_hu": round(float(volume.hu[on].mean()), 1) if voxels else None,
            "slices": [int(z) for z in np.nonzero(on.any(axis=(1, 2)))[0]],
        }
    limits = grading_limits(volume, lung_voxels * voxel_ml)
    measured = {
        "lung_volume_ml": round(lung_voxels * voxel_ml, 3),
        "lesions": lesions,
        "total": {
            "volume_ml": round(sum(v["volume_ml"] for v in lesions.values()), 3),
            "percent_of_lung": round(100.0 * total, 3),
            "percent_of_each_lung": {
                side: round(100.0 * int(((labels > 0) & mask).sum()) / max(int(mask.sum()), 1), 3)
                for side, mask in sides.items()
            },
            "mean_hu": round(float(volume.hu[labels > 0].mean()), 1) if labels.any() else None,
            "slices": [int(z) for z in np.nonzero((labels > 0).any(axis=(1, 2)))[0]],
        },
        "outside_lung": {
            "volume_ml": round(dropped * voxel_ml, 3),
            "rule": f"predicted lesion voxels farther than {LESION_MARGIN_MM:g} mm from the "
            "lung mask (chest wall, table, abdomen) are not counted, nor written as lesions",
        },
        "severity": {
            "grade": None if limits else grade_severity(total, severity_rule),
            "not_graded": limits,
            "total_lesion_lung_ratio": round(total, 6),
            "thresholds": (severity_rule or {}).get("thresholds"),
            "rule": "mild < t1 <= moderate < t2 <= severe, on the total lesion/lung ratio",
            "fitted": bool((severity_rule or {}).get("fitted")),
        },
    }
    return measured, labels


# ----------------------------------------------------------------------------- writing


def burden_call(
    ratio: float, rule: dict | None, mask_threshold: float | None = None, not_graded=()
) -> dict:
    """The patient call from the segmentation: lesion / lung ratio >= the export's t.

    The export chooses t on its run's validation patients (`calibration.calibrate_burden_rule`);
    models exported without one (older versions) give ``positive: None``. t holds for the
    mask threshold and the lesion-counting rule it was chosen with: a prediction made at
    another `mask_threshold` (``--mask-threshold``), or by a model whose t was chosen
    under another rule, counts other voxels as lesion, so it makes no call either; nor
    does a study that cannot support a ratio (`not_graded`: `grading_limits`).
    """
    rule = rule or {}
    t = rule.get("threshold")
    chosen_at = rule.get("mask_threshold")
    call = {
        "ratio": float(ratio),
        "threshold": None if t is None else float(t),
        "positive": None if t is None else bool(ratio >= t),
        "rule": "total lesion / lung ratio at or above the threshold (chosen on validation)",
    }
    if t is None:
        why = rule.get("method") or "the model was exported before the rule existed"
        call["rule"] = f"no call: the export chose no threshold ({why})"
    elif rule.get("lesion_rule") != LESION_RULE:
        call["positive"] = None
        call["rule"] = (
            "no call: the threshold was chosen counting lesions by another rule "
            f"({rule.get('lesion_rule') or 'all predicted voxels'}); export the model again"
        )
    elif not_graded:
        call["positive"] = None
        call["rule"] = f"no call: {'; '.join(not_graded)}"
    elif (
        chosen_at is not None
        and mask_threshold is not None
        and abs(float(chosen_at) - float(mask_threshold)) > 1e-9
    ):
        call["positive"] = None
        call["rule"] = (
            f"no call: the threshold was chosen at mask threshold {float(chosen_at):g}, this "
            f"prediction used {float(mask_threshold):g}"
        )
    return call


def _nifti(volume: Volume, data: np.ndarray):
    """A NIfTI image of [K, H, W] data on the input's grid and affine."""
    import nibabel as nib

    if volume.kind == "dicom":
        # voxel (row, column, slice) -> LPS by the series geometry, then to RAS.
        affine = RAS_FROM_LPS @ volume.series_obj.affine_lps()
        array = np.moveaxis(data, 0, 2)
    else:
        # Inverse of read_nifti_volume's display transform, on the canonical affine.
        affine = volume.affine
        array = np.ascontiguousarray(data.transpose(2, 1, 0)[::-1, ::-1])
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def write_seg(
    volume: Volume, labels: np.ndarray, classes, path: Path, version, research=False
) -> bool:
    """A DICOM SEG of the label volume referencing the source slices; False if empty.

    As DICOM requires, the SEG carries the source study's patient and study modules (so a
    PACS files it with the study). With `research`, the patient module holds the
    pseudonyms instead (PatientName and PatientID the patient's pseudonym, no birth date,
    accession number, study ID or referring physician); the UIDs still reference the
    source images, which the segmentation's frames are aligned to, and the study date,
    time and the patient's sex stay.
    """
    import highdicom as hd
    from pydicom.sr.coding import Code
    from pydicom.uid import generate_uid

    present = sorted(int(v) for v in np.unique(labels) if v > 0)
    if not present:
        return False
    descriptions = []
    for number in present:
        name = classes[number - 1]
        value, scheme, meaning = _SEG_CODES.get(name, _LESION_CODE)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=len(descriptions) + 1,
                segment_label=name,
                segmented_property_category=Code(*_CATEGORY_CODE),
                segmented_property_type=Code(value, scheme, meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name="tfcovseg coarse-refine",
                    version=str(version),
                    family=Code("113257", "DCM", "Artificial Intelligence"),
                ),
            )
        )
    renumbered = np.zeros((*labels.shape, len(present)), bool)
    for s, number in enumerate(present):
        renumbered[..., s] = labels == number
    seg = hd.seg.Segmentation(
        source_images=volume.datasets,
        pixel_array=renumbered,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=9901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="tfcovseg",
        manufacturer_model_name="coarse-refine (research use, not a medical device)",
        software_versions=__version__,
        device_serial_number="0",
        series_description="tfcovseg lesions (research use)",
    )
    if research:
        _pseudonymise_patient(seg, volume.patient)
    seg.save_as(path)
    return True


# Free text and names that may identify the patient or the hospital, which highdicom
# copies from the source (the study module; InstitutionName also into the contributing
# equipment): optional in a SEG, so the research SEG leaves them out, at any depth.
_IDENTIFYING_TEXT = (
    "StudyDescription", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "OperatorsName",
    "PerformingPhysicianName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "AdmittingDiagnosesDescription", "PatientComments",
    "AdditionalPatientHistory", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "Occupation", "OtherPatientIDsSequence", "OtherPatientIDs",
    "OtherPatientNames",
)  # fmt: skip


def _remove_everywhere(ds, keywords) -> None:
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _remove_everywhere(item, keywords)


def _pseudonymise_patient(ds, patient: str) -> None:
    """Replaces a dataset's patient identity (and the study's identifying attributes) with
    a pseudonym, as the research SEG carries it."""
    ds.PatientName = ds.PatientID = patient
    for keyword in ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        if keyword in ds:
            setattr(ds, keyword, "")
    _remove_everywhere(ds, _IDENTIFYING_TEXT)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "tfcovseg research SEG: patient pseudonymised, UIDs retained"


# Patient axes (LPS: +x left, +y posterior, +z superior) and the letter of each end.
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))


def _letter(direction) -> str:
    """The patient direction a voxel axis mostly points to (LPS vector): R/L, A/P, I/S."""
    d = np.asarray(direction, np.float64)
    axis = int(np.argmax(np.abs(d)))
    return _AXIS_LETTERS[axis][int(d[axis] > 0)]


_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "I": "S", "S": "I"}


def display_geometry(volume: Volume) -> tuple[dict, list[float]]:
    """Orientation letters at a slice's edges and each slice's z (mm, superior +).

    DICOM: from the series geometry (rows follow the column direction cosines); NIfTI: the
    display orientation `read_nifti_volume` gives (rows anterior to posterior, columns the
    patient's right to left) and the canonical affine's z of each slice.
    """
    k = volume.hu.shape[0]
    if volume.kind == "dicom":
        affine = volume.series_obj.affine_lps()
        down, across = _letter(affine[:3, 0]), _letter(affine[:3, 1])
    else:
        affine = volume.affine
        down, across = "P", "L"
    centre = np.array([volume.hu.shape[1] / 2, volume.hu.shape[2] / 2])
    z = []
    for i in range(k):
        if volume.kind == "dicom":
            z.append(float((affine @ [centre[0], centre[1], i, 1.0])[2]))
        else:  # display slice i is canonical voxel plane k = i
            z.append(float((affine @ [centre[1], centre[0], i, 1.0])[2]))
    markers = {"top": _OPPOSITE[down], "bottom": down, "left": _OPPOSITE[across], "right": across}
    return markers, z


def montage(volume: Volume, labels: np.ndarray, classes, window, k=MONTAGE_SLICES) -> bytes:
    """PNG bytes: up to k slices with the most lesion (the middle slice if none), each with
    its slice number and z, the patient orientation letters and the colour legend."""
    from tfcovseg.reporting.figures import overlay_rgb, tile_sheet

    area = (labels > 0).sum(axis=(1, 2))
    order = [int(z) for z in np.argsort(-area, kind="stable") if area[z] > 0][:k]
    order = sorted(order) or [volume.hu.shape[0] // 2]
    channels = np.stack([labels[order] == c + 1 for c in range(len(classes))], -1)
    rgb = overlay_rgb(volume.hu[order], channels.astype(np.float32), classes, window=window)
    markers, z = display_geometry(volume)
    total = volume.hu.shape[0]
    captions = [f"slice {i + 1}/{total}, z {z[i]:.1f} mm" for i in order]
    return tile_sheet(list(rgb), captions, classes, markers)


_CSS = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
    "table{border-collapse:collapse}"
    "td,th{border:1px solid #999;padding:.2em .6em;text-align:right}"
    "td:first-child{text-align:left}.warn{color:#a00}"
)


def _verdict_html(verdict: dict) -> str:
    """The verdict and the rule that made it, then every rule's figure as evidence."""
    e = html.escape
    items = "".join(
        f"<li>{e(ev['rule'])}: {e(ev['figure'])}: "
        + ("no call" if ev["positive"] is None else ("COVID-19" if ev["positive"] else "no"))
        + f" ({e(ev['note'])})</li>"
        for ev in verdict["evidence"]
    )
    return (
        f"<p>Verdict: <strong>{e(verdict['call'])}</strong>, by {e(verdict['why'])}.</p>"
        f"<p>Evidence (each rule's own call):</p><ul>{items}</ul>"
    )


def _severity_html(sev: dict) -> str:
    if sev["grade"] is None:
        why = "; ".join(sev["not_graded"])
        return f"<p>Severity estimate: <strong>not graded</strong> ({html.escape(why)}).</p>"
    return (
        f"<p>Severity estimate: <strong>{html.escape(sev['grade'])}</strong> (total lesion / "
        f"lung ratio {sev['total_lesion_lung_ratio']:.4f}; thresholds "
        f"{html.escape(str(sev['thresholds']))}).</p>"
    )


def _unreadable_text(gate: dict) -> str:
    n = gate.get("slices_unreadable", 0)
    return f" ({n} unreadable, left empty and unscored)" if n else ""


def render_html(report: dict, png: bytes) -> str:
    """A self-contained HTML page of a study report (the montage embedded)."""
    e = html.escape
    study, model, gate = report["study"], report["model"], report["gate"]
    sev, total = report["severity"], report["total"]

    def row(name, v, strong=False):
        cell = f"<strong>{e(name)}</strong>" if strong else e(name)
        sides = v.get("percent_of_each_lung") or {}
        each = "".join(
            f"<td>{sides[s]:.2f}</td>" if s in sides else "<td>&mdash;</td>"
            for s in ("right", "left")
        )
        hu = "&mdash;" if v.get("mean_hu") is None else f"{v['mean_hu']:.0f}"
        return (
            f"<tr><td>{cell}</td><td>{v['volume_ml']:.1f}</td>"
            f"<td>{v['percent_of_lung']:.2f}</td>{each}<td>{hu}</td>"
            f"<td>{len(v['slices'])}</td></tr>"
        )

    rows = "".join(row(name, v) for name, v in report["lesions"].items())
    rows += row("total", total, strong=True)
    spacing = ", ".join(f"{s:.2f}" for s in study["spacing_mm"])
    lists = ""
    if report["warnings"]:
        items = "".join(f"<li>{e(w)}</li>" for w in report["warnings"])
        lists += f"<h2>Warnings</h2><ul>{items}</ul>"
    if report["skipped"]:
        items = "".join(f"<li>{e(s['file'])}: {e(s['reason'])}</li>" for s in report["skipped"])
        lists += f"<h2>Skipped</h2><ul>{items}</ul>"
    image = base64.b64encode(png).decode("ascii")
    body = [
        "<h1>COVID-19 lesion report</h1>",
        f'<p class="warn"><strong>{e(report["disclaimer"])}</strong></p>',
        f"<p>Patient {e(study['patient'])}, series {e(study['series'])}: {study['slices']} "
        f"slices of {study['rows']}&times;{study['columns']} pixels, spacing {spacing} mm. "
        f"Model: {e(model['source'])} (experiment {e(str(model['experiment']))}, version "
        f"{e(str(model['model_version']))}).</p>",
        "<h2>Lesions</h2>",
        "<table><tr><th>lesion type</th><th>volume (mL)</th><th>% of lung</th>"
        "<th>% of right lung</th><th>% of left lung</th><th>mean HU</th>"
        f"<th>slices</th></tr>{rows}</table>",
        f"<p>Lung volume {report['lung_volume_ml']:.0f} mL. Not counted: "
        f"{report['outside_lung']['volume_ml']:.1f} mL of predicted lesion outside the lungs "
        f"({e(report['outside_lung']['rule'])}).</p>",
        "<h2>Assessment</h2>",
        _verdict_html(report["verdict"]),
        _severity_html(sev),
        f"<p>Slice gate: {'on' if gate['enabled'] else 'off'}, threshold "
        f"{gate['threshold']:.3f}; {gate['slices_segmented']} of {study['slices']} slices "
        f"segmented{_unreadable_text(gate)}.</p>",
        "<h2>Overlay</h2>",
        f'<p><img alt="slices with the most lesion" src="data:image/png;base64,{image}"></p>',
        "<p>Each tile: the slice number and z position; the letters at its edges are the "
        "patient's directions (R/L, A/P); the colours are in the legend below the tiles.</p>",
        lists,
        f'<p class="warn">{e(report["disclaimer"])}</p>',
    ]
    title = f"tfcovseg report {e(study['series'])}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def predict_volume(
    predictor,
    volume: Volume,
    out_dir: Path,
    gate=True,
    threshold=None,
    mask_threshold=0.5,
    batch_size=8,
    study_skipped=(),
    research_seg=False,
) -> dict:
    """Predicts one volume and writes its files into `out_dir` (created); returns the report.

    ``study_skipped``: (file, reason) of the input's files that belong to no usable series
    (other modalities, corrupt headers), reported with the series' own skipped slices.
    ``research_seg``: the DICOM SEG carries pseudonyms instead of the source's patient
    module (`write_seg`).
    """
    threshold = float(predictor.metadata["gate"]["threshold"] if threshold is None else threshold)
    start = time.perf_counter()
    probs, masks, passed = run_model(predictor, volume.hu, gate, threshold, batch_size)
    inference = Inference(probs, masks, passed, time.perf_counter() - start)
    return finish_volume(
        predictor, volume, out_dir, inference, gate, threshold, mask_threshold,
        study_skipped, research_seg, start,
    )  # fmt: skip


@dataclasses.dataclass
class Inference:
    """The model's answer on a volume (`run_model`): slice probabilities [K], masks
    [K, H, W, C] (zeros where the gate said no; None when it passed no slice), the indices
    segmented and the seconds it took (None where not known per volume)."""

    probs: np.ndarray
    masks: np.ndarray | None
    passed: np.ndarray
    seconds: float


def finish_volume(
    predictor, volume, out_dir, inference, gate, threshold, mask_threshold,
    study_skipped=(), research_seg=False, start=None,
) -> dict:  # fmt: skip
    """`predict_volume` once the model has answered (also the batch pipeline's last step,
    `tfcovseg.inference.archive`): measures, writes the files, returns the report.
    `predictor`: anything with the model's ``metadata`` and ``source``."""
    start = time.perf_counter() if start is None else start
    meta = predictor.metadata
    classes = list(meta["class_names"])
    probs, masks, passed = inference.probs, inference.masks, inference.passed
    if volume.unreadable:
        # Slices that could not be read stand in as air to keep the grid: they are neither
        # segmented nor scored (an air slice's low probability would count as evidence).
        probs = np.array(probs, np.float32)
        probs[volume.unreadable] = 0.0
        passed = np.setdiff1d(passed, volume.unreadable)
        if masks is not None:
            masks[volume.unreadable] = 0.0
    measured, labels = measure(
        volume, _label_volume(masks, volume.hu.shape, mask_threshold), classes, meta.get("severity")
    )
    report = _report(predictor, volume, probs, passed, measured, gate, threshold, mask_threshold)
    report["skipped"] = [{"file": f, "reason": r, "scope": "series"} for f, r in volume.skipped] + [
        {"file": f, "reason": r, "scope": "study"} for f, r in study_skipped
    ]
    seconds = inference.seconds  # None: not known per series (the Beam pipeline's)
    report["timings_s"] = {"inference": None if seconds is None else round(seconds, 3)}
    report["options"] = {"research_seg": bool(research_seg)}
    report["lesion_rule"] = LESION_RULE
    if masks is None:
        masks = np.zeros((*volume.hu.shape, len(classes)), np.float32)
    png = _write_outputs(volume, labels, masks, classes, meta, out_dir, report, research_seg)
    report["timings_s"]["total"] = round(time.perf_counter() - start, 3)
    atomic_write_text(out_dir / "report.html", render_html(report, png))
    atomic_write_json(out_dir / "report.json", report)
    return report


def _report(predictor, volume, probs, passed, measured, gate, threshold, mask_threshold) -> dict:
    """The report of one volume (without its skipped files, timings and outputs)."""
    meta = predictor.metadata
    k, h, w = volume.hu.shape
    if not gate:
        gate_method = "--no-gate"
    elif threshold == float(meta["gate"]["threshold"]):
        gate_method = meta["gate"].get("method", "")
    else:
        gate_method = "--threshold"
    rule = meta.get("patient_rule", {})
    patient_threshold = float(rule.get("threshold", 0.5))
    patient_probability = patient_score(probs, int(rule.get("min_slices", 1)))
    not_graded = measured["severity"]["not_graded"]  # the study's limits
    covid = {
        "probability": patient_probability,
        "threshold": patient_threshold,
        "positive": bool(patient_probability >= patient_threshold),
        "rule": f"at least {int(rule.get('min_slices', 1))} slice(s) at or above the "
        "threshold (the paper: any slice, Huang et al. 2021)",
        "slice_probabilities": [round(float(p), 4) for p in probs],
        "lesion_burden": burden_call(
            measured["severity"]["total_lesion_lung_ratio"],
            meta.get("burden_rule"),
            mask_threshold,
            not_graded,
        ),
    }
    verdict = patient_verdict(covid, meta.get("gate", {}), covid["lesion_burden"])
    return {
        "disclaimer": DISCLAIMER,
        "study": {
            "patient": volume.patient,
            "series": volume.series,
            "input": volume.kind,
            "slices": int(k),
            "rows": int(h),
            "columns": int(w),
            "spacing_mm": [float(s) for s in volume.spacing_mm],
            "input_sha256": volume.fingerprint(),
        },
        "model": {
            "source": predictor.source,
            "sha256": getattr(predictor, "sha256", None),
            "model_version": meta.get("model_version"),
            "experiment": meta.get("experiment"),
            "architecture": meta.get("architecture"),
            "classes": list(meta["class_names"]),
            "tfcovseg": __version__,
        },
        "gate": {
            "enabled": bool(gate) and threshold > 0.0,
            "threshold": threshold,
            "method": gate_method,
            "slices_segmented": int(len(passed)),
            "slices_unreadable": len(volume.unreadable),
        },
        "verdict": verdict,
        "covid": covid,
        "mask_threshold": float(mask_threshold),
        **measured,
        "severity": severity_for_verdict(measured["severity"], verdict),
        "warnings": list(volume.warnings) + [f"no severity grade: {r}" for r in not_graded],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_outputs(volume, labels, masks, classes, meta, out_dir, report, research_seg) -> bytes:
    """Writes the label and probability volumes, the SEG and the overlay; returns the
    overlay PNG (for the HTML report) and records the files in ``report["outputs"]``."""
    import nibabel as nib

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"labels": "lesions.nii.gz"}
    nib.save(_nifti(volume, labels), out_dir / "lesions.nii.gz")
    for c, name in enumerate(classes):
        file = f"probability_{name}.nii.gz"
        nib.save(_nifti(volume, masks[..., c].astype(np.float32)), out_dir / file)
        outputs[f"probability_{name}"] = file
    if volume.kind == "dicom":
        version = meta.get("model_version") or "run"
        path = out_dir / "segmentation.dcm"
        try:
            if write_seg(volume, labels, classes, path, version, research=research_seg):
                outputs["dicom_seg"] = "segmentation.dcm"
                report["dicom_seg_identity"] = (
                    "pseudonymised (research SEG)" if research_seg else "the source study's"
                )
            else:
                report["warnings"].append("no lesion found: no DICOM SEG written")
        except Exception as e:  # highdicom refuses some source headers (missing modules)
            report["warnings"].append(f"no DICOM SEG: highdicom refused it ({type(e).__name__})")
    png = montage(volume, labels, classes, meta.get("hu_window", DEFAULT_WINDOW))
    (out_dir / "overlay.png").write_bytes(png)
    outputs["overlay"] = "overlay.png"
    outputs |= {"report_json": "report.json", "report_html": "report.html"}
    report["outputs"] = outputs
    return png


def _settings(report: dict) -> dict:
    """What makes two predictions of a series the same: the model, the options and the
    rule lesions were counted by (a report without it predates the rule)."""
    return {
        "model": report["model"]["source"],
        "model_sha256": report["model"].get("sha256"),
        "model_version": report["model"].get("model_version"),
        "gate": report["gate"]["enabled"],
        "gate_threshold": report["gate"]["threshold"],
        "mask_threshold": report.get("mask_threshold"),
        "research_seg": report.get("options", {}).get("research_seg"),
        "lesion_rule": report.get("lesion_rule"),
    }


def _finished_report(folder: Path) -> dict | None:
    """The report of a completed series folder, or None (missing or unreadable)."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "outputs" in report else None


def index_entry(report: dict) -> dict:
    return {
        "series": report["study"]["series"],
        "patient": report["study"]["patient"],
        "folder": report["study"]["series"],
        "slices": report["study"]["slices"],
        # Reports written before the verdict existed (kept by a rerun) have none.
        "verdict": report.get("verdict", {}).get("call"),
        "verdict_rule": report.get("verdict", {}).get("rule"),
        "covid_probability": report["covid"]["probability"],
        "severity": report["severity"]["grade"],
        "lesion_percent_of_lung": report["total"]["percent_of_lung"],
    }


def list_entry(index: dict, entry: dict) -> None:
    """Puts a series' entry into the index, replacing an older one of the same series."""
    index["series"] = [s for s in index["series"] if s.get("series") != entry["series"]]
    index["series"].append(entry)


def read_index(index_path: Path) -> dict:
    index = {"disclaimer": DISCLAIMER, "series": [], "skipped": []}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except ValueError:
            raise PredictionError(f"{index_path} is not valid JSON: choose another --out") from None
    return index


def done_before(out: Path, volumes, expected: dict) -> dict:
    """{series: report} of the volumes a previous run into `out` completed with the same
    model and options; other results in `out` are an error (never overwritten)."""
    done = {}
    for v in volumes:
        folder = out / v.series
        if not folder.exists():
            continue
        report = _finished_report(folder)
        if report is None:
            raise PredictionError(
                f"{folder} exists but holds no finished prediction (no readable report.json): "
                "remove it or choose another --out"
            )
        found = _settings(report)
        # Reports written before a key existed hold None there: nothing to compare.
        differ = {
            k: (found[k], expected[k])
            for k in expected
            if found[k] != expected[k] and not (k.endswith("sha256") and found[k] is None)
        }
        kept_input = report["study"].get("input_sha256")
        if kept_input is not None and kept_input != v.fingerprint():
            raise PredictionError(
                f"{out} already holds results for series {v.series} predicted from other "
                f"input ({report['study']['slices']} slices there, {len(v.hu)} now, or "
                "changed voxels): choose another --out, or remove that series' folder"
            )
        if differ:
            detail = ", ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in differ.items())
            raise PredictionError(
                f"{out} already holds results for series {v.series} made with other settings "
                f"({detail}): choose another --out"
            )
        done[v.series] = report
    return done


def check_thresholds(threshold, mask_threshold) -> None:
    """Raises `PredictionError` for a gate or mask threshold out of its range."""
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise PredictionError(f"--threshold must be in [0, 1], got {threshold}")
    if not 0.0 < float(mask_threshold) <= 1.0:
        raise PredictionError(f"--mask-threshold must be in (0, 1], got {mask_threshold}")


def predict(
    model,
    input_path,
    out,
    gate=True,
    threshold=None,
    mask_threshold=0.5,
    series_uid=None,
    batch_size=8,
    salt=None,
    log=print,
    research_seg=False,
    intensity=None,
) -> dict:
    """Predicts every usable series of the input into ``out/<series pseudonym>/``.

    Each series folder is written under a temporary name and renamed when complete. A
    rerun into the same `out` (after a kill, say) keeps the series already finished with
    the same model and options, removes the partial folders and predicts the rest;
    results made with other settings are never overwritten. Returns the index (also
    ``index.json``). `intensity` ("match", the default, or "as-is") applies to folders of
    PNG/JPEG slices only (`tfcovseg.inference.images`).

    Raises:
        PredictionError: bad model, input or output folder, nothing usable, results in
            `out` made with other settings.
    """
    check_thresholds(threshold, mask_threshold)
    out = Path(out)
    try:
        check_output_dir(out)
    except OutputError as e:
        raise PredictionError(str(e)) from None
    predictor = model if hasattr(model, "segment") else open_model(model)
    if predictor.metadata.get("pre_windowed") and "windowing" not in predictor.metadata:
        raise PredictionError(
            f"{predictor.source} was trained on 8-bit windowed images and exported before "
            "exports windowed HU for such models: export its run again"
        )
    with exclusive_folder(out, error=PredictionError):
        return _predict_input(
            predictor, input_path, out, gate, threshold, mask_threshold, series_uid,
            batch_size, salt, log, research_seg, intensity,
        )  # fmt: skip


def _predict_input(
    predictor, input_path, out, gate, threshold, mask_threshold, series_uid, batch_size,
    salt, log, research_seg, intensity,
) -> dict:  # fmt: skip
    """`predict` once the model is open and `out` is held."""
    if is_image_folder(Path(input_path)):
        options = {
            "--no-gate": not gate,
            "--threshold": threshold is not None,
            "--series": series_uid is not None,
            "--research-seg": research_seg,
        }
        ignored = [name for name, given in options.items() if given]
        if ignored:
            log(
                f"warning: {', '.join(ignored)} ignored: a folder of image slices is "
                "segmented slice by slice, without gate, series or DICOM SEG"
            )
        return _predict_image_folder(
            predictor, Path(input_path), out, mask_threshold, batch_size, salt, log,
            intensity or "match",
        )  # fmt: skip
    if intensity is not None:
        log("warning: --intensity ignored: studies in HU are windowed by the model's own window")
    options = dict(
        gate=gate,
        threshold=threshold,
        mask_threshold=mask_threshold,
        batch_size=batch_size,
        research_seg=research_seg,
    )
    redactor = Redactor()
    with redacted_warnings(redactor):
        volumes, skipped = read_input(input_path, series_uid, salt, redactor)
        return _predict_volumes(predictor, volumes, skipped, out, options, log)


def _check_kept_images(target: Path, report, expected: dict) -> None:
    """A folder's earlier results are kept only when made with the same model, threshold
    and intensity handling."""
    found = dict.fromkeys(expected)
    if report is not None:
        found = {
            "model": report["model"]["source"],
            "mask_threshold": report["mask_threshold"],
            "intensity": report.get("intensity", {}).get("mode", "as-is"),
            # None in reports from before these keys: nothing to compare.
            "model_sha256": report["model"].get("sha256") or expected["model_sha256"],
            "input_files": report.get("input_files_sha256") or expected["input_files"],
        }
    if found != expected:
        raise PredictionError(
            f"{target} already holds results made otherwise ({found}, now {expected}): "
            "choose another --out"
        )


def _predict_new_images(
    predictor, folder, target, mask_threshold, batch_size, intensity, log, digest
):  # fmt: skip
    """Reads the folder's slices and predicts them into `target`; returns the report."""
    name = target.name
    try:
        slices, skipped = read_image_folder(folder)
    except ImageInputError as e:
        raise PredictionError(str(e)) from None
    for f, r in skipped:
        log(f"warning: skipped {f}: {r}")
    for left in remove_partial_directories(target):
        log(f"removed {left}, left by an interrupted run")
    report = predict_images(
        predictor, slices, skipped, target, mask_threshold, batch_size, intensity, digest
    )
    with_lesion = sum(1 for s in report["slices"] if s["total"]["pixels"] > 0)
    log(
        f"images {name}: {len(report['slices'])} slices, {with_lesion} with lesions; "
        f"label PNGs in {target / 'labels'}, probabilities in "
        f"{target}/probability_<class>, report {target / 'report.html'}"
    )
    return report


def _predict_image_folder(
    predictor, folder, out, mask_threshold, batch_size, salt, log, intensity
):  # fmt: skip
    """`predict` on a folder of PNG/JPEG slices (`tfcovseg.inference.images`) into
    ``out/<folder pseudonym>/``; a rerun with the same model and settings keeps it."""
    try:
        setting = intensity_setting(predictor.metadata, intensity)
    except ImageInputError as e:
        raise PredictionError(str(e)) from None
    name = pseudonym("S", f"images:{folder.resolve().as_posix()}", resolve_salt(salt))
    target = out / name
    expected = {
        "model": predictor.source,
        "mask_threshold": float(mask_threshold),
        "intensity": setting["mode"],
        "model_sha256": getattr(predictor, "sha256", None),
        "input_files": image_files_digest(folder),  # images added, removed or changed
    }
    index_path = out / "index.json"
    index = read_index(index_path)
    report = _finished_report(target)
    if target.exists():
        _check_kept_images(target, report, expected)
        log(f"images {name}: already predicted in {target}, kept")
    else:  # the images are read only when they are to be predicted
        report = _predict_new_images(
            predictor, folder, target, mask_threshold, batch_size, intensity, log,
            expected["input_files"],
        )  # fmt: skip
    for warning in report["warnings"]:
        log(f"warning: images {name}: {warning}")
    matched = report.get("intensity", {})
    if matched.get("mode") == "match":
        log(
            f"images {name}: grey levels matched to the training slices' "
            f"(5th, 95th) percentiles {matched['reference']} (--intensity as-is to use them "
            "unchanged)"
        )
    index["model"] = predictor.source
    index.setdefault("series", [])
    entry = {"series": name, "folder": name, "input": "images", "slices": len(report["slices"])}
    list_entry(index, entry)
    atomic_write_json(index_path, index)
    return index


def expected_settings(predictor, options: dict) -> dict:
    """The `_settings` a series predicted now with `options` (`predict_volume`'s keywords)
    will have: a rerun keeps results that have them and refuses others."""
    threshold = options["threshold"]
    meta_threshold = float(predictor.metadata["gate"]["threshold"])
    gate_threshold = meta_threshold if threshold is None else float(threshold)
    return {
        "model": predictor.source,
        "model_sha256": getattr(predictor, "sha256", None),
        "model_version": predictor.metadata.get("model_version"),
        "gate": bool(options["gate"]) and gate_threshold > 0.0,
        "gate_threshold": gate_threshold,
        "mask_threshold": float(options["mask_threshold"]),
        "research_seg": bool(options["research_seg"]),
        "lesion_rule": LESION_RULE,
    }


def _predict_volumes(predictor, volumes, skipped, out, options: dict, log) -> dict:
    """`predict` once the input is read: `options` are `predict_volume`'s keywords."""
    done = done_before(out, volumes, expected_settings(predictor, options))
    for f, r in skipped:
        log(f"warning: skipped {f}: {r}")
    out.mkdir(parents=True, exist_ok=True)
    # Results already in OUT stay listed: the index grows with every study predicted into it.
    index_path = out / "index.json"
    index = read_index(index_path)
    index["model"] = predictor.source
    index.setdefault("series", [])
    known = {(s.get("file"), s.get("reason")) for s in index.setdefault("skipped", [])}
    index["skipped"] += [{"file": f, "reason": r} for f, r in skipped if (f, r) not in known]
    for volume in volumes:
        if volume.series in done:
            log(f"series {volume.series}: already predicted in {out / volume.series}, kept")
            list_entry(index, index_entry(done[volume.series]))
            continue
        report = write_series(
            out, volume, lambda tmp, v=volume: predict_volume(
                predictor, v, tmp, study_skipped=skipped, **options
            ), log,
        )  # fmt: skip
        list_entry(index, index_entry(report))
        atomic_write_json(index_path, index)  # after every series
    atomic_write_json(index_path, index)
    return index


def write_series(out: Path, volume: Volume, predict_into, log) -> dict:
    """Writes a series' results into ``out/<series>`` (complete or not at all) with
    ``predict_into(folder)``, saying what it found; returns the report."""
    for w in volume.warnings:
        log(f"warning: series {volume.series}: {w}")
    for left in remove_partial_directories(out / volume.series):
        log(f"removed {left}, left by an interrupted run")
    with atomic_directory(out / volume.series) as tmp:
        report = predict_into(tmp)
    for w in report["warnings"][len(volume.warnings) :]:
        log(f"warning: series {volume.series}: {w}")
    grade = report["severity"]["grade"] or "not graded"
    log(
        f"series {volume.series}: {report['study']['slices']} slices, "
        f"{report['gate']['slices_segmented']} segmented{_unreadable_text(report['gate'])}, "
        "lesions "
        f"{report['total']['percent_of_lung']:.2f} % of lung; "
        f"{verdict_summary(report['verdict'])}; severity {grade} -> {out / volume.series}"
    )
    return report
