"""Views made on the accelerator (`data.views_on='device'`, t3d_jax/data/device_views.py).

* Parity: for the same boxes and intensity maps, the device's views equal the host's
  (`t3d_jax.data.views.resample_box`) within `parity_atol`, a bound derived below.
* The pipeline in device mode draws the host path's boxes (and flips, and jitter where the
  draw order allows) from the same (seed, index) generator and ships the stored volume.
* Noise: deterministic in the shipped key, independent across views and examples, N(0, std).
* The program that runs before the train step (`t3d_jax.train.step.make_prepare`) makes the
  task's batch, sharded over the batch axes of the 8-device mesh; with host views it is the
  identity.

The end-to-end resume check with device views (SIGKILL, restart, identical losses) is in
tests/test_train_loop.py.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from t3d_jax.data import device_views as dv
from t3d_jax.data import pipeline
from t3d_jax.data.views import ViewOptions, device_view_params, make_views, sample_boxes

EPS32 = 2.0 ** -24  # float32 unit roundoff


def parity_atol(volume: np.ndarray, intensity: np.ndarray) -> float:
    """``volume`` [..., X, Y, Z] stored values, ``intensity`` [..., 2] (a, b): how far a device view may be from the host view of the same box, in model units.

    The only difference between the two computations is where the sample positions are
    computed: float64 on the host, float32 on the device. ``(lo + (j + 0.5) * (hi - lo) / M) * N
    - 0.5`` in float32 is off by at most ~4 roundings of a number <= N, i.e. 4 * N * EPS32 voxels
    on an axis of N voxels; linear interpolation turns a position error d into a value error of
    at most d * (largest step between neighbouring voxels). The three axes add up, then the
    intensity map scales by |a|. On top come the float32 roundings both sides make in a
    different order (a fused multiply-add on the device): a few EPS32 of the largest value per
    lerp and in ``x * a + b``. The measured differences are 5-20x below this bound.
    """
    step = max(float(np.abs(np.diff(volume.astype(np.float64), axis=a)).max()) for a in (-3, -2, -1))
    v_max = float(np.abs(volume).max())
    a = float(np.abs(intensity[..., 0]).max())
    b = float(np.abs(intensity[..., 1]).max())
    position = sum(4 * n * EPS32 for n in volume.shape[-3:]) * step
    rounding = 8 * EPS32 * v_max
    return a * (position + rounding) + 4 * EPS32 * (a * v_max + b)


def _batch(rng, shape=(30, 26, 20), b=2, v=3):
    volume = rng.integers(-1000, 1000, (b, *shape)).astype(np.int16)
    boxes = np.stack([sample_boxes(rng, v, 0.3, 1.0) for _ in range(b)])
    boxes[0, 0] = [[0, 0, 0], [1, 1, 1]]  # the whole volume
    boxes[-1, -1] = [[0.9, 0.0, 0.5], [1.0, 0.05, 0.5001]]  # a sliver at the edges (held values)
    gain, shift = rng.uniform(-0.05, 0.05, (2, b, v))
    intensity = np.stack([1e-3 * (1 + gain), 0.1 + shift], axis=-1).astype(np.float32)
    keys = rng.integers(0, 2**32, (b, 2), dtype=np.uint32)
    return {"volume": volume, "boxes": boxes, "intensity": intensity, "noise_key": keys}


def _device(batch, view_size, noise_std=0.0):
    fn = jax.jit(lambda vol, box, ab, key: dv.make_views(vol, box, ab, key, view_size=view_size,
                                                         noise_std=noise_std))
    return np.asarray(fn(batch["volume"], batch["boxes"], batch["intensity"], batch["noise_key"]))


@pytest.mark.parametrize("view_size", [(13, 9, 17), (30, 26, 20), (7, 31, 5)])
def test_device_views_equal_host_views_for_the_same_boxes(view_size):
    batch = _batch(np.random.default_rng(0))
    got = _device(batch, view_size)
    want = dv.host_reference(batch, view_size)
    assert got.shape == want.shape == (2, 3, *view_size, 1) and got.dtype == np.float32
    atol = parity_atol(batch["volume"], batch["intensity"])
    assert atol < 1e-4  # the bound itself is small next to the ~1.0 spread of the values
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def test_parity_holds_on_a_ct_clip_length_axis():
    """The position error grows with the axis length: 480 voxels, as the ct_clip grid."""
    rng = np.random.default_rng(1)
    batch = _batch(rng, shape=(480, 6, 5), b=1, v=2)
    got = _device(batch, (160, 4, 3))
    want = dv.host_reference(batch, (160, 4, 3))
    np.testing.assert_allclose(got, want, rtol=0, atol=parity_atol(batch["volume"], batch["intensity"]))


def test_noise_is_deterministic_per_key_and_independent_across_views_and_examples():
    batch = _batch(np.random.default_rng(2), shape=(16, 16, 16), b=2, v=2)
    size = (32, 32, 32)  # 32,768 voxels a view: a correlation's standard error is 0.0055
    clean = _device(batch, size)
    noisy = _device(batch, size, noise_std=0.5)
    np.testing.assert_array_equal(noisy, _device(batch, size, noise_std=0.5))
    noise = (noisy - clean) / 0.5
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02
    corr = np.corrcoef(noise.reshape(4, -1))
    assert np.abs(corr[np.triu_indices(4, 1)]).max() < 0.03  # views and examples differ (> 5 s.e.)
    other = dict(batch, noise_key=batch["noise_key"] + np.uint32(1))
    assert not np.allclose(_device(other, size, noise_std=0.5), noisy)


def _record(rng, shape=(24, 24, 16)):
    return {"volume": rng.integers(-1000, 1000, shape).astype(np.int16), "scale": 1e-3, "offset": 0.0}


def test_device_params_draw_the_host_paths_boxes_flips_and_jitter():
    rng = np.random.default_rng(3)
    rec = _record(rng)
    for opts in (ViewOptions(num_views=2, view_size=(12, 12, 8), noise_std=0.0, flip_lr=True),
                 ViewOptions(num_views=3, view_size=(12, 12, 8), noise_std=0.02, flip_lr=True)):
        for seed in range(6):
            host_views, host_boxes = make_views(rec["volume"], rec["scale"], rec["offset"],
                                                np.random.default_rng(seed), opts)
            params = device_view_params(rec["volume"], rec["scale"], rec["offset"],
                                        np.random.default_rng(seed), opts)
            np.testing.assert_array_equal(params["boxes"], host_boxes)
            assert params["volume"].dtype == np.int16
            made = dv.host_reference({k: params[k][None] for k in ("volume", "boxes", "intensity")},
                                     opts.view_size)[0]
            if opts.noise_std == 0:  # same draws throughout: the host's views exactly
                np.testing.assert_allclose(made, host_views, rtol=0, atol=1e-6)
                assert not params["noise_key"].any()
            else:  # view 0's jitter (and the flip) are the host's: what is left is the host's noise
                residual = host_views[0] - made[0]
                assert abs(residual.mean()) < 0.1 * opts.noise_std
                assert abs(residual.std() - opts.noise_std) < 0.1 * opts.noise_std
                assert params["noise_key"].any()


def _prepared(tmp_path, shapes):
    import json

    from array_record.python.array_record_module import ArrayRecordWriter

    from t3d_jax.data.records import encode_record

    rng = np.random.default_rng(4)
    writer = ArrayRecordWriter(str(tmp_path / "train-00000-of-00001.array_record"), "group_size:1")
    for k, shape in enumerate(shapes):
        ids = np.array([101, 1000 + k, 102, 0], np.int32)
        writer.write(encode_record({
            "volume": rng.integers(-1000, 1000, shape).astype(np.int16), "intensity_scale": np.float32(1e-3),
            "intensity_offset": np.float32(0.0), "input_ids": ids, "attention_mask": (ids > 0).astype(np.int32),
            "labels": np.zeros(3, np.float32), "id": f"r{k}"}))
    writer.close()
    (tmp_path / "dataset.json").write_text(json.dumps({
        "preset": {"name": "t", "size": list(shapes[0])}, "label_names": ["a", "b", "c"],
        "splits": {"train": {"num_records": len(shapes), "shards": ["train-00000-of-00001.array_record"]}}}))
    return ml_collections.ConfigDict(dict(
        dir=str(tmp_path), train_split="train", num_views=2, view_size=(12, 12, 8), crop_min=0.5,
        crop_max=1.0, intensity_jitter=0.05, noise_std=0.0, flip_lr=False, worker_count=0,
        prefetch_buffer_size=2, views_on="host"))


def _first_batch(config, seed=5):
    it = pipeline.train_iterator(config, global_batch_size=4, seed=seed)
    try:
        return next(it)
    finally:
        it.close()  # no read thread left decoding in the background


def test_pipeline_device_mode_ships_volumes_and_the_host_modes_boxes(tmp_path):
    config = _prepared(tmp_path, [(24, 24, 16)] * 6)
    host = _first_batch(config)
    config.views_on = "device"
    device = _first_batch(config)
    assert sorted(device) == ["attention_mask", "boxes", "input_ids", "intensity", "labels", "noise_key", "volume"]
    assert device["volume"].shape == (4, 24, 24, 16) and device["volume"].dtype == np.int16
    assert device["noise_key"].shape == (4, 2) and device["intensity"].shape == (4, 2, 2)
    for key in ("boxes", "input_ids", "attention_mask", "labels"):  # same order, same draws
        np.testing.assert_array_equal(device[key], host[key], err_msg=key)
    np.testing.assert_allclose(_device(device, (12, 12, 8)), host["views"], rtol=0,
                               atol=parity_atol(device["volume"], device["intensity"]))


def test_device_mode_refuses_volumes_off_the_stored_grid(tmp_path):
    config = _prepared(tmp_path, [(24, 24, 16), (24, 24, 18)] * 2)
    config.views_on = "device"
    with pytest.raises(ValueError, match=r"not the data's \(24, 24, 16\).*views_on='host'"):
        _first_batch(config)


def test_prepare_makes_the_tasks_batch_with_views_sharded_over_the_batch():
    from test_train_optim import load_config

    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import step as step_lib
    from t3d_jax.utils import UserValueError

    c = load_config("t3d.py", "tiny")
    c.data.views_on = "device"
    c.data.stored_size = (20, 18, 12)
    c.data.noise_std = 0.0
    task_spec = {"views": jax.ShapeDtypeStruct((8, 2, 16, 16, 16, 1), np.float32),
                 "boxes": jax.ShapeDtypeStruct((8, 2, 2, 3), np.float32),
                 "input_ids": jax.ShapeDtypeStruct((8, 4), np.int32)}
    spec = dv.input_spec(c, task_spec)
    assert sorted(spec) == ["boxes", "input_ids", "intensity", "noise_key", "volume"]
    assert spec["volume"].shape == (8, 20, 18, 12) and spec["volume"].dtype == np.int16
    rng = np.random.default_rng(6)
    batch = _batch(rng, shape=(20, 18, 12), b=8, v=2)
    batch["input_ids"] = np.ones((8, 4), np.int32)
    mesh = mesh_lib.make_mesh(c.mesh)
    shard = lambda tree: {k: mesh_lib.batch_sharding(mesh, c.sharding_rules, v.ndim) for k, v in tree.items()}  # noqa: E731
    with jax.set_mesh(mesh):
        prepare = step_lib.make_prepare(c, task_spec, shard(spec), shard(task_spec))
        out = prepare({k: batch[k] for k in spec})
    assert sorted(out) == ["boxes", "input_ids", "views"]
    assert out["views"].sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh, c.sharding_rules, 6), 6)
    assert {s.data.shape[0] for s in out["views"].addressable_shards} == {1}  # one example per device
    np.testing.assert_allclose(np.asarray(out["views"]), dv.host_reference(batch, (16, 16, 16)), rtol=0,
                               atol=parity_atol(batch["volume"], batch["intensity"]))
    masks = dict(task_spec, masks=jax.ShapeDtypeStruct((8, 2, 16, 16, 16), np.int32))  # segmentation
    with pytest.raises(UserValueError, match=r"per-view \['masks'\].*views_on='host'"):
        dv.input_spec(c, masks)
    c.data.views_on = "host"
    assert dv.input_spec(c, task_spec) == task_spec
    assert step_lib.make_prepare(c, task_spec, {}, {})(batch) is batch
    c.data.views_on = "gpu"
    with pytest.raises(UserValueError, match="views_on='gpu'"):
        dv.input_spec(c, task_spec)
