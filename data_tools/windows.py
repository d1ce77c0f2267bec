"""The Hounsfield window that makes HU slices look like a set of 8-bit windowed slices.

A model trained on already-windowed images (COVID-SemiSeg's JPEGs) sees grey levels, not
Hounsfield units. To run it on a CT study, the study must be windowed as those images
were; their window is not recorded, so it is estimated from two tissues every chest
slice shows: aerated lung and soft tissue (muscle, heart, vessels). Their histogram peaks
in the 8-bit images and in real HU CT fix the linear map grey = a * HU + b, hence the
window (the HU values of grey 0 and 255).

    python -m data_tools.windows --images ../shared/data/covid-semiseg/train/Imgs

Research use, not a medical device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# Where to look for each tissue's peak: (low, high) in grey levels and in HU.
GREY_RANGES = {"lung": (5, 128), "soft_tissue": (128, 250)}
HU_RANGES = {"lung": (-950, -600), "soft_tissue": (0, 100)}
HU_BIN = 10.0


def _peak(values: np.ndarray, low: float, high: float, bin_width: float) -> float:
    """The centre of the fullest bin of `values` in [low, high), after light smoothing."""
    from scipy.ndimage import gaussian_filter1d

    edges = np.arange(low, high + bin_width, bin_width)
    counts, _ = np.histogram(values, bins=edges)
    if counts.sum() == 0:
        raise ValueError(f"no value between {low} and {high}")
    smooth = gaussian_filter1d(counts.astype(float), 2.0)
    i = int(np.argmax(smooth))
    return float(0.5 * (edges[i] + edges[i + 1]))


def grey_peaks(images, names=None) -> dict:
    """Lung and soft-tissue grey levels of 8-bit slices: the median over slices of each
    slice's peak (slices differ in how much of each tissue they show). `names`: the
    images' names, for the error of one without a tissue."""
    peaks = {name: [] for name in GREY_RANGES}
    for i, image in enumerate(images):
        values = np.asarray(image, np.float32).ravel()
        for name, (low, high) in GREY_RANGES.items():
            try:
                peaks[name].append(_peak(values, low, high, 1.0))
            except ValueError:
                which = names[i] if names else f"image {i}"
                raise ValueError(
                    f"{which}: no grey level of {name.replace('_', ' ')} ({low}-{high}): "
                    "not a windowed chest CT slice"
                ) from None
    return {name: float(np.median(v)) for name, v in peaks.items()}


def hu_peaks(hu) -> dict:
    """Lung and soft-tissue peaks (HU) of CT slices in Hounsfield units."""
    values = np.asarray(hu, np.float32).ravel()
    peaks = {}
    for name, (low, high) in HU_RANGES.items():
        try:
            peaks[name] = _peak(values, low, high, HU_BIN)
        except ValueError:
            raise ValueError(
                f"no {name.replace('_', ' ')} ({low} to {high} HU): not a chest CT slice"
            ) from None
    return peaks


def window_from_peaks(grey: dict, hu: dict) -> tuple[float, float]:
    """(low, high): the HU values that the linear map through both tissues' peaks sends
    to grey levels 0 and 255."""
    gain = (grey["soft_tissue"] - grey["lung"]) / (hu["soft_tissue"] - hu["lung"])
    if gain <= 0:
        raise ValueError(f"soft tissue is not brighter than lung: grey {grey}, HU {hu}")
    low = hu["lung"] - grey["lung"] / gain
    return float(low), float(low + 255.0 / gain)


def apply_window(hu, window) -> np.ndarray:
    """HU -> 8-bit grey levels (float) through `window`, as `HUWindow` then x 255."""
    low, high = window
    return np.clip((np.asarray(hu, np.float32) - low) / (high - low), 0.0, 1.0) * 255.0


def _read_images(folder: Path) -> tuple[list, list[str]]:
    """The folder's slices and their names; an unreadable one is named."""
    from data_tools.dicom_io import SkipFile
    from data_tools.masks import read_image_slice

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise ValueError(f"{folder} holds no .png/.jpg images")
    images = []
    for path in paths:
        try:
            images.append(read_image_slice(path))
        except (SkipFile, OSError, ValueError) as e:
            raise ValueError(f"{path.name}: {e}") from None
    return images, [p.name for p in paths]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.windows", description=__doc__)
    parser.add_argument("--images", type=Path, required=True, help="folder of 8-bit slices")
    parser.add_argument(
        "--ct", type=Path, help="a DICOM CT file in HU (default: pydicom's CT_small.dcm)"
    )
    args = parser.parse_args(argv)
    from data_tools.dicom_io import SkipFile, read_hu

    try:
        grey = grey_peaks(*_read_images(args.images))
    except (OSError, ValueError) as e:
        print(f"error: --images {args.images}: {e}", file=sys.stderr)
        return 2
    if args.ct is None:
        from pydicom.data import get_testdata_file

        args.ct = Path(get_testdata_file("CT_small.dcm"))
    try:
        hu = hu_peaks(read_hu(args.ct))
        window = window_from_peaks(grey, hu)
    except (OSError, ValueError, SkipFile) as e:
        print(f"error: --ct {args.ct}: {e}", file=sys.stderr)
        return 2
    print(f"grey-level peaks of {args.images}: lung {grey['lung']:.0f}, "
          f"soft tissue {grey['soft_tissue']:.0f}")  # fmt: skip
    print(f"HU peaks of {args.ct.name}: lung {hu['lung']:.0f}, soft tissue {hu['soft_tissue']:.0f}")
    print(f"window: [{window[0]:.0f}, {window[1]:.0f}] HU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
