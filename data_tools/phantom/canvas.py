"""Drawing in millimetres on a slice: anti-aliased coverage masks (OpenCV) and blending.

Every structure of the phantom is drawn as a coverage mask, 0 to 255 per pixel, with
OpenCV's anti-aliased primitives at 1/16 pixel precision: a pixel that an edge cuts gets
the fraction it is covered, the partial-volume effect of a real scanner at every edge,
for the price of a C drawing call. Blending a mask into the HU image then mixes the
structure's HU with what lies under it by that fraction.
"""

from __future__ import annotations

import cv2
import numpy as np

SHIFT = 4  # fixed-point bits of OpenCV's sub-pixel coordinates
_ONE = 1 << SHIFT
AA = cv2.LINE_AA


class Canvas:
    """The pixel grid of a square slice over a field of view, in patient millimetres.

    x runs to the image's right (the patient's left), y to the image's bottom (posterior),
    both 0 at the centre of the field of view.
    """

    def __init__(self, size: int, fov_mm: float):
        self.size = size
        self.mm = fov_mm / size  # pixel spacing
        c = (np.arange(size, dtype=np.float32) - (size - 1) / 2) * self.mm
        self.xx, self.yy = np.meshgrid(c, c)

    def blank(self) -> np.ndarray:
        return np.zeros((self.size, self.size), np.uint8)

    def point(self, x: float, y: float) -> tuple[int, int]:
        """Fixed-point pixel coordinates of a point, for OpenCV's `shift` argument."""
        half = (self.size - 1) / 2
        return int(round((x / self.mm + half) * _ONE)), int(round((y / self.mm + half) * _ONE))

    def points(self, xs, ys) -> np.ndarray:
        half = (self.size - 1) / 2
        px = np.rint((np.asarray(xs) / self.mm + half) * _ONE)
        py = np.rint((np.asarray(ys) / self.mm + half) * _ONE)
        return np.stack([px, py], axis=-1).astype(np.int32)

    def ellipse(self, mask, x, y, ax, ay, angle_deg=0.0, value=255):
        """Fills an ellipse (centre and semi-axes in mm, rotated clockwise on screen)."""
        axes = (max(int(round(ax / self.mm * _ONE)), 1), max(int(round(ay / self.mm * _ONE)), 1))
        cv2.ellipse(mask, self.point(x, y), axes, angle_deg, 0, 360, int(value), -1, AA, SHIFT)

    def polygon(self, mask, xs, ys, value=255):
        cv2.fillPoly(mask, [self.points(xs, ys)], int(value), AA, SHIFT)

    def tube(self, mask, x0, y0, x1, y1, radius_mm, value=255):
        """A line of the given radius with round ends; thinner than a pixel, a fainter one."""
        width = 2.0 * radius_mm / self.mm
        thickness = max(int(round(width)), 1)
        value = value * min(1.0, width / thickness)
        cv2.line(
            mask, self.point(x0, y0), self.point(x1, y1), int(round(value)), thickness, AA, SHIFT
        )

    def polylines(self, mask, lines, radius_mm, value=255):
        """Many open polylines (lists of (x, y) mm arrays) of one radius, in one call."""
        width = 2.0 * radius_mm / self.mm
        thickness = max(int(round(width)), 1)
        value = value * min(1.0, width / thickness)
        pts = [self.points(line[:, 0], line[:, 1]) for line in lines]
        cv2.polylines(mask, pts, False, int(round(value)), thickness, AA, SHIFT)


def blend(hu: np.ndarray, mask: np.ndarray, value) -> None:
    """hu += coverage * (value - hu), in place; `value` a number or an HU image.

    Only the mask's bounding box is touched: most structures are small.
    """
    box = bbox(mask)
    if box is None:
        return
    cover = mask[box].astype(np.float32)
    cover *= 1.0 / 255.0
    target = hu[box]
    target += cover * ((value if np.isscalar(value) else value[box]) - target)


def bbox(mask: np.ndarray):
    """(row slice, column slice) around a mask's nonzero pixels, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
