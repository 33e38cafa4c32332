r"""T3D pretraining: CLIP volume-report alignment + Text-informed Multi-view Alignment.

Launch (variants: tiny | demo | small | base, described in configs/common.py):

  python launch/train.py --config=configs/t3d.py:demo --workdir runs/demo
  python launch/train.py --config=configs/t3d.py:base --workdir gs://BUCKET/t3d_base \
      --config.data.dir=/data/ct_rate_prepared

Any key can be overridden: --config.optim.lr=3e-4 --config.train.num_steps=20000.
The task is t3d_jax/tasks/t3d.py; docs/method.md and docs/training.md name every key.

resnet_<variant> (resnet_tiny | resnet_demo | resnet_small | resnet_base): the same recipe with
the 3D ResNet-50 image encoder in MONAI's layout (model.image.name = "resnet3d",
t3d_jax/models/resnet3d.py) instead of the ViT, BatchNorm over the global batch:

  python launch/train.py --config=configs/t3d.py:resnet_demo --workdir runs/t3d_resnet_demo

XLA:CPU runs 3D convolutions slowly (docs/performance.md): resnet_demo trains on the demo data
but takes far longer per step on a CPU than the ViT demo.
"""

import ml_collections

from configs import common


RESNET = "resnet_"


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    arg = arg or "demo"
    resnet = arg.startswith(RESNET)
    c = common.get_config(arg[len(RESNET):] if resnet else arg, config_file="configs/t3d.py")
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
    if resnet:
        use_resnet(c)
    return c


def use_resnet(c: ml_collections.ConfigDict) -> None:
    """The 3D ResNet-50 image encoder (MONAI layout, BatchNorm) at the variant's size."""
    base = c.variant
    c.variant = RESNET + base
    c.model.image.name = "resnet3d"
    r = c.model.image.resnet
    r.arch = "resnet50"
    if base in ("tiny", "demo"):
        # A token grid of 2x2x2 at 16^3 (tiny) and 32^3 (demo): stem stride 1 (tiny) or 2 (demo),
        # no max pool, then the /8 of layers 2-4. Widths x1/8 (tiny: 256 channels out) or x1/4 (demo: 512).
        r.widen_factor = 0.125 if base == "tiny" else 0.25
        r.conv1_size = (3, 3, 3) if base == "tiny" else (7, 7, 7)
        r.conv1_stride = (1, 1, 1) if base == "tiny" else (2, 2, 2)
        r.no_max_pool = True
    else:  # small / base: MedicalNet's resnet50 (conv1 7, stride 2, max pool): tokens every 32 voxels
        r.widen_factor = 1.0
        r.conv1_size = (7, 7, 7)
        r.conv1_stride = (2, 2, 2)
        r.no_max_pool = False
