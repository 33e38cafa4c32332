"""3D ViT patch encoder for CT volumes.

A volume ``[B, X, Y, Z, C]`` (channel-last, canonical RAS+ voxel order) is standardised
(``(x - input_mean) / input_std``, config keys ``model.image.input_mean/input_std``; identity
by default, so weights trained on raw inputs and MONAI checkpoints are unaffected), cut into
non-overlapping patches (a Conv3d with stride = kernel = patch size, written as
reshape + matmul, which is the same linear map), position embeddings are added, an
optional random subset of tokens is kept (HLIP/FLIP-style patch dropout, training only),
and pre-LN transformer blocks follow, then a final LayerNorm.

Tokens are ordered row-major over the patch grid ``(gx, gy, gz)``: token ``n`` covers the
patch at ``(n // (gy*gz), (n // gz) % gy, n % gz)``.  ``token_index`` says which grid cell
each *kept* token is (``arange`` without dropout), so the TMA loss can match tokens of two
views from their crop boxes.

Position embeddings (learned, or fixed 3D sin-cos) are built for the grid of
``image_size / patch_size``; a different grid at call time gets them resized trilinearly
(``jax.image.resize``), i.e. the table is treated as a field over the view's extent.

The layout also matches MONAI's ``ViT`` (no CLS, learnable position embeddings,
pre-LN blocks with biased output projection, final LayerNorm, eps 1e-5), so
:func:`t3d_jax.models.convert.load_monai_vit` can load its checkpoints (M3D-CLIP's encoder).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3d_jax.models import attention as attention_lib
from t3d_jax.models import layers

# width, depth, heads, mlp
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 4, 128),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}


@dataclasses.dataclass(frozen=True)
class ViT3DConfig:
    """Hyperparameters of :class:`ViT3D`; ``from_config`` reads ``config.model.image``."""

    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    image_size: tuple[int, int, int] = (48, 48, 48)  # the grid the position table is built for
    patch_size: tuple[int, int, int] = (8, 8, 8)
    in_channels: int = 1
    pos_embed: str = "sincos"  # sincos | learned
    pool: str = "mean"  # mean | cls
    qkv_bias: bool = True
    patch_dropout: float = 0.0  # fraction of tokens DROPPED when deterministic=False (keep = 1 - this)
    remat: str = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable | nothing_saveable
    scan_layers: bool = False  # blocks stacked and run by nnx.scan (see layers.make_layer_stack)
    layer_norm_eps: float = 1e-6
    # Model-input standardisation, applied first: (x - input_mean) / input_std. The data's
    # intensities (preset scaling, e.g. the demo preset's [0, 1]) stay as stored; zero-centred,
    # unit-scale inputs are what the patch embedding's lecun init expects (docs/training.md).
    input_mean: float = 0.0
    input_std: float = 1.0
    attention: str = "auto"  # attention implementation (t3d_jax/models/attention.py; config model.attention)
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        object.__setattr__(self, "image_size", layers.triple(self.image_size))
        object.__setattr__(self, "patch_size", layers.triple(self.patch_size))
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {self.pos_embed!r}")
        if self.pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {self.pool!r}")
        if not self.input_std > 0:
            raise ValueError(f"input_std must be > 0, got {self.input_std}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout is the dropped fraction, in [0, 1): got {self.patch_dropout}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by num_heads {self.num_heads}")
        for s, p in zip(self.image_size, self.patch_size):
            if s % p:
                raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        layers.remat_policy(self.remat)  # validates the name
        attention_lib.check_implementation(self.attention)

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))

    @classmethod
    def from_size(cls, size: str, **overrides) -> "ViT3DConfig":
        if size not in SIZES:
            raise ValueError(f"unknown ViT3D size {size!r}; choose one of {sorted(SIZES)}")
        width, depth, heads, mlp = SIZES[size]
        return cls(**{"width": width, "depth": depth, "num_heads": heads, "mlp_dim": mlp, **overrides})

    @classmethod
    def from_config(cls, image_cfg, *, image_size, dtype="float32", param_dtype="float32",
                    attention="auto") -> "ViT3DConfig":
        """Builds from ``config.model.image`` (+ ``config.data.view_size``, ``config.model.dtype``
        and ``config.model.attention``)."""
        c = dict(image_cfg)
        return cls.from_size(
            c.get("size", "tiny"), image_size=image_size, patch_size=c.get("patch_size", (8, 8, 8)),
            in_channels=c.get("in_channels", 1), pos_embed=c.get("pos_embed", "sincos"),
            pool=c.get("pool", "mean"), qkv_bias=c.get("qkv_bias", True),
            patch_dropout=c.get("patch_dropout", 0.0), remat=c.get("remat", "none"),
            scan_layers=bool(c.get("scan_layers", False)),
            layer_norm_eps=c.get("layer_norm_eps", 1e-6),  # 1e-5 to match MONAI-pretrained weights
            input_mean=float(c.get("input_mean", 0.0)), input_std=float(c.get("input_std", 1.0)),
            attention=attention, dtype=dtype, param_dtype=param_dtype)


@functools.lru_cache(maxsize=32)
def sincos_3d(grid: tuple[int, int, int], width: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 3D sin-cos position table ``[gx*gy*gz, width]`` (row-major grid order).

    Each axis gets ``2*(width//6)`` channels (half sin, half cos at geometric frequencies,
    as in MAE/MoCo-v3 extended to 3 axes); leftover channels (width not a multiple of 6)
    are zero.
    """
    per_axis = width // 6
    if per_axis == 0:
        raise ValueError(f"sincos position embedding needs width >= 6, got {width}")
    omega = 1.0 / temperature ** (np.arange(per_axis, dtype=np.float64) / per_axis)
    coords = np.stack(np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij"), -1)
    coords = coords.reshape(-1, 3)
    parts = []
    for a in range(3):
        angle = coords[:, a:a + 1] * omega[None, :]
        parts += [np.sin(angle), np.cos(angle)]
    table = np.concatenate(parts, axis=1)
    pad = width - table.shape[1]
    return np.pad(table, ((0, 0), (0, pad))).astype(np.float32)


def resize_pos_embed(table: jax.Array, src_grid, dst_grid) -> jax.Array:
    """Trilinearly resizes a ``[N, d]`` position table from ``src_grid`` to ``dst_grid``."""
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid == dst_grid:
        return table
    d = table.shape[-1]
    vol = table.reshape(*src_grid, d)
    out = jax.image.resize(vol.astype(jnp.float32), (*dst_grid, d), method="trilinear", antialias=False)
    return out.reshape(-1, d).astype(table.dtype)


class Block(nnx.Module):
    """Pre-LN transformer block: x + Attn(LN(x), mask), then x + MLP(LN(x)). `mask`: an optional
    boolean key mask for the attention (MS-VLM's Z-former passes its padding / local pattern)."""

    def __init__(self, cfg: ViT3DConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm1 = layers.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, **kw)
        self.attn = layers.MultiHeadAttention(cfg.width, cfg.num_heads, qkv_bias=cfg.qkv_bias,
                                              attention=cfg.attention, **kw)
        self.norm2 = layers.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, **kw)
        self.mlp = layers.Mlp(cfg.width, cfg.mlp_dim, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


def _block_forward(block: Block, x: jax.Array) -> jax.Array:
    return block(x)


class ViT3D(nnx.Module):
    """3D ViT; see the module docstring for shapes and token order."""

    def __init__(self, cfg: ViT3DConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdt = layers.as_dtype(cfg.dtype), layers.as_dtype(cfg.param_dtype)
        self.dtype = dtype
        px, py, pz = cfg.patch_size
        self.patch_embed = layers.Dense(
            (px, py, pz, cfg.in_channels), (cfg.width,), (None, None, None, "patch"), ("embed",),
            kernel_init=nnx.initializers.lecun_normal(), dtype=dtype, param_dtype=pdt, rngs=rngs)
        n = int(np.prod(cfg.grid))
        if cfg.pos_embed == "learned":
            self.pos_embed = layers.param(rngs, nnx.initializers.normal(0.02), (n, cfg.width), (None, "embed"), pdt)
        else:
            self.pos_embed = nnx.data(None)
        self.cls_token = (layers.param(rngs, nnx.initializers.zeros_init(), (cfg.width,), ("embed",), pdt)
                          if cfg.pool == "cls" else nnx.data(None))
        self.blocks = layers.make_layer_stack(lambda r: Block(cfg, rngs=r), cfg.depth, rngs,
                                              scanned=cfg.scan_layers)
        self.norm = layers.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=pdt, rngs=rngs)
        self.dropout_rngs = rngs["dropout"].fork() if cfg.patch_dropout > 0 else nnx.data(None)

    # -- pieces, public so that other heads (MAE-style decoders) can reuse them -------------
    def patchify(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int, int]]:
        """``[B, X, Y, Z, C] -> ([B, N, width], grid)`` with row-major (x, y, z) token order."""
        cfg = self.cfg
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"ViT3D expects [B, X, Y, Z, {cfg.in_channels}] channel-last input, got {x.shape}")
        b, sx, sy, sz, c = x.shape
        px, py, pz = cfg.patch_size
        if sx % px or sy % py or sz % pz:
            raise ValueError(f"volume size {(sx, sy, sz)} is not divisible by patch size {cfg.patch_size}")
        grid = (sx // px, sy // py, sz // pz)
        x = x.reshape(b, grid[0], px, grid[1], py, grid[2], pz, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, grid[0] * grid[1] * grid[2], px, py, pz, c)
        return self.patch_embed(x), grid

    def position_table(self, grid) -> jax.Array:
        """Position embeddings ``[gx*gy*gz, width]`` for ``grid`` (resized if not the built grid)."""
        cfg = self.cfg
        if cfg.pos_embed == "learned":
            table = self.pos_embed[...]
        else:
            table = jnp.asarray(sincos_3d(cfg.grid, cfg.width))
        return resize_pos_embed(table, cfg.grid, grid).astype(self.dtype)

    def drop_patches(self, tokens: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keeps a random ``1 - patch_dropout`` fraction of tokens per example (grid order kept)."""
        b, n, _ = tokens.shape
        keep = max(1, int(round(n * (1.0 - self.cfg.patch_dropout))))
        noise = jax.random.uniform(key, (b, n))
        index = jnp.sort(jnp.argsort(noise, axis=1)[:, :keep], axis=1).astype(jnp.int32)
        return jnp.take_along_axis(tokens, index[:, :, None], axis=1), index

    def standardise(self, x: jax.Array) -> jax.Array:
        """``(x - input_mean) / input_std`` in float32 (the identity with the defaults)."""
        cfg = self.cfg
        if cfg.input_mean == 0.0 and cfg.input_std == 1.0:
            return x
        return (x.astype(jnp.float32) - cfg.input_mean) * (1.0 / cfg.input_std)

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | jax.Array | None = None,
                 hidden_layers: tuple[int, ...] = ()) -> dict:
        """``hidden_layers``: 0-based block indices whose outputs (before the final LayerNorm, CLS
        token removed, ``[B, N, width]``) are returned under ``"hidden"`` in that order (MONAI
        ``ViT``'s ``hidden_states_out[i]``; the UNETR decoder reads them). Empty (default): no
        ``"hidden"`` key, the outputs are unchanged. With ``scan_layers`` every block's output is
        stacked by the scan (``depth`` x one activation) and the requested ones are picked."""
        cfg = self.cfg
        hidden_layers = tuple(int(i) for i in hidden_layers)
        for i in hidden_layers:
            if not 0 <= i < cfg.depth:
                raise ValueError(f"ViT3D hidden_layers: block {i} out of range for depth {cfg.depth}")
        tokens, grid = self.patchify(self.standardise(x).astype(self.dtype))
        b, n, _ = tokens.shape
        tokens = tokens + self.position_table(grid)[None]
        if not deterministic and cfg.patch_dropout > 0:
            key = _dropout_key(rngs if rngs is not None else self.dropout_rngs)
            tokens, token_index = self.drop_patches(tokens, key)
        else:
            token_index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        if cfg.pool == "cls":
            cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, cfg.width))
            tokens = jnp.concatenate([cls, tokens], axis=1)
        forward = layers.maybe_remat(_block_forward, cfg.remat)
        hidden = None
        if not hidden_layers:
            tokens = layers.apply_layer_stack(forward, self.blocks, tokens, scanned=cfg.scan_layers)
        elif cfg.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: layers.LAYERS_AXIS})
            def run(layer, carry):
                y = forward(layer, carry)
                return y, y

            tokens, stacked = run(self.blocks, tokens)
            hidden = [stacked[i] for i in hidden_layers]
        else:
            outs = []
            for block in self.blocks:
                tokens = forward(block, tokens)
                outs.append(tokens)
            hidden = [outs[i] for i in hidden_layers]
        tokens = self.norm(tokens)
        if cfg.pool == "cls":
            pooled, tokens = tokens[:, 0], tokens[:, 1:]
            if hidden is not None:
                hidden = [h[:, 1:] for h in hidden]
        else:
            pooled = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(tokens.dtype)
        out = {"pooled": pooled, "tokens": tokens, "token_index": token_index, "grid": grid}
        if hidden is not None:
            out["hidden"] = tuple(hidden)
        return out


def _dropout_key(rngs) -> jax.Array:
    if rngs is None:
        raise ValueError("ViT3D patch dropout needs randomness: build it with nnx.Rngs(dropout=...) or pass rngs=")
    if isinstance(rngs, nnx.Rngs):
        return rngs["dropout"]()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    return rngs  # a jax.random key
