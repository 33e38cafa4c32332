"""Checkpoint import: the real MiniLM-L6 BERT, torch .bin files, MONAI's 3D ViT.

References are computed in the test with transformers / MONAI (PyTorch, float32).
Tolerance 1e-4 absolute (float32 on both sides; only summation order differs).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.models import convert
from t3d_jax.models.bert import BertConfig, BertEncoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
SENTENCES = [
    "No pleural effusion or pneumothorax.",
    "Mild cardiomegaly with calcification of the coronary arteries and a 6 mm nodule in the right upper lobe.",
    "Bilateral ground-glass opacities, more pronounced in the lower lobes.",
]


def test_real_minilm_matches_transformers(minilm_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    hf = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in enc.items()})
    ours = convert.load_hf_bert(minilm_dir)
    assert ours.cfg.hidden_size == 384 and ours.cfg.num_layers == 6
    out = nnx.jit(lambda m, i, a, t: m(i, a, t))(ours, jnp.asarray(enc["input_ids"]),
                                                  jnp.asarray(enc["attention_mask"]),
                                                  jnp.asarray(enc["token_type_ids"]))
    ref_h = ref.last_hidden_state.numpy()
    valid = enc["attention_mask"].astype(bool)
    diff = np.abs(np.asarray(out["hidden"]) - ref_h)
    diff_valid = float(diff[valid].max())
    diff_pool = float(np.abs(np.asarray(out["pooled"]) - ref.pooler_output.numpy()).max())
    print(f"\nMiniLM-L6 real checkpoint: max|dh| valid tokens={diff_valid:.2e} all={diff.max():.2e} "
          f"(rel {diff.max() / np.abs(ref_h).max():.2e}), max|dpooled|={diff_pool:.2e}")
    assert out["hidden"].shape == ref_h.shape
    assert float(diff.max()) < TOL
    assert diff_pool < TOL


def test_torch_bin_with_bert_prefix_and_assign_into_submodule(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32)
    mlm = transformers.BertForMaskedLM(cfg).eval()  # keys 'bert.*' plus 'cls.*' head
    # TF-era names for LayerNorm parameters (gamma/beta) must load too.
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in mlm.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert any(k.startswith("bert.") for k in mlm.state_dict())

    bcfg, state = convert.hf_bert_state(tmp_path)

    class TwoTower(nnx.Module):  # weights land in a sub-module of a bigger model
        def __init__(self):
            self.text = BertEncoder(bcfg, rngs=nnx.Rngs(3))

    big = TwoTower()
    convert.assign(big.text, state, allow_missing=(("pooler",),))  # BertForMaskedLM has no pooler
    ids = np.array([[2, 5, 9, 11, 3, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    with torch.no_grad():
        ref = mlm.bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    out = big.text(jnp.asarray(ids), jnp.asarray(mask))["hidden"]
    diff = float(np.abs(np.asarray(out) - ref).max())
    print(f"\nBERT from pytorch_model.bin with 'bert.' prefix: max|dh|={diff:.2e}")
    assert diff < TOL

    # Functional form on a split state whose leaves are sharded over a mesh: same weights land,
    # shardings are kept.
    fresh = TwoTower()
    graphdef, params, rest = nnx.split(fresh, nnx.Param, ...)
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, replicated)
    loaded = convert.into_state(params, state, prefix=("text",), allow_missing=(("pooler",),))
    leaf = loaded["text"]["layers"][0]["attn"]["query"]["kernel"]
    assert leaf[...].sharding == replicated
    out2 = nnx.merge(graphdef, loaded, rest).text(jnp.asarray(ids), jnp.asarray(mask))["hidden"]
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))
    with pytest.raises(KeyError, match="no parameters under"):
        convert.into_state(params, state, prefix=("image",))
    sd["bert.encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="not understood.*distance_embedding"):
        convert.hf_bert_state_from_dict({k: v.numpy() for k, v in sd.items()}, bcfg)


def test_bin_is_read_weights_only(tmp_path):
    import argparse  # an arbitrary (non-tensor) class: weights-only loading must refuse to build it

    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2, 2), "payload": argparse.Namespace(a=1)},
               tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(transformers.BertConfig(
        vocab_size=2, hidden_size=2, num_hidden_layers=1, num_attention_heads=1, intermediate_size=2).to_dict()))
    with pytest.raises(ValueError, match="weights_only"):
        convert.hf_bert_state(tmp_path)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        convert.load_hf_bert(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps(transformers.BertConfig(
        vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4).to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert.load_hf_bert(tmp_path)
    model = BertEncoder(BertConfig.from_size("tiny", vocab_size=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="shape mismatch at embeddings/word/embedding"):
        convert.assign(model, {("embeddings", "word", "embedding"): np.zeros((9, 64))},
                       allow_missing=((),))
    with pytest.raises(KeyError, match="no place"):
        convert.assign(model, {("nope",): np.zeros(1)})
    with pytest.raises(KeyError, match="lacks weights"):
        convert.assign(model, {("embeddings", "word", "embedding"): np.zeros((8, 64))})


# ----------------------------------------------------------------------------- MONAI ViT
monai_vit = pytest.importorskip("monai.networks.nets.vit")


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=1, img_size=(16, 24, 32), patch_size=(8, 8, 8), hidden_size=48, mlp_dim=96, num_layers=2,
         num_heads=4, qkv_bias=False),
    dict(in_channels=2, img_size=(16, 16, 16), patch_size=(4, 8, 8), hidden_size=32, mlp_dim=64, num_layers=1,
         num_heads=2, qkv_bias=True, classification=True, proj_type="perceptron"),
])
def test_monai_vit_parity(kwargs):
    torch.manual_seed(0)
    ref_model = monai_vit.ViT(**kwargs).eval()
    with torch.no_grad():  # MONAI zero-inits biases / LN; randomise so every mapping is exercised
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = np.random.default_rng(0).standard_normal((2, kwargs["in_channels"], *kwargs["img_size"])).astype(np.float32)
    with torch.no_grad():
        ref_out, ref_hidden = ref_model(torch.tensor(x))
    ours = convert.load_monai_vit(ref_model.state_dict(), **kwargs)
    out = nnx.jit(lambda m, v: m(v))(ours, jnp.asarray(x.transpose(0, 2, 3, 4, 1)))  # channel-last
    if kwargs.get("classification"):
        # MONAI's output is its classification head on the normed CLS token = our pooled.
        head = ref_model.classification_head
        with torch.no_grad():
            got = head(torch.tensor(np.asarray(out["pooled"]))).numpy()
        diff = float(np.abs(got - ref_out.numpy()).max())
    else:
        diff = float(np.abs(np.asarray(out["tokens"]) - ref_out.numpy()).max())
    rel = diff / float(np.abs(ref_out.numpy()).max())
    print(f"\nMONAI ViT parity {kwargs.get('proj_type', 'conv')} cls={bool(kwargs.get('classification'))}: "
          f"max|d|={diff:.2e} (rel {rel:.2e})")
    assert out["grid"] == tuple(s // p for s, p in zip(kwargs["img_size"], kwargs["patch_size"]))
    assert diff < TOL


def test_monai_checkpoint_file_with_prefix(tmp_path):
    kwargs = dict(in_channels=1, img_size=(16, 16, 16), patch_size=8, hidden_size=24, mlp_dim=32, num_layers=1,
                  num_heads=2)
    torch.manual_seed(1)
    ref_model = monai_vit.ViT(**kwargs).eval()
    sd = {f"vision_encoder.{k}": v for k, v in ref_model.state_dict().items()}
    sd["text_encoder.some.weight"] = torch.zeros(3)
    torch.save({"state_dict": sd}, tmp_path / "m3d_clip.pth")
    ours = convert.load_monai_vit(tmp_path / "m3d_clip.pth", **kwargs)
    x = np.random.default_rng(1).standard_normal((1, 1, 16, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref_out = ref_model(torch.tensor(x))[0].numpy()
    diff = float(np.abs(np.asarray(ours(jnp.asarray(x.transpose(0, 2, 3, 4, 1)))["tokens"]) - ref_out).max())
    assert diff < TOL
    with pytest.raises(ValueError, match="num_layers=3 given, but the weights say 1"):
        convert.load_monai_vit(tmp_path / "m3d_clip.pth", **{**kwargs, "num_layers": 3})
    with pytest.raises(ValueError, match="position embeddings"):
        convert.load_monai_vit(tmp_path / "m3d_clip.pth", **{**kwargs, "img_size": (16, 16, 32)})
