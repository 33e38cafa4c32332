"""Swin3D (MONAI SwinUNETR's swinViT): import parity with MONAI run in the test, the
``init_from.monai_swin`` entry point, export back to MONAI, the pieces (masks, bias index,
both patch mergings) against MONAI's own functions, and the `base` encoder's shapes.

The parity model has shapes no other test uses and is chosen so every path of MONAI's code
runs: input 39x36x30 with 2 channels (the patch embedding pads 39 -> 40), window 4, depths
2-1-2-1: stage 1 (20x18x15) pads to 20x20x16 and its second block shifts windows with the mask;
stage 3 (5x5x4) pads x and y to 8 and its second block shifts x and y only (z equals the window:
MONAI's unshifted-axis case of the mask); stage 4 (3x3x2) clips its window to (3, 3, 2), where
MONAI indexes the bias with the top-left block of the full window's index; odd sizes reach
every patch merging (15 -> 8, 9 -> 5, 5 -> 3, 3 -> 2).

Tolerance: ATOL = 2e-5 on the stage outputs, which are layer-normalised (unit scale). Both sides
compute in float32 and differ in the order of sums (matmuls over at most 8 x 96 terms, softmax
over at most 64 keys), compounded over 6 blocks and 4 mergings; measured <= 4e-6.
"""

from __future__ import annotations

import re

import ml_collections
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.models import convert, export_torch, layers, swin3d

torch = pytest.importorskip("torch")
monai_swin = pytest.importorskip("monai.networks.nets.swin_unetr")

ATOL = 2e-5
KW = dict(in_chans=2, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(2, 1, 2, 1),
          num_heads=(1, 2, 2, 4))
SHAPE = (39, 36, 30)


def _monai_model(downsample="merging", seed=0):
    """MONAI's SwinTransformer with every weight (LayerNorms and biases too) random."""
    torch.manual_seed(seed)
    model = monai_swin.SwinTransformer(**KW, downsample=downsample).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _channels_last(x):
    return jnp.asarray(np.moveaxis(x, 1, -1))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """MONAI's side runs on one thread (the module's tiny convolutions and matmuls gain nothing
    from more, and on a shared CPU torch's thread pool costs seconds); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parity():
    """MONAI's outputs, the checkpoint file (SwinUNETR layout), and one jitted forward."""
    ref = _monai_model()
    x = np.random.default_rng(0).standard_normal((2, 2, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        want = [np.moveaxis(o.numpy(), 1, -1) for o in ref(torch.from_numpy(x), normalize=True)]
    return ref, x, want


def _compiled_forward(model, x):
    """``(state, x) -> (features, encoder dict)`` compiled once for ``model``'s graph, with XLA's
    backend optimisations off (as tests/test_train_loop.py): the compile, not the run, is this
    test's cost, and the numbers are the same computation."""
    graphdef, state = nnx.split(model)

    def run(state, x):
        feats = nnx.merge(graphdef, state).features(x)
        return feats, swin3d.encoder_output(feats[-1])

    return jax.jit(run).lower(state, x).compile({"xla_backend_optimization_level": 0}), state


def test_monai_parity_every_stage_and_the_init_from_entry_point(parity, tmp_path):
    ref, x, want = parity
    # A SwinUNETR-style checkpoint: the encoder under 'swinViT.', a decoder weight beside it.
    sd = {f"swinViT.{k}": v for k, v in ref.state_dict().items()}
    sd["decoder1.conv_block.conv1.conv.weight"] = torch.zeros(12, 12, 3, 3, 3)
    path = tmp_path / "swin_unetr.pt"
    torch.save({"state_dict": sd}, path)

    ours = convert.load_monai_swin(path)  # window 4 read from the bias tables
    assert ours.cfg.window_size == (4, 4, 4) and ours.cfg.depths == (2, 1, 2, 1) and ours.cfg.in_channels == 2
    forward, state = _compiled_forward(ours, _channels_last(x))
    feats, out = forward(state, _channels_last(x))
    for i, (got, exp) in enumerate(zip(feats, want)):
        assert got.shape == exp.shape, i
        err = float(np.abs(np.asarray(got) - exp).max())
        print(f"stage {i} {exp.shape[1:4]}: max|d| {err:.1e}")
        assert err < ATOL, (i, err)
    tokens = want[-1].reshape(2, -1, want[-1].shape[-1])
    assert tuple(int(g) for g in out["grid"]) == (2, 2, 1) == ours.cfg.grid(SHAPE)
    np.testing.assert_allclose(np.asarray(out["tokens"]), tokens, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["pooled"]), tokens.mean(1), atol=ATOL)

    # The trainer's entry point: init_from.monai_swin into a freshly initialised image encoder
    # built from the config (model.image.name='swin3d').
    from t3d_jax.models.two_tower import build_image_encoder
    from t3d_jax.train import pretrained

    config = ml_collections.ConfigDict({
        "model": {"image": {"name": "swin3d", "in_channels": 2,
                            "swin": {"size": "tiny", "depths": (2, 1, 2, 1), "num_heads_per_stage": (1, 2, 2, 4),
                                     "window_size": (4, 4, 4), "patch_size": (2, 2, 2)}}},
        "init_from": {"hf_bert_dir": "", "monai_vit": "", "monai_swin": str(path)}})
    # Abstract (an eager random init costs more than the compile); the loader fills every leaf.
    fresh = nnx.eval_shape(lambda: build_image_encoder(config.model.image, image_size=SHAPE, dtype="float32",
                                                       rngs=nnx.Rngs(1)))
    graphdef, params = nnx.split(fresh, nnx.Param)
    pure = {"image_encoder": nnx.to_pure_dict(params)}
    shardings = jax.tree.map(lambda a: jax.sharding.SingleDeviceSharding(jax.devices()[0]), pure)
    program = type("Program", (), {"state_shardings": {"params": shardings}})()
    loaded = pretrained.load_into_state(config, program, {"params": pure})["params"]["image_encoder"]
    nnx.replace_by_pure_dict(params, loaded)
    feats2, _ = forward(nnx.state(nnx.merge(graphdef, params)), _channels_last(x))
    for got, exp in zip(feats2, feats):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))

    config.model.image.swin.window_size = (5, 5, 5)
    with pytest.raises(ValueError, match="window_size"):
        pretrained.load_into_state(config, program, {"params": pure})


@pytest.mark.parametrize("options", [{}, dict(patch_norm=True, qkv_bias=False, downsample="mergingv2",
                                               window_size=(4, 3, 2), mlp_ratio=2.0)])
def test_export_round_trip_loads_strictly_into_monai(parity, options):
    """Import then export gives back MONAI's state dict exactly (weights only: the forward of the
    default options is the parity test's; the others change only which weights exist)."""
    ref = parity[0]
    if options:
        torch.manual_seed(1)
        ref = monai_swin.SwinTransformer(**{**KW, **options})
    kwargs = {k: v for k, v in options.items() if k in ("window_size", "downsample")}
    ours = convert.load_monai_swin(ref.state_dict(), **kwargs)
    sd, ctor = export_torch.image_encoder_to_monai(ours)
    assert ctor["class"] == "monai.networks.nets.swin_unetr.SwinTransformer"
    assert ctor["kwargs"]["downsample"] == options.get("downsample", "merging")
    back = monai_swin.SwinTransformer(**ctor["kwargs"])
    back.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy(), err_msg=k)


def test_masks_bias_index_and_both_mergings_match_monai():
    for dims, window, shift in [((8, 8, 8), (4, 4, 4), (2, 2, 2)), ((12, 12, 8), (4, 4, 4), (2, 2, 0)),
                                ((7, 6, 7), (7, 6, 7), (3, 0, 3))]:
        exp = monai_swin.compute_mask(list(dims), window, shift, "cpu").numpy()
        np.testing.assert_array_equal(swin3d.compute_mask(dims, window, shift), exp)
    for window in [(4, 4, 4), (7, 6, 5)]:
        attn = monai_swin.WindowAttention(12, 2, window)
        np.testing.assert_array_equal(swin3d.relative_position_index(window), attn.relative_position_index.numpy())
    x = np.random.default_rng(1).standard_normal((2, 5, 4, 3, 6)).astype(np.float32)  # odd sizes: padded
    for name, cls in (("merging", monai_swin.PatchMerging), ("mergingv2", monai_swin.PatchMergingV2)):
        torch.manual_seed(0)
        ref = cls(6)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.1 * torch.randn_like(p))
            exp = ref(torch.from_numpy(x)).numpy()
        ours = nnx.eval_shape(lambda: swin3d.PatchMerging(6, name, eps=1e-5, dtype="float32",
                                                          param_dtype="float32", rngs=nnx.Rngs(0)))
        ours.norm.scale.set_value(jnp.asarray(ref.norm.weight.detach().numpy()))
        ours.norm.bias.set_value(jnp.asarray(ref.norm.bias.detach().numpy()))
        ours.reduction.kernel.set_value(jnp.asarray(ref.reduction.weight.detach().numpy().T))
        got = nnx.jit(lambda m, v: m(v))(ours, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(got), exp, atol=1e-5, err_msg=name)


def test_import_errors_name_the_file_and_the_problem(tmp_path):
    ref = _monai_model()
    sd = ref.state_dict()
    with pytest.raises(ValueError, match="window_size=.*needs"):
        convert.load_monai_swin(sd, window_size=7)
    with pytest.raises(ValueError, match="embed_dim=24 given, but the weights say 12"):
        convert.monai_swin_state(sd, embed_dim=24)
    bad = dict(sd, **{"layers2c.0.conv1.conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="use_v2"):
        convert.monai_swin_state(bad)
    bad = dict(sd, **{"layers1.0.blocks.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not understood.*attn.extra"):
        convert.monai_swin_state(bad)
    path = tmp_path / "vit.safetensors"
    from safetensors.numpy import save_file
    save_file({"patch_embedding.patch_embeddings.weight": np.zeros((4, 1, 2, 2, 2), np.float32)}, str(path))
    with pytest.raises(ValueError, match=re.escape(f"{path}: no 'patch_embed.proj.weight'")):
        convert.load_monai_swin(path)


def test_base_builds_as_the_image_tower_at_128x96x128():
    from configs.clip import get_config
    from t3d_jax.models import build_model_from_config

    c = get_config("tiny")
    c.model.image.name = "swin3d"
    c.model.image.swin.size = "base"
    c.data.view_size = (128, 96, 128)
    c.model.image.remat = "full"  # traced through nnx.remat below
    model = nnx.eval_shape(lambda: build_model_from_config(c, rngs=nnx.Rngs(0)))
    enc = model.image_encoder
    assert isinstance(enc, swin3d.Swin3D) and enc.cfg.embed_dim == 48 and enc.cfg.width == 768
    names = layers.logical_names(enc)  # every parameter carries logical sharding names
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(enc, nnx.Param))}
    assert set(names) == set(flat) and all(n is not None and len(n) == len(flat[p].shape) for p, n in names.items())
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(enc, nnx.Param)))
    print(f"Swin3D base: {n_params:,} parameters")
    assert model.image_proj.kernel.get_value().shape == (768, c.model.embed_dim)
    out = nnx.eval_shape(lambda m, v: m(v), enc, jax.ShapeDtypeStruct((1, 128, 96, 128, 1), jnp.float32))
    assert out["tokens"].shape == (1, 4 * 3 * 4, 768) and out["pooled"].shape == (1, 768)
    assert enc.cfg.grid((128, 96, 128)) == (4, 3, 4)
    c.model.image.swin.downsample = "v3"
    with pytest.raises(ValueError, match="downsample must be one of"):
        build_model_from_config(c, rngs=nnx.Rngs(0))
