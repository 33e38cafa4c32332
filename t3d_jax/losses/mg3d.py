"""MG-3D's five loss terms as pure functions of what the model produces (the `mg3d` task).

* ``mim_loss``: mean squared error over the masked voxels only (the voxels of masked patch
  tokens). The released code zeroes the unmasked voxels, takes the mean over *all* voxels and
  divides by the mask ratio: the same number when exactly that fraction is masked; here the
  exact masked mean.
* ``whole_word_mask`` + ``masked_positions`` + ``mlm_loss`` + ``sentence_cosine_term``:
  L_senMLM. Each word (a token and its '##' continuations, `t3d_jax.data.sentences`) is chosen
  with probability ``prob`` (0.15), but never more than ``max_predictions`` (K) tokens per
  report (`choose_words`: the chosen words in a random order, up to the first that would pass
  K). A chosen word's tokens become [MASK] (80%), a random token (10%) or stay (10%), BERT's
  recipe per token. The MLM head then runs at the K positions of ``masked_positions`` only
  (BERT's ``max_predictions_per_seq``), not at all L: the vocabulary logits are most of a
  step's FLOPs otherwise, and since the cap is applied when choosing, every chosen token is
  among the K (none is silently dropped from the loss). Cross-entropy on the chosen tokens,
  mean over them in the global batch; plus ``weight * mean(1 - cos)`` over the valid
  sentences of the global batch.
* ``info_nce``: symmetric InfoNCE at the fixed temperature 0.1 (L_CML, L_DCL): the project's
  global-batch `contrastive.clip_loss` with a fixed log-scale log(10) (negatives from the whole
  global batch; ``chunked`` never holds B x B on one device).
* ``ssm_loss``: L_SSM (see its docstring), pairs over the global batch or per device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from t3d_jax.losses import contrastive

SSM_PAIRS = ("global", "device")


# ------------------------------------------------------------------------------------ MIM
def draw_token_mask(key: jax.Array, batch: int, num_tokens: int, ratio: float):
    """A random ``round(ratio * N)`` of every example's N tokens is masked: returns (keep_index
    [B, K] sorted int32, mask [B, N] bool, True = masked). At least one token is kept and one masked."""
    n_mask = min(max(int(round(ratio * num_tokens)), 1), num_tokens - 1)
    order = jnp.argsort(jax.random.uniform(key, (batch, num_tokens)), axis=1)
    keep_index = jnp.sort(order[:, n_mask:], axis=1).astype(jnp.int32)
    mask = jnp.ones((batch, num_tokens), bool).at[jnp.arange(batch)[:, None], keep_index].set(False)
    return keep_index, mask


def token_mask_to_voxels(mask: jax.Array, grid, patch) -> jax.Array:
    """[B, gx*gy*gz] token mask (row-major grid order) -> [B, X, Y, Z] voxel mask."""
    b = mask.shape[0]
    m = mask.reshape(b, *grid)
    for axis, p in enumerate(patch):
        m = jnp.repeat(m, int(p), axis=axis + 1)
    return m


def mim_loss(pred: jax.Array, target: jax.Array, voxel_mask: jax.Array) -> jax.Array:
    """Mean of (pred - target)^2 over the masked voxels (and channels): [B, X, Y, Z, C] each,
    ``voxel_mask`` [B, X, Y, Z] bool."""
    w = jnp.asarray(voxel_mask, jnp.float32)[..., None]
    sq = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.sum(sq * w) / jnp.maximum(jnp.sum(w) * pred.shape[-1], 1.0)


# ------------------------------------------------------------------------------------ MLM
def choose_words(draws: jax.Array, word_index: jax.Array, prob: float, max_tokens: int | None = None) -> jax.Array:
    """chosen [B, L] bool: the tokens of the chosen words. Word number w of an example is chosen
    when ``draws[:, w] < prob`` (``draws`` [B, L] uniform, one per word number; ``word_index``
    [B, L], -1 = never). With ``max_tokens`` K, an example's chosen words are taken in the order
    of their draws (a uniformly random order) up to the first whose tokens would bring the
    total past K; it and the rest are left unmasked, so at most K tokens are chosen."""
    valid = word_index >= 0
    word = jnp.maximum(word_index, 0)
    pick = draws < prob
    if max_tokens is not None:
        b, length = word_index.shape
        sizes = jnp.sum((word[..., None] == jnp.arange(length)) & valid[..., None], axis=1)  # [B, W] tokens
        order = jnp.argsort(jnp.where(pick, draws, 2.0), axis=1)  # picked words first, by draw
        total = jnp.cumsum(jnp.take_along_axis(jnp.where(pick, sizes, 0), order, axis=1), axis=1)
        fits = jnp.zeros_like(pick).at[jnp.arange(b)[:, None], order].set(total <= max_tokens)
        pick = pick & fits
    return valid & jnp.take_along_axis(pick, word, axis=1)


def whole_word_mask(key: jax.Array, input_ids: jax.Array, word_index: jax.Array, *, prob: float,
                    mask_id: int, vocab_size: int, max_predictions: int | None = None,
                    replace_mask: float = 0.8, replace_random: float = 0.1):
    """(masked ids [B, L], chosen [B, L] bool): whole words chosen with probability ``prob``, at
    most ``max_predictions`` tokens per example (`choose_words`), then BERT's 80/10/10 per
    chosen token (module docstring)."""
    k_word, k_how, k_tok = jax.random.split(key, 3)
    b, length = input_ids.shape
    draws = jax.random.uniform(k_word, (b, length))  # one draw per word number (< L words)
    chosen = choose_words(draws, word_index, prob, max_predictions)
    how = jax.random.uniform(k_how, (b, length))
    random_ids = jax.random.randint(k_tok, (b, length), 0, vocab_size, dtype=input_ids.dtype)
    ids = jnp.where(chosen & (how < replace_mask), jnp.asarray(mask_id, input_ids.dtype), input_ids)
    ids = jnp.where(chosen & (how >= replace_mask) & (how < replace_mask + replace_random), random_ids, ids)
    return ids, chosen


def masked_positions(chosen: jax.Array, k: int):
    """(positions [B, K] int32, weights [B, K] bool): the positions of the chosen tokens in
    order, then padding (position 0, weight False). ``chosen`` must have at most K per row
    (`choose_words` with ``max_tokens`` <= K); more would be cut, so the task caps first."""
    length = chosen.shape[1]
    rank = jnp.where(chosen, 0, length) + jnp.arange(length)  # chosen first, in token order
    order = jnp.argsort(rank, axis=1)[:, :k].astype(jnp.int32)
    weights = jnp.take_along_axis(chosen, order, axis=1)
    return jnp.where(weights, order, 0), weights


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, L, ...] at ``positions`` [B, K] -> [B, K, ...]."""
    idx = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def mlm_loss(logits: jax.Array, targets: jax.Array, chosen: jax.Array) -> jax.Array:
    """Cross-entropy of ``logits`` [B, K, V] against ``targets`` [B, K] where ``chosen`` [B, K]
    (the K = `masked_positions`, or all L), mean over them (0 when none is chosen)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = jnp.asarray(chosen, jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def _normalize(x, eps=1e-6):
    """x / max(||x||, eps), float32, with a finite gradient at x = 0 (padding sentences are zero)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def sentence_cosine_term(pred: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
    """mean over valid sentences of 1 - cos(pred_s, target_s); [B, S, d] each, valid [B, S]."""
    cos = jnp.sum(_normalize(pred) * _normalize(target), axis=-1)
    w = jnp.asarray(valid, jnp.float32)
    return jnp.sum((1.0 - cos) * w) / jnp.maximum(jnp.sum(w), 1.0)


# ------------------------------------------------------------------------------------ CML / DCL
def info_nce(x: jax.Array, y: jax.Array, *, temperature: float = 0.1, chunked: bool = False,
             batch_axes: Sequence[str] = contrastive.DEFAULT_BATCH_AXES) -> jax.Array:
    """Symmetric InfoNCE of L2-normalised ``x``, ``y`` [B, D] with logits cos / temperature,
    negatives from the global batch."""
    return contrastive.clip_loss(x, y, jnp.float32(math.log(1.0 / temperature)), max_scale=None,
                                 chunked=chunked, batch_axes=batch_axes)


# ------------------------------------------------------------------------------------ SSM
def _groups(batch: int, pairs: str, batch_axes: Sequence[str]) -> int:
    if pairs not in SSM_PAIRS:
        raise ValueError(f"model.mg3d.ssm_pairs={pairs!r}: choose one of {SSM_PAIRS}")
    if pairs == "global":
        return 1
    axes = contrastive._active_batch_axes(batch_axes, batch)  # noqa: SLF001 (one definition of the shards)
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


def ssm_loss(input_sentences: jax.Array, visual_sentences: jax.Array, valid: jax.Array, *,
             pairs: str = "global", high: float = 0.9, low: float = 0.6, groups: int | None = None,
             batch_axes: Sequence[str] = contrastive.DEFAULT_BATCH_AXES) -> jax.Array:
    """L_SSM, inter-patient sentence similarity.

    For patients k < l: G[s, t] = cos(input_sentences[k, s], input_sentences[l, t]) (mean frozen
    input embeddings; no gradient), P[s, t] = cos(visual_sentences[k, s], visual_sentences[l, t])
    (the 128-d sentence-wise visual features). Entry loss |P - G| where G >= ``high``, |P| where
    G <= ``low``, 0 in between; a pair's loss is the sum over its valid (s, t) divided by
    n_k * n_l (ignored entries count in the denominator, as in the released code's L1 mean),
    and the loss is the mean over pairs with sentences on both sides (0 without any).

    ``pairs``: 'global' pairs every two patients of the global batch; 'device' only patients
    of the same batch shard (``groups`` contiguous shards; default: the data-parallel shards of
    ``batch_axes`` on the current mesh), the released code's per-GPU pairing.
    """
    b = input_sentences.shape[0]
    groups = _groups(b, pairs, batch_axes) if groups is None else int(groups)
    if b % groups:
        raise ValueError(f"ssm_loss: batch {b} is not divisible into {groups} shards")
    e = jax.lax.stop_gradient(_normalize(input_sentences))
    v = _normalize(visual_sentences)
    m = jnp.asarray(valid, jnp.float32)
    g = jnp.einsum("ksd,ltd->klst", e, e)
    p = jnp.einsum("ksd,ltd->klst", v, v)
    pair_valid = m[:, None, :, None] * m[None, :, None, :]  # [B, B, S, S]
    sim, dis = (g >= high).astype(jnp.float32), (g <= low).astype(jnp.float32)
    entry = jnp.abs(p * (sim + dis) - g * sim) * pair_valid
    n = jnp.sum(m, axis=1)
    denom = n[:, None] * n[None, :]
    shard = jnp.arange(b) // (b // groups)
    use = (jnp.arange(b)[:, None] < jnp.arange(b)[None, :]) & (shard[:, None] == shard[None, :]) & (denom > 0)
    per_pair = jnp.sum(entry, axis=(2, 3)) / jnp.maximum(denom, 1.0)
    use = use.astype(jnp.float32)
    return jnp.sum(per_pair * use) / jnp.maximum(jnp.sum(use), 1.0)
