"""Segmentation label maps: reading, checking against their volume, preprocessing, view crops.

A mask is an integer label map (0 = background, k = class k) on the same voxel grid as its CT.
It goes through exactly the volume's steps (:mod:`t3d_jax.data.preprocess`), with nearest-
neighbour sampling instead of linear interpolation and no window or anti-aliasing:

* :func:`load_mask` reads a NIfTI or NRRD label map, canonicalises it to RAS+ like ``load_volume`` and
  refuses one whose grid (shape, affine) is not its volume's, whose values are not non-negative
  integers, or that holds labels missing from the class table; problems raise
  :class:`~t3d_jax.data.preprocess.VolumeError` naming the mask file, so ``prepare`` logs them in
  ``errors.jsonl`` like a bad volume.
* :func:`preprocess_mask` samples it at the voxel positions ``preprocess_volume`` uses
  (``preprocess._axis_plan``: the preset's spacing, centred, then centre crop/pad; padding is
  background) and returns ``uint8`` or ``int16`` labels of the preset's size.
* :func:`crop_mask` cuts a view's box out of a stored mask at the sample positions
  :func:`t3d_jax.data.views.resample_box` uses for the volume (half-voxel centres, edge values held),
  taking the nearest voxel instead of interpolating.

A class table is ``{"classes": {"0": "background", "1": "lung_left", ...}}`` (``classes.json`` in the
manifest's folder or ``prepare --mask-classes``); ``dataset.json`` carries it under ``masks``.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np

from t3d_jax.data import preprocess
from t3d_jax.data.preprocess import VolumeError
from t3d_jax.utils import UserValueError

# A mask's voxel grid may differ from its volume's by this fraction of the smallest voxel
# spacing (float32 affines in NIfTI headers, DICOM -> NIfTI conversions), no more.
AFFINE_TOLERANCE_VOXELS = 0.1
CLASSES_JSON = "classes.json"


# ----------------------------------------------------------------------------------------------
# Class tables
# ----------------------------------------------------------------------------------------------


def read_class_table(path: str | os.PathLike) -> dict[int, str]:
    """``{"classes": {"0": "background", "1": "liver", ...}}`` (or the inner mapping alone) ->
    {index: name}. Index 0 must be present (background); indices are 0..32767."""
    path = pathlib.Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserValueError(f"{path}: class table cannot be read ({type(err).__name__}: {err})") from err
    table = raw.get("classes", raw) if isinstance(raw, dict) else None
    if not isinstance(table, dict) or not table:
        raise UserValueError(f'{path}: class table must be {{"classes": {{"0": "background", "1": "name", ...}}}}')
    out = {}
    for key, name in table.items():
        try:
            index = int(key)
        except ValueError:
            raise UserValueError(f"{path}: class index {key!r} is not an integer") from None
        if not 0 <= index <= 32767 or not isinstance(name, str) or not name:
            raise UserValueError(f"{path}: class {key!r}: {name!r} must map an index 0..32767 to a name")
        out[index] = name
    if 0 not in out:
        raise UserValueError(f"{path}: class table has no index 0 (background)")
    return dict(sorted(out.items()))


def class_table_json(classes: Mapping[int, str]) -> dict:
    """{index: name} -> the JSON form (``{"classes": {"0": ...}}``)."""
    return {"classes": {str(k): v for k, v in sorted(classes.items())}}


def mask_dtype(classes: Mapping[int, str] | None) -> np.dtype:
    """Stored dtype of a dataset's masks: uint8 when the class table's indices fit, else int16
    (also without a class table, when any index up to 32767 may occur)."""
    if classes is not None and max(classes) <= 255:
        return np.dtype(np.uint8)
    return np.dtype(np.int16)


# ----------------------------------------------------------------------------------------------
# Reading and checking
# ----------------------------------------------------------------------------------------------


def load_mask(path: str | os.PathLike, volume: preprocess.Volume,
              classes: Mapping[int, str] | None = None) -> np.ndarray:
    """Reads the label map of ``volume`` -> int32 [X, Y, Z] on ``volume.data``'s canonical grid.

    Refused (VolumeError naming the mask file): anything ``load_volume`` refuses, a DICOM folder,
    a grid whose canonical shape differs from the volume's or whose voxel positions differ by
    more than ``AFFINE_TOLERANCE_VOXELS`` of a voxel anywhere on the grid, non-integer or negative
    values, values above 32767, and labels absent from ``classes`` (when given).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise VolumeError(f"{path}: mask is a folder; masks must be NIfTI or NRRD label map files")
    mask = preprocess.load_volume(path)  # the volume's reader: same checks, same canonicalisation
    if mask.data.shape != volume.data.shape:
        raise VolumeError(
            f"{path}: mask shape {mask.source_shape} ({mask.source_orientation}) does not match its volume's "
            f"{volume.source_shape} ({volume.source_orientation}, {volume.path})")
    corners = np.array([[i, j, k, 1.0] for i in (0, mask.data.shape[0] - 1) for j in (0, mask.data.shape[1] - 1)
                        for k in (0, mask.data.shape[2] - 1)]).T
    # Both affines are affine maps, so the largest displacement over the grid is at a corner.
    shift = float(np.max(np.linalg.norm((mask.affine @ corners - volume.affine @ corners)[:3], axis=0)))
    tol = AFFINE_TOLERANCE_VOXELS * min(volume.spacing)
    if shift > tol:
        raise VolumeError(
            f"{path}: mask affine does not match its volume's ({volume.path}): voxel positions differ by up "
            f"to {shift:.3g} mm (tolerance {tol:.3g} mm)")
    data = mask.data
    if not np.array_equal(data, np.rint(data)):
        raise VolumeError(f"{path}: mask holds non-integer values; a label map of class indices is expected "
                          "(probability maps and images are not masks)")
    lo, hi = float(data.min()), float(data.max())
    if lo < 0 or hi > 32767:
        raise VolumeError(f"{path}: mask values {lo:g}..{hi:g} are outside 0..32767")
    labels = data.astype(np.int32)
    if classes is not None:
        unknown = sorted(set(np.unique(labels).tolist()) - set(classes))
        if unknown:
            raise VolumeError(f"{path}: mask holds labels {unknown[:10]} that are not in the class table")
    return labels


# ----------------------------------------------------------------------------------------------
# Preprocessing (the volume's grid) and view crops (the view's grid)
# ----------------------------------------------------------------------------------------------


def _nearest(coords: np.ndarray, n: int) -> np.ndarray:
    """Nearest voxel index of fractional positions, edge voxels held beyond the first/last centre."""
    return np.clip(np.floor(np.asarray(coords, np.float64) + 0.5), 0, n - 1).astype(np.intp)


def resample_labels(labels: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float],
                    size: Sequence[int] | None = None, dtype=np.uint8) -> np.ndarray:
    """Nearest-neighbour twin of :func:`preprocess.resample`: the same output voxel positions
    (``_axis_plan``), the nearest input voxel's label, background (0) in the padding."""
    sizes = [None] * 3 if size is None else list(size)
    plans = [preprocess._axis_plan(n, s, t, m)
             for n, s, t, m in zip(labels.shape, spacing, target_spacing, sizes)]
    out = np.zeros([len(c) for c, _, _ in plans], dtype=dtype)
    if any(b <= a for _, a, b in plans):
        return out
    part = labels
    for axis, (coords, a, b) in enumerate(plans):
        part = np.take(part, _nearest(coords[a:b], labels.shape[axis]), axis=axis)
    out[tuple(slice(a, b) for _, a, b in plans)] = part
    return out


def preprocess_mask(labels: np.ndarray, volume: preprocess.Volume, preset: str | preprocess.Preset,
                    dtype=np.uint8) -> np.ndarray:
    """A label map from :func:`load_mask` -> ``dtype`` [preset size] aligned voxel for voxel with
    ``preprocess_volume(volume, preset)``."""
    preset = preprocess.get_preset(preset)
    return resample_labels(labels, volume.spacing, preprocess.target_spacing(volume, preset), preset.size,
                           dtype=dtype)


def crop_mask(mask: np.ndarray, box, size: Sequence[int]) -> np.ndarray:
    """The labels of ``mask`` inside a view's ``box``, on the view's ``size`` grid.

    Sample positions are :func:`t3d_jax.data.views.resample_box`'s: view voxel ``j`` of ``M`` sits at
    volume fraction ``lo + (j + 0.5) / M * (hi - lo)``, i.e. at voxel coordinate
    ``fraction * N - 0.5`` of an axis of ``N`` stored voxels, clamped to the first/last voxel
    centre; the label there is the nearest stored voxel's. Returns ``mask``'s dtype [X', Y', Z'].
    """
    mask = np.asarray(mask)
    if mask.ndim != 3 or min(mask.shape) < 1:
        raise ValueError(f"expected a 3D mask [X, Y, Z], got shape {mask.shape}")
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (2, 3):
        raise ValueError(f"box must have shape (2, 3) = (lo, hi) x (x, y, z), got {box.shape}")
    size = tuple(int(s) for s in size)
    out = mask
    for axis in range(3):
        n, m = mask.shape[axis], size[axis]
        lo, hi = box[0, axis], box[1, axis]
        centres = (lo + (np.arange(m, dtype=np.float64) + 0.5) * ((hi - lo) / m)) * n - 0.5
        out = np.take(out, _nearest(np.clip(centres, 0.0, n - 1), n), axis=axis)
    return out
