"""Classical lung masks: phantom truth and real CT slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from data_tools.dicom_io import read_hu
from data_tools.lung import lung_mask, otsu_threshold
from data_tools.phantom import make_patient

SEMISEG = Path(__file__).resolve().parents[3] / "shared" / "data" / "covid-semiseg" / "train"


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize(
    "diagnosis, severity",
    [("covid", "severe"), ("healthy", "none"), ("bacterial", "none"), ("viral", "none")],
)
def test_phantom_lungs_dice(diagnosis, severity):
    p = make_patient(8, 128, diagnosis, severity)
    mask = lung_mask(p.hu, p.spacing_mm[:2], lesions=p.lesions)
    assert _dice(mask, p.lung) >= 0.95
    assert not (mask & (p.hu > 300)).any()  # no bone


def test_lesions_count_as_lung():
    p = make_patient(9, 128, "covid", "severe")
    with_lesions = lung_mask(p.hu, p.spacing_mm[:2], lesions=p.lesions)
    assert with_lesions[p.lesions > 0].all()
    channels = np.stack([p.lesions == k for k in (1, 2, 3)], axis=-1)
    np.testing.assert_array_equal(lung_mask(p.hu, p.spacing_mm[:2], lesions=channels), with_lesions)


def test_real_ct_small_slice():
    path = Path(get_testdata_file("CT_small.dcm"))
    hu = read_hu(path)
    spacing = tuple(float(v) for v in pydicom.dcmread(path).PixelSpacing)
    mask = lung_mask(hu, spacing)
    # The slice is cropped around the spine; lung fills its upper corners.
    assert 0.1 < mask.mean() < 0.4
    assert np.median(hu[mask]) < -600
    assert mask[:20, :20].mean() > 0.5 and mask[:20, -20:].mean() > 0.5
    assert not mask[60:, 40:90].any()  # the vertebra and the muscles behind it


def test_real_head_ct_has_almost_no_lung():
    hu = read_hu(Path(get_testdata_file("693_UNCR.dcm")))
    assert lung_mask(hu, (0.48, 0.48)).mean() < 0.01


def test_pre_windowed_slice():
    if not SEMISEG.is_dir():
        pytest.skip(f"COVID-SemiSeg slices not found at {SEMISEG}")
    from PIL import Image

    image = np.asarray(Image.open(SEMISEG / "Imgs" / "0.jpg").convert("L"), np.float32)
    mask = lung_mask(image, pre_windowed=True)
    assert 0.15 < mask.mean() < 0.6
    assert image[mask].mean() < image[~mask].mean()


def test_otsu_threshold_splits_two_levels():
    image = np.concatenate([np.full(100, 40.0), np.full(100, 200.0)])
    assert 40 <= otsu_threshold(image) < 200


def test_opencvs_otsu_splits_as_the_hand_written_one():
    """OpenCV's Otsu threshold puts every pixel in the class the by-hand one did."""
    from tests.data_tools.lung_reference import otsu_threshold as by_hand

    rng = np.random.default_rng(3)
    for low, high in ((20, 60), (30, 180), (90, 100)):
        image = np.concatenate([rng.normal(low, 12, 3000), rng.normal(high, 25, 5000)])
        image = np.clip(np.rint(image), 0, 255).astype(np.float32).reshape(80, 100)
        np.testing.assert_array_equal(image <= otsu_threshold(image), image < by_hand(image))


def _real_and_phantom_inputs():
    """(name, image, spacing, pre_windowed): phantom volumes of every diagnosis, pydicom's
    real CTs (explicit_VR-UN.dcm: lungs outside the body's largest component), and a
    COVID-SemiSeg slice when the data is there."""
    for i, (diagnosis, severity) in enumerate(
        (("covid", "severe"), ("healthy", "none"), ("bacterial", "none"), ("viral", "none"))
    ):
        p = make_patient(seed=i, size=128, diagnosis=diagnosis, severity=severity, n_slices=12)
        yield f"phantom {diagnosis}", p.hu, p.spacing_mm[:2], False
    for name in ("CT_small.dcm", "693_UNCR.dcm", "explicit_VR-UN.dcm"):
        path = Path(get_testdata_file(name))
        spacing = tuple(float(v) for v in pydicom.dcmread(path).PixelSpacing)
        yield name, read_hu(path), spacing, False
    if SEMISEG.is_dir():
        from PIL import Image

        for name in ("2.jpg", "20.jpg"):  # the two whose lungs lie outside the body
            image = np.asarray(Image.open(SEMISEG / "Imgs" / name).convert("L"), np.float32)
            yield name, image, (1.0, 1.0), True


def test_masks_equal_the_reference_implementations():
    """The fast mask (OpenCV, cropping, per-region sums) is the scipy one it replaced,
    pixel for pixel (issue 22 allows Dice 0.99)."""
    from tests.data_tools.lung_reference import reference_lung_mask

    for name, image, spacing, pre_windowed in _real_and_phantom_inputs():
        ours = lung_mask(image, spacing, pre_windowed=pre_windowed)
        expected = reference_lung_mask(image, spacing, pre_windowed)
        assert np.array_equal(ours, expected), name
        if name == "explicit_VR-UN.dcm":
            assert ours.sum() > 10_000  # its lungs are found


def test_shape_checks():
    with pytest.raises(ValueError, match="expected"):
        lung_mask(np.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError, match="lesions shape"):
        lung_mask(np.zeros((8, 8)), lesions=np.zeros((4, 4)))


@pytest.mark.parametrize("radius", [1, 2, 5, 6, 9, 14])
@pytest.mark.parametrize("erode", [False, True])
def test_octagon_growth_equals_alternating_cross_and_square_steps(radius, erode):
    from scipy import ndimage

    from data_tools.lung import _CROSS, _grow

    square = np.ones((3, 3), bool)

    rng = np.random.default_rng(radius)
    mask = np.pad(ndimage.binary_opening(rng.random((40, 50)) < 0.55), 8)
    op = ndimage.binary_erosion if erode else ndimage.binary_dilation
    expected = mask
    for i in range(radius):  # the definition: one 3x3 step at a time, cross then square
        expected = op(expected, structure=_CROSS if i % 2 == 0 else square)
    np.testing.assert_array_equal(_grow(mask, radius, erode), expected)


def _random_masks():
    """Blobs with holes, some touching the image border, and an empty and a full mask."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    masks = [ndimage.binary_opening(rng.random((45, 61)) < p) for p in (0.4, 0.55, 0.7)]
    return [*masks, np.zeros((9, 7), bool), np.ones((9, 7), bool)]


def test_opencv_pieces_equal_scipys():
    """The lung mask's OpenCV pieces give scipy's results exactly: hole filling (4-connected
    background), 4-connected labels and their areas, and the octagon closing."""
    from scipy import ndimage

    from data_tools.lung import _close, _fill_holes, _label
    from tests.data_tools.lung_reference import _grow  # scipy's steps

    for mask in _random_masks():
        np.testing.assert_array_equal(_fill_holes(mask), ndimage.binary_fill_holes(mask))
        labels, areas = _label(mask)
        expected, n = ndimage.label(mask)
        assert len(areas) == n + 1 and areas[0] == (~mask).sum()
        assert sorted(areas[1:]) == sorted(np.bincount(expected.ravel())[1:])
        for k in range(1, n + 1):  # the same components, whatever their numbers
            assert len(np.unique(labels[expected == k])) == 1
        if mask.any() and not mask.all():
            for radius in (1, 4, 7):
                pad = radius + 1  # the reference: scipy's steps on a padded copy
                padded = np.pad(mask, pad)
                closed = _grow(_grow(padded, radius, False), radius, True)[pad:-pad, pad:-pad]
                np.testing.assert_array_equal(_close(mask, radius), mask | closed)


def test_3d_components_equal_scipys():
    """Step 3 (cc3d's 6-connected labels) keeps what scipy.ndimage.label's components
    keep: the largest and the next when it is at least `min_fraction` of it."""
    from scipy import ndimage

    from data_tools.lung import _largest_3d

    rng = np.random.default_rng(3)
    for p, min_fraction in ((0.3, 0.1), (0.45, 0.1), (0.45, 0.0), (0.6, 0.5)):
        inside = np.pad(
            ndimage.binary_opening(rng.random((6, 30, 40)) < p), ((0, 0), (3, 3), (3, 3))
        )
        labels, n = ndimage.label(inside)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        order = np.argsort(sizes)[::-1][:2]
        kept = [k for k in order if k and sizes[k] >= min_fraction * sizes[order[0]]]
        np.testing.assert_array_equal(_largest_3d(inside, min_fraction), np.isin(labels, kept))


def test_masked_means_are_numpys_to_the_last_bit():
    """The region means that decide lung-like air: OpenCV's masked mean for integer images
    gives NumPy's sum / count exactly, also where it equals the threshold."""
    from data_tools.lung import _masked_mean

    rng = np.random.default_rng(5)
    for dtype in (np.uint8, np.int16, np.uint16, np.float32):
        for _ in range(50):
            if np.dtype(dtype).kind == "f":
                image = rng.uniform(-3000, 3000, (40, 50)).astype(dtype)
            else:
                info = np.iinfo(dtype)
                image = rng.integers(info.min, info.max, (40, 50), endpoint=True).astype(dtype)
            mask = rng.random((40, 50)) < rng.random()
            expected = image[mask].sum(dtype=np.float64) / mask.sum() if mask.any() else 0.0
            assert _masked_mean(image, mask.view(np.uint8)) == expected
    image = np.full((512, 512), -950, np.int16)
    image[0, :2] = (-949, -951)
    assert _masked_mean(image, np.ones(image.shape, np.uint8)) == -950.0
    strided = np.arange(100, dtype=np.int16).reshape(10, 10)[:, ::2]  # a view, not contiguous
    assert _masked_mean(strided, np.ones((10, 5), np.uint8)) == strided.mean()


def _largest_by_scipy(mask):
    from scipy import ndimage

    labels, n = ndimage.label(mask)  # 4-connected, numbered in scan order
    if not n:
        return mask
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def test_largest_component_by_flood_fill_or_labels_is_scipys():
    """The centre's component is taken only when it holds more than half the pixels;
    otherwise (a larger one elsewhere, a tie, background at the centre) the labels
    decide, the first of equal components in scan order, as scipy numbers them."""
    from data_tools.lung import _largest_component

    cases = [*_random_masks(), np.zeros((8, 8), bool)]
    half = np.zeros((9, 10), bool)
    half[:, :4] = half[:, 6:] = True  # two equal halves, the centre between them
    tie = np.zeros((9, 9), bool)
    tie[2:7, 0:3] = tie[2:7, 4:7] = True  # the centre's component ties with the first
    big_elsewhere = np.zeros((20, 20), bool)
    big_elsewhere[9:12, 9:12] = True
    big_elsewhere[0:6, 0:20] = True
    cases += [half, tie, big_elsewhere, ~big_elsewhere]
    rng = np.random.default_rng(11)
    cases += [rng.random((33, 35)) < p for p in (0.5, 0.6, 0.75, 0.9)]
    for mask in cases:
        np.testing.assert_array_equal(_largest_component(mask), _largest_by_scipy(mask))


def test_air_outside_the_body_in_one_or_several_regions():
    """Air outside the body: one region (the flood fill's case) or several (labelled),
    lung-like or as dark as outside air; the masks are the reference's either way."""
    from tests.data_tools.lung_reference import reference_lung_mask

    yy, xx = np.mgrid[:64, :64]
    body = ((yy - 32) / 26) ** 2 + ((xx - 32) / 20) ** 2 <= 1
    lungs = (((yy - 30) / 12) ** 2 + ((xx - 23) / 6) ** 2 <= 1) | (
        ((yy - 30) / 12) ** 2 + ((xx - 41) / 6) ** 2 <= 1
    )
    base = np.where(body, 40.0, -1000.0)
    base[lungs] = -850.0
    separate = base.copy()
    separate[:, 58:60] = 200.0  # a table edge cuts off a strip of outside air
    lung_like = separate.copy()
    lung_like[:, 60:] = -700.0  # ... and that strip is not as dark as air
    for image in (base, separate, lung_like):
        volume = np.stack([image, image])
        np.testing.assert_array_equal(lung_mask(volume), reference_lung_mask(volume))
    assert lung_mask(lung_like[None])[0][:, 60:].all()  # the lung-like strip is kept
    assert not lung_mask(separate[None])[0][:, 60:].any()


def test_areas_are_exact_beyond_float32s_integers():
    """Component sizes over 2^24 voxels (a thin-slice volume's lungs) are counted exactly:
    OpenCV's histogram counts in float32."""
    from data_tools.lung import _areas

    labels = np.ones((2**12 + 1, 2**12), np.uint8)
    labels[0, :3] = 0
    areas = _areas(labels, 2)
    assert areas.tolist() == [3, labels.size - 3]
