"""Segmentation evaluation: sliding-window inference, Dice and 95% Hausdorff per class, and
predictions written back into the source file's geometry as NIfTI.

NumPy / SciPy only (no torch); tests/test_segmentation.py checks each piece against MONAI.

* :func:`sliding_window_inference` = ``monai.inferers.sliding_window_inference`` on channel-last
  volumes ``[B, X, Y, Z, C]`` of any size: the volume is padded (constant ``cval``, the pad split
  ``diff // 2`` before, the rest after) to at least the window, windows start every
  ``int(roi * (1 - overlap))`` voxels (the last moved back to end at the border), each window's
  prediction is weighted by a Gaussian of sigma ``sigma_scale * roi`` per axis (centred, peak 1,
  clamped below at max(its minimum, 1e-3); ``mode='constant'``: weight 1), summed, divided by the
  summed weights, and the padding cropped off. The predictor runs on ``sw_batch_size`` windows
  at once (the last call padded with repeats, so a jitted predictor compiles once).
  :func:`predict_volume` runs a segmentation model's softmax through it and takes the argmax.
* :func:`dice_per_class` = ``monai.metrics.DiceMetric(include_background=True,
  reduction='none', ignore_empty=True)`` on one-hot label maps: 2|P∩G| / (|P| + |G|); a class
  absent from the ground truth gives NaN (ignored by the nan-means), present in the ground truth
  and absent from the prediction 0.
* :func:`hausdorff95_per_class` = ``monai.metrics.HausdorffDistanceMetric(percentile=95)``:
  surface voxels = mask XOR its erosion (scipy's default 6-connected structure, outside the
  volume counts as background), Euclidean distance (mm with ``spacing``) from each surface voxel
  of one mask to the nearest of the other, the 95th percentile (linear interpolation) of each
  direction, the larger of the two. Both masks empty: NaN; exactly one empty: NaN too (MONAI
  1.6's value: a missed or hallucinated structure has no distance; it shows as Dice 0 or as a
  Dice NaN with a non-empty prediction), or ``one_empty=inf`` to count it. :func:`summarize`
  gives the mean of the finite values per class with the counts of NaN and inf.
* :func:`prediction_to_source` / :func:`write_prediction_nifti`: a label map on the prepared
  grid (canonical RAS+, resampled to the preset's spacing, centre cropped/padded to its size:
  t3d_jax/data/preprocess.py) back on the source file's voxel grid: the crop/pad is undone (voxels
  that were cropped away are background), each source voxel takes the label of the nearest
  prepared voxel (the inverse of ``preprocess._axis_plan``'s coordinate map), and the axes are
  permuted/flipped back from RAS+ to the file's orientation; written with the file's own affine
  and shape. :func:`prepared_from_source` is the forward map for label maps (nearest neighbour on
  the same coordinates as the volume's resampling).
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage
from scipy.spatial import cKDTree

from t3d_jax.data import preprocess


# ------------------------------------------------------------------------- sliding window
def gaussian_importance_map(roi_size: Sequence[int], sigma_scale: float | Sequence[float] = 0.125) -> np.ndarray:
    """MONAI's ``compute_importance_map(mode='gaussian')``: separable, peak 1 at the centre,
    clamped below at max(min, 1e-3). float32 ``roi_size``."""
    roi = [int(r) for r in roi_size]
    scales = [float(sigma_scale)] * len(roi) if np.isscalar(sigma_scale) else [float(s) for s in sigma_scale]
    out = np.ones((), np.float32)
    for r, s in zip(roi, scales):
        x = np.arange(-(r - 1) / 2.0, (r - 1) / 2.0 + 1, dtype=np.float32)[:r]
        g = np.exp(x ** 2 / np.float32(-2 * (r * s) ** 2)).astype(np.float32)
        out = out[..., None] * g
    return np.maximum(out, max(float(out.min()), 1e-3)).astype(np.float32)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis (MONAI's ``dense_patch_slices``)."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    num = 1
    for d in range(int(math.ceil(size / interval))):
        if d * interval + roi >= size:
            num = d + 1
            break
    return [i * interval - max(i * interval + roi - size, 0) for i in range(num)]


def sliding_window_inference(volume: np.ndarray, roi_size: Sequence[int], predictor: Callable,
                             *, overlap: float = 0.25, sigma_scale: float | Sequence[float] = 0.125,
                             mode: str = "gaussian", sw_batch_size: int = 4, cval: float = 0.0) -> np.ndarray:
    """Per-voxel predictions ``[B, X, Y, Z, K]`` float32 of ``volume`` ``[B, X, Y, Z, C]`` (or
    ``[X, Y, Z, C]``, answered without the batch axis) from ``predictor(windows [n, *roi, C]) ->
    [n, *roi, K]``; see the module docstring."""
    vol = np.asarray(volume)
    squeeze = vol.ndim == 4
    if squeeze:
        vol = vol[None]
    if vol.ndim != 5:
        raise ValueError(f"volume must be [B, X, Y, Z, C] or [X, Y, Z, C], got {np.shape(volume)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = tuple(int(r) for r in roi_size)
    shape = vol.shape[1:4]
    pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, shape)]
    if any(sum(p) for p in pads):
        vol = np.pad(vol, [(0, 0)] + pads + [(0, 0)], constant_values=cval)
    full = vol.shape[1:4]
    if mode == "gaussian":
        weight = gaussian_importance_map(roi, sigma_scale)
    elif mode == "constant":
        weight = np.ones(roi, np.float32)
    else:
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    starts = [(a, b, c) for a in window_starts(full[0], roi[0], overlap)
              for b in window_starts(full[1], roi[1], overlap) for c in window_starts(full[2], roi[2], overlap)]
    jobs = [(i, s) for i in range(vol.shape[0]) for s in starts]
    out = count = None
    for j in range(0, len(jobs), sw_batch_size):
        chunk = jobs[j:j + sw_batch_size]
        wins = [vol[i, a:a + roi[0], b:b + roi[1], c:c + roi[2]] for i, (a, b, c) in chunk]
        wins += [wins[-1]] * (sw_batch_size - len(wins))
        pred = np.asarray(predictor(np.stack(wins)), np.float32)
        if pred.shape[1:4] != roi:
            raise ValueError(f"predictor returned {pred.shape} for windows of {roi}: it must keep the size")
        if out is None:
            out = np.zeros((vol.shape[0], *full, pred.shape[-1]), np.float32)
            count = np.zeros((vol.shape[0], *full, 1), np.float32)
        for (i, (a, b, c)), p in zip(chunk, pred):
            region = (i, slice(a, a + roi[0]), slice(b, b + roi[1]), slice(c, c + roi[2]))
            out[region] += p * weight[..., None]
            count[region] += weight[..., None]
    out = out / count
    out = out[:, pads[0][0]:pads[0][0] + shape[0], pads[1][0]:pads[1][0] + shape[1],
              pads[2][0]:pads[2][0] + shape[2]]
    return out[0] if squeeze else out


def window_predictor(model) -> Callable[[np.ndarray], np.ndarray]:
    """``windows [n, *roi, C] -> softmax probabilities [n, *roi, K]`` of a segmentation model
    (``model.logits``, deterministic), jitted once per window shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    fn = nnx.jit(lambda m, x: jax.nn.softmax(m.logits(x, deterministic=True), axis=-1))
    return lambda windows: np.asarray(fn(model, jnp.asarray(windows, jnp.float32)))


def predict_volume(model, volume: np.ndarray, roi_size: Sequence[int], *, overlap: float = 0.5,
                   sigma_scale: float = 0.125, sw_batch_size: int = 4, cval: float = 0.0,
                   probabilities: bool = False) -> np.ndarray:
    """Labels ``[X, Y, Z]`` int32 (argmax; ``probabilities=True``: the averaged softmax
    ``[X, Y, Z, K]``) of one model-input volume ``[X, Y, Z, C]`` of any size, by Gaussian-weighted
    sliding windows of ``roi_size`` (the training ``data.view_size``). ``cval`` pads a volume
    smaller than the window, in model-input units (0 = -1000 HU under the "unit" scaling of a
    [-1000, ...] window, 0 HU under "hu/1000")."""
    probs = sliding_window_inference(volume, roi_size, window_predictor(model), overlap=overlap,
                                     sigma_scale=sigma_scale, mode="gaussian", sw_batch_size=sw_batch_size,
                                     cval=cval)
    return probs if probabilities else np.argmax(probs, axis=-1).astype(np.int32)


# ------------------------------------------------------------------------------ metrics
def _class_masks(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    return labels[None] == np.arange(num_classes).reshape((-1,) + (1,) * labels.ndim)


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """[K] Dice of label maps ``pred`` and ``target`` (same shape); NaN where the class is absent
    from ``target`` (module docstring)."""
    p, g = _class_masks(pred, num_classes), _class_masks(target, num_classes)
    axes = tuple(range(1, p.ndim))
    inter = np.sum(p & g, axis=axes).astype(np.float64)
    total = (np.sum(p, axis=axes) + np.sum(g, axis=axes)).astype(np.float64)
    has_gt = np.any(g, axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(has_gt, 2.0 * inter / np.maximum(total, 1), np.nan)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask)


def _directed_percentile(a_pts: np.ndarray, b_pts: np.ndarray, q: float) -> float:
    d, _ = cKDTree(b_pts, leafsize=32).query(a_pts, k=1)
    return float(np.percentile(d, q))


def hausdorff_distance(pred_mask: np.ndarray, target_mask: np.ndarray, *, percentile: float = 95.0,
                       spacing: Sequence[float] | None = None, one_empty: float = float("nan")) -> float:
    """Symmetric percentile Hausdorff distance of two boolean masks (module docstring): NaN when
    both are empty, ``one_empty`` (NaN, MONAI's value; or e.g. inf) when exactly one is."""
    p, g = np.asarray(pred_mask, bool), np.asarray(target_mask, bool)
    if not p.any() and not g.any():
        return float("nan")
    if not p.any() or not g.any():
        return float(one_empty)
    scale = np.ones(p.ndim) if spacing is None else np.asarray(spacing, np.float64)
    sp = np.argwhere(_surface(p)).astype(np.float64) * scale
    sg = np.argwhere(_surface(g)).astype(np.float64) * scale
    return max(_directed_percentile(sp, sg, percentile), _directed_percentile(sg, sp, percentile))


def hausdorff95_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int, *,
                          spacing: Sequence[float] | None = None, one_empty: float = float("nan")) -> np.ndarray:
    """[K] 95% Hausdorff distance per class of two label maps (class 0 included; NaN where both
    masks are empty, ``one_empty`` where exactly one is)."""
    p, g = _class_masks(pred, num_classes), _class_masks(target, num_classes)
    return np.asarray([hausdorff_distance(p[k], g[k], spacing=spacing, one_empty=one_empty)
                       for k in range(num_classes)])


def summarize(per_case: np.ndarray, names: Sequence[str] | None = None) -> dict:
    """Per class over cases ``[cases, K]``: mean of the finite values, count of NaN / inf."""
    per_case = np.asarray(per_case, np.float64)
    k = per_case.shape[1]
    names = [str(i) for i in range(k)] if names is None else list(names)
    out = {}
    for j, name in enumerate(names):
        col = per_case[:, j]
        finite = col[np.isfinite(col)]
        out[name] = {"mean": float(finite.mean()) if finite.size else float("nan"),
                     "n": int(finite.size), "nan": int(np.isnan(col).sum()), "inf": int(np.isinf(col).sum())}
    return out


# ------------------------------------------------------------------- geometry round trip
def _source_geometry(source: str | os.PathLike):
    """(affine, shape) of the file as read: a NIfTI header, or a DICOM series folder's RAS
    affine (t3d_jax/data/preprocess.py's reader)."""
    path = pathlib.Path(source)
    if path.is_dir():
        data, affine = preprocess.read_dicom_series(path)
        return np.asarray(affine, np.float64), tuple(int(n) for n in data.shape[:3])
    img = nib.load(str(path))
    return np.asarray(img.affine, np.float64), tuple(int(n) for n in img.shape[:3])


def _canonical(affine: np.ndarray, shape) -> tuple[np.ndarray, tuple, tuple]:
    """(io orientation, canonical shape, canonical spacing): preprocess._make_volume's reorientation."""
    ornt = orientations.io_orientation(affine)
    canon_affine = affine @ orientations.inv_ornt_aff(ornt, shape)
    canon_shape = tuple(np.asarray(shape)[np.argsort(ornt[:, 0])])
    spacing = tuple(float(s) for s in np.linalg.norm(canon_affine[:3, :3], axis=0))
    return ornt, tuple(int(n) for n in canon_shape), spacing


def _target_spacing(spacing, shape, preset: preprocess.Preset):
    if preset.spacing is not None:
        return tuple(float(s) for s in preset.spacing)
    return tuple(float(s) * n / m for s, n, m in zip(spacing, shape, preset.size))


def _axis_nearest(n_in: int, s_in: float, s_out: float, size: int):
    """Prepared index of each canonical voxel along one axis (-1: cropped away), the inverse of
    ``preprocess._axis_plan``: j = (i - (n_in-1)/2) s_in/s_out + (n_res-1)/2, k = j - start."""
    n_res = max(1, int(round(n_in * s_in / s_out)))
    start = (n_res - size) // 2 if n_res >= size else -((size - n_res) // 2)
    j = (np.arange(n_in) - (n_in - 1) / 2.0) * (s_in / s_out) + (n_res - 1) / 2.0
    j = np.clip(np.floor(j + 0.5), 0, n_res - 1).astype(np.int64)
    k = j - start
    return np.where((k >= 0) & (k < size), k, -1)


def prepared_from_source(labels_canonical: np.ndarray, spacing: Sequence[float], preset) -> np.ndarray:
    """A label map on the canonical grid -> the prepared grid (nearest neighbour on the coordinates
    ``preprocess.resample`` interpolates at; padding = 0)."""
    preset = preprocess.get_preset(preset)
    lab = np.asarray(labels_canonical)
    tspacing = _target_spacing(spacing, lab.shape, preset)
    idx = []
    for n, s, t, m in zip(lab.shape, spacing, tspacing, preset.size):
        coords, a, b = preprocess._axis_plan(n, float(s), float(t), int(m))
        i = np.clip(np.floor(coords + 0.5), 0, n - 1).astype(np.int64)
        idx.append((i, (np.arange(m) >= a) & (np.arange(m) < b)))
    out = lab[np.ix_(idx[0][0], idx[1][0], idx[2][0])]
    keep = idx[0][1][:, None, None] & idx[1][1][None, :, None] & idx[2][1][None, None, :]
    return np.where(keep, out, 0).astype(lab.dtype)


def prediction_to_source(prediction: np.ndarray, source: str | os.PathLike, preset
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(labels on the source file's voxel grid, the file's affine) of a label map on the prepared
    grid of ``source`` under ``preset`` (the dataset's preset; module docstring)."""
    preset = preprocess.get_preset(preset)
    pred = np.asarray(prediction)
    if pred.shape != tuple(preset.size):
        raise ValueError(f"prediction {pred.shape} is not on the prepared grid {tuple(preset.size)} of "
                         f"preset {preset.name!r}")
    affine, shape = _source_geometry(source)
    ornt, canon_shape, spacing = _canonical(affine, shape)
    tspacing = _target_spacing(spacing, canon_shape, preset)
    ks = [_axis_nearest(n, s, t, m) for n, s, t, m in zip(canon_shape, spacing, tspacing, preset.size)]
    valid = (ks[0] >= 0)[:, None, None] & (ks[1] >= 0)[None, :, None] & (ks[2] >= 0)[None, None, :]
    canon = pred[np.ix_(np.maximum(ks[0], 0), np.maximum(ks[1], 0), np.maximum(ks[2], 0))]
    canon = np.where(valid, canon, 0).astype(pred.dtype)
    # canonical -> file axes: the inverse of apply_orientation(data, ornt)
    back = orientations.ornt_transform(orientations.axcodes2ornt(("R", "A", "S")), ornt)
    source_labels = orientations.apply_orientation(canon, back)
    if source_labels.shape != shape:
        raise AssertionError(f"reorientation gave {source_labels.shape}, the file has {shape}")
    return np.ascontiguousarray(source_labels), affine


def write_prediction_nifti(prediction: np.ndarray, source: str | os.PathLike, out_path: str | os.PathLike,
                           preset) -> pathlib.Path:
    """Writes ``prediction`` (prepared grid) as a NIfTI label map (uint8, or int16 beyond 255
    classes) with the source file's shape and affine; returns the path."""
    labels, affine = prediction_to_source(prediction, source, preset)
    dtype = np.uint8 if labels.max(initial=0) < 256 and labels.min(initial=0) >= 0 else np.int16
    img = nib.Nifti1Image(labels.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    out = pathlib.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(out))
    return out
