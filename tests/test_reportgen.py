"""The `reportgen` task, its decoding entry point and the `reportgen` evaluator.

The decoder and decoding themselves are tested in test_report_decoder.py / test_decoding.py,
the metrics in test_language_metrics.py / test_report_labeler.py; here: the task's loss
against float64 NumPy, generation sharded over 8 devices equal to one device, and the
evaluator's files on a prepared dataset (the raw reports as references).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import reportgen as reportgen_config
from t3d_jax import tasks
from t3d_jax.evaluate import reportgen as rg_eval
from t3d_jax.tasks import reportgen


def _config(data_dir="", max_len=16):
    c = reportgen_config.get_config("tiny")
    c.data.dir = str(data_dir)
    c.data.view_size = (16, 16, 16)
    c.preprocess.max_len = max_len
    c.model.text.max_len = max_len
    c.model.decoder.hidden_size = 32
    c.generate.max_new_tokens = 6
    return c


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny task's model, initialised as one compiled program (eager init is one dispatch
    per initializer: slow on a loaded CPU); shared by the tests below."""
    task = tasks.get_task(_config())
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.split(task.build_model(nnx.Rngs(0)))[1])()
    return nnx.merge(graphdef, state)


def test_lm_loss_matches_float64_numpy():
    """Masked next-token cross-entropy and accuracy against NumPy in float64 (tolerance 1e-5:
    float32 log-softmax over 50 classes)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 50)).astype(np.float32) * 3
    ids = rng.integers(0, 50, (3, 7)).astype(np.int32)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], np.int32)
    loss, metrics = reportgen.lm_loss(jax.numpy.asarray(logits), ids, mask)

    x = logits[:, :-1].astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    target, w = ids[:, 1:], mask[:, 1:].astype(np.float64)
    nll = -np.take_along_axis(logp, target[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)
    acc = ((x.argmax(-1) == target) * w).sum() / w.sum()
    np.testing.assert_allclose(float(metrics["token_accuracy"]), acc, rtol=1e-6)


def test_task_loss_over_views_and_decoder_overrides(tiny_model):
    c = _config()
    c.data.num_views = 2
    task = tasks.get_task(c)
    model = tiny_model
    assert model.decoder.cfg.hidden_size == 32 and model.decoder.cfg.visual_width == model.image_encoder.cfg.width
    spec = task.batch_spec()
    assert spec["views"].shape[:2] == (8, 2) and spec["input_ids"].shape == (8, 16)
    rng = np.random.default_rng(1)
    batch = {"views": rng.normal(size=spec["views"].shape).astype(np.float32),
             "input_ids": rng.integers(5, 900, (8, 16)).astype(np.int32),
             "attention_mask": np.ones((8, 16), np.int32)}
    loss, metrics = nnx.jit(lambda m, b: task.loss(m, b, step=0, deterministic=True))(model, batch)
    # A fresh decoder predicts nearly uniformly over the vocabulary: loss ~ ln V.
    assert abs(float(loss) - np.log(model.decoder.cfg.vocab_size)) < 0.5
    assert set(metrics) >= {"loss", "loss_lm", "token_accuracy"}


def test_generation_sharded_equals_single_device_and_evaluator_writes_files(tiny_model, tiny_prepared_dir,
                                                                              tmp_path):
    """Ids generated with the batch split over 8 devices (padded 5 -> 8 rows) equal those of
    one device; the evaluator scores every held-out record against its raw report and writes
    metrics.json, ce_per_label.csv and generated.jsonl."""
    from t3d_jax.data.tokenizer import tokenizer_for_config
    from t3d_jax.evaluate.registry import EvalContext, get_evaluator
    from t3d_jax.train import mesh as mesh_lib

    c = _config(tiny_prepared_dir)
    c.eval.reportgen_num_bootstrap = 5
    model = tiny_model
    dcfg = reportgen.decode_config(c, tokenizer_for_config(c))
    volume = np.random.default_rng(2).normal(size=(5, 16, 16, 16, 1)).astype(np.float32)
    mesh = mesh_lib.make_mesh(c.mesh)
    assert mesh.size == 8
    single = rg_eval.generate_ids(model, volume, dcfg)
    sharded = rg_eval.generate_ids(model, volume, dcfg, mesh=mesh, rules=c.sharding_rules)
    np.testing.assert_array_equal(single, sharded)
    assert single.shape == (5, 6)

    ctx = EvalContext(model=model, config=c, step=3, workdir=str(tmp_path), mesh=mesh, write=True)
    figures = get_evaluator("reportgen")(ctx)
    assert {"BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr", "CE_f1_macro"} <= set(figures)
    out = tmp_path / "eval" / "3" / "reportgen"
    rows = [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"valid-{k}" for k in range(8)]
    assert all(r["reference"].startswith("blob in octant ") for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_reports"] == 8 and set(metrics["intervals"]) >= {"BLEU_1", "CE_f1_macro"}
    assert (out / "ce_per_label.csv").read_text().splitlines()[0] == "label,precision,recall,f1,support,predicted"


def test_score_reports_perfect_and_intervals():
    refs = ["FINDINGS: Small left pleural effusion. IMPRESSION: Pleural effusion.",
            "FINDINGS: The heart is enlarged. IMPRESSION: Cardiomegaly.",
            "FINDINGS: No effusion. IMPRESSION: Normal chest CT.",
            "FINDINGS: Emphysema in both upper lobes. IMPRESSION: Emphysema."]
    same = rg_eval.score_reports(refs, refs, num_bootstrap=20, meteor=False)
    assert same["figures"]["BLEU_1"] == pytest.approx(1.0) and same["figures"]["ROUGE_L"] == pytest.approx(1.0)
    assert same["figures"]["CE_f1_micro"] == pytest.approx(1.0)
    swapped = rg_eval.score_reports(refs, refs[1:] + refs[:1], num_bootstrap=50, meteor=False)
    assert swapped["figures"]["CE_f1_micro"] < 0.5 and swapped["figures"]["BLEU_4"] < same["figures"]["BLEU_4"]
    lo, hi = swapped["intervals"]["ROUGE_L"]
    assert lo <= swapped["figures"]["ROUGE_L"] <= hi
    with pytest.raises(ValueError, match="generated reports"):
        rg_eval.score_reports(refs, refs[:2])


def test_nearest_neighbour_reports_is_the_brute_force_cosine_argmax():
    rng = np.random.default_rng(3)
    bank, query = rng.normal(size=(30, 8)) * rng.uniform(0.1, 5, (30, 1)), rng.normal(size=(6, 8))
    reports = [f"report {k}" for k in range(30)]
    got = rg_eval.nearest_neighbour_reports(query, bank, reports)
    cos = [[float(q @ b / np.linalg.norm(q) / np.linalg.norm(b)) for b in bank] for q in query]
    assert got == [reports[int(np.argmax(row))] for row in cos]
    with pytest.raises(ValueError, match="do not fit"):
        rg_eval.nearest_neighbour_reports(query, bank, reports[:-1])


def test_init_from_hf_gpt2_dir_fills_the_decoders_text_part(tiny_model, tmp_path):
    """`init_from.hf_gpt2_dir`'s loader (pretrained.apply_flat_state into 'decoder/text') puts
    a Hugging Face GPT-2's weights (random init, cross-attention on) exactly where the decoder
    reads them, and leaves the visual projection alone."""
    import torch
    import transformers

    from t3d_jax.models import convert
    from t3d_jax.train import pretrained

    cfg = tiny_model.decoder.cfg
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_positions=cfg.max_position_embeddings, add_cross_attention=True))
    hf.save_pretrained(tmp_path / "gpt2")
    _, flat = convert.hf_gpt2_state(tmp_path / "gpt2")
    params = nnx.to_pure_dict(nnx.state(tiny_model, nnx.Param))
    shardings = jax.tree.map(lambda x: x.sharding, params)
    out, n = pretrained.apply_flat_state(params, shardings, flat, "decoder/text", "gpt2")
    assert n == len(flat)
    sd = hf.state_dict()
    np.testing.assert_array_equal(np.asarray(out["decoder"]["text"]["wte"]["embedding"]),
                                  sd["transformer.wte.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(out["decoder"]["text"]["blocks"][1]["ln_cross"]["scale"]),
                                  sd["transformer.h.1.ln_cross_attn.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(out["decoder"]["visual_proj"]["kernel"]),
                                  np.asarray(params["decoder"]["visual_proj"]["kernel"]))
    with pytest.raises(KeyError, match="no 'decoder/nothing'"):
        pretrained.apply_flat_state(params, shardings, flat, "decoder/nothing", "gpt2")


def test_generate_reports_for_a_folder_skips_bad_inputs_and_resumes(tiny_model, tmp_path, monkeypatch):
    """launch/generate_reports.py's library call on a folder of NIfTI files: one JSON line per
    readable volume, the unreadable one in OUTPUT.errors.jsonl naming the file, and a rerun
    generates nothing again (ids already in OUTPUT are skipped). The checkpoint restore is
    replaced by the fixture's model: what is tested is the input side."""
    import nibabel as nib

    from t3d_jax import export
    from t3d_jax.train import params as params_lib

    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(rng.normal(-500, 300, (20, 18, 12)).astype(np.int16), np.diag([1.5, 1.5, 3, 1])),
                 folder / f"{name}.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"not a nifti")
    monkeypatch.setattr(params_lib, "restore_model", lambda *a, **k: (tiny_model, 7))
    c = _config()
    out = tmp_path / "reports.jsonl"
    first = export.run_generate_reports(c, tmp_path, folder, out, progress=False)
    assert first == {"written": 2, "skipped_existing": 0, "errors": 1, "step": 7}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and all(isinstance(r["generated"], str) for r in rows)
    errors = [json.loads(line) for line in (tmp_path / "reports.jsonl.errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and "broken.nii.gz" in errors[0]["error"]
    again = export.run_generate_reports(c, tmp_path, folder, out, progress=False)
    assert again["written"] == 0 and again["skipped_existing"] == 2
    assert len(out.read_text().splitlines()) == 2


def test_bootstrap_pieces_reproduce_the_library_figures():
    """The per-report pieces the bootstrap resamples give, on the identity resample, exactly
    the corpus figures pycocoevalcap computes (BLEU by its own aggregation; ROUGE-L and CIDEr
    are means of the per-report scores): tolerance 1e-12."""
    from test_report_labeler import synthetic_reports

    from t3d_jax.evaluate.language_metrics import language_metrics

    refs, _ = synthetic_reports(12, seed=5)
    gens, _ = synthetic_reports(12, seed=6)
    exact = language_metrics(refs, gens, meteor=False)
    got = rg_eval._Resampled(refs, gens).figures(np.arange(12))
    for name, value in got.items():
        assert value == pytest.approx(exact[name], abs=1e-12), name


def test_no_repeat_ngram_ban_matches_brute_force_and_decoding_never_repeats(tiny_model):
    """`ban_repeated_ngrams` bans exactly the tokens a brute-force scan of the known prefix
    finds; greedy decoding with `no_repeat_ngram_size=3` emits no trigram twice, while the
    same random model without the ban does repeat (so the check can fail)."""
    import dataclasses

    from t3d_jax.models.decoding import DecodeConfig, ban_repeated_ngrams

    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 4, (5, 12)).astype(np.int32)
    for n in (2, 3):
        for pos in range(12):
            got = np.asarray(ban_repeated_ngrams(jax.numpy.zeros((5, 4)), tokens, pos, n)) < -1e29
            want = np.zeros((5, 4), bool)
            for r in range(5):
                if pos + 1 >= n - 1:
                    last = tuple(tokens[r, pos - n + 2:pos + 1])
                    for j in range(0, pos - n + 2):
                        if tuple(tokens[r, j:j + n - 1]) == last:
                            want[r, tokens[r, j + n - 1]] = True
            np.testing.assert_array_equal(got, want, err_msg=f"n={n} pos={pos}")

    volume = np.random.default_rng(8).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    plain = DecodeConfig(method="greedy", max_new_tokens=24, bos_id=101, eos_id=102, pad_id=0)

    def trigrams(row):
        return [tuple(row[i:i + 3]) for i in range(len(row) - 2)]

    free = rg_eval.generate_ids(tiny_model, volume, plain)
    assert any(len(set(trigrams(r))) < len(trigrams(r)) for r in free.tolist())
    blocked = rg_eval.generate_ids(tiny_model, volume, dataclasses.replace(plain, no_repeat_ngram_size=3))
    for row in blocked.tolist():
        row = row[:row.index(102)] if 102 in row else row
        assert len(set(trigrams(row))) == len(trigrams(row)), row
