"""BERT text encoder (post-LN, as the original BERT), laid out so Hugging Face BERT loads.

Computation, matching ``transformers.BertModel`` with absolute position embeddings:
  h0 = LN(word[ids] + position[arange(L)] + token_type[tt]); dropout
  per layer: a = LN(h + Dropout(Attn(h, padding mask))); h = LN(a + Dropout(W2 gelu(W1 a)))
  pooled = tanh(W_p h[:, 0] + b_p)
GELU is the exact erf form (Hugging Face ``hidden_act='gelu'``); ``'gelu_new'`` /
``'gelu_pytorch_tanh'`` select the tanh approximation.

Parameter paths (what :mod:`t3d_jax.models.convert` maps Hugging Face names onto):
  embeddings/{word,position,token_type}/embedding, embeddings/norm/{scale,bias},
  layers/i/attn/{query,key,value}/{kernel [h, heads, dh], bias [heads, dh]},
  layers/i/attn/out/{kernel [heads, dh, h], bias}, layers/i/attn_norm,
  layers/i/mlp/{fc1,fc2}, layers/i/mlp_norm, pooler/{kernel,bias}.
With ``scan_layers`` the ``layers/i/...`` entries become one ``layers/...`` entry per weight with
a leading layer axis (the converters stack into that layout; see ``convert.match_layer_stacks``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.models import attention as attention_lib
from t3d_jax.models import layers
from t3d_jax.utils import read_hf_config

# hidden, layers, heads, intermediate
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 2, 256),
    "mini": (256, 4, 4, 1024),  # google/bert_uncased_L-4_H-256_A-4
    "minilm": (384, 6, 12, 1536),  # all-MiniLM-L6 / MiniLM-L6-H384
    "base": (768, 12, 12, 3072),
}

_GELU_APPROX = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    remat: str = "none"
    scan_layers: bool = False  # layers stacked and run by nnx.scan (see layers.make_layer_stack)
    attention: str = "auto"  # attention implementation (t3d_jax/models/attention.py; config model.attention)
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.hidden_act not in _GELU_APPROX:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; one of {sorted(_GELU_APPROX)}")
        layers.remat_policy(self.remat)
        attention_lib.check_implementation(self.attention)

    @classmethod
    def from_size(cls, size: str, **overrides) -> "BertConfig":
        if size not in SIZES:
            raise ValueError(f"unknown BERT size {size!r}; choose one of {sorted(SIZES)} or a Hugging Face dir")
        h, n, a, i = SIZES[size]
        return cls(**{"hidden_size": h, "num_layers": n, "num_heads": a, "intermediate_size": i, **overrides})

    @classmethod
    def from_hf(cls, config_json, **overrides) -> "BertConfig":
        """Reads a Hugging Face ``config.json`` (file or the directory holding it)."""
        path, c = read_hf_config(config_json, "bert", "BERT")
        pet = c.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"{path}: position_embedding_type {pet!r} not supported (only 'absolute')")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in c]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        kw = dict(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
            max_position_embeddings=c.get("max_position_embeddings", 512),
            type_vocab_size=c.get("type_vocab_size", 2), layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            hidden_act=c.get("hidden_act", "gelu"), hidden_dropout=c.get("hidden_dropout_prob", 0.1),
            attention_dropout=c.get("attention_probs_dropout_prob", 0.1),
            initializer_range=c.get("initializer_range", 0.02), pad_token_id=c.get("pad_token_id", 0) or 0)
        kw.update(overrides)
        return cls(**kw)


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        pdt = layers.as_dtype(cfg.param_dtype)
        self.dtype = layers.as_dtype(cfg.dtype)
        init = nnx.initializers.normal(cfg.initializer_range)
        self.word = _Embed(rngs, init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
        self.position = _Embed(rngs, init, (cfg.max_position_embeddings, cfg.hidden_size), (None, "embed"), pdt)
        self.token_type = _Embed(rngs, init, (cfg.type_vocab_size, cfg.hidden_size), (None, "embed"), pdt)
        self.norm = layers.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                                     param_dtype=pdt, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, input_ids, token_type_ids, *, deterministic: bool) -> jax.Array:
        length = input_ids.shape[1]
        if length > self.position.embedding.shape[0]:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{self.position.embedding.shape[0]}")
        x = (self.word(input_ids) + self.position(jnp.arange(length))[None]
             + self.token_type(token_type_ids))
        return self.dropout(self.norm(x.astype(self.dtype)), deterministic=deterministic)


class _Embed(nnx.Module):
    """Lookup table with logical names (nnx.Embed without its dtype promotion surprises)."""

    def __init__(self, rngs, init, shape, names, param_dtype):
        self.embedding = layers.param(rngs, init, shape, names, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.initializer_range)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.attn = layers.MultiHeadAttention(cfg.hidden_size, cfg.num_heads, qkv_bias=True, kernel_init=init,
                                              dropout_rate=cfg.attention_dropout, attention=cfg.attention, **kw)
        self.attn_norm = layers.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)
        self.mlp = layers.Mlp(cfg.hidden_size, cfg.intermediate_size, kernel_init=init,
                              approximate_gelu=_GELU_APPROX[cfg.hidden_act], **kw)
        self.mlp_norm = layers.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        a = self.attn(x, mask=mask, deterministic=deterministic)
        x = self.attn_norm(x + self.dropout(a, deterministic=deterministic))
        m = self.mlp(x)
        return self.mlp_norm(x + self.dropout(m, deterministic=deterministic))


class BertEncoder(nnx.Module):
    """``__call__(input_ids, attention_mask, token_type_ids=None) -> {hidden [B,L,h], pooled [B,h]}``."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.layers = layers.make_layer_stack(lambda r: BertLayer(cfg, rngs=r), cfg.num_layers, rngs,
                                              scanned=cfg.scan_layers)
        self.pooler = layers.Dense((cfg.hidden_size,), (cfg.hidden_size,), ("embed",), ("mlp",), kernel_init=init,
                                   dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, *, deterministic: bool = True) -> dict:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, jnp.asarray(token_type_ids, jnp.int32), deterministic=deterministic)
        mask = jnp.asarray(attention_mask) > 0
        forward = layers.maybe_remat(_layer_forward, self.cfg.remat, static_argnums=(3,))
        x = layers.apply_layer_stack(lambda layer, h: forward(layer, h, mask, deterministic), self.layers, x,
                                     scanned=self.cfg.scan_layers)
        pooled = jnp.tanh(self.pooler(x[:, 0]))
        return {"hidden": x, "pooled": pooled}


def _layer_forward(layer: BertLayer, x, mask, deterministic):
    return layer(x, mask, deterministic)
