"""MG-3D's model: the two encoders, cross-modal gating, the reconstruction and MLM heads, and the
projection heads of its contrastive and similarity terms (the `mg3d` task, docs/method.md).

Built from ``config.model`` (``model.mg3d`` holds MG-3D's own keys) and ``config.data.view_size``:

* ``image_encoder``: the encoder named by ``model.image.name`` (`two_tower.build_image_encoder`:
  'vit3d' now; 'swin3d' plugs in by name). Its tokens are mapped to the fusion width H by
  ``image_proj`` and get the image modality-type embedding.
* ``text_encoder``: the project's BERT (frozen by ``optim.freeze`` in MG-3D), then the trainable
  ``text_proj`` (d_t -> H; 768 -> 768 at base) and the text modality-type embedding.
* ``image_gate`` / ``text_gate``: two stacked `CrossGate` layers each. Image tokens are gated by
  the report's sentence features, report tokens by the image tokens. Both gates always read the
  *uni-modal* features of the other side (not the other gate's output).
* ``mim_head``: `UpsampleHead`, token grid -> voxels.  ``mlm_head``: BERT-style transform +
  vocabulary logits (the task runs it at the masked positions only).  ``sen_pred_proj`` / ``sen_input_proj``: the 8-d sentence projections of
  L_senMLM.  ``sentence_agg``: `SentenceAggregation` (DCL); ``ssm_proj``: its 128-d
  sentence-wise visual features (L_SSM).  ``cml_fused`` / ``cml_uni`` / ``dcl_image`` /
  ``dcl_agg``: `ProjectionHead` (LayerNorm -> bias-free linear -> L2).
* ``itc_image`` / ``itc_text``: the embeddings the evaluators read (``embed_volume`` /
  ``embed_text``); trained only by the optional ``model.mg3d.weights.itc`` term (not MG-3D's).

Masked image modelling with a ViT drops the masked tokens before the encoder (MAE-style) and
puts a learned ``mask_token`` (+ the position table) at their grid cells afterwards; an encoder
that keeps its grid (the Swin, `t3d_jax.models.swin3d`) masks SimMIM-style: the patch embeddings under masked tokens are replaced by
``mask_token`` and the whole grid goes through the stages (MG-3D's Swin masking).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3d_jax.models import layers
from t3d_jax.models.tma_head import l2_normalize
from t3d_jax.models.two_tower import TEXT_POOLS, build_image_encoder, build_text_encoder, pool_text
from t3d_jax.models.swin3d import Swin3D, encoder_output
from t3d_jax.models.vit3d import ViT3D, ViT3DConfig
from t3d_jax.utils import cfg_get

TAU = 0.1  # MG-3D's fixed temperature: logits = cos / 0.1


# ------------------------------------------------------------------------------------ pieces
def sentence_pool(states: jax.Array, sentence_index: jax.Array, num_sentences: int):
    """Mean of the token states of each sentence: ``states`` [B, L, D], ``sentence_index``
    [B, L] int (-1 = no sentence) -> (features [B, S, D] float32, valid [B, S] bool); a sentence
    without tokens has zero features and valid False."""
    onehot = (sentence_index[..., None] == jnp.arange(num_sentences)).astype(jnp.float32)  # [B, L, S]
    counts = jnp.sum(onehot, axis=1)  # [B, S]
    sums = jnp.einsum("bls,bld->bsd", onehot, states.astype(jnp.float32))
    return sums / jnp.maximum(counts, 1.0)[..., None], counts > 0


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """InstanceNorm3d without affine (MONAI's default), channel-last [B, X, Y, Z, C], float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class CrossGate(nnx.Module):
    """One MG-3D gating layer: ``A'_i = v_A,i * mean_j sigmoid(q_A,i . k_B,j / sqrt(D))`` over
    the valid ``j`` of ``key_mask``. Single head, own Q/K/V maps, no residual, norm or FFN."""

    def __init__(self, a_dim: int, b_dim: int, dim: int, *, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        self.query = layers.Dense((a_dim,), (dim,), ("embed",), ("mlp",), **kw)
        self.key = layers.Dense((b_dim,), (dim,), ("embed",), ("mlp",), **kw)
        self.value = layers.Dense((a_dim,), (a_dim,), ("embed",), ("mlp",), **kw)
        self.dim = dim

    def __call__(self, a: jax.Array, b: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        q, k, v = self.query(a), self.key(b), self.value(a)
        scores = jnp.einsum("...id,...jd->...ij", q.astype(jnp.float32), k.astype(jnp.float32))
        gates = jax.nn.sigmoid(scores / math.sqrt(self.dim))
        if key_mask is None:
            gate = jnp.mean(gates, axis=-1)
        else:
            m = jnp.asarray(key_mask, jnp.float32)[..., None, :]
            gate = jnp.sum(gates * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
        return (v.astype(jnp.float32) * gate[..., None]).astype(v.dtype)


class GateStack(nnx.Module):
    """``depth`` CrossGates applied in turn to A, each against the same B."""

    def __init__(self, a_dim, b_dim, dim, depth, *, dtype, rngs):
        self.layers = nnx.List([CrossGate(a_dim, b_dim, dim, dtype=dtype, rngs=rngs) for _ in range(depth)])

    def __call__(self, a, b, key_mask=None):
        for layer in self.layers:
            a = layer(a, b, key_mask)
        return a


class SentenceAggregation(nnx.Module):
    """DCL's sentence aggregation: the global image vector ``g`` [B, H] is gated against every
    sentence feature (``x_s <- v(x_s) * sigmoid(q(x_s) . k(f_s) / sqrt(H))``, x_s starting at g,
    ``depth`` layers); returns the sentence-wise visual features [B, S, H] and their aggregate
    ``tanh(mean over valid sentences)`` [B, H]."""

    def __init__(self, dim: int, depth: int, *, dtype, rngs):
        self.gates = GateStack(dim, dim, dim, depth, dtype=dtype, rngs=rngs)

    def __call__(self, g: jax.Array, sentences: jax.Array, valid: jax.Array):
        b, s, _ = sentences.shape
        x = jnp.broadcast_to(g[:, None, None, :], (b, s, 1, g.shape[-1]))  # one query per sentence
        x = self.gates(x, sentences[:, :, None, :])[:, :, 0]  # [B, S, H]
        w = jnp.asarray(valid, jnp.float32)[..., None]
        agg = jnp.tanh(jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0))
        return x, agg


class ProjectionHead(nnx.Module):
    """LayerNorm -> bias-free linear -> L2 (float32)."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype, rngs):
        self.norm = layers.LayerNorm(in_dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.proj = layers.Dense((in_dim,), (out_dim,), ("embed",), ("joint",), use_bias=False, dtype=dtype,
                                 rngs=rngs)

    def __call__(self, x):
        return l2_normalize(self.proj(self.norm(x)))


def upsample_plan(patch_size) -> list[tuple[int, int, int]]:
    """Per-block upsampling factors of the reconstruction head: the token grid is the view /
    patch size, so it takes log2(patch) x2 steps per axis; the number of blocks is the largest
    (5 for MG-3D's stride-32 Swin tokens, 3 for the tiny/demo ViT's 8^3 patches, 4 for 16x16x8
    patches, whose third axis stops doubling after 3 blocks)."""
    steps = []
    for p in layers.triple(patch_size):
        n = int(round(math.log2(p)))
        if 2 ** n != p:
            raise ValueError(f"model.mg3d: the reconstruction head upsamples by 2, so the patch size must be a "
                             f"power of 2 per axis; got {tuple(patch_size)}")
        steps.append(n)
    return [tuple(2 if i < n else 1 for n in steps) for i in range(max(steps))]


def upsample2(x: jax.Array, axis: int) -> jax.Array:
    """x2 linear upsampling along ``axis`` with half-pixel centres and clamped edges, the
    values of ``jax.image.resize(..., 'linear')`` (PyTorch's ``align_corners=False``) by a
    two-tap stencil: out[2i] = 3/4 x[i] + 1/4 x[i-1], out[2i+1] = 3/4 x[i] + 1/4 x[i+1]
    (x[-1] = x[0], x[n] = x[n-1]). jax.image.resize contracts each axis with a dense n x 2n
    weight matrix, n multiply-adds per output instead of 2 (with the 1^3 conv moved before
    the last upsampling, `UpsampleHead`, the demo decoder's step fell from 8.4 to 6.5 GFLOP)."""
    n = x.shape[axis]
    first, last = jax.lax.slice_in_dim(x, 0, 1, axis=axis), jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
    prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
    out = jnp.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], axis=axis + 1)
    return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


def upsample(x: jax.Array, factors) -> jax.Array:
    """Trilinear upsampling of [B, X, Y, Z, C] by ``factors`` (each 1 or 2) per spatial axis."""
    for axis, f in enumerate(factors):
        if f not in (1, 2):
            raise ValueError(f"upsample: factors must be 1 or 2 per axis, got {tuple(factors)}")
        if f == 2:
            x = upsample2(x, axis + 1)
    return x


class UpsampleHead(nnx.Module):
    """The MIM decoder: blocks of (3^3 conv + InstanceNorm + LeakyReLU + trilinear upsampling by
    the plan's factors), then a 1^3 conv to the input channels. Channels halve per block from
    ``in_dim`` (at least ``min_channels``).

    The 1^3 conv runs *before* the last block's upsampling: a per-voxel affine map commutes
    with linear interpolation (its weights sum to 1), so the output is the same, but the
    full-resolution upsampling moves ``out_channels`` (1) channels instead of the last block's
    (16 or more)."""

    def __init__(self, in_dim: int, out_channels: int, plan, *, min_channels: int = 16, dtype, rngs):
        from t3d_jax.models.resnet3d import Conv3D

        self.plan = tuple(tuple(f) for f in plan)  # static (hashable graphdef)
        chans = [in_dim] + [max(in_dim // 2 ** (i + 1), min_channels) for i in range(len(self.plan))]
        self.convs = nnx.List([Conv3D(chans[i], chans[i + 1], 3, padding=1, use_bias=True, dtype=dtype, rngs=rngs)
                               for i in range(len(self.plan))])
        self.out = Conv3D(chans[-1], out_channels, 1, use_bias=True, dtype=dtype, rngs=rngs)
        # Conv3D draws He fan-out weights; the last layer gets a fan-in scale (std sqrt(1/C)), so
        # the first reconstructions have unit variance, not C times it (the blocks renormalise).
        self.out.kernel[...] = self.out.kernel[...] * math.sqrt(out_channels / (2.0 * chans[-1]))

    def __call__(self, grid_tokens: jax.Array) -> jax.Array:
        x = grid_tokens
        for i, (conv, factor) in enumerate(zip(self.convs, self.plan)):
            x = jax.nn.leaky_relu(instance_norm(conv(x)), 0.01).astype(x.dtype)
            if i == len(self.convs) - 1:
                x = self.out(x)
            x = upsample(x, factor)
        if not self.convs:  # a stride-1 token grid: no blocks
            x = self.out(x)
        return x.astype(jnp.float32)


class MLMHead(nnx.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then vocabulary logits (float32)."""

    def __init__(self, dim: int, vocab_size: int, *, dtype, rngs):
        self.transform = layers.Dense((dim,), (dim,), ("embed",), ("mlp",), dtype=dtype, rngs=rngs)
        self.norm = layers.LayerNorm(dim, epsilon=1e-12, dtype=dtype, rngs=rngs)
        self.decoder = layers.Dense((dim,), (vocab_size,), ("embed",), ("vocab",), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.decoder(self.norm(jax.nn.gelu(self.transform(x), approximate=False))).astype(jnp.float32)


# ------------------------------------------------------------------------------------ model
class MG3D(nnx.Module):
    """See the module docstring. ``model_config`` = ``config.model``."""

    def __init__(self, model_config, *, rngs: nnx.Rngs, view_size=None):
        dtype = layers.as_dtype(cfg_get(model_config, "dtype", "float32"))
        mg = cfg_get(model_config, "mg3d", {}) or {}
        image_cfg = model_config.image
        self.dtype = dtype
        self.view_size = tuple(view_size or cfg_get(image_cfg, "image_size", None) or ViT3DConfig.image_size)
        attention = str(cfg_get(model_config, "attention", "auto"))
        self.image_encoder = build_image_encoder(image_cfg, image_size=self.view_size, dtype=dtype, rngs=rngs,
                                                 attention=attention)
        self.text_encoder = build_text_encoder(model_config.text, dtype=dtype, rngs=rngs, attention=attention)
        self.text_pool = str(cfg_get(model_config.text, "pool", "mean"))
        if self.text_pool not in TEXT_POOLS:
            raise ValueError(f"config.model.text.pool: unknown pooling {self.text_pool!r}; choose one of {TEXT_POOLS}")
        width = self.image_encoder.cfg.width
        text_width = self.text_encoder.cfg.hidden_size
        hidden = int(cfg_get(mg, "hidden", 0) or text_width)
        depth = int(cfg_get(mg, "gate_layers", 2))
        embed_dim = int(model_config.embed_dim)
        self.hidden = hidden
        self.num_sentences = int(cfg_get(mg, "max_sentences", 32))
        self.patch_size, mask_dim = token_stride(self.image_encoder)
        for size, stride in zip(self.view_size, self.patch_size):
            if size % stride:
                raise ValueError(f"model.mg3d: view size {self.view_size} is not a multiple of the image tokens' "
                                 f"stride {self.patch_size} (the MIM head decodes the token grid to the view)")
        kw = dict(dtype=dtype, rngs=rngs)
        self.image_proj = layers.Dense((width,), (hidden,), ("embed",), ("mlp",), **kw)
        self.text_proj = layers.Dense((text_width,), (hidden,), ("embed",), ("mlp",), **kw)
        self.type_embed = layers.param(rngs, nnx.initializers.normal(0.02), (2, hidden), (None, "embed"), jnp.float32)
        self.mask_token = layers.param(rngs, nnx.initializers.normal(0.02), (mask_dim,), ("embed",), jnp.float32)
        self.image_gate = GateStack(hidden, hidden, hidden, depth, **kw)
        self.text_gate = GateStack(hidden, hidden, hidden, depth, **kw)
        in_channels = int(cfg_get(image_cfg, "in_channels", 1))
        self.mim_head = UpsampleHead(hidden, in_channels, upsample_plan(self.patch_size),
                                     min_channels=int(cfg_get(mg, "decoder_min_channels", 16)), **kw)
        self.mlm_head = MLMHead(hidden, self.text_encoder.cfg.vocab_size, **kw)
        sen_dim = int(cfg_get(mg, "sentence_dim", 8))
        self.sen_pred_proj = layers.Dense((hidden,), (sen_dim,), ("embed",), (None,), **kw)
        self.sen_input_proj = layers.Dense((text_width,), (sen_dim,), ("embed",), (None,), **kw)
        self.sentence_agg = SentenceAggregation(hidden, depth, **kw)
        self.ssm_proj = layers.Dense((hidden,), (int(cfg_get(mg, "ssm_dim", 128)),), ("embed",), (None,), **kw)
        self.cml_fused = ProjectionHead(2 * hidden, embed_dim, **kw)
        self.cml_uni = ProjectionHead(2 * hidden, embed_dim, **kw)
        self.dcl_image = ProjectionHead(hidden, embed_dim, **kw)
        self.dcl_agg = ProjectionHead(hidden, embed_dim, **kw)
        self.itc_image = ProjectionHead(hidden, embed_dim, **kw)
        self.itc_text = ProjectionHead(hidden, embed_dim, **kw)
        # Fixed temperature 0.1: the evaluators read `logit_scale` (a log scale) as a number.
        self.logit_scale = math.log(1.0 / TAU)
        self.logit_scale_max = None
        self.mask_rngs = rngs["dropout"].fork()  # the MIM and MLM masks (model state: exact resume)

    # ------------------------------------------------------------------ the two towers
    def volume_tokens(self, volume: jax.Array, *, deterministic: bool = True) -> dict:
        """Image-encoder output for ``volume`` [B,X,Y,Z,C]: pooled, tokens, token_index, grid."""
        return self.image_encoder(volume, deterministic=deterministic)

    def image_states(self, tokens: jax.Array) -> jax.Array:
        """Encoder tokens [B, N, width] -> fusion-width image states [B, N, H] (+ image type)."""
        return self.image_proj(tokens) + self.type_embed[1].astype(self.dtype)

    def text_states(self, input_ids, attention_mask, *, deterministic: bool = True):
        """(BERT's last hidden states [B, L, d_t], fusion-width text states [B, L, H] (+ text type))."""
        hidden = self.text_encoder(input_ids, attention_mask, deterministic=deterministic)["hidden"]
        return hidden, self.text_proj(hidden) + self.type_embed[0].astype(self.dtype)

    def input_embeddings(self, input_ids) -> jax.Array:
        """The (frozen) BERT word embeddings of ``input_ids``, gradient stopped: [B, L, d_t]."""
        table = jax.lax.stop_gradient(self.text_encoder.embeddings.word.embedding[...])
        return jnp.take(table, input_ids, axis=0).astype(jnp.float32)

    def text_vector(self, states, attention_mask) -> jax.Array:
        return pool_text(states, attention_mask, self.text_pool).astype(jnp.float32)

    def encode_masked(self, volume: jax.Array, keep_index: jax.Array, *, deterministic: bool = True):
        """Encoder tokens [B, N, width] on the full grid where only the tokens ``keep_index``
        [B, K] (sorted grid indices, K the same for every example) were seen by the encoder; the
        others hold ``mask_token`` + their position embedding (see the module docstring)."""
        enc = self.image_encoder
        if isinstance(enc, Swin3D):  # SimMIM-style: masked patch embeddings replaced, grid kept
            return swin_encode_masked(enc, volume, keep_index, self.mask_token[...], self.patch_size)
        if not isinstance(enc, ViT3D):
            raise ValueError(f"model.image.name: {type(enc).__name__} has no masked encoding; masked image "
                             "modelling needs a ViT3D ('vit3d') or a Swin3D ('swin3d')")
        return vit_encode_masked(enc, volume, keep_index, self.mask_token[...])

    # ------------------------------------------------------------------ evaluator interface
    def embed_volume(self, volume: jax.Array) -> jax.Array:
        """L2-normalised float32 [B, D] volume embeddings (deterministic)."""
        states = self.image_states(self.volume_tokens(volume)["tokens"])
        return self.itc_image(jnp.mean(states.astype(jnp.float32), axis=1))

    def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """L2-normalised float32 [B, D] report embeddings (deterministic)."""
        _, states = self.text_states(input_ids, attention_mask)
        return self.itc_text(self.text_vector(states, attention_mask))


def vit_encode_masked(enc: ViT3D, volume: jax.Array, keep_index: jax.Array, mask_token: jax.Array) -> jax.Array:
    """A ViT3D's tokens [B, N, width] when only the tokens ``keep_index`` [B, K] are encoded
    (token dropping, as the encoder's patch dropout); the other cells get ``mask_token`` + their
    position embedding."""
    cfg = enc.cfg
    tokens, grid = enc.patchify(enc.standardise(volume).astype(enc.dtype))
    b, n, w = tokens.shape
    table = enc.position_table(grid)
    kept = jnp.take_along_axis(tokens + table[None], keep_index[..., None], axis=1)
    if cfg.pool == "cls":
        kept = jnp.concatenate([jnp.broadcast_to(enc.cls_token[...].astype(enc.dtype), (b, 1, w)), kept], axis=1)
    forward = layers.maybe_remat(lambda block, x: block(x), cfg.remat)
    kept = enc.norm(layers.apply_layer_stack(forward, enc.blocks, kept, scanned=cfg.scan_layers))
    if cfg.pool == "cls":
        kept = kept[:, 1:]
    full = jnp.broadcast_to((mask_token.astype(kept.dtype) + table.astype(kept.dtype))[None], (b, n, w))
    return full.at[jnp.arange(b)[:, None], keep_index].set(kept)


def swin_masked_patches(enc: Swin3D, volume: jax.Array, keep_index: jax.Array, mask_token: jax.Array,
                        stride) -> jax.Array:
    """A Swin3D's patch embeddings [B, gx, gy, gz, embed_dim] of ``volume`` with every cell under
    an image token (``stride`` voxels per axis) not in ``keep_index`` [B, K] replaced by
    ``mask_token`` (SimMIM): what the stages see, so no masked voxel reaches the encoder."""
    x0 = enc.embed_patches(volume)
    b, gx, gy, gz, _ = x0.shape
    grid = tuple(s // t for s, t in zip(volume.shape[1:4], stride))
    kept = jnp.zeros((b, int(np.prod(grid))), bool).at[jnp.arange(b)[:, None], keep_index].set(True)
    kept = kept.reshape(b, *grid)
    for axis, f in enumerate(stride):  # token cells -> patch-embedding cells
        kept = jnp.repeat(kept, f // enc.cfg.patch_size[axis], axis=axis + 1)
    return jnp.where(kept[:, :gx, :gy, :gz, None], x0, mask_token.astype(x0.dtype))


def swin_encode_masked(enc: Swin3D, volume: jax.Array, keep_index: jax.Array, mask_token: jax.Array,
                       stride) -> jax.Array:
    """A Swin3D's last-map tokens [B, N, width] when the patch embeddings under the tokens not in
    ``keep_index`` are replaced by ``mask_token`` (SimMIM; the grid is kept, windows unchanged)."""
    x0 = swin_masked_patches(enc, volume, keep_index, mask_token, stride)
    return encoder_output(enc.stages(x0)[-1])["tokens"]


def token_stride(encoder) -> tuple[tuple[int, int, int], int]:
    """(voxels per image token per axis, width of the MIM mask token) of an image encoder: a
    ViT's patch size and width; a Swin's 16 x patch size (its last map) and patch-embedding width."""
    if isinstance(encoder, Swin3D):
        return tuple(16 * p for p in encoder.cfg.patch_size), encoder.cfg.embed_dim
    if isinstance(encoder, ViT3D):
        return tuple(encoder.cfg.patch_size), encoder.cfg.width
    raise ValueError(f"model.image.name: task 'mg3d' masks image tokens of a ViT3D ('vit3d') or a Swin3D "
                     f"('swin3d'), not of {type(encoder).__name__}")
