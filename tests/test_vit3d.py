"""ViT3D: patchify, position tables and their interpolation, patch dropout, dtypes, remat.

The full forward is checked against MONAI's ViT in tests/test_convert.py; here each piece is
checked against an independent computation (XLA convolution, closed-form properties).
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from configs.t3d import get_config
from t3d_jax.models import layers
from t3d_jax.models.vit3d import ViT3D, ViT3DConfig, resize_pos_embed, sincos_3d


def _cfg(**kw):
    base = dict(image_size=(16, 24, 32), patch_size=(8, 8, 8))
    return ViT3DConfig.from_size("tiny", **{**base, **kw})


def _volume(shape=(2, 16, 24, 32, 1), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_patchify_equals_strided_conv3d():
    model = ViT3D(_cfg(patch_size=(4, 8, 8), in_channels=2), rngs=nnx.Rngs(0))
    x = _volume((2, 16, 24, 32, 2))
    tokens, grid = model.patchify(x)
    kernel = model.patch_embed.kernel[...]  # [px, py, pz, C, d] = DHWIO
    ref = jax.lax.conv_general_dilated(x, kernel, window_strides=(4, 8, 8), padding="VALID",
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                       precision=jax.lax.Precision.HIGHEST)
    ref = ref + model.patch_embed.bias[...]
    assert grid == (4, 3, 4)
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(ref.reshape(2, -1, ref.shape[-1])), atol=1e-5)


def test_outputs_shapes_and_pooling():
    x = _volume()
    for pool in ("mean", "cls"):
        model = ViT3D(_cfg(pool=pool), rngs=nnx.Rngs(0))
        out = nnx.jit(lambda m, v: m(v))(model, x)
        assert out["grid"] == (2, 3, 4)
        assert out["tokens"].shape == (2, 24, 64) and out["pooled"].shape == (2, 64)
        assert out["token_index"].dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(out["token_index"]), np.tile(np.arange(24), (2, 1)))
        if pool == "mean":
            np.testing.assert_allclose(np.asarray(out["pooled"]), np.asarray(out["tokens"].mean(1)), atol=1e-6)


def test_sincos_table_is_translation_invariant():
    # <p(a), p(b)> of a sin-cos table depends only on a - b: sum cos(w (a - b)).
    table = sincos_3d((5, 4, 3), 66).reshape(5, 4, 3, 66)
    gram1 = table[0, 0, 0] @ table[2, 1, 1]
    gram2 = table[2, 2, 1] @ table[4, 3, 2]  # same offset (2, 1, 1)
    gram3 = table[2, 2, 1] @ table[4, 3, 1]  # offset (2, 1, 0)
    assert gram1 == pytest.approx(gram2, rel=1e-5)
    assert abs(gram1 - gram3) > 1e-2
    assert np.allclose(np.linalg.norm(table, axis=-1) ** 2, 33)  # 33 sin/cos pairs, each norm 1
    assert not np.allclose(table[0, 0, 0], table[0, 0, 1])


def test_pos_embed_interpolation():
    model = ViT3D(_cfg(pos_embed="learned"), rngs=nnx.Rngs(0))
    built = model.cfg.grid
    np.testing.assert_array_equal(np.asarray(model.position_table(built)), np.asarray(model.pos_embed[...]))
    # A table linear in the x index is reproduced by trilinear resizing at the mapped
    # (half-pixel) coordinates x' -> (x' + 0.5) * gx / gx' - 0.5 away from the clamped edges.
    gx, gy, gz = 4, 3, 2
    xs = np.arange(gx, dtype=np.float32)[:, None, None, None] * np.ones((gx, gy, gz, 5), np.float32)
    table = jnp.asarray(xs.reshape(-1, 5) * np.arange(1, 6, dtype=np.float32))
    out = np.asarray(resize_pos_embed(table, (gx, gy, gz), (8, 3, 2))).reshape(8, 3, 2, 5)
    mapped = (np.arange(8) + 0.5) * gx / 8 - 0.5
    interior = (mapped >= 0) & (mapped <= gx - 1)
    expected = mapped[:, None] * np.arange(1, 6)
    np.testing.assert_allclose(out[interior, 1, 0], expected[interior], atol=1e-5)
    # An unseen grid runs end to end, for both table kinds.
    for kind in ("learned", "sincos"):
        m = ViT3D(_cfg(pos_embed=kind), rngs=nnx.Rngs(0))
        o = m(_volume((1, 24, 16, 40, 1)))
        assert o["grid"] == (3, 2, 5) and o["tokens"].shape == (1, 30, 64)
        assert np.all(np.isfinite(np.asarray(o["tokens"])))


def test_patch_dropout_keeps_fraction_and_indexes_tokens():
    # depth=0: tokens are LN(patch + pos) per token, so kept tokens must equal the full
    # forward's tokens at token_index -- which checks that the index names the right cells.
    cfg = ViT3DConfig(width=32, depth=0, num_heads=2, mlp_dim=32, image_size=(16, 24, 32), patch_dropout=0.75)
    model = ViT3D(cfg, rngs=nnx.Rngs(0, dropout=7))
    x = _volume((3, 16, 24, 32, 1))
    full = model(x)
    train = nnx.jit(lambda m, v: m(v, deterministic=False))
    a, b = train(model, x), train(model, x)
    n = 24
    keep = round(n * 0.25)
    assert a["tokens"].shape == (3, keep, 32) and a["token_index"].shape == (3, keep)
    idx = np.asarray(a["token_index"])
    assert idx.dtype == np.int32 and idx.min() >= 0 and idx.max() < n
    assert all(np.all(np.diff(row) > 0) for row in idx)  # unique, grid order kept
    assert len({tuple(r) for r in idx}) > 1  # random per example
    assert not np.array_equal(idx, np.asarray(b["token_index"]))  # the rng stream advances
    gathered = np.take_along_axis(np.asarray(full["tokens"]), idx[:, :, None], axis=1)
    np.testing.assert_allclose(np.asarray(a["tokens"]), gathered, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(full["token_index"]), np.tile(np.arange(n), (3, 1)))
    # An explicit key makes the choice reproducible (for a functional train step).
    c = model(x, deterministic=False, rngs=jax.random.key(3))
    d = model(x, deterministic=False, rngs=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(c["token_index"]), np.asarray(d["token_index"]))


def test_bfloat16_compute_agrees_with_float32():
    x = _volume()
    f32 = ViT3D(_cfg(), rngs=nnx.Rngs(0))
    bf16 = ViT3D(_cfg(dtype="bfloat16"), rngs=nnx.Rngs(0))  # same float32 params, bf16 compute
    assert bf16.blocks[0].attn.query.kernel[...].dtype == jnp.float32
    a = nnx.jit(lambda m, v: m(v))(f32, x)
    b = nnx.jit(lambda m, v: m(v))(bf16, x)
    assert b["tokens"].dtype == jnp.bfloat16
    scale = float(jnp.abs(a["tokens"]).max())
    diff = float(jnp.abs(a["tokens"] - b["tokens"].astype(jnp.float32)).max())
    print(f"\nViT3D bf16 vs f32: max|d tokens|={diff:.3e} (rel {diff / scale:.3e})")
    # bf16 has an 8-bit mantissa (rel. rounding 2^-8 = 3.9e-3 per op); after 2 blocks and LN a
    # few percent of the activation scale is the expected worst case.
    assert diff / scale < 5e-2


def test_remat_same_values_and_gradients():
    x = _volume((1, 16, 24, 32, 1))

    def loss(model):
        out = model(x)
        return jnp.sum(out["tokens"] ** 2) + jnp.sum(out["pooled"])

    def value_grad(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        value_and_grad = jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p, rest)))
        return jax.jit(value_and_grad)(params), str(jax.make_jaxpr(value_and_grad)(params))

    (l0, g0), jaxpr0 = value_grad(ViT3D(_cfg(), rngs=nnx.Rngs(0)))
    assert "checkpoint" not in jaxpr0 and "remat" not in jaxpr0
    for policy in ("full", "dots_saveable"):
        (l1, g1), jaxpr1 = value_grad(ViT3D(_cfg(remat=policy), rngs=nnx.Rngs(0)))
        assert "checkpoint" in jaxpr1 or "remat" in jaxpr1  # the blocks really are rematerialised
        assert float(l0) == pytest.approx(float(l1), rel=1e-6)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_logical_names_on_every_parameter():
    model = ViT3D(_cfg(pos_embed="learned", pool="cls"), rngs=nnx.Rngs(0))
    names = layers.logical_names(model)
    assert names[("patch_embed", "kernel")] == (None, None, None, "patch", "embed")
    assert names[("blocks", 0, "attn", "out", "kernel")] == ("heads", "kv", "embed")
    assert names[("blocks", 1, "mlp", "fc2", "kernel")] == ("mlp", "embed")
    assert names[("pos_embed",)] == (None, "embed")
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            assert names[tuple(path)] is not None and len(names[tuple(path)]) == var[...].ndim, path
            # only names the config's sharding_rules table knows (None = never split)
            assert set(names[tuple(path)]) <= set(get_config("tiny").sharding_rules) | {None}, path


def test_config_from_project_config_and_errors():
    c = get_config("tiny")
    cfg = ViT3DConfig.from_config(c.model.image, image_size=c.data.view_size, dtype=c.model.dtype)
    assert cfg.grid == tuple(s // p for s, p in zip(c.data.view_size, c.model.image.patch_size))
    assert ViT3DConfig.from_size("base").width == 768 and ViT3DConfig.from_size("base").depth == 12
    assert ViT3DConfig.from_size("large").num_heads == 16
    with pytest.raises(ValueError, match="unknown remat policy"):
        _cfg(remat="sometimes")
    with pytest.raises(ValueError, match="unknown ViT3D size"):
        ViT3DConfig.from_size("huge")
    model = ViT3D(_cfg(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not divisible by patch size"):
        model(_volume((1, 16, 24, 30, 1)))
    with pytest.raises(ValueError, match="channel-last"):
        model(_volume((1, 1, 16, 24, 32)))
