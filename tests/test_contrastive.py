"""CLIP / SigLIP global-batch losses against the float64 NumPy oracle, sharded on 8 CPU devices.

Tolerance: float32 against float64, compared relative to the largest reference entry
(`RTOL = 2e-5`): the losses are O(1) sums of O(B) exponentials of logits up to ~15, for which
float32 rounding gives errors of a few 1e-7 relative; 2e-5 leaves room for reduction-order
differences between the sharded and single-device programs while still catching any missed
term (a missing negative or view changes the loss by >1e-2).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import reference_numpy as ref
from t3d_jax.losses import contrastive

RTOL = 2e-5
BATCH, VIEWS, DIM = 16, 2, 8


def assert_close(actual, expected, rtol=RTOL, what=""):
    ref.assert_close(actual, expected, rtol, what)


def _normalised(rng, *shape):
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def embeddings():
    rng = np.random.default_rng(0)
    img = _normalised(rng, BATCH, VIEWS, DIM)
    txt = _normalised(rng, BATCH, DIM)
    # Correlate views with their report so the loss is not near log(B) everywhere.
    img = img + 0.8 * txt[:, None]
    img = (img / np.linalg.norm(img, axis=-1, keepdims=True)).astype(np.float32)
    return img, txt


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


# ------------------------------------------------------------------- the oracle itself


def test_oracle_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    img = rng.standard_normal((4, 2, 3))
    txt = rng.standard_normal((4, 3))
    ls, bias = 1.3, -2.0
    fd = ref.finite_difference
    close = dict(rtol=1e-6, atol=1e-8)
    _, d_img, d_txt, d_ls = ref.clip_loss(img, txt, ls)
    np.testing.assert_allclose(d_img, fd(lambda x: ref.clip_loss(x, txt, ls)[0], img), **close)
    np.testing.assert_allclose(d_txt, fd(lambda x: ref.clip_loss(img, x, ls)[0], txt), **close)
    fd_ls = fd(lambda x: ref.clip_loss(img, txt, float(x[0]))[0], np.array([ls]))
    np.testing.assert_allclose(d_ls, fd_ls[0], rtol=1e-6)
    _, d_img, d_txt, d_ls, d_b = ref.siglip_loss(img, txt, ls, bias)
    np.testing.assert_allclose(d_img, fd(lambda x: ref.siglip_loss(x, txt, ls, bias)[0], img), **close)
    np.testing.assert_allclose(d_txt, fd(lambda x: ref.siglip_loss(img, x, ls, bias)[0], txt), **close)
    fd_b = fd(lambda x: ref.siglip_loss(img, txt, ls, float(x[0]))[0], np.array([bias]))
    np.testing.assert_allclose(d_b, fd_b[0], rtol=1e-6)
    fd_ls = fd(lambda x: ref.siglip_loss(img, txt, float(x[0]), bias)[0], np.array([ls]))
    np.testing.assert_allclose(d_ls, fd_ls[0], rtol=1e-6)


# ---------------------------------------------------------------- helpers under test


def _clip_value_and_grad(chunked):
    def f(img, txt, ls):
        return contrastive.clip_loss(img, txt, ls, max_scale=100.0, chunked=chunked)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


def _siglip_value_and_grad(chunked):
    def f(img, txt, ls, bias):
        return contrastive.siglip_loss(img, txt, ls, bias, max_scale=100.0, chunked=chunked)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


def _shard(mesh, img, txt):
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    return jax.device_put(img, batch), jax.device_put(txt, batch)


# ----------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("logit_scale", [math.log(1 / 0.07), math.log(150.0)],
                         ids=["init", "clamped"])
def test_clip_single_device_matches_oracle(embeddings, logit_scale):
    img, txt = embeddings
    loss, (g_img, g_txt, g_ls) = _clip_value_and_grad(False)(img, txt, jnp.float32(logit_scale))
    r_loss, r_img, r_txt, r_ls = ref.clip_loss(img, txt, logit_scale)
    assert_close(loss, r_loss, what="loss")
    assert_close(g_img, r_img, what="d image")
    assert_close(g_txt, r_txt, what="d text")
    if logit_scale > math.log(100):
        assert float(g_ls) == 0.0  # clamped: no gradient pushes the scale further
    else:
        assert_close(g_ls, r_ls, what="d logit_scale")


@pytest.mark.parametrize("mesh_shape", [(2, 4), (4, 2)])
@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
def test_clip_sharded_matches_oracle(embeddings, mesh_shape, chunked):
    img, txt = embeddings
    mesh = _mesh(mesh_shape)
    ls = math.log(1 / 0.07)
    with jax.set_mesh(mesh):
        s_img, s_txt = _shard(mesh, img, txt)
        loss, (g_img, g_txt, g_ls) = _clip_value_and_grad(chunked)(s_img, s_txt, jnp.float32(ls))
    r_loss, r_img, r_txt, r_ls = ref.clip_loss(img, txt, ls)
    assert_close(loss, r_loss, what="loss")
    assert_close(g_img, r_img, what="d image")
    assert_close(g_txt, r_txt, what="d text")
    assert_close(g_ls, r_ls, what="d logit_scale")


def test_clip_single_view_input(embeddings):
    img, txt = embeddings
    loss = contrastive.clip_loss(img[:, 0], txt, jnp.float32(2.0))
    assert_close(loss, ref.clip_loss(img[:, :1], txt, 2.0)[0], what="[B,D] input")


def _has_square_batch_matrix(hlo_text, batch):
    return re.search(rf"\[(\d+,)*{batch},{batch}\]", hlo_text) is not None


def test_chunked_never_builds_full_batch_matrix(embeddings):
    img, txt = embeddings
    mesh = _mesh((2, 4))
    with jax.set_mesh(mesh):
        s_img, s_txt = _shard(mesh, img, txt)
        for fn, args in [(_clip_value_and_grad(True), (s_img, s_txt, jnp.float32(2.0))),
                         (_siglip_value_and_grad(True), (s_img, s_txt, jnp.float32(2.0), jnp.float32(-10.0)))]:
            hlo = fn.lower(*args).compile().as_text()
            assert not _has_square_batch_matrix(hlo, BATCH)
            assert re.search(rf"\[{VIEWS},{BATCH // 8},{BATCH}\]", hlo), "expected [V, B_local, B] logits"
        # The check itself can fail: the plain form run on one device builds [V, B, B].
        plain = _clip_value_and_grad(False).lower(img, txt, jnp.float32(2.0)).compile().as_text()
        assert _has_square_batch_matrix(plain, BATCH)


def test_chunked_rejects_indivisible_batch(embeddings):
    img, txt = embeddings
    mesh = _mesh((2, 4))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="not divisible"):
        contrastive.clip_loss(img[:12], txt[:12], jnp.float32(2.0), chunked=True)


# --------------------------------------------------------------------------- SigLIP


def test_siglip_single_device_matches_oracle(embeddings):
    img, txt = embeddings
    ls, bias = contrastive.SIGLIP_LOGIT_SCALE_INIT, contrastive.SIGLIP_LOGIT_BIAS_INIT
    loss, grads = _siglip_value_and_grad(False)(img, txt, jnp.float32(ls), jnp.float32(bias))
    r_loss, *r_grads = ref.siglip_loss(img, txt, ls, bias)
    assert_close(loss, r_loss, what="loss")
    for got, want, name in zip(grads, r_grads, ["image", "text", "logit_scale", "bias"]):
        assert_close(got, want, what=f"d {name}")


@pytest.mark.parametrize("mesh_shape", [(2, 4), (4, 2)])
@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
def test_siglip_sharded_matches_oracle(embeddings, mesh_shape, chunked):
    img, txt = embeddings
    mesh = _mesh(mesh_shape)
    ls, bias = 1.7, -3.0  # a trained-looking bias so positives and negatives both matter
    with jax.set_mesh(mesh):
        s_img, s_txt = _shard(mesh, img, txt)
        loss, grads = _siglip_value_and_grad(chunked)(s_img, s_txt, jnp.float32(ls), jnp.float32(bias))
    r_loss, *r_grads = ref.siglip_loss(img, txt, ls, bias)
    assert_close(loss, r_loss, what="loss")
    for got, want, name in zip(grads, r_grads, ["image", "text", "logit_scale", "bias"]):
        assert_close(got, want, what=f"d {name}")


def test_dispatch_rejects_unknown_kind(embeddings):
    img, txt = embeddings
    with pytest.raises(ValueError, match="unknown contrastive loss"):
        contrastive.contrastive_loss("triplet", img, txt, jnp.float32(1.0))
