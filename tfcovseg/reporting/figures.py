"""Evaluation figures of the paper, drawn with Matplotlib's object API.

- `plot_ratio_boxplots` (Figure 4): lesion / lung area ratio by clinical severity of the
  COVID-19 patients, per lesion type and in total, ground truth and prediction side by side;
- `plot_confusion` (Figure 5): the 2x2 patient-level confusion matrix;
- `plot_overlays` (Figure 6): CT slices with ground-truth contours and the predicted lesions;
- `plot_learning_curves` and `plot_roc`: the run's loss per epoch and the slice classifier's
  ROC curve, for the training report.

Figures are built as ``matplotlib.figure.Figure`` with an Agg canvas, so nothing touches
pyplot's global figure registry or the selected backend, and nothing stays open after a
call. Lesion colours follow the paper: ground-glass opacity red, consolidation green,
fibrosis blue. No TensorFlow or Keras. Research use, not a medical device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tfcovseg.constants import SEVERITY_ORDER, TOTAL

OVERLAY_COLOURS = {
    "ggo": (1.0, 0.0, 0.0),
    "consolidation": (0.0, 0.8, 0.0),
    "fibrosis": (0.0, 0.3, 1.0),
    TOTAL: (0.35, 0.35, 0.35),
}
"""RGB in [0, 1] of the lesion classes by name, in the paper's colours."""

_ALIASES = {
    "ground_glass": "ggo",
    "ground_glass_opacity": "ggo",
    "groundglass": "ggo",
    "gg": "ggo",
    "consolidations": "consolidation",
    "fibrous": "fibrosis",
    "fibrotic": "fibrosis",
}

FALLBACK_COLOURS = (
    (1.0, 0.85, 0.0),
    (1.0, 0.0, 1.0),
    (0.0, 0.9, 0.9),
    (1.0, 0.5, 0.0),
    (0.6, 0.3, 1.0),
    (0.6, 1.0, 0.3),
)
"""Colours for classes the paper does not name, in order of first use."""

DEFAULT_WINDOW = (-1250.0, 250.0)
TRUTH_COLOUR = (0.75, 0.75, 0.75)


def class_colours(classes: Sequence[str]) -> list[tuple[float, float, float]]:
    """One RGB colour per class: the paper's colour by name, else a distinct fallback."""
    out, used, spare = [], set(), iter(FALLBACK_COLOURS)
    for name in classes:
        key = str(name).lower().replace("-", "_").replace(" ", "_")
        colour = OVERLAY_COLOURS.get(_ALIASES.get(key, key))
        if colour is None or colour in used:
            colour = next((c for c in spare if c not in used), None)
            if colour is None:  # more unknown classes than fallbacks: cycle through them
                colour = FALLBACK_COLOURS[len(out) % len(FALLBACK_COLOURS)]
        used.add(colour)
        out.append(tuple(float(v) for v in colour))
    return out


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    try:
        fig.savefig(path, format="png")
    finally:
        fig.clear()
    return path


def window_image(hu, window=DEFAULT_WINDOW) -> np.ndarray:
    """Hounsfield units mapped linearly to [0, 1] through a (low, high) window."""
    low, high = float(window[0]), float(window[1])
    return np.clip((np.asarray(hu, np.float32) - low) / (high - low), 0.0, 1.0)


def overlay_rgb(hu, masks, classes, window=DEFAULT_WINDOW, threshold=0.5, alpha=0.45):
    """RGB images [..., H, W, 3] in [0, 1]: windowed slices with masks filled in colour.

    Args:
        hu: Slices in HU, [..., H, W].
        masks: Probabilities or masks [..., H, W, C], C == len(classes); pixels at or above
            threshold are blended with the class colour (later classes on top).
        classes: Class names, for the colours.
    """
    grey = window_image(hu, window)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    masks = np.asarray(masks, np.float32)
    for c, colour in enumerate(class_colours(classes)[: masks.shape[-1]]):
        on = masks[..., c : c + 1] >= threshold
        rgb = np.where(on, (1 - alpha) * rgb + alpha * np.asarray(colour, np.float32), rgb)
    return rgb.astype(np.float32)


def _as_slices(hu, true, pred, n_classes):
    hu = np.asarray(hu, np.float32)
    if hu.ndim == 4 and hu.shape[-1] == 1:
        hu = hu[..., 0]
    if hu.ndim == 2:
        hu = hu[None]
    if hu.ndim != 3:
        raise ValueError(f"hu must be [K, H, W] (or [K, H, W, 1]), got shape {hu.shape}")
    out = [hu]
    for name, m in (("true", true), ("pred", pred)):
        m = np.asarray(m, np.float32)
        if m.ndim == 3:
            m = m[None]
        if m.shape != hu.shape + (n_classes,):
            raise ValueError(
                f"{name} must be [K, H, W, C] = {hu.shape + (n_classes,)}, got {m.shape}"
            )
        out.append(m)
    return out


def _contours(ax, mask, colour, linewidth=1.2):
    """Outlines a boolean mask; padded so that regions touching the border close."""
    if not mask.any():
        return
    padded = np.pad(mask.astype(np.float32), 1)
    h, w = padded.shape
    ax.contour(
        np.arange(-1, w - 1),
        np.arange(-1, h - 1),
        padded,
        levels=[0.5],
        colors=[colour],
        linewidths=linewidth,
    )


def plot_overlays(
    hu,
    true,
    pred,
    classes,
    path,
    window=DEFAULT_WINDOW,
    threshold=0.5,
    titles=None,
    alpha=0.45,
    panel_inches=3.0,
    dpi=100,
) -> Path:
    """Figure 6: per slice the CT image, the ground truth and the prediction.

    Args:
        hu: K slices in HU, [K, H, W] (or [K, H, W, 1]).
        true: Ground-truth masks [K, H, W, C] (outlined where >= 0.5).
        pred: Predicted probabilities [K, H, W, C] (filled where >= threshold).
        classes: The C class names (for colours and the legend).
        path: PNG file to write; parent folders are created.
        window: HU display window (low, high).
        titles: Optional K row labels (e.g. patient and slice).

    Returns:
        The path written.
    """
    classes = list(classes)
    hu, true, pred = _as_slices(hu, true, pred, len(classes))
    if titles is not None and len(titles) != len(hu):
        raise ValueError(f"titles has {len(titles)} entries for {len(hu)} slices")
    colours = class_colours(classes)
    grey = window_image(hu, window)
    filled = overlay_rgb(hu, pred, classes, window, threshold, alpha)
    k = len(hu)
    fig = Figure(figsize=(3 * panel_inches, k * panel_inches + 0.6), dpi=dpi)
    axes = fig.subplots(k, 3, squeeze=False)
    headings = (
        f"CT (window {window[0]:g} to {window[1]:g} HU)",
        "ground truth (contours)",
        f"prediction (p >= {threshold:g})",
    )
    for i in range(k):
        for j, ax in enumerate(axes[i]):
            ax.imshow(filled[i] if j == 2 else grey[i], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(headings[j], fontsize=9)
        for c, colour in enumerate(colours):
            _contours(axes[i][1], true[i, ..., c] >= 0.5, colour)
        axes[i][1].set_xlim(-0.5, hu.shape[2] - 0.5)
        axes[i][1].set_ylim(hu.shape[1] - 0.5, -0.5)
        if titles is not None:
            axes[i][0].set_ylabel(str(titles[i]), fontsize=9)
    handles = [Patch(facecolor=c, edgecolor=c, label=n) for n, c in zip(classes, colours)]
    fig.legend(handles=handles, loc="lower center", ncol=max(len(handles), 1), frameon=False)
    fig.subplots_adjust(
        left=0.04,
        right=0.99,
        top=1 - 0.35 / fig.get_figheight(),
        wspace=0.03,
        hspace=0.06,
        bottom=0.5 / fig.get_figheight(),
    )
    return _save(fig, path)


def plot_confusion(confusion: Mapping, path, title="Patient-level classification") -> Path:
    """Figure 5: the 2x2 patient-level confusion matrix with its counts.

    Args:
        confusion: ``{"tp", "fp", "fn", "tn"}`` counts, or a classification entry holding
            them under ``"confusion"``.
        path: PNG file to write; parent folders are created.
        title: Figure title.

    Rows are the truth (COVID-19, non-COVID), columns the prediction.
    """
    if "confusion" in confusion:
        confusion = confusion["confusion"]
    tp, fn = int(confusion.get("tp", 0)), int(confusion.get("fn", 0))
    fp, tn = int(confusion.get("fp", 0)), int(confusion.get("tn", 0))
    matrix = np.array([[tp, fn], [fp, tn]], np.float64)
    labels = (("TP", "FN"), ("FP", "TN"))
    row_sums = matrix.sum(1, keepdims=True)
    fraction = np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)
    fig = Figure(figsize=(4.2, 3.8), dpi=100)
    ax = fig.subplots()
    ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    for r in range(2):
        for c in range(2):
            share = f"\n{100 * fraction[r, c]:.0f}% of row" if row_sums[r, 0] else ""
            ax.text(
                c,
                r,
                f"{labels[r][c]}\n{int(matrix[r, c])}{share}",
                ha="center",
                va="center",
                fontsize=11,
                color="white" if fraction[r, c] > 0.5 else "black",
            )
    ax.set_xticks([0, 1], ["COVID-19", "non-COVID"])
    ax.set_yticks([0, 1], ["COVID-19", "non-COVID"])
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _p_text(entry) -> str:
    p = None if entry is None else (entry.get("kruskal") or {}).get("p")
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}"


def plot_ratio_boxplots(patients, stats: Mapping, classes, path, panel_inches=3.2) -> Path:
    """Figure 4: lesion / lung ratio by severity over the COVID-19 patients.

    One panel per lesion class and one for their total; in each, per severity group with
    patients, a box of the ground-truth ratios (grey) beside one of the predicted ratios
    (class colour), each patient's value as a point on top. The Kruskal-Wallis p-value of
    truth and prediction is in the panel title.

    Args:
        patients: The COVID-19 patients to draw, as
            `tfcovseg.evaluation.severity.covid_cohort` lists them (``"severity"`` and the
            ``"true"`` / ``"pred"`` ratios per class and total).
        stats: `tfcovseg.evaluation.severity.ratio_statistics` of the same ratios ({}
            for none: no p-values).
        classes: Lesion class names.
        path: PNG file to write; parent folders are created.

    Returns:
        The path written.
    """
    classes = [c for c in classes if c != TOTAL]
    names = classes + [TOTAL]
    colours = class_colours(classes) + [OVERLAY_COLOURS[TOTAL]]
    present = [s for s in SEVERITY_ORDER if any(p["severity"] == s for p in patients)]
    ncols = min(len(names), 4)
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(ncols * panel_inches, nrows * panel_inches), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    rng = np.random.default_rng(0)
    for ax, name, colour in zip(axes, names, colours):
        entry = stats.get("classes", {}).get(name, {})
        ax.set_title(
            f"{name}\nKW p: true {_p_text(entry.get('true'))}, pred {_p_text(entry.get('pred'))}",
            fontsize=9,
        )
        ax.set_ylabel("lesion / lung area", fontsize=8)
        ax.tick_params(labelsize=8)
        if not present:
            ax.text(0.5, 0.5, "no COVID-19 patients\nwith a severity", ha="center",
                    va="center", transform=ax.transAxes, fontsize=9)  # fmt: skip
            ax.set_xticks([])
            continue
        _ratio_panel(ax, name, colour, patients, present, rng)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


def _ratio_panel(ax, name, colour, patients, present, rng) -> None:
    """One class's panel: per severity group, a box of the true ratios (grey) beside one
    of the predicted (class colour), each patient a point on top."""
    for kind, offset, face in (("true", -0.2, TRUTH_COLOUR), ("pred", 0.2, colour)):
        for x, severity in enumerate(present):
            values = np.array(
                [p[kind][name] for p in patients if p["severity"] == severity and kind in p]
            )
            values = values[np.isfinite(values)]
            if not values.size:
                continue
            box = ax.boxplot(values, positions=[x + offset], widths=0.32, patch_artist=True,
                             showfliers=False, medianprops={"color": "black"})  # fmt: skip
            for patch in box["boxes"]:
                patch.set_facecolor((*face, 0.55))
            jitter = rng.uniform(-0.08, 0.08, values.size)
            ax.scatter(x + offset + jitter, values, s=9, color="black", alpha=0.7, zorder=3)
    ax.set_xticks(range(len(present)), present)
    ax.set_xlim(-0.6, len(present) - 0.4)
    ax.set_ylim(bottom=0)
    ax.legend(
        handles=[
            Patch(facecolor=(*TRUTH_COLOUR, 0.55), edgecolor="black", label="ground truth"),
            Patch(facecolor=(*colour, 0.55), edgecolor="black", label="predicted"),
        ],
        loc="upper left",
        fontsize=7,
        frameon=False,
    )


__all__ = [
    "OVERLAY_COLOURS",
    "FALLBACK_COLOURS",
    "class_colours",
    "window_image",
    "overlay_rgb",
    "plot_overlays",
    "plot_confusion",
    "plot_ratio_boxplots",
]


def plot_learning_curves(phases: Mapping, path) -> Path:
    """Training and validation loss per epoch, one panel per phase, the best epoch marked.

    Args:
        phases: ``{phase: {"loss": [...], "val_loss": [...], "best_epoch": k}}`` as in
            `tfcovseg.evaluation.runlog.training_summary`.
        path: PNG file to write; parent folders are created.
    """
    names = list(phases)
    fig = Figure(figsize=(3.6 * max(len(names), 1), 3.2), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, max(len(names), 1), squeeze=False)[0])
    for ax, name in zip(axes, names):
        entry = phases[name]
        epochs = np.arange(1, len(entry["loss"]) + 1)
        ax.plot(epochs, entry["loss"], label="training", color="0.3")
        if entry.get("val_loss"):
            ax.plot(epochs[: len(entry["val_loss"])], entry["val_loss"], label="validation")
        if entry.get("best_epoch"):
            ax.axvline(entry["best_epoch"], color="tab:green", ls="--", lw=1, label="best")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(roc: Mapping, path, title="Slice classifier") -> Path:
    """The ROC curve of `tfcovseg.evaluation.metrics.roc_curve` with its AUC and the chance line."""
    fig = Figure(figsize=(3.8, 3.6), dpi=100)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", ls=":", lw=1)
    if roc.get("fpr"):
        ax.plot(roc["fpr"], roc["tpr"], color="tab:blue", drawstyle="default")
    auc = roc.get("auc")
    label = "AUC undefined (one class only)" if auc is None else f"AUC {auc:.3f}"
    ax.set_title(
        f"{title}: {label}\n{roc.get('positives', 0)} lesion, {roc.get('negatives', 0)} "
        "lesion-free slices",
        fontsize=9,
    )
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    fig.tight_layout()
    return _save(fig, path)


TILE_PIXELS = 256
SHEET_BACKGROUND = (255, 255, 255)


def tile_sheet(tiles, captions, classes, markers=None, columns=4) -> bytes:
    """PNG bytes of overlay tiles on a white sheet, a caption under each, a colour legend.

    Args:
        tiles: RGB images [H, W, 3] in [0, 1] (e.g. `overlay_rgb`), shrunk to fit
            `TILE_PIXELS`; the last row's free cells stay background, never black tiles.
        captions: One line per tile (slice number and position, file name).
        classes: Lesion classes, for the legend in their overlay colours.
        markers: Patient orientation letters at the tiles' edges, ``{"top", "bottom",
            "left", "right"}`` (e.g. A, P, R, L), or None when unknown (2-D images).
        columns: Tiles per row at most.
    """
    import io

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    images = []
    for tile in tiles:
        image = Image.fromarray((np.clip(tile, 0, 1) * 255).round().astype(np.uint8))
        image.thumbnail((TILE_PIXELS, TILE_PIXELS))
        images.append(image)
    w, h = max(i.width for i in images) + 2, max(i.height for i in images)
    cell = h + 16  # the tile, its caption beneath
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (max(cols * w, 200), rows * cell + 24), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for n, (image, caption) in enumerate(zip(images, captions)):
        x, y = (n % cols) * w, (n // cols) * cell
        sheet.paste(image, (x, y))
        draw.text((x + 2, y + h + 1), caption, fill=(0, 0, 0), font=font)
        for side, letter in (markers or {}).items():
            _marker(draw, (x, y, image.width, image.height), side, letter, font)
    x, y = 4, rows * cell + 5
    for name, colour in zip(classes, class_colours(classes)):
        draw.rectangle((x, y + 1, x + 12, y + 13), fill=_rgb255(colour))
        draw.text((x + 16, y), str(name), fill=(0, 0, 0), font=font)
        x += 24 + int(draw.textlength(str(name), font=font))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _rgb255(colour) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colour)


def _marker(draw, tile, side, letter, font) -> None:
    x, y, w, h = tile
    tw = draw.textlength(letter, font=font)
    where = {
        "top": (x + (w - tw) / 2, y + 2),
        "bottom": (x + (w - tw) / 2, y + h - 15),
        "left": (x + 3, y + h / 2 - 7),
        "right": (x + w - tw - 3, y + h / 2 - 7),
    }[side]
    draw.text(where, letter, fill=(255, 255, 0), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
