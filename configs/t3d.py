r"""T3D pretraining: CLIP volume-report alignment + Text-informed Multi-view Alignment.

Launch (variants: tiny | demo | small | base, described in configs/common.py):

  python launch/train.py --config=configs/t3d.py:demo --workdir runs/demo
  python launch/train.py --config=configs/t3d.py:base --workdir gs://BUCKET/t3d_base \
      --config.data.dir=/data/ct_rate_prepared

Any key can be overridden: --config.optim.lr=3e-4 --config.train.num_steps=20000.
The task is t3d_jax/tasks/t3d.py; docs/method.md and docs/training.md name every key.
"""

import ml_collections

from configs import common


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = common.get_config(arg, config_file="configs/t3d.py")
    c.task = "t3d"
    c.model.name = "t3d"  # the two towers plus the TMA head and prototypes

    # --- TMA (t3d_jax/tasks/t3d.py, t3d_jax/losses/tma.py) ----------------------------------
    c.model.tma = ml_collections.ConfigDict()
    c.model.tma.num_prototypes = {"tiny": 8, "demo": 16}.get(c.variant, 64)
    c.model.tma.temperature = 0.1
    c.model.tma.sinkhorn_epsilon = 0.05
    c.model.tma.sinkhorn_iters = 3
    # Sinkhorn targets from the text-free token embeddings ('visual') or from the same
    # text-informed ones as the predictions ('text_informed': solvable from the report alone).
    c.model.tma.targets = "visual"
    c.model.tma.weight = 1.0  # lambda
    c.model.tma.hist_weight = 0.0
    c.model.tma.freeze_prototypes_steps = 0
    c.model.tma.num_heads = 0  # cross-attention heads; 0 = the image encoder's
    c.model.tma.mlp_dim = 0  # projection MLP hidden width; 0 = 2x the image width
    return c
