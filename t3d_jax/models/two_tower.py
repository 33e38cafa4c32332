"""Two-tower volume-report models: ``T3D`` (CLIP + TMA) and the CT-CLIP-style ``CLIPModel``.

Both are built from ``config.model`` (+ ``config.loss`` and ``config.data.view_size``) and
expose the interface the trainer, the evaluators and the exporter use:

* ``loss(batch, *, step, deterministic=False) -> (loss, metrics)``: ``batch`` is the training
  batch contract (``views`` [B,V,X,Y,Z,1], ``boxes`` [B,V,2,3], ``input_ids``,
  ``attention_mask`` [B,L]); ``step`` may be a traced int scalar (prototype freezing uses it
  inside ``jnp.where``); ``metrics`` is a dict of float32 scalars.
* ``embed_volume(volume [B,X,Y,Z,1]) -> [B,D]`` and ``embed_text(input_ids, attention_mask)
  -> [B,D]``: L2-normalised float32 embeddings, deterministic (no patch dropout, no dropout).
* ``volume_tokens(volume)``: the image encoder's output dict (pooled, tokens, token_index, grid).

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
from flax import nnx

from t3d_jax.losses import contrastive
from t3d_jax.losses import tma as tma_loss_lib
from t3d_jax.models import layers
from t3d_jax.models.bert import BertConfig, BertEncoder
from t3d_jax.models.tma_head import TMAHead, l2_normalize
from t3d_jax.models.vit3d import ViT3D, ViT3DConfig

TEXT_POOLS = ("cls", "mean")
DEFAULT_LOSS = {"kind": "clip", "chunked": False, "logit_scale_init": contrastive.CLIP_LOGIT_SCALE_INIT,
                "logit_scale_max": 100.0}


def _get(cfg, key, default):
    if cfg is None:
        return default
    try:
        return cfg.get(key, default)
    except AttributeError:
        return getattr(cfg, key, default)


def build_text_encoder(text_cfg, *, dtype, rngs: nnx.Rngs) -> BertEncoder:
    """``model.text.hf_dir`` (a local Hugging Face BERT, loaded by the converter) or ``model.text.size``."""
    hf_dir = _get(text_cfg, "hf_dir", "")
    remat = _get(text_cfg, "remat", "none")
    scan_layers = bool(_get(text_cfg, "scan_layers", False))
    if hf_dir:
        from t3d_jax.models import convert  # reads torch/safetensors files: import only when used

        return convert.load_hf_bert(hf_dir, dtype=dtype, rngs=rngs, remat=remat, scan_layers=scan_layers)
    max_len = int(_get(text_cfg, "max_len", 128))
    cfg = BertConfig.from_size(_get(text_cfg, "size", "tiny"), vocab_size=int(_get(text_cfg, "vocab_size", 30522)),
                               max_position_embeddings=max(512, max_len), remat=remat,
                               scan_layers=scan_layers, dtype=dtype)
    return BertEncoder(cfg, rngs=rngs)


class CLIPModel(nnx.Module):
    """CT-CLIP-style two-tower baseline: ViT3D + BERT, linear projections, global-batch CLIP/SigLIP."""

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
        self.chunked = bool(loss_cfg["chunked"])
        self.logit_scale_max = float(loss_cfg["logit_scale_max"])

        self.image_encoder = ViT3D(ViT3DConfig.from_config(image_cfg, image_size=tuple(image_size), dtype=dtype),
                                   rngs=rngs)
        self.text_encoder = build_text_encoder(model_config.text, dtype=dtype, rngs=rngs)
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

    def _image_embedding(self, pooled: jax.Array) -> jax.Array:
        return l2_normalize(self.image_proj(pooled))

    def _text_forward(self, input_ids, attention_mask, deterministic):
        out = self.text_encoder(input_ids, attention_mask, deterministic=deterministic)
        hidden = out["hidden"]
        if self.text_pool == "mean":
            weights = jnp.asarray(attention_mask, hidden.dtype)[..., None]
            pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        else:
            pooled = hidden[:, 0]
        return hidden, l2_normalize(self.text_proj(pooled))

    def embed_volume(self, volume: jax.Array) -> jax.Array:
        """L2-normalised float32 [B, D] volume embeddings (deterministic)."""
        return self._image_embedding(self.volume_tokens(volume)["pooled"])

    def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """L2-normalised float32 [B, D] report embeddings (deterministic)."""
        return self._text_forward(input_ids, attention_mask, True)[1]

    # ------------------------------------------------------------------ objectives
    def _encode_batch(self, batch, deterministic):
        views = jnp.asarray(batch["views"])
        if views.ndim != 6:
            raise ValueError(f"batch['views'] must be [B, V, X, Y, Z, C], got {views.shape}")
        b, v = views.shape[:2]
        image = self.volume_tokens(views.reshape(b * v, *views.shape[2:]), deterministic=deterministic)
        image_emb = self._image_embedding(image["pooled"]).reshape(b, v, -1)
        text_states, text_emb = self._text_forward(batch["input_ids"], batch["attention_mask"], deterministic)
        return image, image_emb, text_states, text_emb

    def _contrastive(self, image_emb, text_emb):
        bias = None if self.logit_bias is None else self.logit_bias[...]
        loss = contrastive.contrastive_loss(self.loss_kind, image_emb, text_emb, self.logit_scale[...], bias,
                                            max_scale=self.logit_scale_max, chunked=self.chunked)
        metrics = {"loss_clip": loss,
                   "logit_scale": contrastive.effective_scale(self.logit_scale[...], self.logit_scale_max)}
        if bias is not None:
            metrics["logit_bias"] = jnp.asarray(bias, jnp.float32)
        return loss, metrics

    def loss(self, batch: dict, *, step=0, deterministic: bool = False) -> tuple[jax.Array, dict]:
        """Contrastive loss of every view against its report (mean over views)."""
        del step
        _, image_emb, _, text_emb = self._encode_batch(batch, deterministic)
        loss, metrics = self._contrastive(image_emb, text_emb)
        return loss, {"loss": loss, **metrics}


class T3D(CLIPModel):
    """CLIP two-tower + TMA head and prototypes; loss = L_clip + weight * L_tma (DESIGN.md §2)."""

    def __init__(self, model_config, *, rngs: nnx.Rngs, loss_config=None, view_size=None):
        super().__init__(model_config, rngs=rngs, loss_config=loss_config, view_size=view_size)
        tma_cfg = model_config.tma
        self.tma_weight = float(_get(tma_cfg, "weight", 1.0))
        self.tma_hist_weight = float(_get(tma_cfg, "hist_weight", 0.0))
        self.tma_temperature = float(_get(tma_cfg, "temperature", 0.1))
        self.tma_epsilon = float(_get(tma_cfg, "sinkhorn_epsilon", 0.05))
        self.tma_iters = int(_get(tma_cfg, "sinkhorn_iters", 3))
        self.freeze_prototypes_steps = int(_get(tma_cfg, "freeze_prototypes_steps", 0))
        vit = self.image_encoder.cfg
        self.tma_head = TMAHead(
            vit.width, self.text_encoder.cfg.hidden_size, self.embed_dim, int(_get(tma_cfg, "num_prototypes", 64)),
            num_heads=int(_get(tma_cfg, "num_heads", 0) or vit.num_heads),
            mlp_dim=int(_get(tma_cfg, "mlp_dim", 0)) or None, dtype=self.dtype, rngs=rngs)

    def prototypes(self, step) -> jax.Array:
        """Normalised prototypes; gradient blocked while ``step < freeze_prototypes_steps``."""
        protos = self.tma_head.normalized_prototypes()
        if self.freeze_prototypes_steps > 0:
            frozen = jnp.asarray(step) < self.freeze_prototypes_steps
            protos = jnp.where(frozen, jax.lax.stop_gradient(protos), protos)
        return protos

    def loss(self, batch: dict, *, step=0, deterministic: bool = False) -> tuple[jax.Array, dict]:
        image, image_emb, text_states, text_emb = self._encode_batch(batch, deterministic)
        loss_clip, metrics = self._contrastive(image_emb, text_emb)
        b, v = image_emb.shape[:2]
        # Every view attends to its example's report: repeat the text over views (b-major order,
        # as the views were flattened).
        mask = jnp.repeat(jnp.asarray(batch["attention_mask"]), v, axis=0)
        token_emb = self.tma_head(image["tokens"], jnp.repeat(text_states, v, axis=0), mask)
        n = token_emb.shape[1]
        out = tma_loss_lib.tma_loss(
            token_emb.reshape(b, v, n, -1), self.prototypes(step), jnp.asarray(batch["boxes"]), image["grid"],
            image["token_index"].reshape(b, v, n), temperature=self.tma_temperature,
            sinkhorn_epsilon=self.tma_epsilon, sinkhorn_iters=self.tma_iters, hist_weight=self.tma_hist_weight)
        loss = loss_clip + self.tma_weight * out.loss
        metrics.update(loss=loss, loss_tma=out.loss, loss_tma_tok=out.token_loss, loss_tma_hist=out.hist_loss,
                       tma_matched_fraction=out.matched_fraction)
        return loss, metrics


def model_class(name: str):
    models = {"t3d": T3D, "clip": CLIPModel}
    if name not in models:
        raise ValueError(f"config.model.name: unknown model {name!r}; choose one of {sorted(models)}")
    return models[name]
