r"""MS-VLM: per-slice 2D ViT + inter-slice Z-former, trained with CLIP alignment + MEM.

Launch (variants: tiny | demo | small | base; the rest as configs/common.py describes):

  python launch/train.py --config=configs/msvlm.py:demo --workdir runs/msvlm_demo
  python launch/evaluate.py --config=configs/msvlm.py:demo --workdir runs/msvlm_demo
  python launch/train.py --config=configs/msvlm.py:base --workdir /ckpt/msvlm_base \
      --config.data.dir=/data/ct_rate_prepared

The task is t3d_jax/tasks/msvlm.py (the `clip` task + `loss.mem_weight` x masked embedding
modelling); the image encoder t3d_jax/models/msvlm.py (`model.image.name = 'msvlm'`,
`model.image.size` picks its SIZES row, `model.image.msvlm.*` overrides any MSVLMConfig
field); docs/msvlm.md describes both.

The slice size is `data.view_size[:2]` and the slice count `data.view_size[2]`: the data
pipeline still makes fixed-size views, so every volume of a run has the same number of
slices and one series. The encoder's variable slice counts (length buckets) and several
series per example are not fed by the pipeline yet (docs/msvlm.md, "Not done here").

  tiny  -- tests: 16^3 views, MS-VLM 'tiny' (width 64, 2 + 2 layers), 8x8 slice patches.
  demo  -- the synthetic demo data at 32^3 (as configs/t3d.py:demo), MS-VLM 'demo'
           (width 128, 4-layer slice ViT, 4-layer Z-former), 8x8 patches.
  small -- one GPU: 96x96 slices x 64, MS-VLM 'small' (ViT-S/16-like, 6-layer Z-former).
  base  -- the paper's size: ViT-B/16 slices at 480x480, 240 slices (the ct_clip preset's
           stored grid: whole volumes, no crop), 12-layer Z-former.
"""

import ml_collections

from configs import clip

MSVLM_SIZE = {"tiny": "tiny", "demo": "demo", "small": "small", "base": "base"}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = clip.get_config(arg)
    c.task = "msvlm"
    c.model.name = "clip"  # the two towers; the MEM head lives in the image encoder
    c.model.image.name = "msvlm"
    c.model.image.size = MSVLM_SIZE[c.variant]
    # Any MSVLMConfig field (t3d_jax/models/msvlm.py); patch_size is the 2D slice patch.
    c.model.image.msvlm = ml_collections.ConfigDict()
    m = c.model.image.msvlm
    m.patch_size = (16, 16) if c.variant in ("small", "base") else (8, 8)
    m.attention_pattern = "dense"  # dense | local (sliding window of `window` slices + globals)
    m.window = 16
    m.num_global = 2
    m.slice_chunk = 64  # slices of each volume per step of the slice encoder
    m.slice_remat = True
    m.freeze_slice_encoder = False  # with optim.freeze = (r'^image_encoder/slice_encoder/',)

    # --- MEM (t3d_jax/losses/mem.py) -------------------------------------------------------
    c.loss.mem_weight = 1.0  # loss = loss_clip + mem_weight * loss_mem
    c.loss.mem_rate = 0.3  # probability a valid slice token is zero-filled (MS-VLM's 0.3)

    if c.variant == "tiny":
        m.slice_chunk = 8
    elif c.variant == "base":
        c.data.view_size = (480, 480, 240)
        c.data.crop_min = 1.0  # whole volumes, read slice by slice
        m.slice_chunk = 16  # 16 x B slices per step of the slice encoder
    return c
