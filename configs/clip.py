r"""CLIP-only baseline (CT-CLIP style): the T3D recipe without the TMA objective.

Launch (variants: tiny | demo | small | base, as in configs/t3d.py):

  python launch/train.py --config=configs/clip.py:demo --workdir runs/clip_demo
  python launch/train.py --config=configs/clip.py:base --workdir /ckpt/clip_base \
      --config.data.dir=/data/ct_rate_prepared

Same data, encoders, optimizer, mesh and checkpointing as configs/t3d.py; only the model
differs: `model.name='clip'` (symmetric InfoNCE of every view against its report, no TMA
head, no prototypes). One view per example is the CT-CLIP setting.
"""

import importlib.util
import os

_T3D = os.path.join(os.path.dirname(os.path.abspath(__file__)), "t3d.py")


def _t3d_module():
    spec = importlib.util.spec_from_file_location("_t3d_config_for_clip", _T3D)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = "demo"):
    c = _t3d_module().get_config(arg)
    c.model.name = "clip"
    c.model.tma.weight = 0.0  # no TMA term (the clip model has no TMA head)
    c.data.num_views = 1
    return c
