"""3D Swin Transformer image encoder: MONAI's ``SwinTransformer`` (the ``swinViT`` of ``SwinUNETR``).

A volume ``[B, X, Y, Z, C]`` (channel-last, as every encoder here) is standardised like the
ViT's input (``model.image.input_mean/input_std``; identity by default), then, exactly as
``monai.networks.nets.swin_unetr.SwinTransformer`` (MONAI 1.6.1, 3D, no ``use_v2``/Hyena):

    patch embedding (Conv3d kernel = stride = patch_size, the input zero-padded at the end to a
      multiple of it; optional LayerNorm, MONAI's ``patch_norm``)              -> x0, stride p
    4 stages, each: ``depth`` Swin blocks (even blocks: plain windows, odd blocks: windows
      shifted by window // 2 with the attention mask), then patch merging  -> x1..x4, stride 2p..16p

    block:  x = x + WindowAttention(pad(LN(x)))   (cropped back after the windows)
            x = x + MLP(LN(x))                     (GELU, exact erf)

and every stage output goes through a LayerNorm without affine parameters (MONAI's
``normalize=True``, what ``SwinUNETR`` passes). Details that decide the numbers, all MONAI's:

* Windows. Per stage, an axis the map does not exceed (``size <= window``) uses the map's size
  as window and is not shifted (``get_window_size``). The map is padded with zeros at the end to
  a multiple of the window *after* ``norm1``; the padded positions take part in the attention
  as keys (no padding mask, as MONAI) and are cropped away after it.
* Shifted windows: ``roll`` by ``-window // 2``, attention with MONAI's additive region mask
  (-100 between tokens from different regions of the rolled map, :func:`compute_mask`, built
  on the padded size; in the graph from the per-token region ids), roll back.
* Relative position bias: a table ``[(2wx-1)(2wy-1)(2wz-1), heads]`` indexed by the relative
  offset of each query/key pair in the *configured* window. When a stage clips its window
  (a map smaller than the window), MONAI indexes the bias with the top-left ``n x n`` block of
  the full window's index (``relative_position_index[:n, :n]``), which is not the clipped
  window's true relative offsets; we do the same so that imported weights give MONAI's output.
* Patch merging (``model.image.swin.downsample``): 'merging' = MONAI's ``PatchMerging`` (the
  v0.9 version and the default of both ``SwinUNETR`` and ``SwinTransformer``; the 8 neighbours
  concatenated in the order (0,0,0), (1,0,0), (0,1,0), (0,0,1), (1,1,0), (1,0,1), (0,1,1),
  (1,1,1)) or 'mergingv2' (``PatchMergingV2``: ``itertools.product`` order). Odd sizes are
  zero-padded at the end; then LayerNorm(8C) and a bias-free Linear 8C -> 2C.

Attention is an explicit einsum, not :func:`t3d_jax.models.attention.dot_product_attention`:
the relative position bias (and the -100 mask) are additive float biases, which that
function's boolean-mask interface cannot express. Logits and softmax are float32 (as the
project's 'reference' attention); windows are short (at most ``prod(window)`` = 343 tokens).

Outputs: ``features(x)`` returns the five normalised maps ``[x0, ..., x4]`` channel-last
(MONAI's ``hidden_states_out``, transposed); ``__call__`` returns the encoder dict every image
tower returns (t3d_jax/models/vit3d.py): ``tokens`` = the last map ``x4`` (stride 16 x patch,
width 16 x embed_dim) row-major over its grid, ``pooled`` = their mean, ``token_index``
(arange) and ``grid``. Dropout and stochastic depth are not built (MONAI's SwinUNETR defaults
are 0). Weight import: :func:`t3d_jax.models.convert.load_monai_swin` / config key
``init_from.monai_swin``; export: :func:`t3d_jax.models.export_torch.swin3d_to_monai`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3d_jax.models import layers

# embed_dim (MONAI's feature_size), blocks per stage, heads per stage.
SIZES: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "tiny": (12, (2, 2, 2, 2), (1, 2, 4, 8)),
    "demo": (24, (2, 2, 2, 2), (3, 6, 12, 24)),  # SwinUNETR's default feature_size 24
    "small": (36, (2, 2, 2, 2), (3, 6, 12, 24)),
    "base": (48, (2, 2, 2, 2), (3, 6, 12, 24)),  # MG-3D's "Swin-B" (SwinUNETR, feature_size 48)
    "large": (96, (2, 2, 2, 2), (3, 6, 12, 24)),  # MG-3D's "Swin-L" (feature_size 96)
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),  # Liu et al.'s Swin-B widths and depths, in 3D
}
DOWNSAMPLE = ("merging", "mergingv2")
# Neighbour offsets (d, h, w) concatenated by MONAI's PatchMerging ('merging', x0..x7) and by
# PatchMergingV2 ('mergingv2', itertools.product order).
MERGE_ORDER = {
    "merging": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)),
    "mergingv2": tuple(itertools.product(range(2), range(2), range(2))),
}
MASK_VALUE = -100.0  # MONAI's (and Swin's) additive mask between regions of a shifted window


@dataclasses.dataclass(frozen=True)
class Swin3DConfig:
    """Hyperparameters of :class:`Swin3D`; ``from_config`` reads ``config.model.image``
    (``name='swin3d'``) and its ``swin`` sub-dict. Field names follow MONAI's
    ``SwinTransformer`` arguments (``embed_dim`` = SwinUNETR's ``feature_size``)."""

    embed_dim: int = 12
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads_per_stage: tuple[int, ...] = (1, 2, 4, 8)
    window_size: tuple[int, int, int] = (7, 7, 7)
    patch_size: tuple[int, int, int] = (2, 2, 2)
    in_channels: int = 1
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_norm: bool = False  # LayerNorm after the patch embedding (SwinUNETR: False)
    downsample: str = "merging"  # merging (MONAI's default) | mergingv2
    normalize: bool = True  # parameter-free LayerNorm on every stage output (SwinUNETR: True)
    layer_norm_eps: float = 1e-5  # PyTorch's nn.LayerNorm / F.layer_norm default
    remat: str = "none"  # per block, as model.image.remat for the ViT
    input_mean: float = 0.0
    input_std: float = 1.0
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        object.__setattr__(self, "window_size", layers.triple(self.window_size))
        object.__setattr__(self, "patch_size", layers.triple(self.patch_size))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads_per_stage", tuple(int(h) for h in self.num_heads_per_stage))
        if len(self.depths) != 4 or len(self.num_heads_per_stage) != 4:
            raise ValueError(f"Swin3D has 4 stages (as MONAI's SwinTransformer): depths {self.depths}, "
                             f"heads {self.num_heads_per_stage}")
        for i, h in enumerate(self.num_heads_per_stage):
            if self.stage_dim(i) % h:
                raise ValueError(f"Swin3D stage {i}: width {self.stage_dim(i)} not divisible by {h} heads")
        if self.downsample not in DOWNSAMPLE:
            raise ValueError(f"Swin3D downsample must be one of {DOWNSAMPLE}, got {self.downsample!r}")
        if min(self.window_size) < 1 or min(self.patch_size) < 1:
            raise ValueError(f"Swin3D window {self.window_size} / patch {self.patch_size} must be >= 1")
        if not self.input_std > 0:
            raise ValueError(f"input_std must be > 0, got {self.input_std}")
        layers.remat_policy(self.remat)

    def stage_dim(self, i: int) -> int:
        """Channels inside stage ``i`` (its blocks); its merged output has twice as many."""
        return self.embed_dim * 2 ** i

    @property
    def width(self) -> int:
        """Channels of the last map (``tokens``, ``pooled``): 16 x embed_dim."""
        return self.embed_dim * 2 ** len(self.depths)

    @property
    def num_heads(self) -> int:
        """Cross-attention heads of a TMA head on these tokens when ``model.tma.num_heads`` is 0
        (the ViT's field of that name): one per 64 channels, as ResNet3D."""
        return max(1, self.width // 64) if self.width % 64 == 0 else 1

    def grid(self, image_size) -> tuple[int, int, int]:
        """The token grid of an input of ``image_size`` voxels (padding arithmetic included)."""
        out = []
        for n, p in zip(layers.triple(image_size), self.patch_size):
            n = -(-n // p)
            for _ in self.depths:
                n = -(-n // 2)
            out.append(n)
        return tuple(out)

    @classmethod
    def from_size(cls, size: str, **overrides) -> "Swin3DConfig":
        if size not in SIZES:
            raise ValueError(f"unknown Swin3D size {size!r}; choose one of {sorted(SIZES)}")
        embed, depths, heads = SIZES[size]
        return cls(**{"embed_dim": embed, "depths": depths, "num_heads_per_stage": heads, **overrides})

    @classmethod
    def from_config(cls, image_cfg, *, dtype="float32", param_dtype="float32") -> "Swin3DConfig":
        """Builds from ``config.model.image`` (shared keys: in_channels, remat, input_mean,
        input_std) and ``config.model.image.swin`` (``size`` + any field) + ``config.model.dtype``."""
        c = dict(image_cfg)
        s = dict(c.get("swin", None) or {})
        size = str(s.pop("size", "tiny"))
        known = {f.name for f in dataclasses.fields(cls)} - {"in_channels", "remat", "input_mean", "input_std",
                                                             "dtype", "param_dtype"}
        unknown = sorted(set(s) - known)
        if unknown:
            raise ValueError(f"config.model.image.swin: unknown keys {unknown}; known: {sorted(known | {'size'})}")
        return cls.from_size(size, **s, in_channels=int(c.get("in_channels", 1)), remat=str(c.get("remat", "none")),
                             input_mean=float(c.get("input_mean", 0.0)), input_std=float(c.get("input_std", 1.0)),
                             dtype=dtype, param_dtype=param_dtype)


# ----------------------------------------------------------------------------- window helpers
def stage_window(size, window, shift) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """MONAI's ``get_window_size``: an axis with ``size <= window`` uses its size, unshifted."""
    w = tuple(s if s <= wi else wi for s, wi in zip(size, window))
    sh = tuple(0 if s <= wi else si for s, wi, si in zip(size, window, shift))
    return w, sh


@functools.lru_cache(maxsize=16)
def relative_position_index(window: tuple[int, int, int]) -> np.ndarray:
    """MONAI's ``WindowAttention.relative_position_index`` for a window: ``[n, n]`` int64
    (n = prod(window)) into the ``(2wx-1)(2wy-1)(2wz-1)``-row bias table."""
    w0, w1, w2 = window
    coords = np.stack(np.meshgrid(np.arange(w0), np.arange(w1), np.arange(w2), indexing="ij")).reshape(3, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0).astype(np.int64)
    rel[..., 0] += w0 - 1
    rel[..., 1] += w1 - 1
    rel[..., 2] += w2 - 1
    rel[..., 0] *= (2 * w1 - 1) * (2 * w2 - 1)
    rel[..., 1] *= 2 * w2 - 1
    index = rel.sum(-1)
    index.setflags(write=False)  # cached and shared
    return index


def _partition_np(x: np.ndarray, window) -> np.ndarray:
    d, h, w = x.shape
    x = x.reshape(d // window[0], window[0], h // window[1], window[1], w // window[2], window[2])
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(-1, int(np.prod(window)))


@functools.lru_cache(maxsize=32)
def mask_regions(dims: tuple[int, int, int], window: tuple[int, ...], shift: tuple[int, ...]) -> np.ndarray:
    """The region id of every token of every window, ``[num_windows, n]`` int32, of MONAI's
    ``compute_mask`` (its slices kept literally, including ``slice(-0, None)`` for an unshifted
    axis). Tokens of different regions may not attend to each other (:func:`compute_mask`)."""
    img = np.zeros(dims, np.int32)
    cnt = 0
    for d in slice(-window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None):
        for h in slice(-window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None):
            for w in slice(-window[2]), slice(-window[2], -shift[2]), slice(-shift[2], None):
                img[d, h, w] = cnt
                cnt += 1
    regions = np.ascontiguousarray(_partition_np(img, window))
    regions.setflags(write=False)  # cached and shared
    return regions


def compute_mask(dims, window, shift) -> np.ndarray:
    """MONAI's ``compute_mask``: ``[num_windows, n, n]`` float32, 0 within a region, -100 across.
    (The model builds it in the graph from :func:`mask_regions`: for a 7^3 window on a 128^3
    volume the full mask is hundreds of MB, the region ids a few hundred kB.)"""
    win = mask_regions(tuple(dims), tuple(window), tuple(shift))
    return np.where(win[:, None, :] != win[:, :, None], MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x: jax.Array, window) -> jax.Array:
    """``[B, D, H, W, C] -> [B * num_windows, n, C]``, windows row-major (MONAI's order)."""
    b, d, h, w, c = x.shape
    x = x.reshape(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, int(np.prod(window)), c)


def window_reverse(windows: jax.Array, window, dims) -> jax.Array:
    """Inverse of :func:`window_partition` for ``dims = (B, D, H, W)``."""
    b, d, h, w = dims
    x = windows.reshape(b, d // window[0], h // window[1], w // window[2], *window, -1)
    return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


def _pad_end(x: jax.Array, target) -> jax.Array:
    """Zero-pads the three spatial axes of ``[B, D, H, W, C]`` at the end up to ``target``."""
    pad = [(0, 0)] + [(0, t - s) for s, t in zip(x.shape[1:4], target)] + [(0, 0)]
    return jnp.pad(x, pad) if any(p[1] for p in pad) else x


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def layer_norm_no_affine(x: jax.Array, eps: float) -> jax.Array:
    """``F.layer_norm(x, [C])`` (no weight/bias) over the last axis, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


# ----------------------------------------------------------------------------- modules
class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows with MONAI's relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int, int], *, qkv_bias: bool, dtype,
                 param_dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window = tuple(window)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = (num_heads, self.head_dim)
        # MONAI's fused qkv Linear orders its outputs (qkv, head, dh).
        self.qkv = layers.Dense((dim,), (3, *hd), ("embed",), (None, "heads", "kv"), use_bias=qkv_bias, **kw)
        self.proj = layers.Dense(hd, (dim,), ("heads", "kv"), ("embed",), **kw)
        rows = int(np.prod([2 * w - 1 for w in self.window]))
        self.relative_position_bias_table = layers.param(
            rngs, nnx.initializers.truncated_normal(0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02),
            (rows, num_heads), (None, "heads"), param_dtype)

    def __call__(self, x: jax.Array, regions: np.ndarray | None) -> jax.Array:
        """``x [B*nW, n, C]``; ``regions`` ``[nW, n]`` (:func:`mask_regions`; shifted windows) or None."""
        bw, n, _ = x.shape
        qkv = self.qkv(x)  # [B*nW, n, 3, heads, dh]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * np.float32(self.head_dim ** -0.5)
        index = relative_position_index(self.window)[:n, :n].reshape(-1)  # MONAI's [:n, :n], see module doc
        bias = self.relative_position_bias_table[...].astype(jnp.float32)[index].reshape(n, n, -1)
        logits = logits + bias.transpose(2, 0, 1)[None]
        if regions is not None:
            nw = regions.shape[0]
            ids = jnp.asarray(regions)
            mask = jnp.where(ids[:, None, :] != ids[:, :, None], np.float32(MASK_VALUE), np.float32(0.0))
            logits = logits.reshape(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            logits = logits.reshape(bw, self.num_heads, n, n)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v))


class SwinBlock(nnx.Module):
    """One Swin block; ``shifted`` = the odd blocks of a stage (windows rolled by window // 2)."""

    def __init__(self, cfg: Swin3DConfig, dim: int, num_heads: int, shifted: bool, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.window = cfg.window_size
        self.shift = tuple(w // 2 for w in cfg.window_size) if shifted else (0, 0, 0)
        self.norm1 = layers.LayerNorm(dim, epsilon=cfg.layer_norm_eps, **kw)
        self.attn = WindowAttention(dim, num_heads, cfg.window_size, qkv_bias=cfg.qkv_bias, **kw)
        self.norm2 = layers.LayerNorm(dim, epsilon=cfg.layer_norm_eps, **kw)
        self.mlp = layers.Mlp(dim, int(dim * cfg.mlp_ratio), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, d, h, w, c = x.shape
        window, shift = stage_window((d, h, w), self.window, self.shift)
        padded = tuple(_round_up(s, wi) for s, wi in zip((d, h, w), window))
        y = _pad_end(self.norm1(x), padded)
        regions = None
        if any(shift):
            y = jnp.roll(y, tuple(-s for s in shift), axis=(1, 2, 3))
            # MONAI's BasicLayer builds it from the stage's clipped window and shift (= this block's).
            regions = mask_regions(padded, window, shift)
        y = self.attn(window_partition(y, window), regions)
        y = window_reverse(y, window, (b, *padded))
        if any(shift):
            y = jnp.roll(y, shift, axis=(1, 2, 3))
        x = x + y[:, :d, :h, :w].astype(x.dtype)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nnx.Module):
    """MONAI's ``PatchMerging`` / ``PatchMergingV2`` (``order``): 2x2x2 neighbours -> 2C."""

    def __init__(self, dim: int, order: str, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.order = MERGE_ORDER[order]
        self.norm = layers.LayerNorm(8 * dim, epsilon=eps, **kw)
        self.reduction = layers.Dense((8 * dim,), (2 * dim,), ("mlp",), ("embed",), use_bias=False, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        _, d, h, w, _ = x.shape
        x = _pad_end(x, (d + d % 2, h + h % 2, w + w % 2))
        x = jnp.concatenate([x[:, i::2, j::2, k::2] for i, j, k in self.order], axis=-1)
        return self.reduction(self.norm(x))


class Stage(nnx.Module):
    """MONAI's ``BasicLayer``: ``depth`` blocks (alternately plain and shifted) + patch merging."""

    def __init__(self, cfg: Swin3DConfig, i: int, *, rngs: nnx.Rngs):
        dim = cfg.stage_dim(i)
        self.blocks = nnx.List([SwinBlock(cfg, dim, cfg.num_heads_per_stage[i], j % 2 == 1, rngs=rngs)
                                for j in range(cfg.depths[i])])
        self.downsample = PatchMerging(dim, cfg.downsample, eps=cfg.layer_norm_eps, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype, rngs=rngs)


def _block_forward(block: SwinBlock, x: jax.Array) -> jax.Array:
    return block(x)


class Swin3D(nnx.Module):
    """3D Swin Transformer encoder; see the module docstring for the layout and outputs."""

    def __init__(self, cfg: Swin3DConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = layers.as_dtype(cfg.dtype)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        # The patch Conv3d (kernel = stride) as a matmul over each patch (px, py, pz, C), as ViT3D.
        self.patch_embed = layers.Dense((*cfg.patch_size, cfg.in_channels), (cfg.embed_dim,),
                                        (None, None, None, "patch"), ("embed",), **kw)
        self.patch_norm = (layers.LayerNorm(cfg.embed_dim, epsilon=cfg.layer_norm_eps, **kw)
                           if cfg.patch_norm else nnx.data(None))
        self.layers1, self.layers2, self.layers3, self.layers4 = (Stage(cfg, i, rngs=rngs) for i in range(4))

    def standardise(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.input_mean == 0.0 and cfg.input_std == 1.0:
            return x
        return (x.astype(jnp.float32) - cfg.input_mean) * (1.0 / cfg.input_std)

    def embed_patches(self, x: jax.Array) -> jax.Array:
        """``[B, X, Y, Z, C] -> [B, gx, gy, gz, embed_dim]`` (MONAI's ``PatchEmbed``, before the
        stages; a masked-modelling task may replace embeddings here and call :meth:`stages`)."""
        cfg = self.cfg
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"Swin3D expects [B, X, Y, Z, {cfg.in_channels}] channel-last input, got {x.shape}")
        x = self.standardise(x).astype(self.dtype)
        p = cfg.patch_size
        x = _pad_end(x, tuple(_round_up(s, pi) for s, pi in zip(x.shape[1:4], p)))
        b, sx, sy, sz, c = x.shape
        g = (sx // p[0], sy // p[1], sz // p[2])
        x = x.reshape(b, g[0], p[0], g[1], p[1], g[2], p[2], c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        x = self.patch_embed(x)
        return self.patch_norm(x) if self.patch_norm is not None else x

    def _out(self, x: jax.Array) -> jax.Array:
        return layer_norm_no_affine(x, self.cfg.layer_norm_eps) if self.cfg.normalize else x

    def stages(self, x0: jax.Array) -> list[jax.Array]:
        """The five (normalised) maps ``[x0, x1, x2, x3, x4]`` from the patch embeddings ``x0``."""
        forward = layers.maybe_remat(_block_forward, self.cfg.remat)
        out = [self._out(x0)]
        x = x0
        for stage in (self.layers1, self.layers2, self.layers3, self.layers4):
            for block in stage.blocks:
                x = forward(block, x)
            x = stage.downsample(x)
            out.append(self._out(x))
        return out

    def features(self, x: jax.Array, *, deterministic: bool = True) -> list[jax.Array]:
        """MONAI's ``SwinTransformer(x, normalize)`` outputs, channel-last: strides p, 2p, ..., 16p."""
        del deterministic  # no dropout / stochastic depth
        return self.stages(self.embed_patches(x))

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs=None) -> dict:
        del rngs  # nothing random
        return encoder_output(self.features(x, deterministic=deterministic)[-1])


def encoder_output(fmap: jax.Array) -> dict:
    """The image-tower dict of the last map ``[B, gx, gy, gz, C]``: row-major ``tokens``, their
    mean as ``pooled``, ``token_index`` (every cell kept) and ``grid``."""
    b, gx, gy, gz, c = fmap.shape
    n = gx * gy * gz
    tokens = fmap.reshape(b, n, c)
    pooled = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(tokens.dtype)
    token_index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    return {"pooled": pooled, "tokens": tokens, "token_index": token_index, "grid": (gx, gy, gz)}
