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
    # Compile time is the test's cost: one slice-ViT block, one Z-former block, and the locked
    # text tower's pooled cache (`text_pooled`) in place of BERT: the MEM term and its sum with
    # the clip loss are what is tested, and the clip task's text path is tested elsewhere.
    c.model.image.msvlm.depth = 1
    c.model.image.msvlm.z_depth = 1
    c.model.text.locked = True
    c.data.text_features = "pooled"
    c.optim.freeze = ("^text_encoder/",)
    c.loss.mem_weight = 0.5  # not 1, so a wrong weighting shows
    c.seed = 3
    c.model.image.msvlm.slice_chunk = 16  # one chunk, no remat: less to compile
    c.model.image.msvlm.slice_remat = False
    return c


def _model(task, rng):
    """The task's model with random parameters filled on the host: initialising it under jit
    costs a compile of seconds; the values only need to be generic (LayerNorm scales 1)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))))

    def fill(path, x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(np.zeros(x.shape, x.dtype))
        if str(path[-1]).endswith("scale"):  # LayerNorm scales, and the logit log-scale: 1
            return jnp.asarray(np.ones(x.shape, x.dtype))
        return jnp.asarray(rng.normal(0.0, 0.05, x.shape).astype(x.dtype))

    return nnx.merge(graphdef, jax.tree.map_with_path(fill, state))


def test_msvlm_loss_is_clip_plus_weighted_mem_and_trains():
    c = _config()
    task = tasks.get_task(c)
    assert task.name == "msvlm" and isinstance(task, ClipTask)
    rng = np.random.default_rng(0)
    model = _model(task, rng)
    spec = task.batch_spec()
    assert set(spec) == {"views", "attention_mask", "text_pooled"}
    batch = {"views": jnp.asarray(rng.normal(size=spec["views"].shape), jnp.float32),
             "attention_mask": jnp.ones(spec["attention_mask"].shape, jnp.int32),
             "text_pooled": jnp.asarray(rng.normal(size=spec["text_pooled"].shape), jnp.float16)}
    clip_task = ClipTask(c)

    @nnx.jit
    def run(model, batch):
        def total(m):
            return task.loss(m, batch, step=jnp.int32(STEP), deterministic=True)

        (loss, metrics), grads = nnx.value_and_grad(total, has_aux=True)(model)
        clip_grads = nnx.grad(lambda m: task.loss(m, batch, step=jnp.int32(STEP), deterministic=True)[1]
                              ["loss_clip"])(model)
        # The reference, piece by piece from one encoder pass: the clip task's contrastive loss
        # of the pooled embeddings, and MEM done by hand with the key fold_in(key(seed), step).
        views = batch["views"]
        image = model.image_encoder(views.reshape(-1, *views.shape[2:]))
        text_emb = model.project_text(batch["text_pooled"].astype(jnp.float32))
        clip_loss, _ = clip_task.contrastive(model, model.project_image(image["pooled"])[:, None], text_emb)
        key = jax.random.fold_in(jax.random.key(c.seed), STEP)
        masked = mem.mem_mask(key, image["mask"], c.loss.mem_rate)
        n = image["slice_tokens"].shape[1]
        pred = model.image_encoder.mem_predict(mem.zero_fill(image["slice_tokens"], masked), image["mask"],
                                               np.zeros(n, np.int32), np.arange(n, dtype=np.int32))
        return loss, metrics, grads, clip_loss, masked, pred, image["slice_tokens"], clip_grads

    loss, metrics, grads, clip_loss, masked, pred, target, clip_grads = run(model, batch)
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
    norms = {"/".join(map(str, k)): float(np.linalg.norm(np.asarray(v[...]))) for k, v in g}
    assert all(np.isfinite(v) for v in norms.values())
    # MEM-only (mem_head), clip-only (the projections) and shared (slice encoder, Z-former)
    # parameters all receive gradient.
    for prefix in ("image_encoder/mem_head/", "image_proj/", "text_proj/", "image_encoder/slice_encoder/",
                   "image_encoder/z_blocks/"):
        assert any(k.startswith(prefix) and v > 0 for k, v in norms.items()), prefix
    # MEM reaches the Z-former, never the slice encoder (loss.mem_trains_slice_encoder=False):
    # the slice encoder's gradient is CLIP's alone, the Z-former's is not.
    cg = dict(nnx.to_flat_state(clip_grads))
    for k, v in g:
        name = "/".join(map(str, k))
        if name.startswith("image_encoder/slice_encoder/"):
            np.testing.assert_allclose(np.asarray(v[...]), np.asarray(cg[k][...]), rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(np.asarray(v[...]), np.asarray(cg[k][...]), rtol=1e-3)
               for k, v in g if "/".join(map(str, k)).startswith("image_encoder/z_blocks/"))


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
