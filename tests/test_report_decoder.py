"""The report decoder against ``transformers.GPT2LMHeadModel(add_cross_attention=True)``.

The reference is built in the test with random weights (no hub here), saved with
``save_pretrained`` and read back by our importer; logits must agree position by position.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.models import convert
from t3d_jax.models.report_decoder import ReportDecoderConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 on both sides, 2 layers, logits of magnitude ~1 (weights drawn with std 0.2 so every
# path matters): only summation order differs, 2.4e-7 at most when this was written.
PARITY_ATOL = 1e-5
VOCAB, WIDTH, LAYERS, HEADS, CTX, LEN, BATCH = 61, 32, 2, 4, 7, 9, 3
VISUAL_WIDTH, LATENTS = 20, 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                                     add_cross_attention=True, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random everything (HF's init leaves LayerNorm at 1/0 and biases at 0)
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def loaded(hf_dir):
    """Our ReportDecoder with the checkpoint's text weights, a new projection and resampler."""
    return convert.load_hf_gpt2(hf_dir[0], visual_width=VISUAL_WIDTH, resampler_latents=LATENTS,
                                hidden_dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def ours(loaded):
    return loaded.text


# One compile per mask pattern (None or not); eager op-by-op dispatch is far slower on CPU.
_forward = nnx.jit(lambda dec, ids, ctx, cmask, amask: dec(ids, ctx, cmask, amask))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (BATCH, LEN))
    context = rng.normal(size=(BATCH, CTX, WIDTH)).astype(np.float32)
    return ids, context


@pytest.mark.parametrize("context_mask,padding", [(False, False), (True, True)])
def test_logits_match_transformers(hf_dir, ours, context_mask, padding):
    _, reference = hf_dir
    ids, context = _inputs()
    cmask = np.ones((BATCH, CTX), np.int64)
    amask = np.ones((BATCH, LEN), np.int64)
    if context_mask:
        cmask[0, 4:] = 0
        cmask[2, 1:] = 0
    if padding:  # right padding, as training batches are laid out
        amask[1, 5:] = 0
        amask[2, 2:] = 0
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(ids), encoder_hidden_states=torch.tensor(context),
                         encoder_attention_mask=torch.tensor(cmask) if context_mask else None,
                         attention_mask=torch.tensor(amask) if padding else None).logits.numpy()
    got = _forward(ours, jnp.asarray(ids), jnp.asarray(context), cmask if context_mask else None,
                   amask if padding else None)
    assert got.shape == (BATCH, LEN, VOCAB)
    valid = amask.astype(bool)  # a padded query row is never read (its loss is masked)
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=PARITY_ATOL, rtol=0)
    if context_mask:  # not vacuous: without its mask the reference's logits differ
        with torch.no_grad():
            unmasked = reference(input_ids=torch.tensor(ids), encoder_hidden_states=torch.tensor(context),
                                 attention_mask=torch.tensor(amask)).logits.numpy()
        assert np.abs(unmasked[0] - want[0]).max() > 1e-2


def test_report_decoder_visual_side(loaded):
    """Projection + resampler: any visual width and token count; masked tokens do not matter."""
    model = loaded
    rng = np.random.default_rng(0)
    visual = rng.normal(size=(2, 11, VISUAL_WIDTH)).astype(np.float32)
    mask = np.ones((2, 11), bool)
    mask[1, 6:] = False
    ids = rng.integers(0, VOCAB, (2, 6))
    forward = nnx.jit(lambda m, ids, v, mask: (m(ids, v, mask), m.encode_visual(v, mask)))
    logits, (context, cmask) = forward(model, jnp.asarray(ids), jnp.asarray(visual), mask)
    assert context.shape == (2, LATENTS, WIDTH) and cmask is None
    assert logits.shape == (2, 6, VOCAB) and np.isfinite(np.asarray(logits)).all()
    changed = visual.copy()
    changed[1, 6:] = 100.0  # only masked tokens of example 1
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(changed), mask)[0]),
                               np.asarray(logits), atol=1e-5)
    changed[1, :6] += 1.0  # its real tokens do matter
    assert np.abs(np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(changed), mask)[0])[1]
                  - np.asarray(logits)[1]).max() > 1e-3
    with pytest.raises(ValueError, match="visual_width"):
        model.encode_visual(jnp.zeros((2, 11, VISUAL_WIDTH + 1)))


def test_sizes_and_bad_checkpoints(tmp_path):
    """Sizes by name; a checkpoint that is not a cross-attention GPT-2 fails naming the problem."""
    base = ReportDecoderConfig.from_size("base")
    assert (base.hidden_size, base.num_layers, base.num_heads, base.mlp_dim) == (768, 12, 12, 3072)
    with pytest.raises(ValueError, match="unknown report decoder size"):
        ReportDecoderConfig.from_size("huge")
    plain = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH,
                                                                 n_layer=1, n_head=HEADS))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(KeyError, match="add_cross_attention"):
        convert.hf_gpt2_state(tmp_path / "plain")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint"):
        convert.hf_gpt2_state(tmp_path / "bert")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        convert.hf_gpt2_state(tmp_path / "no_weights")
