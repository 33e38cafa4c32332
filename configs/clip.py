r"""CLIP-only baseline (CT-CLIP style): the T3D recipe without the TMA objective.

Launch (variants: tiny | demo | small | base, described in configs/common.py):

  python launch/train.py --config=configs/clip.py:demo --workdir runs/clip_demo
  python launch/train.py --config=configs/clip.py:base --workdir /ckpt/clip_base \
      --config.data.dir=/data/ct_rate_prepared

Same data, encoders, optimizer, mesh and checkpointing as configs/t3d.py; the task is
t3d_jax/tasks/clip.py (symmetric InfoNCE of every view against its report, no TMA head, no
prototypes). One view per example is the CT-CLIP setting.
"""

import ml_collections

from configs import common


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = common.get_config(arg, config_file="configs/clip.py")
    c.task = "clip"
    c.model.name = "clip"
    c.data.num_views = 1
    return c
