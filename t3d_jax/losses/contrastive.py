"""Global-batch contrastive objectives between volume views and reports.

Two objectives, both with negatives drawn from the *whole global batch*:

* ``clip_loss``: symmetric InfoNCE (CLIP / CT-CLIP). Logits ``t * x_i . y_j`` with a
  learnable log-temperature ``logit_scale`` (init log(1/0.07)); the effective scale
  ``t = exp(min(logit_scale, log(max_scale)))`` is clamped at ``max_scale`` (100) *in the
  forward pass*, so no optimiser-side clipping is needed and the gradient is 0 while clamped.
* ``siglip_loss``: SigLIP's pairwise sigmoid loss with learnable scale (init log 10) and
  bias (init -10): ``-1/B sum_ij log sigmoid(z_ij (t x_i . y_j + b))``, z = +1 on the diagonal.

Image embeddings may carry a view axis ``[B, V, D]``; every view is contrasted with the one
report of its example and the loss is the mean over views. Inputs are expected to be
L2-normalised already (the two-tower model normalises them; the loss stays a pure function
of what the model produces, which makes the gradient oracle in the tests simple).

Plain form: written with ``jnp`` on global arrays. Under ``jax.jit`` with a sharded batch
XLA inserts the all-gathers itself, but each device may hold a large slice of the B x B
logits.

Which mesh axes the batch is split over is the config's `batch` sharding rule: the tasks pass
it as ``batch_axes`` (`t3d_jax.tasks.base.Task.batch_axes`), the axes the train step shards
the batch over, so the loss's collectives always match the input sharding.
``DEFAULT_BATCH_AXES`` is that rule's default, ('data', 'fsdp'), for callers without a config.

Chunked form (``chunked=True``): a ``jax.shard_map`` over those batch axes. Each device
all-gathers the (small, B x D) embeddings of the other side and computes only its own rows
``[B_local, B]`` (image -> all reports) and its own columns (report -> all images), so no
device ever holds more than ``B_local x B`` logits. ``all_gather`` transposes to a
reduce-scatter, so gradients w.r.t. every shard are exact. Without a mesh (or a mesh whose
batch axes are all of size 1) the chunked form falls back to the plain one: it is the same
computation on a single device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

CLIP_LOGIT_SCALE_INIT = math.log(1.0 / 0.07)
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0
DEFAULT_BATCH_AXES = ("data", "fsdp")  # the `batch` rule's default (configs/common.py)


def effective_scale(logit_scale: jax.Array, max_scale: float | None) -> jax.Array:
    """exp(logit_scale), clamped at max_scale (None = unclamped); float32."""
    logit_scale = jnp.asarray(logit_scale, jnp.float32)
    if max_scale is not None:
        logit_scale = jnp.minimum(logit_scale, math.log(max_scale))
    return jnp.exp(logit_scale)


def _with_view_axis(image_emb: jax.Array, text_emb: jax.Array) -> tuple[jax.Array, jax.Array]:
    if image_emb.ndim == 2:
        image_emb = image_emb[:, None, :]
    if image_emb.ndim != 3 or text_emb.ndim != 2:
        raise ValueError(
            f"contrastive loss: expected image [B,V,D] or [B,D] and text [B,D], got "
            f"{image_emb.shape} and {text_emb.shape}")
    if image_emb.shape[0] != text_emb.shape[0] or image_emb.shape[-1] != text_emb.shape[-1]:
        raise ValueError(
            f"contrastive loss: batch/width mismatch between image {image_emb.shape} and text "
            f"{text_emb.shape}")
    return image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)


def _active_batch_axes(batch_axes: Sequence[str], batch_size: int) -> tuple[str, ...]:
    """The mesh axes (of the current `jax.set_mesh` mesh) the batch is split over."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(a for a in batch_axes if a in mesh.axis_names and mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if batch_size % shards:
        raise ValueError(
            f"chunked contrastive loss: global batch {batch_size} is not divisible by the "
            f"{shards} shards of mesh axes {axes}")
    return axes


# --------------------------------------------------------------------------- CLIP / InfoNCE


def _clip_plain(image_emb, text_emb, scale):
    batch, views, _ = image_emb.shape
    logits = scale * jnp.einsum("bvd,cd->vbc", image_emb, text_emb)  # [V, B, B]
    positives = jnp.einsum("vbb->vb", logits)
    image_to_text = jax.nn.logsumexp(logits, axis=-1) - positives
    text_to_image = jax.nn.logsumexp(logits, axis=-2) - positives
    return (jnp.sum(image_to_text) + jnp.sum(text_to_image)) / (2 * batch * views)


def _clip_chunked(image_emb, text_emb, scale, axes):
    batch, views, _ = image_emb.shape

    def local_sum(img, txt, scale):
        # Rows: my images against every report; columns: my reports against every image.
        all_txt = jax.lax.all_gather(txt, axes, axis=0, tiled=True)  # [B, D]
        all_img = jax.lax.all_gather(img, axes, axis=0, tiled=True)  # [B, V, D]
        positives = scale * jnp.einsum("bvd,bd->vb", img, txt)  # [V, b]
        rows = scale * jnp.einsum("bvd,cd->vbc", img, all_txt)  # [V, b, B]
        cols = scale * jnp.einsum("bd,cvd->vbc", txt, all_img)  # [V, b, B]
        total = jnp.sum(jax.nn.logsumexp(rows, axis=-1) - positives)
        total += jnp.sum(jax.nn.logsumexp(cols, axis=-1) - positives)
        return jax.lax.psum(total, axes)

    total = jax.shard_map(local_sum, in_specs=(P(axes), P(axes), P()), out_specs=P())(
        image_emb, text_emb, scale)
    return total / (2 * batch * views)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, *,
              max_scale: float | None = 100.0, chunked: bool = False,
              batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> jax.Array:
    """Symmetric InfoNCE over the global batch, mean over views.

    image_emb: [B, V, D] or [B, D], L2-normalised. text_emb: [B, D], L2-normalised.
    logit_scale: scalar log-temperature (learnable). Returns a float32 scalar.
    """
    image_emb, text_emb = _with_view_axis(image_emb, text_emb)
    scale = effective_scale(logit_scale, max_scale)
    axes = _active_batch_axes(batch_axes, image_emb.shape[0]) if chunked else ()
    if axes:
        return _clip_chunked(image_emb, text_emb, scale, axes)
    return _clip_plain(image_emb, text_emb, scale)


# --------------------------------------------------------------------------------- SigLIP


def _siglip_pair_terms(logits, is_positive):
    signs = jnp.where(is_positive, 1.0, -1.0)
    return -jax.nn.log_sigmoid(signs * logits)


def _siglip_plain(image_emb, text_emb, scale, bias):
    batch, views, _ = image_emb.shape
    logits = scale * jnp.einsum("bvd,cd->vbc", image_emb, text_emb) + bias
    eye = jnp.eye(batch, dtype=bool)[None]
    return jnp.sum(_siglip_pair_terms(logits, eye)) / (batch * views)


def _siglip_chunked(image_emb, text_emb, scale, bias, axes):
    batch, views, _ = image_emb.shape

    def local_sum(img, txt, scale, bias):
        # Every pair (i, j) is one row entry of image i, so rows alone cover the loss.
        local = img.shape[0]
        all_txt = jax.lax.all_gather(txt, axes, axis=0, tiled=True)  # [B, D]
        logits = scale * jnp.einsum("bvd,cd->vbc", img, all_txt) + bias  # [V, b, B]
        first_row = jax.lax.axis_index(axes) * local
        rows = first_row + jnp.arange(local)
        is_positive = rows[:, None] == jnp.arange(all_txt.shape[0])[None, :]
        return jax.lax.psum(jnp.sum(_siglip_pair_terms(logits, is_positive[None])), axes)

    total = jax.shard_map(local_sum, in_specs=(P(axes), P(axes), P(), P()), out_specs=P())(
        image_emb, text_emb, scale, bias)
    return total / (batch * views)


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                logit_bias: jax.Array, *, max_scale: float | None = 100.0, chunked: bool = False,
                batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> jax.Array:
    """SigLIP sigmoid loss over all B x B pairs of the global batch, mean over views.

    Normalised as in the SigLIP paper: the sum over pairs divided by B (per view).
    """
    image_emb, text_emb = _with_view_axis(image_emb, text_emb)
    scale = effective_scale(logit_scale, max_scale)
    bias = jnp.asarray(logit_bias, jnp.float32)
    axes = _active_batch_axes(batch_axes, image_emb.shape[0]) if chunked else ()
    if axes:
        return _siglip_chunked(image_emb, text_emb, scale, bias, axes)
    return _siglip_plain(image_emb, text_emb, scale, bias)


def contrastive_loss(kind: str, image_emb: jax.Array, text_emb: jax.Array,
                     logit_scale: jax.Array, logit_bias: jax.Array | None = None, *,
                     max_scale: float | None = 100.0, chunked: bool = False,
                     batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> jax.Array:
    """Dispatches on `config.loss.kind` ('clip' | 'siglip')."""
    if kind == "clip":
        return clip_loss(image_emb, text_emb, logit_scale, max_scale=max_scale,
                         chunked=chunked, batch_axes=batch_axes)
    if kind == "siglip":
        if logit_bias is None:
            raise ValueError("siglip loss needs a logit_bias")
        return siglip_loss(image_emb, text_emb, logit_scale, logit_bias, max_scale=max_scale,
                           chunked=chunked, batch_axes=batch_axes)
    raise ValueError(f"config.loss.kind: unknown contrastive loss {kind!r}; choose 'clip' or 'siglip'")
