"""`msvlm`: CLIP alignment plus masked embedding modelling (MEM) on the MS-VLM image tower.

Loss = loss_clip + `loss.mem_weight` x loss_mem:

* loss_clip: the `clip` task's objective (this class subclasses it and reuses its `encode` and
  `contrastive`): every view's pooled Z-former output against its report.
* loss_mem: MS-VLM's Z-former pre-training (t3d_jax/losses/mem.py, `mem_objective`) on the
  same forward pass's slice tokens: each valid slice token is zero-filled with probability
  `loss.mem_rate` (0.3), the Z-former plus `mem_head` (`MSVLM.mem_predict`) predict it back,
  L1 on the masked slots only, the target under `stop_gradient`.

Why one slice-encoder pass serves both terms: the slice tokens do not depend on the mask (the
mask acts on the tokens, after the slice encoder), so the MEM branch reuses
`image['slice_tokens']` from the CLIP forward pass and only runs the Z-former a second time,
on the zero-filled sequence. Gradients of loss_mem reach the slice encoder through the
unmasked tokens the Z-former reads (not through the target); `model.image.msvlm.
freeze_slice_encoder` stops both.

The mask's PRNG key is `fold_in(key(config.seed), step)`: a pure function of the step, so a
resumed run draws the same masks as an uninterrupted one, without a key in the model state.
(With `train.grad_accum_steps` > 1 every micro-batch of a step gets the same key; the
micro-batches hold different volumes, so their masks are still independent of their data.)

Batch contract: the `clip` task's. The views are fixed-size ([B, V, X, Y, Z, C], Z =
`data.view_size[2]`), so every sequence is one series of Z valid slices here; the encoder's
variable slice counts, buckets and several series are not fed by the data pipeline yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t3d_jax.losses import mem
from t3d_jax.tasks.base import f32
from t3d_jax.tasks.clip import ClipTask
from t3d_jax.utils import UserValueError


class MSVLMTask(ClipTask):
    name = "msvlm"

    def __init__(self, config):
        super().__init__(config)
        image_name = str(config.model.image.get("name", "vit3d"))
        if image_name != "msvlm":
            raise UserValueError(f"config.task='msvlm' needs config.model.image.name='msvlm' (the MEM term "
                                 f"reads its slice tokens), got {image_name!r}: use configs/msvlm.py")
        self.mem_weight = float(config.loss.get("mem_weight", 1.0))
        self.mem_rate = float(config.loss.get("mem_rate", mem.MASK_RATE))
        if self.mem_weight < 0 or not 0.0 <= self.mem_rate <= 1.0:
            raise UserValueError(f"config.loss.mem_weight must be >= 0 and loss.mem_rate in [0, 1], got "
                                 f"{self.mem_weight}, {self.mem_rate}")
        self.seed = int(config.get("seed", 0))

    def mem_key(self, step) -> jax.Array:
        """The MEM mask key of `step` (a traced int is fine): fold_in(key(config.seed), step)."""
        return jax.random.fold_in(jax.random.key(self.seed), jnp.asarray(step, jnp.uint32))

    def mem_loss(self, model, image: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        """MEM on the encoder output `image` (slice tokens and mask [B*V, L]) with `key`."""
        encoder = model.image_encoder
        tokens, valid = image["slice_tokens"], image["mask"]
        series_ids, positions = encoder._layout([int(tokens.shape[1])], None)  # one series per view

        def predict(filled, valid_):
            return encoder.mem_predict(filled, valid_, series_ids, positions)

        return mem.mem_objective(predict, tokens, valid, key, self.mem_rate)

    def loss(self, model, batch, *, step, deterministic=False):
        image, image_emb, _, text_emb = self.encode(model, batch, deterministic)
        loss_clip, metrics = self.contrastive(model, image_emb, text_emb)
        loss_mem, mem_metrics = self.mem_loss(model, image, self.mem_key(step))
        loss = loss_clip + self.mem_weight * loss_mem
        return loss, {"loss": f32(loss), **metrics, "loss_mem": f32(loss_mem),
                      "mem_masked": f32(mem_metrics["mem_masked"])}
