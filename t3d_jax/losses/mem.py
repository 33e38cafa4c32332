"""Masked embedding modelling (MEM): the pre-training objective of MS-VLM's Z-former.

Each *valid* slice token is zero-filled with probability ``rate`` (0.3, as the MS-VLM abstract
states) before the inter-slice transformer; a small prediction head on the transformer's
output at that position must give back the original token. The loss is L1 on the masked
valid positions only:

    loss = sum_{b, t: masked[b, t]} sum_d |pred[b, t, d] - target[b, t, d]| / (n_masked * D)

i.e. the mean absolute error over the masked tokens' features (0 when nothing is masked).
The target is the slice encoder's token under ``stop_gradient``: with a trainable slice
encoder a target that receives gradients could drift towards whatever is easiest to predict
(the paper freezes the slice encoder, where the two are the same).

Pure functions on arrays (this package sits below the models): the model supplies the
prediction, ``MSVLM.mem_predict`` (t3d_jax/models/msvlm.py); :func:`mem_objective` wires a
prediction function, the mask and the loss together.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

MASK_RATE = 0.3


def mem_mask(key: jax.Array, valid: jax.Array, rate: float = MASK_RATE) -> jax.Array:
    """bool [B, L]: each valid position independently with probability ``rate``; padding never."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"MEM mask rate must be in [0, 1], got {rate}")
    valid = jnp.asarray(valid, bool)
    return jnp.logical_and(jax.random.bernoulli(key, rate, valid.shape), valid)


def zero_fill(tokens: jax.Array, masked: jax.Array) -> jax.Array:
    """``tokens`` [B, L, D] with the masked positions set to 0 (what the Z-former sees)."""
    return jnp.where(jnp.asarray(masked, bool)[..., None], jnp.zeros((), tokens.dtype), tokens)


def mem_l1(pred: jax.Array, target: jax.Array, masked: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(loss, number of masked tokens): mean |pred - target| over the masked positions' features,
    float32. The target is not differentiated (``stop_gradient``)."""
    if pred.shape != target.shape or pred.shape[:2] != masked.shape:
        raise ValueError(f"MEM loss: pred {pred.shape}, target {target.shape} and mask {masked.shape} "
                         f"must be [B, L, D], [B, L, D], [B, L]")
    target = jax.lax.stop_gradient(target).astype(jnp.float32)
    weight = jnp.asarray(masked, jnp.float32)
    err = jnp.sum(jnp.abs(pred.astype(jnp.float32) - target), axis=-1)  # [B, L]
    count = jnp.sum(weight)
    loss = jnp.sum(err * weight) / (jnp.maximum(count, 1.0) * pred.shape[-1])
    return loss, count


def mem_objective(predict: Callable[[jax.Array, jax.Array], jax.Array], tokens: jax.Array, valid: jax.Array,
                  key: jax.Array, rate: float = MASK_RATE) -> tuple[jax.Array, dict]:
    """MEM on slice tokens ``tokens`` [B, L, D] with validity ``valid`` [B, L].

    ``predict(filled_tokens, valid) -> [B, L, D]`` is the Z-former plus prediction head run on
    the zero-filled sequence (``MSVLM.mem_predict`` with its series layout bound). Returns
    (loss, {'mem_l1', 'mem_masked'}): the loss and the masked-token count, for logging."""
    masked = mem_mask(key, valid, rate)
    pred = predict(zero_fill(tokens, masked), valid)
    loss, count = mem_l1(pred, tokens, masked)
    return loss, {"mem_l1": loss, "mem_masked": count}
