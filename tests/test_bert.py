"""BertEncoder against transformers.BertModel (random init, built here), plus its own properties.

Tolerance: 1e-4 absolute on hidden states in float32.  Both sides compute the same float32
graph; differences come only from summation order in matmuls/softmax (measured ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.models import convert, layers
from t3d_jax.models.bert import BertConfig, BertEncoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PARITY_TOL = 1e-4


def _hf_model(tmp_path, *, hidden, layers_, heads, inter, act="gelu", vocab=120, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers_,
                                  num_attention_heads=heads, intermediate_size=inter, hidden_act=act,
                                  max_position_embeddings=64, type_vocab_size=2)
    model = transformers.BertModel(cfg).eval()
    # Non-trivial LayerNorm parameters so a swapped scale/bias would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def _batch(rng, b, length, vocab, pad_lengths):
    ids = rng.integers(3, vocab, size=(b, length)).astype(np.int64)
    mask = np.ones((b, length), np.int64)
    for i, n in enumerate(pad_lengths):
        if n:
            ids[i, -n:] = 0
            mask[i, -n:] = 0
    types = np.zeros_like(ids)
    types[:, length // 2:] = 1
    return ids, mask, types


@pytest.mark.parametrize("hidden,layers_,heads,inter,act", [
    (32, 1, 2, 64, "gelu"),
    (48, 2, 4, 96, "gelu"),
    (64, 3, 8, 128, "gelu_new"),
])
def test_matches_transformers_random_init(tmp_path, hidden, layers_, heads, inter, act):
    hf = _hf_model(tmp_path, hidden=hidden, layers_=layers_, heads=heads, inter=inter, act=act)
    ours = convert.load_hf_bert(tmp_path)
    ids, mask, types = _batch(np.random.default_rng(1), 3, 11, 120, pad_lengths=(0, 4, 9))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    out = nnx.jit(lambda m, i, a, t: m(i, a, t))(ours, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    ref_h = ref.last_hidden_state.numpy()
    valid = mask.astype(bool)
    # Padded positions are computed (and ignored) by both; compare where they mean something,
    # and separately check all positions since neither side special-cases padded queries.
    diff_valid = float(np.abs(np.asarray(out["hidden"])[valid] - ref_h[valid]).max())
    diff_all = float(np.abs(np.asarray(out["hidden"]) - ref_h).max())
    diff_pool = float(np.abs(np.asarray(out["pooled"]) - ref.pooler_output.numpy()).max())
    rel = diff_all / float(np.abs(ref_h).max())
    print(f"\nBERT parity h={hidden} L={layers_} heads={heads} act={act}: max|dh| valid={diff_valid:.2e} "
          f"all={diff_all:.2e} (rel {rel:.2e}), max|dpooled|={diff_pool:.2e}")
    assert out["hidden"].shape == (3, 11, hidden)
    assert diff_all < PARITY_TOL
    assert diff_pool < PARITY_TOL


def test_padding_does_not_change_valid_tokens():
    cfg = BertConfig.from_size("tiny", vocab_size=50, hidden_dropout=0.0, attention_dropout=0.0)
    model = BertEncoder(cfg, rngs=nnx.Rngs(0))
    ids = jnp.array([[1, 7, 8, 9, 2]])
    forward = nnx.jit(lambda m, i, a: m(i, a)["hidden"])
    short = forward(model, ids, jnp.ones_like(ids))
    padded_ids = jnp.array([[1, 7, 8, 9, 2, 0, 0, 0]])
    long = forward(model, padded_ids, (padded_ids > 0).astype(jnp.int32))
    np.testing.assert_allclose(np.asarray(long[:, :5]), np.asarray(short), atol=1e-5)


def test_dropout_only_in_training_and_remat_matches():
    cfg = BertConfig.from_size("tiny", vocab_size=50)
    ids = jnp.array([[1, 7, 8, 9, 2, 0], [1, 4, 2, 0, 0, 0]])
    mask = (ids > 0).astype(jnp.int32)
    plain = BertEncoder(cfg, rngs=nnx.Rngs(0))
    remat = BertEncoder(BertConfig(**{**cfg.__dict__, "remat": "dots_saveable"}), rngs=nnx.Rngs(0))

    def loss(model):
        out = model(ids, mask)
        return jnp.sum(out["hidden"] ** 2) + jnp.sum(out["pooled"])

    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(plain)
    l2, g2 = nnx.jit(nnx.value_and_grad(loss))(remat)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    forward = nnx.jit(lambda m, det: m(ids, mask, deterministic=det)["hidden"], static_argnums=1)
    eval_out = forward(plain, True)
    train_out = forward(plain, False)
    assert float(jnp.abs(eval_out - train_out).max()) > 1e-3  # dropout 0.1 is active in training


def test_logical_names_on_every_kernel():
    model = BertEncoder(BertConfig.from_size("tiny", vocab_size=50), rngs=nnx.Rngs(0))
    names = layers.logical_names(model)
    assert names[("embeddings", "word", "embedding")] == ("vocab", "embed")
    assert names[("layers", 0, "attn", "query", "kernel")] == ("embed", "heads", "kv")
    assert names[("layers", 1, "mlp", "fc1", "kernel")] == ("embed", "mlp")
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            n = names[tuple(path)]
            assert n is not None and len(n) == var[...].ndim, (path, n)


def test_from_hf_rejects_bad_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "hidden_size": 8}')
    with pytest.raises(ValueError, match="not a BERT"):
        BertConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(ValueError, match="missing keys"):
        BertConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError):
        BertConfig.from_hf(tmp_path / "nowhere")
