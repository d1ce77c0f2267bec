"""Synthetic chest-CT cohort: real DICOM series with COVID-19-like lesions and masks.

    python -m data_tools.phantom --out DIR --patients N --seed S [--size 512] [--mix default]

Each patient is a DICOM CT series (CT Image Storage, int16 with rescale slope/intercept,
pixel spacing, slice geometry, study/series/SOP UIDs and a fake name and ID) of 20-40
axial slices, a lesion label volume ``lesions.nii.gz`` (0 background, 1 ground-glass
opacity, 2 consolidation, 3 fibrosis) aligned to the series by its affine, and a row of
``manifest.csv`` (patient ID, diagnosis, severity).

The anatomy makes the task honest rather than trivial: body outline with fat and muscle,
ribs, spine, mediastinum, heart and aorta, trachea, two lungs (about -850 HU) with vessels,
CT-like blur and noise. COVID-19 patients have peripheral, multifocal ground-glass
opacities (-700 to -300 HU, soft edges), small compact consolidations (-100 to +50 HU) and,
mostly when severe, fibrotic bands; lesions cover only some slices and their burden grows
with severity, with overlap between severities. Healthy patients have clear lungs;
bacterial pneumonia shows lobar consolidation with air bronchograms, and viral (non-COVID)
pneumonia the airway-centred pattern of, e.g., influenza: thickened bronchial walls,
clustered centrilobular nodules and faint peribronchovascular ground glass (the
"atypical" appearances of the RSNA consensus statement, Simpson et al. 2020). Neither is
labelled as a COVID lesion, so a slice classifier has to tell the patterns apart.

Everything is deterministic for a seed. Synthetic data: research and testing only.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

LABELS = {"ggo": 1, "consolidation": 2, "fibrosis": 3}
FOV_MM = 360.0
AIR = -1000.0

# A balanced cohort pattern: half COVID-19 (mild, moderate, severe), half other diagnoses.
COHORT_PATTERN = (
    ("covid", "mild"),
    ("covid", "moderate"),
    ("covid", "severe"),
    ("healthy", "none"),
    ("bacterial", "none"),
    ("covid", "mild"),
    ("covid", "moderate"),
    ("viral", "none"),
    ("covid", "severe"),
    ("healthy", "none"),
)
# Half COVID-19, a tenth healthy and four tenths bacterial or viral pneumonia: more of the
# hard negatives (patterns a segmenter can take for COVID-19 lesions) for small cohorts.
PNEUMONIA_PATTERN = (
    ("covid", "mild"),
    ("covid", "moderate"),
    ("covid", "severe"),
    ("bacterial", "none"),
    ("viral", "none"),
    ("covid", "mild"),
    ("covid", "moderate"),
    ("bacterial", "none"),
    ("viral", "none"),
    ("healthy", "none"),
)
COHORT_MIXES = {"default": COHORT_PATTERN, "pneumonia": PNEUMONIA_PATTERN}

# Slices per patient (inclusive range) over the 300 mm of chest every phantom covers.
SLICE_RANGE = (20, 40)
MIN_SLICES = 4


def phantom_patient_id(seed: int, index: int) -> str:
    """The (fake) PatientID that `make_cohort` writes for patient `index` of cohort `seed`."""
    return f"PHANTOM-{seed:04d}-{index:04d}"


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


@dataclasses.dataclass
class _Lesion:
    # ggo | consolidation | fibrosis | mimic (an unlabelled pneumonia blob) | airway (an
    # unlabelled band: air bronchogram, bronchial wall)
    kind: str
    center: tuple[float, float, float]  # u (x), v (y), t (z in [0, 1])
    axes: tuple[float, float, float]
    hu: float
    edge: float  # softness of the profile, 0 (sharp) to 1 (soft)
    end: tuple[float, float] = (0.0, 0.0)  # fibrosis, airway: the band's other end (u, v)
    label: int = 0
    z_power: float = 2.0  # profile along z: 2 an ellipsoid; larger ends flatter (a fissure)


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _ellipse(uu, vv, cu, cv, au, av):
    return ((uu - cu) / au) ** 2 + ((vv - cv) / av) ** 2 <= 1.0


def _lung_scale(t):
    """Lung cross-section scale along z: widest below the middle, small at the apex."""
    return math.sqrt(max(0.0, 1.0 - ((t - 0.4) / 0.64) ** 2)) if t <= 1.04 else 0.0


def _heart_scale(t):
    return math.sqrt(max(0.0, 1.0 - ((t - 0.22) / 0.36) ** 2))


class _Anatomy:
    """Per-patient anatomy parameters and the slice-independent maps."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.size = size
        c = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / (size / 2)
        self.uu, self.vv = np.meshgrid(c, c)  # uu: x (columns), vv: y (rows, posterior +)
        self.bx, self.by = rng.uniform(0.80, 0.90), rng.uniform(0.56, 0.66)
        self.lung_dx = rng.uniform(0.37, 0.43)
        self.lung_au = rng.uniform(0.25, 0.30)
        self.lung_av = rng.uniform(0.37, 0.43)
        self.lung_hu = rng.uniform(-880, -830)
        self.noise = rng.uniform(12, 25)
        self.rib_phase = rng.uniform(0, 0.3)
        uu, vv = self.uu, self.vv
        body = _ellipse(uu, vv, 0, 0.02, self.bx, self.by)
        self.body = body
        static = np.full((size, size), AIR, np.float32)
        static[body] = -100.0  # subcutaneous fat
        static[_ellipse(uu, vv, 0, 0.02, self.bx * 0.93, self.by * 0.91)] = 45.0  # muscle
        static[_ellipse(uu, vv, 0, 0.02, self.bx * 0.86, self.by * 0.83)] = 20.0  # cavity
        static[_ellipse(uu, vv, 0.0, -0.04, 0.15, 0.40)] = 35.0  # mediastinum
        static[_ellipse(uu, vv, -0.07, 0.22, 0.055, 0.055)] = 45.0  # descending aorta
        vertebra = _ellipse(uu, vv, 0.0, 0.43, 0.095, 0.08)
        static[vertebra] = 850.0
        static[_ellipse(uu, vv, 0.0, 0.43, 0.075, 0.06)] = 280.0
        static[_ellipse(uu, vv, 0.0, 0.555, 0.035, 0.03)] = 25.0  # spinal canal
        static[_ellipse(uu, vv, 0.0, -self.by * 0.84, 0.05, 0.025)] = 600.0  # sternum
        self.static = static
        # Lungs stay inside the rib cage and out of the mediastinum and spine.
        self.lung_allowed = (
            _ellipse(uu, vv, 0.0, 0.02, self.bx * 0.8, self.by * 0.78)
            & ~_ellipse(uu, vv, 0.0, -0.04, 0.17, 0.42)
            & ~_ellipse(uu, vv, 0.0, 0.43, 0.13, 0.12)
        )

    def ribs(self, t: float):
        """Rib cross-sections on this slice: (u, v) centres along the chest wall."""
        out = []
        for side in (-1, 1):
            for j in range(7):
                angle = 0.25 + j * 0.38 + self.rib_phase + 0.25 * t
                u = side * self.bx * 0.885 * math.sin(angle)
                v = 0.02 - self.by * 0.865 * math.cos(angle)
                out.append((u, v))
        return out


def _ellipse_in_box(an: _Anatomy, cu, cv, au, av):
    """Full-size mask of an ellipse, evaluated only inside its bounding box."""
    mask = np.zeros(an.uu.shape, bool)
    box = _box(an, cu, cv, au, av)
    mask[box] = _ellipse(an.uu[box], an.vv[box], cu, cv, au, av)
    return mask


def _heart(an: _Anatomy, t: float):
    h = _heart_scale(t)
    if h <= 0.05:
        return None
    return _ellipse_in_box(an, 0.08, 0.02, 0.27 * h, 0.23 * h)


def _lungs(an: _Anatomy, t: float, heart):
    """Both lung masks of a slice (before vessels and lesions)."""
    s = _lung_scale(t)
    if s < 0.12:
        return np.zeros_like(an.body)
    right = _ellipse_in_box(an, -an.lung_dx, -0.02, an.lung_au * s * 1.05, an.lung_av * s)
    left = _ellipse_in_box(an, an.lung_dx, -0.02, an.lung_au * s, an.lung_av * s)
    lungs = (right | left) & an.lung_allowed
    if heart is not None:
        lungs &= ~heart
    return lungs


def _sample_lung_point(rng, an: _Anatomy, t: float, radius_range):
    """A point in one lung at a fraction of its radius (peripheral: near 1; central: small)."""
    s = max(_lung_scale(t), 0.3)
    side = rng.choice((-1, 1))
    # Lesions lie lateral, anterior or posterior, not on the mediastinal side.
    angle = rng.uniform(-0.6 * math.pi, 0.6 * math.pi) + (0 if side > 0 else math.pi)
    r = rng.uniform(*radius_range)
    u = side * an.lung_dx + math.cos(angle) * r * an.lung_au * s
    v = -0.02 + math.sin(angle) * r * an.lung_av * s
    return float(u), float(v)


def _make_lesions(rng, an: _Anatomy, diagnosis: str, severity: str) -> list[_Lesion]:
    lesions: list[_Lesion] = []
    if diagnosis == "covid":
        n_ggo, n_cons, n_fib, r_ggo = {
            "mild": ((2, 4), (0, 1), (0, 0), (0.03, 0.07)),
            "moderate": ((4, 8), (1, 3), (0, 1), (0.04, 0.10)),
            "severe": ((8, 14), (3, 5), (2, 5), (0.06, 0.15)),
        }[severity]
        for _ in range(rng.integers(n_ggo[0], n_ggo[1] + 1)):
            t = rng.uniform(0.1, 0.8)
            u, v = _sample_lung_point(rng, an, t, (0.65, 0.92))
            a = rng.uniform(*r_ggo)
            lesions.append(
                _Lesion(
                    "ggo",
                    (u, v, t),
                    (a * rng.uniform(0.7, 1.3), a, rng.uniform(0.06, 0.2)),
                    rng.uniform(-700, -300),
                    0.7,
                    label=LABELS["ggo"],
                )
            )
        for _ in range(rng.integers(n_cons[0], n_cons[1] + 1)):
            t = rng.uniform(0.1, 0.7)
            u, v = _sample_lung_point(rng, an, t, (0.6, 0.85))
            a = rng.uniform(0.045, 0.09)  # 1.6 to 3.2 cm across
            lesions.append(
                _Lesion(
                    "consolidation",
                    (u, v, t),
                    (a, a * rng.uniform(0.7, 1.2), rng.uniform(0.07, 0.16)),
                    rng.uniform(-100, 50),
                    0.25,
                    label=LABELS["consolidation"],
                )
            )
        for _ in range(rng.integers(n_fib[0], n_fib[1] + 1)):
            t = rng.uniform(0.05, 0.5)
            u0, v0 = _sample_lung_point(rng, an, t, (0.55, 0.85))
            u1, v1 = u0 + rng.uniform(-0.12, 0.12), v0 + rng.uniform(-0.12, 0.12)
            width = rng.uniform(0.008, 0.014)
            lesions.append(
                _Lesion(
                    "fibrosis",
                    (u0, v0, t),
                    (width, width, rng.uniform(0.05, 0.12)),
                    rng.uniform(-250, -50),
                    0.3,
                    end=(u1, v1),
                    label=LABELS["fibrosis"],
                )
            )
    elif diagnosis == "bacterial":  # lobar consolidation of a lower lobe (unlabelled)
        side = rng.choice((-1, 1))
        t = rng.uniform(0.15, 0.35)
        depth = rng.uniform(0.12, 0.2)
        lesions.append(
            _Lesion(
                "mimic",
                (side * an.lung_dx, 0.15, t),
                (an.lung_au * 1.1, an.lung_av * 0.55, depth),
                rng.uniform(-60, 40),
                0.15,
                z_power=8.0,  # fills the lobe up to its fissure rather than tapering off
            )
        )
        # Air bronchograms: aerated bronchi branching through the consolidated lobe.
        for _ in range(rng.integers(4, 8)):
            u0 = side * (an.lung_dx - an.lung_au * rng.uniform(0.2, 0.5))
            v0 = rng.uniform(0.0, 0.12)
            angle = rng.uniform(0.1, 0.9) * math.pi  # posterior and lateral, away from the hilum
            length = rng.uniform(0.12, 0.25)
            u1 = u0 + side * abs(math.cos(angle)) * length
            v1 = v0 + math.sin(angle) * length * 0.8
            width = rng.uniform(0.008, 0.013)
            lesions.append(
                _Lesion(
                    "airway",
                    (u0, v0, t + rng.uniform(-0.5, 0.5) * depth),
                    (width, width, rng.uniform(0.04, 0.1)),
                    rng.uniform(-980, -920),
                    0.3,
                    end=(u1, v1),
                )
            )
    elif diagnosis == "viral":  # airway-centred (bronchiolitis) pattern, both lungs (unlabelled)
        # Bronchi with thickened walls running out from the hilum, faint ground glass around
        # some of them (peribronchovascular) and clusters of centrilobular nodules
        # (tree-in-bud) along their course.
        for side in (-1, 1):
            for _ in range(rng.integers(2, 5)):
                t = rng.uniform(0.2, 0.8)
                u0 = side * (an.lung_dx - an.lung_au * rng.uniform(0.3, 0.6))
                v0 = rng.uniform(-0.12, 0.12)
                angle = rng.uniform(-0.45, 0.45) * math.pi
                length = rng.uniform(0.12, 0.22)
                u1 = u0 + side * math.cos(angle) * length
                v1 = v0 + math.sin(angle) * length
                at = rng.uniform(0.05, 0.12)
                if rng.uniform() < 0.6:
                    a = rng.uniform(0.04, 0.07)
                    lesions.append(
                        _Lesion(
                            "mimic",
                            ((u0 + u1) / 2, (v0 + v1) / 2, t),
                            (a, a * rng.uniform(0.8, 1.3), at),
                            rng.uniform(-740, -600),
                            0.8,
                        )
                    )
                wall = rng.uniform(0.012, 0.018)
                lesions.append(
                    _Lesion(
                        "airway",
                        (u0, v0, t),
                        (wall, wall, at),
                        rng.uniform(-80, 20),
                        0.3,
                        end=(u1, v1),
                    )
                )
                lesions.append(
                    _Lesion(
                        "airway",
                        (u0, v0, t),
                        (wall * 0.45, wall * 0.45, at),
                        -990.0,
                        0.2,
                        end=(u1, v1),
                    )
                )
                for _ in range(rng.integers(8, 16)):
                    f = rng.uniform(0.2, 1.3)
                    r = rng.uniform(0.01, 0.02)
                    lesions.append(
                        _Lesion(
                            "mimic",
                            (
                                u0 + f * (u1 - u0) + rng.normal(0, 0.03),
                                v0 + f * (v1 - v0) + rng.normal(0, 0.03),
                                t + rng.normal(0, 0.5 * at),
                            ),
                            (r, r, rng.uniform(0.02, 0.04)),
                            rng.uniform(-350, -50),
                            0.4,
                        )
                    )
    return lesions


def _box(an: _Anatomy, cu, cv, ru, rv):
    """Pixel bounding box (row slice, column slice) of an ellipse in normalised units."""
    n = an.size
    c0 = max(int((cu - ru + 1) * n / 2) - 1, 0)
    c1 = min(int((cu + ru + 1) * n / 2) + 2, n)
    r0 = max(int((cv - rv + 1) * n / 2) - 1, 0)
    r1 = min(int((cv + rv + 1) * n / 2) + 2, n)
    return slice(r0, r1), slice(c0, c1)


def _lesion_weight(an: _Anatomy, lesion: _Lesion, t: float):
    """Blend weight of a lesion on this slice, as (box, weight) or None."""
    cu, cv, ct = lesion.center
    au, av, at = lesion.axes
    dz = abs((t - ct) / at) ** lesion.z_power
    if dz >= 1.0:
        return None
    if lesion.kind in ("fibrosis", "airway"):
        u1, v1 = lesion.end
        pad = au * 2
        box = _box(an, (cu + u1) / 2, (cv + v1) / 2, abs(u1 - cu) / 2 + pad, abs(v1 - cv) / 2 + pad)
        uu, vv = an.uu[box], an.vv[box]
        du, dv = u1 - cu, v1 - cv
        seg = max(du * du + dv * dv, 1e-9)
        s = np.clip(((uu - cu) * du + (vv - cv) * dv) / seg, 0.0, 1.0)
        dist2 = (uu - cu - s * du) ** 2 + (vv - cv - s * dv) ** 2
        r2 = dist2 / (au * au) + dz
    else:
        scale = math.sqrt(1.0 - dz)
        box = _box(an, cu, cv, au * scale, av * scale)
        uu, vv = an.uu[box], an.vv[box]
        r2 = ((uu - cu) / au) ** 2 + ((vv - cv) / av) ** 2 + dz
    weight = _smoothstep((1.0 - r2) / max(lesion.edge, 1e-3))
    return box, weight


def _render_slice(rng, an: _Anatomy, t: float, lesions: list[_Lesion]):
    n = an.size
    hu = an.static.copy()
    heart = _heart(an, t)
    lungs = _lungs(an, t, heart)
    # Trachea in the upper chest, in the mediastinum.
    if t > 0.72:
        box = _box(an, 0.0, -0.2, 0.06, 0.06)
        hu[box][_ellipse(an.uu[box], an.vv[box], 0.0, -0.2, 0.045, 0.04)] = -990.0
    if heart is not None:
        hu[heart] = 40.0
    hu[lungs] = an.lung_hu
    # Ribs: cortical ring around marrow, on the chest wall.
    ru, rv = 0.028, 0.018
    for u, v in an.ribs(t):
        box = _box(an, u, v, ru, rv)
        uu, vv = an.uu[box], an.vv[box]
        r2 = ((uu - u) / ru) ** 2 + ((vv - v) / rv) ** 2
        patch = hu[box]
        patch[r2 <= 1.0] = 700.0
        patch[r2 <= 0.45] = 250.0
        lungs[box] &= r2 > 1.3  # the pleura and chest wall lie between rib and lung
    # Vessels: bright blobs in the lungs, larger and denser towards the hilum.
    if lungs.any():
        rows, cols = np.nonzero(lungs)
        n_vessels = int(40 * _lung_scale(t)) + 5
        idx = rng.integers(0, len(rows), n_vessels)
        vessel = np.zeros((n, n), np.float32)
        vessel[rows[idx], cols[idx]] = 1.0
        central = 1.0 - np.minimum(np.abs(an.uu[rows[idx], cols[idx]]) / 0.7, 1.0)
        vessel[rows[idx], cols[idx]] = 0.4 + 0.6 * central
        sigma = 1.2 * n / 512
        vessel = ndimage.gaussian_filter(vessel, sigma) * (2 * math.pi * sigma * sigma)
        hu += np.where(lungs, np.minimum(vessel, 1.0) * 880.0, 0.0).astype(np.float32)
    labels = np.zeros((n, n), np.uint8)
    lung_truth = lungs.copy()
    for lesion in lesions:
        found = _lesion_weight(an, lesion, t)
        if found is None:
            continue
        box, weight = found
        inside = lungs[box]
        weight = weight * inside
        if lesion.kind in ("ggo", "mimic") and lesion.edge > 0.5:
            weight = weight * rng.uniform(0.8, 1.0, weight.shape).astype(np.float32)
        patch = hu[box]
        patch += weight * (lesion.hu - patch)
        if lesion.label:
            lab = labels[box]
            lab[(weight >= 0.5) & inside] = lesion.label
        lung_truth[box] |= (weight >= 0.5) & inside
    hu = ndimage.gaussian_filter(hu, 0.7 * n / 512)
    hu += rng.standard_normal((n, n), dtype=np.float32) * an.noise
    return hu, labels, lung_truth


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
    seeded draw from `slice_range` (inclusive), sets the slice spacing.
    """
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even number >= 32, got {size}")
    check_slice_range(slice_range)
    rng = np.random.default_rng([seed, size])
    an = _Anatomy(rng, size)
    n_slices = int(n_slices or rng.integers(slice_range[0], slice_range[1] + 1))
    lesions = _make_lesions(rng, an, diagnosis, severity)
    hu = np.empty((n_slices, size, size), np.float32)
    labels = np.empty((n_slices, size, size), np.uint8)
    lung = np.empty((n_slices, size, size), bool)
    for z in range(n_slices):
        t = z / max(n_slices - 1, 1)
        hu[z], labels[z], lung[z] = _render_slice(rng, an, t, lesions)
    np.clip(hu, -1024, 3071, out=hu)
    spacing = FOV_MM / size
    return PhantomPatient(
        hu, labels, lung, (spacing, spacing, 300.0 / n_slices), diagnosis, severity
    )


# ----------------------------------------------------------------------------- writing


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def write_patient(
    patient: PhantomPatient,
    folder: Path,
    *,
    patient_id: str,
    patient_name: str,
    birth_date: str = "19600101",
    seed: int = 0,
    signed: bool = True,
) -> None:
    """Writes a patient as a DICOM series in ``folder/ct`` and ``folder/lesions.nii.gz``.

    Args:
        patient: From `make_patient`.
        folder: Destination (created).
        patient_id, patient_name, birth_date: The (fake) identifiers written into DICOM.
        seed: Makes the UIDs deterministic.
        signed: Signed pixels with intercept 0 (and padding outside the field of view), or
            unsigned 12-bit with intercept -1024, the two conventions scanners use.
    """
    import nibabel as nib
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pydicom.valuerep import DS

    def decimal(*values):  # Decimal Strings (DS) of at most 16 characters, as the VR says
        return [DS(v, auto_format=True) for v in values]

    ct_dir = folder / "ct"
    ct_dir.mkdir(parents=True, exist_ok=True)
    z_count, rows, cols = patient.hu.shape
    dr, dc, dz = patient.spacing_mm
    x0, y0, z0 = -dc * (cols - 1) / 2, -dr * (rows - 1) / 2, -150.0
    study, series, frame = (_uid(seed, patient_id, k) for k in ("study", "series", "frame"))
    yy, xx = np.mgrid[:rows, :cols]
    outside = (yy - (rows - 1) / 2) ** 2 + (xx - (cols - 1) / 2) ** 2 > (min(rows, cols) / 2) ** 2
    for z in range(z_count):
        sop = _uid(seed, patient_id, "sop", z)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PatientBirthDate, ds.PatientSex = birth_date, "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate = ds.SeriesDate = "20200401"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Manufacturer = "tfcovseg synthetic phantom"
        ds.PositionReferenceIndicator = ""
        ds.StudyDescription = "Synthetic chest CT phantom (tfcovseg)"
        ds.SeriesNumber = 1
        # Supine (anterior at the top of the image), head first into the gantry.
        ds.PatientPosition, ds.BodyPartExamined = "HFS", "CHEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP, ds.AcquisitionNumber = "120", 1
        ds.InstanceNumber = z_count - z  # head first, as many scanners number them
        ds.ImagePositionPatient = decimal(x0, y0, z0 + z * dz)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = decimal(dr, dc)
        ds.SliceThickness = decimal(dz)[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = 16
        hu = np.rint(patient.hu[z]).astype(np.int16)
        if signed:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope = 0, 1
            stored = hu.copy()
            stored[outside] = -2000
            ds.PixelPaddingValue = -2000
            pixels = stored.astype("<i2")
        else:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            pixels = (hu.astype(np.int32) + 1024).clip(0, 4095).astype("<u2")
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -500, 1500
        ds.PixelData = pixels.tobytes()
        ds.save_as(ct_dir / f"IM{z:04d}.dcm", enforce_file_format=True)
    # NIfTI (RAS) of the lesion labels, voxel (i, j, k) = (column, row, slice).
    affine = np.array([[-dc, 0, 0, -x0], [0, -dr, 0, -y0], [0, 0, dz, z0], [0, 0, 0, 1.0]])
    image = nib.Nifti1Image(np.ascontiguousarray(patient.lesions.transpose(2, 1, 0)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, folder / "lesions.nii.gz")


def cohort_plan(patients: int, seed: int, mix: str = "default"):
    """(diagnosis, severity) of each patient: the mix's pattern in a seeded order.

    Args:
        patients: Number of patients.
        seed: Seed of the order.
        mix: "default" (6 COVID-19 : 2 healthy : 1 bacterial : 1 viral) or "pneumonia"
            (5 COVID-19 : 1 healthy : 2 bacterial : 2 viral).
    """
    if mix not in COHORT_MIXES:
        raise ValueError(f"unknown cohort mix {mix!r}; choose one of {sorted(COHORT_MIXES)}")
    pattern = COHORT_MIXES[mix]
    plan = [pattern[i % len(pattern)] for i in range(patients)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(patients)
    return [plan[i] for i in order]


def make_cohort(
    out: Path,
    patients: int,
    seed: int = 0,
    size: int = 512,
    identities=None,
    progress=None,
    mix: str = "default",
    slices: tuple[int, int] = SLICE_RANGE,
) -> Path:
    """Writes a cohort of synthetic patients and its manifest.csv; returns the manifest path.

    Args:
        out: Destination folder.
        patients: Number of patients.
        seed: Cohort seed.
        size: Slice size in pixels.
        identities: Optional list of (patient_id, patient_name) to write instead of the
            generated fake ones (the privacy tests use this).
        progress: Optional callable(done, total).
        mix: Diagnosis mix of the cohort (`cohort_plan`).
        slices: Range of slices per patient (`make_patient`'s `slice_range`); fewer,
            thicker slices give more patients for the same number of slices.
    """
    plan = cohort_plan(patients, seed, mix)
    slices = check_slice_range(slices)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (diagnosis, severity) in enumerate(plan):
        pid, name = (
            identities[i] if identities else (phantom_patient_id(seed, i), f"PHANTOM^CASE{i:04d}")
        )
        patient = make_patient(seed * 100_003 + i, size, diagnosis, severity, slice_range=slices)
        write_patient(
            patient,
            out / f"case_{i:04d}",
            patient_id=pid,
            patient_name=name,
            seed=seed,
            signed=bool(i % 2 == 0),
        )
        rows.append(
            {
                "patient": pid,
                "diagnosis": diagnosis,
                "severity": severity,
                "slices": patient.hu.shape[0],
            }
        )
        if progress:
            progress(i + 1, patients)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["patient", "diagnosis", "severity", "slices"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.phantom",
        description="Write a synthetic chest-CT cohort (DICOM + NIfTI lesion masks).",
    )
    parser.add_argument("--out", type=Path, required=True, help="destination folder")
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="slice size in pixels")
    parser.add_argument(
        "--mix",
        choices=sorted(COHORT_MIXES),
        default="default",
        help="diagnosis mix: default (6 COVID-19 : 2 healthy : 1 bacterial : 1 viral) or "
        "pneumonia (5 : 1 : 2 : 2)",
    )
    parser.add_argument(
        "--slices",
        type=int,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=list(SLICE_RANGE),
        help="slices per patient, drawn per patient from [LOW, HIGH] (default %(default)s); "
        "they always cover 300 mm, so fewer slices are thicker",
    )
    args = parser.parse_args(argv)
    if args.patients < 1:
        parser.error("--patients must be at least 1")
    if args.size < 32 or args.size % 2:
        parser.error("--size must be an even number of at least 32")
    try:
        check_slice_range(args.slices)
    except ValueError as e:
        parser.error(f"--slices: {e}")
    start = time.perf_counter()

    def progress(done, total):
        print(f"\rphantom: {done}/{total} patients", end="", file=sys.stderr, flush=True)

    manifest = make_cohort(
        args.out,
        args.patients,
        args.seed,
        args.size,
        progress=progress,
        mix=args.mix,
        slices=tuple(args.slices),
    )
    print(file=sys.stderr)
    with manifest.open() as f:
        slices = sum(int(r["slices"]) for r in csv.DictReader(f))
    elapsed = time.perf_counter() - start
    print(
        f"wrote {args.patients} patients, {slices} slices at {args.size}x{args.size} to "
        f"{args.out} in {elapsed:.1f} s ({slices / elapsed:.0f} slices/s); "
        f"manifest: {manifest}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
