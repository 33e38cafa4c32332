"""The attention dispatcher (t3d_jax/models/attention.py) against a float64 NumPy oracle.

Every implementation that runs on CPU is checked: 'reference' (the original einsum path),
'xla' (jax.nn.dot_product_attention) and 'pallas_tpu' (the splash kernel in Pallas's TPU
interpreter, with lengths that are and are not multiples of its 128-token tile). 'cudnn' needs
an NVIDIA GPU: on CPU only its selection and its errors are tested; its parity test runs only
where jax's backend is a GPU (`JAX_PLATFORMS=cuda`).

Tolerances:
* FLOAT32_TOL = 1e-5 (absolute and relative): float32 has eps 1.2e-7; a row here sums at most
  130 products and normalises once, so rounding stays under ~1e-6 (measured: <= 6e-7), while a
  wrong mask, scale or causal offset moves outputs by O(0.1). Gradients get GRAD_TOL = 1e-4:
  the backward passes (splash's own kernels) add two more matmuls and a subtraction of nearly
  equal terms (dsoftmax).
* BFLOAT16_TOL = 3e-2: bfloat16 keeps 8 bits (eps 3.9e-3); q, k, v and the probabilities are
  each rounded once to it, outputs are O(1). BFLOAT16_GRAD_TOL = 0.1 (GPU only, cuDNN against
  xla): two bfloat16 backward passes that round in different places, gradients O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t3d_jax.models import attention, layers

FLOAT32_TOL = 1e-5
GRAD_TOL = 1e-4
BFLOAT16_TOL = 3e-2
BFLOAT16_GRAD_TOL = 1e-1
CPU_IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu")


def numpy_attention(q, k, v, key_mask=None, causal=False):
    """float64 oracle: softmax(q k^T / sqrt(d)) v over the allowed keys; NaN rows where none is."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, lq, h, d = q.shape
    lk = k.shape[1]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    allowed = np.ones((b, 1, lq, lk), bool)
    if key_mask is not None:
        allowed &= np.asarray(key_mask, bool)[:, None, None, :]
    if causal:
        allowed &= np.tril(np.ones((lq, lk), bool))[None, None]
    logits = np.where(allowed, logits, -np.inf)
    with np.errstate(invalid="ignore"):
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", w, v)
    has_key = allowed.any(-1).transpose(0, 2, 1)  # [B, Lq, 1]
    return out, np.broadcast_to(has_key[..., None], out.shape)


def inputs(b, lq, lk, h, d, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))


def attend(q, k, v, mask=None, **kw):
    """dot_product_attention under one jit (eager mode would compile every op on its own)."""
    kw.setdefault("interpret", True)
    return jax.jit(lambda q, k, v, mask: attention.dot_product_attention(q, k, v, mask=mask, **kw))(q, k, v, mask)


def padding_mask(b, lk, lengths):
    return np.arange(lk)[None, :] < np.asarray(lengths)[:, None]  # [B, Lk], True = real token


# name: (B, Lq, Lk, H, Dh, key lengths or None, causal)
CASES = {
    "self_no_mask": (2, 6, 6, 2, 8, None, False),
    "self_key_padding": (2, 7, 7, 2, 8, (7, 3), False),  # BERT: padded reports
    "cross_key_padding": (2, 9, 5, 2, 16, (5, 2), False),  # TMA: patch tokens -> report states
    "causal": (2, 6, 6, 2, 8, None, True),
    "causal_cross_key_padding": (1, 4, 7, 2, 8, (6,), True),
    "over_one_tile": (1, 130, 129, 1, 16, (100,), False),  # pallas: padded to 256, two tiles
}


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_oracle(impl, case):
    b, lq, lk, h, d, lengths, causal = CASES[case]
    q, k, v = inputs(b, lq, lk, h, d)
    mask = None if lengths is None else padding_mask(b, lk, lengths)
    out = attend(q, k, v, mask, causal=causal, implementation=impl)
    want, has_key = numpy_attention(q, k, v, mask, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out)[has_key], want[has_key], rtol=FLOAT32_TOL, atol=FLOAT32_TOL)


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
def test_bfloat16_matches_oracle(impl):
    q, k, v = inputs(2, 8, 8, 2, 16, seed=1, dtype=jnp.bfloat16)
    mask = padding_mask(2, 8, (8, 5))
    out = attend(q, k, v, mask, implementation=impl)
    want, _ = numpy_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=BFLOAT16_TOL, atol=BFLOAT16_TOL)


def test_mask_forms_are_equivalent():
    """[B, Lk], [B, 1, 1, Lk] and an int mask are the same key-padding mask; a 4-D mask works too."""
    q, k, v = inputs(2, 5, 5, 2, 8)
    mask = padding_mask(2, 5, (5, 2))
    ref = attend(q, k, v, mask, implementation="xla")
    for form in (mask[:, None, None, :], mask.astype(np.int32)):
        np.testing.assert_array_equal(np.asarray(attend(q, k, v, form, implementation="xla")), np.asarray(ref))
    full = np.broadcast_to(mask[:, None, None, :], (2, 2, 5, 5))  # a general mask: xla / reference only
    for impl in ("reference", "xla"):
        out = attend(q, k, v, full, implementation=impl)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=FLOAT32_TOL, atol=FLOAT32_TOL)


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
def test_fully_masked_rows_stay_finite(impl):
    """A query with no key left: finite everywhere; reference and xla give the mean of the values."""
    q, k, v = inputs(2, 3, 4, 1, 8)
    mask = padding_mask(2, 4, (4, 0))
    out = np.asarray(attend(q, k, v, mask, implementation=impl))
    assert np.isfinite(out).all()
    if impl != "pallas_tpu":  # pallas: the mean over its padded tile (zeros included); documented
        np.testing.assert_allclose(out[1], np.broadcast_to(np.asarray(v[1]).mean(0), out[1].shape),
                                   rtol=FLOAT32_TOL, atol=FLOAT32_TOL)


@pytest.mark.parametrize("impl,causal", [("xla", False), ("xla", True), ("pallas_tpu", False)])
def test_gradients_match_reference(impl, causal):
    q, k, v = inputs(2, 6, 5, 2, 8, seed=2)
    mask = padding_mask(2, 5, (5, 3))
    cot = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)

    def loss(impl):
        return lambda q, k, v: jnp.sum(cot * attention.dot_product_attention(
            q, k, v, mask=mask, causal=causal, implementation=impl, interpret=True))

    got = jax.jit(jax.grad(loss(impl), (0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss("reference"), (0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=GRAD_TOL, atol=GRAD_TOL, err_msg=f"d{name}")


def test_pallas_under_a_mesh_runs_sharded_and_exact():
    """Under jax.set_mesh the kernel runs in a shard_map over batch ('data', 'fsdp') and heads ('tensor')."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    q, k, v = inputs(4, 9, 6, 2, 8, seed=4)
    mask = padding_mask(4, 6, (6, 2, 5, 1))
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda q, k, v: attention.dot_product_attention(
            q, k, v, mask=mask, implementation="pallas_tpu", interpret=True))
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
        out = fn(q, k, v)
    want, _ = numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), want, rtol=FLOAT32_TOL, atol=FLOAT32_TOL)


def test_auto_selection():
    q32, k32, _ = inputs(1, 6, 6, 2, 8)
    q16, k16 = q32.astype(jnp.bfloat16), k32.astype(jnp.bfloat16)
    pick = attention.select_implementation
    assert jax.default_backend() == "cpu" and pick(q32, k32) == "xla"  # this machine
    assert pick(q16, k16, mask_kind="key", platform="cpu") == "xla"
    assert pick(q16, k16, dropout=True, platform="tpu") == "reference"  # dropout: only the reference has it
    assert pick(q16, k16, mask_kind="key", causal=True, platform="tpu") == "pallas_tpu"
    assert pick(q16, k16, mask_kind="full", platform="tpu") == "xla"  # splash takes no arbitrary mask
    assert pick(q16, k16, mask_kind="key", platform="cuda") == "cudnn"
    assert pick(q32, k32, platform="cuda") == "xla"  # cuDNN: half precision only
    odd = jax.ShapeDtypeStruct((1, 7, 2, 8), jnp.bfloat16)
    assert pick(odd, odd, mask_kind="key", platform="cuda") == "xla"  # cuDNN + bias: even lengths
    assert pick(odd, odd, platform="cuda") == "cudnn"
    wide = jax.ShapeDtypeStruct((1, 8, 2, 12), jnp.bfloat16)
    assert pick(wide, wide, platform="cuda") == "xla"  # head dim not a multiple of 8
    # An explicit name is kept wherever it can run.
    assert pick(q32, k32, implementation="reference", platform="tpu") == "reference"


def test_clear_errors():
    q, k, v = inputs(1, 4, 4, 2, 8)
    full = np.ones((1, 2, 4, 4), bool)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention.dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="pallas_tpu' takes no mask, a key-padding mask"):
        attention.dot_product_attention(q, k, v, mask=full, implementation="pallas_tpu", interpret=True)
    with pytest.raises(ValueError, match="compiles for TPU only"):
        attention.dot_product_attention(q, k, v, implementation="pallas_tpu")
    with pytest.raises(ValueError, match="'cudnn' needs bfloat16 or float16"):
        attention.dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="dropout .* only in the 'reference'"):
        attention.dot_product_attention(q, k, v, implementation="xla", dropout=lambda w: w)
    with pytest.raises(ValueError, match="key-padding mask must be"):
        attention.dot_product_attention(q, k, v, mask=np.ones((1, 5), bool))
    with pytest.raises(ValueError, match="mask must be a key-padding mask"):
        attention.dot_product_attention(q, k, v, mask=np.ones((4, 4), bool)[None])
    with pytest.raises(ValueError, match=r"q \[B, Lq, H, Dh\]"):
        attention.dot_product_attention(q, k[..., :4], v[..., :4])


def test_module_dispatches_and_keeps_dropout():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6, 16)), jnp.float32)
    mask = padding_mask(2, 6, (6, 4))
    call = nnx.jit(lambda m, x, deterministic: m(x, mask=mask, deterministic=deterministic),
                   static_argnames="deterministic")
    outs = {}
    for impl in ("reference", "xla"):  # same weights (same seed), two implementations
        mha = layers.MultiHeadAttention(16, 2, attention=impl, dropout_rate=0.5, rngs=nnx.Rngs(0))
        outs[impl] = np.asarray(call(mha, x, True))
    np.testing.assert_allclose(outs["xla"], outs["reference"], rtol=FLOAT32_TOL, atol=FLOAT32_TOL)
    # Training with attention dropout: 'auto' falls back to the reference (dropout applied) ...
    mha = layers.MultiHeadAttention(16, 2, attention="auto", dropout_rate=0.5, rngs=nnx.Rngs(0))
    assert not np.allclose(np.asarray(call(mha, x, False)), outs["reference"])
    # ... an explicit fused implementation refuses.
    with pytest.raises(ValueError, match="model.text.attention_dropout"):
        call(layers.MultiHeadAttention(16, 2, attention="xla", dropout_rate=0.5, rngs=nnx.Rngs(0)), x, False)
    with pytest.raises(ValueError, match="model.attention: unknown"):
        layers.MultiHeadAttention(16, 2, attention="fast", rngs=nnx.Rngs(0))


def test_config_key_reaches_every_attention_layer():
    from configs import t3d as t3d_config
    from t3d_jax.models import two_tower

    config = t3d_config.get_config("tiny")
    config.model.attention = "reference"
    config.model.text.attention_dropout = 0.0
    model = nnx.eval_shape(lambda: two_tower.model_class(config.model.name)(
        config.model, rngs=nnx.Rngs(0), loss_config=config.loss, view_size=tuple(config.data.view_size)))
    found = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, layers.MultiHeadAttention)]
    owners = {path[0] for path, _ in found}
    assert owners == {"image_encoder", "text_encoder", "tma_head"}
    assert all(node.attention == "reference" for _, node in found)
    assert all(node.dropout.rate == 0.0 for path, node in found if path[0] == "text_encoder")


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN attention needs an NVIDIA GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("case", ["self_key_padding", "cross_key_padding", "causal"])
def test_cudnn_matches_oracle_on_gpu(case):
    b, lq, lk, h, d, lengths, causal = CASES[case]
    lq, lk = lq + lq % 2, lk + lk % 2  # cuDNN with a mask (bias): even lengths
    q, k, v = inputs(b, lq, lk, h, d, dtype=jnp.bfloat16)
    mask = None if lengths is None else padding_mask(b, lk, lengths)
    assert attention.select_implementation(q, k, mask_kind="none" if mask is None else "key") == "cudnn"
    out = attend(q, k, v, mask, causal=causal, implementation="cudnn")
    want, has_key = numpy_attention(*(t.astype(jnp.float32) for t in (q, k, v)), mask, causal)
    np.testing.assert_allclose(np.asarray(out, np.float32)[has_key], want[has_key], rtol=BFLOAT16_TOL,
                               atol=BFLOAT16_TOL)
    cot = jnp.ones(q.shape, jnp.float32)
    grads = [jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(cot * attention.dot_product_attention(
        q, k, v, mask=mask, causal=causal, implementation=impl).astype(jnp.float32)), (0, 1, 2)))(q, k, v)
        for impl in ("cudnn", "xla")]
    for a, b_ in zip(*grads):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b_, np.float32), rtol=BFLOAT16_GRAD_TOL,
                                   atol=BFLOAT16_GRAD_TOL)
