"""Batched decoding (greedy, beam search, top-p sampling) of the report decoder.

One small model (vocabulary 5 with EOS among it, weights drawn wide so the distributions are
peaked and sequences end at varied lengths); every decode is one compile, reused across tests.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from t3d_jax.models import decoding
from t3d_jax.models.decoding import DecodeConfig
from t3d_jax.models.report_decoder import ReportDecoder, ReportDecoderConfig

VOCAB, VISUAL, TOKENS, BATCH, STEPS = 5, 20, 6, 8, 8
BOS, EOS, PAD = 0, 1, 2
# Scores are sums of float32 log-probs over <= 8 steps: cached vs recomputed logits differ by
# summation order (~1e-6 each); 1e-4 is far below the gaps between the hypotheses compared.
SCORE_ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    cfg = ReportDecoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=16,
                              visual_width=VISUAL, hidden_dropout=0.0, attention_dropout=0.0,
                              initializer_range=0.5)
    return ReportDecoder(cfg, rngs=nnx.Rngs(2))  # a seed whose greedy reports end at varied lengths


@pytest.fixture(scope="module")
def visual():
    return jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, TOKENS, VISUAL)).astype(np.float32))


def _cfg(**kw):
    return DecodeConfig(**{"max_new_tokens": STEPS, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD, **kw})


_results: dict = {}
_log_softmax_forward = nnx.jit(lambda m, ids, v: jax.nn.log_softmax(m(ids, v), axis=-1))
ROWS = VOCAB ** 3  # every sequence of 3 tokens (the exhaustive test); the greedy check pads to it


def _full_logp(model, ids, visual_rows):
    """float64 log-probs [n, L, V] of the full (uncached) forward. Inputs are padded to one
    shape [ROWS, 1 + STEPS] (extra rows repeat row 0; extra positions come after, so causal
    attention keeps them out of the real ones): one compile for every caller."""
    n, length = ids.shape
    ids = np.pad(ids, ((0, ROWS - n), (0, 1 + STEPS - length)), constant_values=PAD)
    rows = jnp.concatenate([visual_rows, jnp.repeat(visual_rows[:1], ROWS - n, axis=0)])
    return np.asarray(_log_softmax_forward(model, jnp.asarray(ids), rows), np.float64)[:n, :length]


def _run(model, visual, key, **kw):
    """Decodes once per (config, batch id) for the whole module."""
    if key not in _results:
        rng = kw.pop("rng", None)
        out = decoding.generate(model, visual, config=_cfg(**kw), rng=rng)
        _results[key] = jax.tree.map(np.asarray, out)
    return _results[key]


def _check_well_formed(out):
    tokens, lengths = out["tokens"], out["lengths"]
    for row, n in zip(tokens, lengths):
        assert 1 <= n <= STEPS
        if n < STEPS or row[n - 1] == EOS:
            assert row[n - 1] == EOS and EOS not in row[:n - 1] and (row[n:] == PAD).all()


def test_greedy_is_argmax_of_full_forward(model, visual):
    """Greedy with the cache = argmax, step by step, of the full (uncached) forward; varied lengths."""
    out = _run(model, visual, "greedy", method="greedy")
    _check_well_formed(out)
    assert len(set(out["lengths"].tolist())) > 1  # some stop early, the loop runs on for the others
    ids = np.concatenate([np.full((BATCH, 1), BOS), out["tokens"]], axis=1)
    logp = _full_logp(model, ids, visual)
    for b in range(BATCH):
        n = out["lengths"][b]
        np.testing.assert_array_equal(out["tokens"][b, :n], logp[b, :n].argmax(-1))
        want = logp[b, np.arange(n), out["tokens"][b, :n]].sum()
        np.testing.assert_allclose(out["scores"][b], want, atol=SCORE_ATOL)


def test_beam_cache_equals_recompute(model, visual):
    cached = _run(model, visual, "beam", method="beam", num_beams=3, length_penalty=1.0)
    full = _run(model, visual, "beam_nocache", method="beam", num_beams=3, length_penalty=1.0, use_cache=False)
    np.testing.assert_array_equal(cached["beams"], full["beams"])
    np.testing.assert_allclose(cached["beam_scores"], full["beam_scores"], atol=SCORE_ATOL)
    _check_well_formed(cached)
    greedy = _run(model, visual, "greedy", method="greedy")
    assert (cached["scores"] >= greedy["scores"] / np.maximum(greedy["lengths"], 1) - SCORE_ATOL).all()


def test_beam_width_one_is_greedy(model, visual):
    """The beam code path with k=1 and no length penalty picks greedy's tokens."""
    beam = _run(model, visual, "beam1", method="beam", num_beams=1, length_penalty=0.0)
    greedy = _run(model, visual, "greedy", method="greedy")
    np.testing.assert_array_equal(beam["tokens"], greedy["tokens"])
    np.testing.assert_array_equal(beam["lengths"], greedy["lengths"])
    np.testing.assert_allclose(beam["scores"], greedy["scores"], atol=SCORE_ATOL)


def test_output_does_not_depend_on_the_batch(model, visual):
    """Row 0 moved to row 5 of a batch of other images (which stop at other steps): same output."""
    other = jnp.asarray(np.random.default_rng(1).normal(size=visual.shape).astype(np.float32))
    other = other.at[5].set(visual[0])
    keys = jax.random.split(jax.random.key(3), BATCH)
    keys_other = jax.random.split(jax.random.key(4), BATCH).at[5].set(keys[0])
    for key, kw in (("greedy", dict(method="greedy")),
                    ("beam", dict(method="beam", num_beams=3, length_penalty=1.0)),
                    ("sample", dict(method="sample", top_p=0.9))):
        a = _run(model, visual, key, **kw, **({"rng": keys} if key == "sample" else {}))
        b = _run(model, other, key + "_other", **kw, **({"rng": keys_other} if key == "sample" else {}))
        np.testing.assert_array_equal(a["tokens"][0], b["tokens"][5], err_msg=key)
        np.testing.assert_allclose(a["scores"][0], b["scores"][5], atol=SCORE_ATOL, err_msg=key)
    sample = _run(model, visual, "sample", method="sample", top_p=0.9, rng=keys)
    _check_well_formed(sample)
    greedy = _run(model, visual, "greedy", method="greedy")
    assert (sample["tokens"] != greedy["tokens"]).any()  # it does sample


def test_top_p_filter_against_numpy():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, 9)) * 2).astype(np.float32)
    filtered = jax.jit(lambda x: [decoding.top_p_logits(x, p) for p in (0.3, 0.75, 0.95)])(jnp.asarray(logits))
    for top_p, got in zip((0.3, 0.75, 0.95), filtered):
        for row, kept in zip(logits, np.asarray(got) > decoding.NEG_INF / 2):
            p = np.exp(row - row.max())
            p /= p.sum()
            order = np.argsort(-p)
            n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)  # smallest prefix reaching top_p
            want = np.zeros_like(kept)
            want[order[:n]] = True
            np.testing.assert_array_equal(kept, want)


def test_beam_search_is_exhaustive_when_wide(model, visual):
    """With k >= V^(T-1) beam search keeps every hypothesis: its k best are the k best of all
    sequences (EOS-ended at length 1..T, or T tokens), scored in float64 from full forwards."""
    steps, k, alpha = 3, VOCAB ** 2, 1.0
    out = decoding.generate(model, visual[:2], config=_cfg(method="beam", num_beams=k, length_penalty=alpha,
                                                           max_new_tokens=steps))
    seqs = np.array(list(itertools.product(range(VOCAB), repeat=steps)))
    ids = np.concatenate([np.full((len(seqs), 1), BOS), seqs], axis=1)
    assert len(seqs) == ROWS
    for b in range(2):
        logp = _full_logp(model, ids, jnp.repeat(visual[b:b + 1], ROWS, 0))
        hyps = {}
        for s, lp in zip(seqs, logp):
            n = next((i + 1 for i, t in enumerate(s) if t == EOS), steps)
            hyps[tuple(s[:n])] = lp[np.arange(n), s[:n]].sum() / n ** alpha
        ranked = sorted(hyps.items(), key=lambda kv: -kv[1])[:k]
        np.testing.assert_allclose(np.asarray(out["beam_scores"][b]), [s for _, s in ranked], atol=SCORE_ATOL)
        best = list(ranked[0][0]) + [PAD] * (steps - len(ranked[0][0]))
        np.testing.assert_array_equal(np.asarray(out["tokens"][b]), best)


def test_decode_sharded_over_devices(model, visual):
    """The decode function under jit with the batch split over the 8 devices: same tokens."""
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as train/mesh.py
    graphdef, state = nnx.split(model)
    fn = jax.jit(decoding.make_decode_fn(graphdef, _cfg(method="greedy")),
                 in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
                 out_shardings=NamedSharding(mesh, P("data")))
    out = fn(state, jax.device_put(visual, NamedSharding(mesh, P("data"))))
    assert len(out["tokens"].sharding.device_set) == 8
    greedy = _run(model, visual, "greedy", method="greedy")
    np.testing.assert_array_equal(np.asarray(out["tokens"]), greedy["tokens"])
    np.testing.assert_allclose(np.asarray(out["scores"]), greedy["scores"], atol=SCORE_ATOL)


def test_bad_config():
    with pytest.raises(ValueError, match="decoding method"):
        DecodeConfig(method="nucleus")
    with pytest.raises(ValueError, match="top_p"):
        DecodeConfig(top_p=0.0)
