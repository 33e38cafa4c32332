"""Synthetic chest-CT phantoms with the 18 CT-RATE findings: the embedded demo data.

Why: the project must demonstrate pretraining and zero-shot evaluation on a machine
with no data, so a generator draws chest-like CT volumes whose abnormalities are
(1) plausible in HU and anatomy, (2) big enough to survive resampling to ~5 mm voxels,
and (3) present independently of each other at CT-RATE-like rates, together with a
report that states them (``reports.py``).

Geometry. Drawing happens in physical millimetres of a canonical RAS+ grid centred on
the field of view (x -> patient Right, y -> Anterior, z -> Superior); shapes are painted
only inside their bounding boxes so a volume costs a few tens of milliseconds. Each
volume draws its spacing and field of view; the shape follows (``SIZES``). Files are
written RAS or LPS (alternating) with the array flipped to match, so the physical
anatomy is identical however the file is stored. Storage is int16 with
``scl_slope``/``scl_inter`` (HU = stored * slope + inter).

Difficulty. ``RENDER`` holds the findings' sizes, counts and contrasts per difficulty:
``realistic`` (clinical sizes; the renderings of earlier versions, voxel for voxel) and
``demo`` (the default for the demo grid size: larger, denser findings, plus secondary signs
such as hyperinflation for emphysema and volume loss for atelectasis, so that each survives
the demo preset's 5 mm voxels and the demo's 32^3 (~10 mm) views). The drawing methods'
docstrings quote the realistic numbers. Anatomy and the order of random draws do not depend
on the difficulty: the same seed draws the same chest, labels and report wording.

What is drawn per label, at each difficulty, is described in docs/data_synthetic.md.

Masks. With ``masks=True`` (``launch/make_synthetic.py --masks``) the canvas also keeps a label
map (``MASK_CLASSES``): every labelled structure writes its class where its paint lands, so the
last painter wins in the label map exactly as in the HU grid (an unlabelled paint leaves the
labels alone: vessels and emphysema stay lung; the oesophagus, pulmonary trunk and hiatal hernia
clear them). The label map costs no random draws, so volumes and reports are the same with or
without it.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import math
import os
import pathlib
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, NamedTuple

import numpy as np

from t3d_jax.data.labels import CT_RATE_LABELS
from t3d_jax.data.reports import make_report


@dataclasses.dataclass(frozen=True)
class GridSize:
    """Ranges a volume's grid is drawn from; shape = round(field of view / spacing)."""

    inplane_spacing: tuple[float, float]  # mm, uniform
    slice_spacings: tuple[float, ...]  # mm, one of
    fov_xy: tuple[float, float] = (300.0, 360.0)  # mm, square in-plane field of view
    fov_z: tuple[float, float] = (250.0, 300.0)  # mm, cranio-caudal extent


# `realistic` follows clinical chest CT (0.6-1.5 mm in-plane, 1-5 mm slices; 200-600
# voxels in-plane). `demo` keeps the same chest-sized field of view but caps the voxel
# count (~95-150 in-plane, 50-100 slices), which forces 2.4-3.2 mm in-plane spacing:
# 200 volumes are written in seconds and still carry more detail than the ~5 mm demo
# preset keeps.
SIZES: dict[str, GridSize] = {
    "demo": GridSize(inplane_spacing=(2.4, 3.2), slice_spacings=(3.0, 4.0, 5.0)),
    "realistic": GridSize(inplane_spacing=(0.6, 1.5),
                          slice_spacings=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)),
}

# How findings are drawn, per difficulty. `realistic`: clinical sizes and contrasts (a 12-20 mm
# nodule, 3-4.5 mm calcified foci, 1.5-2.5 mm fibrotic strands), much of which the 5 mm / 64^3
# demo preset and the demo's 32^3 views (~10 mm voxels) blur away. `demo`: the same findings,
# larger, more numerous and of higher contrast, so that each survives ~10 mm voxels; still
# plausible (a nodule is a round soft-tissue lesion in lung, calcifications are bright foci on
# the aortic wall / heart surface). Ranges are (lo, hi) of uniform draws; counts are
# numpy `integers(lo, hi)` (hi excluded). docs/data_synthetic.md lists what changes.
DIFFICULTIES = ("demo", "realistic")
RENDER: dict[str, dict[str, Any]] = {
    "realistic": {
        "material_port": (13.0, 13.0, 5.0), "material_pacemaker": (22.0, 6.0, 16.0),
        "material_wire": 1.5, "material_sternal_wire": 1.8, "material_sternal_count": (4, 7),
        "material_port_x": (50.0, 70.0), "material_port_z": (20.0, 40.0), "material_pacemaker_x": (55.0, 75.0),
        "material_pacemaker_z": (25.0, 45.0), "material_on_surface": False,
        "arterial_count": (8, 16), "coronary_count": (6, 11), "calc_radius": (3.0, 4.5),
        "pericardial_rim": (10.0, 18.0),
        "node_count": (3, 6), "node_radius": (10.0, 15.0), "node_hu": (35.0, 55.0),
        "emph_count": (8, 14), "emph_radius": (9.0, 16.0), "emph_zone": (0.5, 0.95),
        "emph_hu": (-995.0, -965.0), "emph_hyperinflation": None,
        "opacity_count": (2, 5), "opacity_radius": (18.0, 30.0), "opacity_hu": (-480.0, -320.0),
        "opacity_zone": (0.25, 0.9),
        "fib_count": (7, 12), "fib_half_length": (10.0, 20.0), "fib_radius": (1.5, 2.5),
        "fib_hu": (-80.0, 20.0), "fib_band": None, "fib_band_hu": None,
        "bronchiectasis_count": (3, 6), "bronchiectasis_lumen": (5.0, 7.5),
        "bronchiectasis_wall": (2.5, 3.5), "bronchiectasis_start": 0.3,
        "consolidation_radius": (28.0, 42.0), "consolidation_radius_z": (26.0, 38.0),
        "atel_radius": ((30.0, 45.0), (25.0, 38.0), (6.0, 9.0)), "atel_hu": (20.0, 60.0),
        "atel_volume_loss": None,
        "nodule_count": (1, 4), "nodule_radius": (6.0, 10.0), "nodule_margin": 10.0, "nodule_zone": (0.3, 0.95),
        "effusion_depth": (35.0, 55.0), "effusion_height": (70.0, 110.0),
        "mosaic_cell": (20.0, 28.0), "mosaic_dark": (80.0, 100.0), "mosaic_bright": (80.0, 110.0),
        "bronchial_wall": (3.5, 5.0),
    },
    "demo": {
        "material_port": (24.0, 24.0, 11.0), "material_pacemaker": (34.0, 12.0, 26.0),
        "material_wire": 3.0, "material_sternal_wire": 3.5, "material_sternal_count": (8, 12),
        "material_port_x": (60.0, 80.0), "material_port_z": (45.0, 65.0), "material_pacemaker_x": (65.0, 85.0),
        "material_pacemaker_z": (50.0, 70.0), "material_on_surface": True,
        "arterial_count": (24, 35), "coronary_count": (18, 27), "calc_radius": (8.5, 10.5),
        "pericardial_rim": (16.0, 24.0),
        "node_count": (5, 6), "node_radius": (20.0, 26.0), "node_hu": (40.0, 60.0),
        "emph_count": (20, 31), "emph_radius": (16.0, 24.0), "emph_zone": (0.3, 0.95),
        "emph_hu": (-1000.0, -985.0), "emph_hyperinflation": (20.0, 35.0),
        "opacity_count": (5, 9), "opacity_radius": (30.0, 42.0), "opacity_hu": (-450.0, -300.0),
        "opacity_zone": (0.5, 0.92),
        "fib_count": (25, 36), "fib_half_length": (20.0, 35.0), "fib_radius": (4.0, 6.0),
        "fib_hu": (-80.0, 20.0), "fib_band": (15.0, 22.0), "fib_band_hu": (-350.0, -200.0),
        "bronchiectasis_count": (10, 16), "bronchiectasis_lumen": (10.0, 13.0),
        "bronchiectasis_wall": (5.0, 7.0), "bronchiectasis_start": 0.45,
        "consolidation_radius": (50.0, 65.0), "consolidation_radius_z": (42.0, 55.0),
        "atel_radius": ((55.0, 75.0), (40.0, 55.0), (16.0, 24.0)), "atel_hu": (40.0, 80.0),
        "atel_volume_loss": (20.0, 30.0),
        "nodule_count": (16, 26), "nodule_radius": (12.0, 15.0), "nodule_margin": 15.0,
        "nodule_zone": (0.15, 0.6),
        "effusion_depth": (60.0, 90.0), "effusion_height": (110.0, 160.0),
        "mosaic_cell": (70.0, 90.0), "mosaic_dark": (180.0, 210.0), "mosaic_bright": (350.0, 420.0),
        "bronchial_wall": (8.0, 11.0),
    },
}


def default_difficulty(size: str) -> str:
    """`demo` for the demo grid size, `realistic` otherwise."""
    return "demo" if size == "demo" else "realistic"


def _check_difficulty(difficulty: str) -> str:
    if difficulty not in RENDER:
        raise ValueError(f"unknown synthetic difficulty {difficulty!r}; choose one of {sorted(RENDER)}")
    return difficulty


# Prevalence of each label, drawn independently. Close to CT-RATE's, but at least 10%
# so that the 20% validation split of a 200-volume demo holds a few positives per label.
LABEL_RATES: dict[str, float] = {
    "Medical material": 0.12,
    "Arterial wall calcification": 0.28,
    "Cardiomegaly": 0.12,
    "Pericardial effusion": 0.10,
    "Coronary artery wall calcification": 0.25,
    "Hiatal hernia": 0.14,
    "Lymphadenopathy": 0.25,
    "Emphysema": 0.20,
    "Atelectasis": 0.25,
    "Lung nodule": 0.40,
    "Lung opacity": 0.35,
    "Pulmonary fibrotic sequela": 0.25,
    "Pleural effusion": 0.12,
    "Mosaic attenuation pattern": 0.10,
    "Peribronchial thickening": 0.12,
    "Consolidation": 0.15,
    "Bronchiectasis": 0.10,
    "Interlobular septal thickening": 0.10,
}

# (slope, intercept) pairs used for int16 storage, HU = stored * slope + inter.
SCALINGS = ((1.0, -1024.0), (2.0, -1024.0), (1.0, 0.0))
HU_RANGE = (-1024.0, 3071.0)


# Segmentation classes of the synthetic label maps (index = position): anatomy, then the
# findings that have a region. docs/data_synthetic.md ("Masks") says what each covers.
MASK_CLASSES = (
    "background", "lung_left", "lung_right", "heart", "aorta", "airways", "spine",
    "lung_nodule", "pleural_effusion", "consolidation", "atelectasis", "pericardial_effusion",
    "lymph_node",
)
_C = {name: i for i, name in enumerate(MASK_CLASSES)}


class Phantom(NamedTuple):
    hu: np.ndarray  # float32 [X, Y, Z] HU on the canonical RAS+ grid
    spacing: tuple[float, float, float]  # mm (x, y, z)
    orientation: str  # how the file stores it: "RAS" or "LPS"
    findings: dict[str, dict[str, Any]]  # per positive label: what was drawn where
    landmarks: dict[str, Any]  # anatomy positions (mm, centred RAS) for checks and docs
    labels: np.ndarray | None = None  # uint8 [X, Y, Z] MASK_CLASSES indices (masks=True), same grid as hu


def sample_labels(rng: np.random.Generator) -> dict[str, int]:
    """Each label an independent Bernoulli draw with ``LABEL_RATES``."""
    draws = rng.random(len(CT_RATE_LABELS))
    return {name: int(u < LABEL_RATES[name]) for name, u in zip(CT_RATE_LABELS, draws)}


def sample_grid(rng: np.random.Generator, size: str = "demo"):
    """(shape, spacing) of one volume for grid size ``size`` (a key of ``SIZES``)."""
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose one of {sorted(SIZES)}")
    g = SIZES[size]
    sxy = round(float(rng.uniform(*g.inplane_spacing)), 3)
    sz = float(g.slice_spacings[rng.integers(len(g.slice_spacings))])
    fov_xy, fov_z = rng.uniform(*g.fov_xy), rng.uniform(*g.fov_z)
    shape = (int(round(fov_xy / sxy)),) * 2 + (int(round(fov_z / sz)),)
    return shape, (sxy, sxy, sz)


class _Canvas:
    """An HU grid with painting of shapes in physical (mm, centred RAS) coordinates."""

    def __init__(self, shape, spacing):
        self.hu = np.full(shape, -1000.0, np.float32)
        self.labels: np.ndarray | None = None  # uint8 MASK_CLASSES map when masks are drawn
        self.spacing = np.asarray(spacing, np.float64)
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
        self.extent = np.array([a[-1] for a in self.axes])
        self._a0 = [float(a[0]) for a in self.axes]
        self._sp = [float(v) for v in spacing]
        self._n = list(shape)
        self.grid = (self.axes[0][:, None, None], self.axes[1][None, :, None],
                     self.axes[2][None, None, :])

    def box(self, lo, hi):
        """Index slices and coordinate arrays of the voxels inside [lo, hi] (mm)."""
        slices, coords = [], []
        for d in range(3):
            a, s = self.axes[d], self.spacing[d]
            i0 = max(0, int(math.floor((lo[d] - a[0]) / s)))
            i1 = min(len(a), int(math.ceil((hi[d] - a[0]) / s)) + 1)
            if i1 <= i0:
                return None
            slices.append(slice(i0, i1))
            coords.append(a[i0:i1])
        return (tuple(slices), coords[0][:, None, None], coords[1][None, :, None],
                coords[2][None, None, :])

    def paint(self, sl, mask, value, within=None, mode="set", where: Callable | None = None,
              label: int | None = None):
        region = self.hu[sl]
        if within is not None:
            mask = mask & within[sl]
        if where is not None:
            mask = mask & where(region)
        if label is not None and self.labels is not None:
            self.labels[sl][mask] = label
        if mode == "set":
            region[mask] = value
        elif mode == "max":
            region[mask] = np.maximum(region[mask], value)
        elif mode == "min":
            region[mask] = np.minimum(region[mask], value)
        elif mode == "add":
            region[mask] += value
        return mask

    def ellipsoid(self, center, radii, value, angle=0.0, **kw):
        """Ellipsoid with semi-axes ``radii`` rotated by ``angle`` (rad) about z."""
        r = float(max(radii[0], radii[1]))
        lo = [center[0] - r, center[1] - r, center[2] - radii[2]]
        hi = [center[0] + r, center[1] + r, center[2] + radii[2]]
        b = self.box(lo, hi)
        if b is None:
            return
        sl, x, y, z = b
        dx, dy = x - center[0], y - center[1]
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * dx + s * dy, -s * dx + c * dy
        d = (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + ((z - center[2]) / radii[2]) ** 2
        self.paint(sl, d <= 1.0, value, **kw)

    def capsule(self, p0, p1, radius, value, **kw):
        """Tube of ``radius`` around segment p0-p1; never thinner than half a voxel."""
        radius = max(float(radius), 0.55 * float(self.spacing.max()))
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        b = self.box(np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius)
        if b is None:
            return
        sl, x, y, z = b
        d = p1 - p0
        dd = max(float(d @ d), 1e-9)
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / dd, 0, 1)
        dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
        self.paint(sl, dist2 <= radius * radius, value, **kw)

    def index(self, p):
        """Nearest voxel index of point ``p`` (mm), clamped to the grid."""
        return tuple(min(max(int(round((float(p[d]) - self._a0[d]) / self._sp[d])), 0), self._n[d] - 1)
                     for d in range(3))


def _unit(rng, bias=(0.0, 0.0, 0.0)):
    v = rng.normal(size=3) + np.asarray(bias)
    return v / max(np.linalg.norm(v), 1e-9)


class _Chest:
    """Draws one chest: anatomy first, then the findings of the positive labels."""

    def __init__(self, rng, shape, spacing, positive, label_rngs, difficulty="realistic"):
        self.rng, self.cv = rng, _Canvas(shape, spacing)
        self.P = RENDER[_check_difficulty(difficulty)]  # sizes/contrasts of the findings
        self.positive = set(positive)  # names of the labels to draw
        self.rngs = label_rngs  # one random stream per label
        u = rng.uniform
        half_xy, half_z = self.cv.extent[0], self.cv.extent[2]
        self.zb, self.zt = -half_z, half_z
        self.body_a = min(u(135, 160), half_xy - 10)
        self.body_b = min(u(98, 118), half_xy - 30)
        self.body_yc = u(-12, 0)
        self.fat, self.muscle = u(8, 22), u(8, 14)
        inset = self.fat + self.muscle + 7
        self.cav_a, self.cav_b = self.body_a - inset, self.body_b - inset - 3
        self.cav_yc = self.body_yc + 3
        self.xmed = -u(5, 14)  # mediastinum sits slightly to the patient's left (-x)
        self.med_half = u(18, 25)
        self.z_dia = self.zb + u(40, 60)
        self.dome_h = u(18, 30)
        self.hyperinflation = None
        if self.P["emph_hyperinflation"] and "Emphysema" in self.positive:
            # Emphysema at demo difficulty also hyperinflates the lungs: lower, flatter
            # hemidiaphragms (drawn from the label's own stream, before its bullae).
            er = self.rngs["Emphysema"]
            drop, flat = er.uniform(*self.P["emph_hyperinflation"]), er.uniform(0.3, 0.5)
            self.z_dia -= drop
            self.dome_h *= flat
            self.hyperinflation = {"diaphragm_lowered_mm": round(drop, 1), "dome_height_factor": round(flat, 2)}
        self.elevation = {"left": 0.0, "right": 0.0}
        self.atelectasis_side = None
        if self.P["atel_volume_loss"] and "Atelectasis" in self.positive:
            # Atelectasis at demo difficulty also shows volume loss: the hemidiaphragm of the
            # collapsed side(s) is raised (side drawn here, first, as _atelectasis would).
            ar = self.rngs["Atelectasis"]
            self.atelectasis_side = self._side(ar)
            for s_ in self._sides(self.atelectasis_side):
                self.elevation[s_] = float(ar.uniform(*self.P["atel_volume_loss"]))
        self.right_lift = u(8, 16)
        self.z_apex = self.zt - u(5, 20)
        self.lung_hu = u(-870, -830)
        self.blood_hu = u(130, 260)
        self.y_post = self.cav_yc - self.cav_b
        self.y_spine = self.y_post + 8
        self.findings: dict[str, dict[str, Any]] = {}

    # ----- anatomy -----------------------------------------------------------------
    def _ellipse_cyl(self, a, b, yc, taper=0.06):
        """Elliptic cylinder narrowing by ``taper`` toward the top (2D radius vs 1D scale)."""
        x, y, z = self.cv.grid
        s = 1.0 - taper * (z - self.zb) / (self.zt - self.zb)
        return (x / a) ** 2 + ((y - yc) / b) ** 2 <= (s * s)

    def _dome(self, x, y):
        """z of the diaphragm surface under each (x, y); right dome higher (liver)."""
        ha = self.cav_a * 0.5
        side_x = np.abs(x - self.xmed) - ha
        bump = np.clip(1.0 - (side_x / ha) ** 2 - ((y - self.cav_yc) / self.cav_b) ** 2, 0, 1)
        lift = np.where(x > self.xmed, self.right_lift + self.elevation["right"], self.elevation["left"])
        recess = 12.0 * np.clip(-(y - self.cav_yc) / self.cav_b, 0, 1)
        return self.z_dia + self.dome_h * bump + lift - recess

    def anatomy(self):
        cv, rng, u = self.cv, self.rng, self.rng.uniform
        x, y, z = cv.grid
        body = self._ellipse_cyl(self.body_a, self.body_b, self.body_yc)
        cv.hu[body] = u(-110, -90)  # subcutaneous fat
        muscle = self._ellipse_cyl(self.body_a - self.fat, self.body_b - self.fat, self.body_yc)
        cv.hu[muscle] = u(35, 55)
        self.cavity = self._ellipse_cyl(self.cav_a, self.cav_b, self.cav_yc)
        # ribs: a shell just outside the cavity, in oblique bands (posterior ends higher)
        shell = self._ellipse_cyl(self.cav_a + 7, self.cav_b + 7, self.cav_yc) & ~self.cavity
        period, phase = u(24, 30), u(0, 30)
        band = np.mod(z - 0.35 * (y - self.cav_yc) + phase, period) < 0.38 * period
        anterior_gap = (np.abs(x) < 22) & (y > self.cav_yc)
        cv.hu[shell & band & ~anterior_gap] = u(450, 700)
        dome = self._dome(x, y)
        below = z < dome
        abdomen = self.cavity & below
        cv.hu[abdomen & (x > self.xmed)] = u(50, 65)  # liver
        cv.hu[abdomen & (x <= self.xmed)] = u(30, 45)  # spleen / stomach
        cv.hu[self.cavity & ~below] = u(-100, -80)  # mediastinal fat
        # lungs: taper toward the apex, bounded by cavity, mediastinum and diaphragm
        t = np.clip((z - self.z_dia) / (self.z_apex - self.z_dia), 0, 1)
        f = np.sqrt(np.clip(1.0 - t ** 3, 1e-6, 1))
        ha = self.cav_a * 0.5
        lung_shape = ((np.abs(x - self.xmed) - ha) / (ha + 8)) ** 2 + \
            ((y - self.cav_yc) / (self.cav_b + 8)) ** 2 <= f * f
        inner = self._ellipse_cyl(self.cav_a - 2, self.cav_b - 2, self.cav_yc)
        lung = inner & lung_shape & ~below & (z < self.z_apex) & (np.abs(x - self.xmed) > self.med_half)
        self.lung_right = lung & (x > self.xmed)
        self.lung_left = lung & (x <= self.xmed)
        gradient = 40.0 * np.clip((self.cav_yc - y) / self.cav_b, -1, 1)  # dependent lung denser
        cv.hu[lung] = np.broadcast_to(self.lung_hu + gradient, lung.shape)[lung]
        self._spine_and_sternum()
        self._heart()
        self._vessels_and_airways()

    def _spine_and_sternum(self):
        cv, u = self.cv, self.rng.uniform
        x0, r = 0.0, u(15, 19)
        zlo, zhi = self.zb - 5, self.zt + 5
        spine = _C["spine"]
        cv.capsule((x0, self.y_spine - 30, zlo), (x0, self.y_spine - 30, zhi), 14, u(450, 650), label=spine)
        cv.capsule((x0, self.y_spine - 30, zlo), (x0, self.y_spine - 30, zhi), 7, u(5, 20), label=0)  # canal
        cv.capsule((x0, self.y_spine, zlo), (x0, self.y_spine, zhi), r + 2, u(600, 800), label=spine)
        cv.capsule((x0, self.y_spine, zlo), (x0, self.y_spine, zhi), r, u(180, 280), label=spine)
        period, phase = u(26, 32), u(0, 30)
        for zc in np.arange(self.zb - phase, self.zt + period, period):
            cv.capsule((x0, self.y_spine, zc - 3), (x0, self.y_spine, zc + 3), r + 1, u(70, 100))
        y_st = self.cav_yc + self.cav_b + 5
        z_st_lo = self.z_dia + 10
        cv.ellipsoid((0.0, y_st, (z_st_lo + self.z_apex) / 2), (14, 6, (self.z_apex - z_st_lo) / 2),
                     u(350, 500))

    def _heart(self):
        cv, u, f = self.cv, self.rng.uniform, self.findings
        scale = u(0.88, 1.03)
        if "Cardiomegaly" in self.positive:
            scale *= self.rngs["Cardiomegaly"].uniform(1.38, 1.5)
        radii = np.array([u(52, 60), u(40, 47), u(42, 50)]) * scale
        self.heart_r = radii
        self.heart_angle = math.radians(u(20, 40))
        ztop_dome = self.z_dia + self.dome_h
        self.heart_c = np.array([self.xmed - u(12, 22) * scale, self.cav_yc + self.cav_b * u(0.25, 0.4),
                                 ztop_dome + radii[2] * 0.55])
        c, a, cav = self.heart_c, self.heart_angle, self.cavity
        if "Pericardial effusion" in self.positive:
            lr = self.rngs["Pericardial effusion"]
            rim = lr.uniform(*self.P["pericardial_rim"])
            cv.ellipsoid(c, radii + 4 + rim, lr.uniform(5, 18), a, within=cav, label=_C["pericardial_effusion"])
            f["Pericardial effusion"] = {"rim_mm": round(rim, 1)}
        cv.ellipsoid(c, radii + 4, u(-100, -80), a, within=cav, label=_C["heart"])  # epicardial fat
        cv.ellipsoid(c, radii, u(60, 90), a, within=cav)  # myocardium
        cv.ellipsoid(c, radii - 9, self.blood_hu, a, within=cav)  # contrast blood pool
        if "Cardiomegaly" in self.positive:
            f["Cardiomegaly"] = {"scale": round(scale, 3)}

    def _vessels_and_airways(self):
        cv, rng, u = self.cv, self.rng, self.rng.uniform
        hc, hr = self.heart_c, self.heart_r
        self.z_carina = hc[2] + hr[2] + u(12, 25)
        self.y_tr = y_tr = self.y_spine + u(40, 48)
        # esophagus (behind trachea, down to the hiatus)
        cv.capsule((self.xmed * 0.5, self.y_spine + 24, self.zt + 5),
                   (self.xmed - 5, self.y_spine + 28, self.z_dia), 8, u(30, 45), label=0)
        # aorta: ascending (anterior, right of midline) -> arch -> descending (left of spine)
        r_asc, r_desc = u(14, 17), u(11, 13)
        asc0 = np.array([self.xmed + 14, hc[1] - 8, hc[2] + hr[2] * 0.3])
        desc_x, desc_y = self.xmed - 24, self.y_spine + 22
        z_arch = self.z_carina + u(18, 28)
        y_mid, ry = (asc0[1] + desc_y) / 2, (asc0[1] - desc_y) / 2
        arch = [np.array([asc0[0] + (desc_x - asc0[0]) * k / 8, y_mid + ry * math.cos(math.pi * k / 8),
                          z_arch + 15 * math.sin(math.pi * k / 8)]) for k in range(9)]
        path = [asc0] + arch + [np.array([desc_x, desc_y, self.zb - 5])]
        radii = [r_asc] * 6 + [r_desc] * 5
        self.aorta = list(zip(path[:-1], path[1:], radii))
        for p0, p1, r in self.aorta:
            cv.capsule(p0, p1, r + 1.5, u(35, 50), within=self.cavity, label=_C["aorta"])
        for p0, p1, r in self.aorta:
            cv.capsule(p0, p1, r, self.blood_hu, within=self.cavity, label=_C["aorta"])
        # pulmonary trunk to the hila
        pa0 = np.array([hc[0] - 5, hc[1] + 10, hc[2] + hr[2] * 0.5])
        pa1 = np.array([self.xmed - 8, y_tr - 5, self.z_carina - 12])
        cv.capsule(pa0, pa1, 12, self.blood_hu, within=self.cavity, label=0)
        # the lungs end where the heart and the mediastinal vessels drawn so far begin
        aerated = cv.hu < -600
        self.lung_right &= aerated
        self.lung_left &= aerated
        if cv.labels is not None:
            cv.labels[self.lung_right] = _C["lung_right"]
            cv.labels[self.lung_left] = _C["lung_left"]
        # airways: trachea, main bronchi, lobar/segmental bronchi from each hilum
        thick = "Peribronchial thickening" in self.positive
        wall = self.rngs["Peribronchial thickening"].uniform(*self.P["bronchial_wall"]) if thick else 1.2
        carina = np.array([0.0, y_tr, self.z_carina])
        airway = _C["airways"]
        cv.capsule((0.0, y_tr, self.zt + 5), carina, u(10, 12) + 1.5, 40.0, label=airway)
        cv.capsule((0.0, y_tr, self.zt + 5), carina, 9.5, -990.0, label=airway)
        self.hila, self.airways = {}, []
        for side, sign in (("right", 1.0), ("left", -1.0)):
            hilum = np.array([self.xmed + sign * (self.med_half + 22), y_tr - 6, self.z_carina - 22])
            self.hila[side] = hilum
            main = (carina, hilum, 7.0 if side == "right" else 6.0)
            segs = [main]
            for _ in range(6):
                d = _unit(rng, bias=(sign * 1.2, 0.0, 0.0))
                segs.append((hilum, hilum + d * u(40, 60), u(2.8, 3.8)))
            self.airways += segs
            lung = self.lung(side)
            for p0, p1, r in segs[1:]:  # pulmonary vessels beside the bronchi
                off = _unit(rng) * 6
                cv.capsule(p0 + off, p1 + off + _unit(rng) * 10, u(2.5, 3.5), self.blood_hu * 0.7,
                           within=lung)
            for _ in range(5):
                d = _unit(rng, bias=(sign * 0.8, 0.0, -0.5))
                cv.capsule(hilum, hilum + d * u(50, 90), u(2.0, 3.0), self.blood_hu * 0.7, within=lung)
        for p0, p1, r in self.airways:
            cv.capsule(p0, p1, r + wall, u(25, 45), within=self.cavity, label=airway)
        for p0, p1, r in self.airways:
            cv.capsule(p0, p1, r, -990.0, within=self.cavity, label=airway)
        if thick:
            self.findings["Peribronchial thickening"] = {"wall_mm": round(wall, 1)}
        # a few normal-sized (<10 mm) mediastinal nodes
        for _ in range(2):
            p = np.array([u(-20, 20), y_tr + u(-15, 10), self.z_carina + u(-15, 30)])
            cv.ellipsoid(p, (4, 3.5, 4), 40.0, where=lambda h: (h > -150) & (h < -50))

    # ----- helpers -------------------------------------------------------------------
    def landmarks(self):
        return {"heart_center": self.heart_c.tolist(), "heart_radii": self.heart_r.tolist(),
                "heart_angle": self.heart_angle, "blood_hu": float(self.blood_hu),
                "aorta": [[p0.tolist(), p1.tolist(), float(r)] for p0, p1, r in self.aorta],
                "x_mediastinum": float(self.xmed), "z_diaphragm": float(self.z_dia),
                "z_apex": float(self.z_apex), "lung_hu": float(self.lung_hu),
                "y_posterior_wall": float(self.y_post)}

    def lung(self, side):
        return self.lung_right if side == "right" else self.lung_left

    def zone_z(self, h):
        """z at relative lung height h (0 = top of the diaphragm dome, 1 = apex)."""
        z0 = self.z_dia + self.dome_h
        return z0 + h * (self.z_apex - z0)

    def lung_point(self, rng, side, h_range, margin=6.0, y_range=(-1.0, 1.0), peripheral=False):
        """A random point of the ``side`` lung at relative height in ``h_range``."""
        cv, mask = self.cv, self.lung(side)
        sign = 1.0 if side == "right" else -1.0
        best = None
        for _ in range(300):
            p = np.array([self.xmed + sign * rng.uniform(self.med_half, self.cav_a),
                          self.cav_yc + self.cav_b * rng.uniform(*y_range),
                          self.zone_z(rng.uniform(*h_range))])
            probes = [p] + [p + margin * e for e in np.vstack([np.eye(3), -np.eye(3)])]
            if not all(mask[cv.index(q)] for q in probes):
                continue
            best = p
            if peripheral:
                out = np.array([p[0] - self.xmed, p[1] - self.cav_yc, 0.0])
                out = out / max(np.linalg.norm(out), 1e-9)
                if mask[cv.index(p + 14.0 * out)]:
                    continue
            return p
        if best is None:
            best = np.array([self.xmed + sign * self.cav_a * 0.5, self.cav_yc, self.zone_z(0.5)])
        return best

    @staticmethod
    def _side(rng, allow_bilateral=True):
        r = rng.random()
        if allow_bilateral and r < 0.34:
            return "bilateral"
        return "left" if r < 0.67 else "right"

    @staticmethod
    def _sides(side):
        return ("left", "right") if side == "bilateral" else (side,)

    # ----- findings (order: diffuse patterns, focal lesions, dependent fluid) ----------
    def findings_all(self):
        """Draws each positive label with its own random stream (``self.rngs``), so
        switching one label on or off leaves the anatomy and every other finding as is."""
        for name, method in self._DRAW.items():  # diffuse patterns, focal lesions, fluid, rest
            if name in self.positive:
                rng = self.rngs[name]
                getattr(self, method)(rng, rng.uniform, self.cv, self.findings)

    _DRAW = {
        "Mosaic attenuation pattern": "_mosaic", "Emphysema": "_emphysema",
        "Interlobular septal thickening": "_septal", "Lung opacity": "_opacity",
        "Pulmonary fibrotic sequela": "_fibrosis", "Bronchiectasis": "_bronchiectasis",
        "Consolidation": "_consolidation", "Atelectasis": "_atelectasis",
        "Lung nodule": "_nodule", "Pleural effusion": "_pleural_effusion",
        "Lymphadenopathy": "_lymphadenopathy", "Hiatal hernia": "_hiatal_hernia",
        "Arterial wall calcification": "_arterial_calcification",
        "Coronary artery wall calcification": "_coronary_calcification",
        "Medical material": "_medical_material",
    }

    def _mosaic(self, rng, u, cv, F):
        """Lobular checkerboard (20-28 mm cells) of darker (-90 HU) and brighter (+95 HU) lung."""
        lungs = self.lung_right | self.lung_left
        x, y, z = cv.grid
        P = self.P
        s = u(*P["mosaic_cell"])
        off = rng.uniform(0, s, 3)
        parity = (np.floor((x + off[0]) / s) + np.floor((y + off[1]) / s)
                  + np.floor((z + off[2]) / s)) % 2
        paren = lungs & (cv.hu > -960) & (cv.hu < -600)  # parenchyma, not airway lumen
        dark = np.broadcast_to(parity == 0, paren.shape)
        cv.hu[paren & dark] -= u(*P["mosaic_dark"])
        cv.hu[paren & ~dark] += u(*P["mosaic_bright"])
        F["Mosaic attenuation pattern"] = {"cell_mm": round(s, 1)}

    def _emphysema(self, rng, u, cv, F):
        """8-13 low-attenuation (-995..-965 HU) spheres, 9-16 mm radius, in each upper lung."""
        P = self.P
        for side in ("left", "right"):
            for _ in range(int(rng.integers(*P["emph_count"]))):
                cv.ellipsoid(self.lung_point(rng, side, P["emph_zone"], margin=4), (u(*P["emph_radius"]),) * 3,
                             u(*P["emph_hu"]), within=self.lung(side), mode="min",
                             where=lambda h: h < -600)  # vessels stay
        F["Emphysema"] = {"zone": "upper", **(self.hyperinflation or {})}

    def _septal(self, rng, u, cv, F):
        """A 3D grid of dense lines (-150..-60 HU, ~2 mm, every 13-17 mm) in the outer 12 mm of lung."""
        lungs = self.lung_right | self.lung_left
        x, y, z = cv.grid
        s = u(13, 17)
        tk = np.maximum(2.0, 1.05 * cv.spacing)
        grid = (np.mod(x, s) < tk[0]) | (np.mod(y, s) < tk[1]) | (np.mod(z, s) < tk[2])
        shell = lungs & ~_erode(lungs, [int(np.ceil(12.0 / sp)) for sp in cv.spacing[:2]] + [0])
        cv.hu[shell & grid] = np.maximum(cv.hu[shell & grid], u(-150, -60))
        F["Interlobular septal thickening"] = {"spacing_mm": round(s, 1)}

    def _opacity(self, rng, u, cv, F):
        """2-4 ground-glass patches (-480..-320 HU, 18-30 mm radii) in the mid/upper lungs."""
        P = self.P
        for _ in range(int(rng.integers(*P["opacity_count"]))):
            side = ("left", "right")[rng.integers(2)]
            cv.ellipsoid(self.lung_point(rng, side, P["opacity_zone"], margin=8),
                         (u(*P["opacity_radius"]), u(*P["opacity_radius"]), u(*P["opacity_radius"])),
                         u(*P["opacity_hu"]),
                         within=self.lung(side), mode="max")
        F["Lung opacity"] = {}

    def _fibrosis(self, rng, u, cv, F):
        """7-11 dense reticular strands (-80..20 HU) per lung, subpleural, lower posterior zone."""
        P = self.P
        for side in ("left", "right"):
            for _ in range(int(rng.integers(*P["fib_count"]))):
                q = self.lung_point(rng, side, (0.0, 0.45), margin=3, peripheral=True, y_range=(-1, 0.3))
                d = _unit(rng, bias=(0, 0, 0))
                cv.capsule(q - d * u(*P["fib_half_length"]), q + d * u(*P["fib_half_length"]),
                           u(*P["fib_radius"]), u(*P["fib_hu"]),
                           within=self.lung(side), mode="max")
        if P["fib_band"]:
            # demo: a subpleural band of reticular haze in the lower posterior zones (UIP-like,
            # bilateral), which 10 mm voxels keep where they average the strands away
            x, y, z = cv.grid
            depth = u(*P["fib_band"])
            zone = (z < self.zone_z(0.45)) & (y < self.cav_yc + 0.3 * self.cav_b)
            lungs = self.lung_right | self.lung_left
            shell = lungs & ~_erode(lungs, [int(np.ceil(depth / sp)) for sp in cv.spacing[:2]] + [0]) & zone
            cv.hu[shell] = np.maximum(cv.hu[shell], u(*P["fib_band_hu"]))
        F["Pulmonary fibrotic sequela"] = {"zone": "lower"}

    def _bronchiectasis(self, rng, u, cv, F):
        """3-5 dilated airways per side (lumen 5-7.5 mm radius, 2.5-3.5 mm wall) to the lower lobe."""
        side = self._side(rng)
        for s_ in self._sides(side):
            hilum = self.hila[s_]
            for _ in range(int(rng.integers(*self.P["bronchiectasis_count"]))):
                end = self.lung_point(rng, s_, (0.0, 0.3), margin=4)
                start = hilum + (end - hilum) * self.P["bronchiectasis_start"]
                r = u(*self.P["bronchiectasis_lumen"])
                cv.capsule(start, end, r + u(*self.P["bronchiectasis_wall"]), u(20, 40), within=self.lung(s_),
                           label=_C["airways"])
                cv.capsule(start, end, r, -995.0, within=self.lung(s_), label=_C["airways"])
        F["Bronchiectasis"] = {"side": side}

    def _consolidation(self, rng, u, cv, F):
        """A 26-42 mm lobar ellipsoid of 20-50 HU with two air bronchograms, one side, upper or lower."""
        side = self._side(rng, allow_bilateral=False)
        upper = rng.random() < 0.5
        h = (0.6, 0.8) if upper else (0.15, 0.35)
        c = self.lung_point(rng, side, h, margin=15)
        rxy, rz = self.P["consolidation_radius"], self.P["consolidation_radius_z"]
        radii = (u(*rxy), u(*rxy), u(*rz))
        cv.ellipsoid(c, radii, u(20, 50), within=self.lung(side), label=_C["consolidation"])
        for _ in range(2):  # air bronchograms (inside the consolidation's label)
            d = _unit(rng)
            cv.capsule(c - d * radii[0] * 0.6, c + d * radii[0] * 0.6, 2.0, -900.0,
                       within=self.lung(side))
        F["Consolidation"] = {"side": side, "lobe": "upper" if upper else "lower",
                              "center": c.round(1).tolist()}

    def _atelectasis(self, rng, u, cv, F):
        """A plate-like band (6-9 mm thick, 20-60 HU) in the lower lobe(s), left/right/bilateral."""
        side = self.atelectasis_side or self._side(rng)
        for s_ in self._sides(side):
            c = self.lung_point(rng, s_, (0.08, 0.25), margin=6, y_range=(-0.3, 0.3))
            ra, rb, rc = self.P["atel_radius"]
            cv.ellipsoid(c, (u(*ra), u(*rb), u(*rc)), u(*self.P["atel_hu"]), angle=u(0, math.pi),
                         within=self.lung(s_), label=_C["atelectasis"])
        F["Atelectasis"] = {"side": side}
        if self.atelectasis_side:
            F["Atelectasis"]["hemidiaphragm_raised_mm"] = {k: round(v, 1) for k, v in self.elevation.items() if v}

    def _nodule(self, rng, u, cv, F):
        """1-3 solid spheres (12-20 mm diameter, 20-80 HU) in the lungs; the largest is reported."""
        best, P = None, self.P
        for _ in range(int(rng.integers(*P["nodule_count"]))):
            side = ("left", "right")[rng.integers(2)]
            hq = rng.uniform(*P["nodule_zone"])
            c = self.lung_point(rng, side, (hq, hq), margin=P["nodule_margin"])
            r = u(*P["nodule_radius"])
            cv.ellipsoid(c, (r, r, r), u(20, 80), within=self.lung(side), label=_C["lung_nodule"])
            if best is None or r > best[0]:
                best = (r, side, "upper" if hq >= 0.5 else "lower", c)
        F["Lung nodule"] = {"side": best[1], "lobe": best[2], "size_mm": int(round(2 * best[0])),
                            "center": best[3].round(1).tolist()}

    def _pleural_effusion(self, rng, u, cv, F):
        """Dependent fluid layer (5-18 HU) at the posterior lung base, 35-55 mm deep, left/right/bilateral."""
        side = self._side(rng)
        x, y, z = cv.grid
        depth, height = u(*self.P["effusion_depth"]), u(*self.P["effusion_height"])
        thick = depth * np.clip(1.0 - (z - self.z_dia) / height, 0, 1)
        layer = (y - self.y_post) < thick
        fluid = u(5, 18)
        for s_ in self._sides(side):
            cv.hu[self.lung(s_) & layer] = fluid
            if cv.labels is not None:
                cv.labels[self.lung(s_) & layer] = _C["pleural_effusion"]
        F["Pleural effusion"] = {"side": side}

    def _lymphadenopathy(self, rng, u, cv, F):
        """3-5 enlarged nodes (20-30 mm short axis, 35-55 HU) at mediastinal/hilar stations."""
        y_tr = self.y_tr
        stations = [(12, y_tr + 5, self.z_carina + 25), (0, y_tr - 8, self.z_carina - 18),
                    (-20, y_tr + 22, self.z_carina + 30), tuple(self.hila["right"] + [4, 12, -8]),
                    tuple(self.hila["left"] + [-4, 12, -8])]
        P = self.P
        for i in rng.choice(len(stations), int(rng.integers(*P["node_count"])), replace=False):
            r = u(*P["node_radius"])
            cv.ellipsoid(np.array(stations[i]), (r, r * u(0.8, 1.0), r * u(0.9, 1.2)), u(*P["node_hu"]),
                         where=lambda h: (h < 0) & (h > -960), label=_C["lymph_node"])
        F["Lymphadenopathy"] = {}

    def _hiatal_hernia(self, rng, u, cv, F):
        """A walled retrocardiac mass above the hiatus with an air-fluid level."""
        r = np.array([u(24, 34), u(20, 28), u(24, 32)])
        c = np.array([self.xmed - 4, self.y_spine + 40, self.z_dia + self.dome_h * 0.6 + r[2] * 0.5])
        cv.ellipsoid(c, r + 3, u(40, 55), within=self.cavity, label=0)  # stomach: no class
        cv.ellipsoid(c, r, u(10, 25), within=self.cavity, label=0)
        b = cv.box(c - r, c + r)
        level = c[2] + r[2] * u(-0.3, 0.2)
        sl, bx, by, bz = b
        inside = ((bx - c[0]) / r[0]) ** 2 + ((by - c[1]) / r[1]) ** 2 + ((bz - c[2]) / r[2]) ** 2 <= 1
        cv.paint(sl, inside & (bz > level), -995.0, within=self.cavity)
        F["Hiatal hernia"] = {"center": c.round(1).tolist()}

    def _arterial_calcification(self, rng, u, cv, F):
        """8-15 bright foci (900-1500 HU, 3-4.5 mm radius; brighter than bone) on the aortic arch/descending wall."""
        foci = []
        for _ in range(int(rng.integers(*self.P["arterial_count"]))):
            p0, p1, r = self.aorta[int(rng.integers(2, len(self.aorta)))]
            axis = (p1 - p0) / max(np.linalg.norm(p1 - p0), 1e-9)
            d = _unit(rng)
            d = d - (d @ axis) * axis
            d /= max(np.linalg.norm(d), 1e-9)
            q = p0 + (p1 - p0) * rng.uniform(0, 1)
            foci.append(q + d * (r + 0.5))
            cv.ellipsoid(foci[-1], (u(*self.P["calc_radius"]),) * 3, u(900, 1500))
        F["Arterial wall calcification"] = {"foci_mm": np.round(foci, 1).tolist()}

    def _coronary_calcification(self, rng, u, cv, F):
        """6-10 bright foci (900-1500 HU, 3-4.5 mm radius) on the heart surface along the AV groove ring."""
        a = self.heart_angle
        long_axis = np.array([math.cos(a), math.sin(a), 0.0])
        foci, n_foci = [], int(rng.integers(*self.P["coronary_count"]))
        for _ in range(400):
            d = _unit(rng)
            if abs(d @ long_axis) > 0.3 or d[2] < -0.2:
                continue
            u_, v_ = d[0] * math.cos(a) + d[1] * math.sin(a), -d[0] * math.sin(a) + d[1] * math.cos(a)
            local = np.array([u_ * self.heart_r[0], v_ * self.heart_r[1], d[2] * self.heart_r[2]])
            world = np.array([local[0] * math.cos(a) - local[1] * math.sin(a),
                              local[0] * math.sin(a) + local[1] * math.cos(a), local[2]])
            foci.append(self.heart_c + world + d * 2.0)
            cv.ellipsoid(foci[-1], (u(*self.P["calc_radius"]),) * 3, u(900, 1500))
            if len(foci) >= n_foci:
                break
        F["Coronary artery wall calcification"] = {"foci_mm": np.round(foci, 1).tolist()}

    def _medical_material(self, rng, u, cv, F):
        """A >2000 HU device: chest-wall port with catheter, pacemaker with lead, or sternotomy wires."""
        kind = ("port", "pacemaker", "sternotomy")[rng.integers(3)]
        dense = u(2400, 3000)
        P = self.P
        y_front = self.body_yc + self.body_b - self.fat * 0.6

        def pocket(x):  # y of a subcutaneous device at x: the front at the midline, or (demo) the body surface there
            if not P["material_on_surface"]:
                return y_front - 4
            return self.body_yc + self.body_b * math.sqrt(max(0.0, 1 - (x / self.body_a) ** 2)) - self.fat * 0.6 - 4

        if kind == "port":
            side = ("left", "right")[rng.integers(2)]
            sign = 1.0 if side == "right" else -1.0
            x = sign * u(*P["material_port_x"])
            c = np.array([x, pocket(x), self.z_carina + u(*P["material_port_z"])])
            cv.ellipsoid(c, self.P["material_port"], dense, angle=0.0)
            cv.capsule(c, (self.xmed + 15, self.heart_c[1] - 5, self.heart_c[2] + self.heart_r[2]),
                       self.P["material_wire"], dense)
            device = f"a {side} chest wall port with catheter tip in the superior vena cava"
        elif kind == "pacemaker":
            x = -u(*P["material_pacemaker_x"])
            c = np.array([x, pocket(x), self.z_carina + u(*P["material_pacemaker_z"])])
            cv.ellipsoid(c, self.P["material_pacemaker"], dense)
            cv.capsule(c, self.heart_c + [5, 5, 0], self.P["material_wire"], dense)
            device = "a left pectoral pacemaker with a lead in the right ventricle"
        else:
            y_st = self.cav_yc + self.cav_b + 5
            w = self.P["material_sternal_wire"]
            for zc in np.linspace(self.z_dia + 25, self.z_apex - 30, int(rng.integers(*self.P["material_sternal_count"]))):
                cv.capsule((-16, y_st - 2, zc), (16, y_st - 2, zc), w, dense)
                cv.capsule((-16, y_st - 2, zc), (-16, y_st + 6, zc), w, dense)
                cv.capsule((16, y_st - 2, zc), (16, y_st + 6, zc), w, dense)
            device = "median sternotomy wires"
        F["Medical material"] = {"device": device, "kind": kind}


def _erode(mask, steps):
    """``mask`` shrunk by ``steps`` voxels per axis (box erosion by shifting; cheap)."""
    out = mask.copy()
    for axis, k in enumerate(steps):
        if k <= 0:
            continue
        fwd = np.zeros_like(mask)
        bwd = np.zeros_like(mask)
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        src[axis], dst[axis] = slice(k, None), slice(None, -k)
        fwd[tuple(dst)] = mask[tuple(src)]
        bwd[tuple(src)] = mask[tuple(dst)]
        out &= fwd & bwd
    return out


def make_volume(rng: np.random.Generator, labels: dict[str, int], size: str = "demo",
                orientation: str | None = None, noise: bool = True,
                difficulty: str | None = None, masks: bool = False) -> Phantom:
    """Draws one chest CT with exactly the positive ``labels`` rendered.

    Returns the HU grid in canonical RAS+ (the file written for it may be LPS), its
    spacing, the storage orientation and what was drawn for each positive label.
    ``noise=False`` skips the Gaussian noise (tests compare clean renderings).
    ``difficulty`` ('demo' | 'realistic', ``RENDER``; None = ``default_difficulty(size)``)
    sets the findings' sizes and contrasts; the anatomy and the random draws' order are the
    same for both, and 'realistic' is the rendering of earlier versions, voxel for voxel.
    ``masks=True`` also returns the label map (``Phantom.labels``, ``MASK_CLASSES``); the HU grid is
    the same either way.
    """
    unknown = set(labels) - set(CT_RATE_LABELS)
    if unknown:
        raise ValueError(f"unknown labels {sorted(unknown)}; expected names from CT_RATE_LABELS")
    difficulty = _check_difficulty(default_difficulty(size) if difficulty is None else difficulty)
    shape, spacing = sample_grid(rng, size)
    if orientation is None:
        orientation = ("RAS", "LPS")[rng.integers(2)]
    if orientation not in ("RAS", "LPS"):
        raise ValueError(f"orientation must be 'RAS' or 'LPS', got {orientation!r}")
    # Separate streams for anatomy, noise and each label: toggling one label changes
    # only that label's rendering (the tests compare such pairs voxel by voxel).
    streams = [np.random.default_rng(s) for s in rng.integers(0, 2**63, size=2 + len(CT_RATE_LABELS))]
    chest = _Chest(streams[0], shape, spacing, positive={n for n, v in labels.items() if v},
                   label_rngs=dict(zip(CT_RATE_LABELS, streams[2:])), difficulty=difficulty)
    if masks:
        chest.cv.labels = np.zeros(shape, np.uint8)
    chest.anatomy()
    chest.findings_all()
    hu = chest.cv.hu
    add_noise, noise = noise, streams[1]
    sigma = np.float32(noise.uniform(6, 14))
    if add_noise:
        hu += noise.standard_normal(hu.shape, dtype=np.float32) * sigma
    np.clip(hu, *HU_RANGE, out=hu)
    return Phantom(hu, spacing, orientation, chest.findings, chest.landmarks(), chest.cv.labels)


def nifti_bytes(hu: np.ndarray, spacing, orientation: str, slope: float, inter: float,
                origin=(0.0, 0.0, 0.0), dtype=np.int16) -> bytes:
    """Uncompressed NIfTI-1 bytes of canonical-RAS ``hu`` stored as ``dtype`` (int16; a label map:
    uint8 with slope 1, inter 0) in ``orientation``.

    RAS keeps the array; LPS flips the first two axes and negates their affine columns,
    so every voxel keeps its physical position. ``origin`` is the world position of
    the canonical voxel (0, 0, 0).
    """
    import nibabel as nib

    stored = np.round((hu - inter) / slope)
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError(f"HU range does not fit {np.dtype(dtype).name} with the chosen slope/intercept")
    stored = stored.astype(dtype)
    sx, sy, sz = spacing
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = origin
    if orientation == "LPS":
        stored = stored[::-1, ::-1, :]
        nx, ny = hu.shape[:2]
        affine[0, 0], affine[1, 1] = -sx, -sy
        affine[0, 3] = origin[0] + (nx - 1) * sx
        affine[1, 3] = origin[1] + (ny - 1) * sy
    # nibabel fills the header; the voxel block is appended directly (Fortran order, as
    # NIfTI stores it), which is several times faster than Nifti1Image.to_bytes.
    header = nib.Nifti1Header()
    header.set_data_shape(stored.shape)
    header.set_data_dtype(dtype)
    header.set_zooms(tuple(float(v) for v in spacing))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    header.set_slope_inter(slope, inter)
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4 + stored.tobytes(order="F")


def split_of(sample_id: str) -> str:
    """Deterministic ~80/20 train/valid split from a hash of the id."""
    return "train" if int(hashlib.sha256(sample_id.encode()).hexdigest(), 16) % 10 < 8 else "valid"


def make_example(seed: int, index: int, size: str = "demo", difficulty: str | None = None,
                 masks: bool = False) -> dict[str, Any]:
    """Everything about example ``index``: labels, report, volume. Independent of other
    examples (own random stream), so the dataset is identical for any worker count. The
    labels, report wording and anatomy do not depend on ``difficulty``, only the findings'
    renderings (and the sizes/sides the report takes from them)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    labels = sample_labels(rng)
    scaling = SCALINGS[int(rng.integers(len(SCALINGS)))]
    orientation = ("RAS", "LPS")[index % 2]
    phantom = make_volume(rng, labels, size=size, orientation=orientation, difficulty=difficulty, masks=masks)
    report = make_report(rng, labels, phantom.findings)
    origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(phantom.hu.shape, phantom.spacing))
    return {"id": f"syn_{index:05d}", "labels": labels, "report": report, "phantom": phantom,
            "slope": scaling[0], "inter": scaling[1], "origin": origin}


SERIES_MAX = 2  # series per example write_dataset can make


def second_series(phantom: Phantom, size: str = "demo") -> tuple[np.ndarray, tuple[float, float, float]]:
    """Series 1 of an example (``series=2``): the same chest reconstructed at another slice
    thickness, (HU [X, Y, Z'], spacing). The z spacing is the next larger of the grid size's
    ``slice_spacings`` (the largest wraps to the smallest): a thick-slice series beside a thinner
    one, as scanners export them. Linear resampling along z with Gaussian anti-aliasing where it
    thickens (``preprocess.resample``), on the same centre; no random draws, so series 0, the
    labels and the report are those of a one-series data set."""
    from t3d_jax.data import preprocess

    spacings = sorted(SIZES[size].slice_spacings)
    sz = float(phantom.spacing[2])
    new_sz = next((s for s in spacings if s > sz + 1e-6), spacings[0])
    target = (phantom.spacing[0], phantom.spacing[1], float(new_sz))
    hu = preprocess.resample(phantom.hu, phantom.spacing, target, fill=HU_RANGE[0])
    return np.clip(hu, *HU_RANGE), target


def _write_gz(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(data, compresslevel=1, mtime=0))
    os.replace(tmp, path)


def _write_one(args):
    out, seed, index, size, difficulty, masks, series = args
    ex = make_example(seed, index, size, difficulty, masks=masks)
    ph = ex["phantom"]
    data = nifti_bytes(ph.hu, ph.spacing, ph.orientation, ex["slope"], ex["inter"], ex["origin"])
    rel = f"volumes/{ex['id']}.nii.gz"
    _write_gz(pathlib.Path(out) / rel, data)
    extra = {}
    if series > 1:  # the manifest's `volume` lists both, ';'-separated (t3d_jax/data/manifest.py)
        hu2, spacing2 = second_series(ph, size)
        origin2 = tuple(-(n - 1) / 2.0 * s for n, s in zip(hu2.shape, spacing2))
        rel2 = f"volumes/{ex['id']}_s1.nii.gz"
        _write_gz(pathlib.Path(out) / rel2, nifti_bytes(hu2, spacing2, ph.orientation, ex["slope"], ex["inter"],
                                                        origin2))
        rel = f"{rel};{rel2}"
        extra = {"series": [{"spacing": list(ph.spacing), "shape": list(ph.hu.shape)},
                            {"spacing": list(spacing2), "shape": list(hu2.shape)}]}
    row = {"id": ex["id"], "volume": rel, "report": ex["report"], "split": split_of(ex["id"])}
    if masks:  # the volume's geometry (orientation, spacing, origin), uint8 class indices
        row["mask"] = f"masks/{ex['id']}.nii.gz"
        _write_gz(pathlib.Path(out) / row["mask"],
                  nifti_bytes(ph.labels, ph.spacing, ph.orientation, 1.0, 0.0, ex["origin"], dtype=np.uint8))
    return {**row, **ex["labels"]}, {"id": ex["id"], "difficulty": difficulty, "orientation": ph.orientation,
                              "spacing": list(ph.spacing), "shape": list(ph.hu.shape),
                              "slope": ex["slope"], "inter": ex["inter"], "findings": ph.findings, **extra}


def write_dataset(out, num: int, seed: int, size: str = "demo", workers: int | None = None,
                  progress: bool = False, difficulty: str | None = None, masks: bool = False,
                  series: int = 1) -> pathlib.Path:
    """Writes ``num`` volumes under ``out/volumes/`` and ``out/manifest.csv``.

    The manifest's ``volume`` paths are relative to the manifest's folder. A side file
    ``out/findings.jsonl`` records, per volume, the difficulty, orientation, spacing, shape,
    storage scaling and what was drawn for each positive label; ``out/synthetic.json`` the
    generator's settings (seed, num, size, difficulty). ``difficulty`` None =
    ``default_difficulty(size)`` ('demo' for the demo grid size). ``masks=True`` also writes a
    label map per volume, ``out/masks/<id>.nii.gz`` (uint8 ``MASK_CLASSES`` indices on the volume's
    grid and affine), a ``mask`` manifest column and the class table ``out/classes.json``; the
    volumes, reports and other files are byte-identical to ``masks=False``. ``series=2`` also
    writes each example's second series, ``out/volumes/<id>_s1.nii.gz`` (:func:`second_series`:
    another slice thickness), listed after the first in the manifest's ``volume`` column
    (``a;b``); series 0, the reports and the labels stay those of ``series=1``. Returns the
    manifest path.
    """
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    if not 1 <= int(series) <= SERIES_MAX:
        raise ValueError(f"--series must be 1 or {SERIES_MAX}, got {series}")
    if series > 1 and masks:
        raise ValueError("--series 2 with --masks: masks are for one-series examples")
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose one of {sorted(SIZES)}")
    difficulty = _check_difficulty(default_difficulty(size) if difficulty is None else difficulty)
    out = pathlib.Path(out)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "masks").mkdir(exist_ok=True)
    jobs = [(str(out), seed, i, size, difficulty, bool(masks), int(series)) for i in range(num)]
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = min(cpus or 1, 8)

    def collect(results):
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=num, desc="synthetic volumes")
        return list(results)

    if workers <= 1 or num < 4:
        done = collect(map(_write_one, jobs))
    else:
        import multiprocessing

        # spawn, not fork: callers may have started threads (JAX, TensorFlow) already.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = collect(pool.map(_write_one, jobs, chunksize=max(1, num // (8 * workers))))
    rows, details = zip(*done)
    manifest = out / "manifest.csv"
    with open(manifest.with_suffix(".tmp"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "volume", "report", "split", *(["mask"] if masks else []),
                                          *CT_RATE_LABELS])
        w.writeheader()
        w.writerows(rows)
    os.replace(manifest.with_suffix(".tmp"), manifest)
    with open(out / "findings.jsonl", "w", encoding="utf-8") as f:
        for d in details:
            f.write(json.dumps(d, sort_keys=True) + "\n")
    settings = {"generator": "t3d_jax.data.synthetic", "seed": int(seed), "num": int(num), "size": size,
                "difficulty": difficulty, "render": RENDER[difficulty]}
    if series > 1:
        settings["series"] = int(series)
    if masks:
        settings["masks"] = True
        (out / "classes.json").write_text(json.dumps(
            {"classes": {str(i): name for i, name in enumerate(MASK_CLASSES)}}, indent=2) + "\n")
    (out / "synthetic.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return manifest
