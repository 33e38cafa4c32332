"""launch/evaluate.py's engine: params-only restore, embedding, files, table, periodic evaluators.

Checkpoints are written straight from the training program (init, then a perturbed copy)
instead of training, so the test is about evaluation plumbing: the figures in the files
must be what the restored parameters produce on the evaluated split (recomputed here
from the in-memory model, independently of the evaluation code) and must agree with each
other.
"""

from __future__ import annotations

import csv
import json
import math

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from configs.t3d import get_config
from t3d_jax.data.labels import CT_RATE_LABELS
from t3d_jax.data.tokenizer import tokenizer_for_config
from t3d_jax.evaluate import embedding, registry, run, zeroshot
from t3d_jax.train import checkpoint as ckpt_lib
from t3d_jax.train import mesh as mesh_lib
from t3d_jax.train import step as step_lib
from t3d_jax.utils import UserFileNotFoundError, UserValueError

# The reference runs the model eagerly on other batch sizes: float32 reassociation, ~1e-6 in
# a cosine, times a logit scale of ~14, halved by the softmax slope: well under 2e-5.
SCORE_TOL = 2e-5


def tiny_config(data_dir):
    c = get_config("tiny")
    c.data.dir = str(data_dir)
    c.preprocess.max_len = 16
    c.eval.batch_size = 4
    c.eval.num_bootstrap = 40
    c.checkpoint.async_save = False
    return c


def write_checkpoints(config, workdir, steps_and_scales):
    """Saves the initial params scaled by each factor at each step; returns the states."""
    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        program = step_lib.make_train_program(config, mesh)
        base = program.init()
    manager = ckpt_lib.make_manager(workdir / "checkpoints", config.checkpoint)
    states = {}
    for step, scale in steps_and_scales:
        state = dict(base, params=jax.tree.map(lambda p: p * scale, base["params"]))
        ckpt_lib.save(manager, step, state, None, force=True)
        states[step] = state
    manager.wait_until_finished()
    manager.close()
    return program, states


@pytest.fixture(scope="module")
def trained(tiny_prepared_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval_run")
    config = tiny_config(tiny_prepared_dir)
    program, states = write_checkpoints(config, workdir, [(3, 1.0), (7, 1.3)])
    return config, workdir, program, states


def reference_scores(program, state, config):
    """Zero-shot scores computed directly: model from the saved state, eval pipeline, prompts."""
    from t3d_jax.data.pipeline import eval_iterator

    model = program.model(state)
    tok = tokenizer_for_config(config)
    pos, neg = zeroshot.build_prompts(CT_RATE_LABELS)
    ids, mask = tok.encode(pos + neg)
    text = np.asarray(model.embed_text(ids, mask))
    vols, vids = [], []
    for batch in eval_iterator(config.data, "valid", 8):
        keep = np.asarray(batch["valid"], bool)
        vols.append(np.asarray(model.embed_volume(batch["volume"]))[keep])
        vids += [str(i) for i in np.asarray(batch["id"])[keep]]
    scale = math.exp(min(float(np.asarray(model.logit_scale[...])), math.log(config.loss.logit_scale_max)))
    vol = np.concatenate(vols).astype(np.float64)
    logits = scale * np.stack([vol @ text[:18].T, vol @ text[18:].T], -1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return vids, (probs / probs.sum(-1, keepdims=True))[..., 0]


def read_predictions(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    ids = [r["id"] for r in rows]
    scores = np.array([[float(r[f"score:{n}"]) for n in CT_RATE_LABELS] for r in rows])
    labels = np.array([[float(r[f"label:{n}"]) for n in CT_RATE_LABELS] for r in rows])
    return ids, scores, labels


def test_latest_checkpoint_files_and_figures(trained, capsys):
    config, workdir, program, states = trained
    metrics, out = run.evaluate_checkpoint(config, workdir)
    assert out == workdir / "eval" / "7"
    for name in ("metrics.json", "per_label.csv", "predictions.csv", "roc_grid.png", "retrieval_recall.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "roc_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # predictions.csv holds what the restored step-7 parameters produce.
    ids, scores, labels = read_predictions(out / "predictions.csv")
    ref_ids, ref = reference_scores(program, states[7], config)
    assert ids == ref_ids and len(ids) == 8
    np.testing.assert_allclose(scores, ref, atol=SCORE_TOL)

    # metrics.json agrees with an independent recomputation from predictions.csv.
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["step"] == 7 and saved["split"] == "valid" and saved["num_volumes"] == 8
    aucs = [roc_auc_score(labels[:, c], scores[:, c]) for c in range(18) if len(set(labels[:, c])) == 2]
    assert saved["zeroshot"]["num_labels_in_mean"] == len(aucs)
    # predictions.csv keeps 9 significant digits, so the recomputation is exact but for rounding.
    assert saved["zeroshot"]["mean"]["auc"]["value"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert saved["zeroshot"]["num_bootstrap"] == 40
    assert set(saved["retrieval"]["report_to_volume"]) == {"R@1", "R@5", "R@10", "R@50", "R@100"}
    assert "zeroshot_leakfree" in saved and "train" in saved["zeroshot_leakfree"]["thresholds_from"]
    assert "linear_probe" in saved
    assert 0.0 <= saved["zeroshot_reports"]["mean_auc"] <= 1.0
    # Labels with one class only carry null (JSON has no NaN), never a number.
    never = CT_RATE_LABELS[17]
    assert saved["zeroshot"]["per_label"][never]["auc"]["value"] is None

    with open(out / "per_label.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == list(CT_RATE_LABELS)
    table = capsys.readouterr().out
    assert "MEAN" in table and "roc_grid.png" in table and "Retrieval report to volume" in table


def test_the_ceiling_is_shown_beside_zero_shot(trained, tmp_path, capsys):
    """eval.ceiling (a bench/ceiling.py result for this data) adds a CEIL column and line."""
    from t3d_jax.data.prepared import data_fingerprint

    config, workdir, _, _ = trained
    per_label = {n: {"auc": {"value": 0.5 + 0.01 * i}} for i, n in enumerate(CT_RATE_LABELS)}
    result = {"data": "elsewhere", "data_fingerprint": data_fingerprint(config.data.dir),
              "supervised": {"mean": {"auc": {"value": 0.585, "ci_low": 0.5, "ci_high": 0.6}},
                             "per_label": per_label},
              "pooled_lr": {"mean": {"auc": {"value": 0.7}}}}
    (tmp_path / "ceiling.json").write_text(json.dumps(result))
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval.ceiling = str(tmp_path / "ceiling.json")
    metrics, _ = run.evaluate_checkpoint(config, workdir, step=3)
    assert metrics["ceiling"]["same_data"] and metrics["ceiling"]["mean_auc"] == 0.585
    table = capsys.readouterr().out
    assert "CEIL" in table and "measured on this data" in table and "  0.510\n" in table  # label 1's ceiling, last column


def test_explicit_checkpoint_step_and_errors(trained):
    config, workdir, program, states = trained
    metrics, out = run.evaluate_checkpoint(config, workdir, step=3)
    assert out.name == "3"
    _, scores, _ = read_predictions(out / "predictions.csv")
    _, ref = reference_scores(program, states[3], config)
    np.testing.assert_allclose(scores, ref, atol=SCORE_TOL)
    with pytest.raises(UserFileNotFoundError, match=r"no checkpoint at step 5; have \[3, 7\]"):
        run.evaluate_checkpoint(config, workdir, step=5)
    with pytest.raises(UserFileNotFoundError, match="nowhere/checkpoints: no checkpoint folder; train first"):
        run.evaluate_checkpoint(config, workdir / "nowhere")
    assert not (workdir / "nowhere").exists()  # looking never creates the folder
    other = tiny_config(config.data.dir)
    other.model.embed_dim = 16  # another model than the one saved
    with pytest.raises(UserValueError, match=r"does not fit this config's model: .*image_proj/kernel saved"):
        run.evaluate_checkpoint(other, workdir)


def test_evaluation_ignores_the_optimizer_settings(trained, tmp_path):
    """Only the parameters are read: another optimizer (whose state would have another tree,
    e.g. flattened AdamW groups) evaluates the same checkpoint to the same scores."""
    config, workdir, program, states = trained
    other = tiny_config(config.data.dir)
    other.optim.lr = 0.5
    other.optim.schedule = "constant"
    other.optim.warmup_steps = 0
    other.optim.weight_decay = 0.3
    other.optim.flatten = "on"
    other.checkpoint.dir = str(workdir / "checkpoints")  # the run's checkpoints, files elsewhere
    other.eval.num_bootstrap = 0
    metrics, out = run.evaluate_checkpoint(other, tmp_path, step=3)
    assert out == tmp_path / "eval" / "3"
    _, scores, _ = read_predictions(out / "predictions.csv")
    _, ref = reference_scores(program, states[3], config)
    np.testing.assert_allclose(scores, ref, atol=SCORE_TOL)


def _count_embedded_splits(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = embedding.embed_split
    monkeypatch.setattr(embedding, "embed_split", lambda e, d, split, b: calls.append(split) or real(e, d, split, b))
    return calls


def _context(config, program, state, workdir, step):
    return registry.EvalContext(model=program.model(state), config=config, step=step, workdir=str(workdir),
                                mesh=mesh_lib.make_mesh(config.mesh))


def test_periodic_evaluators_share_one_embedding_pass(trained, monkeypatch):
    config, workdir, program, states = trained
    calls = _count_embedded_splits(monkeypatch)
    ctx = _context(config, program, states[7], workdir, 11)
    out = registry.run_evaluators(("zeroshot", "retrieval", "linear_probe"), ctx)
    assert sorted(calls) == ["train", "valid"]  # once per split, not once per evaluator
    assert 0.0 <= out["eval/zeroshot/mean_auc"] <= 1.0
    assert "eval/zeroshot/leakfree_mean_accuracy" in out
    assert "eval/retrieval/report_to_volume/R@5" in out
    assert "eval/linear_probe/mean_auc" in out
    assert not (workdir / "eval" / "11").exists()  # scalar evaluators write no files
    np.testing.assert_equal(registry.run_evaluators(("retrieval", "zeroshot"), ctx),  # NaN == NaN here
                            {k: v for k, v in out.items() if not k.startswith("eval/linear_probe")})
    assert sorted(calls) == ["train", "valid"]  # the context's cache answered

    # Other parameters of the same model: a new context embeds again (nothing is cached by
    # model identity) and reuses the compiled embedding programs (one per model structure).
    compiled = embedding._apply._cache_size()
    ctx3 = _context(config, program, states[3], workdir, 12)
    registry.run_evaluators(("zeroshot",), ctx3)
    assert sorted(calls) == ["train", "train", "valid", "valid"]
    assert np.abs(ctx3.cache.evaluated()["volume"] - ctx.cache.evaluated()["volume"]).max() > 1e-4
    assert embedding._apply._cache_size() == compiled


def test_retrieval_alone_embeds_only_the_evaluated_split(trained, monkeypatch):
    config, workdir, program, states = trained
    calls = _count_embedded_splits(monkeypatch)

    def no_prompts(self, texts):
        raise AssertionError("retrieval embedded free texts (prompts)")

    monkeypatch.setattr(embedding.EmbeddingCache, "texts", no_prompts)
    out = registry.run_evaluators(("retrieval",), _context(config, program, states[7], workdir, 13))
    assert calls == ["valid"]
    assert set(out) == {f"eval/retrieval/{d}/R@{k}" for d in ("report_to_volume", "volume_to_report")
                        for k in (1, 5, 10, 50, 100)}


def test_full_evaluator_writes_the_files_of_launch_evaluate(trained):
    config, workdir, program, states = trained
    out = registry.run_evaluators(("full",), _context(config, program, states[7], workdir, 14))
    assert 0.0 <= out["eval/full/zeroshot/mean_auc"] <= 1.0
    saved = json.loads((workdir / "eval" / "14" / "metrics.json").read_text())
    assert saved["step"] == 14 and saved["zeroshot"]["num_bootstrap"] == 40
    assert out["eval/full/retrieval/report_to_volume/R@1"] == saved["retrieval"]["report_to_volume"]["R@1"]
