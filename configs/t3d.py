r"""T3D pretraining: CLIP volume-report alignment + Text-informed Multi-view Alignment.

Launch (variants: tiny | demo | small | base):

  python launch/train.py --config=configs/t3d.py:demo --workdir runs/demo
  python launch/train.py --config=configs/t3d.py:base --workdir gs://BUCKET/t3d_base \
      --config.data.dir=/data/ct_rate_prepared

Every hyperparameter of the method is a key here; docs/method.md names them.
"""

import ml_collections

from t3d_jax.data.labels import CT_RATE_LABELS

VARIANTS = ("tiny", "demo", "small", "base")


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    variant = arg or "demo"
    if variant not in VARIANTS:
        raise ValueError(f"configs/t3d.py: unknown variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0

    # --- Data: prepared ArrayRecord shards (launch/prepare_data.py) -----------------
    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # output folder of launch/prepare_data.py; required
    c.data.train_split = "train"
    c.data.eval_split = "valid"
    c.data.num_views = 2
    c.data.view_size = (48, 48, 48)  # voxels per view (x, y, z)
    c.data.crop_min = 0.5  # crop covers 50-100% of each axis
    c.data.crop_max = 1.0
    c.data.intensity_jitter = 0.05  # +- scale and shift of model-input intensities
    c.data.noise_std = 0.02
    c.data.flip_lr = False  # reports name sides; no left-right flips by default
    c.data.worker_count = 2
    c.data.prefetch_buffer_size = 2
    c.data.label_names = CT_RATE_LABELS

    # --- Preprocessing (prepare_data.py and export use the same) ---------------------
    c.preprocess = ml_collections.ConfigDict()
    c.preprocess.preset = "demo"
    c.preprocess.vocab = ""  # vocab.txt; "" = the bundled bert-base-uncased vocab if installed
    c.preprocess.lowercase = True
    c.preprocess.max_len = 128

    # --- Model ------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.name = "t3d"  # t3d | clip
    c.model.embed_dim = 512
    c.model.dtype = "float32"  # compute dtype; bfloat16 on GPU/TPU
    c.model.image = ml_collections.ConfigDict()
    c.model.image.size = "tiny"  # tiny | small | base | large
    c.model.image.patch_size = (8, 8, 8)
    c.model.image.in_channels = 1
    c.model.image.pos_embed = "sincos"  # sincos | learned
    c.model.image.pool = "mean"  # mean | cls
    c.model.image.qkv_bias = True
    c.model.image.patch_dropout = 0.0  # fraction of tokens dropped in training
    c.model.image.remat = "none"  # none | full | dots_saveable | ...
    c.model.text = ml_collections.ConfigDict()
    c.model.text.size = "tiny"  # tiny | mini | base, or hf_dir
    c.model.text.hf_dir = ""  # a local Hugging Face BERT directory
    c.model.text.vocab_size = 30522
    c.model.text.max_len = 128
    c.model.tma = ml_collections.ConfigDict()
    c.model.tma.num_prototypes = 64
    c.model.tma.temperature = 0.1
    c.model.tma.sinkhorn_epsilon = 0.05
    c.model.tma.sinkhorn_iters = 3
    c.model.tma.weight = 1.0  # lambda
    c.model.tma.hist_weight = 0.0
    c.model.tma.freeze_prototypes_steps = 0

    # --- Loss ---------------------------------------------------------------------------
    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "clip"  # clip | siglip
    c.loss.chunked = False  # never materialise B x B on one device
    c.loss.logit_scale_init = 2.659260036932778  # log(1/0.07)
    c.loss.logit_scale_max = 100.0

    return c
