r"""Segmentation fine-tuning: the `segmentation` task (t3d_jax/tasks/segmentation.py) on a
pretraining's image encoder, or from scratch.

  python launch/train.py --config=configs/finetune_seg.py:tiny|demo --workdir runs/seg_demo
  python launch/train.py --config=configs/finetune_seg.py:demo,frozen ...   # decoder only

`:VARIANT[,MODE]`: the variants of configs/common.py; MODE as configs/finetune_cls.py (full |
frozen | layer_decay). The decoder is UNETR for `model.image.name = "vit3d"` and a U-Net decoder
for "resnet3d" (t3d_jax/models/seg_decoders.py); `model.seg.num_classes` counts the background
(class 0). The loss is Dice + cross-entropy (MONAI's DiceCELoss: softmax, one-hot labels;
`loss.dice_include_background`, `loss.dice_batch`, `loss.lambda_dice`, `loss.lambda_ce`).
`init_from.checkpoint_params = ("image_encoder",)` reads only a pretraining's image encoder;
the decoder starts fresh. The batch holds `views` and `masks` (the records' label maps, cropped
with the views' boxes: the data side of issue 12). After the last step the `segmentation`
evaluator (t3d_jax/evaluate/seg_eval.py) scores the held-out split: sliding windows over each
whole prepared volume with a mask, Dice and HD95 per class (the `eval.seg_*` keys below);
`launch/evaluate.py` does the same on a checkpoint, with intervals and files.

The `demo` variant reads `demo_out/prepared_seg` (the demo's synthetic chests with label maps:
`launch/make_synthetic.py --masks`, then `launch/prepare_data.py`; docs/segmentation.md) with the
synthetic generator's 13 classes, and starts from the demo pretraining's image encoder when
`demo_out/run/checkpoints` exists (configs/t3d.py:demo: ViT tiny, patch 8, 32^3 whole-volume
views: the same `model.image` and `data.view_size` as here).
"""

import os

import ml_collections

from configs import common, finetune_cls

DEMO_PRETRAINING = finetune_cls.DEMO_PRETRAINING


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    variant, _, mode = (arg or "demo").partition(",")
    c = common.get_config(variant or "demo", config_file="configs/finetune_seg.py")
    c.task = "segmentation"
    c.model.name = "segmentation"
    c.data.num_views = 1
    c.data.masks = True  # the batch's `masks`: the records' label maps cut with the views' boxes
    c.model.image.patch_dropout = 0.0  # UNETR reads every token
    c.model.seg = ml_collections.ConfigDict({
        "num_classes": 2,  # background included; set to the data's class table
        "feature_size": 16,  # decoder channels at full resolution (x2 per level)
        "norm": "instance",  # instance (MONAI UNETR's) | group
        "norm_groups": 8,
        "hidden_layers": (),  # UNETR skip blocks (0-based); () = evenly spaced (MONAI's 3, 6, 9 for ViT-B/16)
    })
    c.loss.dice_include_background = True
    c.loss.dice_batch = False
    c.loss.lambda_dice = 1.0
    c.loss.lambda_ce = 1.0
    c.optim.lr_multipliers = ml_collections.ConfigDict({"image": 1.0, "decoder": 1.0})
    c.eval.evaluators = ("segmentation",)  # at the end of training (eval.every_steps = 0)
    c.eval.seg_grid = "views"  # windows on a grid of the training views' voxel size | "stored"
    c.eval.seg_overlap = 0.5
    c.eval.seg_sw_batch_size = 0  # 0 = eval.batch_size windows per call
    c.eval.seg_max_cases = 0  # periodic evaluations: score the first N cases only (0 = all)
    c.init_from.checkpoint_params = ("image_encoder",)
    finetune_cls.apply_mode(c, mode or "full")
    if c.variant == "tiny":
        c.model.seg.feature_size = 4
        c.train.global_batch_size = 8
        c.train.num_steps = 4
        c.checkpoint.every_steps = 4
    elif c.variant == "demo":
        c.model.seg.feature_size = 8
        c.model.seg.num_classes = 13  # = len(t3d_jax.data.synthetic.MASK_CLASSES), background included
        c.data.dir = "demo_out/prepared_seg"
        c.data.synthetic_if_missing = 0  # the embedded demo data has no masks: make them with --masks
        if os.path.isdir(DEMO_PRETRAINING):
            c.init_from.checkpoint = DEMO_PRETRAINING
        c.train.global_batch_size = 8
        c.train.num_steps = 300
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 30
        c.checkpoint.every_steps = c.train.num_steps
    elif c.variant == "base":
        c.model.seg.feature_size = 16
    return c
