"""Text-informed Multi-view Alignment (TMA) loss: the project's reading of T3D (docs/method.md, "TMA").

Inputs are the TMA head's outputs for every view of every example: L2-normalised,
text-informed token embeddings ``u`` [B, V, N, D], optionally text-free ones ``u0`` (the
same head without the report, ``target_emb``) and the normalised prototypes ``C`` [K, D].

1. Scores ``s = u . C^T``; predictions ``p = softmax(s / temperature)``.
2. Targets ``q = SinkhornKnopp(exp(s0 / epsilon))``, ``s0 = u0 . C^T`` (``s`` when no
   ``target_emb`` is given), with equal prototype mass over *all*
   tokens of *all* views of the *global* batch, under ``stop_gradient``. The sums are plain
   ``jnp`` reductions over the global arrays: under ``jax.jit`` with the batch sharded, XLA
   turns them into cross-device all-reduces, so targets equal the single-device ones.
   Why text-free targets (the default of the t3d task, ``model.tma.targets='visual'``): both
   views of an example carry the same report, so targets from the text-informed scores can
   be met from the report alone, without looking at the image (measured, docs/method.md);
   targets from the image alone make the report a hint, never the answer.
   Computed in the log domain (same fixed point as SwAV's multiplicative form, but no
   under/overflow of ``exp(s / epsilon)`` for small epsilon).
3. Token matching from the crop boxes: token n of view v sits at full-grid cell g, whose
   centre in volume fractions is ``c = lo_v + (g + 0.5) / G * (hi_v - lo_v)``. If c is inside
   w's box (``lo_w <= c < hi_w`` on every axis) it is matched to w's cell
   ``floor((c - lo_w) / (hi_w - lo_w) * G)``; the match counts only if that cell's token was
   kept by patch dropout in view w (a scatter of kept positions into the full grid).
4. Swapped prediction over all ordered view pairs (v, w), v != w (hence both directions):
   ``L_tok = -1/|matches| sum_{matches (v,n)->(w,m)} sum_k q_v[n,k] log p_w[m,k]``.
5. Optional histogram term: ``L_hist = mean_{b, v != w} KL(mean_n q_v || mean_n p_w)``.
   ``L_tma = L_tok + hist_weight * L_hist``; the t3d task (t3d_jax/tasks/t3d.py) adds ``weight * L_tma`` to the CLIP loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy


class TMAOutput(NamedTuple):
    loss: jax.Array  # L_tok + hist_weight * L_hist
    token_loss: jax.Array
    hist_loss: jax.Array
    matched_fraction: jax.Array  # matched (v, n, w) triples / all (v, n, w != v) triples
    # Collapse monitors (no gradient): mean entropy of a token's target (ln K = no decision,
    # 0 = one-hot), and the perplexity of the mean prediction over all tokens (how many
    # prototypes are in use: K = all evenly, 1 = collapsed onto one).
    target_entropy: jax.Array
    prototype_perplexity: jax.Array


def sinkhorn_log_targets(scores: jax.Array, epsilon: float, iters: int) -> jax.Array:
    """log q for scores [..., K]; every leading axis together is the global token set.

    Each iteration gives every prototype mass 1/K and then every token mass 1/M; the result
    is scaled by M so each token's target distribution sums to exactly 1 and each prototype
    receives about M/K tokens' worth of mass.
    """
    if iters < 1:
        raise ValueError(f"model.tma.sinkhorn_iters must be >= 1, got {iters}")
    scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
    num_prototypes = scores.shape[-1]
    num_tokens = scores.size // num_prototypes
    token_axes = tuple(range(scores.ndim - 1))
    log_q = scores / epsilon
    for _ in range(iters):
        log_q = log_q - jax.nn.logsumexp(log_q, axis=token_axes, keepdims=True)
        log_q = log_q - jnp.log(num_prototypes)
        log_q = log_q - jax.nn.logsumexp(log_q, axis=-1, keepdims=True)
        log_q = log_q - jnp.log(num_tokens)
    return jax.lax.stop_gradient(log_q + jnp.log(num_tokens))


def sinkhorn_targets(scores: jax.Array, epsilon: float, iters: int) -> jax.Array:
    """Sinkhorn-Knopp targets q (rows sum to 1), stop-gradient."""
    return jnp.exp(sinkhorn_log_targets(scores, epsilon, iters))


def full_token_index(batch: int, views: int, grid: Sequence[int]) -> jax.Array:
    """token_index when no patch dropout: every view keeps all cells in row-major order."""
    cells = math.prod(grid)
    return jnp.broadcast_to(jnp.arange(cells, dtype=jnp.int32), (batch, views, cells))


def match_tokens(token_index: jax.Array, boxes: jax.Array,
                 grid: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Matches every kept token of view v to a kept token of every other view w.

    token_index: int [B, V, N], each kept token's row-major index in the full (Gx, Gy, Gz) grid.
    boxes: float [B, V, 2, 3], (lo, hi) of each crop in fractions of the volume extent.
    Returns (slot [B, V, W, N] int32: position n' in w's kept tokens, valid [B, V, W, N] bool).
    """
    batch, views, num_kept = token_index.shape
    if boxes.shape != (batch, views, 2, 3):
        raise ValueError(f"TMA: boxes must be [B,V,2,3] = {(batch, views, 2, 3)}, got {boxes.shape}")
    grid_arr = jnp.asarray(grid, jnp.float32)
    num_cells = math.prod(grid)
    token_index = token_index.astype(jnp.int32)
    cell = jnp.stack(jnp.unravel_index(token_index, tuple(grid)), axis=-1)  # [B,V,N,3]
    lo = boxes[:, :, 0].astype(jnp.float32)  # [B,V,3]
    hi = boxes[:, :, 1].astype(jnp.float32)
    centre = lo[:, :, None] + (cell.astype(jnp.float32) + 0.5) / grid_arr * (hi - lo)[:, :, None]
    lo_w = lo[:, None, :, None, :]  # [B,1,W,1,3]
    size_w = (hi - lo)[:, None, :, None, :]
    hi_w = hi[:, None, :, None, :]
    centre = centre[:, :, None]  # [B,V,1,N,3]
    inside = jnp.all((centre >= lo_w) & (centre < hi_w), axis=-1)  # [B,V,W,N]
    target = jnp.floor((centre - lo_w) / size_w * grid_arr).astype(jnp.int32)
    target = jnp.clip(target, 0, jnp.asarray(grid, jnp.int32) - 1)
    target_flat = jnp.ravel_multi_index(tuple(jnp.moveaxis(target, -1, 0)), tuple(grid),
                                        mode="clip")  # [B,V,W,N]

    # Full-grid map of each view's kept tokens: slot n' at its cell, -1 where dropped.
    def scatter_one(index):
        return jnp.full((num_cells,), -1, jnp.int32).at[index].set(
            jnp.arange(num_kept, dtype=jnp.int32))

    kept_slot = jax.vmap(jax.vmap(scatter_one))(token_index)  # [B,W,cells]
    slot = jax.vmap(jax.vmap(jax.vmap(lambda table, idx: table[idx], in_axes=(0, 0)),
                             in_axes=(None, 0)))(kept_slot, target_flat)  # [B,V,W,N]
    not_self = ~jnp.eye(views, dtype=bool)[None, :, :, None]
    valid = inside & (slot >= 0) & not_self
    return jnp.maximum(slot, 0), valid


def swapped_prediction_loss(q: jax.Array, log_p: jax.Array, slot: jax.Array,
                            valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """L_tok = -mean over matches of sum_k q_v[n,k] log p_w[slot,k]; returns (loss, count)."""
    # log_p[b, w, slot[b, v, w, n]] for every (b, v, w, n).
    gathered = jax.vmap(jax.vmap(jax.vmap(lambda lp, idx: lp[idx], in_axes=(0, 0)),
                                 in_axes=(None, 0)))(log_p, slot)  # [B,V,W,N,K]
    cross = jnp.sum(q[:, :, None] * gathered, axis=-1)  # [B,V,W,N]
    count = jnp.sum(valid.astype(jnp.float32))
    loss = -jnp.sum(jnp.where(valid, cross, 0.0)) / jnp.maximum(count, 1.0)
    return loss, count


def histogram_loss(q: jax.Array, log_p: jax.Array) -> jax.Array:
    """mean over examples and ordered view pairs v != w of KL(mean_n q_v || mean_n p_w)."""
    views = q.shape[1]
    if views < 2:
        return jnp.zeros((), jnp.float32)
    q_bar = jnp.mean(q, axis=2)  # [B,V,K]
    p_bar = jnp.mean(jnp.exp(log_p), axis=2)  # [B,W,K]
    neg_entropy = jnp.sum(xlogy(q_bar, q_bar), axis=-1)  # [B,V]
    cross = jnp.einsum("bvk,bwk->bvw", q_bar, jnp.log(p_bar))
    kl = neg_entropy[:, :, None] - cross
    not_self = ~jnp.eye(views, dtype=bool)[None]
    return jnp.sum(jnp.where(not_self, kl, 0.0)) / (q.shape[0] * views * (views - 1))


def tma_loss(token_emb: jax.Array, prototypes: jax.Array, boxes: jax.Array,
             grid: Sequence[int], token_index: jax.Array | None = None, *,
             temperature: float = 0.1, sinkhorn_epsilon: float = 0.05, sinkhorn_iters: int = 3,
             hist_weight: float = 0.0, target_emb: jax.Array | None = None) -> TMAOutput:
    """TMA loss on token embeddings [B,V,N,D] and normalised prototypes [K,D] (module docstring).

    token_index: [B,V,N] full-grid index of each kept token (None = all cells kept in order).
    target_emb: [B,V,N,D] embeddings the Sinkhorn targets are computed from (None = token_emb).
    """
    batch, views, num_kept, _ = token_emb.shape
    if token_index is None:
        token_index = full_token_index(batch, views, grid)
    if token_index.shape != (batch, views, num_kept):
        raise ValueError(f"TMA: token_index must be [B,V,N] = {(batch, views, num_kept)}, "
                         f"got {token_index.shape}")
    scores = jnp.einsum("bvnd,kd->bvnk", token_emb.astype(jnp.float32),
                        prototypes.astype(jnp.float32))
    log_p = jax.nn.log_softmax(scores / temperature, axis=-1)
    if target_emb is not None:
        if target_emb.shape != token_emb.shape:
            raise ValueError(f"TMA: target_emb must be shaped like token_emb {token_emb.shape}, "
                             f"got {target_emb.shape}")
        target_scores = jnp.einsum("bvnd,kd->bvnk", target_emb.astype(jnp.float32),
                                   prototypes.astype(jnp.float32))
    else:
        target_scores = scores
    q = sinkhorn_targets(target_scores, sinkhorn_epsilon, sinkhorn_iters)
    slot, valid = match_tokens(token_index, boxes, grid)
    token_loss, count = swapped_prediction_loss(q, log_p, slot, valid)
    hist = histogram_loss(q, log_p) if hist_weight else jnp.zeros((), jnp.float32)
    possible = batch * views * max(views - 1, 1) * num_kept
    mean_p = jnp.mean(jnp.exp(log_p).reshape(-1, log_p.shape[-1]), axis=0)
    monitors = jax.lax.stop_gradient((
        -jnp.mean(jnp.sum(q * jnp.log(jnp.maximum(q, 1e-30)), axis=-1)),
        jnp.exp(-jnp.sum(mean_p * jnp.log(jnp.maximum(mean_p, 1e-30))))))
    return TMAOutput(loss=token_loss + hist_weight * hist, token_loss=token_loss, hist_loss=hist,
                     matched_fraction=count / possible, target_entropy=monitors[0],
                     prototype_perplexity=monitors[1])
