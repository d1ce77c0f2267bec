"""Prediction on a folder of windowed 2-D slices (PNG/JPEG), as COVID-SemiSeg ships them.

`tfcovseg.predict` comes here when ``--input`` is a folder of .png/.jpg/.jpeg images (and
no DICOM). Every image is one slice of grey levels 0-255, already windowed; it is segmented
whole through the model's ``image`` signatures (``serve_image``; resized to the model's
input and back). Into OUT, named like the inputs (``<stem>.png``) so that any evaluator,
Inf-Net's included, can score them:

- ``labels/``: 0 background, 1.. the classes in the model's order (the most probable class
  at or above ``--mask-threshold``);
- ``probability_<class>/``: 8-bit probabilities (round(255 p));
- ``probability_infection/``: 8-bit probability of any lesion (the highest class's), the
  "infection" maps of Inf-Net's evaluation;
With ``intensity="match"`` (the default) each image's grey levels are first mapped
linearly so that its 5th and 95th percentiles land on those of the model's training slices
(the export's ``grey_levels``): slices windowed another way than the training images are
otherwise read off-scale. ``"as-is"`` feeds the grey levels unchanged.

- ``report.json`` / ``report.html``: per slice the lesion area per class in pixels and in
  % of the lung (the image's lung mask, Otsu's threshold, lesions added), the slice's
  COVID-19 probability (or, for a model without a slice classifier, its highest lesion
  probability), a montage of the slices with the most lesion, what was skipped.

2-D slices carry no pixel spacing and no volume: no mL, no severity grade. Research use,
not a medical device.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import html
import time
from pathlib import Path

import numpy as np

from data_tools.conversion.discovery import IMAGE_SUFFIXES
from data_tools.dicom_io import SkipFile
from data_tools.files import atomic_directory, atomic_write_json, atomic_write_text
from data_tools.lung import lung_mask
from data_tools.masks import read_image_slice
from tfcovseg.constants import DISCLAIMER, INTENSITY_MODES
from tfcovseg.data.intensity import MATCH_PERCENTILES, intensity_scale, match_to_scale
from tfcovseg.evaluation.verdict import slice_score, slice_score_name

NOT_GRADED = "2-D image slices: no pixel spacing or volume, so no mL and no severity grade"


class ImageInputError(Exception):
    """The image folder cannot be predicted on; the message says why."""


def is_image_folder(path: Path) -> bool:
    """A folder holding images and nothing that may be slice data of another kind: no
    NIfTI, no DICOM file (by its "DICM" preamble, whatever its name: DICOM files are often
    named by UID or have no suffix)."""
    if not path.is_dir():
        return False
    found = False
    for p in path.rglob("*"):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            found = True
        elif p.name.endswith((".nii", ".nii.gz")) or _has_dicom_preamble(p):
            return False
    return found


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".ima")


@dataclasses.dataclass
class Slice:
    name: str  # the output file name: the input's stem + .png
    source: str  # the input's path relative to the folder
    shape: tuple[int, int]
    path: Path | None = None  # read again when predicted: one batch in memory at a time
    pixels: np.ndarray | None = None  # or held: float32 [H, W] in 0-255

    def grey(self) -> np.ndarray:
        """float32 [H, W] grey levels in 0-255."""
        if self.pixels is not None:
            return self.pixels
        try:
            return read_image_slice(self.path)
        except SkipFile as e:  # changed since the folder was listed
            raise ImageInputError(f"{self.source} cannot be read any more: {e}") from None


def image_files_digest(folder: Path) -> str:
    """SHA-256 of the names, sizes and modification times of the files under `folder`
    (not their pixels: a rerun checks it before reading any image)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        name = path.relative_to(folder).as_posix().encode("utf-8", "surrogateescape")
        h.update(name + f"\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def read_image_folder(folder: Path) -> tuple[list[Slice], list]:
    """The folder's images (sorted by path) and the (file, reason) of those skipped.

    Each image is decoded once here (to skip those that cannot be) and again when it is
    predicted, so that a folder of thousands of slices is never held in memory.
    A slice dataset's folder (``Imgs/`` beside ``GT/`` masks, as `data_tools.convert`
    reads it) contributes its ``Imgs/`` only."""
    slices, skipped, names, outside = [], [], {}, {}
    root = folder / "Imgs" if (folder / "Imgs").is_dir() else folder
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.name.startswith("."):
            continue
        if root not in path.parents:  # GT/ masks and the like: one entry per folder
            top = rel.split("/")[0] + ("/" if "/" in rel else "")
            outside[top] = outside.get(top, 0) + 1
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((rel, "not a .png/.jpg/.jpeg image, ignored"))
            continue
        name = f"{path.stem}.png"
        if name in names:
            skipped.append((rel, f"its output name {name} is taken by {names[name]}"))
            continue
        try:
            grey = read_image_slice(path)
        except SkipFile as e:
            skipped.append((rel, str(e)))
            continue
        names[name] = rel
        slices.append(Slice(name, rel, tuple(grey.shape), path=path))
    skipped += [
        (f"{top} ({n} file{'s' if n > 1 else ''})", "outside Imgs/ of a slice dataset, ignored")
        for top, n in outside.items()
    ]
    if not slices:
        reasons = "; ".join(f"{f}: {r}" for f, r in skipped[:5]) or "no files"
        raise ImageInputError(f"no readable .png/.jpg image in {folder} ({reasons})")
    return slices, skipped


def label_map(masks: np.ndarray, mask_threshold: float) -> np.ndarray:
    """[..., H, W] uint8 from probabilities [..., H, W, C]: the most probable class among
    those at or above the threshold, 0 where none is."""
    on = masks >= mask_threshold
    labels = (np.argmax(np.where(on, masks, -1.0), axis=-1) + 1).astype(np.uint8)
    labels[~on.any(-1)] = 0
    return labels


def _by_shape(slices: list[Slice], batch_size: int):
    """Batches of indices of equal-shape slices, in the folder's order."""
    batch = []
    for i, s in enumerate(slices):
        if batch and (len(batch) == batch_size or slices[batch[0]].shape != s.shape):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")


def _slice_entry(s: Slice, grey, probs: np.ndarray, prob: float, labels, classes) -> dict:
    lesion = labels > 0
    lung = lung_mask(grey, pre_windowed=True, lesions=lesion)
    lung_px = int(lung.sum())
    per_class = {}
    for c, name in enumerate(classes):
        px = int((labels == c + 1).sum())
        per_class[name] = {
            "pixels": px,
            "percent_of_lung": round(100.0 * px / lung_px, 3) if lung_px else None,
            "max_probability": round(float(probs[..., c].max()), 4),
        }
    total = int(lesion.sum())
    return {
        "file": s.name,
        "source": s.source,
        "rows": int(s.shape[0]),
        "columns": int(s.shape[1]),
        "covid_probability": round(float(prob), 4),
        "lung_pixels": lung_px,
        "lesions": per_class,
        "total": {
            "pixels": total,
            "percent_of_lung": round(100.0 * total / lung_px, 3) if lung_px else None,
        },
    }


def _write_slice(tmp: Path, s: Slice, probs: np.ndarray, labels, classes) -> None:
    _png(tmp / "labels" / s.name, labels)
    for c, name in enumerate(classes):
        _png(tmp / f"probability_{name}" / s.name, np.round(probs[..., c] * 255).astype(np.uint8))
    infection = np.round(probs.max(axis=-1) * 255).astype(np.uint8)
    _png(tmp / "probability_infection" / s.name, infection)


MONTAGE_SLICES = 8


def _keep_top(kept: dict, i: int, labels: np.ndarray, grey, k=MONTAGE_SLICES) -> None:
    """Keeps the labels and grey levels of the k slices with the most lesion seen so far
    (ties: the later slice), so that a folder of thousands of slices is not held in memory
    for the montage."""
    area = int((labels > 0).sum())
    if area == 0:
        return
    kept[i] = (area, labels, grey)
    if len(kept) > k:
        del kept[min(kept, key=lambda j: (kept[j][0], j))]


def _montage(slices: list[Slice], kept: dict, classes) -> bytes:
    """PNG bytes: the slices `_keep_top` kept, in folder order (the first slice if none),
    each named under its tile, with the colour legend (2-D images: no orientation)."""
    from tfcovseg.reporting.figures import overlay_rgb, tile_sheet

    shown = {i: (lab, grey) for i, (_, lab, grey) in kept.items()}
    if not shown:
        shown = {0: (np.zeros(slices[0].shape, np.uint8), slices[0].grey())}
    tiles = []
    for i in sorted(shown):
        labels, grey = shown[i]
        channels = np.stack([labels == c + 1 for c in range(len(classes))], -1)
        tiles.append(
            overlay_rgb(grey[None], channels[None].astype(np.float32), classes, (0, 255))[0]
        )
    return tile_sheet(tiles, [slices[i].name for i in sorted(shown)], classes)


def render_html(report: dict, png: bytes) -> str:
    """A self-contained HTML page of an image-folder report (the montage embedded)."""
    import base64

    e = html.escape
    classes = report["model"]["classes"]
    head = "".join(f"<th>{e(c)} (% of lung)</th>" for c in classes)
    rows = []
    for s in report["slices"]:
        cells = "".join(f"<td>{_pct(s['lesions'][c]['percent_of_lung'])}</td>" for c in classes)
        rows.append(
            f"<tr><td>{e(s['file'])}</td>{cells}<td>{_pct(s['total']['percent_of_lung'])}</td>"
            f"<td>{s['covid_probability']:.3f}</td></tr>"
        )
    skipped = "".join(f"<li>{e(s['file'])}: {e(s['reason'])}</li>" for s in report["skipped"])
    image = base64.b64encode(png).decode("ascii")
    body = [
        "<h1>COVID-19 lesion report: image slices</h1>",
        f"<p><strong>{e(report['disclaimer'])}</strong></p>",
        f"<p>{len(report['slices'])} slices; model {e(report['model']['source'])}. "
        f"{e(NOT_GRADED)}.</p>",
        f"<table><tr><th>slice</th>{head}<th>total</th>"
        f"<th>{e(report['model'].get('slice_score_name', 'COVID-19 probability'))}</th></tr>"
        + "".join(rows)
        + "</table>",
        f'<h2>Overlay</h2><p><img alt="slices with the most lesion" '
        f'src="data:image/png;base64,{image}"></p>',
        f"<h2>Skipped</h2><ul>{skipped}</ul>" if skipped else "",
        f"<p><strong>{e(report['disclaimer'])}</strong></p>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>tfcovseg image report</title></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def intensity_setting(metadata: dict, mode: str) -> dict:
    """What `predict_images` does to the grey levels: {"mode", "reference", ...}.

    "match" with a model whose export has no ``grey_levels`` (exported before they were
    recorded) falls back to "as-is", with a warning in the report.

    Raises:
        ImageInputError: an unknown mode.
    """
    if mode not in INTENSITY_MODES:
        raise ImageInputError(
            f"--intensity must be one of {', '.join(INTENSITY_MODES)}, got {mode!r}"
        )
    reference = (metadata.get("grey_levels") or {}).get("reference")
    if mode == "as-is":
        return {"mode": "as-is"}
    if reference is None:
        return {
            "mode": "as-is",
            "warning": "the model records no training grey levels (exported before they "
            "were): images are used as they are; export its run again to match them",
        }
    return {
        "mode": "match",
        "reference": [float(r) for r in reference],
        "percentiles": [float(q) for q in MATCH_PERCENTILES],
        "rule": "per image, a linear map of its grey levels at these percentiles onto the "
        "training slices' (reference), clipped to 0-255",
    }


def _model_input(grey: np.ndarray, setting: dict) -> np.ndarray:
    """[N, H, W] grey levels as the model is to read them (`intensity_setting`)."""
    if setting["mode"] == "match":
        return match_to_scale(grey, setting["reference"])
    return grey


def predict_images(
    predictor, slices, skipped, out_dir: Path, mask_threshold=0.5, batch_size=8,
    intensity="match", input_digest=None,
):  # fmt: skip
    """Segments `slices` (`read_image_folder`) into the new folder `out_dir` (written
    whole or not at all); returns the report (also ``report.json``). `input_digest`
    (`image_files_digest` of the folder) is kept in the report for reruns to compare."""
    classes = list(predictor.metadata["class_names"])
    setting = intensity_setting(predictor.metadata, intensity)
    start = time.perf_counter()
    entries, kept = [], {}
    with atomic_directory(out_dir) as tmp:
        for sub in ("labels", "probability_infection", *(f"probability_{c}" for c in classes)):
            (tmp / sub).mkdir()
        for batch in _by_shape(slices, batch_size):
            grey = np.stack([slices[i].grey() for i in batch])
            probs, masks = predictor.serve_image(_model_input(grey, setting))
            scales = intensity_scale(grey)
            for j, i in enumerate(batch):
                labels = label_map(masks[j], mask_threshold)
                _write_slice(tmp, slices[i], masks[j], labels, classes)
                entry = _slice_entry(slices[i], grey[j], masks[j], probs[j], labels, classes)
                entry["grey_percentiles"] = [round(float(v), 2) for v in scales[j]]
                entries.append(entry)
                _keep_top(kept, i, labels, grey[j].copy())
        report = {
            "disclaimer": DISCLAIMER,
            "input": "images",
            "model": {
                "source": predictor.source,
                "sha256": getattr(predictor, "sha256", None),
                "model_version": predictor.metadata.get("model_version"),
                "experiment": predictor.metadata.get("experiment"),
                "classes": classes,
                # What each slice's "covid_probability" is (the key kept for readers).
                "slice_score": slice_score(predictor.metadata),
                "slice_score_name": slice_score_name(predictor.metadata),
            },
            "input_files_sha256": input_digest,
            "mask_threshold": float(mask_threshold),
            "intensity": {k: v for k, v in setting.items() if k != "warning"},
            "outputs": {
                "labels": "labels/<name>.png: 0 background, "
                + ", ".join(f"{i + 1} {c}" for i, c in enumerate(classes)),
                "probabilities": "probability_<class>/<name>.png: round(255 p); "
                "probability_infection: the highest class's",
            },
            "lung_mask": "per image: Otsu's threshold on the grey levels, lesions added",
            "slices": entries,
            "skipped": [{"file": f, "reason": r} for f, r in skipped],
            "warnings": [NOT_GRADED] + ([setting["warning"]] if "warning" in setting else []),
            "timings_s": {"total": round(time.perf_counter() - start, 3)},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        png = _montage(slices, kept, classes)
        (tmp / "overlay.png").write_bytes(png)
        atomic_write_text(tmp / "report.html", render_html(report, png))
        atomic_write_json(tmp / "report.json", report)
    return report
