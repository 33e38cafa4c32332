"""3D ResNet image encoder in MONAI's layout (``monai.networks.nets.ResNet`` / ``resnet50``).

A volume ``[B, X, Y, Z, C]`` (channel-last, as every encoder here) is standardised like the
ViT's input (``model.image.input_mean/input_std``), then

    conv1 (conv1_size, conv1_stride, padding size//2, no bias) -> norm -> ReLU
    -> max pool 3, stride 2, padding 1 (unless no_max_pool)
    -> layer1..layer4 (stride 1, 2, 2, 2), blocks per stage from ``arch``
    -> tokens = the last stage's feature map, row-major over its grid (gx, gy, gz)
    -> pooled = their mean (MONAI's AdaptiveAvgPool3d(1); MONAI's ``fc`` head is not built)

Blocks: 'bottleneck' (1x1x1 -> 3x3x3 (stride) -> 1x1x1 x4 expansion; resnet50/101/152/200) or
'basic' (3x3x3 (stride) -> 3x3x3; resnet10/18/34). Shortcut 'B' (MONAI's default): a strided
1x1x1 convolution + norm where the shape changes (with a bias when ``bias_downsample``:
MONAI's ``ResNet`` default is True, MedicalNet's resnet50 weights have none); 'A': strided
subsampling + zero channels. ``widen_factor`` scales every stage's width as MONAI's does.

The output dict is the ViT's (t3d_jax/models/vit3d.py): ``pooled`` [B, width], ``tokens``
[B, N, width], ``token_index`` (arange: every cell kept), ``grid``; so the two-tower model and
the TMA loss take either encoder (the loss places tokens by ``grid`` and the crop boxes).
``features(x)`` returns the stem's and the four stages' maps, for a U-Net-style decoder.

Normalisation (``norm``):

* 'batch': BatchNorm. Training (``deterministic=False``) normalises with the statistics of
  the batch and updates the running statistics (``nnx.BatchStat`` ``mean``/``var``, PyTorch's
  rule: ``running = (1 - momentum) * running + momentum * batch``, the variance unbiased);
  evaluation uses the running statistics (MONAI's ``eval()``). The statistics are plain
  ``jnp.mean`` over (batch, x, y, z) in float32: inside the jitted step, with the batch
  sharded over the mesh, XLA computes them over the GLOBAL batch (a cross-device reduction),
  never per device (tests/test_resnet3d.py checks sharded == unsharded). The running
  statistics live in the train state's ``model_state`` (not the params), so the optimizer
  never sees them; checkpoints keep them and the params-only restore reads them too
  (t3d_jax/train/params.py).
* 'group': GroupNorm (``norm_groups`` groups, fewer where a width needs), per example; no
  running statistics, no batch coupling. MONAI's ResNet applies a non-batch ``norm`` only to
  its stem, so a GroupNorm model has no MONAI ``resnet50`` equivalent (export refuses it).

Parameter paths mirror MONAI's names (``conv1``, ``bn1``, ``layer{1..4}/i/conv1``...,
``downsample_conv``/``downsample_norm`` for MONAI's ``downsample.0/.1``); conv kernels are
``[kx, ky, kz, C_in, C_out]`` with logical names (None, None, None, 'conv_in', 'conv_out').
:func:`t3d_jax.models.convert.load_monai_resnet` imports MONAI state dicts, and
:mod:`t3d_jax.models.export_torch` writes them back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3d_jax.models import layers

# MONAI's resnet_params: block kind and blocks per stage.
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet10": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
    "resnet200": ("bottleneck", (3, 24, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
BLOCK_INPLANES = (64, 128, 256, 512)  # MONAI's get_inplanes()
NORMS = ("batch", "group")
SHORTCUTS = ("A", "B")


@dataclasses.dataclass(frozen=True)
class ResNet3DConfig:
    """Hyperparameters of :class:`ResNet3D`; ``from_config`` reads ``config.model.image``
    (``name='resnet3d'``) and its ``resnet`` sub-dict."""

    arch: str = "resnet50"
    widen_factor: float = 1.0
    in_channels: int = 1
    conv1_size: tuple[int, int, int] = (7, 7, 7)
    conv1_stride: tuple[int, int, int] = (2, 2, 2)  # MONAI's ResNet default is 1; MedicalNet's 2
    no_max_pool: bool = False
    shortcut: str = "B"
    bias_downsample: bool = False  # MONAI ResNet's default is True; resnet50 MedicalNet weights: False
    norm: str = "batch"  # batch | group
    norm_groups: int = 32  # GroupNorm groups (fewer where a width is not divisible)
    norm_eps: float = 1e-5  # PyTorch's BatchNorm/GroupNorm eps
    bn_momentum: float = 0.1  # PyTorch's convention: weight of the new batch in the running stats
    remat: str = "none"  # per block, as model.image.remat for the ViT
    input_mean: float = 0.0
    input_std: float = 1.0
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        object.__setattr__(self, "conv1_size", layers.triple(self.conv1_size))
        object.__setattr__(self, "conv1_stride", layers.triple(self.conv1_stride))
        if self.arch not in ARCHS:
            raise ValueError(f"unknown ResNet arch {self.arch!r}; choose one of {sorted(ARCHS)}")
        if self.norm not in NORMS:
            raise ValueError(f"ResNet norm must be one of {NORMS}, got {self.norm!r}")
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"ResNet shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}")
        if not self.widen_factor > 0 or min(self.planes) < 1:
            raise ValueError(f"widen_factor {self.widen_factor} leaves a stage without channels")
        if not 0.0 <= self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum is the new batch's weight, in [0, 1]: got {self.bn_momentum}")
        if not self.input_std > 0:
            raise ValueError(f"input_std must be > 0, got {self.input_std}")
        layers.remat_policy(self.remat)

    @property
    def block(self) -> str:
        return ARCHS[self.arch][0]

    @property
    def layers(self) -> tuple[int, int, int, int]:
        return ARCHS[self.arch][1]

    @property
    def planes(self) -> tuple[int, ...]:
        """Each stage's inner width (MONAI: ``int(inplanes * widen_factor)``)."""
        return tuple(int(p * self.widen_factor) for p in BLOCK_INPLANES)

    @property
    def width(self) -> int:
        """Channels of the last stage = the width of ``tokens`` and ``pooled``."""
        return self.planes[-1] * EXPANSION[self.block]

    @property
    def num_heads(self) -> int:
        """Cross-attention heads of a TMA head on these tokens when ``model.tma.num_heads`` is 0
        (the ViT's field of that name): one per 64 channels."""
        return max(1, self.width // 64) if self.width % 64 == 0 else 1

    @property
    def stride(self) -> tuple[int, int, int]:
        """Input voxels per token along each axis (for sizes the strides divide)."""
        pool = 1 if self.no_max_pool else 2
        return tuple(s * pool * 8 for s in self.conv1_stride)

    def grid(self, image_size) -> tuple[int, int, int]:
        """The token grid of an input of ``image_size`` voxels (exact conv/pool arithmetic)."""
        out = []
        for n, k, s in zip(layers.triple(image_size), self.conv1_size, self.conv1_stride):
            n = (n + 2 * (k // 2) - k) // s + 1
            if not self.no_max_pool:
                n = (n + 2 - 3) // 2 + 1
            for _ in range(3):  # layers 2-4: 3x3x3 / 1x1x1 convs with stride 2, padding 1 / 0
                n = (n - 1) // 2 + 1
            out.append(n)
        return tuple(out)

    @classmethod
    def from_config(cls, image_cfg, *, dtype="float32", param_dtype="float32") -> "ResNet3DConfig":
        """Builds from ``config.model.image`` (shared keys: in_channels, remat, input_mean,
        input_std) and ``config.model.image.resnet`` (the rest) + ``config.model.dtype``."""
        c = dict(image_cfg)
        r = dict(c.get("resnet", None) or {})
        known = {f.name for f in dataclasses.fields(cls)} - {"in_channels", "remat", "input_mean", "input_std",
                                                             "dtype", "param_dtype"}
        unknown = sorted(set(r) - known)
        if unknown:
            raise ValueError(f"config.model.image.resnet: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**r, in_channels=int(c.get("in_channels", 1)), remat=str(c.get("remat", "none")),
                   input_mean=float(c.get("input_mean", 0.0)), input_std=float(c.get("input_std", 1.0)),
                   dtype=dtype, param_dtype=param_dtype)


# ----------------------------------------------------------------------------- layers
def kaiming_normal_fan_out(key, shape, dtype=jnp.float32) -> jax.Array:
    """MONAI's conv init, ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``: N(0, 2 / fan_out)
    with fan_out = C_out x kernel volume. Drawn flat and reshaped: XLA:CPU compiles a random
    draw of a 5-D shape several times slower (13 s for a ResNet-10's init)."""
    fan_out = int(np.prod(shape[:-2])) * int(shape[-1])
    flat = jax.random.normal(key, (int(np.prod(shape)),), jnp.float32)
    return (flat * np.sqrt(2.0 / fan_out)).reshape(shape).astype(dtype)


class Conv3D(nnx.Module):
    """A 3D convolution, channel-last, symmetric zero padding (PyTorch's ``padding=p``)."""

    def __init__(self, in_features: int, out_features: int, kernel_size, *, stride=1, padding=0,
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel_size = layers.triple(kernel_size)
        self.stride = layers.triple(stride)
        self.padding = layers.triple(padding)
        self.dtype = layers.as_dtype(dtype)
        self.kernel = layers.param(rngs, kaiming_normal_fan_out, (*self.kernel_size, in_features, out_features),
                                   (None, None, None, "conv_in", "conv_out"), param_dtype)
        self.bias = (layers.param(rngs, nnx.initializers.zeros_init(), (out_features,), ("conv_out",), param_dtype)
                     if use_bias else nnx.data(None))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=self.stride,
            padding=[(p, p) for p in self.padding], dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class BatchNorm(nnx.Module):
    """BatchNorm over (batch, x, y, z) of channel-last maps; see the module docstring."""

    def __init__(self, features: int, *, epsilon: float = 1e-5, momentum: float = 0.1, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)
        self.dtype = layers.as_dtype(dtype)
        self.scale = layers.param(rngs, nnx.initializers.ones_init(), (features,), ("conv_out",), param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros_init(), (features,), ("conv_out",), param_dtype)
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32), out_sharding=("conv_out",),
                                  eager_sharding=False)
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32), out_sharding=("conv_out",),
                                 eager_sharding=False)

    def __call__(self, x: jax.Array, *, use_running: bool = True) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if use_running:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            # A plain mean over the batch axis: under jit with the batch sharded, XLA reduces
            # across devices, so these are the global batch's statistics.
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            n = int(np.prod([x.shape[a] for a in axes]))
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = (1.0 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1.0 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm of channel-last maps, statistics per example and group in float32."""

    def __init__(self, features: int, groups: int, *, epsilon: float = 1e-5, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        groups = max(1, min(int(groups), features))
        while features % groups:
            groups -= 1
        self.groups = groups
        self.epsilon = float(epsilon)
        self.dtype = layers.as_dtype(dtype)
        self.scale = layers.param(rngs, nnx.initializers.ones_init(), (features,), ("conv_out",), param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros_init(), (features,), ("conv_out",), param_dtype)

    def __call__(self, x: jax.Array, *, use_running: bool = True) -> jax.Array:
        del use_running  # no running statistics
        c = x.shape[-1]
        g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def _norm(cfg: ResNet3DConfig, features: int, rngs: nnx.Rngs):
    kw = dict(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    if cfg.norm == "batch":
        return BatchNorm(features, momentum=cfg.bn_momentum, **kw)
    return GroupNorm(features, cfg.norm_groups, **kw)


def max_pool(x: jax.Array) -> jax.Array:
    """MONAI's MaxPool3d(kernel 3, stride 2, padding 1) on channel-last maps (padding = -inf)."""
    pad = ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0))
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, 3, 3, 3, 1),
                                 (1, 2, 2, 2, 1), pad)


class Block(nnx.Module):
    """One residual block (basic or bottleneck) with its shortcut."""

    def __init__(self, cfg: ResNet3DConfig, in_planes: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.kind = cfg.block
        out = planes * EXPANSION[cfg.block]
        if cfg.block == "bottleneck":
            self.conv1 = Conv3D(in_planes, planes, 1, **kw)
            self.bn1 = _norm(cfg, planes, rngs)
            self.conv2 = Conv3D(planes, planes, 3, stride=stride, padding=1, **kw)
            self.bn2 = _norm(cfg, planes, rngs)
            self.conv3 = Conv3D(planes, out, 1, **kw)
            self.bn3 = _norm(cfg, out, rngs)
        else:
            self.conv1 = Conv3D(in_planes, planes, 3, stride=stride, padding=1, **kw)
            self.bn1 = _norm(cfg, planes, rngs)
            self.conv2 = Conv3D(planes, planes, 3, padding=1, **kw)
            self.bn2 = _norm(cfg, planes, rngs)
        self.stride = stride
        self.shortcut = None
        self.out_planes = out
        if stride != 1 or in_planes != out:
            self.shortcut = cfg.shortcut
            if cfg.shortcut == "B":
                self.downsample_conv = Conv3D(in_planes, out, 1, stride=stride, use_bias=cfg.bias_downsample, **kw)
                self.downsample_norm = _norm(cfg, out, rngs)

    def __call__(self, x: jax.Array, use_running: bool) -> jax.Array:
        n = dict(use_running=use_running)
        y = jax.nn.relu(self.bn1(self.conv1(x), **n))
        if self.kind == "bottleneck":
            y = jax.nn.relu(self.bn2(self.conv2(y), **n))
            y = self.bn3(self.conv3(y), **n)
        else:
            y = self.bn2(self.conv2(y), **n)
        if self.shortcut == "B":
            residual = self.downsample_norm(self.downsample_conv(x), **n)
        elif self.shortcut == "A":
            s = self.stride
            residual = x[:, ::s, ::s, ::s]
            residual = jnp.pad(residual, ((0, 0),) * 4 + ((0, self.out_planes - x.shape[-1]),))
        else:
            residual = x
        return jax.nn.relu(y + residual.astype(y.dtype))


def _block_forward(block: Block, x: jax.Array, use_running: bool) -> jax.Array:
    return block(x, use_running)


class ResNet3D(nnx.Module):
    """3D ResNet encoder; see the module docstring for the layout and outputs."""

    def __init__(self, cfg: ResNet3DConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = layers.as_dtype(cfg.dtype)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        planes = cfg.planes
        self.conv1 = Conv3D(cfg.in_channels, planes[0], cfg.conv1_size, stride=cfg.conv1_stride,
                            padding=tuple(k // 2 for k in cfg.conv1_size), **kw)
        self.bn1 = _norm(cfg, planes[0], rngs)
        in_planes = planes[0]
        stages = []
        for i, (p, count) in enumerate(zip(planes, cfg.layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(count):
                blocks.append(Block(cfg, in_planes, p, stride if j == 0 else 1, rngs=rngs))
                in_planes = p * EXPANSION[cfg.block]
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def standardise(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.input_mean == 0.0 and cfg.input_std == 1.0:
            return x
        return (x.astype(jnp.float32) - cfg.input_mean) * (1.0 / cfg.input_std)

    def features(self, x: jax.Array, *, deterministic: bool = True) -> list[jax.Array]:
        """Channel-last maps ``[stem (after ReLU, before pooling), layer1, ..., layer4]``."""
        cfg = self.cfg
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"ResNet3D expects [B, X, Y, Z, {cfg.in_channels}] channel-last input, got {x.shape}")
        use_running = bool(deterministic)
        x = jax.nn.relu(self.bn1(self.conv1(self.standardise(x).astype(self.dtype)), use_running=use_running))
        out = [x]
        if not cfg.no_max_pool:
            x = max_pool(x)
        forward = layers.maybe_remat(_block_forward, cfg.remat, static_argnums=(2,))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = forward(block, x, use_running)
            out.append(x)
        return out

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs=None) -> dict:
        """``deterministic=False`` = training: BatchNorm uses (and records) the batch's statistics."""
        del rngs  # nothing random
        fmap = self.features(x, deterministic=deterministic)[-1]
        b, gx, gy, gz, c = fmap.shape
        tokens = fmap.reshape(b, gx * gy * gz, c)
        pooled = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(tokens.dtype)
        n = gx * gy * gz
        token_index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        return {"pooled": pooled, "tokens": tokens, "token_index": token_index, "grid": (gx, gy, gz)}
