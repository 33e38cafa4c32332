"""`t3d`: CLIP alignment plus Text-informed Multi-view Alignment (docs/method.md).

    L = L_clip + model.tma.weight * L_tma

L_tma (`t3d_jax.losses.tma`): the TMA head injects the report into every view's patch
tokens; tokens are scored against K learnable prototypes; Sinkhorn-Knopp targets over the
global batch; swapped prediction between tokens of two views that cover the same point of
the volume (matched through the crop boxes). `model.tma.targets`: 'visual' (default) takes
the targets from the head's text-free token embeddings, so the loss cannot be met from the
report alone (both views carry the same report); 'text_informed' takes them from the same
text-informed embeddings as the predictions (the reading that can be solved without the
image, kept for comparison). Prototypes get no gradient for the first
`model.tma.freeze_prototypes_steps` steps.

Batch contract: the `clip` task's plus `boxes` [B, V, 2, 3] float32, each view's crop box in
volume coordinates (needed to match tokens across views). With a locked text tower
(`model.text.locked`) the TMA head attends to the cached token states (`text_states`), so the
cache must keep tokens (`data.text_features=True`, not 'pooled').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t3d_jax.losses import tma as tma_loss_lib
from t3d_jax.tasks.clip import ClipTask
from t3d_jax.utils import UserValueError

TARGETS = ("visual", "text_informed")


class T3DTask(ClipTask):
    name = "t3d"

    def __init__(self, config):
        super().__init__(config)
        tma = config.model.tma
        self.weight = float(tma.get("weight", 1.0))
        self.hist_weight = float(tma.get("hist_weight", 0.0))
        self.temperature = float(tma.get("temperature", 0.1))
        self.epsilon = float(tma.get("sinkhorn_epsilon", 0.05))
        self.iters = int(tma.get("sinkhorn_iters", 3))
        self.freeze_prototypes_steps = int(tma.get("freeze_prototypes_steps", 0))
        self.targets = str(tma.get("targets", "visual"))
        if self.targets not in TARGETS:
            raise UserValueError(f"config.model.tma.targets={self.targets!r}: choose one of {TARGETS}")
        if self.locked_text == "pooled":
            raise UserValueError("task 't3d' with model.text.locked=True needs the cached token states "
                                 "(TMA's cross-attention reads them): set data.text_features=True and cache "
                                 "with launch/cache_text_features.py --keep tokens")

    def batch_spec(self):
        spec = super().batch_spec()
        b, v = spec["views"].shape[:2]
        spec["boxes"] = jax.ShapeDtypeStruct((b, v, 2, 3), jnp.float32)
        return spec

    def prototypes(self, model, step) -> jax.Array:
        """Normalised prototypes; gradient blocked while ``step < freeze_prototypes_steps``."""
        protos = model.tma_head.normalized_prototypes()
        if self.freeze_prototypes_steps > 0:
            frozen = jnp.asarray(step) < self.freeze_prototypes_steps
            protos = jnp.where(frozen, jax.lax.stop_gradient(protos), protos)
        return protos

    def loss(self, model, batch, *, step, deterministic=False):
        if getattr(model, "tma_head", None) is None:
            raise ValueError(f"task 't3d' needs a model with a TMA head; config.model.name="
                             f"{self.config.model.name!r} has none (use model.name='t3d')")
        image, image_emb, text_states, text_emb = self.encode(model, batch, deterministic)
        loss_clip, metrics = self.contrastive(model, image_emb, text_emb)
        b, v = image_emb.shape[:2]
        # Every view attends to its example's report: repeat the text over views (b-major
        # order, as the views were flattened).
        mask = jnp.repeat(jnp.asarray(batch["attention_mask"]), v, axis=0)
        token_emb = model.tma_head(image["tokens"], jnp.repeat(text_states, v, axis=0), mask)
        n = token_emb.shape[1]
        target_emb = None
        if self.targets == "visual":
            target_emb = model.tma_head(image["tokens"]).reshape(b, v, n, -1)
        out = tma_loss_lib.tma_loss(
            token_emb.reshape(b, v, n, -1), self.prototypes(model, step), jnp.asarray(batch["boxes"]),
            image["grid"], image["token_index"].reshape(b, v, n), temperature=self.temperature,
            sinkhorn_epsilon=self.epsilon, sinkhorn_iters=self.iters, hist_weight=self.hist_weight,
            target_emb=target_emb)
        term, more = self.impression_term(model, batch, text_emb, deterministic)
        loss = loss_clip + self.weight * out.loss + term
        metrics.update(more)
        metrics.update(loss=loss, loss_tma=out.loss, loss_tma_tok=out.token_loss, loss_tma_hist=out.hist_loss,
                       tma_matched_fraction=out.matched_fraction, tma_target_entropy=out.target_entropy,
                       tma_prototype_perplexity=out.prototype_perplexity)
        return loss, metrics
