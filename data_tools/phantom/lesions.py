"""Lesions by diagnosis, as radiology describes them, and their weight on a slice.

COVID-19 (labelled): bilateral, peripheral and subpleural, multifocal ground-glass
opacities, some with crazy paving (thickened interlobular septa over the ground glass);
consolidation in later stages, often inside ground glass; in severe patients fibrotic
subpleural zones of reticulation with subpleural bands 1.5-3 mm thick.

Not labelled (the patterns a COVID-19 segmenter must not take for lesions): bacterial
pneumonia, a lobar or segmental consolidation bounded by the fissure, with air
bronchograms, mostly in one lung; viral (non-COVID) pneumonia, airway-centred:
thickened bronchial walls, peribronchovascular ground glass near the hila, and
tree-in-bud clusters of centrilobular nodules on small branches.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from data_tools.phantom.anatomy import Anatomy, distance_to_pleura
from data_tools.phantom.canvas import Canvas
from data_tools.phantom.trees import Tree, bronchi

LABELS = {"ggo": 1, "consolidation": 2, "fibrosis": 3}

# (count range, radius range mm) per severity; paving: share of GGO with crazy paving.
COVID_PLAN = {
    "mild": dict(ggo=(2, 4), radius=(9, 18), cons=(0, 1), fib=(0, 0), paving=0.0),
    "moderate": dict(ggo=(4, 8), radius=(12, 25), cons=(1, 3), fib=(0, 1), paving=0.3),
    "severe": dict(ggo=(8, 14), radius=(18, 38), cons=(3, 5), fib=(2, 5), paving=0.6),
}


@dataclasses.dataclass
class Lesion:
    # ggo | consolidation | fibrosis | mimic (unlabelled blob) | lobar | tube (3-D capsule)
    kind: str
    center: tuple[float, float, float]  # x, y, z mm
    axes: tuple[float, float, float]  # semi-axes mm; a tube's radius in axes[0]
    hu: float
    edge: float  # profile softness: 0 sharp to 1 soft
    label: int = 0
    angle: float = 0.0  # in-plane rotation, radians
    lobes: tuple = ()  # (k, amplitude, phase) of a lobulated outline
    dense: bool = False  # drawn over the vessels (hides them) rather than under
    paving: bool = False  # crazy paving over the ground glass
    end: tuple[float, float, float] | None = None  # tube: the other end
    depth: float = 0.0  # fibrosis: reaches this far (mm) in from the pleura
    band: float = 0.0  # fibrosis: subpleural band thickness, mm
    lobe: int = 0  # lobar: +1 the lower lobe (behind the fissure), -1 the upper


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class LungSampler:
    """Random points in a patient's lungs by height, depth under the pleura and side."""

    def __init__(self, anatomy: Anatomy, rng, fov_mm: float):
        self.an, self.rng = anatomy, rng
        self.cv = Canvas(192, fov_mm)
        self._levels = {}

    def _level(self, z):
        key = int(round(z / 10.0)) * 10
        if key not in self._levels:
            lung = self.an.lungs(self.cv, float(key))
            self._levels[key] = (lung >= 128, distance_to_pleura(lung, self.cv.mm))
        return self._levels[key]

    def point(self, z_range, depth_range, side=None, where=None):
        """(x, y, z) mm in a lung at a depth in `depth_range` under the pleura.

        `side` -1 right / +1 left lung; `where(x, y, z)` a further condition on pixels.
        """
        for _ in range(30):
            z = self.rng.uniform(*z_range)
            lung, depth = self._level(z)
            ok = lung & (depth >= depth_range[0]) & (depth <= depth_range[1])
            if side is not None:
                ok &= np.sign(self.cv.xx - self.an.xm) == side
            if where is not None:
                ok &= where(self.cv.xx, self.cv.yy, z)
            rows, cols = np.nonzero(ok)
            if len(rows):
                i = self.rng.integers(len(rows))
                jitter = self.rng.uniform(-0.5, 0.5, 2) * self.cv.mm
                return (
                    float(self.cv.xx[rows[i], cols[i]] + jitter[0]),
                    float(self.cv.yy[rows[i], cols[i]] + jitter[1]),
                    float(z),
                )
        return None


def _lobes(rng, amplitude):
    return tuple(
        (k, rng.uniform(0.5, 1.0) * amplitude, rng.uniform(0, 2 * math.pi)) for k in (2, 3)
    )


def covid(rng, an: Anatomy, sampler: LungSampler, severity: str) -> list[Lesion]:
    """COVID-19: bilateral, peripheral ground glass (some with crazy paving), then
    consolidation (half of it inside the ground glass) and subpleural fibrotic bands, as
    many as the severity's plan draws; sides alternate so that both lungs are hit."""
    plan = COVID_PLAN[severity]

    def lateral(xx, yy, z):  # under the costal pleura, not the mediastinal one
        return np.abs(xx - an.xm) > an.mediastinal_half_width(z) + 30

    side = rng.choice((-1, 1))
    ggo, side = _covid_ggo(rng, sampler, plan, side, lateral)
    consolidation, side = _covid_consolidation(rng, sampler, plan, side, lateral, ggo)
    fibrosis = _covid_fibrosis(rng, an, sampler, plan, side, lateral)
    return ggo + consolidation + fibrosis


def _covid_ggo(rng, sampler, plan, side, lateral):
    out = []
    for _ in range(rng.integers(plan["ggo"][0], plan["ggo"][1] + 1)):
        side = -side  # both lungs
        a = rng.uniform(*plan["radius"])
        p = sampler.point((35, 250), (0.3 * a, max(0.8 * a, 4.0)), side, lateral)
        if p is None:
            continue
        out.append(Lesion(
            "ggo", p, (a * rng.uniform(0.7, 1.3), a, max(a * rng.uniform(1.0, 2.0), 15.0)),
            rng.uniform(-700, -380), 0.6, LABELS["ggo"], rng.uniform(0, math.pi),
            _lobes(rng, 0.18), paving=bool(rng.uniform() < plan["paving"]),
        ))  # fmt: skip
    return out, side


def _covid_consolidation(rng, sampler, plan, side, lateral, ggo):
    out = []
    for _ in range(rng.integers(plan["cons"][0], plan["cons"][1] + 1)):
        a = rng.uniform(10, 20)
        if ggo and rng.uniform() < 0.5:  # consolidation inside ground glass
            host = ggo[rng.integers(len(ggo))]
            a = min(a, 0.6 * host.axes[1] + 4)
            x, y, z = host.center
            p = (x + rng.normal(0, 2), y + rng.normal(0, 2), z + rng.normal(0, 3))
        else:
            side = -side
            p = sampler.point((35, 220), (0.3 * a, max(0.8 * a, 4.0)), side, lateral)
        if p is None:
            continue
        out.append(Lesion(
            "consolidation", p, (a, a * rng.uniform(0.7, 1.2), max(a * rng.uniform(1, 2), 10)),
            rng.uniform(-80, 40), 0.25, LABELS["consolidation"], rng.uniform(0, math.pi),
            _lobes(rng, 0.15), dense=True,
        ))  # fmt: skip
    return out, side


def _covid_fibrosis(rng, an, sampler, plan, side, lateral):
    out = []
    for _ in range(rng.integers(plan["fib"][0], plan["fib"][1] + 1)):
        side = -side
        posterior = rng.uniform() < 0.7  # fibrosis favours the dependent, basal lung

        def where(xx, yy, z, posterior=posterior):
            return lateral(xx, yy, z) & ((yy > an.y0) if posterior else True)

        p = sampler.point((35, 180), (0.0, 4.0), side, where)
        if p is None:
            continue
        out.append(Lesion(
            "fibrosis", p, (rng.uniform(22, 40), 0.0, rng.uniform(15, 35)),
            rng.uniform(-680, -600), 0.35, LABELS["fibrosis"], depth=rng.uniform(8, 15),
            band=rng.uniform(1.5, 3.0),
        ))  # fmt: skip
    return out


def bacterial(rng, an: Anatomy, sampler: LungSampler, arteries: Tree) -> list[Lesion]:
    sides = [rng.choice((-1, 1))]
    if rng.uniform() < 0.2:
        sides = [-1, 1]
    out = []
    for side in sides:
        lobe = 1 if rng.uniform() < 0.75 else -1
        z_range = (75, 150) if lobe > 0 else (170, 235)

        def in_lobe(xx, yy, z, lobe=lobe):
            return lobe * (yy - an.fissure_y(z)) > 8

        p = sampler.point(z_range, (8, 40), side, in_lobe)
        if p is None:
            continue
        a = rng.uniform(50, 75)
        lobar = Lesion("lobar", p, (a, a * rng.uniform(0.7, 1.0), rng.uniform(35, 60)),
                       rng.uniform(10, 45), 0.2, angle=rng.uniform(0, math.pi),
                       lobes=_lobes(rng, 0.1), dense=True, lobe=lobe)  # fmt: skip
        out.append(lobar)
        out += _air_bronchograms(rng, an, lobar, bronchi(arteries, 6))
    return out


def _air_bronchograms(rng, an: Anatomy, lobar: Lesion, airways: Tree) -> list[Lesion]:
    """Aerated bronchi drawn over the consolidation they run through."""
    middle = (airways.start + airways.end) / 2
    d = (middle - np.asarray(lobar.center)) / np.asarray(lobar.axes)
    fissure = np.array([an.fissure_y(z) for z in middle[:, 2]])
    inside = (np.sum(d * d, axis=1) < 0.7) & (lobar.lobe * (middle[:, 1] - fissure) > 4)
    return [
        Lesion("tube", tuple(airways.start[i]), (max(airways.radius[i], 1.5), 0, 0),
               rng.uniform(-990, -930), 0.3, dense=True, end=tuple(airways.end[i]))
        for i in np.flatnonzero(inside)
    ]  # fmt: skip


def viral(rng, an: Anatomy, arteries: Tree, airways: Tree) -> list[Lesion]:
    an.airway_wall = rng.uniform(2.0, 3.0)  # bronchial wall thickening
    out = []
    central = np.flatnonzero((airways.generation >= 1) & (airways.generation <= 4))
    for i in rng.choice(central, size=min(len(central), rng.integers(5, 9)), replace=False):
        out.append(
            Lesion(
                "tube",
                tuple(airways.start[i]),
                (rng.uniform(8, 15), 0, 0),
                rng.uniform(-700, -560),
                0.8,
                end=tuple(airways.end[i]),
            )  # fmt: skip
        )
    distal = np.flatnonzero(arteries.generation >= 5)
    middle = (arteries.start + arteries.end) / 2
    for _ in range(rng.integers(4, 8)):  # tree-in-bud clusters
        centre = middle[rng.choice(distal)]
        near = distal[np.linalg.norm(middle[distal] - centre, axis=1) < 25.0]
        for i in near:
            out.append(
                Lesion("tube", tuple(arteries.start[i]), (rng.uniform(1.5, 2.2), 0, 0),
                       rng.uniform(-150, 0), 0.5, dense=True, end=tuple(arteries.end[i]))
            )  # fmt: skip
            r = rng.uniform(2.5, 4.0)
            out.append(Lesion("mimic", tuple(arteries.end[i]), (r, r, r + 2), rng.uniform(-200, 0),
                              0.5, dense=True))  # fmt: skip
    return out


# ----------------------------------------------------------------------- on a slice


def _box(cv: Canvas, x, y, rx, ry):
    n, half = cv.size, (cv.size - 1) / 2
    c0 = max(int((x - rx) / cv.mm + half) - 1, 0)
    c1 = min(int((x + rx) / cv.mm + half) + 3, n)
    r0 = max(int((y - ry) / cv.mm + half) - 1, 0)
    r1 = min(int((y + ry) / cv.mm + half) + 3, n)
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def weight(lesion: Lesion, cv: Canvas, z: float, context) -> tuple | None:
    """(box, weight in [0, 1]) of a lesion on the slice at z, or None if it misses it.

    `context` gives the slice's `pleura()` distance map (mm) and `fissure` y.
    """
    cx, cy, cz = lesion.center
    if lesion.kind == "tube":
        return _tube(lesion, cv, z, context.thickness)
    ax, ay, az = lesion.axes
    dzt = ((z - cz) / az) ** 2
    if dzt >= 1.0:
        return None
    if lesion.kind == "fibrosis":
        reach = ax * math.sqrt(1.0 - dzt)
        box = _box(cv, cx, cy, reach, reach)
        if box is None:
            return None
        r2 = ((cv.xx[box] - cx) ** 2 + (cv.yy[box] - cy) ** 2) / (ax * ax) + dzt
        w = _smoothstep((1.0 - r2) / lesion.edge)
        depth = context.pleura()[box]
        w *= _smoothstep((lesion.depth - depth) / (0.3 * lesion.depth) + 0.5)
        return box, w
    grow = 1.0 + sum(a for _, a, _ in lesion.lobes)
    reach = max(ax, ay) * math.sqrt(1.0 - dzt) * grow
    box = _box(cv, cx, cy, reach, reach)
    if box is None:
        return None
    du, dv = cv.xx[box] - cx, cv.yy[box] - cy
    c, s = math.cos(lesion.angle), math.sin(lesion.angle)
    u, v = (du * c + dv * s) / ax, (-du * s + dv * c) / ay
    r2 = u * u + v * v
    if lesion.lobes:
        phi = np.arctan2(v, u)
        f = 1.0 + sum(a * np.cos(k * phi + p) for k, a, p in lesion.lobes)
        r2 = r2 / (f * f)
    w = _smoothstep((1.0 - r2 - dzt) / lesion.edge)
    if lesion.kind == "lobar":
        w *= _smoothstep(lesion.lobe * (cv.yy[box] - context.fissure) / 4.0 + 0.5)
    return box, w


def _tube(lesion: Lesion, cv: Canvas, z: float, thickness: float):
    """A 3-D capsule's weight, as seen through the whole slab (thin tubes stay visible)."""
    a, b = np.asarray(lesion.center), np.asarray(lesion.end)
    r = lesion.axes[0]
    half = thickness / 2
    if z + half < min(a[2], b[2]) - r or z - half > max(a[2], b[2]) + r:
        return None
    lo, hi = np.minimum(a, b) - r, np.maximum(a, b) + r
    box = _box(
        cv, (lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, (hi[0] - lo[0]) / 2, (hi[1] - lo[1]) / 2
    )
    if box is None:
        return None
    d = b - a
    px, py, pz = cv.xx[box] - a[0], cv.yy[box] - a[1], z - a[2]
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    off_z = np.maximum(np.abs(pz - t * d[2]) - half, 0.0)  # anywhere in the slab
    dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + off_z**2
    return box, _smoothstep((1.0 - dist2 / (r * r)) / lesion.edge)
