"""TMA head: text injection into patch tokens, projection, and the learnable prototypes.

The project's reading of T3D's Text-informed Multi-view Alignment (docs/method.md, "TMA", steps 1-2):

    H_hat = LN(H + CrossAttn(Q=H, K=S, V=S))       H: patch tokens [N, d], S: report states [L, d_t]
    u_n   = normalize(MLP(H_hat_n))  in R^D        (Linear d->hidden, GELU, Linear hidden->D)
    C     = normalize(prototypes)    [K, D]        (normalised in the forward pass, as SwAV)

Called without report states, the head skips the injection (H_hat = LN(H)): the text-free
token embeddings the t3d task computes its Sinkhorn targets from (docs/method.md, TMA step 3).
Padding tokens of the report are masked out of the attention (``text_mask``). The head keeps
its own residual + LayerNorm (post-LN, like BERT's cross-attention layers) so the ViT's token
states are not altered for the CLIP branch. Weights are float32; compute runs in ``dtype``;
the outputs ``u`` and ``C`` are float32 because the Sinkhorn targets exponentiate s / 0.05.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.models import layers


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """x / max(||x||, eps) in float32 (an all-zero row stays zero instead of NaN)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


class TMAHead(nnx.Module):
    """``__call__(patch_tokens [B,N,d], text_states [B,L,d_t] | None, text_mask [B,L]) -> u [B,N,D]``."""

    def __init__(self, image_width: int, text_width: int, embed_dim: int, num_prototypes: int, *,
                 num_heads: int, mlp_dim: int | None = None, layer_norm_eps: float = 1e-6,
                 attention: str = "auto", dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        if num_prototypes < 1:
            raise ValueError(f"model.tma.num_prototypes must be >= 1, got {num_prototypes}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        mlp_dim = mlp_dim or 2 * image_width
        self.cross_attn = layers.MultiHeadAttention(image_width, num_heads, kv_features=text_width,
                                                    attention=attention, **kw)
        self.norm = layers.LayerNorm(image_width, epsilon=layer_norm_eps, **kw)
        self.fc1 = layers.Dense((image_width,), (mlp_dim,), ("embed",), ("mlp",), **kw)
        self.fc2 = layers.Dense((mlp_dim,), (embed_dim,), ("mlp",), ("joint",), **kw)
        self.prototypes = layers.param(rngs, nnx.initializers.normal(1.0), (num_prototypes, embed_dim),
                                       ("prototypes", "joint"), layers.as_dtype(param_dtype))

    def normalized_prototypes(self) -> jax.Array:
        """C = prototypes / ||prototypes|| (float32 [K, D])."""
        return l2_normalize(self.prototypes[...])

    def __call__(self, patch_tokens: jax.Array, text_states: jax.Array | None = None,
                 text_mask: jax.Array | None = None) -> jax.Array:
        if text_states is None:  # text-free: the same projection of the image's own tokens
            return l2_normalize(self.fc2(jax.nn.gelu(self.fc1(self.norm(patch_tokens)), approximate=False)))
        if patch_tokens.ndim != 3 or text_states.ndim != 3 or patch_tokens.shape[0] != text_states.shape[0]:
            raise ValueError(f"TMAHead expects patch tokens [B,N,d] and text states [B,L,d_t], got "
                             f"{patch_tokens.shape} and {text_states.shape}")
        mask = None if text_mask is None else jnp.asarray(text_mask) > 0
        injected = self.norm(patch_tokens + self.cross_attn(patch_tokens, context=text_states, mask=mask))
        return l2_normalize(self.fc2(jax.nn.gelu(self.fc1(injected), approximate=False)))
