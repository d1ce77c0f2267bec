"""One synthetic patient in memory: anatomy, trees and lesions rendered slice by slice."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from data_tools.phantom import lesions as lesion_lib
from data_tools.phantom.anatomy import CHEST_MM, Anatomy, distance_to_pleura
from data_tools.phantom.canvas import Canvas, blend
from data_tools.phantom.trees import (
    Tree,
    bronchi,
    concat,
    draw_segments,
    make_tree,
    slab_segments,
)

FOV_MM = 360.0
AIR = -1000.0
SLICE_RANGE = (20, 40)  # slices per patient (inclusive) over the 300 mm every phantom covers
MIN_SLICES = 4


@dataclasses.dataclass
class PhantomPatient:
    """One synthetic patient in memory.

    Attributes:
        hu: [Z, H, W] float32 Hounsfield units; slice 0 is the lowest (feet side), row 0
            anterior, column 0 the patient's right (the usual axial display).
        lesions: [Z, H, W] uint8 labels (`LABELS`).
        lung: [Z, H, W] bool true lungs, lesions inside them included.
        spacing_mm: (row, column, slice) spacing.
        diagnosis, severity: Patient-level labels.
    """

    hu: np.ndarray
    lesions: np.ndarray
    lung: np.ndarray
    spacing_mm: tuple[float, float, float]
    diagnosis: str
    severity: str


def check_slice_range(slice_range) -> tuple[int, int]:
    """(low, high) slices per patient, or ValueError naming the problem."""
    try:
        low, high = (int(v) for v in slice_range)
    except (TypeError, ValueError):
        raise ValueError(f"slices per patient must be two integers, got {slice_range!r}") from None
    if not MIN_SLICES <= low <= high:
        raise ValueError(
            f"slices per patient must satisfy {MIN_SLICES} <= low <= high, got [{low}, {high}]"
        )
    return low, high


class _Textures:
    """Per-patient fields larger than a slice; each slice takes a window at random."""

    def __init__(self, rng, cv: Canvas):
        n = self.n = cv.size
        self.pad = max(n // 8, 2)
        big = Canvas(n + 2 * self.pad, cv.mm * (n + 2 * self.pad))
        shape = (big.size, big.size)
        self.lung = self._smooth(rng.standard_normal(shape, dtype=np.float32), 2.0 / cv.mm)
        self.grain = self._smooth(rng.standard_normal(shape, dtype=np.float32), 0.6)
        self.septa = self._net(rng, big, spacing=12.0, radius=0.5)  # secondary lobules
        self.reticulum = self._net(rng, big, spacing=5.0, radius=0.8)

    @staticmethod
    def _smooth(noise, sigma_px):
        out = cv2.GaussianBlur(noise, (0, 0), max(sigma_px, 0.3))
        return out / max(float(out.std()), 1e-6)

    @staticmethod
    def _net(rng, cv: Canvas, spacing, radius):
        """A polygonal network of lines (jittered grid), as 0-1 coverage."""
        extent = cv.size * cv.mm / 2
        ticks = np.arange(-extent, extent + spacing, spacing)
        gx, gy = np.meshgrid(ticks, ticks)
        gx = gx + rng.normal(0, 0.3 * spacing, gx.shape)
        gy = gy + rng.normal(0, 0.3 * spacing, gy.shape)
        grid = np.stack([gx, gy], axis=-1)
        lines = list(grid) + list(grid.transpose(1, 0, 2))
        mask = cv.blank()
        cv.polylines(mask, lines, radius)
        return mask.astype(np.float32) / 255.0

    def window(self, rng):
        o = rng.integers(0, 2 * self.pad + 1, 2)
        return np.s_[o[0] : o[0] + self.n, o[1] : o[1] + self.n]


class _Slice:
    """What the lesions need from the slice they are drawn on."""

    def __init__(self, lung, mm, fissure, thickness):
        self.lung, self.mm, self.fissure = lung, mm, fissure
        self.thickness = thickness
        self._pleura = None

    def pleura(self):
        if self._pleura is None:
            self._pleura = distance_to_pleura(self.lung, self.mm)
        return self._pleura


class _Patient:
    def __init__(self, rng, size, diagnosis, severity):
        self.rng = rng
        self.cv = Canvas(size, FOV_MM)
        an = self.an = Anatomy(rng)
        self.tex = _Textures(rng, self.cv)
        self.par = an.parenchyma(self.cv)
        self.tex_sigma = rng.uniform(8, 15)
        self.noise = rng.uniform(10, 22)
        self.trees(rng)
        sampler = lesion_lib.LungSampler(an, rng, FOV_MM)
        if diagnosis == "covid":
            self.lesions = lesion_lib.covid(rng, an, sampler, severity)
        elif diagnosis == "bacterial":
            self.lesions = lesion_lib.bacterial(rng, an, sampler, self.arteries)
        elif diagnosis == "viral":
            self.lesions = lesion_lib.viral(rng, an, self.arteries, self.bronchi)
        else:
            self.lesions = []

    def trees(self, rng):
        an = self.an
        hila = []
        for side, drop, lat in ((-1, 22, 10), (1, 28, 14)):
            z = an.carina - drop
            w = an.mediastinal_half_width(z)
            hila.append((side, np.array([an.xm + side * (w + lat), an.y_trachea + 6, z])))
        self.arteries = concat(*(make_tree(rng, h, s, 5.5, 28.0, 8) for s, h in hila))
        veins = []
        for side, _ in hila:
            root = (an.xm + side * (an.mediastinal_half_width(135) + 4),
                    an.y_front + 0.55 * an.depth, 135.0)  # fmt: skip
            veins.append(make_tree(rng, root, side, 5.0, 26.0, 7))
        self.vessels = concat(self.arteries, *veins)
        self.bronchi = bronchi(self.arteries, 4)
        carina = np.array([an.xm, an.y_trachea, an.carina])
        ends = np.array([h for _, h in hila])
        self.main_bronchi = Tree(
            np.stack([carina, carina]), ends, np.array([6.5, 6.0]), np.zeros(2, int)
        )

    def render(self, z, thickness):
        cv, an, rng = self.cv, self.an, self.rng
        hu = np.full((cv.size, cv.size), AIR, np.float32)
        an.draw_body(cv, z, hu)
        self._airways(hu, self.main_bronchi, z, thickness, None)
        lung = an.lungs(cv, z)
        window = self.tex.window(rng)
        blend(hu, lung, self.par + self.tex.lung[window] * self.tex_sigma)
        lung_f = lung.astype(np.float32) / 255.0
        ctx = _Slice(lung, cv.mm, an.fissure_y(z), thickness)
        labels = np.zeros((cv.size, cv.size), np.uint8)
        found = [(les, lesion_lib.weight(les, cv, z, ctx)) for les in self.lesions]
        found = [(les, w) for les, w in found if w is not None]
        for lesion, (box, w) in found:
            if not lesion.dense:
                self._lesion(hu, labels, lung_f, window, ctx, lesion, box, w)
        vessels = cv.blank()
        draw_segments(cv, vessels, slab_segments(self.vessels, z, thickness))
        blend(hu, (vessels * lung_f).astype(np.uint8), 40.0)
        for lesion, (box, w) in found:
            if lesion.dense:
                self._lesion(hu, labels, lung_f, window, ctx, lesion, box, w)
        self._airways(hu, self.bronchi, z, thickness, lung_f)
        an.draw_bones(cv, z, hu)
        hu = cv2.GaussianBlur(hu, (0, 0), 0.5)
        hu += self.tex.grain[self.tex.window(rng)] * self.noise
        return hu, labels, lung >= 128

    def _lesion(self, hu, labels, lung_f, window, ctx, lesion, box, w):
        w = w * lung_f[box]
        patch = hu[box]
        patch += w * (lesion.hu - patch)
        if lesion.paving:
            patch += w * self.tex.septa[window][box] * 220.0
        if lesion.kind == "fibrosis":
            patch += w * self.tex.reticulum[window][box] * 520.0
            offset = np.abs(ctx.pleura()[box] - 0.5 * lesion.depth)
            band = np.clip((0.5 * lesion.band - offset) / self.cv.mm + 0.5, 0.0, 1.0)
            patch += w * band * (-40.0 - patch)
        if lesion.label:
            labels[box][(w >= 0.5)] = lesion.label

    def _airways(self, hu, tree, z, thickness, lung_f):
        cv = self.cv
        parts = slab_segments(tree, z, thickness)
        if len(parts[4]) == 0:
            return
        wall_factor = self.an.airway_wall
        for scale, extra, value in ((1.0 + 0.15 * wall_factor, 0.25 * wall_factor, 30.0),
                                    (1.0, 0.0, AIR)):  # fmt: skip
            mask = cv.blank()
            draw_segments(cv, mask, parts, radius_scale=scale, extra_radius=extra)
            if lung_f is not None:
                mask = (mask * lung_f).astype(np.uint8)
            blend(hu, mask, value)


def make_patient(
    seed: int,
    size: int = 512,
    diagnosis: str = "covid",
    severity: str = "moderate",
    n_slices: int | None = None,
    slice_range: tuple[int, int] = SLICE_RANGE,
) -> PhantomPatient:
    """Generates one synthetic patient in memory (deterministic for the arguments).

    The slices cover the same 300 mm of chest whatever their number: `n_slices`, or a
    seeded draw from `slice_range` (inclusive), sets the slice thickness and spacing.
    """
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even number >= 32, got {size}")
    check_slice_range(slice_range)
    rng = np.random.default_rng([seed, size])
    n_slices = int(n_slices or rng.integers(slice_range[0], slice_range[1] + 1))
    patient = _Patient(rng, size, diagnosis, severity)
    thickness = CHEST_MM / n_slices
    hu = np.empty((n_slices, size, size), np.float32)
    labels = np.empty((n_slices, size, size), np.uint8)
    lung = np.empty((n_slices, size, size), bool)
    for k in range(n_slices):
        hu[k], labels[k], lung[k] = patient.render((k + 0.5) * thickness, thickness)
    np.clip(hu, -1024, 3071, out=hu)
    spacing = FOV_MM / size
    return PhantomPatient(hu, labels, lung, (spacing, spacing, thickness), diagnosis, severity)
