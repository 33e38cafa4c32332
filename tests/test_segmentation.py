"""Segmentation (issue 12): Dice+CE loss, sliding-window inference, Dice / HD95 metrics, each
against MONAI run in the test; predictions back in the source file's geometry; the ViT's hidden
states; UNETR / ResNet U-Net decoders; the `segmentation` task through the trainer's step. Tiny
shapes throughout (XLA:CPU 3D convolutions are slow)."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
import torch
from flax import nnx

from configs import finetune_seg
from t3d_jax import tasks
from t3d_jax.data import preprocess
from t3d_jax.evaluate import segmentation as seg_eval
from t3d_jax.losses.segmentation import dice_ce_loss
from t3d_jax.models.resnet3d import ResNet3D, ResNet3DConfig
from t3d_jax.models.seg_decoders import DecoderConfig, SegmentationNet, unetr_strides
from t3d_jax.models.vit3d import ViT3D, ViT3DConfig
from t3d_jax.train import mesh as mesh_lib
from t3d_jax.train import step as step_lib


def _ch_first(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


# ------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("include_background,batch", [(True, False), (False, False), (False, True)])
def test_dice_ce_equals_monai(include_background, batch):
    """Tolerance rtol 1e-5: both sides are float32 sums over ~1,000 voxels in different orders
    (observed differences ~1e-7 relative)."""
    from monai.losses import DiceCELoss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 7, 5, 4)).astype(np.float32) * 2
    labels = rng.integers(0, 4, size=(3, 6, 7, 5)).astype(np.int32)
    labels[1][labels[1] == 2] = 0  # a class absent from one example
    ours, terms = dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels), include_background=include_background,
                               batch=batch, lambda_dice=0.7, lambda_ce=1.3)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background, batch=batch,
                     lambda_dice=0.7, lambda_ce=1.3)(_ch_first(logits), torch.from_numpy(labels[:, None].astype(np.int64)))
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)
    # the example weight drops an example from both terms
    w, _ = dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels), weight=jnp.asarray([1.0, 0.0, 1.0]))
    sub, _ = dice_ce_loss(jnp.asarray(logits[[0, 2]]), jnp.asarray(labels[[0, 2]]))
    np.testing.assert_allclose(float(w), float(sub), rtol=1e-5)


# --------------------------------------------------------------------- sliding window
def _fixed_predictor_np(w: np.ndarray) -> np.ndarray:
    """A deterministic predictor that depends on the position inside the window (so the weighting
    and the window grid matter): [n, x, y, z, 2] -> [n, x, y, z, 3]."""
    n, x, y, z, _ = w.shape
    ramp = (np.arange(x)[:, None, None] * 0.3 + np.arange(y)[None, :, None] * 0.1
            - np.arange(z)[None, None, :] * 0.2).astype(np.float32)
    return np.stack([w[..., 0] * ramp, np.cos(w[..., 1]) + ramp, w[..., 0] * w[..., 1]], axis=-1)


@pytest.mark.parametrize("mode,overlap,sigma", [("gaussian", 0.5, 0.125), ("gaussian", 0.25, 0.3), ("constant", 0.25, 0.125)])
def test_sliding_window_equals_monai(mode, overlap, sigma):
    """An odd-shaped volume (smaller than the window along z: padded) against
    monai.inferers.sliding_window_inference; float32 accumulations, atol 1e-5."""
    from monai.inferers import sliding_window_inference

    rng = np.random.default_rng(1)
    vol = rng.normal(size=(2, 13, 21, 6, 2)).astype(np.float32)
    roi = (8, 10, 8)
    ours = seg_eval.sliding_window_inference(vol, roi, _fixed_predictor_np, overlap=overlap, sigma_scale=sigma,
                                             mode=mode, sw_batch_size=3)

    def torch_predictor(x):
        return _ch_first(_fixed_predictor_np(np.moveaxis(x.numpy(), 1, -1)))

    ref = sliding_window_inference(_ch_first(vol), roi, 3, torch_predictor, overlap=overlap, mode=mode,
                                   sigma_scale=sigma)
    assert ours.shape == (2, 13, 21, 6, 3)
    np.testing.assert_allclose(ours, np.moveaxis(ref.numpy(), 1, -1), atol=1e-5, rtol=1e-5)
    one = seg_eval.sliding_window_inference(vol[0], roi, _fixed_predictor_np, overlap=overlap, sigma_scale=sigma,
                                            mode=mode, sw_batch_size=3)
    np.testing.assert_allclose(one, ours[0], atol=1e-6)


# ---------------------------------------------------------------------------- metrics
def test_dice_and_hd95_equal_monai():
    """Fixed masks, 5 classes: overlapping boxes (0, 1), a class only in the ground truth (2: Dice
    0, HD95 NaN), only in the prediction (3: Dice NaN, HD95 NaN), in neither (4: NaN, NaN);
    isotropic and anisotropic spacing. MONAI DiceMetric(include_background=True, ignore_empty=True)
    and HausdorffDistanceMetric(include_background=True, percentile=95); rtol 1e-5 (MONAI's
    distances are float32)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    k = 5
    g = np.zeros((10, 12, 8), np.int64)
    p = np.zeros_like(g)
    g[2:6, 3:8, 2:5] = 1
    g[3, 9, 6] = 1  # a one-voxel island
    p[3:7, 3:9, 2:6] = 1
    g[7:9, 1:3, 1:3] = 2
    p[0:2, 9:11, 5:7] = 3
    onehot = lambda a: torch.from_numpy((a[None] == np.arange(k)[:, None, None, None])[None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about the empty classes
        dice_ref = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(onehot(p), onehot(g))
        for spacing in (None, (0.7, 1.0, 2.5)):
            hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
            kw = {} if spacing is None else {"spacing": list(spacing)}
            hd_ref = hd(onehot(p), onehot(g), **kw).numpy()[0]
            ours = seg_eval.hausdorff95_per_class(p, g, k, spacing=spacing)
            np.testing.assert_array_equal(np.isnan(ours), np.isnan(hd_ref))
            np.testing.assert_allclose(ours[~np.isnan(ours)], hd_ref[~np.isnan(hd_ref)], rtol=1e-5)
    dice = seg_eval.dice_per_class(p, g, k)
    np.testing.assert_allclose(dice, dice_ref.numpy()[0], rtol=1e-6, equal_nan=True)
    assert dice[2] == 0.0 and np.isnan(dice[3]) and np.isnan(dice[4])
    assert np.isnan(ours[[2, 3, 4]]).all()
    assert np.isinf(seg_eval.hausdorff95_per_class(p, g, k, one_empty=np.inf)[[2, 3]]).all()
    s = seg_eval.summarize(np.stack([dice, dice]), names=[f"c{i}" for i in range(k)])
    assert s["c2"] == {"mean": 0.0, "n": 2, "nan": 0, "inf": 0} and s["c4"]["nan"] == 2


# ------------------------------------------------------------------ geometry round trip
def test_prediction_back_in_source_geometry(tmp_path):
    """A synthetic LPS NIfTI with anisotropic spacing; a preset that crops one axis and pads the
    others. The written prediction has the file's affine and shape; the mask taken to the prepared
    grid and back overlaps itself with Dice >= 0.99; the forward map agrees with the volume's own
    preprocessing (the blob's HU image, resampled linearly, thresholded)."""
    shape, spacing = (30, 26, 12), (0.9, 0.7, 2.5)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS
    affine[:3, 3] = (10.0, -5.0, 40.0)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    center = np.array([16.0, 11.0, 5.0])
    r = ((idx - center) * np.asarray(spacing) / np.array([8.0, 6.0, 9.0])) ** 2
    mask = (r.sum(-1) <= 1.0).astype(np.uint8)
    mask[(np.abs(idx[..., 0] - 8) <= 2) & (np.abs(idx[..., 1] - 18) <= 3) & (idx[..., 2] >= 7)] = 2
    src = tmp_path / "ct.nii.gz"
    hu = np.where(mask > 0, 40.0, -900.0).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, affine), str(src))
    preset = preprocess.Preset("t", (0.6, 0.6, 1.5), (-1000.0, 1000.0), (40, 36, 24), "unit")

    volume = preprocess.load_volume(src)
    assert volume.source_orientation == "LPS"
    canon_mask = nib.orientations.apply_orientation(mask, nib.orientations.io_orientation(affine))
    prepared = seg_eval.prepared_from_source(canon_mask, volume.spacing, preset)
    assert prepared.shape == preset.size
    stored, scale, offset = preprocess.preprocess_volume(volume, preset)
    blob = stored > -430  # halfway between the two HU levels
    agree = seg_eval.dice_per_class(blob.astype(int), (prepared > 0).astype(int), 2)[1]
    assert agree >= 0.97, agree

    out = seg_eval.write_prediction_nifti(prepared, src, tmp_path / "pred.nii.gz", preset)
    back = nib.load(str(out))
    assert back.shape == shape
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    labels = np.asarray(back.dataobj)
    dice = seg_eval.dice_per_class(labels, mask, 3)
    assert dice[1] >= 0.99 and dice[2] >= 0.99, dice
    with pytest.raises(ValueError, match="prepared grid"):
        seg_eval.prediction_to_source(prepared[:-1], src, preset)


# ------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tiny_vit():
    """A 3-block ViT, patch (8, 8, 4) on 16x16x8 (built once: XLA:CPU compiles every init op)."""
    return ViT3D(ViT3DConfig(width=12, depth=3, num_heads=2, mlp_dim=16, image_size=(16, 16, 8),
                             patch_size=(8, 8, 4)), rngs=nnx.Rngs(0))


def test_vit_hidden_states_leave_outputs_unchanged_scan_too(tiny_vit):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 8, 1)), jnp.float32)
    plain, with_hidden = tiny_vit(x), tiny_vit(x, hidden_layers=(0, 2))
    assert "hidden" not in plain and len(with_hidden["hidden"]) == 2
    assert with_hidden["hidden"][0].shape == plain["tokens"].shape
    np.testing.assert_allclose(plain["tokens"], with_hidden["tokens"], atol=1e-6)
    np.testing.assert_allclose(tiny_vit.norm(with_hidden["hidden"][1]), plain["tokens"], atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        tiny_vit(x, hidden_layers=(3,))
    # scan_layers: the scan stacks each block's output; the last one, normed, is the output tokens
    scanned = ViT3D(dataclasses.replace(tiny_vit.cfg, scan_layers=True), rngs=nnx.Rngs(0))
    out = scanned(x, hidden_layers=(0, 2))
    assert [h.shape for h in out["hidden"]] == [out["tokens"].shape] * 2
    np.testing.assert_allclose(scanned.norm(out["hidden"][1]), out["tokens"], atol=1e-5)
    assert not np.allclose(out["hidden"][0], out["hidden"][1])


def test_decoder_shapes_unetr_anisotropic_and_resnet_odd_size(tiny_vit):
    """Shapes by abstract evaluation (the whole forward traced, nothing compiled; the UNETR's
    numbers are exercised by the train-step test below)."""
    assert unetr_strides((16, 16, 8)) == [(2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 1)]
    assert unetr_strides((8, 8, 4)) == [(2, 2, 2), (2, 2, 2), (2, 2, 1)]
    with pytest.raises(ValueError, match="powers of two"):
        unetr_strides((8, 8, 6))

    def shape_of(make, input_shape):
        built = []

        def run(x):
            with nnx.use_eager_sharding(False):
                built.append(make())
            return built[-1](x)

        return built, jax.eval_shape(run, jax.ShapeDtypeStruct(input_shape, jnp.float32)).shape

    unetr, a = shape_of(lambda: SegmentationNet(tiny_vit, DecoderConfig(num_classes=3, feature_size=2),
                                                rngs=nnx.Rngs(1)), (1, 16, 16, 8, 1))
    assert unetr[0].decoder.hidden_layers == (1, 2)  # depth * l // 3 for l = 1, 2
    cfg = ViT3DConfig.from_size("base", image_size=(32, 32, 16), patch_size=(16, 16, 8))
    base, c = shape_of(lambda: SegmentationNet(ViT3D(cfg, rngs=nnx.Rngs(0)), DecoderConfig(num_classes=4),
                                               rngs=nnx.Rngs(1)), (2, 32, 32, 16, 1))
    assert base[0].decoder.hidden_layers == (3, 6, 9)  # MONAI UNETR's for ViT-B/16

    def resnet_unet():
        rn = ResNet3D(ResNet3DConfig(arch="resnet10", widen_factor=0.0625, conv1_size=3, conv1_stride=(2, 2, 1),
                                     norm="group", norm_groups=2), rngs=nnx.Rngs(0))
        return SegmentationNet(rn, DecoderConfig(num_classes=3, feature_size=2, norm="group", norm_groups=2),
                               rngs=nnx.Rngs(1))

    _, b = shape_of(resnet_unet, (1, 15, 18, 9, 1))  # odd sizes: the up-path crops to each skip
    _, b2 = shape_of(lambda: SegmentationNet(ResNet3D(ResNet3DConfig(arch="resnet50", widen_factor=0.125),
                                                      rngs=nnx.Rngs(0)), DecoderConfig(num_classes=2),
                                             rngs=nnx.Rngs(1)), (1, 32, 32, 32, 1))  # stem 2, max pool
    assert (a, b, c, b2) == ((1, 16, 16, 8, 3), (1, 15, 18, 9, 3), (2, 32, 32, 16, 4), (1, 32, 32, 32, 2))
    with pytest.raises(ValueError, match="patch_dropout"):
        SegmentationNet(ViT3D(dataclasses.replace(tiny_vit.cfg, patch_dropout=0.5), rngs=nnx.Rngs(0, dropout=1)),
                        DecoderConfig(), rngs=nnx.Rngs(1))


class _VoxelModel(nnx.Module):
    """A stand-in segmentation model (per-voxel linear logits plus a position term, so windows
    differ): the plumbing of predict_volume without compiling a UNETR (tested above and below)."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray([[1.0, -1.0, 0.5]]))

    def logits(self, x, *, deterministic=True):
        ramp = jnp.arange(x.shape[1], dtype=jnp.float32)[None, :, None, None, None] * 0.2
        return x * self.w[...] + ramp * jnp.asarray([0.0, 1.0, -1.0])


def test_predict_volume_of_any_size():
    """A model's whole-volume prediction by sliding windows: a volume larger than the window in
    x/y and smaller in z; a window-sized volume gives the model's own softmax."""
    net = _VoxelModel()
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(20, 17, 6, 1)).astype(np.float32)
    labels = seg_eval.predict_volume(net, vol, (16, 16, 8), sw_batch_size=2)
    probs = seg_eval.predict_volume(net, vol, (16, 16, 8), sw_batch_size=2, probabilities=True)
    assert labels.shape == (20, 17, 6) and labels.dtype == np.int32 and labels.max() < 3
    np.testing.assert_array_equal(labels, probs.argmax(-1))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    one = rng.normal(size=(16, 16, 8, 1)).astype(np.float32)
    probs = seg_eval.predict_volume(net, one, (16, 16, 8), sw_batch_size=2, probabilities=True)
    direct = seg_eval.window_predictor(net)(np.stack([one, one]))[0]
    np.testing.assert_allclose(probs, direct, atol=1e-6)


# ------------------------------------------------------------------------------ task
def test_finetune_seg_configs():
    tiny, frozen, decay = (finetune_seg.get_config(a) for a in ("tiny", "demo,frozen", "base,layer_decay"))
    assert (tiny.task, tiny.model.image.patch_dropout, tiny.data.num_views) == ("segmentation", 0.0, 1)
    assert tiny.init_from.checkpoint_params == ("image_encoder",) and tiny.model.seg.num_classes == 2
    assert (tiny.loss.dice_include_background, tiny.loss.lambda_dice, tiny.loss.lambda_ce) == (True, 1.0, 1.0)
    assert frozen.optim.freeze == ("^image_encoder/",) and decay.optim.layer_decay == 0.75
    assert decay.model.image.patch_size == (16, 16, 8)  # UNETR strides (2,2,2) x3 then (2,2,1)
    with pytest.raises(ValueError, match="unknown mode"):
        finetune_seg.get_config("tiny,partial")



def test_segmentation_task_trains_through_the_step_and_overfits():
    """configs/finetune_seg.py:tiny (UNETR on the tiny ViT) through the trainer's step builder, at
    8^3 views with patch 4 and on a one-device mesh to keep the compile short (the 8-device mesh
    passes too and compiles ~1.6x longer): the encoder gets gradients (its parameters move) and a
    fixed batch of ball masks is fitted (soft-Dice term ~0.45 -> < 0.3 in 12 steps)."""
    config = finetune_seg.get_config("tiny")
    spec = tasks.get_task(config).batch_spec()
    assert spec["views"].shape == (8, 1, 16, 16, 16, 1) and spec["masks"].shape == (8, 1, 16, 16, 16)
    assert spec["masks"].dtype == jnp.int32
    config.data.view_size = (8, 8, 8)
    config.model.image.patch_size = (4, 4, 4)
    config.optim.lr = 3e-2
    config.optim.warmup_steps = 0
    config.optim.schedule = "constant"
    config.train.num_steps = 100
    assert type(tasks.get_task(config)).__name__ == "SegmentationTask"
    rng = np.random.default_rng(0)
    idx = np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1)
    centers = rng.integers(3, 6, size=(8, 3))
    masks = (np.linalg.norm(idx[None] - centers[:, None, None, None], axis=-1) <= 2).astype(np.int32)
    views = (masks + 0.3 * rng.normal(size=masks.shape)).astype(np.float32)
    batch = {"views": views[:, None, ..., None], "masks": masks[:, None]}

    config.mesh.shape = (1, 1)
    mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        program = step_lib.make_train_program(config, mesh)
        state = program.init()
        enc0 = jax.tree.map(np.asarray, state["params"]["image_encoder"])
        gbatch = step_lib.global_batch(batch, program.batch_shardings)
        dice = []
        for _ in range(12):
            state, metrics = program.step(state, gbatch)
            dice.append(float(metrics["loss_dice"]))
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state["params"]["image_encoder"], enc0)
    assert max(jax.tree.leaves(moved)) > 0, moved
    assert dice[-1] < 0.3 and dice[-1] < dice[0] - 0.15, dice


def _load_monai_unetr(net: SegmentationNet, sd: dict) -> None:
    """MONAI UNETR decoder weights into ours (block for block; the ViT is loaded by
    convert.load_monai_vit): Conv3d [O, I, k..] -> [k.., I, O], ConvTranspose3d [I, O, k..] -> [k.., I, O]."""
    conv = lambda w: jnp.asarray(np.transpose(w, (2, 3, 4, 1, 0)))
    up = lambda w: jnp.asarray(np.transpose(w, (2, 3, 4, 0, 1)))
    d = net.decoder

    def res(block, name):
        block.conv1.kernel[...] = conv(sd[f"{name}.conv1.conv.weight"])
        block.conv2.kernel[...] = conv(sd[f"{name}.conv2.conv.weight"])
        if block.conv3 is not None:
            block.conv3.kernel[...] = conv(sd[f"{name}.conv3.conv.weight"])

    res(d.encoder1, "encoder1.layer")
    for i, pr in enumerate(d.skips):
        name = f"encoder{i + 2}"
        pr.transp_conv_init.kernel[...] = up(sd[f"{name}.transp_conv_init.conv.weight"])
        for j, (u, block) in enumerate(pr.blocks):
            u.kernel[...] = up(sd[f"{name}.blocks.{j}.0.conv.weight"])
            res(block, f"{name}.blocks.{j}.1")
    for i, dec in enumerate(d.decoders):
        name = f"decoder{5 - i}"
        dec.transp_conv.kernel[...] = up(sd[f"{name}.transp_conv.conv.weight"])
        res(dec.conv_block, f"{name}.conv_block")
    d.out.conv.kernel[...] = conv(sd["out.conv.conv.weight"])
    d.out.conv.bias[...] = jnp.asarray(sd["out.conv.conv.bias"])


def test_unetr_equals_monai_unetr():
    """MONAI's UNETR (ViT with 12 blocks, patch 16, skips from blocks 3/6/9, instance norm,
    residual blocks) at random init, its weights mapped into ours: same logits on a 32x16x16
    volume (a 2x1x1 token grid, so the token -> grid reshape is checked). atol 2e-4 on logits of
    order 1: float32 through 12 transformer blocks and 15 convolutions with instance norms."""
    from monai.networks.nets import UNETR

    from t3d_jax.models import convert

    torch.manual_seed(0)
    ref = UNETR(in_channels=1, out_channels=3, img_size=(32, 16, 16), feature_size=4, hidden_size=24,
                mlp_dim=32, num_heads=2, norm_name="instance", res_block=True).eval()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    vit = convert.load_monai_vit({k[4:]: v for k, v in sd.items() if k.startswith("vit.")},
                                 img_size=(32, 16, 16), num_heads=2)
    # Built abstractly and filled with zeros (no random init to compile), then every decoder
    # weight is overwritten from MONAI's and the encoder is the imported ViT.
    abstract = nnx.eval_shape(lambda: SegmentationNet(ViT3D(vit.cfg, rngs=nnx.Rngs(0)),
                                                      DecoderConfig(num_classes=3, feature_size=4), rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(abstract)
    net = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state))
    net.image_encoder = vit
    assert net.decoder.hidden_layers == (3, 6, 9)
    _load_monai_unetr(net, sd)
    x = np.random.default_rng(0).normal(size=(1, 32, 16, 16, 1)).astype(np.float32)
    ours = np.asarray(net(jnp.asarray(x)))
    with torch.no_grad():
        expected = np.moveaxis(ref(_ch_first(x)).numpy(), 1, -1)
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=1e-4)
