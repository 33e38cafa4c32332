"""Building blocks shared by the image and text encoders (and the TMA head).

Every parameter is created through :func:`param`, which attaches *logical* axis names
(``'embed'``, ``'mlp'``, ``'heads'``, ``'kv'``, ``'patch'``, ``'vocab'``, ...) to the
``nnx.Param`` as ``out_sharding`` metadata -- the same metadata ``nnx.with_partitioning``
writes -- so a rules table in the config can map them to mesh axes ('data', 'fsdp',
'tensor') without the models knowing about meshes.

Weights are stored in ``param_dtype`` (float32 by default) and cast to the compute ``dtype``
(float32 on CPU, bfloat16 on GPU/TPU) at use; softmax and LayerNorm statistics are always
computed in float32, because bfloat16 reductions over long token rows lose too much.

Kernels are laid out ``[inputs..., outputs...]`` with the attention projections split by
head (``[embed, heads, kv]`` / ``[heads, kv, embed]``) so that a tensor-parallel rule on
'heads' shards attention without reshapes, and so that PyTorch checkpoints (BERT, MONAI)
map onto them by a transpose and a reshape (see :mod:`t3d_jax.models.convert`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3d_jax.models import attention as attention_lib

Initializer = Callable[..., jax.Array]

# Named rematerialisation policies (config key ``remat``).  'full' and 'nothing_saveable'
# both recompute everything inside a block in the backward pass; the dots_* policies keep
# matmul outputs and recompute the cheap element-wise work.
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str | None) -> tuple[bool, Callable | None]:
    """Looks up a rematerialisation policy by config name.

    Returns ``(enabled, policy)``: ``enabled`` is False for ``'none'``/``''``/None (no
    checkpointing), else ``policy`` is the ``jax.checkpoint_policies`` function to hand to
    ``nnx.remat`` (None = save nothing).
    """
    if name is None or name in ("none", ""):
        return False, None
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose 'none' or one of {sorted(REMAT_POLICIES)}")
    return True, REMAT_POLICIES[name]


def maybe_remat(fn: Callable, name: str | None, static_argnums: tuple[int, ...] = ()) -> Callable:
    """Wraps ``fn(module, *args)`` in ``nnx.remat`` with the named policy (identity for 'none')."""
    enabled, policy = remat_policy(name)
    if not enabled:
        return fn
    return nnx.remat(fn, policy=policy, static_argnums=static_argnums)


def as_dtype(dtype) -> jnp.dtype:
    """Accepts a dtype or its config name ('float32', 'bfloat16')."""
    return jnp.dtype(dtype)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str | None],
          param_dtype=jnp.float32) -> nnx.Param:
    """Creates an ``nnx.Param`` with logical axis names (one per dimension) as sharding metadata."""
    shape = tuple(int(s) for s in shape)
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match parameter shape {shape}")
    # eager_sharding=False: building a module never needs a mesh; the trainer turns the
    # logical names into shardings (nnx.get_partition_spec + the config's rules table).
    return nnx.Param(init(rngs.params(), shape, as_dtype(param_dtype)), out_sharding=names, eager_sharding=False)


def logical_names(module: nnx.Module) -> dict[tuple, tuple]:
    """Maps each parameter path of ``module`` to its logical axis names (None if missing)."""
    out = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param):
            out[tuple(path)] = node.get_metadata().get("out_sharding")
    return out


class Dense(nnx.Module):
    """A matmul over the trailing ``len(in_shape)`` input axes, with optional bias.

    Kernel shape ``in_shape + out_shape`` with logical names ``in_names + out_names``; e.g.
    a query projection is ``Dense((d,), (heads, head_dim), ('embed',), ('heads', 'kv'))``.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_names: Sequence[str | None],
                 out_names: Sequence[str | None], *, use_bias: bool = True,
                 kernel_init: Initializer = nnx.initializers.lecun_normal(),
                 bias_init: Initializer = nnx.initializers.zeros_init(),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.dtype = as_dtype(dtype)
        self.kernel = param(rngs, _fan_aware(kernel_init, len(self.in_shape)), self.in_shape + self.out_shape,
                            tuple(in_names) + tuple(out_names), param_dtype)
        self.bias = (param(rngs, bias_init, self.out_shape, tuple(out_names), param_dtype)
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in:] != self.in_shape:
            raise ValueError(f"Dense expects trailing input shape {self.in_shape}, got {x.shape}")
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        y = jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def _fan_aware(init: Initializer, n_in: int) -> Initializer:
    """Makes variance-scaling initialisers see the flattened fan-in/fan-out of a general kernel.

    ``jax.nn.initializers`` treat the last axis as fan-out and the one before as fan-in; a
    ``[embed, heads, kv]`` kernel would otherwise get fan-in = heads.  We initialise the
    equivalent 2-D matrix and reshape, which is what a PyTorch ``nn.Linear`` of the same
    layout would do.
    """
    def wrapped(key, shape, dtype=jnp.float32):
        fan_in = 1
        for s in shape[:n_in]:
            fan_in *= s
        fan_out = 1
        for s in shape[n_in:]:
            fan_out *= s
        return init(key, (fan_in, fan_out), dtype).reshape(shape)
    return wrapped


def triple(v) -> tuple[int, int, int]:
    """An int, or 3 ints, as a 3-tuple (per-axis sizes: patches, kernels, strides)."""
    if isinstance(v, (int, np.integer)):
        return (int(v),) * 3
    v = tuple(int(a) for a in v)
    if len(v) != 3:
        raise ValueError(f"expected an int or 3 ints, got {v}")
    return v


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; statistics in float32, output in the compute dtype."""

    def __init__(self, features: int, *, epsilon: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.epsilon = float(epsilon)
        self.dtype = as_dtype(dtype)
        self.scale = param(rngs, nnx.initializers.ones_init(), (features,), ("embed",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (features,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class MultiHeadAttention(nnx.Module):
    """Multi-head dot-product attention with separate q/k/v projections.

    Self-attention by default; pass ``context`` for cross-attention (keys/values from
    another sequence whose width may differ: ``kv_features``).  ``mask`` is boolean (True =
    attend) and broadcastable to ``[B, heads, Lq, Lk]`` (4-D) -- a key padding mask ``[B, Lk]``
    is accepted as such.  The attention itself is :func:`t3d_jax.models.attention.dot_product_attention`
    with ``attention`` naming the implementation (config ``model.attention``; 'auto' picks by
    platform). Attention-probability dropout (``dropout_rate > 0`` and not deterministic)
    exists only in the 'reference' implementation, which 'auto' then uses.
    """

    def __init__(self, features: int, num_heads: int, *, kv_features: int | None = None, qkv_bias: bool = True,
                 out_bias: bool = True, kernel_init: Initializer = nnx.initializers.xavier_uniform(),
                 dropout_rate: float = 0.0, attention: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if features % num_heads:
            raise ValueError(f"width {features} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = features // num_heads
        self.attention = attention_lib.check_implementation(attention)
        kv_features = kv_features or features
        common = dict(kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = (num_heads, self.head_dim)
        self.query = Dense((features,), hd, ("embed",), ("heads", "kv"), use_bias=qkv_bias, **common)
        self.key = Dense((kv_features,), hd, ("embed",), ("heads", "kv"), use_bias=qkv_bias, **common)
        self.value = Dense((kv_features,), hd, ("embed",), ("heads", "kv"), use_bias=qkv_bias, **common)
        self.out = Dense(hd, (features,), ("heads", "kv"), ("embed",), use_bias=out_bias, **common)
        # Attention-probability dropout; without it no RNG state is stored in the module.
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate > 0 else None)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None, *,
                 causal: bool = False, deterministic: bool = True) -> jax.Array:
        context = x if context is None else context
        q = self.query(x)  # [B, Lq, H, Dh]
        k = self.key(context)
        v = self.value(context)
        dropout = None
        if self.dropout.rate > 0 and not deterministic:
            dropout = lambda w: self.dropout(w, deterministic=False)  # noqa: E731
        y = attention_lib.dot_product_attention(q, k, v, mask=mask, causal=causal, dropout=dropout,
                                                implementation=self.attention)
        return self.out(y)


class Mlp(nnx.Module):
    """Two-layer feed-forward block, GELU (exact erf, as PyTorch/Hugging Face 'gelu') by default."""

    def __init__(self, features: int, hidden: int, *, approximate_gelu: bool = False,
                 kernel_init: Initializer = nnx.initializers.xavier_uniform(), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        common = dict(kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.approximate_gelu = approximate_gelu
        self.fc1 = Dense((features,), (hidden,), ("embed",), ("mlp",), **common)
        self.fc2 = Dense((hidden,), (features,), ("mlp",), ("embed",), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.approximate_gelu))


# ----------------------------------------------------------------------------- layer stacks
# Logical name of the leading axis of stacked (scanned) layer parameters. No sharding rule
# names it, so it is never split: each device holds every layer's shard of the other axes.
LAYERS_AXIS = "layers"


def make_layer_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs, *,
                     scanned: bool):
    """``count`` layers built by ``make_layer(rngs)``.

    ``scanned=False``: an ``nnx.List`` of independent modules (paths ``.../i/...``).
    ``scanned=True``: ONE module whose every variable has a leading axis of size ``count``
    (paths ``.../...``, logical name ``'layers'`` prepended to each parameter's axes), built
    with ``nnx.vmap`` over split RNG streams. :func:`apply_layer_stack` runs it with
    ``nnx.scan``, so the compiled program holds one layer body instead of ``count`` copies:
    compile time and code size stop growing with depth (maxtext's ``scan_layers``), which is
    what makes a ViT-B + BERT-base step compile in minutes for a TPU pod on a small CPU.
    """
    if not scanned:
        return nnx.List([make_layer(rngs) for _ in range(count)])

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def build(layer_rngs):
        return make_layer(layer_rngs)

    return build(rngs)


def apply_layer_stack(forward: Callable, stack, x: jax.Array, *, scanned: bool) -> jax.Array:
    """``x = forward(layer, x)`` for each layer of a :func:`make_layer_stack` stack, in order.

    ``forward`` may be wrapped in ``nnx.remat`` (:func:`maybe_remat`); other inputs (masks,
    flags) are closed over. Variables a layer updates (RNG counters) are written back per layer.
    """
    if not scanned:
        for layer in stack:
            x = forward(layer, x)
        return x

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def run(layer, carry):
        return forward(layer, carry)

    return run(stack, x)
