"""Dice + cross-entropy of per-voxel class logits against a label map (MONAI's ``DiceCELoss``).

Logits ``[N, X, Y, Z, K]`` (channel-last), labels ``[N, X, Y, Z]`` integer classes 0..K-1;
softmax over the K classes, labels one-hot. With ``p`` the probabilities and ``g`` the one-hot
labels, per example ``n`` (or over the whole batch with ``batch=True``) and class ``k``:

    dice[n, k] = 1 - (2 * sum_v p g + smooth_nr) / (sum_v p + sum_v g + smooth_dr)
    loss = lambda_dice * mean_{n, k} dice[n, k] + lambda_ce * mean_{n, v} CE(logits[n, v], label[n, v])

which is ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, include_background=...,
smooth_nr=1e-5, smooth_dr=1e-5, batch=..., lambda_dice=..., lambda_ce=...)``: the mean over k
leaves class 0 out with ``include_background=False``; the cross-entropy always covers every
class (as MONAI's, which ignores ``include_background``). An optional ``weight`` [N] (0/1) drops
whole examples (e.g. batch padding) from both terms. Computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dice_ce_loss(logits: jax.Array, labels: jax.Array, *, include_background: bool = True,
                 lambda_dice: float = 1.0, lambda_ce: float = 1.0, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, batch: bool = False, weight: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, {"loss_dice", "loss_ce"}) of ``logits`` [N, ..., K] against ``labels`` [N, ...]."""
    z = jnp.asarray(logits, jnp.float32)
    k = z.shape[-1]
    if labels.shape != z.shape[:-1]:
        raise ValueError(f"labels {labels.shape} must be the logits' {z.shape} without the class axis")
    n = z.shape[0]
    w = jnp.ones((n,), jnp.float32) if weight is None else jnp.asarray(weight, jnp.float32)
    axes = tuple(range(1, z.ndim - 1))
    logp = jax.nn.log_softmax(z, axis=-1)
    p = jnp.exp(logp)
    g = jax.nn.one_hot(labels, k, dtype=jnp.float32)
    wv = w.reshape((n,) + (1,) * (z.ndim - 1))
    inter = jnp.sum(p * g, axis=axes)  # [N, K]
    denom = jnp.sum(p, axis=axes) + jnp.sum(g, axis=axes)
    if batch:
        inter = jnp.sum(inter * w[:, None], axis=0, keepdims=True)
        denom = jnp.sum(denom * w[:, None], axis=0, keepdims=True)
        row_w = jnp.ones((1,), jnp.float32)
    else:
        row_w = w
    dice = 1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr)
    if not include_background:
        dice = dice[:, 1:]
    loss_dice = jnp.sum(dice * row_w[:, None]) / jnp.maximum(jnp.sum(row_w) * dice.shape[1], 1.0)
    ce = -jnp.sum(logp * g * wv, axis=-1)  # [N, ...]
    voxels = float(ce[0].size)
    loss_ce = jnp.sum(ce) / jnp.maximum(jnp.sum(w) * voxels, 1.0)
    loss = lambda_dice * loss_dice + lambda_ce * loss_ce
    return loss, {"loss_dice": loss_dice, "loss_ce": loss_ce}
