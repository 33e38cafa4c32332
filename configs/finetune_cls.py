r"""Classification fine-tuning: the `supervised` task started from a pretraining's image encoder.

  python launch/train.py --config=configs/finetune_cls.py:demo --workdir runs/ft_demo
  python launch/train.py --config=configs/finetune_cls.py:demo,frozen ...        # linear head only
  python launch/train.py --config=configs/finetune_cls.py:demo,layer_decay ...   # LLRD 0.75
  python launch/train.py --config=configs/finetune_cls.py:base \
      --config.init_from.checkpoint=/ckpt/t3d_base/checkpoints --config.data.dir=DIR \
      --config.data.train_fraction=0.1                                          # 10% of the labels
  python bench/label_efficiency.py --data DIR --pretrained RUN_DIR              # the whole table

`:VARIANT[,MODE]`: the variants of configs/common.py; MODE is how the encoder trains:

  full         (default) every parameter, one learning rate;
  frozen       the encoder frozen (`optim.freeze = ("^image_encoder/",)`): no update, no Adam
               state; only the head trains (a linear probe trained by the trainer);
  layer_decay  layer-wise learning-rate decay, `optim.layer_decay = 0.75`: block i of L gets
               lr * 0.75^(L - i), the patch embedding 0.75^(L + 1), the head the full lr.

The model, head, loss and data keys are configs/supervised.py's (`model.head.pool`,
`loss.pos_weight`, `data.train_fraction`, `data.train_subset_seed`). `init_from.checkpoint`
names the pretraining's checkpoints folder and `init_from.checkpoint_params =
("image_encoder",)` reads only its image encoder (parameters only, no optimizer state, no
BatchNorm statistics); the head starts fresh. With `init_from.checkpoint = ""` the same config
trains from scratch. The `demo` variant initialises from `demo_out/run/checkpoints` (the
pretraining `make demo` writes, configs/t3d.py:demo) when that folder exists, relative to the
working directory, and from scratch otherwise; its image encoder is the demo pretraining's.
docs/finetuning.md has the details and the label-efficiency command.
"""

import os

import ml_collections

from configs import supervised

MODES = ("full", "frozen", "layer_decay")
DEMO_PRETRAINING = "demo_out/run/checkpoints"  # launch/demo.sh's pretraining run
LAYER_DECAY = 0.75


def apply_mode(c: ml_collections.ConfigDict, mode: str) -> None:
    """Sets the optimizer keys of a fine-tuning mode (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"configs/finetune_cls.py: unknown mode {mode!r}; choose one of {MODES} "
                         f"(e.g. --config=configs/finetune_cls.py:demo,frozen)")
    c.optim.freeze = ("^image_encoder/",) if mode == "frozen" else ()
    c.optim.layer_decay = LAYER_DECAY if mode == "layer_decay" else 0.0


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    variant, _, mode = (arg or "demo").partition(",")
    c = supervised.get_config(variant or "demo")
    c.init_from.checkpoint_params = ("image_encoder",)
    apply_mode(c, mode or "full")
    if c.variant == "demo":
        if os.path.isdir(DEMO_PRETRAINING):
            c.init_from.checkpoint = DEMO_PRETRAINING
        # A few minutes on the 2-core CPU: 400 steps of 32 whole volumes (the supervised demo's
        # batch, lr and input standardisation; a third of its steps).
        c.train.num_steps = 400
        c.optim.warmup_steps = 40
        c.checkpoint.every_steps = c.train.num_steps
    return c
