r"""MG-3D (Ni et al., arXiv 2412.05876) on the same data, encoders and evaluators as T3D.

Launch (variants: tiny | demo | small | base, configs/common.py):

  python launch/train.py --config=configs/mg3d.py:demo --workdir runs/mg3d_demo
  python launch/train.py --config=configs/mg3d.py:base --workdir /ckpt/mg3d_base \
      --config.data.dir=/data/ct_rate_prepared --config.init_from.hf_bert_dir=/models/bert-base

The task is t3d_jax/tasks/mg3d.py, the model t3d_jax/models/mg3d.py, the loss terms
t3d_jax/losses/mg3d.py; docs/method.md ("MG-3D") says what comes from the released code and what
is our choice. `model.image.name` picks the image encoder: 'vit3d' in tiny/demo/small (masking
by token dropping); base uses MG-3D's 3D Swin-B ('swin3d', MONAI SwinUNETR's encoder,
t3d_jax/models/swin3d.py; 128x96x128 input, stride-32 tokens, SimMIM-style masking), and
`--config.model.image.name=vit3d` runs the same recipe on a ViT-B.
"""

import ml_collections

from configs import common


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = common.get_config(arg, config_file="configs/mg3d.py")
    c.task = "mg3d"
    c.model.name = "mg3d"
    c.data.num_views = 1  # MG-3D: one view (the volume) per report
    c.data.sentences = True  # sentence_index / word_index in every training batch
    c.data.max_sentences = 32

    m = c.model.mg3d = ml_collections.ConfigDict()
    m.max_sentences = c.data.get_ref("max_sentences")
    m.hidden = 0  # fusion width H; 0 = the text width (768 at base: the 768 -> 768 text projection)
    m.gate_layers = 2  # stacked gating layers per side and in the DCL aggregation
    m.mask_ratio = 0.5  # fraction of patch tokens masked for L_MIM
    m.mlm_prob = 0.15  # whole-word masking probability for L_senMLM
    # K: the most tokens masked (and predicted) per report; the MLM head's vocabulary logits
    # are computed at these K positions only (BERT's max_predictions_per_seq). 32 = a quarter of
    # max_len 128: a full 126-token report expects 0.15 x 126 = 19 masked tokens; on the demo
    # data (85 tokens, 56 words per report) 12.8 +- 5.9, and 0.16% of reports would pick more
    # than 32 (their last-drawn words stay unmasked, docs/method.md). Capped at max_len.
    m.max_predictions = 32
    m.mask_token_id = 103  # [MASK] of bert-base-uncased; the trainer takes the data vocab's (prepare_config)
    m.sentence_dim = 8  # the 8-d sentence projections of L_senMLM
    m.sentence_weight = 0.1  # L_senMLM = CE + 0.1 * mean(1 - cos)
    m.ssm_dim = 128  # sentence-wise visual features of L_SSM
    # 'global': L_SSM pairs every two patients of the global batch (the same loss on any mesh);
    # 'device': only patients on the same batch shard, as the released code's per-GPU pairing.
    m.ssm_pairs = "global"
    m.decoder_min_channels = 16
    m.weights = ml_collections.ConfigDict(
        {"mim": 1.0, "mlm": 1.0, "cml": 0.1, "dcl": 0.1, "ssm": 0.1,
         # Ours, not MG-3D's: InfoNCE of the uni-modal image and report embeddings that
         # embed_volume / embed_text (the evaluators) read. 0 = MG-3D as released.
         "itc": 0.0})

    # MG-3D freezes its BERT; the projection, type embeddings and heads train.
    c.model.text.pool = "mean"
    c.optim.freeze = (r"^text_encoder/",)
    c.optim.lr_multipliers = ml_collections.ConfigDict({"image": 1.0, "text": 1.0, "logit": 1.0})

    # tiny / demo / small: the shared variants' ViT3D and BERT sizes (the demo's sentence drop and
    # shuffle stay on: the indices are computed after them, t3d_jax/data/sentences.py).
    if c.variant == "base":
        # MG-3D's encoder: MONAI SwinUNETR's Swin, feature size 48 ("Swin-B"), patch 2, window 7:
        # tokens every 32 voxels (4 x 3 x 4 at 128 x 96 x 128), so the MIM head has 5 blocks.
        c.model.image.name = "swin3d"
        c.model.image.swin.size = "base"
        c.model.image.swin.patch_size = (2, 2, 2)
        c.model.image.swin.window_size = (7, 7, 7)
        c.data.view_size = (128, 96, 128)
        c.model.text.size = "base"
        c.model.embed_dim = 512
    return c
