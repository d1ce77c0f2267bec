"""Pulmonary arteries, veins and bronchi: 3-D trees that branch and taper from the hila.

Each tree is a set of straight 3-D segments (start, end, radius, generation). A slice is
a slab of the slice thickness; a segment shows in it as the part of it inside the slab,
projected onto the slice, as wide as the vessel, and as bright as the fraction of the
slab's thickness the vessel fills (a vessel running through the slab fills it, one
lying across it only its diameter): the partial-volume effect of thick CT slices.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from data_tools.phantom.canvas import AA, SHIFT, Canvas

# Lobar trunk directions (lateral, posterior, up) from the hilum; lateral is mirrored.
TRUNKS = (
    (0.35, -0.1, 1.0),  # upper lobe, apical
    (0.45, -0.85, 0.35),  # upper lobe, anterior
    (0.55, -0.7, -0.35),  # middle lobe / lingula
    (0.35, 0.9, -0.05),  # lower lobe, superior segment
    (0.35, 0.35, -1.0),  # lower lobe, basal
)


@dataclasses.dataclass
class Tree:
    start: np.ndarray  # [N, 3] mm (x, y, z)
    end: np.ndarray
    radius: np.ndarray  # [N] mm
    generation: np.ndarray  # [N]

    def subset(self, keep) -> Tree:
        return Tree(self.start[keep], self.end[keep], self.radius[keep], self.generation[keep])


def _normalise(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _grow(rng, root, direction, radius, length, generations, min_radius):
    """Segments of one branching trunk, a generation at a time: (start, end, radius, gen)."""
    root = np.asarray(root, float)
    p, d = root[None], _normalise(np.asarray(direction, float))[None]
    r, ln = np.array([radius]), np.array([length])
    out = []
    for g in range(generations):
        q = p + d * ln[:, None]
        out.append((p, q, r, np.full(len(r), g)))
        grow = r * 0.76 >= min_radius
        if g + 1 == generations or not grow.any():
            break
        p, q, d, r, ln = p[grow], q[grow], d[grow], r[grow], ln[grow]
        outward = _normalise(q - root)
        helper = np.where(np.abs(d[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
        e1 = _normalise(np.cross(d, helper))
        e2 = np.cross(d, e1)
        m = len(r)
        phi = rng.uniform(0, 2 * math.pi, m)[:, None] + np.array([0.0, math.pi])  # [m, 2]
        tilt = np.tan(np.radians(rng.uniform(20, 40, (m, 2))))
        spread = np.cos(phi)[..., None] * e1[:, None] + np.sin(phi)[..., None] * e2[:, None]
        child = _normalise(d[:, None] + tilt[..., None] * spread + 0.25 * outward[:, None])
        p = np.repeat(q, 2, axis=0)
        d = child.reshape(-1, 3)
        r = np.repeat(r, 2) * rng.uniform(0.7, 0.82, 2 * m)
        ln = np.maximum(np.repeat(ln, 2) * rng.uniform(0.72, 0.86, 2 * m), 5.0)
    return out


def make_tree(rng, hilum, side: int, radius: float, length: float, generations: int,
              min_radius: float = 0.45) -> Tree:  # fmt: skip
    """A lung's tree: the lobar trunks from `hilum`, mirrored to `side` (-1 right, +1 left)."""
    parts = []
    for lateral, posterior, up in TRUNKS:
        jitter = rng.normal(0, 0.12, 3)
        d = np.array([side * lateral, posterior, up]) + jitter
        parts += _grow(rng, hilum, d, radius, length, generations, min_radius)
    return Tree(*(np.concatenate(field) for field in zip(*parts)))


def bronchi(arteries: Tree, max_generation: int) -> Tree:
    """Bronchi beside the arteries of the first generations (bronchovascular bundles)."""
    keep = (arteries.generation >= 1) & (arteries.generation <= max_generation)
    a = arteries.subset(keep)
    d = a.end - a.start
    helper = np.where(np.abs(d[:, 2:3]) < 0.9 * np.linalg.norm(d, axis=1, keepdims=True),
                      [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])  # fmt: skip
    side = np.cross(d, helper)
    side /= np.maximum(np.linalg.norm(side, axis=1, keepdims=True), 1e-9)
    r = a.radius * 0.7
    offset = side * (a.radius + r + 0.8)[:, None]
    return Tree(a.start + offset, a.end + offset, r, a.generation)


def concat(*trees: Tree) -> Tree:
    return Tree(*(np.concatenate([getattr(t, f) for t in trees]) for f in
                  ("start", "end", "radius", "generation")))  # fmt: skip


def slab_segments(tree: Tree, z: float, thickness: float):
    """Parts of the tree inside the slab [z - thickness/2, z + thickness/2].

    Returns (x0, y0, x1, y1, radius, fill, index) arrays: the projected ends, the radius
    and the fraction of the slab's thickness the vessel fills along its projection.
    """
    lo, hi = z - thickness / 2, z + thickness / 2
    p, q = tree.start, tree.end
    dz = q[:, 2] - p[:, 2]
    flat = np.abs(dz) < 1e-6
    safe = np.where(flat, 1.0, dz)
    ta, tb = (lo - p[:, 2]) / safe, (hi - p[:, 2]) / safe
    t0 = np.where(flat, 0.0, np.clip(np.minimum(ta, tb), 0.0, 1.0))
    t1 = np.where(flat, 1.0, np.clip(np.maximum(ta, tb), 0.0, 1.0))
    inside = np.where(flat, (p[:, 2] > lo - tree.radius) & (p[:, 2] < hi + tree.radius), t1 > t0)
    idx = np.flatnonzero(inside)
    d = q[idx] - p[idx]
    a = p[idx] + d * t0[idx, None]
    b = p[idx] + d * t1[idx, None]
    r = tree.radius[idx]
    cos_z = np.abs(d[:, 2]) / np.maximum(np.linalg.norm(d, axis=1), 1e-9)
    across = np.sqrt(np.maximum(1.0 - cos_z**2, 1e-6))
    fill = np.minimum(1.0, 2.0 * r / (thickness * across))
    return a[:, 0], a[:, 1], b[:, 0], b[:, 1], r, fill, idx


def draw_segments(cv: Canvas, mask: np.ndarray, parts, radius_scale: float = 1.0,
                  extra_radius: float = 0.0, value: float = 255.0) -> None:  # fmt: skip
    """Draws `slab_segments` output into a coverage mask, brightest last.

    Lines of one pixel width and one brightness go to OpenCV in one call.
    """
    x0, y0, x1, y1, r, fill, _ = parts
    if len(r) == 0:
        return
    radius = r * radius_scale + extra_radius
    width = 2.0 * radius / cv.mm
    thickness = np.maximum(np.rint(width), 1).astype(int)
    level = value * fill * np.minimum(1.0, width / thickness)
    level = np.rint(level / 16.0).astype(int) * 16  # 16 brightness steps, one call each
    order = np.lexsort((thickness, level))
    a = cv.points(x0[order], y0[order])
    b = cv.points(x1[order], y1[order])
    keys = np.stack([level[order], thickness[order]], axis=1)
    breaks = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(order)]):
        lv, th = keys[lo]
        if lv <= 0:
            continue
        lines = list(np.stack([a[lo:hi], b[lo:hi]], axis=1))
        cv2.polylines(mask, lines, False, int(min(lv, 255)), int(th), AA, SHIFT)
