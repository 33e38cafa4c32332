"""Models built by name from ``config.model``: ``build_model(config.model, rngs=...)``.

``config.model.name``: 't3d' (CLIP + Text-informed Multi-view Alignment) or 'clip' (the
CT-CLIP-style baseline). The contrastive settings live in ``config.loss`` and the position
table's grid follows ``config.data.view_size``; pass them as ``loss_config=`` and
``view_size=`` (``build_model_from_config(config, rngs=...)`` does). Without them the model
falls back to ``config.model.loss`` / ``config.model.image.image_size`` if present, else to
CLIP with log(1/0.07) init and the ViT default grid.
"""

from __future__ import annotations

from flax import nnx


def build_model(model_config, *, rngs: nnx.Rngs, loss_config=None, view_size=None) -> nnx.Module:
    """The two-tower model named by ``model_config.name`` (imports the encoders lazily)."""
    from t3d_jax.models import two_tower

    cls = two_tower.model_class(str(model_config.get("name", "t3d")))
    if loss_config is None:
        loss_config = model_config.get("loss", None)
    return cls(model_config, rngs=rngs, loss_config=loss_config, view_size=view_size)


def build_model_from_config(config, *, rngs: nnx.Rngs) -> nnx.Module:
    """``build_model`` with ``config.loss`` and ``config.data.view_size`` passed along."""
    view_size = config.data.get("view_size", None) if "data" in config else None
    return build_model(config.model, rngs=rngs, loss_config=config.get("loss", None),
                       view_size=None if view_size is None else tuple(view_size))
