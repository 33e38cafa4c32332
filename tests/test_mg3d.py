"""MG-3D (task `mg3d`): every piece against a float64 NumPy oracle (tests/reference_mg3d.py),
values and gradients; the global-batch terms on 8 fake devices equal one device; the sentence
and word indices of the pipeline against reports.split_sentences; a tiny train step.

Tolerances: the JAX code runs in float32, the oracles in float64. Values agree to 2e-5 of the
reference's scale (a few float32 roundings over sums of at most a few hundred terms);
gradients (JAX autodiff vs float64 central differences with eps 1e-6, whose own truncation
error is ~1e-10) to 2e-4, the float32 rounding of the forward pass amplified by the sigmoid /
normalisation derivatives.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import mg3d as mg3d_config
from t3d_jax import tasks
from t3d_jax.data import reports, sentences
from t3d_jax.data.labels import CT_RATE_LABELS
from t3d_jax.data.tokenizer import WordPieceTokenizer
from t3d_jax.losses import mg3d as L
from t3d_jax.models import mg3d as M
from t3d_jax.models.swin3d import Swin3D, Swin3DConfig
from t3d_jax.models.vit3d import ViT3D, ViT3DConfig
from t3d_jax.train import mesh as mesh_lib
from t3d_jax.train import step as step_lib
from tests import reference_mg3d as ref
from tests.reference_numpy import assert_close, clip_loss as ref_clip, finite_difference

VALUE_RTOL = 2e-5
GRAD_RTOL = 2e-4
# The larger programs here (a Swin, the train step) are compiled with XLA's backend (LLVM)
# optimisations off, as tests/test_swin3d.py: the compile, not the run, is their cost, and the
# HLO, hence the computation, is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _grad(fn):
    return jax.jit(jax.grad(fn))  # one compile instead of op-by-op dispatch


def _vgrad(fn):
    return jax.jit(jax.value_and_grad(fn))


# the masking functions jitted once per shape (op by op, each jnp call would compile its own kernel)
_whole_word_mask = jax.jit(L.whole_word_mask, static_argnames=("prob", "mask_id", "vocab_size", "max_predictions"))
_choose_words = jax.jit(L.choose_words, static_argnums=(2, 3))
_masked_positions = jax.jit(L.masked_positions, static_argnums=1)


def _numpy_init(build, seed, std=0.3):
    """The module ``build()`` makes, with its parameters drawn by NumPy (normal, ``std``) instead
    of its initialisers: no per-shape XLA init kernels to compile (seconds for a Swin)."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


def _dense(d):
    return np.asarray(d.kernel[...], np.float64), np.asarray(d.bias[...], np.float64)


def _gate_params(stack):
    out = []
    for layer in stack.layers:
        (wq, bq), (wk, bk), (wv, bv) = _dense(layer.query), _dense(layer.key), _dense(layer.value)
        out.append(dict(wq=wq, bq=bq, wk=wk, bk=bk, wv=wv, bv=bv))
    return out


def test_gating_layers_and_sentence_aggregation_match_float64_reference():
    rng = np.random.default_rng(0)
    stack = M.GateStack(6, 5, 4, 2, dtype=jnp.float32, rngs=nnx.Rngs(0))
    params = _gate_params(stack)
    a, b = rng.normal(size=(3, 6)), rng.normal(size=(4, 5))
    key_mask = np.array([True, False, True, True])
    r = rng.normal(size=(3, 6))
    out = jax.jit(lambda x, y: stack(x, y, key_mask))(jnp.float32(a), jnp.float32(b))
    assert_close(out, ref.gate_stack(a, b, params, key_mask), VALUE_RTOL, "two gating layers, key mask")
    grad = _grad(lambda x: jnp.sum(stack(x, jnp.float32(b), key_mask) * r))(jnp.float32(a))
    fd = finite_difference(lambda x: np.sum(ref.gate_stack(x, b, params, key_mask) * r), a)
    assert_close(grad, fd, GRAD_RTOL, "gating gradient w.r.t. the gated tokens")
    grad_b = _grad(lambda y: jnp.sum(stack(jnp.float32(a), y, key_mask) * r))(jnp.float32(b))
    fd_b = finite_difference(lambda y: np.sum(ref.gate_stack(a, y, params, key_mask) * r), b)
    assert_close(grad_b, fd_b, GRAD_RTOL, "gating gradient w.r.t. the gating tokens")
    assert np.all(np.asarray(grad_b)[1] == 0), "a masked key must not influence the output"

    agg = M.SentenceAggregation(4, 2, dtype=jnp.float32, rngs=nnx.Rngs(1))
    aparams = _gate_params(agg.gates)
    g, sents = rng.normal(size=(2, 4)), rng.normal(size=(2, 3, 4))
    valid = np.array([[True, True, False], [True, False, False]])
    x, pooled = jax.jit(lambda x, y: agg(x, y, valid))(jnp.float32(g), jnp.float32(sents))
    for k in range(2):
        rx, rp = ref.sentence_aggregation(g[k], sents[k], valid[k], aparams)
        assert_close(x[k], rx, VALUE_RTOL, "sentence-wise visual features")
        assert_close(pooled[k], rp, VALUE_RTOL, "aggregate (mean + tanh over valid sentences)")
    rr = rng.normal(size=(2, 4))
    grad = _grad(lambda s: jnp.sum(agg(jnp.float32(g), s, valid)[1] * rr))(jnp.float32(sents))
    fd = finite_difference(lambda s: sum(np.sum(ref.sentence_aggregation(g[k], s[k], valid[k], aparams)[1] * rr[k])
                                         for k in range(2)), sents)
    assert_close(grad, fd, GRAD_RTOL, "aggregation gradient w.r.t. the sentence features")


def test_sentence_pool_matches_reference():
    rng = np.random.default_rng(1)
    states = rng.normal(size=(2, 7, 3))
    index = np.array([[-1, 0, 0, 1, 1, 1, -1], [-1, 0, 2, 2, -1, -1, -1]])
    feats, valid = M.sentence_pool(jnp.float32(states), jnp.asarray(index), 4)
    rf, rv = ref.sentence_pool(states, index, 4)
    assert_close(feats, rf, VALUE_RTOL, "sentence means")
    np.testing.assert_array_equal(valid, rv)  # sentence 1 of example 1 is empty: not valid
    r = rng.normal(size=(2, 4, 3))
    grad = _grad(lambda s: jnp.sum(M.sentence_pool(s, jnp.asarray(index), 4)[0] * r))(jnp.float32(states))
    fd = finite_difference(lambda s: np.sum(ref.sentence_pool(s, index, 4)[0] * r), states)
    assert_close(grad, fd, GRAD_RTOL, "sentence pooling gradient")


def test_mim_masks_tokens_and_scores_only_masked_voxels():
    grid, patch = (2, 3, 2), (2, 2, 4)
    keep, mask = L.draw_token_mask(jax.random.key(0), 3, 12, 0.5)
    mask = np.asarray(mask)
    assert mask.sum(axis=1).tolist() == [6, 6, 6]  # round(0.5 * 12) per example
    assert all(sorted(np.flatnonzero(~mask[k]).tolist()) == np.asarray(keep)[k].tolist() for k in range(3))
    vmask = np.asarray(L.token_mask_to_voxels(jnp.asarray(mask), grid, patch))
    np.testing.assert_array_equal(vmask, ref.voxel_mask(mask, grid, patch))
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=(3, 4, 6, 8, 1)), rng.normal(size=(3, 4, 6, 8, 1))
    loss, grad = _vgrad(L.mim_loss)(jnp.float32(pred), jnp.float32(target), jnp.asarray(vmask))
    r_loss, r_grad = ref.mim_loss(pred, target, vmask)
    assert_close(loss, r_loss, VALUE_RTOL, "masked-voxel MSE")
    assert_close(grad, r_grad, GRAD_RTOL, "masked-voxel MSE gradient")
    assert np.all(np.asarray(grad)[~vmask] == 0), "unmasked voxels must not be scored"


def test_vit_masked_encoding_runs_the_encoder_on_the_kept_tokens_only():
    """The kept tokens equal the encoder run on exactly those tokens (token dropping, with their
    own position embeddings); the masked cells hold mask token + position embedding."""
    enc = _numpy_init(lambda: ViT3D(ViT3DConfig(image_size=(16, 16, 16)), rngs=nnx.Rngs(0)), seed=4, std=0.1)
    vol = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 16, 16, 1)), jnp.float32)
    mask_token = jnp.asarray(np.random.default_rng(4).normal(size=(64,)), jnp.float32)
    keep = jnp.asarray([[0, 3, 5, 6], [1, 2, 4, 7]])

    @jax.jit
    def run(v, k):
        tokens, grid = enc.patchify(v)
        table = enc.position_table(grid)
        alone = jnp.take_along_axis(tokens + table[None], k[..., None], axis=1)  # the kept tokens only
        for block in enc.blocks:
            alone = block(alone)
        return M.vit_encode_masked(enc, v, k, mask_token), enc.norm(alone), table

    out, alone, table = (np.asarray(a) for a in run(vol, keep))
    for k in range(2):
        idx = np.asarray(keep[k])
        assert_close(out[k, idx], alone[k], 1e-5, "kept tokens = the encoder on them alone")
        masked = np.setdiff1d(np.arange(8), idx)
        assert_close(out[k, masked], np.asarray(mask_token)[None] + table[masked], 1e-6, "masked cells")


def test_mlm_cross_entropy_and_sentence_term_match_reference():
    rng = np.random.default_rng(4)
    logits, targets = rng.normal(size=(2, 5, 11)), rng.integers(0, 11, (2, 5))
    chosen = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], bool)
    loss, grad = _vgrad(L.mlm_loss)(jnp.float32(logits), jnp.asarray(targets), jnp.asarray(chosen))
    r_loss, r_grad = ref.mlm_loss(logits, targets, chosen)
    assert_close(loss, r_loss, VALUE_RTOL, "MLM cross-entropy on the masked tokens")
    assert_close(grad, r_grad, GRAD_RTOL, "MLM gradient")
    pred, target = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 4, 8))
    valid = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    pred[0, 2:] = 0.0  # padding sentences are zero vectors: finite gradients required
    val, grad = _vgrad(L.sentence_cosine_term)(jnp.float32(pred), jnp.float32(target), valid)
    assert_close(val, ref.sentence_cosine_term(pred, target, valid), VALUE_RTOL, "mean(1 - cos)")
    fd = finite_difference(lambda p: ref.sentence_cosine_term(p, target, valid), pred)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert_close(grad, fd, GRAD_RTOL, "sentence term gradient")


def test_whole_word_masking_masks_words_together_at_the_rate():
    rng = np.random.default_rng(5)
    b, length = 64, 48
    # words of 1-3 tokens (the continuation tokens share the word number), specials -1
    word = np.full((b, length), -1)
    for k in range(b):
        i, w = 1, 0
        while i < length - 1:
            n = int(rng.integers(1, 4))
            word[k, i:min(i + n, length - 1)] = w
            i, w = i + n, w + 1
    ids = rng.integers(1000, 2000, (b, length))
    masked, chosen = _whole_word_mask(jax.random.key(1), jnp.asarray(ids), jnp.asarray(word), prob=0.15,
                                       mask_id=103, vocab_size=30522)
    masked, chosen = np.asarray(masked), np.asarray(chosen)
    assert not chosen[word < 0].any(), "special tokens and padding are never chosen"
    for k in range(b):  # every word entirely chosen or entirely not
        for w in np.unique(word[k][word[k] >= 0]):
            assert len(set(chosen[k][word[k] == w].tolist())) == 1
    words = [(k, w) for k in range(b) for w in np.unique(word[k][word[k] >= 0])]
    rate = np.mean([chosen[k][word[k] == w][0] for k, w in words])
    n = len(words)
    assert abs(rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n), (rate, n)  # 4 sigma of a binomial
    np.testing.assert_array_equal(masked[~chosen], ids[~chosen])
    as_mask = np.mean(masked[chosen] == 103)
    kept = np.mean(masked[chosen] == ids[chosen])
    m = chosen.sum()
    assert abs(as_mask - 0.8) < 4 * math.sqrt(0.16 / m) and abs(kept - 0.1) < 4 * math.sqrt(0.09 / m) + 1e-3

    # the cap (model.mg3d.max_predictions): at most K tokens, whole words, the same draws
    k = 6
    capped_ids, capped = _whole_word_mask(jax.random.key(1), jnp.asarray(ids), jnp.asarray(word), prob=0.15,
                                           mask_id=103, vocab_size=30522, max_predictions=k)
    capped = np.asarray(capped)
    counts = chosen.sum(axis=1)
    assert (capped.sum(axis=1) <= k).all() and (counts > k).sum() >= 8, "the cap binds in many rows"
    assert not (capped & ~chosen).any(), "the cap only leaves chosen words out"
    np.testing.assert_array_equal(capped[counts <= k], chosen[counts <= k])  # no cap needed: unchanged
    np.testing.assert_array_equal(np.asarray(capped_ids)[~capped], ids[~capped])
    draws = rng.random((b, length))
    for cap in (None, k):
        got = np.asarray(_choose_words(jnp.asarray(draws, jnp.float32), jnp.asarray(word), 0.15, cap))
        np.testing.assert_array_equal(got, ref.choose_words(draws.astype(np.float32), word, 0.15, cap))
    positions, weights = _masked_positions(jnp.asarray(capped), k)
    for row in range(b):  # the K positions hold every chosen token, each once
        got = sorted(np.asarray(positions)[row][np.asarray(weights)[row]].tolist())
        assert got == np.flatnonzero(capped[row]).tolist()


def test_mlm_term_at_the_masked_positions_matches_the_all_positions_reference():
    """L_senMLM's token term as the task computes it (capped whole-word choice, the head and the
    cross-entropy on the K gathered positions only) equals the float64 oracle that runs the
    head at every one of the L positions and averages over the chosen ones: values, and
    gradients w.r.t. the [B, L, H] states (zero at the unchosen positions)."""
    rng = np.random.default_rng(11)
    b, length, h, vocab, k = 3, 9, 4, 11, 4
    head = _numpy_init(lambda: M.MLMHead(h, vocab, dtype=jnp.float32, rngs=nnx.Rngs(2)), seed=2, std=0.5)
    (w1, b1), (w2, b2) = _dense(head.transform), _dense(head.decoder)
    p = dict(w1=w1, b1=b1, w2=w2, b2=b2, scale=np.asarray(head.norm.scale[...], np.float64),
             shift=np.asarray(head.norm.bias[...], np.float64))
    word = np.array([[-1, 0, 0, 1, 2, 2, 2, 3, -1], [-1, 0, 1, 1, 2, 3, 3, -1, -1], [-1, 0, 1, 2, 3, 4, 5, 6, -1]])
    draws = rng.random((b, length))
    chosen = np.asarray(_choose_words(jnp.asarray(draws, jnp.float32), jnp.asarray(word), 0.6, k))
    np.testing.assert_array_equal(chosen, ref.choose_words(draws.astype(np.float32), word, 0.6, k))
    assert chosen.sum() >= 6 and (chosen.sum(axis=1) <= k).all()
    positions, weights = _masked_positions(jnp.asarray(chosen), k)
    states, targets = rng.normal(size=(b, length, h)), rng.integers(0, vocab, (b, length))

    def term(x):
        return L.mlm_loss(head(L.gather_positions(x, positions)), L.gather_positions(jnp.asarray(targets), positions),
                          weights)

    val, grad = _vgrad(term)(jnp.float32(states))
    assert_close(val, ref.mlm_term(states, targets, chosen, p), VALUE_RTOL, "MLM term at the K masked positions")
    fd = finite_difference(lambda x: ref.mlm_term(x, targets, chosen, p), states)
    assert_close(grad, fd, GRAD_RTOL, "MLM term gradient w.r.t. the report states")
    assert np.all(np.asarray(grad)[~chosen] == 0), "unchosen positions must not be scored"


def test_mim_decoder_matches_the_float64_reference_in_the_codes_order():
    """UpsampleHead (x2 upsampling by a two-tap stencil, its 1^3 conv before the last
    upsampling) equals the oracle with np.interp upsampling and the 1^3 conv at full
    resolution (MG-3D's order); values and input gradients."""
    rng = np.random.default_rng(13)
    plan = M.upsample_plan((4, 4, 2))  # [(2, 2, 2), (2, 2, 1)]
    head = _numpy_init(lambda: M.UpsampleHead(6, 1, plan, min_channels=2, dtype=jnp.float32, rngs=nnx.Rngs(3)), seed=3)
    convs = [_dense(c) for c in head.convs]
    out = _dense(head.out)
    x = rng.normal(size=(2, 2, 2, 1, 6))
    r = rng.normal(size=(2, 8, 8, 2, 1))
    recon = jax.jit(head)(jnp.float32(x))
    assert recon.shape == (2, 8, 8, 2, 1)
    for k in range(2):
        assert_close(recon[k], ref.upsample_head(x[k], convs, out, plan), VALUE_RTOL, "decoder output")
    grad = _grad(lambda t: jnp.sum(head(t) * r[:1]))(jnp.float32(x[:1]))
    fd = finite_difference(lambda t: np.sum(ref.upsample_head(t[0], convs, out, plan) * r[0]), x[:1])
    assert_close(grad, fd, GRAD_RTOL, "decoder gradient w.r.t. the gated tokens")


def test_swin_masked_encoding_hides_the_masked_voxels_and_mim_scores_only_them():
    """The task's masked encoding (`swin_encode_masked`, what MG3D.encode_masked runs for a
    Swin3D) on a tiny Swin3D, SimMIM-style: every patch embedding under a masked token is the
    mask token, the others (all of them when nothing is masked) the plain embedding; after the
    first, unshifted block, whose windows lie inside one token's cells, the kept cells equal the
    plain forward's (the shifted windows then mix them with masked cells); nothing under a
    masked token reaches the tokens or the decoded volume; the MIM loss of the decoded volume
    is the MSE over the masked voxels only (float64 oracle)."""
    cfg = Swin3DConfig(embed_dim=4, depths=(2, 1, 1, 1), num_heads_per_stage=(1, 1, 2, 2), window_size=(4, 4, 4),
                       patch_size=(1, 1, 1), input_mean=0.5, input_std=2.0)
    enc = _numpy_init(lambda: Swin3D(cfg, rngs=nnx.Rngs(0)), seed=0)
    stride, mask_dim = M.token_stride(enc)
    assert (stride, mask_dim) == ((16, 16, 16), 4)  # tokens every 16 patches, the mask token replaces embeddings
    head = _numpy_init(lambda: M.UpsampleHead(cfg.width, 1, M.upsample_plan(stride), min_channels=4,
                                              dtype=jnp.float32, rngs=nnx.Rngs(1)), seed=1)
    rng = np.random.default_rng(12)
    mask_token = jnp.asarray(rng.normal(size=(mask_dim,)), jnp.float32)
    vol = rng.normal(size=(2, 32, 32, 16, 1)).astype(np.float32)  # a 2 x 2 x 1 token grid
    grid = (2, 2, 1)
    keep, mask = jax.jit(L.draw_token_mask, static_argnums=(1, 2, 3))(jax.random.key(3), 2, 4, 0.5)
    mask = np.asarray(mask)
    vmask = ref.voxel_mask(mask, grid, stride)
    np.testing.assert_array_equal(L.token_mask_to_voxels(jnp.asarray(mask), grid, stride), vmask)
    everything = jnp.broadcast_to(jnp.arange(4), (2, 4))
    first_block = enc.layers1.blocks[0]  # windows of 4^3 patches, unshifted

    def run(v, k):
        x0, x0m = enc.embed_patches(v), M.swin_masked_patches(enc, v, k, mask_token, stride)
        tokens = M.swin_encode_masked(enc, v, k, mask_token, stride)
        return {"x0": x0, "x0_masked": x0m, "x0_nothing_masked": M.swin_masked_patches(enc, v, everything, mask_token,
                                                                                         stride),
                "block0": first_block(x0), "block0_masked": first_block(x0m),
                "tokens": tokens, "recon": head(tokens.reshape(2, *grid, -1))}

    forward = jax.jit(run).lower(vol, keep).compile(FAST_COMPILE)  # one compile for every check
    out = {k: np.asarray(v) for k, v in forward(vol, keep).items()}
    # what the stages see (patch 1: one patch-embedding cell per voxel)
    x0, x0m = out["x0"], out["x0_masked"]
    np.testing.assert_array_equal(x0m[vmask], np.broadcast_to(np.asarray(mask_token), x0m[vmask].shape))
    np.testing.assert_array_equal(x0m[~vmask], x0[~vmask])
    np.testing.assert_array_equal(out["x0_nothing_masked"], x0)
    assert_close(out["block0_masked"][~vmask], out["block0"][~vmask], 1e-6, "kept cells after the first block")
    noisy = forward(vol + 100.0 * rng.normal(size=vol.shape).astype(np.float32) * vmask[..., None], keep)
    np.testing.assert_array_equal(noisy["tokens"], out["tokens"])  # the masked voxels never reach the encoder ...
    np.testing.assert_array_equal(noisy["recon"], out["recon"])  # ... nor the reconstruction
    moved = forward(vol + (~vmask)[..., None].astype(np.float32), keep)
    assert not np.allclose(moved["tokens"], out["tokens"], atol=1e-3), "the kept voxels are seen"

    target = (vol.astype(np.float64) - 0.5) / 2.0  # the encoder's standardised input (mean 0.5, std 2)
    loss, grad = _vgrad(L.mim_loss)(out["recon"], jnp.asarray(target, jnp.float32), jnp.asarray(vmask))
    r_loss, r_grad = ref.mim_loss(np.asarray(out["recon"], np.float64), target, vmask)
    assert_close(loss, r_loss, VALUE_RTOL, "Swin masked-voxel MSE")
    assert_close(grad, r_grad, GRAD_RTOL, "Swin masked-voxel MSE gradient")
    assert np.all(np.asarray(grad)[~vmask] == 0), "unmasked voxels must not be scored"


def _ssm_inputs(b=8, s=3, seed=6):
    rng = np.random.default_rng(seed)
    # 2-d input embeddings near a few directions: cosines across patients in all three bands
    base = rng.normal(size=(4, 2))
    e = base[rng.integers(0, 4, (b, s))] + 0.25 * rng.normal(size=(b, s, 2))
    v = rng.normal(size=(b, s, 5))
    valid = rng.random((b, s)) < 0.8
    valid[:, 0] = True
    valid[1] = False  # a patient without sentences: its pairs are left out
    e[~valid] = 0.0
    return e, v, valid


def test_ssm_thresholds_pairs_and_gradients_match_reference():
    e, v, valid = _ssm_inputs()
    g = np.array([ref.cos(e[k, s], e[l, t]) for k in range(8) for l in range(k + 1, 8) for s in range(3)
                  for t in range(3) if valid[k, s] and valid[l, t]])
    assert (g >= 0.9).any() and (g <= 0.6).any() and ((g > 0.6) & (g < 0.9)).any(), "all three bands covered"
    for groups in (1, 2):
        fn = lambda x: L.ssm_loss(jnp.float32(e), x, valid, pairs="device", groups=groups)
        loss, grad = _vgrad(fn)(jnp.float32(v))
        assert_close(loss, ref.ssm_loss(e, v, valid, groups=groups), VALUE_RTOL, f"L_SSM, {groups} groups")
        fd = finite_difference(lambda x: ref.ssm_loss(e, x, valid, groups=groups), v)
        assert_close(grad, fd, GRAD_RTOL, f"L_SSM gradient, {groups} groups")
    # the ignored band: moving G inside (0.6, 0.9) changes nothing; no gradient to the targets
    assert np.all(np.asarray(_grad(lambda x: L.ssm_loss(x, jnp.float32(v), valid))(jnp.float32(e))) == 0)


def test_global_batch_terms_sharded_over_8_devices_equal_one_device():
    """L_CML / L_DCL (chunked InfoNCE, tau 0.1) and L_SSM ('global' and 'device' pairs) with the
    batch split over 8 devices: the same values and gradients as on one device and as the
    float64 oracles ('device' pairs on 8 devices = 8 groups)."""
    assert len(jax.devices()) >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    e, v, valid = _ssm_inputs(b=16, seed=7)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(16, 6))
    y = rng.normal(size=(16, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)

    def terms(x, y, v):
        return (L.info_nce(x, y, chunked=True, batch_axes=("data",)),
                L.ssm_loss(jnp.float32(e), v, valid, pairs="global", batch_axes=("data",)),
                L.ssm_loss(jnp.float32(e), v, valid, pairs="device", batch_axes=("data",)))

    def total(x, y, v):
        a, b_, c = terms(x, y, v)
        return a + 2.0 * b_ + 3.0 * c, (a, b_, c)

    both = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))
    args = (jnp.float32(x), jnp.float32(y), jnp.float32(v))
    (_, single), single_grad = both.lower(*args).compile(FAST_COMPILE)(*args)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),  # as mesh_lib's
                         devices=jax.devices()[:8])
    with jax.set_mesh(mesh):
        sharded = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args]
        (_, multi), multi_grad = both.lower(*sharded).compile(FAST_COMPILE)(*sharded)
    r_nce = ref_clip(x[:, None], y, math.log(10.0), max_scale=None)[0]
    assert_close(single[0], r_nce, VALUE_RTOL, "InfoNCE tau 0.1, one device")
    assert_close(multi[0], r_nce, VALUE_RTOL, "InfoNCE tau 0.1, 8 devices")
    assert_close(single[1], ref.ssm_loss(e, v, valid), VALUE_RTOL, "L_SSM global, one device")
    assert_close(multi[1], ref.ssm_loss(e, v, valid), VALUE_RTOL, "L_SSM global, 8 devices")
    assert_close(single[2], ref.ssm_loss(e, v, valid), VALUE_RTOL, "L_SSM 'device' without a mesh = global")
    assert_close(multi[2], ref.ssm_loss(e, v, valid, groups=8), VALUE_RTOL, "L_SSM per device, 8 devices")
    # gradients: the 'device' term differs by design between the two layouts; compare the
    # layout-independent part (InfoNCE + global SSM) through x, y and the full total to the oracle
    assert_close(multi_grad[0], single_grad[0], GRAD_RTOL, "InfoNCE gradient, 8 devices vs 1")
    assert_close(multi_grad[1], single_grad[1], GRAD_RTOL, "InfoNCE gradient (other side), 8 devices vs 1")
    fd = finite_difference(lambda w: 2.0 * ref.ssm_loss(e, w, valid) + 3.0 * ref.ssm_loss(e, w, valid, groups=8), v)
    assert_close(multi_grad[2], fd, GRAD_RTOL, "L_SSM gradient on 8 devices")


@pytest.fixture(scope="module")
def tokenizer(bert_vocab):
    # the Hugging Face backend: the same ids as TensorFlow's (tests/test_tokenizer.py) without
    # importing TensorFlow for this file (seconds)
    return WordPieceTokenizer(bert_vocab, max_len=256, backend="tokenizers")


def test_sentence_and_word_indices_follow_split_sentences(tokenizer):
    indexer = sentences.SentenceIndexer.from_vocab(list(tokenizer.vocab))
    rng = np.random.default_rng(9)
    checked = 0
    for _ in range(12):
        labels = {n: int(rng.random() < 0.2) for n in CT_RATE_LABELS}
        details = {n: {"side": "left", "lobe": "upper", "device": "a pacemaker", "size_mm": int(rng.integers(3, 30))}
                   for n in CT_RATE_LABELS}
        report = reports.make_report(rng, labels, details)
        ids, mask = tokenizer.encode([report])
        if mask[0, -1]:
            continue  # cut at max_len: the last sentence is incomplete
        index = indexer(ids[0], mask[0])["sentence_index"]
        got = [tokenizer.decode(ids[0][index == k]) for k in range(index.max() + 1)]
        got = [g[:-2] if g.endswith(" ,") else g for g in got]  # split_sentences drops the comma
        parts = reports.split_sentences(report)
        expected = [tokenizer.decode(row) for row in tokenizer.encode(parts)[0]]
        assert got == expected[:32], (report, got, expected)
        checked += 1
    assert checked >= 6
    # numbers keep their marks, headers are not sentences, the cap, and whole words
    ids, mask = tokenizer.encode(["FINDINGS: A 3.5 mm nodule, 1,000 cells. IMPRESSION: Nodule."])
    out = indexer(ids[0], mask[0])
    words = [tokenizer.decode([t]) for t in ids[0][mask[0] > 0]]
    assert [tokenizer.decode(ids[0][out["sentence_index"] == k]) for k in range(3)] == [
        "a 3 . 5 mm nodule ,", "1 , 000 cells .", "nodule ."], words
    capped = sentences.SentenceIndexer.from_vocab(list(tokenizer.vocab), max_sentences=2)(ids[0], mask[0])
    assert capped["sentence_index"].max() == 1 and (capped["sentence_index"] == -1).sum() > (out["sentence_index"] == -1).sum()
    ids, mask = tokenizer.encode(["Bronchiectasis and lymphadenopathy."])
    toks = [tokenizer.vocab[t] for t in ids[0][mask[0] > 0]]
    word = indexer(ids[0], mask[0])["word_index"][mask[0] > 0]
    assert word[0] == -1 and word[-1] == -1  # [CLS], [SEP]
    for i, t in enumerate(toks[1:-1], start=1):
        assert (word[i] == word[i - 1]) == t.startswith("##"), (toks, word)


def test_upsampling_plan_follows_the_token_stride():
    assert M.upsample_plan((8, 8, 8)) == [(2, 2, 2)] * 3  # tiny / demo ViT: 3 blocks
    assert M.upsample_plan((16, 16, 8)) == [(2, 2, 2)] * 3 + [(2, 2, 1)]  # small: 4 blocks
    assert M.upsample_plan((32, 32, 32)) == [(2, 2, 2)] * 5  # MG-3D's Swin tokens: 5 blocks
    with pytest.raises(ValueError, match="power of 2"):
        M.upsample_plan((12, 12, 12))
    c = mg3d_config.get_config("base")
    assert (c.model.image.name, tuple(c.data.view_size), c.model.text.size) == ("swin3d", (128, 96, 128), "base")
    assert tasks.get_task(c).batch_spec()["sentence_index"].shape == (256, 128)


def test_tiny_mg3d_train_step_runs_and_the_loss_decreases():
    """The trainer's program for task 'mg3d' (init and step compiled once each, FAST_COMPILE):
    six steps on one batch lower the loss, and the frozen BERT stays."""
    c = mg3d_config.get_config("tiny")
    c.data.view_size = (4, 4, 4)  # patch 2: a 2^3 token grid, one upsampling block (a short compile)
    c.model.image.patch_size = (2, 2, 2)
    c.model.text.vocab_size = 128  # ids from ten words: the MLM term falls fast, not buried in ln(vocab)
    c.model.text.attention_dropout = 0.0  # as the base variant: fewer random-bit kernels to compile
    c.data.max_sentences = 4
    c.train.nonfinite_guard = "cond"  # the faster guard on XLA:CPU for tiny models (t3d_jax/train/step.py)
    c.preprocess.max_len = 12
    c.train.global_batch_size = 4
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.lr = 3e-3
    c.optim.flatten = "on"  # fewer optimizer kernels to compile
    c.mesh.shape = (1, 1)
    task = tasks.get_task(c)
    assert isinstance(task, tasks.TASKS["mg3d"])
    spec = task.batch_spec()
    assert set(spec) == {"views", "input_ids", "attention_mask", "sentence_index", "word_index"}
    rng = np.random.default_rng(10)
    batch = {"views": rng.normal(size=spec["views"].shape).astype(np.float32),
             "input_ids": rng.integers(110, 120, (4, 12)).astype(np.int32),
             "attention_mask": np.ones((4, 12), np.int32),
             "sentence_index": np.repeat(np.arange(3), 4)[None].repeat(4, 0).astype(np.int32),
             "word_index": (np.arange(12)[None] // 2).repeat(4, 0).astype(np.int32)}
    mesh = mesh_lib.make_mesh(c.mesh, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        program = step_lib.make_train_program(c, mesh)
        state = program.init.lower().compile(FAST_COMPILE)()
        frozen_before = jax.tree.map(np.asarray, state["params"]["text_encoder"])
        gbatch = step_lib.global_batch(batch, program.batch_shardings)
        step = program.step.lower(state, gbatch).compile(FAST_COMPILE)
        history = []
        for _ in range(6):
            state, out = step(state, gbatch)
            history.append({k: float(v) for k, v in out.items()})
    assert program.trace_count[0] == 1
    hash(program.graphdef)  # static argument of the evaluators' jitted embedding (t3d_jax/evaluate/embedding.py)
    assert all(h["skipped"] == 0 for h in history), history
    for term in ("loss_mim", "loss_mlm", "loss_cml", "loss_dcl", "loss_ssm"):
        assert all(np.isfinite(h[term]) for h in history), term
    first, last = history[0], history[-1]
    assert last["loss"] < 0.9 * first["loss"], [h["loss"] for h in history]
    # optim.freeze: the BERT did not move (MG-3D's frozen text tower); the heads did
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, state["params"]["text_encoder"]))


def test_training_pipeline_delivers_the_indices_of_the_delivered_tokens(tiny_prepared_dir):
    """data.sentences: every training example carries sentence_index / word_index, computed from
    the ids it delivers (after the sentence drop / shuffle), for the batch contract of `mg3d`."""
    from t3d_jax.data import pipeline

    c = mg3d_config.get_config("tiny")
    c.data.dir = str(tiny_prepared_dir)
    c.data.report_sentence_drop = 0.3
    c.data.report_shuffle = True
    batch = next(pipeline.train_iterator(c.data, global_batch_size=4, seed=0, worker_count=0))
    spec = tasks.get_task(c).batch_spec()
    for key in ("sentence_index", "word_index"):
        assert batch[key].dtype == np.int32 and batch[key].shape[1:] == (16,)
        assert spec[key].shape[1:] == (c.preprocess.max_len,)
    indexer = sentences.indexer_for_data(str(tiny_prepared_dir))
    for k in range(4):
        out = indexer(batch["input_ids"][k], batch["attention_mask"][k])
        np.testing.assert_array_equal(batch["sentence_index"][k], out["sentence_index"])
        np.testing.assert_array_equal(batch["word_index"][k], out["word_index"])
        assert (batch["sentence_index"][k][batch["attention_mask"][k] > 0] >= 0).sum() == 2  # the two words
