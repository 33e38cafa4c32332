"""Training views made on the accelerator (``data.views_on = "device"``).

With ``data.views_on = "host"`` (the default) the Grain workers make every view
(:func:`t3d_jax.data.views.make_views`) and the batch carries ``views`` [B, V, X, Y, Z, 1]
float32. With ``"device"`` the workers only read and decode a record and draw its random
parameters (:func:`t3d_jax.data.views.device_view_params`); the batch carries the stored volume
instead of the views::

    volume     int16   [B, X, Y, Z]   the stored grid (every record of a dataset has the preset's size)
    boxes      float32 [B, V, 2, 3]   the crop boxes, as on the host path (TMA matches tokens by them)
    intensity  float32 [B, V, 2]      per view (a, b): model input = resampled stored value * a + b
    noise_key  uint32  [B, 2]         threefry key data of the example's noise

and :func:`batch_with_views`, in one jitted program the trainer runs on the devices right before
each train step (`t3d_jax.train.step.make_prepare`), turns them into the ``views`` the task's
batch contract names; the tasks, and the train step itself, are those of the host path. The data
order and the iterator state are the host path's (the same Grain pipeline, the same (seed, index)
generator), so resuming is unchanged.

The resampling is the host's (:func:`t3d_jax.data.views.resample_box`): separable linear
interpolation at the half-voxel centres of the box, edge values held, the axes that shrink most
first, each axis as two row gathers and a lerp in float32. The sample positions are computed in
float32 here (float64 on the host), so a device view differs from the host view of the same box
by at most a few float32 ulps of the coordinate (about N * 2^-22 voxel for an axis of N voxels)
times the largest step between neighbouring voxels (tests/test_device_views.py names the bound).

Noise: ``noise_std * N(0, 1)`` per voxel from ``jax.random.normal(fold_in(key, view))`` with
``key = wrap_key_data(noise_key, impl="threefry2x32")``; ``noise_key`` is drawn from the
element's (seed, index) generator, so the noise is a deterministic function of (seed, index) as
well, the same on every platform and for any sharding (jax's partitionable threefry), but not the
host path's NumPy numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t3d_jax.data.views import VIEWS_ON
from t3d_jax.utils import UserValueError, cfg_get

DEVICE_KEYS = ("volume", "intensity", "noise_key")  # what the device path adds besides boxes


def views_on(data_config: Any) -> str:
    """``data.views_on``: 'host' (default) or 'device'; anything else is a UserValueError."""
    where = str(cfg_get(data_config, "views_on", "host") or "host")
    if where not in VIEWS_ON:
        raise UserValueError(f"config.data.views_on={where!r}: choose one of {VIEWS_ON}")
    return where


def stored_size(config) -> tuple[int, int, int]:
    """The stored grid of the training volumes: ``data.stored_size`` (set from the prepared data's
    dataset.json by `sync_config_with_data`), else the size of ``preprocess.preset``."""
    size = tuple(int(s) for s in (cfg_get(config.data, "stored_size", ()) or ()))
    if not size:
        from t3d_jax.data.preprocess import PRESETS

        preset = str(cfg_get(cfg_get(config, "preprocess"), "preset", ""))
        if preset not in PRESETS:
            raise UserValueError(
                "config.data.views_on='device' needs the stored grid: set config.data.stored_size "
                "(x, y, z) or point config.data.dir at prepared data")
        size = tuple(PRESETS[preset].size)
    if len(size) != 3 or min(size) < 1:
        raise UserValueError(f"config.data.stored_size={size}: need three positive ints (x, y, z)")
    return size


def input_spec(config, task_spec: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch the pipeline delivers for a task whose contract is ``task_spec``: the task's own
    with host views; with device views ``views`` replaced by the stored volume, the boxes, the
    intensity maps and the noise keys (module docstring)."""
    if views_on(config.data) == "host" or "views" not in task_spec:
        return dict(task_spec)
    b, v = task_spec["views"].shape[:2]
    if task_spec["views"].shape[-1] != 1:
        raise UserValueError("config.data.views_on='device' makes one-channel views; "
                             f"the task's views are {task_spec['views'].shape}")
    per_view = sorted(k for k, s in task_spec.items()
                      if k not in ("views", "boxes") and len(s.shape) > 2 and tuple(s.shape[:2]) == (b, v))
    if per_view:  # e.g. segmentation masks, cut with each view's box on the host
        raise UserValueError(f"config.data.views_on='device' makes only the views; this task's batch also "
                             f"has per-view {per_view}, which the host cuts: use data.views_on='host'")
    spec = {k: s for k, s in task_spec.items() if k != "views"}
    spec.update(
        volume=jax.ShapeDtypeStruct((b, *stored_size(config)), jnp.int16),
        boxes=jax.ShapeDtypeStruct((b, v, 2, 3), jnp.float32),
        intensity=jax.ShapeDtypeStruct((b, v, 2), jnp.float32),
        noise_key=jax.ShapeDtypeStruct((b, 2), jnp.uint32),
    )
    return spec


def batch_with_views(batch: dict, task_spec: dict, *, view_size, noise_std: float) -> dict:
    """The device path's batch -> the task's batch: ``views`` made from the volume, only the keys
    of ``task_spec`` kept (a task without ``boxes`` in its contract does not get them). A batch
    that already has ``views`` (host path) is returned as it is."""
    if "views" in batch or "volume" not in batch:
        return batch
    views = make_views(batch["volume"], batch["boxes"], batch["intensity"], batch["noise_key"],
                       view_size=view_size, noise_std=noise_std)
    out = {k: batch[k] for k in task_spec if k in batch}
    out["views"] = views.astype(task_spec["views"].dtype) if "views" in task_spec else views
    return out


def make_views(volume, boxes, intensity, noise_key, *, view_size, noise_std: float) -> jax.Array:
    """float32 [B, V, X', Y', Z', 1] views of ``volume`` [B, X, Y, Z] (any real dtype, int16 as
    stored) cut at ``boxes`` [B, V, 2, 3], mapped by ``intensity`` [B, V, 2] and noised with
    ``noise_key`` [B, 2] (uint32 key data) at ``noise_std``; see the module docstring."""
    view_size = tuple(int(s) for s in view_size)
    volume = jnp.asarray(volume)
    boxes = jnp.asarray(boxes, jnp.float32)
    intensity = jnp.asarray(intensity, jnp.float32)
    if volume.ndim != 4 or boxes.ndim != 4 or boxes.shape[2:] != (2, 3):
        raise ValueError(f"need volume [B, X, Y, Z] and boxes [B, V, 2, 3], got {volume.shape}, {boxes.shape}")
    num_views = boxes.shape[1]

    def one_view(vol, box, ab, key, v):
        view = resample_box(vol, box, view_size)
        view = view * ab[0] + ab[1]
        if noise_std > 0:
            noise = jax.random.normal(jax.random.fold_in(key, v), view_size, jnp.float32)
            view = view + noise * jnp.float32(noise_std)
        return view

    def one_example(vol, ex_boxes, ex_ab, key_data):
        key = jax.random.wrap_key_data(jnp.asarray(key_data, jnp.uint32), impl="threefry2x32")
        return jax.vmap(one_view, in_axes=(None, 0, 0, None, 0))(
            vol, ex_boxes, ex_ab, key, jnp.arange(num_views, dtype=jnp.uint32))

    views = jax.vmap(one_example)(volume, boxes, intensity, jnp.asarray(noise_key, jnp.uint32))
    return views[..., None]


def _axis_taps(lo, hi, n_in: int, n_out: int):
    """float32 twin of :func:`t3d_jax.data.views._axis_taps`: left/right neighbours and weight."""
    j = jnp.arange(n_out, dtype=jnp.float32) + 0.5
    centres = (lo + j * ((hi - lo) / n_out)) * n_in - 0.5
    centres = jnp.clip(centres, 0.0, n_in - 1)
    left = jnp.minimum(jnp.floor(centres).astype(jnp.int32), max(n_in - 2, 0))
    right = jnp.minimum(left + 1, n_in - 1)
    return left, right, centres - left.astype(jnp.float32)


def resample_box(volume: jax.Array, box: jax.Array, out_shape) -> jax.Array:
    """One view: ``volume`` [X, Y, Z] resampled inside ``box`` [2, 3] onto ``out_shape``, float32
    in the volume's own units (the host's :func:`t3d_jax.data.views.resample_box`, on device).

    Each axis is interpolated with the axis moved to the front, so both gathers take whole
    contiguous rows (cheap on TPU and GPU, unlike element gathers along a minor axis)."""
    out_shape = tuple(int(s) for s in out_shape)
    in_shape = tuple(int(s) for s in volume.shape)
    order = sorted(range(3), key=lambda a: out_shape[a] / in_shape[a])  # the host's order
    out = volume
    for axis in order:
        left, right, weight = _axis_taps(box[0, axis], box[1, axis], in_shape[axis], out_shape[axis])
        moved = jnp.moveaxis(out, axis, 0)
        lower = jnp.take(moved, left, axis=0, mode="clip").astype(jnp.float32)
        upper = jnp.take(moved, right, axis=0, mode="clip").astype(jnp.float32)
        lerp = lower + (upper - lower) * weight.reshape((-1,) + (1,) * (moved.ndim - 1))
        out = jnp.moveaxis(lerp, 0, axis)
    return out


def host_reference(batch: dict[str, np.ndarray], view_size) -> np.ndarray:
    """The host path's views of a device-path batch without noise (tests, the bench): each
    view resampled by :func:`t3d_jax.data.views.resample_box` and mapped by its (a, b)."""
    from t3d_jax.data.views import resample_box as host_resample

    b, v = batch["boxes"].shape[:2]
    out = np.empty((b, v, *view_size, 1), np.float32)
    for i in range(b):
        for k in range(v):
            view = host_resample(batch["volume"][i], batch["boxes"][i, k], view_size)
            a, c = batch["intensity"][i, k]
            view *= np.float32(a)
            view += np.float32(c)
            out[i, k, ..., 0] = view
    return out
