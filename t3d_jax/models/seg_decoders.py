"""Segmentation decoders: UNETR on a :class:`ViT3D`, a U-Net decoder on a :class:`ResNet3D`.

Both turn an encoder's maps into per-voxel class logits ``[B, X, Y, Z, K]`` (float32) at the
input's resolution, channel-last like every model here. Their blocks are MONAI's
(``monai.networks.blocks``; kernels ``[kx, ky, kz, in, out]``, PyTorch's ``[out, in, kx, ky, kz]``):

* ``ResBlock`` = ``UnetResBlock``: conv 3^3 -> norm -> leaky ReLU (0.01) -> conv 3^3 -> norm,
  plus the input (through conv 1^3 + norm where the channels change), -> leaky ReLU. No conv
  biases (MONAI's ``get_conv_layer`` default).
* ``UpConv``: the transposed convolution with kernel = stride (2 per axis, or 1 on an axis that
  needs no upsampling), no bias: each input voxel writes its own ``s_x x s_y x s_z`` block, so
  it is an einsum + reshape.
* ``UpBlock`` = ``UnetrUpBlock``: UpConv -> concatenate the skip (channels after) -> ResBlock.
* ``PrUpBlock`` = ``UnetrPrUpBlock`` (``conv_block=True, res_block=True``): UpConv, then
  ``num_layer`` x (UpConv -> ResBlock).
* Norm (``model.seg.norm``): ``instance`` (MONAI UNETR's default ``"instance"``: per example
  and channel, no affine parameters, eps 1e-5) or ``group`` (GroupNorm, ``norm_groups``, affine).

**UNETR** (Hatamizadeh et al. 2022; ``monai.networks.nets.UNETR``), generalised to any patch
size that is a power of two per axis. With ``n = log2(max patch)`` levels between the token grid
(level n) and the voxels (level 0), level ``l`` has ``f * 2^l`` channels (``f`` =
``feature_size``; level 0: ``f``), and the step from level ``l + 1`` to ``l`` doubles an axis
whose patch is still coarser than ``2^l`` (so an anisotropic patch (16, 16, 8) gets strides
(2, 2, 1) on its coarsest step). Skips: level 0 from the (standardised) input through a ResBlock
(``encoder1``); level ``l`` in 1..n-1 from the hidden state of block ``hidden_layers[l-1]``
reshaped to the token grid and upsampled by a PrUpBlock with ``n - l`` up-convolutions; the
bottom is the encoder's final (normed) tokens on their grid. The default ``hidden_layers`` are
``depth * l // n`` (0-based), for a 12-block ViT with patch 16 exactly MONAI's 3, 6, 9.
The ViT must keep every token (``patch_dropout = 0``) and take a volume its patches divide.

**U-Net decoder on ResNet3D**: skips are ``ResNet3D.features()`` -- the stem (after ReLU, before
max pooling), layer1, layer2, layer3 -- and a ResBlock on the input at full resolution; the bottom
is layer4. Level ``l`` (0 = input, 1 = stem, 2..4 = layer1..3) has ``f * 2^l`` channels; each
UpBlock upsamples by the encoder's stride between the two levels (the stem's ``conv1_stride``, 2
for the max pool or 1 without it, 2 per later stage) and crops the result to the skip's shape
(odd sizes: a stride-2 conv rounds up).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3d_jax.models import layers
from t3d_jax.models.resnet3d import Conv3D, GroupNorm, ResNet3D, kaiming_normal_fan_out
from t3d_jax.models.vit3d import ViT3D

NORMS = ("instance", "group")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """``config.model.seg``: classes (background included), width, norm, ViT skip depths."""

    num_classes: int = 2
    feature_size: int = 16
    norm: str = "instance"
    norm_groups: int = 8
    hidden_layers: tuple[int, ...] = ()  # UNETR: 0-based ViT blocks of the skips; () = evenly spaced
    dtype: Any = "float32"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"model.seg.norm must be one of {NORMS}, got {self.norm!r}")
        if self.num_classes < 2:
            raise ValueError(f"model.seg.num_classes counts the background too: >= 2, got {self.num_classes}")
        if self.feature_size < 1:
            raise ValueError(f"model.seg.feature_size must be >= 1, got {self.feature_size}")
        object.__setattr__(self, "hidden_layers", tuple(int(i) for i in self.hidden_layers))

    @classmethod
    def from_config(cls, seg_cfg, *, dtype="float32") -> "DecoderConfig":
        c = dict(seg_cfg or {})
        return cls(num_classes=int(c.get("num_classes", 2)), feature_size=int(c.get("feature_size", 16)),
                   norm=str(c.get("norm", "instance")), norm_groups=int(c.get("norm_groups", 8)),
                   hidden_layers=tuple(c.get("hidden_layers", ()) or ()), dtype=dtype)


class InstanceNorm(nnx.Module):
    """Per example and channel over (x, y, z), no affine (PyTorch ``InstanceNorm3d`` default)."""

    def __init__(self, epsilon: float = 1e-5, dtype=jnp.float32):
        self.epsilon = float(epsilon)
        self.dtype = layers.as_dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=(1, 2, 3), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 3), keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon)).astype(self.dtype)


def _norm(cfg: DecoderConfig, features: int, rngs: nnx.Rngs):
    if cfg.norm == "instance":
        return InstanceNorm(dtype=cfg.dtype)
    return GroupNorm(features, cfg.norm_groups, dtype=cfg.dtype, rngs=rngs)


class ResBlock(nnx.Module):
    """MONAI ``UnetResBlock`` (stride 1)."""

    def __init__(self, cfg: DecoderConfig, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, rngs=rngs)
        self.conv1 = Conv3D(in_ch, out_ch, 3, padding=1, **kw)
        self.norm1 = _norm(cfg, out_ch, rngs)
        self.conv2 = Conv3D(out_ch, out_ch, 3, padding=1, **kw)
        self.norm2 = _norm(cfg, out_ch, rngs)
        if in_ch != out_ch:
            self.conv3 = Conv3D(in_ch, out_ch, 1, **kw)
            self.norm3 = _norm(cfg, out_ch, rngs)
        else:
            self.conv3 = nnx.data(None)
            self.norm3 = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        y = self.norm2(self.conv2(y))
        residual = x if self.conv3 is None else self.norm3(self.conv3(x))
        return jax.nn.leaky_relu(y + residual.astype(y.dtype), 0.01)


class UpConv(nnx.Module):
    """Transposed convolution with kernel = stride (MONAI ``get_conv_layer(is_transposed=True)``,
    no bias): ``[B, X, Y, Z, C] -> [B, X*sx, Y*sy, Z*sz, O]``; kernel ``[sx, sy, sz, C, O]``
    (PyTorch's ``ConvTranspose3d.weight`` ``[C, O, sx, sy, sz]`` transposed)."""

    def __init__(self, in_ch: int, out_ch: int, stride, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.stride = tuple(int(s) for s in stride)
        self.dtype = layers.as_dtype(dtype)
        self.kernel = layers.param(rngs, kaiming_normal_fan_out, (*self.stride, in_ch, out_ch),
                                   (None, None, None, "conv_in", "conv_out"), jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, gx, gy, gz, _ = x.shape
        sx, sy, sz = self.stride
        k = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("bxyzc,ijkco->bxiyjzko", x.astype(self.dtype), k)
        return y.reshape(b, gx * sx, gy * sy, gz * sz, k.shape[-1])


def _crop_to(x: jax.Array, shape) -> jax.Array:
    return x[:, :shape[0], :shape[1], :shape[2]]


class UpBlock(nnx.Module):
    """MONAI ``UnetrUpBlock``: UpConv, concatenate the skip, ResBlock."""

    def __init__(self, cfg: DecoderConfig, in_ch: int, skip_ch: int, out_ch: int, stride, *, rngs: nnx.Rngs):
        self.transp_conv = UpConv(in_ch, out_ch, stride, dtype=cfg.dtype, rngs=rngs)
        self.conv_block = ResBlock(cfg, out_ch + skip_ch, out_ch, rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        y = _crop_to(self.transp_conv(x), skip.shape[1:4])
        return self.conv_block(jnp.concatenate([y, skip.astype(y.dtype)], axis=-1))


class PrUpBlock(nnx.Module):
    """MONAI ``UnetrPrUpBlock`` (conv_block, res_block): UpConv, then per stride UpConv + ResBlock."""

    def __init__(self, cfg: DecoderConfig, in_ch: int, out_ch: int, strides: Sequence, *, rngs: nnx.Rngs):
        self.transp_conv_init = UpConv(in_ch, out_ch, strides[0], dtype=cfg.dtype, rngs=rngs)
        self.blocks = nnx.List([nnx.List([UpConv(out_ch, out_ch, s, dtype=cfg.dtype, rngs=rngs),
                                          ResBlock(cfg, out_ch, out_ch, rngs=rngs)]) for s in strides[1:]])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.transp_conv_init(x)
        for up, block in self.blocks:
            x = block(up(x))
        return x


class OutBlock(nnx.Module):
    """MONAI ``UnetOutBlock``: 1x1x1 conv with bias -> float32 logits."""

    def __init__(self, in_ch: int, num_classes: int, *, rngs: nnx.Rngs):
        self.conv = Conv3D(in_ch, num_classes, 1, use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x.astype(jnp.float32))


def _log2_patch(p: int) -> int:
    n = int(round(math.log2(p))) if p > 0 else -1
    if n < 1 or 2 ** n != p:
        raise ValueError(f"UNETR needs patch sizes that are powers of two (>= 2), got {p}")
    return n


def unetr_strides(patch_size) -> list[tuple[int, int, int]]:
    """Upsampling stride of each step ``l + 1 -> l``, index ``l`` = 0 (finest) .. n-1."""
    ns = [_log2_patch(int(p)) for p in patch_size]
    return [tuple(2 if l < na else 1 for na in ns) for l in range(max(ns))]


def default_hidden_layers(depth: int, levels: int) -> tuple[int, ...]:
    """0-based ViT blocks of the UNETR skips of levels 1..levels-1: ``depth * l // levels``."""
    return tuple(min(depth - 1, depth * l // levels) for l in range(1, levels))


def _tokens_to_grid(tokens: jax.Array, grid) -> jax.Array:
    b, n, w = tokens.shape
    if n != int(np.prod(grid)):
        raise ValueError(f"UNETR needs every token of the grid {tuple(grid)} ({int(np.prod(grid))}), got {n}: "
                         f"set model.image.patch_dropout = 0")
    return tokens.reshape(b, *grid, w)


class UNETRDecoder(nnx.Module):
    """The UNETR decoder of a :class:`ViT3D` (module docstring). Call with the encoder's input
    (standardised) and its output dict holding ``hidden`` (``ViT3D(..., hidden_layers=)``)."""

    def __init__(self, cfg: DecoderConfig, vit_cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        strides = unetr_strides(vit_cfg.patch_size)
        n = len(strides)
        self.levels = n
        self.hidden_layers = cfg.hidden_layers or default_hidden_layers(vit_cfg.depth, n)
        if len(self.hidden_layers) != n - 1:
            raise ValueError(f"UNETR with patch {tuple(vit_cfg.patch_size)} has {n - 1} hidden-state skips; "
                             f"model.seg.hidden_layers gives {len(self.hidden_layers)}")
        f, w = cfg.feature_size, vit_cfg.width
        ch = [f * 2 ** l for l in range(n)] + [w]
        self.encoder1 = ResBlock(cfg, vit_cfg.in_channels, f, rngs=rngs)
        # level l (1..n-1): n - l up-convolutions with the strides of steps n-1, ..., l
        self.skips = nnx.List([PrUpBlock(cfg, w, ch[l], [strides[s] for s in range(n - 1, l - 1, -1)], rngs=rngs)
                               for l in range(1, n)])
        self.decoders = nnx.List([UpBlock(cfg, ch[l + 1], ch[l], ch[l], strides[l], rngs=rngs)
                                  for l in range(n - 1, -1, -1)])
        self.out = OutBlock(f, cfg.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, enc: dict) -> jax.Array:
        grid = enc["grid"]
        if "hidden" not in enc:
            raise ValueError("UNETRDecoder needs the ViT's hidden states: call it with hidden_layers=")
        skips = [self.encoder1(x)]
        skips += [blk(_tokens_to_grid(h, grid)) for blk, h in zip(self.skips, enc["hidden"])]
        y = _tokens_to_grid(enc["tokens"], grid)
        for dec, skip in zip(self.decoders, reversed(skips)):
            y = dec(y, skip)
        return self.out(y)


class ResNetUNetDecoder(nnx.Module):
    """The U-Net decoder of a :class:`ResNet3D` (module docstring). Call with the encoder's input
    (standardised) and ``ResNet3D.features()``."""

    def __init__(self, cfg: DecoderConfig, resnet_cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        planes, expansion = resnet_cfg.planes, resnet_cfg.width // resnet_cfg.planes[-1]
        feat_ch = [planes[0]] + [p * expansion for p in planes]  # stem, layer1..4
        pool = (1, 1, 1) if resnet_cfg.no_max_pool else (2, 2, 2)
        steps = [tuple(resnet_cfg.conv1_stride), pool, (2, 2, 2), (2, 2, 2), (2, 2, 2)]  # into level l+1
        f = cfg.feature_size
        ch = [f * 2 ** l for l in range(5)]
        skip_ch = [f] + feat_ch[:4]  # level 0: the input block; 1..4: stem, layer1..3
        self.encoder1 = ResBlock(cfg, resnet_cfg.in_channels, f, rngs=rngs)
        below = [ch[l + 1] for l in range(4)] + [feat_ch[4]]
        self.decoders = nnx.List([UpBlock(cfg, below[l], skip_ch[l], ch[l], steps[l], rngs=rngs)
                                  for l in range(4, -1, -1)])
        self.out = OutBlock(f, cfg.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, features: Sequence[jax.Array]) -> jax.Array:
        skips = [self.encoder1(x)] + list(features[:4])
        y = features[4]
        for dec, skip in zip(self.decoders, reversed(skips)):
            y = dec(y, skip)
        return self.out(y)


class SegmentationNet(nnx.Module):
    """An image encoder (``image_encoder``: ViT3D or ResNet3D, built by the caller) and its decoder
    (``decoder``): ``logits(volume [B, X, Y, Z, C]) -> [B, X, Y, Z, K]`` float32."""

    def __init__(self, encoder, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.image_encoder = encoder
        if isinstance(encoder, ViT3D):
            if encoder.cfg.patch_dropout > 0:
                raise ValueError("UNETR needs every token: set model.image.patch_dropout = 0 for segmentation")
            self.decoder = UNETRDecoder(cfg, encoder.cfg, rngs=rngs)
        elif isinstance(encoder, ResNet3D):
            self.decoder = ResNetUNetDecoder(cfg, encoder.cfg, rngs=rngs)
        else:
            raise ValueError(f"no segmentation decoder for {type(encoder).__name__}")
        self.num_classes = cfg.num_classes

    def logits(self, volume: jax.Array, *, deterministic: bool = True) -> jax.Array:
        enc = self.image_encoder
        x = enc.standardise(volume)
        if isinstance(self.decoder, UNETRDecoder):
            out = enc(volume, deterministic=deterministic, hidden_layers=self.decoder.hidden_layers)
            return self.decoder(x, out)
        return self.decoder(x, enc.features(volume, deterministic=deterministic))

    def __call__(self, volume: jax.Array, *, deterministic: bool = True) -> jax.Array:
        return self.logits(volume, deterministic=deterministic)
