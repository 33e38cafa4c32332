"""The `msvlm` task (t3d_jax/tasks/msvlm.py) and configs/msvlm.py: the task's loss is the `clip`
task's loss plus mem_weight x MEM with the key fold_in(key(seed), step), and it trains (finite
loss, gradients in both objectives' parameters). One jit over tiny shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import msvlm as msvlm_config
from t3d_jax import tasks
from t3d_jax.losses import mem
from t3d_jax.tasks.clip import ClipTask
from t3d_jax.utils import UserValueError

# float32 end to end; the task and the reference run the same ops in one program, but XLA
# may fuse or reorder them differently: a few ulps of a loss of order 1.
RTOL = 1e-5
STEP = 7


def _config():
    c = msvlm_config.get_config("tiny")
    c.train.global_batch_size = 2
    c.preprocess.max_len = 16
    c.loss.mem_weight = 0.5  # not 1, so a wrong weighting shows
    c.seed = 3
    c.model.image.msvlm.slice_chunk = 16  # one chunk, no remat: less to compile
    c.model.image.msvlm.slice_remat = False
    return c


def test_msvlm_loss_is_clip_plus_weighted_mem_and_trains():
    c = _config()
    task = tasks.get_task(c)
    assert task.name == "msvlm" and isinstance(task, ClipTask)
    model = task.build_model(nnx.Rngs(0))
    spec = task.batch_spec()
    b, length = spec["input_ids"].shape
    rng = np.random.default_rng(0)
    batch = {"views": jnp.asarray(rng.normal(size=spec["views"].shape), jnp.float32),
             "input_ids": jnp.asarray(rng.integers(1000, 2000, (b, length)), jnp.int32),
             "attention_mask": jnp.ones((b, length), jnp.int32)}
    clip_task = ClipTask(c)

    @nnx.jit
    def run(model, batch):
        def total(m):
            return task.loss(m, batch, step=jnp.int32(STEP), deterministic=True)

        (loss, metrics), grads = nnx.value_and_grad(total, has_aux=True)(model)
        # The reference, piece by piece: the clip task's loss, and MEM done by hand with the key
        # fold_in(key(seed), step).
        clip_loss, _ = clip_task.loss(model, batch, step=STEP, deterministic=True)
        views = batch["views"]
        image = model.image_encoder(views.reshape(-1, *views.shape[2:]))
        key = jax.random.fold_in(jax.random.key(c.seed), STEP)
        masked = mem.mem_mask(key, image["mask"], c.loss.mem_rate)
        n = image["slice_tokens"].shape[1]
        pred = model.image_encoder.mem_predict(mem.zero_fill(image["slice_tokens"], masked), image["mask"],
                                               np.zeros(n, np.int32), np.arange(n, dtype=np.int32))
        return loss, metrics, grads, clip_loss, masked, pred, image["slice_tokens"]

    loss, metrics, grads, clip_loss, masked, pred, target = run(model, batch)
    masked = np.asarray(masked)
    assert 0 < masked.sum() < masked.size  # 32 slices at rate 0.3: some masked, not all
    # MEM in float64 NumPy: mean |pred - target| over the masked slots' features.
    err = np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64)).sum(-1)
    ref_mem = (err * masked).sum() / (masked.sum() * pred.shape[-1])
    np.testing.assert_allclose(float(metrics["loss_mem"]), ref_mem, rtol=RTOL)
    np.testing.assert_allclose(float(metrics["loss_clip"]), float(clip_loss), rtol=RTOL)
    np.testing.assert_allclose(float(loss), float(clip_loss) + 0.5 * ref_mem, rtol=RTOL)
    assert float(metrics["mem_masked"]) == masked.sum()
    assert np.isfinite(float(loss)) and ref_mem > 0

    g = nnx.to_flat_state(grads)
    norms = {"/".join(map(str, k)): float(jnp.linalg.norm(v[...])) for k, v in g}
    assert all(np.isfinite(v) for v in norms.values())
    # MEM-only (mem_head), clip-only (the projections) and shared (slice encoder, Z-former)
    # parameters all receive gradient.
    for prefix in ("image_encoder/mem_head/", "image_proj/", "text_proj/", "image_encoder/slice_encoder/",
                   "image_encoder/z_blocks/"):
        assert any(k.startswith(prefix) and v > 0 for k, v in norms.items()), prefix


def test_msvlm_task_needs_the_msvlm_encoder_and_a_sane_mem_config():
    c = _config()
    c.model.image.name = "vit3d"
    with pytest.raises(UserValueError, match="msvlm"):
        tasks.get_task(c)
    c = _config()
    c.loss.mem_rate = 1.5
    with pytest.raises(UserValueError, match="mem_rate"):
        tasks.get_task(c)


def test_msvlm_configs_sizes():
    base = msvlm_config.get_config("base")
    assert base.task == "msvlm" and base.model.image.name == "msvlm"
    assert tuple(base.data.view_size) == (480, 480, 240) and tuple(base.model.image.msvlm.patch_size) == (16, 16)
    demo = msvlm_config.get_config("demo")
    assert tuple(demo.data.view_size) == (32, 32, 32) and demo.data.dir == "demo_out/prepared"
