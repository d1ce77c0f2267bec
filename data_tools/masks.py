"""Lesion masks: NIfTI label volumes, per-slice PNGs and DICOM SEG, as label maps.

Every reader returns labels in the class order of the conversion (0 background, i + 1 for
``classes[i]``), on the image's own grid:

- NIfTI: mapped through both affines (mask voxel -> RAS -> LPS -> series voxel), so a mask
  stored in any orientation lines up with the DICOM series; a mask that does not cover the
  series is rejected.
- PNG: label values 0, 1, 2, ... (COVID-SemiSeg: 1 GGO, 2 consolidation); a binary 0/255
  mask counts as the first class.
- DICOM SEG (highdicom): segments matched to classes by their labels ("ground glass" or
  "GGO", "consolidation", "fibrosis").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.dicom_io import DicomSeries, SkipFile

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SEGMENT_NAMES = {
    "ggo": ("ggo", "ground glass", "ground-glass", "groundglass"),
    "consolidation": ("consolidation",),
    "fibrosis": ("fibrosis", "fibrotic"),
}


def labels_to_channels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label map [...] -> binary channels [..., C] (uint8); label k -> channel k - 1."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape + (num_classes,), np.uint8)
    for c in range(num_classes):
        out[..., c] = labels == c + 1
    return out


def nifti_labels_on_series(path: Path, series: DicomSeries) -> np.ndarray:
    """A NIfTI label volume resampled (nearest) onto a DICOM series grid: [Z, H, W] uint8."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as e:
        raise SkipFile(f"cannot read NIfTI mask ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SkipFile(f"mask must be a 3-D label volume, got shape {data.shape}")
    z, h, w = series.shape
    # mask voxel index of every series voxel (row, column, slice)
    mask_from_series = np.linalg.inv(image.affine) @ RAS_FROM_LPS @ series.affine_lps()
    fast = _axis_aligned(data, mask_from_series, (h, w, z))
    if fast is not None:
        return fast
    rows, cols = np.mgrid[:h, :w]
    out = np.zeros((z, h, w), np.uint8)
    outside = 0
    for k in range(z):
        points = np.stack([rows.ravel(), cols.ravel(), np.full(rows.size, k), np.ones(rows.size)])
        idx = np.rint(mask_from_series @ points)[:3].astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.array(data.shape)[:, None]), axis=0)
        outside += int((~inside).sum())
        values = np.zeros(rows.size, np.uint8)
        values[inside] = data[idx[0, inside], idx[1, inside], idx[2, inside]]
        out[k] = values.reshape(h, w)
    if outside > 0.01 * out.size:
        raise SkipFile(
            f"mask of shape {data.shape} does not cover the series of shape "
            f"{(w, h, z)} (columns, rows, slices) in patient space "
            f"({100 * outside / out.size:.0f} % of voxels outside)"
        )
    return out


def _axis_aligned(data, mask_from_series, series_shape):
    """The resampled labels [Z, H, W] when the two grids differ only by axis order, flips and
    an integer shift (the usual case: masks exported from the same series), else None."""
    a = mask_from_series[:3, :3]
    t = mask_from_series[:3, 3]
    r = np.rint(a)
    if not (np.allclose(a, r, atol=1e-4) and np.allclose(t, np.rint(t), atol=1e-3)):
        return None
    if not ((np.abs(r).sum(0) == 1).all() and (np.abs(r).sum(1) == 1).all()):
        return None
    index, source_axis = [], []
    for axis in range(3):
        p = int(np.nonzero(r[axis])[0][0])
        idx = (r[axis, p] * np.arange(series_shape[p]) + np.rint(t[axis])).astype(np.int64)
        if idx.min() < 0 or idx.max() >= data.shape[axis]:
            return None  # partial coverage: the general path reports it
        index.append(idx)
        source_axis.append(p)
    sub = np.asarray(data[np.ix_(*index)])  # mask axes, each indexed along a series axis
    volume = sub.transpose([source_axis.index(p) for p in range(3)])  # (row, column, slice)
    return np.ascontiguousarray(volume.transpose(2, 0, 1)).astype(np.uint8)


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
        raise SkipFile(f"cannot read mask image ({type(e).__name__}: {e})") from None
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
    """An 8-bit (already windowed) image slice as float32 [H, W] in 0-255."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.float32)
    except Exception as e:
        raise SkipFile(f"cannot read image ({type(e).__name__}: {e})") from None


def seg_labels_on_series(path: Path, series: DicomSeries, classes) -> np.ndarray:
    """A DICOM SEG object's segments as labels on the series grid [Z, H, W] (uint8)."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as e:
        raise SkipFile(f"cannot read DICOM SEG ({type(e).__name__}: {e})") from None
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
