"""`predict`'s human-readable report: the overlay montage (slice numbers, z positions,
orientation letters, legend) and report.html."""

from __future__ import annotations

import base64
import html

import numpy as np

from tfcovseg.inference.studies import Volume, display_geometry

MONTAGE_SLICES = 12


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


def unreadable_text(gate: dict) -> str:
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
        f"segmented{unreadable_text(gate)}.</p>",
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
