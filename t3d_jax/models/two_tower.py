"""Two-tower volume-report models: ``T3D`` (CLIP + TMA) and the CT-CLIP-style ``CLIPModel``.

Both are built from ``config.model`` (+ ``config.loss`` and ``config.data.view_size``). The
objectives live in the tasks (``t3d_jax/tasks/clip.py``, ``t3d.py``); the models expose the
parts the tasks, the evaluators and the exporter use:

* ``volume_tokens(volume, deterministic=)``, ``project_image(pooled)``, ``encode_text(ids,
  mask, deterministic=) -> (hidden states, embedding)``: the pieces a task's loss combines;
* ``embed_volume(volume [B,X,Y,Z,1]) -> [B,D]`` and ``embed_text(input_ids, attention_mask)
  -> [B,D]``: L2-normalised float32 embeddings, deterministic (no patch dropout, no dropout).
* ``volume_tokens(volume)``: the image encoder's output dict (pooled, tokens, token_index, grid).
* ``project_text(pooled)``: the text projection alone, for report states computed elsewhere
  (the locked-text mode, ``model.text.locked``: a frozen pretrained text tower whose states
  are cached with the data; ``frozen_text_tower`` is that tower as a host function).

Submodule names are part of the contract (optimizer lr multipliers and freeze regexes match
path prefixes): ``image_encoder``, ``image_proj``, ``text_encoder``, ``text_proj``,
``tma_head``, ``logit_scale``, ``logit_bias``.

Embeddings: image = normalize(W_i pooled_tokens) (pooling as ``model.image.pool``); text =
normalize(W_t h) with h chosen by ``model.text.pool``: 'cls' = the last hidden state of [CLS]
(as CT-CLIP; BERT's tanh pooler is not used, many medical BERT checkpoints ship it untrained) or
'mean' = the mean of the last hidden states over the non-padding tokens. A randomly initialised
post-LN BERT gives an almost constant [CLS] state (every report looks alike to it), so a
from-scratch text tower uses 'mean', whose average over the report's own tokens differs between
reports from the first step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3d_jax.losses import contrastive
from t3d_jax.models import layers
from t3d_jax.models.bert import BertConfig, BertEncoder
from t3d_jax.models.msvlm import MSVLM, MSVLMConfig
from t3d_jax.models.resnet3d import ResNet3D, ResNet3DConfig
from t3d_jax.models.swin3d import Swin3D, Swin3DConfig
from t3d_jax.models.tma_head import TMAHead, l2_normalize
from t3d_jax.models.vit3d import ViT3D, ViT3DConfig
from t3d_jax.utils import cfg_get

TEXT_POOLS = ("cls", "mean")
DEFAULT_LOSS = {"kind": "clip", "logit_scale_init": contrastive.CLIP_LOGIT_SCALE_INIT,
                "logit_scale_max": 100.0}


_get = cfg_get


def build_text_encoder(text_cfg, *, dtype, rngs: nnx.Rngs, attention: str = "auto") -> BertEncoder:
    """A BERT of ``model.text.size``. Pretrained weights (a local Hugging Face BERT folder) are
    loaded into it at initialisation by ``init_from.hf_bert_dir`` (t3d_jax/train/pretrained.py),
    so building the model never reads files (the abstract model, AOT and evaluation need none)."""
    remat = _get(text_cfg, "remat", "none")
    scan_layers = bool(_get(text_cfg, "scan_layers", False))
    max_len = int(_get(text_cfg, "max_len", 128))
    cfg = BertConfig.from_size(_get(text_cfg, "size", "tiny"), vocab_size=int(_get(text_cfg, "vocab_size", 30522)),
                               max_position_embeddings=max(512, max_len), remat=remat,
                               scan_layers=scan_layers, attention=attention,
                               attention_dropout=float(_get(text_cfg, "attention_dropout", 0.1)), dtype=dtype)
    return BertEncoder(cfg, rngs=rngs)


IMAGE_ENCODERS = ("vit3d", "resnet3d", "swin3d", "msvlm")


def build_image_encoder(image_cfg, *, image_size, dtype, rngs: nnx.Rngs, attention: str = "auto"):
    """The image encoder named by ``model.image.name``: 'vit3d' (default; ``model.image.size``,
    ``patch_size``, ...), 'resnet3d' (MONAI-layout 3D ResNet, ``model.image.resnet.*``) or 'swin3d'
    (MONAI SwinUNETR's 3D Swin transformer, ``model.image.swin.*``) or 'msvlm' (per-slice 2D ViT +
    inter-slice transformer, ``model.image.msvlm.*``; slices of ``view_size[:2]``, any slice
    count, plus a ``mask`` output for its padded slice slots). Each returns ``{pooled,
    tokens, token_index, grid}`` and carries ``cfg.width`` / ``cfg.num_heads``."""
    name = str(_get(image_cfg, "name", "vit3d"))
    if name == "vit3d":
        return ViT3D(ViT3DConfig.from_config(image_cfg, image_size=tuple(image_size), dtype=dtype,
                                             attention=attention), rngs=rngs)
    if name == "resnet3d":
        return ResNet3D(ResNet3DConfig.from_config(image_cfg, dtype=dtype), rngs=rngs)
    if name == "swin3d":
        return Swin3D(Swin3DConfig.from_config(image_cfg, dtype=dtype), rngs=rngs)
    if name == "msvlm":
        return MSVLM(MSVLMConfig.from_config(image_cfg, image_size=tuple(image_size), dtype=dtype,
                                             attention=attention), rngs=rngs)
    raise ValueError(f"config.model.image.name: unknown image encoder {name!r}; choose one of {IMAGE_ENCODERS}")


def pool_text(hidden: jax.Array, attention_mask: jax.Array, pool: str) -> jax.Array:
    """The report vector [B, d_t] of the last hidden states [B, L, d_t] (``model.text.pool``):
    'cls' = the [CLS] state, 'mean' = the mean over the non-padding tokens. One definition for
    the live tower and the locked-text cache (t3d_jax/data/text_features.py)."""
    if pool == "mean":
        weights = jnp.asarray(attention_mask, hidden.dtype)[..., None]
        return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    if pool == "cls":
        return hidden[:, 0]
    raise ValueError(f"unknown text pooling {pool!r}; choose one of {TEXT_POOLS}")


def frozen_text_tower(hf_bert_dir, *, pool: str | None = None):
    """The locked text tower of a local Hugging Face BERT folder as a host function:
    ``fn(input_ids [B,L], attention_mask [B,L]) -> float32 NumPy`` last hidden states
    [B, L, d_t] (``pool=None``) or pooled report vectors [B, d_t] (``pool`` 'cls' | 'mean').

    Our ``BertEncoder`` with the folder's weights (``convert.load_hf_bert``, the same converter
    as ``init_from.hf_bert_dir``), float32, deterministic, jitted once per input shape. What
    ``launch/cache_text_features.py`` runs over a prepared folder's reports."""
    from t3d_jax.models import convert

    if pool is not None and pool not in TEXT_POOLS:
        raise ValueError(f"unknown text pooling {pool!r}; choose one of {TEXT_POOLS}")
    with nnx.use_eager_sharding(False):
        encoder = convert.load_hf_bert(hf_bert_dir, dtype="float32", param_dtype="float32")
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def run(state, input_ids, attention_mask):
        hidden = nnx.merge(graphdef, state)(input_ids, attention_mask, deterministic=True)["hidden"]
        hidden = hidden.astype(jnp.float32)
        return hidden if pool is None else pool_text(hidden, attention_mask, pool)

    def fn(input_ids, attention_mask):
        return np.asarray(run(state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)))

    return fn, encoder.cfg


class CLIPModel(nnx.Module):
    """CT-CLIP-style two-tower baseline: ViT3D (or ResNet3D, ``model.image.name``) + BERT, linear
    projections, global-batch CLIP/SigLIP."""

    def __init__(self, model_config, *, rngs: nnx.Rngs, loss_config=None, view_size=None):
        dtype = layers.as_dtype(_get(model_config, "dtype", "float32"))
        image_cfg = model_config.image
        image_size = view_size or _get(image_cfg, "image_size", None) or ViT3DConfig.image_size
        self.dtype = dtype
        self.embed_dim = int(model_config.embed_dim)
        loss_cfg = {k: _get(loss_config, k, v) for k, v in DEFAULT_LOSS.items()}
        self.loss_kind = str(loss_cfg["kind"])
        if self.loss_kind not in ("clip", "siglip"):
            raise ValueError(f"config.loss.kind: unknown contrastive loss {self.loss_kind!r}; "
                             "choose 'clip' or 'siglip'")
        self.logit_scale_max = float(loss_cfg["logit_scale_max"])

        attention = str(_get(model_config, "attention", "auto"))  # t3d_jax/models/attention.py
        self.attention = attention
        self.image_encoder = build_image_encoder(image_cfg, image_size=image_size, dtype=dtype, rngs=rngs,
                                                 attention=attention)
        self.text_encoder = build_text_encoder(model_config.text, dtype=dtype, rngs=rngs, attention=attention)
        self.text_pool = str(_get(model_config.text, "pool", "cls"))
        if self.text_pool not in TEXT_POOLS:
            raise ValueError(f"config.model.text.pool: unknown pooling {self.text_pool!r}; choose one of {TEXT_POOLS}")
        image_width = self.image_encoder.cfg.width
        text_width = self.text_encoder.cfg.hidden_size
        kw = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.image_proj = layers.Dense((image_width,), (self.embed_dim,), ("embed",), ("joint",), **kw)
        self.text_proj = layers.Dense((text_width,), (self.embed_dim,), ("embed",), ("joint",), **kw)
        if self.loss_kind == "siglip":
            scale_init = _get(loss_config, "siglip_logit_scale_init", contrastive.SIGLIP_LOGIT_SCALE_INIT)
            bias_init = _get(loss_config, "siglip_logit_bias_init", contrastive.SIGLIP_LOGIT_BIAS_INIT)
        else:
            scale_init, bias_init = float(loss_cfg["logit_scale_init"]), None
        self.logit_scale = nnx.Param(jnp.asarray(scale_init, jnp.float32), out_sharding=(), eager_sharding=False)
        self.logit_bias = (nnx.Param(jnp.asarray(bias_init, jnp.float32), out_sharding=(), eager_sharding=False)
                           if bias_init is not None else nnx.data(None))

    # ------------------------------------------------------------------ embeddings
    def volume_tokens(self, volume: jax.Array, *, deterministic: bool = True) -> dict:
        """Image-encoder output for ``volume`` [B,X,Y,Z,C]: pooled, tokens, token_index, grid."""
        return self.image_encoder(volume, deterministic=deterministic)

    def project_image(self, pooled: jax.Array) -> jax.Array:
        """Pooled image-encoder features [.., width] -> L2-normalised float32 embeddings [.., D]."""
        return l2_normalize(self.image_proj(pooled))

    def encode_text(self, input_ids, attention_mask, *, deterministic: bool = True):
        """(last hidden states [B,L,d_t], L2-normalised float32 report embeddings [B,D])."""
        out = self.text_encoder(input_ids, attention_mask, deterministic=deterministic)
        hidden = out["hidden"]
        return hidden, self.project_text(pool_text(hidden, attention_mask, self.text_pool))

    def project_text(self, pooled: jax.Array) -> jax.Array:
        """Pooled text states [.., d_t] (``model.text.pool``) -> L2-normalised float32 [.., D].
        The locked-text mode (``model.text.locked``) calls it on cached states."""
        return l2_normalize(self.text_proj(pooled))

    def embed_volume(self, volume: jax.Array) -> jax.Array:
        """L2-normalised float32 [B, D] volume embeddings (deterministic)."""
        return self.project_image(self.volume_tokens(volume)["pooled"])

    def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """L2-normalised float32 [B, D] report embeddings (deterministic)."""
        return self.encode_text(input_ids, attention_mask, deterministic=True)[1]


class T3D(CLIPModel):
    """The CLIP two-tower plus the TMA head and its prototypes (the `t3d` task's model)."""

    def __init__(self, model_config, *, rngs: nnx.Rngs, loss_config=None, view_size=None):
        super().__init__(model_config, rngs=rngs, loss_config=loss_config, view_size=view_size)
        tma_cfg = model_config.tma
        image = self.image_encoder.cfg  # ViT3DConfig, ResNet3DConfig or Swin3DConfig: width, num_heads
        self.tma_head = TMAHead(
            image.width, self.text_encoder.cfg.hidden_size, self.embed_dim, int(_get(tma_cfg, "num_prototypes", 64)),
            num_heads=int(_get(tma_cfg, "num_heads", 0) or image.num_heads),
            mlp_dim=int(_get(tma_cfg, "mlp_dim", 0)) or None, attention=self.attention, dtype=self.dtype, rngs=rngs)


def model_class(name: str):
    models = {"t3d": T3D, "clip": CLIPModel}
    if name not in models:
        raise ValueError(f"config.model.name: unknown model {name!r}; choose one of {sorted(models)}")
    return models[name]
