"""`clip`: CT-CLIP-style volume-report alignment, the baseline every other task extends.

Loss: the contrastive objective named by `config.loss.kind` ('clip': symmetric InfoNCE;
'siglip': pairwise sigmoid) of every view's pooled image embedding against its report's
embedding, mean over views, with negatives from the whole global batch
(`t3d_jax.losses.contrastive`; `config.loss.chunked` never materialises B x B on a device).

Logit scale: the learnable log-scale is clamped to log(`loss.logit_scale_max`) *after each
optimizer update* (`after_update`, as OpenCLIP does), not inside the loss: a clamp in the
forward pass zeroes the scale's gradient above the cap, so a scale that Adam's momentum
carried past it could never come back.

Batch contract: `views` [B, V, X, Y, Z, C] float32, `input_ids` and `attention_mask`
[B, L] int32 (V = `data.num_views`, X, Y, Z = `data.view_size`, L = `preprocess.max_len`).

Report-impression term (weight `loss.impression_weight`; 0, off, by default): the same contrastive objective between each report's embedding (as trained:
sentences dropped and shuffled) and the embedding of its impression section alone
(`impression_ids`, `impression_mask` [B, `data.impression_len` or L], which the pipeline adds
when `prepare_config` sets `data.impression_view`), negatives from the whole batch. Why: the image
side only teaches the text tower the findings the image encoder already tells apart, so a
from-scratch tower leaves the others, and the negations around them, unread; the impression
lists exactly the positive findings, so matching a report to its own impression among the
batch's makes the report embedding carry every stated finding and ignore negated ones
(docs/training.md, "The demo, measured"). Text only: it uses no labels, only the report's
own sections.

Locked text tower (`model.text.locked`, docs/training.md): the report states come from the
cache of `launch/cache_text_features.py` (`data.text_features`) instead of the text encoder,
which stays in the model (evaluation embeds prompts with it) but is frozen by the optimizer
(`optim.freeze` must match `^text_encoder/`; the text projection stays trainable). The batch
then holds `text_states` [B, L, d_t] float16 (`data.text_features=True`, pooled here by
`model.text.pool`) or `text_pooled` [B, d_t] float16 (`data.text_features='pooled'`) in place
of `input_ids` (d_t = the hidden width of `model.text.size`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.data import text_features
from t3d_jax.losses import contrastive
from t3d_jax.tasks.base import Task
from t3d_jax.utils import UserValueError


class ClipTask(Task):
    name = "clip"

    def __init__(self, config):
        super().__init__(config)
        self.locked_text = text_features.locked_source(config)  # '' | 'tokens' | 'pooled'
        self.impression_weight = float(config.loss.get("impression_weight", 0.0))
        if self.impression_weight < 0:
            raise UserValueError(f"loss.impression_weight must be >= 0, got {self.impression_weight}")

    def prepare_config(self, config):
        """Asks the pipeline for each report's impression view (`data.impression_view`) when the
        report-impression term is on, so the one setting is `loss.impression_weight`."""
        config.data.impression_view = self.impression_weight > 0
        return config

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        from t3d_jax.models import build_model_from_config
        return build_model_from_config(self.config, rngs=rngs)

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        c = self.config
        b = self.global_batch_size()
        length = int(c.preprocess.max_len)
        spec = {
            "views": self.views_spec(),
            "input_ids": jax.ShapeDtypeStruct((b, length), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((b, length), jnp.int32),
        }
        if self.impression_weight:
            imp_len = int(c.data.get("impression_len", 0) or 0) or length
            spec["impression_ids"] = jax.ShapeDtypeStruct((b, imp_len), jnp.int32)
            spec["impression_mask"] = jax.ShapeDtypeStruct((b, imp_len), jnp.int32)
        if self.locked_text:  # cached report states replace the ids (module docstring)
            from t3d_jax.models.bert import BertConfig

            del spec["input_ids"]
            width = BertConfig.from_size(str(c.model.text.size)).hidden_size
            shape = (b, length, width) if self.locked_text == "tokens" else (b, width)
            spec[text_features.BATCH_KEYS[self.locked_text]] = jax.ShapeDtypeStruct(
                shape, jnp.dtype(text_features.DTYPE))
        return spec

    def encode(self, model, batch: dict, deterministic: bool):
        """(image encoder output over all B*V views, image embeddings [B,V,D], text states
        [B,L,d_t], text embeddings [B,D])."""
        views = jnp.asarray(batch["views"])
        if views.ndim != 6:
            raise ValueError(f"batch['views'] must be [B, V, X, Y, Z, C], got {views.shape}")
        b, v = views.shape[:2]
        image = model.volume_tokens(views.reshape(b * v, *views.shape[2:]), deterministic=deterministic)
        image_emb = model.project_image(image["pooled"]).reshape(b, v, -1)
        if self.locked_text:
            text_states, text_emb = self.cached_text(model, batch)
        else:
            text_states, text_emb = model.encode_text(batch["input_ids"], batch["attention_mask"],
                                                      deterministic=deterministic)
        return image, image_emb, text_states, text_emb

    def cached_text(self, model, batch: dict):
        """(text states [B,L,d_t] or None, text embeddings [B,D]) of the locked tower's cached
        features: the live tower's pooling and the trainable projection on them."""
        from t3d_jax.models.two_tower import pool_text

        if self.locked_text == "pooled":
            return None, model.project_text(jnp.asarray(batch["text_pooled"], model.dtype))
        states = jnp.asarray(batch["text_states"], model.dtype)
        return states, model.project_text(pool_text(states, batch["attention_mask"], model.text_pool))

    def contrastive(self, model, image_emb, text_emb) -> tuple[jax.Array, dict]:
        bias = None if model.logit_bias is None else model.logit_bias[...]
        loss = contrastive.contrastive_loss(
            model.loss_kind, image_emb, text_emb, model.logit_scale[...], bias,
            max_scale=None, chunked=bool(self.config.loss.get("chunked", False)),
            batch_axes=self.batch_axes)
        metrics = {"loss_clip": loss,
                   "logit_scale": contrastive.effective_scale(model.logit_scale[...], None)}
        if bias is not None:
            metrics["logit_bias"] = jnp.asarray(bias, jnp.float32)
        return loss, metrics

    def impression_term(self, model, batch: dict, text_emb, deterministic: bool) -> tuple[jax.Array, dict]:
        """``loss.impression_weight`` x the contrastive loss of reports against their own
        impressions (module docstring); (0, {}) when the weight is 0."""
        if not self.impression_weight:
            return jnp.zeros((), jnp.float32), {}
        _, imp_emb = model.encode_text(batch["impression_ids"], batch["impression_mask"],
                                       deterministic=deterministic)
        bias = None if model.logit_bias is None else model.logit_bias[...]
        loss = contrastive.contrastive_loss(
            model.loss_kind, text_emb[:, None], imp_emb, model.logit_scale[...], bias, max_scale=None,
            chunked=bool(self.config.loss.get("chunked", False)), batch_axes=self.batch_axes)
        return self.impression_weight * loss, {"loss_impression": loss}

    def after_update(self, params: dict) -> dict:
        """Clamps the log-scale to log(loss.logit_scale_max) (see the module docstring)."""
        cap = self.config.loss.get("logit_scale_max", 100.0)
        if not cap or "logit_scale" not in params:
            return params
        return dict(params, logit_scale=jnp.minimum(params["logit_scale"], math.log(float(cap))))

    def loss(self, model, batch, *, step, deterministic=False):
        del step
        _, image_emb, _, text_emb = self.encode(model, batch, deterministic)
        loss, metrics = self.contrastive(model, image_emb, text_emb)
        term, more = self.impression_term(model, batch, text_emb, deterministic)
        loss = loss + term
        return loss, {"loss": loss, **metrics, **more}
