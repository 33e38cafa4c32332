r"""Supervised 18-label classification: the ceiling of what the data and the image encoder allow.

Launch (variants: tiny | demo | small | base, described in configs/common.py):

  python launch/train.py --config=configs/supervised.py:demo --workdir runs/supervised_demo
  python bench/ceiling.py --data demo_out/prepared          # trains this, scores held-out AUC

The same data, image encoder (`model.image.*`), optimizer, mesh and checkpointing as
configs/t3d.py; no text tower. The task is t3d_jax/tasks/supervised.py: ViT3D + a linear
head over the pooled embedding, one sigmoid per `data.label_names`, BCE on the labels
(NaN = unknown, left out). One whole-volume view per example.

The demo variant is the common demo (configs/common.py), whose image settings (input
standardisation, lr, whole-volume views, 1,200 steps of 32) were chosen with bench/ceiling.py on
demo-difficulty synthetic data; the figures are in docs/data_synthetic.md ("The supervised
ceiling") and docs/training.md.
"""

import ml_collections

from configs import common


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = common.get_config(arg, config_file="configs/supervised.py")
    c.task = "supervised"
    c.model.name = "supervised"
    c.data.num_views = 1
    # The head (t3d_jax/tasks/supervised.py): over the encoder's pooled embedding ("pooled") or
    # attention pooling of its tokens ("attention"; num_heads 0 = the encoder's).
    c.model.head = ml_collections.ConfigDict({"pool": "pooled", "num_heads": 0})
    # Positive weighting of the BCE: "none" | "balanced" (negatives/positives per label over the
    # training records used) | a tuple of one float per data.label_names.
    c.loss.pos_weight = ml_collections.FieldReference("none", field_type=object)
    if c.variant == "tiny":
        c.train.global_batch_size = 8
        c.train.num_steps = 4
        c.checkpoint.every_steps = 4
    elif c.variant == "demo":
        # The common demo's values (whole-volume views, input standardisation, batch 32 x 1,200
        # steps at lr 3e-3) were chosen with this task (docs/data_synthetic.md); one checkpoint.
        c.checkpoint.every_steps = c.train.num_steps
    return c
