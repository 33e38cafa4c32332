"""ResNet3D (MONAI layout): import parity with MONAI run in the test, BatchNorm statistics of the
global batch under sharding, GroupNorm, the config variant.

Shapes no other test uses (20x24x28, 1 channel; 12x16x20). XLA:CPU compiles and runs 3D convs
slowly, so everything is at tiny spatial sizes; resnet50's layout runs once at full width.

Tolerance: RTOL = 1e-5 of the output's largest magnitude. Both sides compute in float32 and
differ only in the order of the convolution sums (up to 27 x 2048 terms), compounded over 16
residual blocks whose ReLU outputs grow to ~1e2; measured 1e-6 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from t3d_jax.models import convert, resnet3d

torch = pytest.importorskip("torch")
monai_resnet = pytest.importorskip("monai.networks.nets.resnet")

RTOL = 1e-5


def _randomise_bn(model, seed=0):
    """MONAI inits BatchNorm to the identity; random affine + running stats exercise every mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, torch.nn.Conv3d) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def _layer4_and_pooled(ref, x):
    """MONAI's layer4 map (channel-last, [B, N, C] row-major) and its pooled output."""
    seen = {}
    hook = ref.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("map", o))
    with torch.no_grad():
        pooled = ref(torch.tensor(x)).numpy()
    hook.remove()
    fmap = seen["map"].numpy().transpose(0, 2, 3, 4, 1)
    return fmap.reshape(fmap.shape[0], -1, fmap.shape[-1]), pooled, fmap.shape[1:4]


def _rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,kwargs,shape", [
    # resnet50 at full width (MedicalNet's stem: 7^3 stride 2, max pool; no downsample bias).
    ("resnet50", dict(n_input_channels=1, conv1_t_stride=2, bias_downsample=False), (20, 24, 28)),
    # basic blocks, shortcut B with a bias, anisotropic stem, no max pool, 2 channels.
    ("resnet18", dict(n_input_channels=2, conv1_t_size=(3, 5, 7), conv1_t_stride=(1, 2, 2), no_max_pool=True,
                      widen_factor=0.125, shortcut_type="B", bias_downsample=True), (12, 16, 20)),
    # shortcut A (strided subsampling + zero channels), MONAI's default stem (stride 1).
    ("resnet10", dict(n_input_channels=1, shortcut_type="A", widen_factor=0.25), (12, 16, 20)),
])
def test_monai_resnet_parity(name, kwargs, shape):
    torch.manual_seed(0)
    ref = _randomise_bn(getattr(monai_resnet, name)(feed_forward=False, **kwargs)).eval()
    c = kwargs["n_input_channels"]
    x = np.random.default_rng(0).standard_normal((1 if name == "resnet50" else 2, c, *shape)).astype(np.float32)
    ref_tokens, ref_pooled, ref_grid = _layer4_and_pooled(ref, x)
    # The state dict as a training script saves it: 'module.' prefix (DataParallel), fc head.
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    ours = convert.load_monai_resnet(sd, **kwargs)
    assert ours.cfg.arch == name
    out = nnx.jit(lambda m, v: m(v))(ours, jnp.asarray(x.transpose(0, 2, 3, 4, 1)))
    d_pool, d_tok = _rel(out["pooled"], ref_pooled), _rel(out["tokens"], ref_tokens)
    print(f"\nMONAI {name} {shape}: rel max|d| pooled {d_pool:.1e}, tokens {d_tok:.1e}")
    assert tuple(int(g) for g in out["grid"]) == tuple(ref_grid) == ours.cfg.grid(shape)
    assert d_pool < RTOL and d_tok < RTOL


def test_import_checks_the_weights():
    ref = monai_resnet.resnet10(n_input_channels=1, widen_factor=0.25, feed_forward=False)
    with pytest.raises(ValueError, match="n_input_channels=2 given, but the weights say 1"):
        convert.load_monai_resnet(ref.state_dict(), n_input_channels=2, widen_factor=0.25)
    with pytest.raises(ValueError, match="widen_factor=1.0 given"):
        convert.load_monai_resnet(ref.state_dict(), widen_factor=1.0)
    with pytest.raises(ValueError, match="not a MONAI ResNet"):
        convert.monai_resnet_state({"conv1.weight": np.zeros((4, 1, 3, 3, 3))})


def _tiny(**kw):
    return resnet3d.ResNet3DConfig(arch="resnet10", widen_factor=0.125, conv1_size=3, conv1_stride=1,
                                   no_max_pool=True, **kw)


def test_batchnorm_statistics_are_the_global_batch_under_sharding():
    """Training mode, batch sharded over 8 devices == one device == MONAI train() on the whole
    batch (output and the running statistics after the step): the statistics are global."""
    assert jax.device_count() == 8
    kwargs = dict(n_input_channels=1, conv1_t_size=3, widen_factor=0.125, no_max_pool=True, bias_downsample=False)
    torch.manual_seed(1)
    ref = _randomise_bn(monai_resnet.resnet10(feed_forward=False, **kwargs), seed=1)
    base = convert.load_monai_resnet(ref.state_dict(), **kwargs)
    rng = np.random.default_rng(1)
    # Each example on its own scale and offset: per-device statistics would differ a lot.
    x = (rng.standard_normal((8, 8, 8, 8, 1)) * rng.uniform(0.2, 3.0, (8, 1, 1, 1, 1))
         + rng.uniform(-2, 2, (8, 1, 1, 1, 1))).astype(np.float32)

    @nnx.jit
    def train_forward(model, v):
        return model(v, deterministic=False)["pooled"]

    def run(sharding):
        model = nnx.clone(base)
        pooled = train_forward(model, jax.device_put(x, sharding) if sharding else jnp.asarray(x))
        stats = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
        return np.asarray(pooled), stats, model

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        sharded, sharded_stats, model = run(NamedSharding(mesh, P("data")))
    single, single_stats, _ = run(None)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
    for k in single_stats:
        np.testing.assert_allclose(sharded_stats[k], single_stats[k], rtol=1e-5, atol=1e-6)

    # MONAI, train(): PyTorch's statistics of the whole batch and its running-statistics update.
    ref.train()
    with torch.no_grad():
        ref_pooled = ref(torch.tensor(x.transpose(0, 4, 1, 2, 3))).numpy()
    assert _rel(sharded, ref_pooled) < RTOL
    for ours, theirs in ((("bn1",), ref.bn1), (("layer4", 0, "bn2"), ref.layer4[0].bn2),
                         (("layer2", 0, "downsample_norm"), ref.layer2[0].downsample[1])):
        np.testing.assert_allclose(sharded_stats[ours + ("mean",)], theirs.running_mean.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(sharded_stats[ours + ("var",)], theirs.running_var.numpy(), rtol=1e-4, atol=1e-6)
    # Eval mode after that step: both normalise with the updated running statistics.
    ref.eval()
    with torch.no_grad():
        ref_eval = ref(torch.tensor(x.transpose(0, 4, 1, 2, 3))).numpy()
    assert _rel(nnx.jit(lambda m, v: m(v)["pooled"])(model, jnp.asarray(x)), ref_eval) < RTOL


def test_groupnorm_matches_torch_and_has_no_batch_stats():
    gn = resnet3d.GroupNorm(16, 4, rngs=nnx.Rngs(0))
    gn.scale[...] = jnp.linspace(0.5, 1.5, 16)
    gn.bias[...] = jnp.linspace(-1, 1, 16)
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5, 16)).astype(np.float32) * 3 + 1
    ref = torch.nn.GroupNorm(4, 16, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, 16))
        ref.bias.copy_(torch.linspace(-1, 1, 16))
        want = ref(torch.tensor(x.transpose(0, 4, 1, 2, 3))).numpy().transpose(0, 2, 3, 4, 1)
    np.testing.assert_allclose(np.asarray(gn(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    model = nnx.eval_shape(lambda: resnet3d.ResNet3D(_tiny(norm="group", norm_groups=4), rngs=nnx.Rngs(0)))
    assert not nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
    out = nnx.eval_shape(lambda m: m(jnp.ones((1, 8, 8, 8, 1)), deterministic=False), model)
    assert out["tokens"].shape == (1, 1, 64) and model.cfg.grid((8, 8, 8)) == (1, 1, 1)


def test_config_variant_builds_the_resnet_encoder():
    from configs.t3d import get_config
    from t3d_jax.models import build_model_from_config

    c = get_config("resnet_tiny")
    assert (c.variant, c.model.image.name, c.model.image.resnet.arch) == ("resnet_tiny", "resnet3d", "resnet50")
    model = nnx.eval_shape(lambda: build_model_from_config(c, rngs=nnx.Rngs(0)))
    enc = model.image_encoder
    assert isinstance(enc, resnet3d.ResNet3D) and enc.cfg.width == 256 and enc.cfg.layers == (3, 4, 6, 3)
    assert enc.cfg.grid(c.data.view_size) == (2, 2, 2)
    assert model.image_proj.kernel.get_value().shape == (256, c.model.embed_dim)
    assert get_config("resnet_demo").model.image.resnet.widen_factor == 0.25
    c.model.image.resnet.norm = "layer"
    with pytest.raises(ValueError, match="norm must be one of"):
        build_model_from_config(c, rngs=nnx.Rngs(0))
