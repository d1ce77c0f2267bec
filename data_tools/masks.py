"""Lesion masks: NIfTI label volumes, per-slice PNGs and DICOM SEG, as label maps.

Every reader returns labels in the class order of the conversion (0 background, i + 1 for
``classes[i]``), on the image's own grid:

- NIfTI: mapped through both affines (mask voxel -> RAS -> LPS -> series voxel, slice by
  slice), so a mask stored in any axis order and direction lines up with the DICOM
  series; a mask on another grid (other voxel sizes, oblique, partial) is refused.
- PNG: label values 0, 1, 2, ... (COVID-SemiSeg: 1 GGO, 2 consolidation); a binary 0/255
  mask counts as the first class.
- DICOM SEG (highdicom): segments matched to classes by their labels ("ground glass" or
  "GGO", "consolidation", "fibrosis").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np

from data_tools.dicom_io import DicomSeries, SkipFile, one_line

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SEGMENT_NAMES = {
    "ggo": ("ggo", "ground glass", "ground-glass", "groundglass"),
    "consolidation": ("consolidation",),
    "fibrosis": ("fibrosis", "fibrotic"),
}


def labels_to_channels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label map [...] -> binary channels [..., C] (uint8); label k -> channel k - 1."""
    labels = np.asarray(labels)
    if num_classes < 1:
        return np.zeros(labels.shape + (0,), np.uint8)
    planes = [(labels == c + 1).view(np.uint8) for c in range(num_classes)]
    if labels.ndim < 1 or labels.size == 0 or num_classes > 512:  # beyond OpenCV's merge
        return np.stack(planes, axis=-1)
    # OpenCV interleaves whole planes: 0.05 ms a 512x512 slice with 3 classes (NumPy's
    # stack along the last axis, strided writes, 0.28; a broadcast comparison ten times that).
    width = labels.shape[-1]
    merged = cv2.merge([p.reshape(-1, width) for p in planes])
    return merged.reshape(labels.shape + (num_classes,))


def load_label_header(path: Path):
    """(nibabel image, 3-D shape) of a NIfTI label volume, without reading its voxels."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape = tuple(int(n) for n in image.shape)
    except Exception as e:
        raise SkipFile(f"cannot read NIfTI mask ({type(e).__name__}: {one_line(e)})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise SkipFile(f"mask must be a 3-D label volume, got shape {shape}")
    return image, shape


def _slice_maps(image, series: DicomSeries) -> np.ndarray:
    """[Z, 3, 3]: for slice k of the series, mask voxel coordinates = M[k] @ (row, col, 1).

    Built from each slice's own ImagePositionPatient, so a series with a gap (a missing
    file) still lines up slice by slice."""
    lps = series.affine_lps()
    mask_from_lps = np.linalg.inv(image.affine) @ RAS_FROM_LPS
    maps = []
    for header in series.slices:
        m = mask_from_lps @ np.column_stack([lps[:, 0], lps[:, 1], [*header.position, 1.0]])
        maps.append(m[:3])
    return np.stack(maps)


@dataclasses.dataclass
class MaskFit:
    """How a NIfTI mask's voxel grid lies on a series' grid (`fit_on_series`).

    status: "exact" (the same voxels, in any axis order and direction), "cropped" (the
    series' voxels and more: mask planes beyond the series, or in a gap of its slice
    positions, that no series voxel lands on) or "none" (another grid: `reason` says
    how). rows, cols, planes: on the "exact" and "cropped" fits, the mask axis and
    indices of the series' rows and columns, and the mask axis and index of each slice.
    """

    status: str
    reason: str = ""
    rows: tuple | None = None  # (mask axis, indices [H])
    cols: tuple | None = None  # (mask axis, indices [W])
    planes: tuple | None = None  # (mask axis, indices [Z])


def _fit(maps: np.ndarray, shape, series_shape, tol: float) -> MaskFit:
    z, h, w = series_shape
    grid = f"mask grid {shape}, series {(w, h, z)} (columns, rows, slices)"
    a, t = maps[:, :, :2], maps[:, :, 2]  # in-plane directions, each slice's origin
    r = np.rint(a[0])
    # Over the whole slice an error of the direction adds up: bound it at the far edge.
    bent = np.abs(a - r).max(axis=0) * np.array([h - 1, w - 1])
    on_voxels = np.allclose(t, np.rint(t), atol=tol) and (bent <= tol).all()
    in_plane = (np.abs(r).sum(0) == 1).all() and (np.abs(r).sum(1) <= 1).all()
    if not (on_voxels and in_plane):
        return MaskFit("none", f"{grid}: the voxels lie elsewhere in patient space")
    t = np.rint(t).astype(np.int64)
    row_axis, col_axis = int(np.nonzero(r[:, 0])[0][0]), int(np.nonzero(r[:, 1])[0][0])
    plane_axis = 3 - row_axis - col_axis
    if (t[:, row_axis] != t[0, row_axis]).any() or (t[:, col_axis] != t[0, col_axis]).any():
        return MaskFit("none", f"{grid}: the slices are shifted against the mask's")
    rows = (r[row_axis, 0] * np.arange(h) + t[0, row_axis]).astype(np.int64)
    cols = (r[col_axis, 1] * np.arange(w) + t[0, col_axis]).astype(np.int64)
    planes = t[:, plane_axis]
    for axis, idx in ((row_axis, rows), (col_axis, cols), (plane_axis, planes)):
        if idx.min() < 0 or idx.max() >= shape[axis]:
            return MaskFit("none", f"{grid}: the mask covers only part of the series")
    if len(np.unique(planes)) != z:
        return MaskFit("none", f"{grid}: several series slices fall on one mask slice")
    spanned = int(planes.max() - planes.min() + 1)
    beyond = shape[row_axis] - h + shape[col_axis] - w + shape[plane_axis] - spanned
    in_gaps = spanned - z
    fit = MaskFit(
        "exact", rows=(row_axis, rows), cols=(col_axis, cols), planes=(plane_axis, planes)
    )
    parts = [f"{beyond} mask plane(s) beyond the series"] if beyond else []
    parts += [f"{in_gaps} in its gaps (no slice there)"] if in_gaps else []
    if parts:
        fit.status, fit.reason = "cropped", f"{grid}: {', '.join(parts)}"
    return fit


def fit_on_series(header, series: DicomSeries, tol: float = 0.05) -> MaskFit:
    """Compares a NIfTI mask's grid (`load_label_header`: shape and affine, no voxels)
    with a series'.

    The mask fits when every series voxel lands on a mask voxel, within `tol` voxels: the
    grids differ by an axis permutation, flips and an integer shift.
    """
    image, shape = header
    return _fit(_slice_maps(image, series), shape, series.shape, tol)


def nifti_labels_on_series(path: Path, series: DicomSeries, fit: MaskFit | None = None):
    """A NIfTI label volume on a DICOM series grid: [Z, H, W] uint8.

    `fit` (`fit_on_series`; computed when not given) says which mask voxel each series
    voxel is; a mask on another grid is refused, not resampled.

    Raises:
        SkipFile: unreadable, not 3-D, or on another grid (the reason says how).
    """
    image, shape = load_label_header(path)
    fit = fit or fit_on_series((image, shape), series)
    if fit.status == "none":
        raise SkipFile(f"mask {path.name}: {fit.reason}")
    try:
        data = np.asanyarray(image.dataobj).reshape(shape)
    except Exception as e:
        raise SkipFile(f"cannot read NIfTI mask ({type(e).__name__}: {one_line(e)})") from None
    return _aligned_labels(data, fit)


def _aligned_labels(data: np.ndarray, fit: MaskFit) -> np.ndarray:
    """The mask voxels a `fit_on_series` fit names, as [Z, H, W] uint8."""
    index = [None, None, None]
    for axis, idx in (fit.rows, fit.cols, fit.planes):
        index[axis] = _as_slice(np.asarray(idx))
    if all(isinstance(i, slice) for i in index):  # a view: no copy before the last one
        sub = np.asarray(data)[tuple(index)]
    else:
        index = [
            np.arange(data.shape[a])[i] if isinstance(i, slice) else i for a, i in enumerate(index)
        ]
        sub = np.asarray(data[np.ix_(*index)])  # mask axis order
    order = [fit.planes[0], fit.rows[0], fit.cols[0]]
    return np.ascontiguousarray(sub.transpose(order), dtype=np.uint8)


def _as_slice(idx: np.ndarray):
    """Indices in steps of one sign and size as a slice (a view), else the indices."""
    if len(idx) < 2:
        return slice(int(idx[0]), int(idx[0]) + 1) if len(idx) else idx
    step = int(idx[1] - idx[0])
    if step == 0 or not np.array_equal(np.diff(idx), np.full(len(idx) - 1, step)):
        return idx
    stop = int(idx[-1]) + step
    return slice(int(idx[0]), None if stop < 0 else stop, step)


def read_png_labels(path: Path, num_classes: int, binary_class: int | None = None) -> np.ndarray:
    """A per-slice PNG mask as labels [H, W] uint8 (0 background, 1..`num_classes`).

    A binary 0/255 mask (lesion or not, as Inf-Net's infection masks) says nothing about
    the lesion type: it becomes class 1 when there is one class, class `binary_class`
    (1-based) when that is given, and is refused (`SkipFile`) otherwise, rather than
    silently labelling every lesion pixel as the first class.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            labels = np.array(im if im.mode in ("P", "L", "I", "I;16") else im.convert("L"))
    except Exception as e:
        raise SkipFile(f"cannot read mask image ({type(e).__name__}: {one_line(e)})") from None
    if labels.ndim != 2:
        raise SkipFile(f"mask must be a single-channel image, got shape {labels.shape}")
    values = np.unique(labels)
    if values.max(initial=0) > num_classes:
        if set(values.tolist()) <= {0, 255}:
            if num_classes == 1 or binary_class is not None:
                return ((labels == 255) * (binary_class or 1)).astype(np.uint8)
            raise SkipFile(
                f"binary 0/255 mask (lesion or background) cannot tell the {num_classes} "
                "lesion classes apart; convert such data with one class (e.g. --classes "
                f"infection) or give masks with labels 0 = background, 1..{num_classes}"
            )
        raise SkipFile(
            f"mask values {values[:8].tolist()} exceed the {num_classes} classes (expected "
            f"0 = background, 1..{num_classes})"
        )
    return labels.astype(np.uint8)


def read_image_slice(path: Path) -> np.ndarray:
    """An 8-bit (already windowed) image slice as float32 [H, W] in 0-255.

    Raises:
        SkipFile: unreadable; more than 8 bits a pixel (its window unknown); a colour
            image; a mask, label map or blank image (a handful of grey levels, or two of
            them holding 95 % of the pixels).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode.startswith(("I", "F")):
                # 16-bit, 32-bit and float pixels: "L" clips them at 255 (a slice scaled
                # to 16 bits became all white), and their window is unknown.
                raise SkipFile(
                    f"a {im.mode} image (more than 8 bits a pixel): the slices must be "
                    "windowed 8-bit images (grey levels 0-255); give CT in HU as DICOM or "
                    "NIfTI, or window the images to 8 bits first"
                )
            colour = _colour_spread(im)
            grey = np.asarray(im.convert("L"), dtype=np.float32)
    except SkipFile:
        raise
    except Exception as e:
        raise SkipFile(f"cannot read image ({type(e).__name__}: {one_line(e)})") from None
    problem = _not_a_slice(grey, colour)
    if problem:
        raise SkipFile(problem)
    return grey


# A grey slice saved as RGB (a JPEG's too) has its channels within a grey level of each
# other; a colour map, or a screenshot with coloured overlays, far more.
MAX_COLOUR_SPREAD = 6.0
# A windowed CT slice has hundreds of grey levels, none two of them holding more than 40 %
# of its pixels (COVID-SemiSeg's 1,650: at most 38 %); a mask or label map a handful,
# or, saved as JPEG, two levels and their ringing (98-99.7 % at two levels).
MAX_MASK_LEVELS = 8
MASK_TWO_LEVELS = 0.95


def _not_a_slice(grey: np.ndarray, colour: float) -> str | None:
    """Why an 8-bit image is no windowed CT slice (a colour image, a mask, a label map, a
    blank image), or None."""
    if colour > MAX_COLOUR_SPREAD:
        return (
            f"a colour image (its red, green and blue {colour:.1f} grey levels apart on "
            "average): the slices must be grey CT images, not a colour map or a screenshot"
        )
    counts = np.bincount(grey.astype(np.uint8).ravel(), minlength=256)
    levels = int(np.count_nonzero(counts))
    two = float(np.sort(counts)[-2:].sum()) / max(grey.size, 1)
    what = "a mask, label or blank image, not a CT slice"
    if levels <= MAX_MASK_LEVELS:
        return f"{levels} grey level{'s' if levels > 1 else ''}: {what}"
    if two >= MASK_TWO_LEVELS:
        return f"{100 * two:.0f} % of the pixels at two grey levels: {what}"
    return None


def _colour_spread(im) -> float:
    """Mean over pixels of the largest difference between an image's red, green and blue
    (0 for an image without colour bands)."""
    if not im.mode.startswith(("RGB", "P", "CMYK", "YCbCr")):
        return 0.0
    rgb = np.asarray(im.convert("RGB"), np.float32)
    return float((rgb.max(-1) - rgb.min(-1)).mean())


def seg_labels_on_series(path: Path, series: DicomSeries, classes) -> np.ndarray:
    """A DICOM SEG object's segments as labels on the series grid [Z, H, W] (uint8)."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as e:
        raise SkipFile(f"cannot read DICOM SEG ({type(e).__name__}: {one_line(e)})") from None
    numbers = {}
    for segment in seg.SegmentSequence:
        label = str(getattr(segment, "SegmentLabel", "")).lower()
        for cls, names in _SEGMENT_NAMES.items():
            if cls in classes and any(n in label for n in names):
                numbers[int(segment.SegmentNumber)] = list(classes).index(cls) + 1
    if not numbers:
        raise SkipFile(f"no segment of {path.name} names one of the classes {list(classes)}")
    uids = [s.sop_uid for s in series.slices]
    # (study, series, instance) UIDs of the images the segmentation was drawn on
    referenced = {sop for _, _, sop in seg.get_source_image_uids()}
    usable = [u for u in uids if u in referenced]
    out = np.zeros(series.shape, np.uint8)
    if not usable:
        raise SkipFile("DICOM SEG references none of the series' instances")
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=usable,
        segment_numbers=sorted(numbers),
        assert_missing_frames_are_empty=True,
    )
    index = {u: i for i, u in enumerate(uids)}
    for n, uid in enumerate(usable):
        for s, number in enumerate(sorted(numbers)):
            out[index[uid]][pixels[n, :, :, s] > 0] = numbers[number]
    return out
