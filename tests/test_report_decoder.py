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
from t3d_jax.models.report_decoder import ReportDecoder, ReportDecoderConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 on both sides, 2 layers, logits of magnitude ~10 (weights drawn with std 0.2 so
# every path matters): summation-order differences stay around 1e-5; 1e-4 leaves room.
PARITY_ATOL = 1e-4
VOCAB, WIDTH, LAYERS, HEADS, CTX, LEN, BATCH = 61, 32, 2, 4, 7, 9, 3


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


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (BATCH, LEN))
    context = rng.normal(size=(BATCH, CTX, WIDTH)).astype(np.float32)
    return ids, context


@pytest.mark.parametrize("context_mask,padding", [(False, False), (True, True)])
def test_logits_match_transformers(hf_dir, context_mask, padding):
    path, reference = hf_dir
    decoder = convert.load_hf_gpt2(path).text
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
    got = decoder(jnp.asarray(ids), jnp.asarray(context), cmask if context_mask else None,
                  amask if padding else None)
    assert got.shape == (BATCH, LEN, VOCAB)
    valid = amask.astype(bool)  # a padded query row is never read (its loss is masked)
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=PARITY_ATOL, rtol=0)
    if context_mask:  # the mask matters: masked context changes the logits
        unmasked = decoder(jnp.asarray(ids), jnp.asarray(context))
        assert np.abs(np.asarray(unmasked)[0] - np.asarray(got)[0]).max() > 1e-2


def test_cached_steps_match_full_forward(hf_dir):
    """decode_step over positions 0..L-1 gives the full forward's logits (same weights)."""
    path, _ = hf_dir
    decoder = convert.load_hf_gpt2(path).text
    ids, context = _inputs(1)
    cmask = np.ones((BATCH, CTX), bool)
    cmask[1, 3:] = False
    full = np.asarray(decoder(jnp.asarray(ids), jnp.asarray(context), cmask))

    @nnx.jit
    def steps(dec, ids, context, cmask):
        cache = dec.init_cache(context, cmask, 12)
        out = []
        for pos in range(LEN):
            logits, cache = dec.decode_step(ids[:, pos], jnp.int32(pos), cache)
            out.append(logits)
        return jnp.stack(out, 1)

    np.testing.assert_allclose(np.asarray(steps(decoder, jnp.asarray(ids), jnp.asarray(context), cmask)), full,
                               atol=PARITY_ATOL, rtol=0)


def test_report_decoder_visual_side():
    """Projection + resampler: any visual width and token count; masked tokens do not matter."""
    cfg = ReportDecoderConfig.from_size("tiny", vocab_size=40, visual_width=24, resampler_latents=5,
                                        hidden_dropout=0.0, attention_dropout=0.0)
    model = ReportDecoder(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    visual = rng.normal(size=(2, 11, 24)).astype(np.float32)
    mask = np.ones((2, 11), bool)
    mask[1, 6:] = False
    ids = rng.integers(0, 40, (2, 6))
    context, cmask = model.encode_visual(jnp.asarray(visual), mask)
    assert context.shape == (2, 5, cfg.hidden_size) and cmask is None
    logits = model(jnp.asarray(ids), jnp.asarray(visual), mask)
    assert logits.shape == (2, 6, 40) and np.isfinite(np.asarray(logits)).all()
    changed = visual.copy()
    changed[1, 6:] = 100.0  # only masked tokens of example 1
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids), jnp.asarray(changed), mask)), np.asarray(logits),
                               atol=1e-5)
    with pytest.raises(ValueError, match="visual_width"):
        model(jnp.asarray(ids), jnp.zeros((2, 11, 23)))


def test_sizes_and_bad_checkpoints(tmp_path, hf_dir):
    base = ReportDecoderConfig.from_size("base")
    assert (base.hidden_size, base.num_layers, base.num_heads, base.mlp_dim) == (768, 12, 12, 3072)
    with pytest.raises(ValueError, match="unknown report decoder size"):
        ReportDecoderConfig.from_size("huge")
    # A GPT-2 without cross-attention: the importer names what is missing.
    plain = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH,
                                                                 n_layer=1, n_head=HEADS))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(KeyError, match="add_cross_attention"):
        convert.hf_gpt2_state(tmp_path / "plain")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint"):
        convert.hf_gpt2_state(tmp_path / "bert")
    # Into a ReportDecoder with a resampler: only the text part is imported.
    path, _ = hf_dir
    model = convert.load_hf_gpt2(path, visual_width=20, resampler_latents=3)
    assert model.visual_proj.kernel.shape == (20, WIDTH) and model.resampler is not None
    assert jax.tree.leaves(nnx.state(model.text, nnx.Param))
