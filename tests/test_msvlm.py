"""MS-VLM encoder (t3d_jax/models/msvlm.py) and its MEM loss (t3d_jax/losses/mem.py).

* The slice encoder against ``transformers.ViTModel`` (random init, saved to a folder and
  imported), run through the chunked ``slice_tokens`` path. Tolerance ``VIT_TOL`` = 1e-4
  absolute: float32 on both sides, only the summation order differs (as tests/test_convert.py).
* Padding independence of the Z-former (both attention patterns): ``PAD_TOL`` = 1e-5, float32
  with different batch / sequence shapes (XLA may reduce in another order).
* MEM loss value and gradient against float64 NumPy: ``MEM_TOL`` = 1e-6 relative (a float32
  sum of a few hundred terms of size ~1).
* One compiled program per length bucket, counted with a trace-time side effect.
* Multi-series order and embeddings against a NumPy recomputation (``EMB_TOL`` = 1e-5: one
  float32 LayerNorm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t3d_jax.losses import mem
from t3d_jax.models import msvlm
from t3d_jax.models.msvlm import MSVLM, MSVLMConfig

VIT_TOL = 1e-4
PAD_TOL = 1e-5
MEM_TOL = 1e-6
EMB_TOL = 1e-5


def tiny(**kw) -> MSVLMConfig:
    # One set of shapes for every test (the first eager build of a shape costs seconds of compiles).
    base = dict(width=32, depth=2, num_heads=4, mlp_dim=48, z_depth=2, image_size=(16, 16), patch_size=(8, 8),
                slice_chunk=4, num_global=1, max_slices=32, buckets=(16, 32))
    return MSVLMConfig(**{**base, **kw})


def test_slice_encoder_matches_transformers_vit(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=16, patch_size=8, num_channels=1)
    hf = transformers.ViTModel(hf_cfg).eval()
    with torch.no_grad():  # HF initialises biases to 0 and LayerNorms to identity: randomise all
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)

    # The import into a whole MS-VLM model's slice encoder (layers stacked: scan_layers), run over
    # a volume in chunks of 3 slices per volume (Z = 5: the second chunk is padded).
    cfg, _ = msvlm.hf_vit_state(tmp_path)
    model = MSVLM(tiny(**{**cfg.__dict__, "slice_chunk": 3, "z_depth": 1, "scan_layers": True}), rngs=nnx.Rngs(0))
    msvlm.load_hf_vit(tmp_path, into=model.slice_encoder)
    assert model.cfg.layer_norm_eps == 1e-12

    volume = np.random.default_rng(1).normal(size=(2, 16, 16, 5, 1)).astype(np.float32)
    slices = volume.transpose(0, 3, 1, 2, 4).reshape(10, 16, 16, 1)  # slice (b, z), [x, y, C]
    tokens, hidden = nnx.jit(lambda m, v, s: (m.slice_tokens(v), m.slice_encoder(s)["hidden"]))(
        model, jnp.asarray(volume), jnp.asarray(slices))
    tokens, hidden = np.asarray(tokens), np.asarray(hidden)
    with torch.no_grad():  # HF's pixel_values [N, C, H, W]: H = our x, W = our y
        ref = hf(pixel_values=torch.tensor(slices.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    d_hidden = float(np.abs(hidden - ref).max())
    d_cls = float(np.abs(tokens.reshape(10, -1) - ref[:, 0]).max())
    print(f"\nslice ViT vs transformers ViTModel: max|d last hidden|={d_hidden:.2e}, max|d CLS (chunked)|={d_cls:.2e}")
    assert d_hidden < VIT_TOL and d_cls < VIT_TOL


@pytest.mark.parametrize("pattern", ["dense", "local"])
def test_zformer_outputs_independent_of_padding(pattern):
    model = MSVLM(tiny(attention_pattern=pattern, window=4), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    short = rng.normal(size=(1, 5, 32)).astype(np.float32)
    long = rng.normal(size=(1, 12, 32)).astype(np.float32)
    run = nnx.jit(lambda m, t, v: m(slice_tokens=t, valid=v))
    alone = run(model, jnp.asarray(short), jnp.ones((1, 5), bool))
    padded = np.concatenate([np.pad(short, ((0, 0), (0, 7), (0, 0)), constant_values=9.0), long])  # junk padding
    valid = np.zeros((2, 12), bool)
    valid[0, :5] = True
    valid[1] = True
    batch = run(model, jnp.asarray(padded), jnp.asarray(valid))
    d_pool = float(np.abs(np.asarray(batch["pooled"][0]) - np.asarray(alone["pooled"][0])).max())
    d_tok = float(np.abs(np.asarray(batch["tokens"][0, :5]) - np.asarray(alone["tokens"][0])).max())
    assert d_pool < PAD_TOL and d_tok < PAD_TOL, (d_pool, d_tok)
    assert batch["mask"].tolist() == valid.tolist()


def test_mem_loss_matches_float64_numpy():
    rng = np.random.default_rng(3)
    pred = rng.normal(size=(3, 10, 8))
    target = rng.normal(size=(3, 10, 8))
    masked = rng.random((3, 10)) < 0.3
    masked[0, 0] = True
    # float64 reference: mean over the masked tokens' features; d/dpred = sign(pred - target) / (n * D).
    n = masked.sum()
    ref = np.abs(pred - target)[masked].sum() / (n * 8)
    ref_grad = np.sign(pred - target) * masked[..., None] / (n * 8)
    (loss, count), (g_pred, g_target) = jax.value_and_grad(
        lambda p, t: mem.mem_l1(p, t, jnp.asarray(masked)), argnums=(0, 1), has_aux=True)(
        jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32))
    assert int(count) == n
    assert abs(float(loss) - ref) <= MEM_TOL * abs(ref)
    np.testing.assert_allclose(np.asarray(g_pred), ref_grad, rtol=MEM_TOL, atol=1e-9)
    assert not np.any(np.asarray(g_target))  # the target is not trained by this loss

    # The mask: only valid positions, at about the rate; and zero-fill reaches the Z-former: the
    # predictions do not depend on what a masked token held.
    valid = jnp.asarray(np.arange(64)[None, :] < np.array([[40], [64]]))
    m = np.asarray(mem.mem_mask(jax.random.key(0), jnp.broadcast_to(valid, (2, 64)), 0.3))
    assert not m[0, 40:].any() and 0.15 < m[valid].mean() < 0.45
    model = MSVLM(tiny(), rngs=nnx.Rngs(4))
    tokens = jnp.asarray(rng.normal(size=(1, 6, 32)), jnp.float32)
    ids, pos = msvlm.series_layout([6], [0])

    ones = jnp.ones((1, 6), bool)
    masked5 = np.asarray(mem.mem_mask(jax.random.key(5), ones, 0.5))  # the mask mem_objective draws
    assert masked5.any() and not masked5.all()
    changed = tokens.at[0, int(np.argmax(masked5[0]))].add(100.0)  # a masked token's content

    @nnx.jit
    def run(m, t, t2):
        predict = lambda f, v: m.mem_predict(f, v, ids, pos)  # noqa: E731
        loss, aux = mem.mem_objective(predict, t, ones, jax.random.key(5), rate=0.5)
        loss2, _ = mem.mem_objective(predict, t2, ones, jax.random.key(5), rate=0.5)
        return loss, loss2, aux, predict(mem.zero_fill(t, masked5), ones), predict(mem.zero_fill(t2, masked5), ones)

    loss, loss2, aux, pred_a, pred_b = run(model, tokens, changed)
    np.testing.assert_array_equal(np.asarray(pred_a), np.asarray(pred_b))
    assert int(aux["mem_masked"]) == int(masked5.sum())
    # Same predictions; only the masked target moved (by 100 in one feature -> a larger loss).
    assert np.isfinite(float(loss)) and float(loss2) > float(loss)


def test_one_compiled_program_per_bucket():
    # Built as the two-tower models build their image tower (model.image.name = 'msvlm').
    import ml_collections

    from t3d_jax.models import two_tower

    fields = {k: v for k, v in tiny().__dict__.items() if k not in ("image_size", "attention", "dtype", "param_dtype")}
    image_cfg = ml_collections.ConfigDict({"name": "msvlm", "size": "tiny", "msvlm": fields})
    model = two_tower.build_image_encoder(image_cfg, image_size=(16, 16, 48), dtype="float32", rngs=nnx.Rngs(6))
    assert isinstance(model, MSVLM) and model.cfg == tiny()
    traces = []

    @nnx.jit
    def encode(m, volume, valid):
        traces.append(volume.shape)  # runs at trace time only
        return m(volume, valid=valid)["pooled"]

    rng = np.random.default_rng(7)
    for z in (5, 11, 16, 17, 23, 32):
        vol = rng.normal(size=(1, 16, 16, z, 1)).astype(np.float32)
        padded, valid = msvlm.pad_to_bucket(vol, model.cfg.buckets)
        out = encode(model, jnp.asarray(padded), jnp.asarray(valid))
        assert out.shape == (1, 32) and np.isfinite(np.asarray(out)).all()
    assert [s[3] for s in traces] == [16, 32], traces
    with pytest.raises(ValueError, match="33 slices exceed the largest length bucket 32"):
        msvlm.pad_to_bucket(np.zeros((1, 16, 16, 33, 1), np.float32), model.cfg.buckets)


def _layer_norm(x, eps):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def test_multi_series_order_and_embeddings():
    # Documented layout: series in the order given, each series' slots in z order; series s
    # gets series_embed[series[s]] and positions 0..Z_s-1.
    ids, pos = msvlm.series_layout([3, 5], [2, 0])
    assert ids.tolist() == [2, 2, 2, 0, 0, 0, 0, 0] and pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]

    # With no Z-former block and no global token the output is LayerNorm(token + series + position).
    model = MSVLM(tiny(z_depth=0, num_global=0), rngs=nnx.Rngs(8))
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(2, 3, 32)).astype(np.float32), rng.normal(size=(2, 5, 32)).astype(np.float32)
    va = np.array([[1, 1, 1], [1, 1, 0]], bool)
    out = model(slice_tokens=[jnp.asarray(a), jnp.asarray(b)], valid=[jnp.asarray(va), None], series=(2, 0))
    series_t, pos_t = np.asarray(model.series_embed[...]), np.asarray(model.position_embed[...])
    x = np.concatenate([a + series_t[2] + pos_t[:3], b + series_t[0] + pos_t[:5]], axis=1)
    np.testing.assert_allclose(np.asarray(out["tokens"]), _layer_norm(x, model.cfg.layer_norm_eps), atol=EMB_TOL)
    np.testing.assert_array_equal(np.asarray(out["slice_tokens"]), np.concatenate([a, b], axis=1))
    assert np.asarray(out["mask"]).tolist() == np.concatenate([va, np.ones((2, 5), bool)], axis=1).tolist()
    with pytest.raises(ValueError, match="outside"):
        model(slice_tokens=[jnp.asarray(a)], series=(4,))

    # The 'local' pattern: within a series and +-window//2 slices; global tokens see and are seen by all.
    mask = np.asarray(msvlm.zformer_mask(jnp.ones((1, 8), bool), ids, pos, pattern="local", window=2,
                                         num_global=1))[0, 0]
    expect = np.ones((9, 9), bool)
    for i in range(8):
        for j in range(8):
            expect[1 + i, 1 + j] = ids[i] == ids[j] and abs(pos[i] - pos[j]) <= 1
    np.testing.assert_array_equal(mask, expect)


def test_freeze_regex_selects_the_slice_encoder():
    """The documented freeze: optim.freeze = (r'^image_encoder/slice_encoder/',) labels every
    slice-encoder parameter frozen and nothing of the Z-former / heads (the optimizer's own
    labelling, t3d_jax/train/optim.py, on a two-tower-shaped parameter tree)."""
    import ml_collections

    from t3d_jax.train import optim
    from t3d_jax.utils import path_str

    class Tower(nnx.Module):
        def __init__(self):
            self.image_encoder = MSVLM(tiny(z_depth=1), rngs=nnx.Rngs(10))

    params = nnx.state(nnx.eval_shape(Tower), nnx.Param)
    config = ml_collections.ConfigDict({"freeze": (r"^image_encoder/slice_encoder/",), "lr_multipliers": {},
                                        "layer_decay": 0.0, "no_decay": ()})
    labels, _ = optim.param_labels(params, config)
    flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
    frozen = sorted(k for k, v in flat.items() if v == optim.FROZEN)
    assert frozen and all("slice_encoder" in k for k in frozen)
    assert len(frozen) == sum("slice_encoder" in k for k in flat)
    assert flat["image_encoder/z_blocks/0/attn/query/kernel/value"] == "default" and len(frozen) < len(flat)
