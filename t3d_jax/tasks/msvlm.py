"""`msvlm`: CLIP alignment plus masked embedding modelling (MEM) on the MS-VLM image tower.

Loss = loss_clip + `loss.mem_weight` x loss_mem:

* loss_clip: the `clip` task's objective (this class subclasses it and reuses its `encode` and
  `contrastive`): every view's pooled Z-former output against its report.
* loss_mem: MS-VLM's Z-former pre-training (t3d_jax/losses/mem.py, `mem_objective`) on the
  same forward pass's slice tokens: each valid slice token is zero-filled with probability
  `loss.mem_rate` (0.3), the Z-former plus `mem_head` (`MSVLM.mem_predict`) predict it back,
  L1 on the masked slots only, the target under `stop_gradient`. MEM trains the Z-former and
  its head only: the slice tokens enter it under `stop_gradient` too (MS-VLM's slice encoder
  is frozen while the Z-former learns MEM; with ours trainable for CLIP, MEM's gradient would
  let it collapse the tokens). `loss.mem_trains_slice_encoder = True` lets it through.

Why one slice-encoder pass serves both terms: the slice tokens do not depend on the mask (the
mask acts on the tokens, after the slice encoder), so the MEM branch reuses
`image['slice_tokens']` from the CLIP forward pass and only runs the Z-former a second time,
on the zero-filled sequence. Gradients of loss_mem reach the slice encoder through the
unmasked tokens the Z-former reads only with `loss.mem_trains_slice_encoder`; `model.image.
msvlm.freeze_slice_encoder` stops CLIP's too.

The mask's PRNG key is `fold_in(key(config.seed), step)`: a pure function of the step, so a
resumed run draws the same masks as an uninterrupted one, without a key in the model state.
(With `train.grad_accum_steps` > 1 every micro-batch of a step gets the same key; the
micro-batches hold different volumes, so their masks are still independent of their data.)

Batch contract, two forms:

* fixed views (default): the `clip` task's ([B, V, X, Y, Z, C], Z = `data.view_size[2]`): every
  sequence is one series of Z valid slices.
* slice sequences (`data.slices.enabled`, data prepared with `preprocess.keep_slices`;
  t3d_jax/data/slices.py): `slices` [B, X, Y, L, C] float32 (every series of an example, then
  padding), `slice_valid` [B, L] bool, `series_id` and `slice_position` [B, L] int32, plus the
  report keys. L = `data.slices.length`, one of the encoder's buckets, chosen once by
  `prepare_config` (the smallest bucket that holds the data's longest example, from
  dataset.json) so the step compiles once; X, Y = `data.view_size[:2]`. The encoder gets the
  per-slot series ids and positions, the padded slots are masked out of its attention, its
  pooling and MEM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t3d_jax.data import slices as slices_lib
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
        self.mem_trains_slice_encoder = bool(config.loss.get("mem_trains_slice_encoder", False))
        self.slices = slices_lib.enabled(config.data)

    def encoder_config(self, config=None):
        from t3d_jax.models.msvlm import MSVLMConfig

        c = self.config if config is None else config
        return MSVLMConfig.from_config(c.model.image, image_size=tuple(c.data.view_size))

    def prepare_config(self, config):
        """Slice sequences: fixes `data.slices.length` (0 = the smallest of the encoder's buckets
        holding the data's longest example) and `data.slices.max_series` (0 = the encoder's
        `num_series`) once, from dataset.json, before the program is built."""
        config = super().prepare_config(config)
        if not slices_lib.enabled(config.data):
            return config
        from t3d_jax.data.pipeline import read_dataset_info

        enc = self.encoder_config(config)
        sl = config.data.slices
        info = read_dataset_info(config.data.dir)
        try:
            length = slices_lib.resolve_length(info, enc.buckets, int(sl.get("length", 0) or 0),
                                               where=str(config.data.dir))
        except ValueError as e:
            raise UserValueError(str(e)) from None
        if length > enc.max_slices:
            raise UserValueError(f"data.slices.length={length} exceeds model.image.msvlm.max_slices="
                                 f"{enc.max_slices} (a series that long would have no position embedding)")
        max_series = int(sl.get("max_series", 0) or 0) or enc.num_series
        if max_series > enc.num_series:
            raise UserValueError(f"data.slices.max_series={max_series} exceeds model.image.msvlm.num_series="
                                 f"{enc.num_series}")
        summary = info["slices"]
        if summary.get("max_series", 1) > max_series:
            raise UserValueError(f"{config.data.dir}: examples have up to {summary['max_series']} series, "
                                 f"data.slices.max_series={max_series}")
        sl.length, sl.max_series = length, max_series
        self.config = config
        return config

    def batch_spec(self):
        spec = super().batch_spec()
        if not self.slices:
            return spec
        c = self.config
        length = int(c.data.slices.get("length", 0) or 0)
        if length < 1:
            raise UserValueError("data.slices.length=0: it is resolved from the data by MSVLMTask.prepare_config "
                                 "(the trainer calls it); set it to one of model.image.msvlm.buckets otherwise")
        b = self.global_batch_size()
        x, y = (int(s) for s in tuple(c.data.view_size)[:2])
        del spec["views"]
        spec.update(slices=jax.ShapeDtypeStruct((b, x, y, length, int(c.model.image.get("in_channels", 1))),
                                                jnp.float32),
                    slice_valid=jax.ShapeDtypeStruct((b, length), jnp.bool_),
                    series_id=jax.ShapeDtypeStruct((b, length), jnp.int32),
                    slice_position=jax.ShapeDtypeStruct((b, length), jnp.int32))
        return spec

    def encode(self, model, batch: dict, deterministic: bool):
        if not self.slices:
            return super().encode(model, batch, deterministic)
        image = model.image_encoder(jnp.asarray(batch["slices"]), valid=batch["slice_valid"],
                                    series_ids=batch["series_id"], positions=batch["slice_position"],
                                    deterministic=deterministic)
        image_emb = model.project_image(image["pooled"])[:, None]  # one "view": [B, 1, D]
        if self.locked_text:
            text_states, text_emb = self.cached_text(model, batch)
        else:
            text_states, text_emb = model.encode_text(batch["input_ids"], batch["attention_mask"],
                                                      deterministic=deterministic)
        image["series_id"], image["slice_position"] = batch["series_id"], batch["slice_position"]
        return image, image_emb, text_states, text_emb

    def mem_key(self, step) -> jax.Array:
        """The MEM mask key of `step` (a traced int is fine): fold_in(key(config.seed), step)."""
        return jax.random.fold_in(jax.random.key(self.seed), jnp.asarray(step, jnp.uint32))

    def mem_loss(self, model, image: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        """MEM on the encoder output `image` (slice tokens and mask [B*V, L]) with `key`."""
        encoder = model.image_encoder
        tokens, valid = image["slice_tokens"], image["mask"]
        if not self.mem_trains_slice_encoder:
            # MEM is the Z-former's objective: its input and its target are the slice encoder's
            # tokens, so a trainable slice encoder can make MEM trivial by making every slice
            # token alike, which also erases what CLIP needs (measured on the demo: CLIP stuck at
            # ln(batch) for 1,200 steps with the gradient let through).
            tokens = jax.lax.stop_gradient(tokens)
        if "series_id" in image:  # slice sequences: each example's own layout
            series_ids, positions = image["series_id"], image["slice_position"]
        else:
            series_ids, positions = encoder._layout([int(tokens.shape[1])], None)  # one series per view

        def predict(filled, valid_):
            return encoder.mem_predict(filled, valid_, series_ids, positions)

        return mem.mem_objective(predict, tokens, valid, key, self.mem_rate)

    def loss(self, model, batch, *, step, deterministic=False):
        image, image_emb, _, text_emb = self.encode(model, batch, deterministic)
        loss_clip, metrics = self.contrastive(model, image_emb, text_emb)
        loss_mem, mem_metrics = self.mem_loss(model, image, self.mem_key(step))
        term, more = self.impression_term(model, batch, text_emb, deterministic)
        loss = loss_clip + self.mem_weight * loss_mem + term
        return loss, {"loss": f32(loss), **metrics, **more, "loss_mem": f32(loss_mem),
                      "mem_masked": f32(mem_metrics["mem_masked"])}
