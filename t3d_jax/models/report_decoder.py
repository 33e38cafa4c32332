"""Report decoder: a GPT-2 decoder that cross-attends to visual tokens, with a KV cache.

Computation of the text part, exactly ``transformers.GPT2LMHeadModel(GPT2Config(
add_cross_attention=True))`` with ``encoder_hidden_states`` (so a Hugging Face GPT-2 directory
loads, :func:`t3d_jax.models.convert.load_hf_gpt2`, and the parity test can hold us to it):

  h = wte[ids] + wpe[arange(L)]; dropout
  per block: h += Drop(SelfAttn(LN_1(h), causal, padding mask))
             h += Drop(CrossAttn(LN_cross(h), context, context mask))
             h += Drop(W2 gelu_new(W1 LN_2(h)))
  logits = LN_f(h) @ wte^T          (tied input/output embedding, no bias)

Pre-LN, learned positions, attention scaled by 1/sqrt(head_dim). The cross-attention keys
and values come from a ``context`` of the decoder's width; :class:`ReportDecoder` makes it
from any image encoder's tokens ``[B, N, D_v]``: a linear projection to the decoder width,
then (optionally) a Perceiver resampler (Flamingo) that squeezes the N tokens into a fixed
number of learned latents -- fewer keys per decoding step, whatever the image encoder.

Decoding (:mod:`t3d_jax.models.decoding`) runs :meth:`TextDecoder.decode_step` on a cache
made by :meth:`TextDecoder.init_cache`: per layer the self-attention keys/values in a
fixed ``[B, max_len]`` buffer (one compiled shape for every step) and the cross-attention
keys/values of the context, computed once per image.

Every attention goes through :func:`t3d_jax.models.attention.dot_product_attention`
(``attention`` names the implementation, config ``model.attention``).

Parameter paths of :class:`TextDecoder` (what the GPT-2 importer maps onto):
  wte/embedding [V, D], wpe/embedding [P, D],
  blocks/i/{ln_1, ln_cross, ln_2}/{scale, bias},
  blocks/i/{attn, cross}/{query, key, value}/{kernel [D, heads, dh], bias [heads, dh]},
  blocks/i/{attn, cross}/out/{kernel [heads, dh, D], bias [D]},
  blocks/i/mlp/{fc1, fc2}/{kernel, bias}, ln_f/{scale, bias}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.models import attention as attention_lib
from t3d_jax.models import layers
from t3d_jax.utils import read_hf_config

# hidden, layers, heads (MLP width 4 x hidden, as GPT-2)
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 2),
    "demo": (192, 3, 3),
    "small": (512, 6, 8),
    "base": (768, 12, 12),  # GPT-2 124M (+ cross-attention)
}

_GELU_APPROX = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}


@dataclasses.dataclass(frozen=True)
class ReportDecoderConfig:
    vocab_size: int = 30522
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int | None = None  # None: 4 x hidden_size (GPT-2's n_inner=None)
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    hidden_dropout: float = 0.1  # GPT-2 embd_pdrop / resid_pdrop
    attention_dropout: float = 0.1  # GPT-2 attn_pdrop
    initializer_range: float = 0.02
    visual_width: int | None = None  # width D_v of the image tokens; None: hidden_size
    resampler_latents: int = 0  # 0: no resampler (cross-attend to all N projected tokens)
    resampler_layers: int = 2
    attention: str = "auto"  # attention implementation (t3d_jax/models/attention.py)
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"decoder hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.activation not in _GELU_APPROX:
            raise ValueError(f"decoder activation {self.activation!r} not supported; one of {sorted(_GELU_APPROX)}")
        if self.resampler_latents < 0 or self.resampler_layers < 1:
            raise ValueError(f"resampler_latents must be >= 0 and resampler_layers >= 1, got "
                             f"{self.resampler_latents}, {self.resampler_layers}")
        attention_lib.check_implementation(self.attention)

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @classmethod
    def from_size(cls, size: str, **overrides) -> "ReportDecoderConfig":
        if size not in SIZES:
            raise ValueError(f"unknown report decoder size {size!r}; choose one of {sorted(SIZES)} "
                             "or a Hugging Face GPT-2 dir")
        h, n, a = SIZES[size]
        return cls(**{"hidden_size": h, "num_layers": n, "num_heads": a, **overrides})

    @classmethod
    def from_hf(cls, config_json, **overrides) -> "ReportDecoderConfig":
        """Reads a Hugging Face GPT-2 ``config.json`` (file or the directory holding it)."""
        path, c = read_hf_config(config_json, "gpt2", "GPT-2")
        missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in c]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if c.get(key, ok) != ok:
                raise ValueError(f"{path}: {key}={c[key]} is not supported (only {ok}, GPT-2's default)")
        kw = dict(vocab_size=c["vocab_size"], hidden_size=c["n_embd"], num_layers=c["n_layer"],
                  num_heads=c["n_head"], intermediate_size=c.get("n_inner"),
                  max_position_embeddings=c.get("n_positions", 1024),
                  layer_norm_eps=c.get("layer_norm_epsilon", 1e-5),
                  activation=c.get("activation_function", "gelu_new"),
                  hidden_dropout=c.get("resid_pdrop", 0.1), attention_dropout=c.get("attn_pdrop", 0.1),
                  initializer_range=c.get("initializer_range", 0.02))
        kw.update(overrides)
        return cls(**kw)


# ------------------------------------------------------------------------------- blocks
class _Embed(nnx.Module):
    def __init__(self, rngs, shape, names, std, param_dtype):
        self.embedding = layers.param(rngs, nnx.initializers.normal(std), shape, names, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class Attention(nnx.Module):
    """q/k/v/out projections split by head; keys/values computed apart (:meth:`kv`) so a cache
    can hold them, and the attention itself by :func:`attention.dot_product_attention`."""

    def __init__(self, cfg: ReportDecoderConfig, *, rngs: nnx.Rngs):
        d, heads = cfg.hidden_size, cfg.num_heads
        hd = (heads, d // heads)
        init = nnx.initializers.normal(cfg.initializer_range)
        # GPT-2 scales the residual projections' init by 1/sqrt(2 x layers).
        out_init = nnx.initializers.normal(cfg.initializer_range / math.sqrt(2 * cfg.num_layers))
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.query = layers.Dense((d,), hd, ("embed",), ("heads", "kv"), kernel_init=init, **kw)
        self.key = layers.Dense((d,), hd, ("embed",), ("heads", "kv"), kernel_init=init, **kw)
        self.value = layers.Dense((d,), hd, ("embed",), ("heads", "kv"), kernel_init=init, **kw)
        self.out = layers.Dense(hd, (d,), ("heads", "kv"), ("embed",), kernel_init=out_init, **kw)
        self.attention = cfg.attention
        self.dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs if cfg.attention_dropout > 0 else None)

    def kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.key(x), self.value(x)

    def attend(self, x, k, v, mask=None, *, causal=False, deterministic=True, single_query=False) -> jax.Array:
        """``single_query``: one query per row (a decoding step): 'auto' then takes 'xla', since
        a flash kernel would pad the one query to a whole tile (the splash kernel: 128 rows)."""
        dropout = None
        if self.dropout.rate > 0 and not deterministic:
            dropout = lambda w: self.dropout(w, deterministic=False)  # noqa: E731
        y = attention_lib.dot_product_attention(self.query(x), k, v, mask=mask, causal=causal, dropout=dropout,
                                                implementation="xla" if single_query and self.attention == "auto"
                                                else self.attention)
        return self.out(y)


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: ReportDecoderConfig, *, rngs: nnx.Rngs):
        kw = dict(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.ln_1 = layers.LayerNorm(cfg.hidden_size, **kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_cross = layers.LayerNorm(cfg.hidden_size, **kw)
        self.cross = Attention(cfg, rngs=rngs)
        self.ln_2 = layers.LayerNorm(cfg.hidden_size, **kw)
        self.mlp = layers.Mlp(cfg.hidden_size, cfg.mlp_dim, approximate_gelu=_GELU_APPROX[cfg.activation],
                              kernel_init=nnx.initializers.normal(cfg.initializer_range), dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
        # GPT-2 scales the residual projections' init by 1/sqrt(2 x layers) (layers.Mlp takes one init).
        fc2 = self.mlp.fc2.kernel
        fc2.set_value(nnx.initializers.normal(cfg.initializer_range / math.sqrt(2 * cfg.num_layers))(
            rngs.params(), fc2.get_value().shape, layers.as_dtype(cfg.param_dtype)))
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, x, self_kv, self_mask, cross_kv, cross_mask, *, causal: bool, deterministic: bool,
                 single_query: bool = False):
        """One block given the self- and cross-attention keys/values (cache or fresh)."""
        drop = lambda y: self.dropout(y, deterministic=deterministic)  # noqa: E731
        x = x + drop(self.attn.attend(self.ln_1(x), *self_kv, self_mask, causal=causal, deterministic=deterministic,
                                      single_query=single_query))
        x = x + drop(self.cross.attend(self.ln_cross(x), *cross_kv, cross_mask, deterministic=deterministic,
                                       single_query=single_query))
        return x + drop(self.mlp(self.ln_2(x)))


class TextDecoder(nnx.Module):
    """The GPT-2 part: ``__call__(ids, context, ...)`` -> logits; ``init_cache`` / ``decode_step``.

    ``context`` [B, N, D] is already at the decoder width D (:class:`ReportDecoder` makes it).
    """

    def __init__(self, cfg: ReportDecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = layers.as_dtype(cfg.param_dtype)
        self.dtype = layers.as_dtype(cfg.dtype)
        self.wte = _Embed(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.initializer_range, pdt)
        self.wpe = _Embed(rngs, (cfg.max_position_embeddings, cfg.hidden_size), (None, "embed"),
                          cfg.initializer_range, pdt)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)
        self.blocks = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.ln_f = layers.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                                     param_dtype=pdt, rngs=rngs)

    def _check_length(self, length: int) -> None:
        if length > self.cfg.max_position_embeddings:
            raise ValueError(f"decoder sequence length {length} exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")

    def logits(self, h: jax.Array) -> jax.Array:
        """Tied output head: ``LN_f``'d hidden states @ wte^T, in float32."""
        return jnp.einsum("...d,vd->...v", h.astype(jnp.float32), self.wte.embedding[...].astype(jnp.float32))

    def __call__(self, input_ids: jax.Array, context: jax.Array, context_mask: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, *, deterministic: bool = True,
                 return_hidden: bool = False) -> jax.Array:
        """Logits [B, L, V] (float32) of the whole sequence (teacher forcing), positions 0..L-1.

        ``attention_mask`` [B, L] (1 = real token) masks padding keys; ``context_mask`` [B, N]
        masks context tokens. ``return_hidden``: the final-LN hidden states [B, L, D] instead.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if context.ndim != 3 or context.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"context must be [batch, tokens, {self.cfg.hidden_size}], got {context.shape}")
        length = input_ids.shape[1]
        self._check_length(length)
        x = self.wte(input_ids) + self.wpe(jnp.arange(length))[None]
        x = self.dropout(x.astype(self.dtype), deterministic=deterministic)
        mask = None if attention_mask is None else jnp.asarray(attention_mask) > 0
        cmask = None if context_mask is None else jnp.asarray(context_mask) > 0
        context = context.astype(self.dtype)
        for block in self.blocks:
            h = block.ln_1(x)
            x = block(x, block.attn.kv(h), mask, block.cross.kv(context), cmask, causal=True,
                      deterministic=deterministic)
        h = self.ln_f(x)
        return h if return_hidden else self.logits(h)

    # ------------------------------------------------------------------ incremental decoding
    def init_cache(self, context: jax.Array, context_mask: jax.Array | None, max_len: int) -> dict:
        """A cache for ``max_len`` positions: zeroed self-attention keys/values
        ``[B, max_len, heads, dh]`` per layer, and the context's cross-attention keys/values."""
        self._check_length(max_len)
        batch = context.shape[0]
        heads = self.cfg.num_heads
        shape = (batch, max_len, heads, self.cfg.hidden_size // heads)
        context = context.astype(self.dtype)
        cache = {"k": [], "v": [], "ck": [], "cv": [],
                 "context_mask": (jnp.ones(context.shape[:2], bool) if context_mask is None
                                  else jnp.asarray(context_mask) > 0)}
        for block in self.blocks:
            ck, cv = block.cross.kv(context)
            cache["k"].append(jnp.zeros(shape, self.dtype))
            cache["v"].append(jnp.zeros(shape, self.dtype))
            cache["ck"].append(ck)
            cache["cv"].append(cv)
        return cache

    def decode_step(self, token: jax.Array, pos: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Logits [B, V] (float32) of the token after ``token`` [B] at position ``pos`` (a scalar,
        shared by the batch); writes this position's keys/values into the cache."""
        max_len = cache["k"][0].shape[1]
        x = self.wte(token[:, None]) + self.wpe(jnp.reshape(pos, (1,)))[None]
        x = x.astype(self.dtype)
        visible = (jnp.arange(max_len) <= pos)[None]  # [1, max_len] key mask: positions 0..pos
        new = dict(cache, k=[], v=[])
        for i, block in enumerate(self.blocks):
            k, v = block.attn.kv(block.ln_1(x))
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"][i], k.astype(cache["k"][i].dtype), pos, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"][i], v.astype(cache["v"][i].dtype), pos, axis=1)
            new["k"].append(k)
            new["v"].append(v)
            x = block(x, (k, v), visible, (cache["ck"][i], cache["cv"][i]), cache["context_mask"], causal=False,
                      deterministic=True, single_query=True)
        return self.logits(self.ln_f(x))[:, 0], new


# ------------------------------------------------------------------------------ visual side
class PerceiverResampler(nnx.Module):
    """N learned latents cross-attending to the visual tokens (Flamingo's resampler: keys and
    values from the tokens and the latents together), ``layers`` times, then a LayerNorm."""

    def __init__(self, cfg: ReportDecoderConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.latents = layers.param(rngs, nnx.initializers.normal(cfg.initializer_range),
                                    (cfg.resampler_latents, d), (None, "embed"), cfg.param_dtype)
        self.norm_media = nnx.List([layers.LayerNorm(d, **kw) for _ in range(cfg.resampler_layers)])
        self.norm_latents = nnx.List([layers.LayerNorm(d, **kw) for _ in range(cfg.resampler_layers)])
        self.attn = nnx.List([Attention(cfg, rngs=rngs) for _ in range(cfg.resampler_layers)])
        self.norm_mlp = nnx.List([layers.LayerNorm(d, **kw) for _ in range(cfg.resampler_layers)])
        self.mlp = nnx.List([layers.Mlp(d, cfg.mlp_dim, approximate_gelu=True, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype, rngs=rngs)
                             for _ in range(cfg.resampler_layers)])
        self.norm = layers.LayerNorm(d, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
        batch = x.shape[0]
        lat = jnp.broadcast_to(self.latents[...].astype(x.dtype)[None], (batch,) + self.latents.shape)
        if mask is not None:
            mask = jnp.concatenate([jnp.asarray(mask) > 0, jnp.ones(lat.shape[:2], bool)], axis=1)
        for nm, nl, attn, nf, mlp in zip(self.norm_media, self.norm_latents, self.attn, self.norm_mlp, self.mlp):
            q = nl(lat)
            k, v = attn.kv(jnp.concatenate([nm(x), q], axis=1))
            lat = lat + attn.attend(q, k, v, mask, deterministic=deterministic)
            lat = lat + mlp(nf(lat))
        return self.norm(lat)


class ReportDecoder(nnx.Module):
    """Visual tokens [B, N, D_v] -> projection -> (resampler) -> context; GPT-2 :class:`TextDecoder`.

    ``__call__(input_ids, visual, visual_mask, attention_mask)`` -> logits [B, L, V] (training);
    :meth:`encode_visual` gives ``(context, context_mask)`` for :mod:`decoding`.
    """

    def __init__(self, cfg: ReportDecoderConfig, *, rngs: nnx.Rngs, text: TextDecoder | None = None):
        """``text``: an already built (e.g. imported) :class:`TextDecoder` of this ``cfg``."""
        self.cfg = cfg
        vw = cfg.visual_width or cfg.hidden_size
        self.visual_proj = layers.Dense((vw,), (cfg.hidden_size,), (None, ), ("embed",),
                                        kernel_init=nnx.initializers.normal(cfg.initializer_range),
                                        dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.resampler = PerceiverResampler(cfg, rngs=rngs) if cfg.resampler_latents else None
        self.text = text if text is not None else TextDecoder(cfg, rngs=rngs)

    def encode_visual(self, visual: jax.Array, visual_mask: jax.Array | None = None, *,
                      deterministic: bool = True) -> tuple[jax.Array, jax.Array | None]:
        """``(context [B, N' , D], context_mask [B, N'] or None)``: N' = N, or the latents."""
        vw = self.visual_proj.in_shape[0]
        if visual.ndim != 3 or visual.shape[-1] != vw:
            raise ValueError(f"visual tokens must be [batch, tokens, {vw}] (decoder visual_width), "
                             f"got {visual.shape}")
        context = self.visual_proj(visual)
        if self.resampler is not None:
            return self.resampler(context, visual_mask, deterministic=deterministic), None
        return context, (None if visual_mask is None else jnp.asarray(visual_mask) > 0)

    def __call__(self, input_ids: jax.Array, visual: jax.Array, visual_mask: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
        context, cmask = self.encode_visual(visual, visual_mask, deterministic=deterministic)
        return self.text(input_ids, context, cmask, attention_mask, deterministic=deterministic)

