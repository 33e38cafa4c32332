"""`reportgen`: report generation, a GPT-2 decoder cross-attending to an image encoder's tokens.

The image encoder is any of `model.image.name` (the same keys as the other tasks, so a
pretraining's encoder loads with `init_from.checkpoint_params = ("image_encoder",)`); its
tokens [B, N, width] (and, for MS-VLM, the mask of its padded slice slots) are the visual
sequence of a `ReportDecoder` (t3d_jax/models/report_decoder.py: projection, optional
Perceiver resampler, GPT-2 blocks with cross-attention, tied output embedding).

Loss: next-token cross-entropy with teacher forcing over each report's WordPiece ids
([CLS] report [SEP]: [CLS] is the start token, [SEP] the end token the decoder must learn to
emit), mean over the real target tokens of the global batch (padding excluded). Logged:
`loss_lm` and `token_accuracy` (argmax = target, over the same tokens).

Batch contract: `views` [B, V, X, Y, Z, C] float32 (every view is one example with its
report), `input_ids` and `attention_mask` [B, L] int32 (L = `preprocess.max_len`).

The decoder's vocabulary is the data's (`model.decoder.vocab_size`, 0 = the tokenizer of the
prepared data, read once when the task is built: `vocab_size_of`). Decoding (greedy, beam,
top-p; t3d_jax/models/decoding.py) with `decode_config` and `ids_to_text` here is
t3d_jax/evaluate/reportgen.py's `generate_ids`, used by the `reportgen` evaluator and
launch/generate_reports.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3d_jax.models import layers
from t3d_jax.models.decoding import DecodeConfig
from t3d_jax.models.report_decoder import ReportDecoder, ReportDecoderConfig
from t3d_jax.models.two_tower import build_image_encoder
from t3d_jax.tasks.base import Task
from t3d_jax.utils import UserValueError, cfg_get


def vocab_size_of(config) -> int:
    """`model.decoder.vocab_size`, or (0) the size of the data's tokenizer vocabulary."""
    size = int(cfg_get(cfg_get(config.model, "decoder"), "vocab_size", 0) or 0)
    if size > 0:
        return size
    from t3d_jax.data.tokenizer import tokenizer_for_config

    return tokenizer_for_config(config).vocab_size


def decoder_config(config, visual_width: int) -> ReportDecoderConfig:
    """The decoder of `model.decoder` (a size by name, `hidden_size` / `num_layers` / `num_heads`
    overriding its own when > 0; `init_from.hf_gpt2_dir`: that folder's config.json, whose
    weights t3d_jax/train/pretrained.py loads)."""
    dc = cfg_get(config.model, "decoder", None)
    dtype = cfg_get(config.model, "dtype", "float32")
    kw = dict(
        vocab_size=vocab_size_of(config), visual_width=int(visual_width),
        resampler_latents=int(cfg_get(dc, "resampler_latents", 0)),
        resampler_layers=int(cfg_get(dc, "resampler_layers", 2)),
        hidden_dropout=float(cfg_get(dc, "hidden_dropout", 0.1)),
        attention_dropout=float(cfg_get(dc, "attention_dropout", 0.0)),
        attention=str(cfg_get(config.model, "attention", "auto")), dtype=dtype)
    hf_dir = str(cfg_get(cfg_get(config, "init_from"), "hf_gpt2_dir", "") or "")
    if hf_dir:
        cfg = ReportDecoderConfig.from_hf(hf_dir, **kw)
    else:
        sizes = {k: int(cfg_get(dc, k, 0) or 0) for k in ("hidden_size", "num_layers", "num_heads")}
        cfg = ReportDecoderConfig.from_size(str(cfg_get(dc, "size", "tiny")),
                                            max_position_embeddings=int(cfg_get(dc, "max_position_embeddings", 512)),
                                            **{k: v for k, v in sizes.items() if v > 0}, **kw)
    max_len = int(cfg_get(cfg_get(config, "preprocess"), "max_len", 128))
    if max_len > cfg.max_position_embeddings:
        raise UserValueError(f"preprocess.max_len={max_len} exceeds the decoder's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
    return cfg


class ReportGenerator(nnx.Module):
    """`image_encoder` (by name) + `decoder` (`ReportDecoder`).

    `visual(volume) -> (tokens [B, N, width], mask [B, N] or None)`;
    `__call__(volume, input_ids, attention_mask) -> logits [B, L, V]` (teacher forcing).
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        dtype = layers.as_dtype(cfg_get(config.model, "dtype", "float32"))
        view_size = tuple(int(s) for s in config.data.view_size)
        self.image_encoder = build_image_encoder(config.model.image, image_size=view_size, dtype=dtype, rngs=rngs,
                                                 attention=str(cfg_get(config.model, "attention", "auto")))
        self.decoder = ReportDecoder(decoder_config(config, self.image_encoder.cfg.width), rngs=rngs)

    def visual(self, volume: jax.Array, *, deterministic: bool = True):
        out = self.image_encoder(volume, deterministic=deterministic)
        return out["tokens"], out.get("mask")

    def __call__(self, volume, input_ids, attention_mask, *, deterministic: bool = True) -> jax.Array:
        tokens, mask = self.visual(volume, deterministic=deterministic)
        return self.decoder(input_ids, tokens, mask, attention_mask, deterministic=deterministic)


def lm_loss(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy of logits [B, L, V] (position t predicts id t+1) over the real
    targets (`attention_mask[:, 1:]`), mean over all of them; and the argmax accuracy."""
    targets = input_ids[:, 1:]
    weights = attention_mask[:, 1:].astype(jnp.float32)
    logits = logits[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    count = jnp.maximum(weights.sum(), 1.0)
    loss = (nll * weights).sum() / count
    accuracy = ((jnp.argmax(logits, -1) == targets) * weights).sum() / count
    return loss, {"loss_lm": loss, "token_accuracy": accuracy}


class ReportGenTask(Task):
    name = "reportgen"

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return ReportGenerator(self.config, rngs=rngs)

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        b = self.global_batch_size()
        length = int(self.config.preprocess.max_len)
        return {"views": self.views_spec(),
                "input_ids": jax.ShapeDtypeStruct((b, length), jnp.int32),
                "attention_mask": jax.ShapeDtypeStruct((b, length), jnp.int32)}

    def loss(self, model, batch, *, step, deterministic=False):
        del step
        views = jnp.asarray(batch["views"])
        if views.ndim != 6:
            raise ValueError(f"batch['views'] must be [B, V, X, Y, Z, C], got {views.shape}")
        b, v = views.shape[:2]
        ids = jnp.repeat(jnp.asarray(batch["input_ids"], jnp.int32), v, axis=0)  # view-major rows
        mask = jnp.repeat(jnp.asarray(batch["attention_mask"], jnp.int32), v, axis=0)
        logits = model(views.reshape(b * v, *views.shape[2:]), ids, mask, deterministic=deterministic)
        loss, metrics = lm_loss(logits, ids, mask)
        return loss, {"loss": loss, **metrics}


# ----------------------------------------------------------------------------------- decoding
def decode_config(config, tokenizer) -> DecodeConfig:
    """`config.generate` with the tokenizer's [CLS] / [SEP] / [PAD] ids."""
    g = cfg_get(config, "generate", None)
    max_new = int(cfg_get(g, "max_new_tokens", 0) or 0) or int(config.preprocess.max_len) - 1
    return DecodeConfig(method=str(cfg_get(g, "method", "greedy")), max_new_tokens=max_new,
                        bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id, pad_id=tokenizer.pad_id,
                        num_beams=int(cfg_get(g, "num_beams", 4)),
                        length_penalty=float(cfg_get(g, "length_penalty", 1.0)),
                        top_p=float(cfg_get(g, "top_p", 0.9)), temperature=float(cfg_get(g, "temperature", 1.0)),
                        no_repeat_ngram_size=int(cfg_get(g, "no_repeat_ngram_size", 0)))


def ids_to_text(tokenizer, rows: np.ndarray) -> list[str]:
    """Generated ids -> texts: everything up to the first [SEP], special tokens dropped."""
    out = []
    for row in np.asarray(rows):
        row = [int(t) for t in row]
        if tokenizer.sep_id in row:
            row = row[:row.index(tokenizer.sep_id)]
        out.append(tokenizer.decode(row))
    return out
