"""`segmentation`: per-voxel classes of a label map, the image encoder + a decoder.

The image encoder of the other tasks (ViT3D or ResNet3D, the same `model.image.*` keys, so a
pretraining's encoder loads with `init_from.checkpoint_params = ("image_encoder",)`) and its
decoder (t3d_jax/models/seg_decoders.py: UNETR on the ViT, a U-Net decoder on the ResNet;
`model.seg.*`) give logits [X, Y, Z, K] per view, K = `model.seg.num_classes` (background
included, class 0). The loss is Dice + cross-entropy (t3d_jax/losses/segmentation.py, MONAI's
`DiceCELoss` with softmax and one-hot labels) over every view of the batch:
`loss.dice_include_background`, `loss.lambda_dice`, `loss.lambda_ce`, `loss.dice_batch`.

Batch contract: `views` [B, V, X, Y, Z, C] float32 and `masks` [B, V, X, Y, Z] int32 (class per
voxel, cropped with the view's box), V = `data.num_views`, X, Y, Z = `data.view_size`.

The model (`SegmentationModel`, = seg_decoders.SegmentationNet): submodules `image_encoder` and
`decoder`; `logits(volume [B, X, Y, Z, C]) -> [B, X, Y, Z, K]`. Whole volumes of any size go
through t3d_jax/evaluate/segmentation.py's `sliding_window_inference` with windows of
`data.view_size`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.losses.segmentation import dice_ce_loss
from t3d_jax.models import layers
from t3d_jax.models.seg_decoders import DecoderConfig, SegmentationNet
from t3d_jax.models.two_tower import build_image_encoder
from t3d_jax.tasks.base import Task
from t3d_jax.utils import cfg_get


def build_segmentation_model(config, rngs: nnx.Rngs) -> SegmentationNet:
    dtype = layers.as_dtype(cfg_get(config.model, "dtype", "float32"))
    view_size = tuple(int(s) for s in config.data.view_size)
    encoder = build_image_encoder(config.model.image, image_size=view_size, dtype=dtype, rngs=rngs,
                                  attention=str(cfg_get(config.model, "attention", "auto")))
    seg = DecoderConfig.from_config(cfg_get(config.model, "seg", None), dtype=dtype)
    return SegmentationNet(encoder, seg, rngs=rngs)


class SegmentationTask(Task):
    name = "segmentation"

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return build_segmentation_model(self.config, rngs)

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        views = self.views_spec()
        return {"views": views, "masks": jax.ShapeDtypeStruct(views.shape[:-1], jnp.int32)}

    def loss(self, model, batch, *, step, deterministic=False):
        del step
        views = jnp.asarray(batch["views"])
        masks = jnp.asarray(batch["masks"])
        if views.ndim != 6 or masks.shape != views.shape[:-1]:
            raise ValueError(f"batch['views'] must be [B, V, X, Y, Z, C] and batch['masks'] [B, V, X, Y, Z]; "
                             f"got {views.shape} and {masks.shape}")
        b, v = views.shape[:2]
        logits = model.logits(views.reshape(b * v, *views.shape[2:]), deterministic=deterministic)
        lc = cfg_get(self.config, "loss", None)
        loss, terms = dice_ce_loss(
            logits, masks.reshape(b * v, *masks.shape[2:]).astype(jnp.int32),
            include_background=bool(cfg_get(lc, "dice_include_background", True)),
            lambda_dice=float(cfg_get(lc, "lambda_dice", 1.0)), lambda_ce=float(cfg_get(lc, "lambda_ce", 1.0)),
            batch=bool(cfg_get(lc, "dice_batch", False)))
        return loss, {"loss": loss, **terms}
