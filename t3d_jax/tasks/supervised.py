"""`supervised`: multi-label classification of the volume, the ceiling a pretraining is judged by.

The image encoder of the other tasks (ViT3D or ResNet3D, the same `model.image.*` keys) and one linear
head over its pooled embedding give one logit per label of `data.label_names` (18 CT-RATE
findings). The loss is the binary cross-entropy of each label's sigmoid against the record's
labels; a label that is NaN (unknown) is left out of the mean. The same task is the
classification fine-tune (configs/finetune_cls.py, docs/finetuning.md): the encoder initialised
from a pretraining checkpoint (`init_from.checkpoint` + `init_from.checkpoint_params`), trained
whole, frozen (`optim.freeze`) or with layer-wise learning-rate decay (`optim.layer_decay`).

Head (`model.head.pool`): `pooled` (default) reads the encoder's pooled embedding (the mean of
its tokens, or the CLS token with `model.image.pool = cls`); `attention` pools the encoder's
tokens with a learned query per head (`AttentionPool`, `model.head.num_heads`, 0 = the
encoder's heads), then the same linear head. Trained with the normal
trainer (`launch/train.py --config=configs/supervised.py:demo`), it says how much of the
labels the data and the demo's encoder and budget allow at all; `bench/ceiling.py` reports
that figure per label beside a pooled-voxel logistic-regression baseline.

Loss: with V views per example (each view is one more sample carrying the example's labels),

    loss = sum_{b,v,l: y[b,l] known} BCE(logit[b,v,l], y[b,l]) / (V * #{(b,l): y[b,l] known})

i.e. the mean over known (example, label) pairs of the view-averaged BCE
(BCE(z, y) = max(z, 0) - z*y + log(1 + exp(-|z|)), the stable form). With positive weights
w_l (`loss.pos_weight`, PyTorch's `BCEWithLogitsLoss(pos_weight=)`):

    BCE_w(z, y) = w_l * y * softplus(-z) + (1 - y) * softplus(z)

same normalisation. `loss.pos_weight`: "none" (default, w = 1), "balanced" (w_l = negatives /
positives of label l over the training records the run trains on -- after `data.train_fraction`;
1 for a label without a positive or a negative there) or a list of L floats. "balanced" is
resolved into the list when training starts (`prepare_config`), so the run's config.json
records the weights.

Batch contract: `views` [B, V, X, Y, Z, C] float32 and `labels` [B, L] float32 (0/1, NaN =
unknown), V = `data.num_views`, X, Y, Z = `data.view_size`, L = len(`data.label_names`).

The model (`SupervisedModel`): submodules `image_encoder` and `label_head` (lr multipliers and
freeze regexes match these prefixes); `predict_labels(volume [B,X,Y,Z,C]) -> [B, L]`
probabilities and `label_logits(volume)`, both deterministic (no patch dropout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import copy
import math

from t3d_jax.models import layers
from t3d_jax.models.two_tower import build_image_encoder
from t3d_jax.tasks.base import Task, f32
from t3d_jax.utils import UserValueError, cfg_get

HEAD_POOLS = ("pooled", "attention")


class AttentionPool(nnx.Module):
    """Attention pooling of tokens [B, N, W] -> [B, W]: one learned query per head attends over
    the tokens (keys and values are linear maps of them), the heads are concatenated and
    projected back to W. The query starts small (normal, 0.02), so pooling starts near a
    uniform mean of the values."""

    def __init__(self, width: int, num_heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"attention pooling: width {width} is not a multiple of {num_heads} heads")
        head_dim = width // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.query = layers.param(rngs, nnx.initializers.normal(0.02), (num_heads, head_dim), ("heads", "kv"))
        kw = dict(dtype=dtype, rngs=rngs)
        self.key = layers.Dense((width,), (num_heads, head_dim), ("embed",), ("heads", "kv"), **kw)
        self.value = layers.Dense((width,), (num_heads, head_dim), ("embed",), ("heads", "kv"), **kw)
        self.out = layers.Dense((num_heads, head_dim), (width,), ("heads", "kv"), ("embed",), **kw)
        self.norm = layers.LayerNorm(width, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.norm(tokens)
        k, v = self.key(x), self.value(x)  # [B, N, H, D]
        logits = jnp.einsum("hd,bnhd->bhn", self.query[...].astype(k.dtype), k).astype(jnp.float32)
        weights = jax.nn.softmax(logits / math.sqrt(self.head_dim), axis=-1)
        pooled = jnp.einsum("bhn,bnhd->bhd", weights.astype(v.dtype), v)
        return self.out(pooled)


class SupervisedModel(nnx.Module):
    """ViT3D + a linear head over the pooled embedding: one logit per label."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        dtype = layers.as_dtype(cfg_get(config.model, "dtype", "float32"))
        view_size = tuple(int(s) for s in config.data.view_size)
        self.label_names = tuple(str(n) for n in config.data.label_names)
        if not self.label_names:
            raise ValueError("config.data.label_names is empty: the supervised task needs labels")
        self.image_encoder = build_image_encoder(
            config.model.image, image_size=view_size, dtype=dtype, rngs=rngs,
            attention=str(cfg_get(config.model, "attention", "auto")))
        width = self.image_encoder.cfg.width
        head = cfg_get(config.model, "head", None)
        self.pool = str(cfg_get(head, "pool", "pooled"))
        if self.pool not in HEAD_POOLS:
            raise UserValueError(f"config.model.head.pool={self.pool!r}: choose one of {HEAD_POOLS}")
        if self.pool == "attention":
            heads = int(cfg_get(head, "num_heads", 0) or 0) or int(self.image_encoder.cfg.num_heads)
            self.label_pool = AttentionPool(width, heads, rngs=rngs)
        else:
            self.label_pool = nnx.data(None)
        # A randomly initialised head (lecun normal), not a zero one: with a zero head the
        # encoder gets no gradient until the head has grown, and then mostly from the labels
        # the initial random features already separate; measured on the demo data, the zero
        # head left the rarer, local findings (medical material: 0.6 vs 0.9 AUC) unlearned.
        self.label_head = layers.Dense((width,), (len(self.label_names),), ("embed",), (None,),
                                       kernel_init=nnx.initializers.lecun_normal(), dtype=jnp.float32,
                                       rngs=rngs)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def label_logits(self, volume: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """float32 [B, L] logits of ``volume`` [B, X, Y, Z, C]."""
        out = self.image_encoder(volume, deterministic=deterministic)
        if self.label_pool is not None:
            return self.label_head(self.label_pool(out["tokens"].astype(jnp.float32)))
        return self.label_head(out["pooled"].astype(jnp.float32))

    def predict_labels(self, volume: jax.Array) -> jax.Array:
        """float32 [B, L] probabilities (sigmoid of the logits), deterministic."""
        return jax.nn.sigmoid(self.label_logits(volume, deterministic=True))


def masked_bce(logits: jax.Array, labels: jax.Array, pos_weight=None) -> tuple[jax.Array, jax.Array]:
    """(mean BCE over the known entries, number of known entries) of logits [B, V, L] against
    labels [B, L] (NaN = unknown); 0 when nothing is known. `pos_weight` [L] (optional)
    weights each label's positive term (PyTorch's `BCEWithLogitsLoss(pos_weight=)`)."""
    labels = f32(labels)
    known = ~jnp.isnan(labels)
    y = jnp.where(known, labels, 0.0)[:, None, :]
    z = f32(logits)
    if pos_weight is None:
        bce = jnp.maximum(z, 0.0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))  # [B, V, L]
    else:
        tail = jnp.log1p(jnp.exp(-jnp.abs(z)))
        softplus_neg, softplus_pos = jnp.maximum(-z, 0.0) + tail, jnp.maximum(z, 0.0) + tail
        bce = f32(pos_weight) * y * softplus_neg + (1.0 - y) * softplus_pos
    weight = jnp.broadcast_to(known[:, None, :], bce.shape).astype(jnp.float32)
    count = jnp.sum(weight)
    return jnp.sum(bce * weight) / jnp.maximum(count, 1.0), jnp.sum(known.astype(jnp.float32))


def resolve_pos_weight(config) -> tuple[float, ...] | None:
    """`loss.pos_weight` as L floats, or None for "none" (see the module docstring); "balanced"
    reads the labels of the training records the run uses (`data.train_fraction` applied)."""
    value = cfg_get(cfg_get(config, "loss"), "pos_weight", "none")
    names = tuple(config.data.label_names)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and value.strip().lower() == "balanced":
        from t3d_jax.data.pipeline import train_labels

        labels = train_labels(config.data)
        if labels.shape[1] != len(names):
            raise UserValueError(f"loss.pos_weight=balanced: the training records hold {labels.shape[1]} labels, "
                                 f"data.label_names {len(names)}")
        pos = (labels == 1).sum(0)
        neg = (labels == 0).sum(0)
        return tuple(float(n / p) if p and n else 1.0 for p, n in zip(pos, neg))
    if isinstance(value, str):
        raise UserValueError(f"config.loss.pos_weight={value!r}: use none | balanced | a list of "
                             f"{len(names)} floats (one per data.label_names)")
    weights = tuple(float(w) for w in value)
    if len(weights) != len(names) or not all(math.isfinite(w) and w > 0 for w in weights):
        raise UserValueError(f"config.loss.pos_weight: {len(weights)} weights given; need {len(names)} "
                             f"positive finite floats (one per data.label_names)")
    return weights


class SupervisedTask(Task):
    name = "supervised"

    def prepare_config(self, config):
        """A "balanced" `loss.pos_weight` becomes its list of weights (recorded in config.json,
        and part of the compiled program's cache key, which does not see the data)."""
        value = cfg_get(cfg_get(config, "loss"), "pos_weight", "none")
        if isinstance(value, str) and value.strip().lower() == "balanced":
            weights = resolve_pos_weight(config)
            config = copy.deepcopy(config)
            with config.unlocked():
                try:
                    config.loss.pos_weight = weights
                except TypeError:  # a copy whose references were resolved typed the key as str
                    del config.loss["pos_weight"]
                    config.loss.pos_weight = weights
        return config

    def _pos_weight(self):
        if not hasattr(self, "_pos_weight_cache"):
            self._pos_weight_cache = resolve_pos_weight(self.config)
        return self._pos_weight_cache

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return SupervisedModel(self.config, rngs=rngs)

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {
            "views": self.views_spec(),
            "labels": jax.ShapeDtypeStruct((self.global_batch_size(), len(self.config.data.label_names)),
                                           jnp.float32),
        }

    def loss(self, model, batch, *, step, deterministic=False):
        del step
        views = jnp.asarray(batch["views"])
        if views.ndim != 6:
            raise ValueError(f"batch['views'] must be [B, V, X, Y, Z, C], got {views.shape}")
        labels = jnp.asarray(batch["labels"])
        b, v = views.shape[:2]
        if labels.shape != (b, model.num_labels):
            raise ValueError(f"batch['labels'] must be [B, {model.num_labels}] (one column per "
                             f"data.label_names), got {labels.shape}")
        logits = model.label_logits(views.reshape(b * v, *views.shape[2:]), deterministic=deterministic)
        logits = logits.reshape(b, v, -1)
        weights = self._pos_weight()
        loss, known = masked_bce(logits, labels, None if weights is None else jnp.asarray(weights, jnp.float32))
        return loss, {"loss": loss, "loss_bce": loss,
                      "labels_known": known / jnp.float32(b * model.num_labels)}
