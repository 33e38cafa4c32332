"""Two-tower assembly: build by name, loss interface, oracle agreement, freezing, bf16, HF text tower.

The objectives themselves are checked against the float64 oracle in test_contrastive.py and
test_tma.py; here the oracle is fed the model's own embeddings to check the *assembly* (view
flattening order, report repeated per view, token_index reshaping, the lambda weighting).
"""

from __future__ import annotations

import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import reference_numpy as ref
from t3d_jax.models import build_model, build_model_from_config, two_tower
from t3d_jax.tasks.clip import ClipTask
from t3d_jax.tasks.t3d import T3DTask
from t3d_jax.models.tma_head import TMAHead

from configs import t3d as t3d_config

BATCH, VIEWS, LENGTH = 4, 2, 12
# Float32 model vs float64 oracle on the model's own embeddings: only the oracle's arithmetic
# differs (see test_contrastive / test_tma), so the same relative tolerance applies.
RTOL = 1e-5
# bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); through the tiny ViT,
# BERT, projection and TMA head we measured max |emb_bf16 - emb_f32| = 2.5e-3 (volume) and
# 3.4e-3 (text), cosine >= 0.99998, and losses within 0.3% relative. Tolerances: embeddings
# within 0.02 (unit vectors) and cosine > 0.999, losses within 2% relative: several times the
# measured drift, far below what a wrong cast or a dropped residual produces (O(1)).
BF16_EMB_ATOL, BF16_MIN_COS, BF16_LOSS_RTOL = 0.02, 0.999, 0.02


def _config(name="t3d", **loss):
    c = t3d_config.get_config("tiny")
    c.model.name = name
    c.model.text.max_len = LENGTH
    for k, v in loss.items():
        c.loss[k] = v
    return c


def _batch(seed=0, size=16):
    rng = np.random.default_rng(seed)
    views = rng.standard_normal((BATCH, VIEWS, size, size, size, 1)).astype(np.float32)
    # Different boxes per example so a wrong example/view order in the assembly shows.
    lo = rng.uniform(0, 0.3, (BATCH, VIEWS, 3))
    hi = lo + rng.uniform(0.65, 0.7, (BATCH, VIEWS, 3))
    boxes = np.stack([lo, hi], axis=2).astype(np.float32)
    ids = rng.integers(1000, 2000, (BATCH, LENGTH)).astype(np.int32)
    mask = np.ones((BATCH, LENGTH), np.int32)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    ids[mask == 0] = 0
    return {"views": views, "boxes": boxes, "input_ids": ids, "attention_mask": mask,
            "labels": np.zeros((BATCH, 18), np.float32)}


def _t3d_model_config():
    """The config of the shared T3D model (fixture `t3d_model`) and of its task."""
    c = _config(chunked=True)
    c.model.image.patch_dropout = 0.5
    c.model.tma.freeze_prototypes_steps = 3
    return c


def _task_for(model):
    """The task whose loss these tests check: t3d for a T3D model (the fixture's settings),
    clip otherwise."""
    if isinstance(model, two_tower.T3D):
        return T3DTask(_t3d_model_config())
    return ClipTask(_config("clip"))


def _jit_loss(model, deterministic=True):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    task = _task_for(model)

    @jax.jit
    def loss_fn(params, rest, batch, step):
        m = nnx.merge(graphdef, params, rest)
        return task.loss(m, batch, step=step, deterministic=deterministic)

    return loss_fn, params, rest


@nnx.jit
def _embed_volume(model, volume):
    return model.embed_volume(volume)


@nnx.jit
def _embed_text(model, ids, mask):
    return model.embed_text(ids, mask)


@nnx.jit
def _visual_token_embeddings(model, volume):
    """u0: the head's text-free token embeddings of one view of every example."""
    return model.tma_head(model.volume_tokens(volume)["tokens"])


@nnx.jit
def _token_embeddings(model, volume, ids, mask):
    """u for one example's view, computed alone (no batch flattening, no repeat)."""
    states = model.text_encoder(ids, mask)["hidden"]
    return model.tma_head(model.volume_tokens(volume)["tokens"], states, mask)


def _embeddings(model, batch):
    img = np.stack([np.asarray(_embed_volume(model, batch["views"][:, v])) for v in range(VIEWS)], axis=1)
    txt = np.asarray(_embed_text(model, batch["input_ids"], batch["attention_mask"]))
    return img, txt


# One T3D model shared by most tests (each jit of the loss costs seconds of compile):
# chunked loss (plain on one device, shard_map under a mesh), patch dropout 0.5 (active only
# with deterministic=False) and prototypes frozen for 3 steps.
@pytest.fixture(scope="module")
def t3d_model():
    return build_model_from_config(_t3d_model_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def t3d_loss(t3d_model):
    return _jit_loss(t3d_model)


@pytest.fixture(scope="module")
def batch():
    return _batch()


def test_registry_builds_by_name():
    t3d = nnx.eval_shape(lambda: build_model_from_config(_config("t3d"), rngs=nnx.Rngs(0)))
    clip = nnx.eval_shape(lambda: build_model(_config("clip").model, rngs=nnx.Rngs(0), view_size=(16, 16, 16)))
    assert isinstance(t3d, two_tower.T3D) and isinstance(t3d.tma_head, TMAHead)
    assert type(clip) is two_tower.CLIPModel and not hasattr(clip, "tma_head")
    assert t3d.image_encoder.cfg.grid == (2, 2, 2)  # from config.data.view_size
    assert clip.logit_scale.shape == () and clip.image_proj.kernel.shape == (64, 32)
    with pytest.raises(ValueError, match="unknown model"):
        build_model(_config("mae").model, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown contrastive loss"):
        build_model_from_config(_config(kind="triplet"), rngs=nnx.Rngs(0))


def test_loss_assembly_matches_oracle(t3d_model, t3d_loss, batch):
    """Deterministic loss == oracle(CLIP on embed_volume/embed_text) + lambda * oracle(TMA on per-view u)."""
    model = t3d_model
    loss_fn, params, rest = t3d_loss
    loss, metrics = loss_fn(params, rest, batch, jnp.int32(0))
    assert float(metrics["logit_scale"]) == pytest.approx(1 / 0.07)  # init log(1/0.07)
    assert {"loss", "loss_clip", "loss_tma", "logit_scale", "tma_matched_fraction"} <= set(metrics)
    assert all(np.asarray(v).shape == () for v in metrics.values())

    img, txt = _embeddings(model, batch)
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
    r_clip = ref.clip_loss(img, txt, math.log(1 / 0.07))[0]
    assert float(metrics["loss_clip"]) == pytest.approx(r_clip, rel=RTOL)

    # u for each (example, view) computed one at a time, with only that example's report.
    u = np.zeros((BATCH, VIEWS, 8, model.embed_dim))
    for b, v in np.ndindex(BATCH, VIEWS):
        u[b, v] = np.asarray(_token_embeddings(model, batch["views"][b:b + 1, v], batch["input_ids"][b:b + 1],
                                               batch["attention_mask"][b:b + 1]))[0]
    # The Sinkhorn targets come from the text-free embeddings (model.tma.targets='visual').
    u0 = np.stack([np.asarray(_visual_token_embeddings(model, batch["views"][:, v])) for v in range(VIEWS)], axis=1)
    token_index = np.broadcast_to(np.arange(8), (BATCH, VIEWS, 8))
    r_tma = ref.tma_loss(u, np.asarray(model.tma_head.normalized_prototypes()), token_index, batch["boxes"],
                         (2, 2, 2), temperature=0.1, epsilon=0.05, iters=3, target_u=u0)[0]
    assert float(metrics["loss_tma"]) == pytest.approx(r_tma, rel=RTOL)
    assert float(loss) == pytest.approx(r_clip + _task_for(model).weight * r_tma, rel=RTOL)


def test_padding_tokens_do_not_change_tma(t3d_loss, batch):
    """Changing the ids under the attention mask changes nothing (cross-attention masks them)."""
    loss_fn, params, rest = t3d_loss
    other = dict(batch, input_ids=np.where(batch["attention_mask"] > 0, batch["input_ids"], 1234))
    _, a = loss_fn(params, rest, batch, jnp.int32(0))
    _, b = loss_fn(params, rest, other, jnp.int32(0))
    assert float(a["loss_tma"]) == pytest.approx(float(b["loss_tma"]), rel=1e-5)
    changed = dict(batch, input_ids=np.where(batch["attention_mask"] > 0, batch["input_ids"] + 1, 0))
    _, c = loss_fn(params, rest, changed, jnp.int32(0))
    assert abs(float(c["loss_tma"]) - float(a["loss_tma"])) > 1e-6  # the report does reach TMA


def test_prototypes_frozen_for_first_steps(t3d_model):
    """The t3d task takes its prototypes from task.prototypes(model, step): no gradient while step < 3."""
    graphdef, params, rest = nnx.split(t3d_model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    weights = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32)), jnp.float32)
    task = _task_for(t3d_model)

    @jax.jit
    def grads(params, step):
        def f(p):
            return jnp.sum(task.prototypes(nnx.merge(graphdef, p, rest), step) * weights)
        return jax.grad(f)(params)["tma_head"]["prototypes"]

    for step, frozen in [(0, True), (2, True), (3, False), (10, False)]:
        proto_grad = float(jnp.abs(grads(params, jnp.int32(step))).max())
        assert (proto_grad == 0.0) == frozen, (step, proto_grad)


def test_training_mode_with_patch_dropout(t3d_model, t3d_loss, batch):
    loss_fn, params, rest = _jit_loss(t3d_model, deterministic=False)
    loss, metrics = loss_fn(params, rest, batch, jnp.int32(0))
    _, full = t3d_loss[0](params, rest, batch, jnp.int32(0))
    assert np.isfinite(float(loss))
    # Half the tokens dropped in both views: far fewer matches than with every token kept.
    assert 0 < float(metrics["tma_matched_fraction"]) < float(full["tma_matched_fraction"])


def test_clip_model_and_siglip_loss(batch):
    model = build_model_from_config(_config("clip", kind="siglip"), rngs=nnx.Rngs(3))
    assert float(model.logit_scale[...]) == pytest.approx(math.log(10.0))
    assert float(model.logit_bias[...]) == -10.0
    loss_fn, params, rest = _jit_loss(model)
    loss, metrics = loss_fn(params, rest, batch, jnp.int32(0))
    assert "loss_tma" not in metrics and float(metrics["logit_bias"]) == -10.0
    img, txt = _embeddings(model, batch)
    assert float(loss) == pytest.approx(ref.siglip_loss(img, txt, math.log(10.0), -10.0)[0], rel=RTOL)


def test_sharded_chunked_loss_equals_single_device(t3d_loss, batch):
    loss_fn, params, rest = t3d_loss
    big = {k: np.concatenate([v, v[::-1]]) for k, v in batch.items()}  # global batch 8
    loss, metrics = loss_fn(params, rest, big, jnp.int32(0))
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        sharded = {k: jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp")))) for k, v in big.items()}
        s_loss, s_metrics = loss_fn(params, rest, sharded, jnp.int32(0))
    for k in ("loss_clip", "loss_tma"):
        assert float(s_metrics[k]) == pytest.approx(float(metrics[k]), rel=1e-5), k
    assert float(s_loss) == pytest.approx(float(loss), rel=1e-5)


def test_bfloat16_forward_agrees_with_float32(t3d_model, t3d_loss, batch):
    f32 = t3d_model
    c = _t3d_model_config()
    c.model.dtype = "bfloat16"
    bf16 = build_model_from_config(c, rngs=nnx.Rngs(0))  # same seed and config: same weights
    p32, p16 = nnx.state(f32, nnx.Param), nnx.state(bf16, nnx.Param)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p16))  # float32 weights
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)))

    fn16, p, r = _jit_loss(bf16)
    l16 = fn16(p, r, batch, jnp.int32(0))[1]
    l32 = t3d_loss[0](*t3d_loss[1:], batch, jnp.int32(0))[1]
    for k in ("loss_clip", "loss_tma"):
        assert float(l16[k]) == pytest.approx(float(l32[k]), rel=BF16_LOSS_RTOL), k
    for (a, b), name in zip(zip(_embeddings(f32, batch), _embeddings(bf16, batch)), ("volume", "text")):
        assert np.max(np.abs(a - b)) < BF16_EMB_ATOL, name
        assert np.min(np.sum(a * b, axis=-1)) > BF16_MIN_COS, name
    tokens = nnx.jit(lambda m, v: m.volume_tokens(v)["tokens"])(bf16, batch["views"][:, 0])
    assert tokens.dtype == jnp.bfloat16  # the compute really ran in bfloat16


def test_text_mean_pool_over_non_padding_tokens(batch):
    """model.text.pool='mean': normalize(W_t mean of the hidden states over mask=1), padding ignored."""
    c = _config("clip")
    c.model.text.pool = "mean"
    model = build_model_from_config(c, rngs=nnx.Rngs(4))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden = np.asarray(nnx.jit(lambda m, i, a: m.text_encoder(i, a)["hidden"])(model, ids, mask), np.float64)
    kernel = np.asarray(model.text_proj.kernel[...], np.float64)
    pooled = np.stack([hidden[b, mask[b] > 0].mean(axis=0) for b in range(BATCH)])
    expected = pooled @ kernel
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    got = np.asarray(_embed_text(model, ids, mask))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-6)
    # Ids under the mask are not attended to and not averaged: the embedding does not move.
    other = np.where(mask > 0, ids, 1234).astype(np.int32)
    np.testing.assert_allclose(np.asarray(_embed_text(model, other, mask)), got, rtol=RTOL, atol=1e-6)
    cls = np.asarray(_embed_text(build_model_from_config(_config("clip"), rngs=nnx.Rngs(4)), ids, mask))
    assert np.max(np.abs(cls - got)) > 1e-3  # 'cls' (the default) really is a different pooling
    c.model.text.pool = "max"
    with pytest.raises(ValueError, match="model.text.pool"):
        build_model_from_config(c, rngs=nnx.Rngs(4))
