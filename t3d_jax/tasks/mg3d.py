"""`mg3d`: MG-3D (Ni et al., arXiv 2412.05876) as a task of the trainer (docs/method.md, "MG-3D").

    L = w_mim L_MIM + w_mlm L_senMLM + w_cml L_CML + w_dcl L_DCL + w_ssm L_SSM (+ w_itc L_ITC)

weights ``model.mg3d.weights.{mim, mlm, cml, dcl, ssm, itc}`` (MG-3D: 1, 1, 0.1, 0.1, 0.1, and
0 for L_ITC, which is ours). One step runs, with the model of `t3d_jax.models.mg3d`:

1. the uni-modal towers on the unmasked inputs: image states v [B, N, H], text states t
   [B, L, H], sentence features f [B, S, H] = mean of t per sentence (`sentence_pool`);
2. L_CML: InfoNCE (tau 0.1) of cml_fused([fused report; fused image]) against
   cml_uni([uni report; uni image]) (feature-wise concatenations), where fused image = mean of
   image_gate(v, f) and fused report = pool of text_gate(t, v);
3. L_DCL: InfoNCE (tau 0.1) of dcl_image(fused image) against dcl_agg(tanh(mean_s x_s)), x_s =
   sentence_agg(mean v, f_s);
4. L_SSM: `losses.mg3d.ssm_loss` of the sentences' mean frozen word embeddings against
   ssm_proj(x_s) (128-d), pairs by ``model.mg3d.ssm_pairs``;
5. L_MIM: a ``model.mg3d.mask_ratio`` of the patch tokens masked (`encode_masked`), the image
   tokens gated by f, decoded to voxels (`UpsampleHead`), MSE on the masked voxels of the
   encoder's standardised input;
6. L_senMLM: whole-word masked report (``model.mg3d.mlm_prob``, at most
   ``model.mg3d.max_predictions`` K tokens per report), its states gated by v, MLM
   cross-entropy at the K masked positions (the vocabulary logits of [B, K], not [B, L]:
   `losses.mg3d.masked_positions`) + ``sentence_weight`` * mean(1 - cos) of the 8-d projections of each
   sentence's predicted states and of its unmasked input (word) embeddings (target side
   without gradient).

Masks come from the model's own RNG stream (``mask_rngs``: model state, so a resumed run draws
the same masks). Batch contract: ``views`` [B, 1, X, Y, Z, C], ``input_ids``,
``attention_mask``, ``sentence_index`` and ``word_index`` [B, L] int32 (the last two from the
pipeline's ``data.sentences``, `t3d_jax.data.sentences`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.losses import mg3d as L
from t3d_jax.tasks.base import Task
from t3d_jax.utils import UserValueError, cfg_get

WEIGHTS = {"mim": 1.0, "mlm": 1.0, "cml": 0.1, "dcl": 0.1, "ssm": 0.1, "itc": 0.0}


class MG3DTask(Task):
    name = "mg3d"

    def __init__(self, config):
        super().__init__(config)
        mg = config.model.mg3d
        self.weights = {k: float(cfg_get(mg.weights, k, v)) for k, v in WEIGHTS.items()}
        self.mask_ratio = float(mg.get("mask_ratio", 0.5))
        self.mlm_prob = float(mg.get("mlm_prob", 0.15))
        self.sentence_weight = float(mg.get("sentence_weight", 0.1))
        self.ssm_pairs = str(mg.get("ssm_pairs", "global"))
        self.mask_token_id = int(mg.get("mask_token_id", -1))
        self.max_predictions = int(mg.get("max_predictions", 32))
        if self.max_predictions < 1:
            raise UserValueError(f"config.model.mg3d.max_predictions={self.max_predictions}: at least 1 "
                                 "(the most report tokens L_senMLM masks and predicts per report)")
        if self.ssm_pairs not in L.SSM_PAIRS:
            raise UserValueError(f"config.model.mg3d.ssm_pairs={self.ssm_pairs!r}: choose one of {L.SSM_PAIRS}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise UserValueError(f"config.model.mg3d.mask_ratio={self.mask_ratio}: a fraction in (0, 1)")
        if int(config.data.num_views) != 1:
            raise UserValueError(f"task 'mg3d' trains on one view per volume: set data.num_views=1 "
                                 f"(got {config.data.num_views})")
        if not config.data.get("sentences", False):
            raise UserValueError("task 'mg3d' needs the sentence and word indices: set data.sentences=True")

    def prepare_config(self, config):
        """``model.mg3d.mask_token_id`` becomes the [MASK] id of the data's vocab (configs give
        bert-base-uncased's 103, so a program compiles without data; a data folder with another
        vocab gets its own id here)."""
        import copy

        from t3d_jax.data.tokenizer import tokenizer_for_config

        vocab = list(tokenizer_for_config(config).vocab)
        if "[MASK]" not in vocab:
            raise UserValueError(f"{config.data.dir}: the data's vocab has no [MASK] token (task 'mg3d')")
        if vocab.index("[MASK]") == int(config.model.mg3d.get("mask_token_id", -1)):
            return config
        config = copy.deepcopy(config)
        with config.unlocked():
            config.model.mg3d.mask_token_id = vocab.index("[MASK]")
        return config

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        from t3d_jax.models.mg3d import MG3D
        return MG3D(self.config.model, rngs=rngs, view_size=tuple(self.config.data.view_size))

    def batch_spec(self):
        b, length = self.global_batch_size(), int(self.config.preprocess.max_len)
        ints = jax.ShapeDtypeStruct((b, length), jnp.int32)
        return {"views": self.views_spec(), "input_ids": ints, "attention_mask": ints,
                "sentence_index": ints, "word_index": ints}

    # ------------------------------------------------------------------------------ the loss
    def loss(self, model, batch, *, step, deterministic=False):
        del step
        if self.mask_token_id < 0:
            raise UserValueError("config.model.mg3d.mask_token_id is unresolved (-1): the trainer resolves it "
                                 "from the data's vocab (Task.prepare_config); set it when calling the loss directly")
        views = jnp.asarray(batch["views"])
        if views.ndim != 6 or views.shape[1] != 1:
            raise ValueError(f"batch['views'] must be [B, 1, X, Y, Z, C], got {views.shape}")
        volume = views[:, 0]
        ids, amask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
        sent_index, word_index = jnp.asarray(batch["sentence_index"]), jnp.asarray(batch["word_index"])
        b, s = volume.shape[0], model.num_sentences
        axes, chunked = self.batch_axes, bool(self.config.loss.get("chunked", False))
        from t3d_jax.models.mg3d import sentence_pool

        # 1. uni-modal towers
        image = model.volume_tokens(volume, deterministic=deterministic)
        v = model.image_states(image["tokens"])
        _, t = model.text_states(ids, amask, deterministic=deterministic)
        f, f_valid = sentence_pool(t, sent_index, s)
        f = f.astype(v.dtype)
        uni_image = jnp.mean(v.astype(jnp.float32), axis=1)
        uni_text = model.text_vector(t, amask)

        # 2. CML
        fused_image = jnp.mean(model.image_gate(v, f, f_valid).astype(jnp.float32), axis=1)
        fused_text = model.text_vector(model.text_gate(t, v), amask)
        x = model.cml_fused(jnp.concatenate([fused_text, fused_image], axis=-1))
        y = model.cml_uni(jnp.concatenate([uni_text, uni_image], axis=-1))
        loss_cml = L.info_nce(x, y, chunked=chunked, batch_axes=axes)

        # 3. DCL
        sent_visual, agg = model.sentence_agg(uni_image.astype(v.dtype), f, f_valid)
        loss_dcl = L.info_nce(model.dcl_image(fused_image), model.dcl_agg(agg), chunked=chunked, batch_axes=axes)

        # 4. SSM
        sent_input, _ = sentence_pool(model.input_embeddings(ids), sent_index, s)
        loss_ssm = L.ssm_loss(sent_input, model.ssm_proj(sent_visual), f_valid, pairs=self.ssm_pairs,
                              batch_axes=axes)

        # 5. MIM
        key_img, key_txt = jax.random.split(model.mask_rngs())
        grid = image["grid"]
        keep_index, token_mask = L.draw_token_mask(key_img, b, int(v.shape[1]), self.mask_ratio)
        masked_tokens = model.encode_masked(volume, keep_index, deterministic=deterministic)
        gated = model.image_gate(model.image_states(masked_tokens), f, f_valid)
        recon = model.mim_head(gated.reshape(b, *grid, gated.shape[-1]))
        target = jax.lax.stop_gradient(model.image_encoder.standardise(volume)).astype(jnp.float32)
        voxel_mask = L.token_mask_to_voxels(token_mask, grid, model.patch_size)
        loss_mim = L.mim_loss(recon, target, voxel_mask)

        # 6. senMLM
        k = min(self.max_predictions, int(ids.shape[1]))
        masked_ids, chosen = L.whole_word_mask(key_txt, ids, word_index, prob=self.mlm_prob,
                                               mask_id=self.mask_token_id, max_predictions=k,
                                               vocab_size=model.text_encoder.cfg.vocab_size)
        _, t_masked = model.text_states(masked_ids, amask, deterministic=deterministic)
        predicted = model.text_gate(t_masked, v)
        positions, weights = L.masked_positions(chosen, k)  # the vocabulary logits at K positions only
        loss_tok = L.mlm_loss(model.mlm_head(L.gather_positions(predicted, positions)),
                              L.gather_positions(ids, positions), weights)
        pred_sent, _ = sentence_pool(predicted, sent_index, s)
        loss_sen = L.sentence_cosine_term(model.sen_pred_proj(pred_sent),
                                          jax.lax.stop_gradient(model.sen_input_proj(sent_input)), f_valid)
        loss_mlm = loss_tok + self.sentence_weight * loss_sen

        terms = {"mim": loss_mim, "mlm": loss_mlm, "cml": loss_cml, "dcl": loss_dcl, "ssm": loss_ssm}
        if self.weights["itc"]:
            terms["itc"] = L.info_nce(model.itc_image(uni_image), model.itc_text(uni_text), chunked=chunked,
                                      batch_axes=axes)
        loss = sum(self.weights[k] * val for k, val in terms.items())
        metrics = {f"loss_{k}": jnp.asarray(val, jnp.float32) for k, val in terms.items()}
        metrics.update(loss=loss, loss_mlm_token=loss_tok, loss_mlm_sentence=loss_sen,
                       mlm_masked_fraction=jnp.sum(chosen) / jnp.maximum(jnp.sum(word_index >= 0), 1),
                       sentences_per_report=jnp.mean(jnp.sum(f_valid, axis=1).astype(jnp.float32)))
        return loss, metrics
