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

The slice size is `data.view_size[:2]`. Two kinds of data (docs/msvlm.md, "Data"):

* fixed views (default): the slice count is `data.view_size[2]`, one series per example.
* `,slices` (e.g. `configs/msvlm.py:demo,slices`): every slice of every series at the preset's
  z spacing (`preprocess.keep_slices`, `data.slices.enabled`), padded to one of the encoder's
  length buckets (`data.slices.length`; 0 = the smallest holding the data's longest example,
  chosen once at start). The `demo,slices` data is its own folder (demo_out/prepared_slices),
  made once from synthetic chests with a second series of another slice thickness
  (`data.synthetic_series = 2`); other data: prepare it with
  `launch/prepare_data.py --config=configs/msvlm.py:VARIANT,slices` (or `--keep-slices`).

  tiny  -- tests: 16^3 views, MS-VLM 'tiny' (width 64, 2 + 2 layers), 8x8 slice patches.
  demo  -- the synthetic demo data at 32^3 (as configs/t3d.py:demo), MS-VLM 'demo'
           (width 128, 4-layer slice ViT, 4-layer Z-former), 8x8 patches.
  small -- one GPU: 96x96 slices x 64, MS-VLM 'small' (ViT-S/16-like, 6-layer Z-former).
  base  -- the paper's size: ViT-B/16 slices at 480x480, 240 slices (the ct_clip preset's
           stored grid: whole volumes, no crop), 12-layer Z-former.
"""

import ml_collections

from configs import clip
from t3d_jax.utils import UserValueError

MSVLM_SIZE = {"tiny": "tiny", "demo": "demo", "small": "small", "base": "base"}
OPTIONS = ("", "slices")


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    variant, _, option = (arg or "demo").partition(",")
    if option not in OPTIONS:
        raise UserValueError(f"configs/msvlm.py: unknown option {option!r}; use VARIANT or VARIANT,slices "
                             "(e.g. --config=configs/msvlm.py:demo,slices)")
    c = clip.get_config(variant)
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
    # MEM trains the Z-former only (slice tokens under stop_gradient): let through, it collapsed
    # the demo's trainable slice encoder (CLIP at chance after 1,200 steps; docs/msvlm.md).
    c.loss.mem_trains_slice_encoder = False

    # --- Slice sequences (t3d_jax/data/slices.py; the `,slices` option turns them on) ----------
    c.preprocess.keep_slices = False  # prepare: keep every slice at the preset's z spacing, several series
    c.data.slices = ml_collections.ConfigDict()
    c.data.slices.enabled = False  # the pipeline yields padded slice sequences instead of views
    c.data.slices.length = 0  # padded slots L, one of m.buckets; 0 = smallest bucket >= the data's longest
    c.data.slices.max_series = 0  # series per example; 0 = the encoder's num_series
    c.data.synthetic_series = 1  # series per synthetic example (data.synthetic_if_missing)
    if option == "slices":
        c.preprocess.keep_slices = True
        c.data.slices.enabled = True
        # view_size[2] is then only the evaluators' slice count: they embed series 0 resampled
        # to view_size (t3d_jax/data/slices.py); the demo's ~56 slices of 5 mm per series.
        if c.variant == "demo":
            c.data.dir = "demo_out/prepared_slices"
            c.data.synthetic_series = 2  # a second series of another slice thickness
            c.data.view_size = (32, 32, 56)

    if c.variant == "tiny":
        m.slice_chunk = 8
    elif c.variant == "base":
        c.data.view_size = (480, 480, 240)
        c.data.crop_min = 1.0  # whole volumes, read slice by slice
        m.slice_chunk = 16  # 16 x B slices per step of the slice encoder
    return c
