r"""The settings every task shares: data, preprocessing, encoders, loss, loop, optimizer, mesh,
checkpoints, metrics and evaluation, for the variants tiny | demo | small | base.

Not a config to launch by itself: `configs/t3d.py` and `configs/clip.py` start from
`get_config(variant)` here and add their task (`config.task`) and its own keys.

  tiny  -- the tests: a few-thousand-parameter model, seconds on CPU (set data.dir).
  demo  -- this 2-core CPU: the synthetic demo data (demo_out/prepared, made by
           launch/demo.sh), a small model, a few minutes.
  small -- one GPU: ViT-S/BERT-mini scale, bfloat16 compute.
  base  -- paper scale: ViT-B 3D encoder, BERT-base text encoder, ct_clip-style data,
           two views, global batch 256, FSDP over all devices, bfloat16 compute.
"""

import ml_collections

from t3d_jax.data.labels import CT_RATE_LABELS
from t3d_jax.utils import UserValueError

VARIANTS = ("tiny", "demo", "small", "base")


def get_config(arg: str = "demo", *, config_file: str = "configs/common.py") -> ml_collections.ConfigDict:
    variant = arg or "demo"
    if variant not in VARIANTS:
        raise UserValueError(f"{config_file}: unknown variant {variant!r}; choose one of {VARIANTS} "
                         f"(e.g. --config={config_file}:demo)")
    c = ml_collections.ConfigDict()
    c.task = ""  # set by the task's config file: t3d | clip (t3d_jax/tasks)
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
    # Add each view's label map (`masks`, cut with the view's box) to the training batch: the
    # records need a mask (manifest `mask` column); configs/finetune_seg.py turns it on.
    c.data.masks = False
    # Report augmentation in training (t3d_jax/data/report_augment.py): drop each sentence with
    # this probability (at least one kept) and/or shuffle the kept sentences.
    c.data.report_sentence_drop = 0.0
    c.data.report_shuffle = False
    # Each training example also carries its report's impression section alone (impression_ids /
    # impression_mask): set by the clip / t3d / msvlm tasks when loss.impression_weight > 0
    # (ClipTask.prepare_config), not a setting of its own.
    c.data.impression_view = False
    # The impression view's padded length (0 = preprocess.max_len): impressions are short, and the
    # extra text forward costs in proportion. A longer one stops training with an error naming it.
    c.data.impression_len = 0
    # Where the training views are made: "host" (Grain workers, t3d_jax/data/views.py) or
    # "device" (the jitted step, t3d_jax/data/device_views.py: the batch carries the stored int16
    # volumes, the workers only read and decode; docs/scaling.md, "Views on the accelerator").
    c.data.views_on = "host"
    c.data.stored_size = ()  # the stored grid (x, y, z); () = the prepared data's (or the preset's)
    c.data.worker_count = 2
    c.data.prefetch_buffer_size = 2
    c.data.read_threads = 0  # ArrayRecord read threads; 0 = 1 with workers, 2 without
    c.data.label_names = CT_RATE_LABELS
    # Train on a fixed, seeded subset of the training split: round(fraction * n) records (>= 1),
    # nested across fractions for one seed, independent of train.seed (t3d_jax/data/pipeline.py;
    # the label-efficiency runs of docs/finetuning.md). 1.0 = every record.
    c.data.train_fraction = 1.0
    c.data.train_subset_seed = 0
    # When data.dir holds no prepared data: make this many synthetic volumes and prepare them
    # there first (0 = never; the demo variant sets it, so a fresh clone trains out of the box).
    c.data.synthetic_if_missing = 0
    c.data.synthetic_seed = 0
    # Cached report states of a frozen text tower (launch/cache_text_features.py, docs/training.md
    # "Locked text tower"): False | True (= 'tokens', [L, d_t] per report: clip and t3d) |
    # 'pooled' ([d_t] per report: clip only). The pipelines then add `text_states` / `text_pooled`.
    # Any-typed so that both True and 'pooled' can be given (--config.data.text_features=pooled).
    c.data.text_features = ml_collections.FieldReference(False, field_type=object)

    # --- Preprocessing (prepare_data.py and export use the same) ---------------------
    c.preprocess = ml_collections.ConfigDict()
    c.preprocess.preset = "demo"
    c.preprocess.vocab = ""  # vocab.txt; "" = the bundled bert-base-uncased vocab if installed
    c.preprocess.lowercase = True
    c.preprocess.max_len = 128
    # as_written | impression_first: the report's IMPRESSION section first, so cutting at
    # max_len loses findings detail rather than conclusions (t3d_jax/data/tokenizer.py).
    c.preprocess.report_order = "as_written"

    # --- Model ------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.name = "clip"  # the two-tower model; configs/t3d.py sets 't3d' (adds the TMA head)
    c.model.embed_dim = 512
    c.model.dtype = "float32"  # compute dtype; bfloat16 on GPU/TPU
    # Attention implementation of every attention layer (ViT, BERT, TMA cross-attention;
    # t3d_jax/models/attention.py): auto | reference | xla | cudnn | pallas_tpu. 'auto' picks by
    # platform: cuDNN flash attention on NVIDIA GPUs (bfloat16), the Pallas splash kernel on
    # TPU, XLA on CPU; 'reference' (the original einsum path) wherever attention dropout is on.
    c.model.attention = "auto"
    c.model.image = ml_collections.ConfigDict()
    # The image encoder: "vit3d" (the keys below) or "resnet3d" (MONAI-layout 3D ResNet: the
    # model.image.resnet keys, plus in_channels, remat, input_mean/std; configs/t3d.py:resnet_*).
    c.model.image.name = "vit3d"
    c.model.image.size = "tiny"  # tiny | small | base | large
    c.model.image.patch_size = (8, 8, 8)
    c.model.image.in_channels = 1
    c.model.image.pos_embed = "sincos"  # sincos | learned
    c.model.image.pool = "mean"  # mean | cls
    c.model.image.qkv_bias = True
    c.model.image.patch_dropout = 0.0  # fraction of tokens dropped in training
    c.model.image.remat = "none"  # none | full | dots_saveable | ...
    # Stack the blocks and run them with nnx.scan: one compiled block body instead of `depth`
    # copies (compile time and code size independent of depth; parameters get a leading
    # 'layers' axis). Off by default: measured for `base` on v5e (docs/performance.md, memory
    # levers) it compiles ~2x faster but XLA plans more temporaries, and XLA's FLOP count
    # sees the loop body once (launch/aot_compile.py reports FLOPs of the unrolled step).
    c.model.image.scan_layers = False
    c.model.image.layer_norm_eps = 1e-6  # 1e-5 to match MONAI-pretrained ViT weights
    # Model-input standardisation, the encoder's first step: (x - input_mean) / input_std on the
    # preset's intensities. 0 / 1 = off (raw preset values; MONAI-pretrained weights expect that).
    c.model.image.input_mean = 0.0
    c.model.image.input_std = 1.0
    # model.image.name = "resnet3d" (t3d_jax/models/resnet3d.py; MONAI's ResNet arguments in brackets)
    c.model.image.resnet = ml_collections.ConfigDict()
    c.model.image.resnet.arch = "resnet50"  # resnet10 | 18 | 34 (basic blocks) | 50 | 101 | 152 | 200
    c.model.image.resnet.widen_factor = 1.0  # every stage's width x this [widen_factor]
    c.model.image.resnet.conv1_size = (7, 7, 7)  # [conv1_t_size]
    c.model.image.resnet.conv1_stride = (2, 2, 2)  # [conv1_t_stride; MONAI's default 1, MedicalNet's 2]
    c.model.image.resnet.no_max_pool = False  # [no_max_pool]
    c.model.image.resnet.shortcut = "B"  # B: 1x1x1 conv + norm | A: subsample + zero channels [shortcut_type]
    c.model.image.resnet.bias_downsample = False  # [bias_downsample; MONAI ResNet's default True]
    # batch: BatchNorm with the global batch's statistics, running statistics for evaluation |
    # group: GroupNorm (no batch coupling; not exportable to MONAI's ResNet).
    c.model.image.resnet.norm = "batch"
    c.model.image.resnet.norm_groups = 32
    c.model.image.resnet.norm_eps = 1e-5
    c.model.image.resnet.bn_momentum = 0.1  # PyTorch's: the new batch's weight in the running statistics
    # model.image.name = "swin3d" (t3d_jax/models/swin3d.py: MONAI SwinUNETR's swinViT; MONAI's
    # SwinTransformer arguments in brackets). size: tiny | demo | small | base (feature_size 48,
    # MG-3D's Swin-B) | large (96, Swin-L) | swin_b (embed 128, depths 2-2-18-2).
    c.model.image.swin = ml_collections.ConfigDict()
    c.model.image.swin.size = "tiny"
    c.model.image.swin.window_size = (7, 7, 7)  # [window_size]
    c.model.image.swin.patch_size = (2, 2, 2)  # [patch_size]
    c.model.image.swin.mlp_ratio = 4.0  # [mlp_ratio]
    c.model.image.swin.qkv_bias = True  # [qkv_bias]
    c.model.image.swin.patch_norm = False  # [patch_norm]
    c.model.image.swin.downsample = "merging"  # merging (MONAI's default) | mergingv2 [downsample]
    c.model.image.swin.normalize = True  # LayerNorm on the stage outputs [SwinUNETR's normalize]
    c.model.text = ml_collections.ConfigDict()
    c.model.text.size = "tiny"  # tiny | mini | minilm | base; pretrained weights: init_from.hf_bert_dir
    c.model.text.vocab_size = 30522
    c.model.text.max_len = 128
    c.model.text.remat = "none"  # per-layer rematerialisation policy, as model.image.remat
    c.model.text.scan_layers = False  # as model.image.scan_layers
    # Dropout on BERT's attention probabilities in training (Hugging Face's 0.1). Only the
    # 'reference' attention has that step, so while it is > 0 the text tower trains with it
    # ('auto'; an explicit fused model.attention raises): 0.0 lets it use the fused kernels.
    c.model.text.attention_dropout = 0.1
    # Report embedding: "cls" (the [CLS] state, for pretrained text towers) or "mean" (mean over
    # the non-padding tokens; a from-scratch BERT's [CLS] state is nearly the same for every report).
    c.model.text.pool = "cls"
    # Locked text tower: the tasks take the report states from data.text_features' cache instead
    # of running the text encoder, which stays in the model (evaluation embeds prompts with it)
    # and must be frozen: optim.freeze = ("^text_encoder/",); text_proj keeps training.
    c.model.text.locked = False

    # --- Loss ---------------------------------------------------------------------------
    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "clip"  # clip | siglip
    c.loss.chunked = False  # never materialise B x B on one device
    c.loss.logit_scale_init = 2.659260036932778  # log(1/0.07)
    c.loss.logit_scale_max = 100.0
    # Report-impression term of the clip / t3d / msvlm tasks: this weight x the contrastive loss
    # of each report against its own impression section (docs/training.md); 0 = off.
    c.loss.impression_weight = 0.0
    c.loss.siglip_logit_scale_init = 2.302585092994046  # log(10), SigLIP's init
    c.loss.siglip_logit_bias_init = -10.0

    # --- Training loop (t3d_jax/train/loop.py) -------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 16  # examples per optimizer step, over all processes
    c.train.num_steps = 10_000
    c.train.log_every = 10  # steps between metric writes (TensorBoard + metrics.jsonl)
    c.train.seed = c.get_ref("seed")  # model init and data order
    c.train.max_bad_steps = 5  # consecutive non-finite steps before training stops
    # How a non-finite step is undone: "where" (per-leaf select; least memory on TPU) or
    # "cond" (one lax.cond; faster on XLA:CPU for tiny models). t3d_jax/train/step.py says why.
    c.train.nonfinite_guard = "where"
    c.train.grad_accum_steps = 1  # micro-batches per optimizer step (scan inside the step)
    c.train.progress_bar = True

    # --- Optimizer (t3d_jax/train/optim.py) ----------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4  # peak learning rate
    c.optim.schedule = "warmup_cosine"  # warmup_cosine | warmup_constant | constant
    c.optim.warmup_steps = 500
    c.optim.end_lr_factor = 0.0  # cosine ends at lr * end_lr_factor
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-8
    c.optim.flatten = "auto"  # AdamW on flattened groups: auto (= off) | on | off; docs/training.md
    c.optim.clip_norm = 1.0  # global gradient-norm clip; 0 = off
    # Learning-rate multiplier per tower: key = prefix of the top-level submodule name
    # (longest match wins); 0 freezes the tower.
    c.optim.lr_multipliers = ml_collections.ConfigDict(
        {"image": 1.0, "text": 1.0, "tma": 1.0, "logit": 1.0})
    c.optim.freeze = ()  # regexes on parameter paths, e.g. r"^text_encoder/embeddings/"
    # Layer-wise lr decay of the image encoder: factor d^(L+1-depth) per block (0 = off;
    # t3d_jax/train/optim.py `layer_depth_of`), e.g. 0.75 for fine-tuning.
    c.optim.layer_decay = 0.0
    # Regexes on parameter paths exempt from weight decay, besides every 0-/1-D parameter
    # (biases, norm scales, logit scale): position embeddings and the TMA prototypes.
    c.optim.no_decay = ("pos_embed", "/position/", "position_embeddings", "prototypes")

    # --- Device mesh and sharding (t3d_jax/train/mesh.py) --------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1)  # -1 takes the remaining devices
    c.mesh.axes = ("data", "fsdp")  # or ("data", "fsdp", "tensor")
    # Logical axis -> mesh axes. Axes missing from the mesh are ignored, so these rules
    # serve every mesh; a dim the mesh axes do not divide stays unsplit.
    c.sharding_rules = ml_collections.ConfigDict({
        "batch": ("data", "fsdp"),
        "embed": ("fsdp",),
        "mlp": ("tensor",),
        "heads": ("tensor",),
        "vocab": ("tensor",),
        "joint": ("fsdp",),
        "kv": (),
        "patch": (),
        "conv_in": (),  # 3D conv kernels [kx, ky, kz, conv_in, conv_out] (ResNet3D)
        "conv_out": ("fsdp",),
        "prototypes": (),
        "layers": (),  # the stacked-layer axis of scan_layers models: never split
    })

    # --- Checkpoints (t3d_jax/train/checkpoint.py) ---------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3  # keep the last N
    c.checkpoint.async_save = True
    c.checkpoint.dir = ""  # "" = WORKDIR/checkpoints

    # --- Initialisation from pretrained weights (applied only when not resuming) -----------
    c.init_from = ml_collections.ConfigDict()
    c.init_from.hf_bert_dir = ""  # local Hugging Face BERT directory -> text encoder
    c.init_from.monai_vit = ""  # MONAI ViT state dict (.pt/.pth/.safetensors) -> image encoder
    # MONAI SwinTransformer / SwinUNETR state dict -> image encoder (model.image.name='swin3d')
    c.init_from.monai_swin = ""
    c.init_from.checkpoint = ""  # another run's checkpoint folder (WORKDIR/checkpoints) -> params
    c.init_from.checkpoint_step = -1  # -1 = latest
    # Top-level submodules read from init_from.checkpoint, e.g. ("image_encoder",) under a fresh
    # head (the classification fine-tune); () = every parameter of the model.
    c.init_from.checkpoint_params = ()

    # --- Metrics ---------------------------------------------------------------------------
    c.metrics = ml_collections.ConfigDict()
    # Peak FLOP/s per device for MFU; 0 = measure a float32 matmul on this host at start.
    c.metrics.peak_flops_per_device = 0.0
    c.metrics.tensorboard = True

    # --- Periodic evaluation (the t3d_jax/evaluate registry) ---------------------------
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0 = only at the end (if evaluators are named)
    c.eval.evaluators = ()  # registered names, e.g. ("zeroshot", "retrieval")
    c.eval.batch_size = 8
    # Read by t3d_jax/evaluate (launch/evaluate.py and the periodic evaluators); docs/evaluation.md.
    c.eval.split = ""  # "" = data.eval_split
    c.eval.templates = ("{label} is present.", "{label} is not present.")  # zero-shot prompts
    c.eval.threshold_rule = "roc"  # roc | ct_clip_grid
    c.eval.threshold_split = "train"  # split the leak-free threshold is chosen on
    c.eval.num_bootstrap = 1000
    c.eval.periodic_num_bootstrap = 0  # during training: no intervals
    c.eval.retrieval_ks = (1, 5, 10, 50, 100)
    c.eval.probe_split = "train"
    c.eval.probe_C = 1.0
    c.eval.use_logit_scale = True
    # A bench/ceiling.py result (JSON) shown beside zero-shot and probe AUC: the supervised
    # ceiling of the same data (t3d_jax/evaluate/ceiling.py). "" = none.
    c.eval.ceiling = ""

    _apply_variant(c, variant)
    return c


def _apply_variant(c: ml_collections.ConfigDict, variant: str) -> None:
    """Sizes of each variant; everything else is the recipe above."""
    if variant == "tiny":  # tests: seconds on CPU
        c.data.view_size = (16, 16, 16)
        c.data.worker_count = 0
        c.model.embed_dim = 32
        c.model.image.patch_size = (8, 8, 8)
        c.model.text.max_len = 128
        c.train.global_batch_size = 8
        c.train.num_steps = 8
        c.train.log_every = 1
        c.train.progress_bar = False
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 2
        c.checkpoint.every_steps = 2
        c.checkpoint.keep = 10
    elif variant == "demo":  # this 2-core CPU, ~10 minutes end to end (launch/demo.sh)
        # Every value below was measured on the demo-difficulty synthetic data (1,269 training /
        # 331 held-out volumes): docs/training.md, "The demo, measured".
        c.data.dir = "demo_out/prepared"
        # 3,200 volumes (2,561 train / 639 held out): the supervised ceiling is 0.77 mean AUC
        # with 313 training volumes, 0.91 with 1,269 and 0.92 with 2,538; more steps on fewer
        # volumes do not make up for it. Writing and preparing the second 1,600 costs ~1.3 min.
        c.data.synthetic_if_missing = 3200
        c.data.view_size = (32, 32, 32)
        c.data.worker_count = 0
        # Whole-volume views, as held-out volumes are scored: 85-100% crops cost the supervised
        # ceiling 0.05 mean AUC and T3D's zero-shot 0.045 (0.769 vs 0.814, docs/method.md). T3D's
        # two views of a volume are then the same, so its TMA term aligns tokens within one view.
        c.data.crop_min = 1.0
        c.data.intensity_jitter = 0.0
        c.data.noise_std = 0.0
        # Sentences dropped (30%) and shuffled: a from-scratch text tower otherwise memorises the
        # 1,269 reports by their incidental wording (training loss 0.04 by step 1,100).
        c.data.report_sentence_drop = 0.3
        c.data.report_shuffle = True
        # Each report also matched to its own impression (docs/training.md, "Report-impression
        # term"): text-tower check 0.851 -> 0.915, zero-shot 0.824 -> 0.842, R@5 0.495 -> 0.586
        # on 1,600 volumes (one T3D run each, same seed).
        c.loss.impression_weight = 1.0
        # The demo's impressions are at most 73 tokens with [CLS]/[SEP] (3,200 reports; 95% at
        # most 40): 80 instead of 128 makes the extra text forward cheaper (3.9 vs 3.3 steps/s).
        c.data.impression_len = 80
        # The impression first, cut at 128 tokens: every positive finding is kept (docs/data.md).
        c.preprocess.report_order = "impression_first"
        c.model.embed_dim = 128
        # The demo preset stores [0, 1] over [-1000, 1000] HU; measured on the demo-difficulty
        # synthetic chests (whole volumes at 32^3): mean 0.17, std 0.23. Z-scored inputs took the
        # supervised ceiling from 0.70 (raw) to 0.88 mean AUC (docs/training.md).
        c.model.image.input_mean = 0.17
        c.model.image.input_std = 0.23
        c.model.text.pool = "mean"
        c.train.global_batch_size = 32
        c.train.num_steps = 1200
        c.train.log_every = 20
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 60
        c.optim.weight_decay = 0.01
        c.checkpoint.every_steps = 400
        # Zero-shot prompts in the reports' own form, each finding against a normal scan's
        # impression (an ensemble of the three normal impressions the demo reports use). Chosen
        # on the training split; the CT-CLIP pair is the default of every other variant.
        c.eval.templates = ("IMPRESSION: {label}.",
                            ("IMPRESSION: No acute cardiopulmonary abnormality.", "IMPRESSION: Normal chest CT.",
                             "IMPRESSION: No significant thoracic abnormality."))
    elif variant == "small":  # one GPU
        c.data.view_size = (96, 96, 64)
        c.model.dtype = "bfloat16"
        c.model.embed_dim = 256
        c.model.image.size = "small"
        c.model.image.patch_size = (16, 16, 8)
        c.model.text.size = "mini"
        c.train.global_batch_size = 64
        c.train.num_steps = 20_000
        c.train.log_every = 50
        c.optim.lr_multipliers.text = 0.1
    elif variant == "base":  # paper scale, GPU nodes / TPU pods
        c.preprocess.preset = "ct_clip"
        c.data.view_size = (160, 160, 96)
        c.data.worker_count = 8
        c.model.dtype = "bfloat16"
        c.model.embed_dim = 512
        c.model.image.size = "base"
        c.model.image.patch_size = (16, 16, 8)
        c.model.image.remat = "full"
        c.model.text.size = "base"
        # No dropout on BERT's attention probabilities, so that the text tower also runs the
        # fused kernels ('auto': splash attention on TPU, cuDNN on GPU): on v5e:16x16 at
        # batch 1024 that cuts HBM traffic per chip from 66.6 to 54.1 GiB and lifts the
        # roofline MFU from 54% to 67% (docs/scaling.md, "Fused attention").
        c.model.text.attention_dropout = 0.0
        c.train.global_batch_size = 256
        c.train.num_steps = 50_000
        c.train.log_every = 100
        c.optim.lr = 1e-4
        c.optim.warmup_steps = 2000
        c.optim.lr_multipliers.text = 0.1
        c.loss.chunked = True
        c.checkpoint.every_steps = 2000
