"""Multi-view sampling of one preprocessed CT volume (pure NumPy, runs in Grain workers).

T3D's Text-informed Multi-view Alignment matches tokens *across* views of the same
volume, so every view carries the box it was cut from. Conventions used everywhere:

* A stored volume has ``N`` voxels along an axis; voxel ``i`` covers the fractional
  interval ``[i/N, (i+1)/N]`` of the axis ("fraction of the volume's extent").
* A crop box is ``[[lo_x, lo_y, lo_z], [hi_x, hi_y, hi_z]]`` in those fractions,
  ``0 <= lo < hi <= 1``. A view of ``M`` voxels along the axis places its voxel ``j``
  at the fraction ``lo + (j + 0.5) / M * (hi - lo)`` (half-voxel centres, the
  ``align_corners=False`` convention), so a point at view fraction ``f`` lies at
  volume fraction ``lo + f * (hi - lo)``. That is what the TMA loss relies on.
* Values are interpolated linearly, with edge values held beyond the first/last voxel
  centre (``scipy.ndimage.map_coordinates(order=1, mode='nearest')`` on the same
  coordinates gives the same numbers; the tests check exactly that).

Linear interpolation is separable, so the resampler interpolates one axis at a time
with two ``np.take`` gathers per axis instead of one 8-neighbour gather per output voxel;
``bench/input_pipeline.py`` measures it. Intensities stay int16 until the first pass,
and the record's ``intensity_scale``/``offset`` are applied after resampling (a linear
map commutes with linear interpolation), so the full volume is never converted to float.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from t3d_jax.data.masks import crop_mask


@dataclasses.dataclass(frozen=True)
class ViewOptions:
    """How training views are drawn; mirrors the ``data`` section of ``configs/t3d.py``."""

    num_views: int = 2
    view_size: tuple[int, int, int] = (48, 48, 48)
    crop_min: float = 0.5  # each crop covers crop_min..crop_max of each axis
    crop_max: float = 1.0
    intensity_jitter: float = 0.05  # model-input intensities *= 1+U(-j,j), += U(-j,j)
    noise_std: float = 0.02  # additive Gaussian noise on model-input intensities
    flip_lr: bool = False  # reports name sides, so off by default

    def __post_init__(self):
        size = tuple(int(s) for s in self.view_size)
        object.__setattr__(self, "view_size", size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"view_size must be three positive ints (x, y, z), got {self.view_size}")
        if self.num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {self.num_views}")
        if not 0.0 < self.crop_min <= self.crop_max <= 1.0:
            raise ValueError(
                f"need 0 < crop_min <= crop_max <= 1, got crop_min={self.crop_min}, crop_max={self.crop_max}")
        if self.intensity_jitter < 0 or self.noise_std < 0:
            raise ValueError(
                f"intensity_jitter and noise_std must be >= 0, got {self.intensity_jitter}, {self.noise_std}")

    @classmethod
    def from_config(cls, data_config: Any) -> "ViewOptions":
        """Builds the options from ``config.data`` (an ml_collections ConfigDict or dict)."""
        get = data_config.get if hasattr(data_config, "get") else lambda k, d: getattr(data_config, k, d)
        defaults = cls()
        return cls(
            num_views=int(get("num_views", defaults.num_views)),
            view_size=tuple(get("view_size", defaults.view_size)),
            crop_min=float(get("crop_min", defaults.crop_min)),
            crop_max=float(get("crop_max", defaults.crop_max)),
            intensity_jitter=float(get("intensity_jitter", defaults.intensity_jitter)),
            noise_std=float(get("noise_std", defaults.noise_std)),
            flip_lr=bool(get("flip_lr", defaults.flip_lr)),
        )


def _check_volume(volume: np.ndarray) -> None:
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"expected a 3D volume [X, Y, Z], got shape {volume.shape}")


def _axis_taps(lo: float, hi: float, n_in: int, n_out: int):
    """Left neighbour index, right neighbour index and right weight for one axis."""
    centres = (lo + (np.arange(n_out, dtype=np.float64) + 0.5) * ((hi - lo) / n_out)) * n_in - 0.5
    centres = np.clip(centres, 0.0, n_in - 1)
    left = np.minimum(np.floor(centres).astype(np.intp), max(n_in - 2, 0))
    right = np.minimum(left + 1, n_in - 1)
    weight = (centres - left).astype(np.float32)
    return left, right, weight


def resample_box(volume: np.ndarray, box: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """Linearly resamples the part of ``volume`` inside ``box`` onto an ``out_shape`` grid.

    Args:
      volume: [X, Y, Z] array of any real dtype (int16 as stored).
      box: [2, 3] (lo, hi) fractions of the volume's extent per axis (see module doc).
      out_shape: (X', Y', Z') of the result.

    Returns:
      float32 [X', Y', Z'] in the volume's own units.
    """
    _check_volume(volume)
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (2, 3):
        raise ValueError(f"box must have shape (2, 3) = (lo, hi) x (x, y, z), got {box.shape}")
    out_shape = tuple(int(s) for s in out_shape)
    taps = [_axis_taps(box[0, a], box[1, a], volume.shape[a], out_shape[a]) for a in range(3)]
    # Shrinking axes first keeps the intermediate arrays (and the work) small.
    order = sorted(range(3), key=lambda a: out_shape[a] / volume.shape[a])
    out = volume
    for axis in order:
        left, right, weight = taps[axis]
        shape = [1, 1, 1]
        shape[axis] = -1
        weight = weight.reshape(shape)
        lower = np.take(out, left, axis=axis).astype(np.float32, copy=False)
        upper = np.take(out, right, axis=axis).astype(np.float32, copy=False)
        upper -= lower
        upper *= weight
        upper += lower
        out = upper
    return out


def sample_boxes(rng: np.random.Generator, num_views: int, crop_min: float, crop_max: float) -> np.ndarray:
    """Random crop boxes: per view and axis an extent U(crop_min, crop_max), placed uniformly.

    Returns float32 [num_views, 2, 3] (lo, hi) fractions with 0 <= lo < hi <= 1.
    """
    extent = rng.uniform(crop_min, crop_max, size=(num_views, 3))
    lo = rng.uniform(0.0, 1.0, size=(num_views, 3)) * (1.0 - extent)
    hi = np.minimum(lo + extent, 1.0)
    return np.stack([lo, hi], axis=1).astype(np.float32)


def make_views(
    volume: np.ndarray,
    intensity_scale: float,
    intensity_offset: float,
    rng: np.random.Generator,
    options: ViewOptions,
    mask: np.ndarray | None = None,
):
    """Draws ``options.num_views`` augmented views of one stored volume.

    Each view: a random crop box, linear resampling to ``view_size``, conversion to model
    units (``stored * scale + offset``), intensity jitter (random gain and shift, both
    U(-j, j)) and Gaussian noise. With ``flip_lr`` the whole example is mirrored along x
    *before* cropping, so all its views share one frame and the boxes stay consistent
    with each other (they are then fractions of the mirrored volume).

    With ``mask`` (the record's label map, on the stored grid) each view's labels are cut with
    the same mirroring and box (`t3d_jax.data.masks.crop_mask`: the nearest stored voxel at the
    view's sample positions); no random number is drawn for it, so the views are the same with
    or without a mask.

    Returns:
      views float32 [V, X, Y, Z, 1] and boxes float32 [V, 2, 3]; with ``mask`` also the views'
      labels int32 [V, X, Y, Z].
    """
    _check_volume(volume)
    if mask is not None and np.shape(mask) != np.shape(volume):
        raise ValueError(f"mask shape {np.shape(mask)} differs from the volume's {np.shape(volume)}")
    if options.flip_lr and rng.random() < 0.5:
        volume = volume[::-1]
        mask = None if mask is None else mask[::-1]
    boxes = sample_boxes(rng, options.num_views, options.crop_min, options.crop_max)
    views = np.empty((options.num_views, *options.view_size, 1), dtype=np.float32)
    jitter = options.intensity_jitter
    for v in range(options.num_views):
        view = resample_box(volume, boxes[v], options.view_size)
        gain, shift = rng.uniform(-jitter, jitter, size=2) if jitter > 0 else (0.0, 0.0)
        # (x * scale + offset) * (1 + gain) + shift, folded into one multiply-add.
        view *= np.float32(intensity_scale * (1.0 + gain))
        view += np.float32(intensity_offset * (1.0 + gain) + shift)
        if options.noise_std > 0:
            view += rng.standard_normal(size=view.shape, dtype=np.float32) * np.float32(options.noise_std)
        views[v, ..., 0] = view
    if mask is None:
        return views, boxes
    masks = np.stack([crop_mask(mask, boxes[v], options.view_size) for v in range(options.num_views)])
    return views, boxes, masks.astype(np.int32)


VIEWS_ON = ("host", "device")


def device_view_params(
    volume: np.ndarray,
    intensity_scale: float,
    intensity_offset: float,
    rng: np.random.Generator,
    options: ViewOptions,
) -> dict[str, np.ndarray]:
    """What the accelerator needs to make :func:`make_views`' views itself (``data.views_on='device'``,
    :mod:`t3d_jax.data.device_views`): the stored volume and each view's box, intensity map and
    noise key, drawn from ``rng`` without resampling anything.

    Draw order: the flip (with ``flip_lr``) and the boxes first, exactly as :func:`make_views`
    draws them, so the boxes (and flips) of an element are the host path's for the same
    (seed, index). Then every view's (gain, shift), then one 64-bit noise key. :func:`make_views`
    draws view ``v``'s noise field between view ``v``'s and view ``v+1``'s jitter, so the jitter
    of views after the first equals the host path's only when ``noise_std`` is 0 (the noise is a
    new draw either way: the accelerator makes it from the key with ``jax.random``).

    Returns a dict of NumPy arrays:
      volume    int16 [X, Y, Z], as stored (mirrored along x when the flip was drawn; a view)
      boxes     float32 [V, 2, 3]
      intensity float32 [V, 2]: (a, b) with model input = resampled stored value * a + b, which
                folds the record's scale/offset and the view's jitter, computed as make_views does
      noise_key uint32 [2]: raw threefry key data of the view noise (zeros when noise_std is 0)
    """
    _check_volume(volume)
    if options.flip_lr and rng.random() < 0.5:
        volume = volume[::-1]
    boxes = sample_boxes(rng, options.num_views, options.crop_min, options.crop_max)
    jitter = options.intensity_jitter
    intensity = np.empty((options.num_views, 2), np.float32)
    for v in range(options.num_views):
        gain, shift = rng.uniform(-jitter, jitter, size=2) if jitter > 0 else (0.0, 0.0)
        intensity[v] = (np.float32(intensity_scale * (1.0 + gain)),
                        np.float32(intensity_offset * (1.0 + gain) + shift))
    if options.noise_std > 0:
        noise_key = rng.integers(0, 2**32, size=2, dtype=np.uint32)
    else:
        noise_key = np.zeros(2, np.uint32)
    return {"volume": volume, "boxes": boxes, "intensity": intensity, "noise_key": noise_key}


def eval_view(
    volume: np.ndarray, intensity_scale: float, intensity_offset: float, view_size: Sequence[int]
) -> np.ndarray:
    """Deterministic evaluation input: the whole volume resampled to ``view_size``.

    Returns float32 [X, Y, Z, 1] in model units, no jitter, no noise.
    """
    full = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    out = resample_box(volume, full, view_size)
    out *= np.float32(intensity_scale)
    out += np.float32(intensity_offset)
    return out[..., None]
