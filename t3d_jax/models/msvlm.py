"""MS-VLM's image encoder: a 2D ViT on every axial slice, then a transformer across slices.

After MS-VLM (Lee, Park et al., arXiv 2412.13558): a volume is read slice by slice, then
across slices, so any slice count and several series (planes, phases) go through one model.
Only the paper's abstract could be read; what it fixes and what is ours is in docs/msvlm.md.

Pieces (submodule names are part of the contract: optimizer freeze regexes match them):

* ``slice_encoder`` (:class:`SliceViT`): a 2D ViT, [CLS] token, learned positions, pre-LN
  blocks (ViT3D's :class:`~t3d_jax.models.vit3d.Block`), final LayerNorm: the layout of
  Hugging Face's ``ViTModel``, whose weights :func:`load_hf_vit` imports. A volume
  ``[B, X, Y, Z, C]`` is cut into its Z axial slices ``[X, Y, C]`` (slice x = the ViT's image
  height, y = its width); each slice's token is the final [CLS] state. The slices run in
  chunks of ``slice_chunk`` per volume through a carry-less ``nnx.scan`` (each rematerialised in the
  backward pass when ``slice_remat``), so activation memory is one chunk's, not the volume's.
  Freezing it: ``optim.freeze = (r'^image_encoder/slice_encoder/',)`` (no update, no optimizer
  state) plus ``freeze_slice_encoder=True`` (a ``stop_gradient`` on its tokens, so no backward
  pass runs through it). :meth:`MSVLM.slice_tokens` returns the tokens alone, to be cached;
  ``MSVLM(slice_tokens=...)`` takes them back in place of volumes.
* the Z-former: ``z_depth`` pre-LN blocks over the slice-token sequence, then ``z_norm``.
  Input token = slice token + ``series_embed[series type]`` + ``position_embed[slice index
  within its series]``; ``num_global`` learned ``global_tokens`` are prepended (no
  position). Attention (``attention_pattern``): 'dense' (every valid token; a key-padding
  mask) or 'local' (a token sees the tokens of its own series within ``window // 2``
  slices of it, i.e. a sliding window of ``window`` (16) slices, plus every global token;
  the global tokens see every valid token), written as a boolean mask for
  :func:`~t3d_jax.models.attention.dot_product_attention`.
* the sequence of several series: series 0's slots in z order (its slices, then its
  padding), then series 1's, ... (:func:`series_layout`). Series ``s`` gets the series
  embedding of ``series[s]`` (a type id: default its index; e.g. 0 axial, 1 coronal, or a
  contrast phase) and positions 0..Z_s-1. Or one sequence already concatenated by the data
  pipeline (every series' slices, then the padding; t3d_jax/data/slices.py) with a series id
  and a position per slot and per example (``series_ids`` / ``positions`` [B, L]), so the
  examples of one batch may split their length differently between series.
* any slice count: lengths are padded on the host to a bucket of ``buckets`` (chosen once;
  :func:`pad_to_bucket`), so a jitted step compiles once per bucket, not per length; the
  ``valid`` mask keeps padding out of every result (tested).

Outputs (as ViT3D's, so the model is an image tower of ``build_image_encoder``): ``pooled``
= mean of the Z-former outputs over the valid slices; ``tokens`` = the Z-former output of
each slice slot [B, L, width] (contextualised slice tokens; padded slots included: see
``mask``); ``mask`` bool [B, L]; ``token_index`` = arange(L); ``grid`` = (1, 1, L);
``slice_tokens`` = the slice encoder's own tokens [B, L, width] (the MEM targets).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3d_jax.models import attention as attention_lib
from t3d_jax.models import layers
from t3d_jax.models.vit3d import Block, ViT3DConfig
from t3d_jax.utils import read_hf_config

# width, slice-ViT depth, heads, mlp, Z-former depth ('base': ViT-B/16 and a 12-layer Z-former)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 128, 2),
    "demo": (128, 4, 4, 256, 4),
    "small": (384, 12, 6, 1536, 6),
    "base": (768, 12, 12, 3072, 12),
}
PATTERNS = ("dense", "local")
DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class MSVLMConfig:
    """Hyperparameters of :class:`MSVLM`; ``from_size`` / ``from_config`` build it by name."""

    width: int = 64
    depth: int = 2  # slice ViT blocks
    num_heads: int = 4
    mlp_dim: int = 128
    z_depth: int = 2  # Z-former blocks (same width, heads and MLP width as the slice ViT)
    image_size: tuple[int, int] = (32, 32)  # slice (x, y) size the position table is built for
    patch_size: tuple[int, int] = (8, 8)
    in_channels: int = 1
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6  # Hugging Face ViT checkpoints: 1e-12 (from their config.json)
    slice_chunk: int = 64  # slices of each volume per step of the slice encoder
    slice_remat: bool = True  # recompute each chunk in the backward pass (memory = one chunk)
    freeze_slice_encoder: bool = False  # stop_gradient on the slice tokens (pair with optim.freeze)
    scan_layers: bool = False
    attention_pattern: str = "dense"  # dense | local
    window: int = 16  # 'local': slices of a sliding window (a token sees +-window//2)
    num_global: int = 2  # learned global tokens prepended to the Z-former sequence
    max_slices: int = 512  # per-series position table
    num_series: int = 4  # series (plane / phase) type embeddings
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    input_mean: float = 0.0
    input_std: float = 1.0
    attention: str = "auto"
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        pair = lambda v: (int(v),) * 2 if isinstance(v, (int, np.integer)) else tuple(int(a) for a in v)  # noqa
        object.__setattr__(self, "image_size", pair(self.image_size))
        object.__setattr__(self, "patch_size", pair(self.patch_size))
        object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))
        if len(self.image_size) != 2 or len(self.patch_size) != 2:
            raise ValueError(f"MS-VLM slice image_size / patch_size are 2-D, got {self.image_size}, {self.patch_size}")
        if any(s % p for s, p in zip(self.image_size, self.patch_size)):
            raise ValueError(f"slice size {self.image_size} not divisible by patch size {self.patch_size}")
        if self.attention_pattern not in PATTERNS:
            raise ValueError(f"attention_pattern must be one of {PATTERNS}, got {self.attention_pattern!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by num_heads {self.num_heads}")
        if self.slice_chunk < 1 or self.window < 1 or self.num_global < 0:
            raise ValueError(f"slice_chunk and window must be >= 1, num_global >= 0: got {self.slice_chunk}, "
                             f"{self.window}, {self.num_global}")
        if not self.buckets or self.buckets[-1] > self.max_slices * self.num_series:
            raise ValueError(f"buckets {self.buckets}: need at least one, none above max_slices * num_series")
        if not self.input_std > 0:
            raise ValueError(f"input_std must be > 0, got {self.input_std}")
        attention_lib.check_implementation(self.attention)

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])

    @classmethod
    def from_size(cls, size: str, **overrides) -> "MSVLMConfig":
        if size not in SIZES:
            raise ValueError(f"unknown MS-VLM size {size!r}; choose one of {sorted(SIZES)}")
        width, depth, heads, mlp, z_depth = SIZES[size]
        base = {"width": width, "depth": depth, "num_heads": heads, "mlp_dim": mlp, "z_depth": z_depth}
        if size == "base":
            base["patch_size"] = (16, 16)
        return cls(**{**base, **overrides})

    @classmethod
    def from_config(cls, image_cfg, *, image_size, dtype="float32", param_dtype="float32",
                    attention="auto") -> "MSVLMConfig":
        """From ``config.model.image`` (``size`` + the ``msvlm`` sub-dict of any field above);
        ``image_size``: ``config.data.view_size`` (its x, y are the slice size; z is free)."""
        c = dict(image_cfg)
        keys = {f.name for f in dataclasses.fields(cls)}
        sub = dict(c.get("msvlm", None) or {})
        unknown = sorted(set(sub) - keys)
        if unknown:
            raise ValueError(f"config.model.image.msvlm: unknown keys {unknown}; known: {sorted(keys)}")
        for k in ("attention", "dtype", "param_dtype"):
            if k in sub:
                raise ValueError(f"config.model.image.msvlm.{k}: set by the model (config.model.attention / "
                                 f"config.model.dtype), not per encoder")
        sub.setdefault("image_size", tuple(image_size)[:2])
        for k in ("in_channels", "input_mean", "input_std", "scan_layers"):
            if k in c and k not in sub:
                sub[k] = c[k]
        return cls.from_size(str(c.get("size", "tiny")), dtype=dtype, param_dtype=param_dtype, attention=attention,
                             **sub)

    def block_config(self) -> ViT3DConfig:
        """The fields ViT3D's Block reads (width, heads, MLP, qkv bias, eps, attention, dtypes)."""
        return ViT3DConfig(width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                           qkv_bias=self.qkv_bias, layer_norm_eps=self.layer_norm_eps, attention=self.attention,
                           dtype=self.dtype, param_dtype=self.param_dtype)


# ----------------------------------------------------------------------------- host helpers
def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (ValueError past the largest)."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise ValueError(f"{n} slices exceed the largest length bucket {max(buckets)}; add a bucket "
                     f"(model.image.msvlm.buckets) or resample the volume")


def pad_to_bucket(volume, buckets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Host side: ``volume`` [B, X, Y, Z, C] zero-padded along Z to its bucket; returns
    (padded, valid bool [B, Zb]). Jitted code then sees one shape per bucket."""
    volume = np.asarray(volume)
    if volume.ndim != 5:
        raise ValueError(f"MS-VLM expects [B, X, Y, Z, C] volumes, got shape {volume.shape}")
    z = volume.shape[3]
    zb = bucket_length(z, buckets)
    padded = np.pad(volume, ((0, 0), (0, 0), (0, 0), (0, zb - z), (0, 0)))
    valid = np.zeros((volume.shape[0], zb), bool)
    valid[:, :z] = True
    return padded, valid


def series_layout(lengths: Sequence[int], series: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(series type id [L], position within the series [L]) of the concatenated sequence:
    series 0's ``lengths[0]`` slots, then series 1's, ...; positions restart at 0 per series."""
    if len(lengths) != len(series):
        raise ValueError(f"{len(lengths)} series but {len(series)} series type ids")
    ids = np.concatenate([np.full(n, s, np.int32) for n, s in zip(lengths, series)])
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    return ids, pos


def zformer_mask(valid: jax.Array, series_ids, positions, *, pattern: str,
                 window: int, num_global: int) -> jax.Array:
    """Attention mask of the Z-former (True = attend) for ``num_global`` global tokens followed by
    the slice slots: 'dense' -> key padding [B, G+L]; 'local' -> [B, 1, G+L, G+L]. ``series_ids``
    and ``positions``: one layout for the batch ([L], NumPy) or one per example ([B, L])."""
    b = valid.shape[0]
    keys = jnp.concatenate([jnp.ones((b, num_global), bool), jnp.asarray(valid, bool)], axis=1)
    if pattern == "dense":
        return keys
    if np.ndim(series_ids) == 2:  # per-example layouts (the slice-sequence batches of the data pipeline)
        ids, pos = jnp.asarray(series_ids), jnp.asarray(positions)
        near = (ids[:, :, None] == ids[:, None, :]) & (jnp.abs(pos[:, :, None] - pos[:, None, :]) <= window // 2)
        near = jnp.pad(near, ((0, 0), (num_global, 0), (num_global, 0)), constant_values=True)
        return jnp.logical_and(near[:, None], keys[:, None, None, :])
    n = len(series_ids) + num_global
    near = np.zeros((n, n), bool)
    same = series_ids[:, None] == series_ids[None, :]
    near[num_global:, num_global:] = same & (np.abs(positions[:, None] - positions[None, :]) <= window // 2)
    near[:num_global, :] = True  # global tokens see everything ...
    near[:, :num_global] = True  # ... and are seen by every token
    return jnp.logical_and(jnp.asarray(near)[None, None], keys[:, None, None, :])


# ----------------------------------------------------------------------------- modules
class SliceViT(nnx.Module):
    """2D ViT of Hugging Face ``ViTModel``'s layout on slices [N, X, Y, C] -> {hidden, cls}."""

    def __init__(self, cfg: MSVLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdt = layers.as_dtype(cfg.dtype), layers.as_dtype(cfg.param_dtype)
        self.dtype = dtype
        px, py = cfg.patch_size
        self.patch_embed = layers.Dense((px, py, cfg.in_channels), (cfg.width,), (None, None, "patch"), ("embed",),
                                        kernel_init=nnx.initializers.lecun_normal(), dtype=dtype, param_dtype=pdt,
                                        rngs=rngs)
        self.cls_token = layers.param(rngs, nnx.initializers.normal(0.02), (cfg.width,), ("embed",), pdt)
        self.pos_embed = layers.param(rngs, nnx.initializers.normal(0.02), (cfg.num_patches + 1, cfg.width),
                                      (None, "embed"), pdt)
        block_cfg = cfg.block_config()
        self.blocks = layers.make_layer_stack(lambda r: Block(block_cfg, rngs=r), cfg.depth, rngs,
                                              scanned=cfg.scan_layers)
        self.norm = layers.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=pdt, rngs=rngs)

    def __call__(self, x: jax.Array) -> dict:
        cfg = self.cfg
        if x.ndim != 4 or tuple(x.shape[1:3]) != cfg.image_size or x.shape[3] != cfg.in_channels:
            raise ValueError(f"slice encoder expects slices [N, {cfg.image_size[0]}, {cfg.image_size[1]}, "
                             f"{cfg.in_channels}], got {x.shape} (model.image.msvlm.image_size)")
        n, sx, sy, c = x.shape
        px, py = cfg.patch_size
        gx, gy = sx // px, sy // py
        x = x.reshape(n, gx, px, gy, py, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, gx * gy, px, py, c)
        tokens = self.patch_embed(x.astype(self.dtype))  # row-major over (x, y): HF's (h, w) order
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (n, 1, cfg.width))
        tokens = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...].astype(self.dtype)[None]
        tokens = layers.apply_layer_stack(lambda blk, h: blk(h), self.blocks, tokens, scanned=cfg.scan_layers)
        hidden = self.norm(tokens)
        return {"hidden": hidden, "cls": hidden[:, 0]}


class MSVLM(nnx.Module):
    """Slice encoder + Z-former; see the module docstring for inputs, layout and outputs."""

    def __init__(self, cfg: MSVLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdt = layers.as_dtype(cfg.dtype), layers.as_dtype(cfg.param_dtype)
        self.dtype = dtype
        self.slice_encoder = SliceViT(cfg, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.series_embed = layers.param(rngs, init, (cfg.num_series, cfg.width), (None, "embed"), pdt)
        self.position_embed = layers.param(rngs, init, (cfg.max_slices, cfg.width), (None, "embed"), pdt)
        self.global_tokens = (layers.param(rngs, init, (cfg.num_global, cfg.width), (None, "embed"), pdt)
                              if cfg.num_global else nnx.data(None))
        self.z_blocks = layers.make_layer_stack(lambda r: Block(cfg, rngs=r), cfg.z_depth, rngs,
                                                scanned=cfg.scan_layers)
        self.z_norm = layers.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=pdt, rngs=rngs)
        # MEM prediction head (t3d_jax/losses/mem.py): Z-former output -> the slice token.
        self.mem_head = layers.Mlp(cfg.width, cfg.width, dtype=dtype, param_dtype=pdt, rngs=rngs)

    # ------------------------------------------------------------------ slice encoder
    def slice_tokens(self, volume: jax.Array) -> jax.Array:
        """[B, X, Y, Z, C] -> [B, Z, width]: every axial slice's [CLS] state. A map over
        chunks of ``slice_chunk`` slices of every volume (B x chunk slices a step, Z zero-padded
        to a multiple of the chunk); the batch axis stays leading in each step, so a batch
        sharded over devices stays sharded. Deterministic (the encoder has no dropout)."""
        cfg = self.cfg
        if volume.ndim != 5:
            raise ValueError(f"MS-VLM expects [B, X, Y, Z, C] volumes, got shape {volume.shape}")
        b, sx, sy, z, c = volume.shape
        if cfg.input_mean != 0.0 or cfg.input_std != 1.0:
            volume = (volume.astype(jnp.float32) - cfg.input_mean) * (1.0 / cfg.input_std)
        chunk = min(cfg.slice_chunk, z)
        steps = -(-z // chunk)
        volume = jnp.pad(volume, ((0, 0), (0, 0), (0, 0), (0, steps * chunk - z), (0, 0)))
        # [steps, B, chunk, X, Y, C]
        slices = jnp.transpose(volume.reshape(b, sx, sy, steps, chunk, c), (3, 0, 4, 1, 2, 5))

        def run(encoder, step_slices):  # [B, chunk, X, Y, C] -> [B, chunk, width]
            flat = step_slices.reshape(b * chunk, sx, sy, c)
            return encoder(flat)["cls"].reshape(b, chunk, cfg.width)

        if cfg.slice_remat:
            run = nnx.remat(run)
        # nnx.scan without a carry = lax.map over the steps, the encoder broadcast (NNX's own
        # transform, so a scanned (scan_layers) encoder nests inside it).
        out = nnx.scan(run, in_axes=(None, 0), out_axes=0)(self.slice_encoder, slices)  # [steps, B, chunk, width]
        out = jnp.transpose(out, (1, 0, 2, 3)).reshape(b, steps * chunk, cfg.width)[:, :z]
        return jax.lax.stop_gradient(out) if cfg.freeze_slice_encoder else out

    # ------------------------------------------------------------------ Z-former
    def _layout(self, lengths: Sequence[int], series: Sequence[int] | None):
        cfg = self.cfg
        series = tuple(range(len(lengths))) if series is None else tuple(int(s) for s in series)
        if any(not 0 <= s < cfg.num_series for s in series):
            raise ValueError(f"series type ids {series} outside [0, num_series={cfg.num_series})")
        if max(lengths) > cfg.max_slices:
            raise ValueError(f"a series of {max(lengths)} slices exceeds max_slices={cfg.max_slices}")
        return series_layout(lengths, series)

    def zformer(self, tokens: jax.Array, valid: jax.Array, series_ids: np.ndarray,
                positions: np.ndarray) -> jax.Array:
        """Z-former outputs [B, L, width] at the slice slots, for slice tokens [B, L, width];
        ``series_ids`` / ``positions``: [L] (one layout) or [B, L] (one per example)."""
        cfg = self.cfg
        b = tokens.shape[0]
        extra = (self.series_embed[...][jnp.asarray(series_ids)] + self.position_embed[...][jnp.asarray(positions)])
        x = tokens.astype(self.dtype) + (extra if extra.ndim == 3 else extra[None]).astype(self.dtype)
        if cfg.num_global:
            g = jnp.broadcast_to(self.global_tokens[...].astype(self.dtype), (b, cfg.num_global, cfg.width))
            x = jnp.concatenate([g, x], axis=1)
        mask = zformer_mask(valid, series_ids, positions, pattern=cfg.attention_pattern, window=cfg.window,
                            num_global=cfg.num_global)
        x = layers.apply_layer_stack(lambda blk, h: blk(h, mask), self.z_blocks, x, scanned=cfg.scan_layers)
        return self.z_norm(x)[:, cfg.num_global:]

    def mem_predict(self, filled: jax.Array, valid: jax.Array, series_ids, positions) -> jax.Array:
        """MEM predictions [B, L, width] from zero-filled slice tokens (losses/mem.py)."""
        return self.mem_head(self.zformer(filled, valid, series_ids, positions))

    # ------------------------------------------------------------------ the tower
    def gather(self, volume=None, *, valid=None, slice_tokens=None, series=None, series_ids=None, positions=None):
        """(slice tokens [B, L, width], valid [B, L], series ids [L], positions [L]) of one volume
        or a list of series (volumes, or cached ``slice_tokens``), concatenated in order.

        With ``series_ids`` and ``positions`` ([B, L] int, one layout per example: the
        slice-sequence batches of t3d_jax/data/slices.py) the one volume / token array is an
        already concatenated sequence and they are returned as given (``series`` unused)."""
        if (volume is None) == (slice_tokens is None):
            raise ValueError("MS-VLM: give volume(s) or slice_tokens, not both / neither")
        if (series_ids is None) != (positions is None):
            raise ValueError("MS-VLM: give series_ids and positions together")
        if series_ids is not None:
            parts = slice_tokens if volume is None else volume
            if isinstance(parts, (list, tuple)) or series is not None:
                raise ValueError("MS-VLM: per-example series_ids take one concatenated sequence, not a list / series")
            toks = self.slice_tokens(parts) if volume is not None else jnp.asarray(parts)
            if np.shape(series_ids) != toks.shape[:2] or np.shape(positions) != toks.shape[:2]:
                raise ValueError(f"series_ids {np.shape(series_ids)} / positions {np.shape(positions)} must be the "
                                 f"sequence's [B, L] = {toks.shape[:2]}")
            v = jnp.ones(toks.shape[:2], bool) if valid is None else jnp.asarray(valid, bool)
            return toks, v, jnp.asarray(series_ids, jnp.int32), jnp.asarray(positions, jnp.int32)
        parts = slice_tokens if volume is None else volume
        multi = isinstance(parts, (list, tuple))
        parts = list(parts) if multi else [parts]
        valids = list(valid) if isinstance(valid, (list, tuple)) else [valid] * len(parts)
        if len(valids) != len(parts):
            raise ValueError(f"{len(parts)} series but {len(valids)} valid masks")
        toks = [self.slice_tokens(p) if volume is not None else jnp.asarray(p) for p in parts]
        lengths = [t.shape[1] for t in toks]
        valids = [jnp.ones(t.shape[:2], bool) if v is None else jnp.asarray(v, bool) for t, v in zip(toks, valids)]
        for t, v in zip(toks, valids):
            if v.shape != t.shape[:2]:
                raise ValueError(f"valid mask {v.shape} does not match the series' [B, Z] = {t.shape[:2]}")
        ids, pos = self._layout(lengths, series)
        return jnp.concatenate(toks, axis=1), jnp.concatenate(valids, axis=1), ids, pos

    def __call__(self, volume=None, *, valid=None, slice_tokens=None, series=None, series_ids=None, positions=None,
                 deterministic: bool = True, rngs=None) -> dict:
        """Image-tower outputs (module docstring) for ``volume`` [B, X, Y, Z, C] or a list of
        series; ``valid`` bool [B, Z] per series (None: all valid); ``series``: type ids; or one
        concatenated sequence with per-slot ``series_ids`` / ``positions`` [B, L] (``gather``)."""
        del deterministic, rngs  # no dropout in this encoder
        tokens, valid, ids, pos = self.gather(volume, valid=valid, slice_tokens=slice_tokens, series=series,
                                              series_ids=series_ids, positions=positions)
        out = self.zformer(tokens, valid, ids, pos)
        w = valid.astype(jnp.float32)[..., None]
        pooled = (jnp.sum(out.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0))
        b, length = valid.shape
        return {"pooled": pooled.astype(out.dtype), "tokens": out, "mask": valid, "slice_tokens": tokens,
                "token_index": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length)),
                "grid": (1, 1, length)}


# ----------------------------------------------------------------------------- HF ViT import
_QKV = {"q": "query", "k": "key", "v": "value"}
_V5_NAMES = [  # transformers >= 5 in-memory names -> the checkpoint names save_pretrained writes
    (r"^layers\.(\d+)\.attention\.([qkv])_proj\.",
     lambda m: f"encoder.layer.{m[1]}.attention.attention.{_QKV[m[2]]}."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", lambda m: f"encoder.layer.{m[1]}.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", lambda m: f"encoder.layer.{m[1]}.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", lambda m: f"encoder.layer.{m[1]}.output.dense."),
    (r"^layers\.(\d+)\.", lambda m: f"encoder.layer.{m[1]}."),
]


def hf_vit_config(config_json, **overrides) -> MSVLMConfig:
    """The slice-encoder fields of a Hugging Face ViT ``config.json`` (file or folder)."""
    path, c = read_hf_config(config_json, "vit", "ViT")
    if c.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: hidden_act {c.get('hidden_act')!r} not supported (only exact 'gelu')")
    kw = dict(width=c["hidden_size"], depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
              mlp_dim=c["intermediate_size"], image_size=c.get("image_size", 224), patch_size=c.get("patch_size", 16),
              in_channels=c.get("num_channels", 3), qkv_bias=c.get("qkv_bias", True),
              layer_norm_eps=c.get("layer_norm_eps", 1e-12))
    return MSVLMConfig(**{**kw, **overrides})


def hf_vit_state_from_dict(sd, cfg: MSVLMConfig, where: str = "state dict") -> dict[tuple, np.ndarray]:
    """Hugging Face ``ViTModel`` names -> :class:`SliceViT` paths (a 'vit.' prefix, as in
    ``ViTForImageClassification``, is dropped; the pooler and classifier are not imported)."""
    sd = {k[4:] if k.startswith("vit.") else k: np.asarray(v) for k, v in sd.items()}
    for pattern, repl in _V5_NAMES:
        sd = {re.sub(pattern, repl, k): v for k, v in sd.items()}
    h, heads = cfg.width, cfg.num_heads
    dh = h // heads
    used: set[str] = set()

    def get(name):
        if name not in sd:
            raise KeyError(f"{where}: missing weight {name!r} (not a Hugging Face ViTModel?)")
        used.add(name)
        return sd[name]

    st = {("cls_token",): get("embeddings.cls_token").reshape(h),
          ("pos_embed",): get("embeddings.position_embeddings").reshape(-1, h),
          # Conv2d [D, C, px, py] -> our [px, py, C, D]
          ("patch_embed", "kernel"): get("embeddings.patch_embeddings.projection.weight").transpose(2, 3, 1, 0),
          ("patch_embed", "bias"): get("embeddings.patch_embeddings.projection.bias"),
          ("norm", "scale"): get("layernorm.weight"), ("norm", "bias"): get("layernorm.bias")}
    for i in range(cfg.depth):
        src, dst = f"encoder.layer.{i}.", ("blocks", i)
        for name in ("query", "key", "value"):
            st[dst + ("attn", name, "kernel")] = get(f"{src}attention.attention.{name}.weight").T.reshape(h, heads, dh)
            if cfg.qkv_bias:
                st[dst + ("attn", name, "bias")] = get(f"{src}attention.attention.{name}.bias").reshape(heads, dh)
        st[dst + ("attn", "out", "kernel")] = get(f"{src}attention.output.dense.weight").T.reshape(heads, dh, h)
        st[dst + ("attn", "out", "bias")] = get(f"{src}attention.output.dense.bias")
        st[dst + ("norm1", "scale")] = get(f"{src}layernorm_before.weight")
        st[dst + ("norm1", "bias")] = get(f"{src}layernorm_before.bias")
        st[dst + ("norm2", "scale")] = get(f"{src}layernorm_after.weight")
        st[dst + ("norm2", "bias")] = get(f"{src}layernorm_after.bias")
        st[dst + ("mlp", "fc1", "kernel")] = get(f"{src}intermediate.dense.weight").T
        st[dst + ("mlp", "fc1", "bias")] = get(f"{src}intermediate.dense.bias")
        st[dst + ("mlp", "fc2", "kernel")] = get(f"{src}output.dense.weight").T
        st[dst + ("mlp", "fc2", "bias")] = get(f"{src}output.dense.bias")
    skipped = re.compile(r"(pooler|classifier)\.|embeddings\.mask_token")
    leftover = sorted(k for k in sd if k not in used and not skipped.match(k))
    if leftover:
        raise ValueError(f"{where}: ViT weights not understood (more layers than config.json, or another "
                         f"architecture): {leftover[:10]}")
    return {k: np.ascontiguousarray(v) for k, v in st.items()}


def hf_vit_state(path, **overrides) -> tuple[MSVLMConfig, dict[tuple, np.ndarray]]:
    """A local Hugging Face ViT folder (config.json + model.safetensors | pytorch_model.bin) ->
    (MSVLMConfig with its slice-encoder fields, flat state for :class:`SliceViT`)."""
    from t3d_jax.models import convert

    d = pathlib.Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a directory (expected a Hugging Face ViT folder)")
    cfg = hf_vit_config(d, **overrides)
    weights = convert._find_hf_weights(d)
    return cfg, hf_vit_state_from_dict(convert.read_torch_weights(weights), cfg, str(weights))


def load_hf_vit(path, *, into: SliceViT | None = None, **overrides) -> SliceViT:
    """The folder's ViT as a :class:`SliceViT` (built abstractly and filled), or its weights
    written into ``into`` (e.g. ``model.image_encoder.slice_encoder``; sizes must agree)."""
    from t3d_jax.models import convert

    cfg, state = hf_vit_state(path, **overrides)
    if into is None:
        into = nnx.eval_shape(lambda: SliceViT(cfg, rngs=nnx.Rngs(0)))
    return convert.assign(into, state)
