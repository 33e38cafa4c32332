"""Scaled dot-product attention: one function, several implementations (``model.attention``).

Every attention of the models (the ViT's self-attention, BERT's self-attention with its padding
mask, the TMA head's cross-attention from patch tokens to report states) calls
:func:`dot_product_attention` on ``[B, L, H, Dh]`` tensors. It picks the implementation by name
or, for ``'auto'``, by platform, dtype, shapes and mask:

================  ==========================================================================
``'reference'``   The project's original einsum path (float32 logits and softmax, masked
                  logits set to float32's most negative value). The only one with attention
                  dropout, the numerical reference of the tests, and what ``'auto'`` uses when
                  dropout is active. Materialises the ``[B, H, Lq, Lk]`` logits.
``'xla'``         ``jax.nn.dot_product_attention(implementation='xla')``: the same maths as
                  jax writes it (logits in float32 via ``preferred_element_type``, so bfloat16
                  inputs lose less than in the reference). Runs everywhere; XLA fuses it as
                  it can but still materialises the logits. ``'auto'``'s choice on CPU.
``'cudnn'``       ``jax.nn.dot_product_attention(implementation='cudnn')``: cuDNN's fused
                  flash attention on NVIDIA GPUs; bfloat16/float16 only, head dim a multiple of
                  8 (up to 128, 256 on Hopper and later); a mask becomes an additive bias,
                  and then cuDNN's backward pass needs even Lq and Lk. jax raises if cuDNN
                  cannot run the case.
``'pallas_tpu'``  The Pallas TPU splash-attention kernel
                  (``jax.experimental.pallas.ops.tpu.splash_attention``): flash attention
                  with a fused backward pass and no logits in HBM. It takes no arbitrary
                  mask: only no mask, a key-padding mask (passed as segment ids) and
                  ``causal``; any other mask raises ``ValueError``. Sequence lengths that are
                  not a multiple of :data:`PALLAS_BLOCK` are zero-padded to one (padded keys
                  masked out through the segment ids, padded query rows sliced off), so any
                  length is exact, at the cost of the padding. Under an ambient mesh
                  (``jax.set_mesh``, as the trainer and the AOT compiler run) the kernel
                  runs in a ``jax.shard_map`` over the batch axes ('data', 'fsdp') and the
                  'tensor' axis for heads, because a Pallas kernel cannot be partitioned by
                  XLA. ``interpret=True`` runs Pallas's TPU interpreter (tests on CPU).
================  ==========================================================================

``'auto'`` (the config default) resolves, at trace time (:func:`select_implementation`):
dropout active -> ``'reference'``; platform ``tpu`` -> ``'pallas_tpu'`` unless the mask is
neither absent nor key-padding (then ``'xla'``); an NVIDIA GPU -> ``'cudnn'`` when the dtype
is bfloat16/float16, the head dim a multiple of 8 up to 128 and, with a mask, Lq and Lk even
(else ``'xla'``); anything else (CPU) -> ``'xla'``. The platform is the ambient mesh's (so an
AOT compile for TPU on a CPU host picks the TPU kernels), else ``jax.default_backend()``.

Masks are boolean, ``True`` = attend (``jax.nn.dot_product_attention``'s convention): a
key-padding mask ``[B, Lk]`` or a mask broadcastable to ``[B, H, Lq, Lk]`` (4-D; one of shape
``[B, 1, 1, Lk]`` counts as key padding). ``causal=True`` lets query ``i`` see keys
``j <= i`` (top-left aligned when ``Lq != Lk``, as ``jnp.tril``). A query row whose keys are
all masked has no meaningful result; what comes out is finite (tested): the plain mean of the
values in 'reference' and 'xla' (every logit replaced by the same large negative number), the
mean over the 128-padded key length (zero padding included) in 'pallas_tpu'; cuDNN's output
for such a row is not checked here. The models never produce one: [CLS] is always a real token.

XLA's cost analysis counts no FLOPs inside a Pallas kernel (a custom call without a cost
estimate); the AOT report adds the splash kernels' FLOPs from their shapes
(`t3d_jax.train.aot.pallas_attention_flops`).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn", "pallas_tpu")
# Sequence tile of the splash kernel; lengths are padded to a multiple of it. Tiles of 512 /
# 256 are used where they divide the padded length (fewer grid steps, as maxtext's defaults).
PALLAS_BLOCK = 128
_PALLAS_TILES = (512, 256, 128)
# Mesh axes the pallas_tpu shard_map splits the batch and the heads over (the default
# `batch` and `heads` sharding rules, configs/common.py). A different layout is still exact:
# XLA reshards the operands to these specs around the kernel.
BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor",)


def check_implementation(name: str) -> str:
    """Validates a ``model.attention`` value; returns it."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention: unknown attention implementation {name!r}; "
                         f"choose one of {IMPLEMENTATIONS}")
    return name


# ------------------------------------------------------------------------------ masks
def _normalise_mask(mask, batch: int, lq: int, lk: int) -> tuple[str, jax.Array | None]:
    """('none', None) | ('key', bool [B, Lk]) | ('full', bool 4-D broadcastable to [B,H,Lq,Lk])."""
    if mask is None:
        return "none", None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        mask = mask.astype(bool)  # nonzero = attend, as jnp.asarray(mask, bool)
    if mask.ndim == 2:
        if mask.shape[-1] != lk or mask.shape[0] not in (1, batch):
            raise ValueError(f"attention: a key-padding mask must be [B={batch}, Lk={lk}], got {mask.shape}")
        return "key", jnp.broadcast_to(mask, (batch, lk))
    if mask.ndim == 4:
        if mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == lk and mask.shape[0] in (1, batch):
            return "key", jnp.broadcast_to(mask[:, 0, 0, :], (batch, lk))
        return "full", mask
    raise ValueError(f"attention: mask must be a key-padding mask [B, Lk] or 4-D broadcastable to "
                     f"[B, H, Lq, Lk], got shape {mask.shape}")


def _as_4d(kind: str, mask: jax.Array | None) -> jax.Array | None:
    return mask[:, None, None, :] if kind == "key" else mask


# ------------------------------------------------------------------------- selection
def _platform() -> str:
    """The platform the current trace compiles for: the ambient mesh's, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        device = getattr(mesh, "abstract_device", None)
        platform = getattr(device, "platform", None)
        if platform:
            return str(platform)
    return jax.default_backend()


def _is_nvidia(platform: str) -> bool:
    if platform == "cuda":
        return True
    if platform != "gpu":
        return False
    try:
        from jax.extend.backend import get_backend

        return "cuda" in get_backend("gpu").platform_version.lower()
    except Exception:  # no GPU client in this process (e.g. compiling for another machine)
        return False


def select_implementation(q, k, *, mask_kind: str = "none", causal: bool = False, dropout: bool = False,
                          implementation: str = "auto", platform: str | None = None) -> str:
    """The implementation :func:`dot_product_attention` runs (``'auto'`` resolved; see module doc).

    ``q`` / ``k`` need only ``.shape`` and ``.dtype`` ([B, L, H, Dh]); ``mask_kind`` is
    'none' | 'key' | 'full'; ``platform`` overrides the detected one ('cpu', 'gpu', 'tpu').
    Raises ``ValueError`` for a combination the named implementation cannot run.
    """
    check_implementation(implementation)
    del causal  # every implementation supports it
    platform = platform or _platform()
    lq, lk, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    if implementation == "auto":
        if dropout:
            return "reference"
        if platform == "tpu":
            return "pallas_tpu" if mask_kind in ("none", "key") else "xla"
        if _is_nvidia(platform):
            half = jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            dims_ok = head_dim % 8 == 0 and head_dim <= 128
            even_ok = mask_kind == "none" or (lq % 2 == 0 and lk % 2 == 0)
            return "cudnn" if half and dims_ok and even_ok else "xla"
        return "xla"
    if dropout and implementation != "reference":
        raise ValueError(
            f"attention: dropout on the attention probabilities runs only in the 'reference' "
            f"implementation, not {implementation!r}; use model.attention='auto' (it takes "
            f"'reference' where dropout is active) or set the attention dropout to 0 "
            f"(model.text.attention_dropout)")
    if implementation == "cudnn":
        if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"attention 'cudnn' needs bfloat16 or float16 inputs, got {jnp.dtype(q.dtype)} "
                             f"(model.dtype); use 'xla' for float32")
    if implementation == "pallas_tpu" and mask_kind == "full":
        raise ValueError("attention 'pallas_tpu' takes no mask, a key-padding mask [B, Lk] or causal=True; "
                         "a general [B, H, Lq, Lk] mask needs 'xla' or 'reference'")
    return implementation


# ---------------------------------------------------------------------- implementations
def _reference(q, k, v, kind, mask, causal, scale, dropout):
    """The original MultiHeadAttention einsum path (plus causal and an optional scale)."""
    head_dim = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if scale is None:
        logits = logits / jnp.sqrt(jnp.float32(head_dim))
    else:
        logits = logits * jnp.float32(scale)
    mask = _as_4d(kind, mask)
    if causal:
        tril = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
        mask = tril if mask is None else jnp.logical_and(mask, tril)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if dropout is not None:
        weights = dropout(weights)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _jax_nn(q, k, v, kind, mask, causal, scale, implementation):
    return jax.nn.dot_product_attention(q, k, v, mask=_as_4d(kind, mask), is_causal=causal, scale=scale,
                                        implementation=implementation)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tile(length: int) -> int:
    return next(t for t in _PALLAS_TILES if length % t == 0)


def _splash_local(q, k, v, q_ids, kv_ids, *, causal: bool, interpret: bool):
    """Splash attention on (local) [B, H, Lq, Dh] / [B, H, Lk, Dh], q already scaled."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    _, heads, lq, _ = q.shape
    lk = k.shape[2]
    shape = (lq, lk)
    head_mask = sa.CausalMask(shape) if causal else sa.FullMask(shape)
    bq, bkv = _tile(lq), _tile(lk)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                           block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                           block_q_dq=bq, block_kv_dq=bkv)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([head_mask] * heads), head_shards=1, q_seq_shards=1,
                                block_sizes=blocks, interpret=interpret)
    if q_ids is None:
        return jax.vmap(kernel)(q, k, v)
    return jax.vmap(kernel)(q, k, v, segment_ids=sa.SegmentIds(q=q_ids, kv=kv_ids))


def _pallas_tpu(q, k, v, kind, key_mask, causal, scale, interpret):
    batch, lq, heads, head_dim = q.shape
    lk = k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    # The kernel has no scale argument: scale q (in float32, one rounding to q's dtype).
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    lq_p, lk_p = _round_up(lq, PALLAS_BLOCK), _round_up(lk, PALLAS_BLOCK)
    q, k, v = (jnp.transpose(t, (0, 2, 1, 3)) for t in (q, k, v))  # [B, H, L, Dh]
    q = jnp.pad(q, ((0, 0), (0, 0), (0, lq_p - lq), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, lk_p - lk), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, lk_p - lk), (0, 0)))
    q_ids = kv_ids = None
    if kind == "key" or lk_p != lk:
        # Segment ids: every query is segment 1, a key attends only if it is 1 too (real, unmasked).
        kv = jnp.ones((batch, lk), jnp.int32) if key_mask is None else key_mask.astype(jnp.int32)
        kv_ids = jnp.pad(kv, ((0, 0), (0, lk_p - lk)))
        q_ids = jnp.ones((batch, lq_p), jnp.int32)

    run = lambda q, k, v, qi, ki: _splash_local(q, k, v, qi, ki, causal=causal, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        batch_axes, shards = [], 1
        for a in BATCH_AXES:
            size = mesh.shape.get(a, 1)
            if size > 1 and batch % (shards * size) == 0:
                batch_axes.append(a)
                shards *= size
        head_axes = tuple(a for a in HEAD_AXES if mesh.shape.get(a, 1) > 1 and heads % mesh.shape[a] == 0)
        if batch_axes or head_axes:
            b = tuple(batch_axes) or None
            h = head_axes or None
            qkv_spec = P(b, h, None, None)
            ids_spec = P(b, None)
            if q_ids is None:
                out = jax.shard_map(lambda q, k, v: run(q, k, v, None, None),
                                    in_specs=(qkv_spec,) * 3, out_specs=qkv_spec, check_vma=False)(q, k, v)
            else:
                out = jax.shard_map(run, in_specs=(qkv_spec,) * 3 + (ids_spec,) * 2,
                                    out_specs=qkv_spec, check_vma=False)(q, k, v, q_ids, kv_ids)
            return jnp.transpose(out[:, :, :lq], (0, 2, 1, 3))
    out = run(q, k, v, q_ids, kv_ids)
    return jnp.transpose(out[:, :, :lq], (0, 2, 1, 3))


# ------------------------------------------------------------------------- the function
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          causal: bool = False, implementation: str = "auto", scale: float | None = None,
                          dropout: Callable[[jax.Array], jax.Array] | None = None,
                          interpret: bool = False, platform: str | None = None) -> jax.Array:
    """softmax(q k^T * scale, masked) v for q [B, Lq, H, Dh], k / v [B, Lk, H, Dh] -> [B, Lq, H, Dh].

    ``mask``: bool, True = attend; [B, Lk] key padding or 4-D broadcastable to [B, H, Lq, Lk].
    ``causal``: query i sees keys j <= i. ``scale``: default 1/sqrt(Dh). ``dropout``: a
    function applied to the attention probabilities (e.g. an active ``nnx.Dropout``); only
    the 'reference' implementation has that step, 'auto' then picks it and the others raise.
    ``implementation``: one of :data:`IMPLEMENTATIONS` (module docstring: what each does
    and supports). ``interpret``: run 'pallas_tpu' in Pallas's TPU interpreter (any backend;
    slow, for tests). ``platform``: override the platform 'auto' decides by.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] \
            or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q [B, Lq, H, Dh] and k, v [B, Lk, H, Dh], got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    batch, lq, _, _ = q.shape
    lk = k.shape[1]
    kind, mask = _normalise_mask(mask, batch, lq, lk)
    platform = platform or _platform()
    impl = select_implementation(q, k, mask_kind=kind, causal=causal, dropout=dropout is not None,
                                 implementation=implementation, platform=platform)
    if impl == "reference":
        return _reference(q, k, v, kind, mask, causal, scale, dropout)
    if impl in ("xla", "cudnn"):
        return _jax_nn(q, k, v, kind, mask, causal, scale, impl)
    # pallas_tpu
    if platform != "tpu" and not interpret:
        raise ValueError(f"attention 'pallas_tpu' compiles for TPU only (platform here: {platform!r}); "
                         "use 'auto' or 'xla', or interpret=True for Pallas's interpreter")
    return _pallas_tpu(q, k, v, kind, mask, causal, scale, interpret)
