"""`supervised`: multi-label classification of the volume, the ceiling a pretraining is judged by.

The image encoder of the other tasks (ViT3D or ResNet3D, the same `model.image.*` keys) and one linear
head over its pooled embedding give one logit per label of `data.label_names` (18 CT-RATE
findings). The loss is the binary cross-entropy of each label's sigmoid against the record's
labels; a label that is NaN (unknown) is left out of the mean. Trained with the normal
trainer (`launch/train.py --config=configs/supervised.py:demo`), it says how much of the
labels the data and the demo's encoder and budget allow at all; `bench/ceiling.py` reports
that figure per label beside a pooled-voxel logistic-regression baseline.

Loss: with V views per example (each view is one more sample carrying the example's labels),

    loss = sum_{b,v,l: y[b,l] known} BCE(logit[b,v,l], y[b,l]) / (V * #{(b,l): y[b,l] known})

i.e. the mean over known (example, label) pairs of the view-averaged BCE
(BCE(z, y) = max(z, 0) - z*y + log(1 + exp(-|z|)), the stable form).

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

from t3d_jax.models import layers
from t3d_jax.models.two_tower import build_image_encoder
from t3d_jax.tasks.base import Task, f32
from t3d_jax.utils import cfg_get


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
        pooled = self.image_encoder(volume, deterministic=deterministic)["pooled"]
        return self.label_head(pooled.astype(jnp.float32))

    def predict_labels(self, volume: jax.Array) -> jax.Array:
        """float32 [B, L] probabilities (sigmoid of the logits), deterministic."""
        return jax.nn.sigmoid(self.label_logits(volume, deterministic=True))


def masked_bce(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean BCE over the known entries, number of known entries) of logits [B, V, L] against
    labels [B, L] (NaN = unknown); 0 when nothing is known."""
    labels = f32(labels)
    known = ~jnp.isnan(labels)
    y = jnp.where(known, labels, 0.0)[:, None, :]
    z = f32(logits)
    bce = jnp.maximum(z, 0.0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))  # [B, V, L]
    weight = jnp.broadcast_to(known[:, None, :], bce.shape).astype(jnp.float32)
    count = jnp.sum(weight)
    return jnp.sum(bce * weight) / jnp.maximum(count, 1.0), jnp.sum(known.astype(jnp.float32))


class SupervisedTask(Task):
    name = "supervised"

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
        loss, known = masked_bce(logits, labels)
        return loss, {"loss": loss, "loss_bce": loss,
                      "labels_known": known / jnp.float32(b * model.num_labels)}
