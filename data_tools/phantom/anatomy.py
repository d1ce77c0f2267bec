"""A patient's chest: body outline, chest wall, bones, mediastinum, heart, great vessels,
airways and lungs, drawn slice by slice in millimetres.

The numbers are adult chest anatomy in round figures (body 270-330 mm wide, vertebral
body about 35 mm across, aorta 24-30 mm, trachea 16-20 mm), varied per patient. z runs
from the upper abdomen (0 mm, under the diaphragm's domes) to the thoracic inlet
(300 mm); y is posterior, x the patient's left.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from data_tools.phantom.canvas import Canvas, blend

CHEST_MM = 300.0
ANGLES = np.linspace(0.0, 2.0 * math.pi, 181)[:-1]  # contour vertices, every 2 degrees


class Anatomy:
    """One patient's anatomy parameters (drawn from `rng`) and slice drawing."""

    def __init__(self, rng: np.random.Generator):
        self.half_width = rng.uniform(145, 165)
        self.half_depth = rng.uniform(98, 118)
        self.power = rng.uniform(2.0, 2.6)  # superellipse: 2 an ellipse, larger squarer
        self.harmonics = [(k, rng.normal(0, 0.02), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4)]
        self.y0 = rng.uniform(-4, 8)  # body centre, posterior of the field's centre
        self.fat = rng.uniform(5, 20)  # subcutaneous fat, mm
        self.wall = rng.uniform(10, 14)  # muscle and ribs, mm
        self.fat_hu = rng.uniform(-110, -85)
        self.lung_hu = rng.uniform(-875, -845)
        self.lung_gradient = rng.uniform(40, 80)  # dependent (posterior) lung is denser
        self.rib_spacing = rng.uniform(17, 21)  # degrees between rib sections
        self.rib_phase = rng.uniform(0, 1)
        self.heart_scale = rng.uniform(0.9, 1.1)
        self.dome_right = rng.uniform(45, 65)  # top of the right hemidiaphragm, z mm
        self.dome_left = self.dome_right - rng.uniform(5, 20)
        self.carina = rng.uniform(185, 200)
        self.esophagus_air = bool(rng.uniform() < 0.5)
        self.airway_wall = 1.0  # thickening factor of bronchial walls (viral pneumonia)
        self.xm = rng.uniform(-3, 6)  # mediastinum's midline
        # Mediastinum, front to back: anterior cavity wall to the vertebral body.
        self.y_front = self.y0 - self.cavity_radius(np.array([1.5 * math.pi]))[0]
        self.y_spine = self.y0 + self.cavity_radius(np.array([0.5 * math.pi]))[0] - 6
        self.depth = self.y_spine - self.y_front
        self.y_trachea = self.y_spine - 36

    # ----------------------------------------------------------------- outlines
    def body_radius(self, theta, z=150.0):
        """Skin radius (mm) at angles `theta` (0 the patient's left, pi/2 posterior)."""
        c, s = np.abs(np.cos(theta)), np.abs(np.sin(theta))
        p = self.power
        r = (
            (c / self.half_width) ** p + (s / self.half_depth) ** p
        ) ** (-1.0 / p)  # fmt: skip
        for k, a, phase in self.harmonics:
            r = r * (1.0 + a * np.cos(k * theta + phase))
        return r * (0.95 + 0.07 * z / CHEST_MM)  # a little wider towards the shoulders

    def _wall_thickness(self, theta):
        lateral = np.abs(np.cos(theta))
        posterior = np.exp(-(((theta - 0.5 * math.pi) / 0.45) ** 2))  # paraspinal muscles
        return self.fat * (0.7 + 0.5 * lateral), self.wall + 30.0 * posterior

    def cavity_radius(self, theta, z=150.0):
        fat, wall = self._wall_thickness(theta)
        return self.body_radius(theta, z) - fat - wall

    def _contour(self, radius):
        return radius * np.cos(ANGLES), self.y0 + radius * np.sin(ANGLES)

    # ----------------------------------------------------------------- per slice
    def lungs(self, cv: Canvas, z: float) -> np.ndarray:
        """Lung coverage (uint8, 0-255) of the slice at height z."""
        lung = cv.blank()
        if z > 292:
            return lung
        xs, ys = self._contour(self.cavity_radius(ANGLES, z) - 2.0)  # the pleura
        cv.polygon(lung, xs, ys)
        for shape in self._not_lung(z):
            kind, *args = shape
            getattr(cv, kind)(lung, *args, value=0)
        if z > 225:  # the apices: two shrinking domes
            apex = cv.blank()
            frac = min((z - 225) / (292 - 225), 1.0)
            a = 150 * math.sqrt(max(1.0 - frac**2, 0.0)) + 5
            w = self.mediastinal_half_width(z)
            for side in (-1, 1):
                x = self.xm + side * (w + 0.55 * a)
                cv.ellipse(apex, x, self.y0 + 10, 0.6 * a, 0.75 * a)
            np.minimum(lung, apex, out=lung)
        return lung

    def mediastinal_half_width(self, z):
        return float(np.interp(z, [0, 140, 160, 205, 225, 300], [16, 18, 27, 27, 18, 14]))

    def _heart(self, z):
        half = 70.0 * self.heart_scale
        zc = self.dome_left - 10 + half
        h = 1.0 - ((z - zc) / half) ** 2
        if h <= 0.02 or z > 170:
            return None
        h = math.sqrt(h) * self.heart_scale
        return (self.xm + 16, self.y_front + 48, 54 * h, 40 * h, -30.0)

    def _domes(self, z):
        """(x, y, radius) of each hemidiaphragm's cross-section at height z."""
        out = []
        for side, top, radius in ((-1, self.dome_right, 125.0), (1, self.dome_left, 110.0)):
            zc = top - radius
            r2 = radius**2 - (z - zc) ** 2
            if z < top and r2 > 0:
                out.append((side * 0.42 * self.half_width, self.y0 - 5, math.sqrt(r2)))
        return out

    def _vessels(self, z):
        """Great vessels, oesophagus and trachea: (kind, args..., HU) of this slice."""
        xm, yf, d, ys = self.xm, self.y_front, self.depth, self.y_spine
        out = []
        if z < 215:
            out.append(("ellipse", xm + 24, ys - 12, 12, 12, 0.0, 40.0))  # descending aorta
        if 140 < z < 212:
            out.append(("ellipse", xm - 3, yf + 0.38 * d, 15, 15, 0.0, 40.0))  # ascending
        if 205 < z < 222:
            out.append(("tube", xm - 3, yf + 0.38 * d, xm + 24, ys - 12, 12, 40.0))  # arch
        if 145 < z < 178:
            out.append(("ellipse", xm + 15, yf + 0.22 * d, 13, 13, 0.0, 38.0))  # pulm. trunk
        w = self.mediastinal_half_width(z)
        if 165 < z < 176:
            out.append(("tube", xm + 10, yf + 0.3 * d, xm - w - 14, ys - 30, 9, 38.0))
        if 172 < z < 185:
            out.append(("tube", xm + 15, yf + 0.22 * d, xm + w + 14, ys - 30, 9, 38.0))
        if 150 < z < 245:
            out.append(("ellipse", xm - 23, yf + 0.36 * d, 10, 10, 0.0, 35.0))  # SVC
        if z > 222:
            out.append(("ellipse", xm - 8, yf + 0.42 * d, 6, 6, 0.0, 40.0))
            out.append(("ellipse", xm + 5, yf + 0.47 * d, 4, 4, 0.0, 40.0))
            out.append(("ellipse", xm + 14, yf + 0.56 * d, 5, 5, 0.0, 40.0))
        if 225 < z < 250:
            out.append(("tube", xm + 24, yf + 0.25 * d, xm - 18, yf + 0.3 * d, 5, 35.0))
        out.append(("ellipse", xm + 8, ys - 24, 8, 7, 0.0, 40.0))  # oesophagus
        if z > self.carina:
            out.append(("ellipse", xm, self.y_trachea, 10.5, 9.5, 0.0, 40.0))  # trachea wall
        return out

    def _not_lung(self, z):
        """Shapes (canvas method, args) that the lungs give way to on this slice."""
        w = self.mediastinal_half_width(z)
        top = self.y_front - 4
        shapes = [
            ("polygon",  # narrow behind the sternum (the anterior junction), wider behind
             [self.xm - 7, self.xm + 7, self.xm + w, self.xm + w, self.xm - w, self.xm - w],
             [top, top, top + 0.3 * self.depth, self.y_spine, self.y_spine,
              top + 0.3 * self.depth]),
            ("ellipse", self.xm, self.y_spine + 8, 26, 24),  # vertebra and its muscles
        ]  # fmt: skip
        heart = self._heart(z)
        if heart is not None:
            x, y, ax, ay, angle = heart
            shapes.append(("ellipse", x, y, ax + 5, ay + 5, angle))
        for x, y, r in self._domes(z):
            shapes.append(("ellipse", x, y, r + 2, r + 2))
        for kind, *args, _hu in self._vessels(z):
            if kind == "ellipse":
                x, y, ax, ay, angle = args
                shapes.append(("ellipse", x, y, ax + 2, ay + 2, angle))
            else:
                *ends, r = args
                shapes.append(("tube", *ends, r + 2))
        return shapes

    def draw_body(self, cv: Canvas, z: float, hu: np.ndarray) -> None:
        """Skin, fat, chest wall, mediastinal fat, diaphragm, heart, vessels, airway, spine."""
        mask = cv.blank()
        cv.polygon(mask, *self._contour(self.body_radius(ANGLES, z)))
        blend(hu, mask, self.fat_hu)
        fat, _ = self._wall_thickness(ANGLES)
        mask[:] = 0
        cv.polygon(mask, *self._contour(self.body_radius(ANGLES, z) - fat))
        blend(hu, mask, 50.0)  # muscle
        mask[:] = 0
        cv.polygon(mask, *self._contour(self.cavity_radius(ANGLES, z)))
        blend(hu, mask, self.fat_hu + 15)  # mediastinal fat; the lungs come over it
        cavity = mask.copy()
        for i, (x, y, r) in enumerate(self._domes(z)):
            mask[:] = 0
            cv.ellipse(mask, x, y, r, r)
            blend(hu, np.minimum(mask, cavity), 58.0 if i == 0 else 45.0)  # liver; spleen
        heart = self._heart(z)
        if heart is not None:
            x, y, ax, ay, angle = heart
            mask[:] = 0
            cv.ellipse(mask, x, y, ax + 4, ay + 4, angle)
            blend(hu, mask, self.fat_hu + 10)  # epicardial fat
            mask[:] = 0
            cv.ellipse(mask, x, y, ax, ay, angle)
            blend(hu, mask, 42.0)
        for kind, *args, value in self._vessels(z):
            mask[:] = 0
            getattr(cv, kind)(mask, *args)
            blend(hu, mask, value)
        mask[:] = 0
        if z > self.carina:
            cv.ellipse(mask, self.xm, self.y_trachea, 8.5, 7.5)
        if self.esophagus_air:
            cv.ellipse(mask, self.xm + 8, self.y_spine - 24, 2.5, 1.5)
        blend(hu, mask, -1000.0)
        self._draw_spine(cv, hu)

    def _draw_spine(self, cv: Canvas, hu):
        xm, ys = self.xm, self.y_spine + 8
        cortex, marrow = cv.blank(), cv.blank()
        cv.ellipse(cortex, xm, ys, 17, 15)
        cv.ellipse(marrow, xm, ys, 14.5, 12.5)
        cv.ellipse(cortex, xm, ys + 24, 11, 9)  # neural arch around the canal
        cv.tube(cortex, xm, ys + 30, xm, ys + 44, 3)  # spinous process
        for side in (-1, 1):
            cv.tube(cortex, xm + side * 6, ys + 20, xm + side * 24, ys + 25, 3.5)
        blend(hu, cortex, 700.0)
        blend(hu, marrow, 230.0)
        canal = cv.blank()
        cv.ellipse(canal, xm, ys + 24, 7, 6)
        blend(hu, canal, 15.0)

    def draw_bones(self, cv: Canvas, z: float, hu: np.ndarray) -> None:
        """Ribs in cross-section along the chest wall, costal cartilage, sternum, scapulae."""
        cortex, marrow, cartilage = cv.blank(), cv.blank(), cv.blank()
        step = self.rib_spacing
        for side in (-1, 1):
            for j in range(int(140 // step) + 1):
                alpha = 22 + (j * step + (self.rib_phase * step + 0.4 * z)) % 140
                theta = math.radians(270 - alpha if side < 0 else (270 + alpha) % 360)
                r = self.cavity_radius(np.array([theta]), z)[0] + 6.5
                x, y = r * math.cos(theta), self.y0 + r * math.sin(theta)
                length = 5 + 5 * math.sin(math.radians(alpha))
                angle = math.degrees(theta) + 90
                if alpha < 50 and z < 215:
                    cv.ellipse(cartilage, x, y, length, 3.5, angle)
                else:
                    cv.ellipse(cortex, x, y, length, 3.5, angle)
                    cv.ellipse(marrow, x, y, length - 1.5, 2.0, angle)
                if z > 170 and j == 0:  # the scapula behind the upper ribs
                    t0, t1 = math.radians(130), math.radians(150)
                    pts = []
                    for t in (t0, t1):
                        t = math.pi - t if side > 0 else t
                        rr = self.cavity_radius(np.array([t]), z)[0] + 20
                        pts += [rr * math.cos(t), self.y0 + rr * math.sin(t)]
                    cv.tube(cortex, *pts, 2.0)
        if 105 < z < 268:
            y = self.y_front - 6
            wide = 1.6 if z > 235 else 1.0
            cv.ellipse(cortex, self.xm, y, 13 * wide, 6)
            cv.ellipse(marrow, self.xm, y, 11 * wide, 3.8)
        blend(hu, cartilage, 130.0)
        blend(hu, cortex, 750.0)
        blend(hu, marrow, 220.0)

    def parenchyma(self, cv: Canvas) -> np.ndarray:
        """Lung HU before texture: denser towards the back (gravity, supine)."""
        dependent = np.clip((cv.yy - self.y_front) / self.depth, 0.0, 1.0)
        return (self.lung_hu + self.lung_gradient * dependent * dependent).astype(np.float32)

    def fissure_y(self, z: float) -> float:
        """y of the major fissure at height z: the lower lobe lies behind it."""
        return self.y_front + self.depth * float(np.clip((z - 40.0) / 170.0, 0.0, 1.0))


def distance_to_pleura(lung: np.ndarray, mm: float) -> np.ndarray:
    """Distance (mm) of each lung pixel to the lung's edge."""
    return cv2.distanceTransform((lung >= 128).astype(np.uint8), cv2.DIST_L2, 3) * mm
