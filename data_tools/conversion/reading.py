"""One study read into slices ready to store: HU (or grey levels), lung masks, lesion
masks resized to the records' size, per-slice statistics, and its encoded examples."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np

from data_tools import dicom_io, masks
from data_tools.conversion.discovery import LESION_FREE_DIAGNOSES, Study, gap_warning
from data_tools.ct_values import check_ct_values
from data_tools.dicom_io import SkipFile, one_line
from data_tools.lung import lung_mask
from data_tools.privacy import pseudonym
from data_tools.resize import resize_bilinear


@dataclasses.dataclass
class StudyResult:
    """A converted study, ready to write (numpy arrays at the output size)."""

    hu: np.ndarray  # [K, S, S] float32, or int16 when read as integers
    lesions: np.ndarray  # [K, S, S, C] uint8
    lung: np.ndarray  # [K, S, S] uint8
    positions: list[float]
    slice_keys: list[str]
    spacing_mm: tuple[float, float, float]
    annotated: bool
    pre_windowed: bool
    skipped: list[tuple[str, str]]
    warnings: list[str] = dataclasses.field(default_factory=list)  # found while reading


@dataclasses.dataclass
class EncodedStudy:
    """A converted study as serialized examples and their manifest entries
    (`encode_study`). A worker writes the examples to a file (`path`) and sends the rest:
    the converting process then only appends that file to its shard."""

    slices: list[dict]  # the manifest's per-slice entries, in slice order
    series_id: str
    spacing_mm: tuple[float, float, float]
    annotated: bool
    skipped: list[tuple[str, str]]
    examples: list[bytes] | None = None  # serialized `tf.train.Example`s, in slice order
    path: str | None = None  # or the file holding them (`data_tools.tfrecord.write`)
    appended: bool = False  # or already in the shard (`StudyJob.shard`)
    warnings: list[str] = dataclasses.field(default_factory=list)  # the study's, read


# ----------------------------------------------------------------------------- per study


def _resize(image: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if image.shape == (size, size):
        return image
    from PIL import Image

    if nearest:
        return np.asarray(
            Image.fromarray(image.astype(np.uint8)).resize((size, size), Image.NEAREST)
        )
    # The serving graph resizes with the same weights (`tfcovseg.data.dataset.resize_image`).
    return resize_bilinear(image, (size, size))


def read_nifti_volume(path: Path):
    """A NIfTI volume: [Z, H, W] slices in display orientation, (row, column, slice)
    spacing in mm and the canonical (RAS+) affine the slices were taken from."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as e:
        raise SkipFile(f"cannot read NIfTI ({type(e).__name__}: {one_line(e)})") from None
    shape = tuple(image.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise SkipFile(f"expected a 3-D volume, got shape {shape}")
    # nibabel's reorientation fails on this with an OrientationError that says nothing.
    if not abs(np.linalg.det(np.asarray(image.affine)[:3, :3])) > 1e-12:
        raise SkipFile("its affine (sform/qform) is degenerate: no voxel size or direction")
    try:
        image = nib.as_closest_canonical(image)  # RAS+
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as e:
        raise SkipFile(f"cannot read NIfTI ({type(e).__name__}: {one_line(e)})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SkipFile(f"expected a 3-D volume, got shape {data.shape}")
    # RAS (i right->left reversed, j posterior->anterior) to rows anterior->posterior,
    # columns patient right->left: the usual axial display.
    slices = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))
    zooms = image.header.get_zooms()[:3]
    return slices, (float(zooms[1]), float(zooms[0]), float(zooms[2])), image.affine


@dataclasses.dataclass
class _Volume:
    """A study as read, before lung masks and resizing."""

    hu: np.ndarray  # [K, H, W] float32, or int16 (DICOM with integer HU)
    labels: np.ndarray | None  # [K, H, W] class labels, None: no mask
    spacing: tuple[float, float, float]
    positions: list[float]
    keys: list[str]
    pre_windowed: bool = False
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


def _read_slices(series, dtype) -> tuple[np.ndarray, list, list]:
    """The series' readable slices in HU (filled in place: stacking copied 0.5 ms a
    slice), their indices, and (file name, reason) for the others."""
    hu = np.empty(series.shape, dtype)
    kept, skipped = [], []
    for i, header in enumerate(series.slices):
        try:
            header.read_hu(out=hu[len(kept)])
            kept.append(i)
        except SkipFile as e:
            skipped.append((header.path.name, str(e)))
    if not kept:
        raise SkipFile(f"no slice of the series could be read ({skipped[0][1]})")
    return hu[: len(kept)], kept, skipped


def _read_dicom_study(study: Study, classes) -> _Volume:
    series = study.series
    # Integer HU stay integers, as the records store them (float32 and back cost 0.4 ms a
    # 512x512 slice); a file changed since its header promised them is read again.
    integer = all(header.integer_hu for header in series.slices)
    try:
        hu, kept, skipped = _read_slices(series, np.int16 if integer else np.float32)
    except dicom_io.InexactHU:
        hu, kept, skipped = _read_slices(series, np.float32)
    check_ct_values(hu)
    labels = None
    if study.mask_kind == "nifti":
        labels = masks.nifti_labels_on_series(study.mask_path, series, study.mask_fit)[kept]
    elif study.mask_kind == "seg":
        labels = masks.seg_labels_on_series(study.mask_path, series, classes)[kept]
    first = series.slices[0]
    spacing = (first.spacing[0], first.spacing[1], abs(series.slice_spacing))
    positions = [float(series.positions[i]) for i in kept]
    keys = [series.slices[i].sop_uid for i in kept]
    warnings = []
    if skipped:  # slices whose pixels could not be read may leave a gap discovery did not see
        if dicom_io.gap_bounds(positions) - dicom_io.gap_bounds(series.positions):
            _, gap = dicom_io.gap_free_run(np.asarray(positions))
            warnings.append(gap_warning(f"{gap}, once the unreadable slices were left out"))
    return _Volume(hu, labels, spacing, positions, keys, skipped=skipped, warnings=warnings)


def _read_nifti_study(study: Study) -> _Volume:
    hu, spacing, affine = read_nifti_volume(study.image_path)
    check_ct_values(hu)
    # As for DICOM: padding and outside-field-of-view values (often -3024) become air.
    hu = np.maximum(hu, dicom_io.HU_FLOOR)
    labels = None
    if study.mask_path is not None:
        mask, _, mask_affine = read_nifti_volume(study.mask_path)
        if mask.shape != hu.shape or not np.allclose(mask_affine, affine, atol=1e-3):
            raise SkipFile(
                f"mask {study.mask_path.name} has shape {mask.shape} / affine "
                f"different from the volume's {hu.shape}"
            )
        labels = np.rint(mask).astype(np.uint8)
    positions = [k * spacing[2] for k in range(hu.shape[0])]
    keys = [f"{study.series_key}#{k}" for k in range(hu.shape[0])]
    return _Volume(hu, labels, spacing, positions, keys)


def _read_image_study(study: Study, num_classes: int, binary_class) -> _Volume:
    hu = masks.read_image_slice(study.image_path)[None]
    labels = None
    if study.mask_path is not None:
        labels = masks.read_png_labels(study.mask_path, num_classes, binary_class)[None]
        if labels.shape != hu.shape:
            raise SkipFile(
                f"mask {study.mask_path.name} has shape {labels.shape[1:]}, image {hu.shape[1:]}"
            )
    return _Volume(hu, labels, (1.0, 1.0, 1.0), [0.0], [study.series_key], pre_windowed=True)


def process_study(study: Study, size: int, classes, binary_class: int | None = None) -> StudyResult:
    """Reads a study, aligns its masks, computes lung masks and resizes to `size`.

    `binary_class` (1-based) is the class a binary 0/255 PNG mask stands for; without it
    such a mask is refused when there are several classes (`masks.read_png_labels`).
    """
    num_classes = len(classes)
    if study.kind == "dicom":
        read = _read_dicom_study(study, classes)
    elif study.kind == "nifti":
        read = _read_nifti_study(study)
    else:
        read = _read_image_study(study, num_classes, binary_class)
    hu, labels, spacing = read.hu, read.labels, read.spacing
    if labels is not None and labels.max(initial=0) > num_classes:
        raise SkipFile(
            f"mask has label {int(labels.max())} but only {num_classes} classes "
            f"({', '.join(classes)})"
        )
    # Lesion-free is never inferred from a missing mask: only a mask (of zeros, say) or a
    # diagnosis without lesions makes the masks ground truth.
    annotated = labels is not None or study.diagnosis in LESION_FREE_DIAGNOSES
    if labels is None:
        labels = np.zeros(hu.shape, np.uint8)
    lung = lung_mask(hu, spacing[:2], lesions=labels > 0, pre_windowed=read.pre_windowed)
    k, h, w = hu.shape
    out_spacing = (spacing[0] * h / size, spacing[1] * w / size, spacing[2])
    if hu.shape[1:] == (size, size):  # nothing to resize: no copies
        hu_out, labels_out, lung_out = hu, labels, lung.view(np.uint8)
    else:
        hu_out = np.stack([_resize(s, size, nearest=False) for s in hu])
        labels_out = np.stack([_resize(s, size, nearest=True) for s in labels])
        lung_out = np.stack([_resize(s.astype(np.uint8), size, nearest=True) for s in lung])
    return StudyResult(
        hu=hu_out,
        lesions=masks.labels_to_channels(labels_out, num_classes),
        lung=lung_out,
        positions=read.positions,
        slice_keys=read.keys,
        spacing_mm=out_spacing,
        annotated=annotated,
        pre_windowed=read.pre_windowed,
        skipped=read.skipped,
        warnings=read.warnings,
    )


def encode_study(study: Study, pid: str, result: StudyResult, classes, key: bytes) -> EncodedStudy:
    """The study's slices as serialized `tf.train.Example`s (`data_tools.features`) and
    their manifest entries; identified by pseudonyms only (`pid`: the patient's)."""
    from data_tools.features import encode_example, slice_fields

    sid = pseudonym("S", study.series_key, key)
    examples, entries = [], []
    for z in range(result.hu.shape[0]):
        fields = slice_fields(
            result.hu[z],
            result.lesions[z],
            result.lung[z],
            slice_index=z,
            position_mm=result.positions[z],
            spacing_mm=result.spacing_mm,
            slice_id=pseudonym("I", f"{study.series_key}/{result.slice_keys[z]}", key),
            series_id=sid,
            patient_id=pid,
            diagnosis=study.diagnosis,
            severity=study.severity,
            annotated=result.annotated,
            pre_windowed=result.pre_windowed,
        )
        examples.append(encode_example(fields))
        lesion_pixels = _channel_counts(result.lesions[z])
        entries.append(
            {
                "patient": pid,
                "series": sid,
                "index": z,
                "label": int(any(lesion_pixels)),
                "annotated": bool(result.annotated),
                "lung_pixels": int(np.count_nonzero(result.lung[z])),
                "lesion_pixels": lesion_pixels,
            }
        )
    return EncodedStudy(
        entries,
        sid,
        result.spacing_mm,
        result.annotated,
        result.skipped,
        examples=examples,
        warnings=result.warnings,
    )


def _channel_counts(lesions: np.ndarray) -> list[int]:
    """Pixels of each channel of one slice's 0/1 lesion masks [H, W, C]: OpenCV's sum of
    each channel (0.03 ms at 512x512 with 3 channels; NumPy's count of each strided
    channel took 0.27 ms, a sum over the interleaved channels 5 ms)."""
    channels = lesions.shape[-1]
    if 1 <= channels <= 4:  # an OpenCV scalar holds four
        return [int(v) for v in cv2.sumElems(lesions)[:channels]]
    return [int(np.count_nonzero(lesions[..., c])) for c in range(channels)]
