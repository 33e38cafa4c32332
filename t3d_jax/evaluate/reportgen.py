"""The `reportgen` evaluator: reports generated for the held-out volumes, scored against theirs.

For every volume of the evaluated split (`eval.split`, else `data.eval_split`) the model of the
`reportgen` task decodes a report (`config.generate`: greedy, beam or top-p; one compiled
program, batches padded to a fixed size and split over the data-parallel devices), and the
reports are scored against the record's raw report text (never cut to `max_len`):

* language: BLEU-1..4, METEOR, ROUGE-L and CIDEr (`language_metrics`, pycocoevalcap on
  R2Gen-cleaned text; METEOR NaN with a logged reason where Java is missing);
* clinical efficacy: the rule labeler's 18 findings of generated against reference reports,
  precision / recall / F1 macro and micro over labels and per label (`report_labeler`).

Intervals (a final evaluation: launch/evaluate.py, or `ctx.write`): `eval.reportgen_num_bootstrap`
resamples of the volumes (default 200) for BLEU, ROUGE-L, CIDEr and the CE figures (METEOR runs a
JVM per call and has none). Files (process 0, `ctx.write`) in WORKDIR/eval/STEP/reportgen/:
`metrics.json`, `ce_per_label.csv` and `generated.jsonl` (id, reference, generated).

`generate_ids` decodes one batch (split over a mesh's data-parallel devices); `score_reports` is
the scoring alone, shared with bench/reportgen_baselines.py (which also scores the
nearest-neighbour baseline, `nearest_neighbour_reports`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import pathlib
from typing import Sequence

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from t3d_jax.evaluate import language_metrics as lm
from t3d_jax.evaluate import report_labeler
from t3d_jax.evaluate.embedding import pad_and_place
from t3d_jax.evaluate.registry import EvalContext, register_evaluator
from t3d_jax.models.decoding import DecodeConfig, decode
from t3d_jax.train import mesh as mesh_lib
from t3d_jax.utils import cfg_get

log = logging.getLogger(__name__)

CE_FIGURES = ("precision_macro", "recall_macro", "f1_macro", "precision_micro", "recall_micro", "f1_micro")
BOOTSTRAPPED = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr") + tuple(f"CE_{k}" for k in CE_FIGURES)


class _Resampled:
    """Per-report pieces of the language metrics, computed once, so that a bootstrap resample's
    figures need no re-tokenising: BLEU through pycocoevalcap's own `BleuScorer` on the
    resampled cooked (test, refs) pairs (its corpus aggregation: the point estimate is exactly
    `Bleu(4)`'s), ROUGE-L and CIDEr as the mean of the per-report scores (their corpus figure
    is that mean; CIDEr's document frequencies stay those of the whole evaluated set, as the
    zero-shot bootstrap holds its thresholds fixed)."""

    def __init__(self, references: Sequence[str], generated: Sequence[str]):
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        ids = [str(i) for i in range(len(references))]
        gts = {i: [lm.clean_report(r)] for i, r in zip(ids, references)}
        res = {i: [lm.clean_report(g)] for i, g in zip(ids, generated)}
        self.bleu = BleuScorer(n=4)
        for i in ids:
            self.bleu += (res[i][0], gts[i])
        self.rouge = np.asarray(Rouge().compute_score(gts, res)[1], np.float64)
        self.cider = np.asarray(Cider().compute_score(gts, res)[1], np.float64)

    def figures(self, idx: np.ndarray) -> dict[str, float]:
        sub = self.bleu.copy()
        sub.crefs = [self.bleu.crefs[i] for i in idx]
        sub.ctest = [self.bleu.ctest[i] for i in idx]
        bleu, _ = sub.compute_score(option="closest", verbose=0)
        return {**{f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)},
                "ROUGE_L": float(self.rouge[idx].mean()), "CIDEr": float(self.cider[idx].mean())}


def _ce_figures(truth: np.ndarray, pred: np.ndarray) -> tuple[dict, dict]:
    ce = report_labeler.ce_scores(truth, pred)
    return {f"CE_{k}": ce[k] for k in CE_FIGURES}, ce


def score_reports(references: Sequence[str], generated: Sequence[str], *, num_bootstrap: int = 0,
                  seed: int = 0, alpha: float = 0.05, meteor: bool = True) -> dict:
    """Language and clinical-efficacy figures of `generated` against `references` (same order).

    Returns `{"figures": {name: value}, "intervals": {name: [low, high]}, "ce_per_label": {...},
    "num_reports": N}`; intervals are percentile intervals over `num_bootstrap` resamples of the
    reports (none when 0; see `_Resampled` for how the language figures are resampled).
    """
    references, generated = [str(r) for r in references], [str(g) for g in generated]
    if len(references) != len(generated) or not references:
        raise ValueError(f"score_reports: {len(generated)} generated reports for {len(references)} references")
    truth = report_labeler.label_reports(references)
    pred = report_labeler.label_reports(generated)
    ids = [str(i) for i in range(len(references))]
    figures = lm.language_metrics(dict(zip(ids, references)), dict(zip(ids, generated)), meteor=meteor)
    ce_figs, ce = _ce_figures(truth, pred)
    figures.update(ce_figs)
    intervals: dict[str, list[float]] = {}
    if num_bootstrap > 0:
        resampled = _Resampled(references, generated)
        rng = np.random.default_rng(seed)
        n = len(references)
        samples = {k: [] for k in BOOTSTRAPPED}  # figure names as in `figures`
        for _ in range(int(num_bootstrap)):
            idx = rng.integers(0, n, n)
            f = {**resampled.figures(idx), **_ce_figures(truth[idx], pred[idx])[0]}
            for name in samples:
                samples[name].append(f[name])
        for name, values in samples.items():
            v = np.asarray(values, np.float64)
            v = v[np.isfinite(v)]
            intervals[name] = ([float(np.percentile(v, 100 * alpha / 2)), float(np.percentile(v, 100 * (1 - alpha / 2)))]
                               if v.size else [math.nan, math.nan])
    return {"figures": figures, "intervals": intervals, "ce_per_label": ce["per_label"],
            "labels_without_positives": ce["labels_without_positives"], "num_reports": len(references)}


def nearest_neighbour_reports(query_emb: np.ndarray, bank_emb: np.ndarray, bank_reports: Sequence[str]) -> list[str]:
    """The classic retrieval baseline: for each query volume, the report of the most similar
    bank volume (cosine of L2-normalised image embeddings; ties to the first)."""
    q = np.asarray(query_emb, np.float64)
    b = np.asarray(bank_emb, np.float64)
    if q.ndim != 2 or b.ndim != 2 or q.shape[1] != b.shape[1] or len(b) != len(bank_reports):
        raise ValueError(f"nearest_neighbour_reports: query {q.shape}, bank {b.shape} with "
                         f"{len(bank_reports)} reports do not fit")
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return [str(bank_reports[j]) for j in np.argmax(q @ b.T, axis=1)]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(graphdef, dcfg: DecodeConfig, state, volume, rng):
    model = nnx.merge(graphdef, state)
    tokens, mask = model.visual(volume)
    return decode(model.decoder, tokens, mask, config=dcfg, rng=rng)["tokens"]


def generate_ids(model, volume: np.ndarray, dcfg: DecodeConfig, *, mesh=None, rules=None,
                 seed: int = 0) -> np.ndarray:
    """Token ids [B, max_new_tokens] generated for volumes [B, X, Y, Z, C] (EOS, then padding).

    With a `mesh` the batch is padded to a multiple of the data-parallel devices and split over
    them (the `batch` sharding rule of `rules`), the model's parameters as they are sharded. One
    compiled program per (model structure, decode config, batch shape); every example's output
    is independent of the rest of its batch (decoding.py), so padding rows change nothing.
    """
    graphdef, state = nnx.split(model)
    volume = np.asarray(volume, np.float32)
    if mesh is None:
        placed, n = jnp.asarray(volume), volume.shape[0]
    else:
        placed, n = pad_and_place(volume, max(1, mesh_lib.data_parallel_size(mesh, rules)),
                                  mesh_lib.batch_sharding(mesh, rules, 1))
    # Sampling: row i draws from fold_in(key(seed), i), so padding never changes a row's draws.
    rng = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(placed.shape[0]))
    if mesh is None:
        return np.asarray(_generate(graphdef, dcfg, state, placed, rng))
    with jax.set_mesh(mesh):
        ids = _generate(graphdef, dcfg, state, placed, rng)
    ids = multihost_utils.process_allgather(ids, tiled=True) if jax.process_count() > 1 else ids
    return np.asarray(ids)[:n]


def generate_split(model, config, mesh, split: str) -> dict[str, list[str]]:
    """`{"id", "reference", "generated"}` for every record of `split`, in stored order."""
    from t3d_jax.data.pipeline import eval_iterator
    from t3d_jax.data.tokenizer import tokenizer_for_config
    from t3d_jax.tasks.reportgen import decode_config, ids_to_text

    tokenizer = tokenizer_for_config(config)
    dcfg = decode_config(config, tokenizer)
    batch_size = int(cfg_get(cfg_get(config, "generate"), "batch_size", 16))
    out = {"id": [], "reference": [], "generated": []}
    for batch in eval_iterator(config.data, split, batch_size, worker_count=0):
        valid = np.asarray(batch["valid"], bool)
        if not valid.any():
            continue
        rows = generate_ids(model, batch["volume"], dcfg, mesh=mesh, rules=config.sharding_rules,
                            seed=int(cfg_get(config, "seed", 0)))
        texts = ids_to_text(tokenizer, rows[valid])
        out["id"] += [str(i) for i in np.asarray(batch["id"])[valid]]
        out["reference"] += [str(r) for r in np.asarray(batch["report"])[valid]]
        out["generated"] += texts
    if not out["id"]:
        raise ValueError(f"{config.data.dir}: split {split!r} has no records to generate reports for")
    return out


def write_outputs(out_dir, scored: dict, generated: dict) -> pathlib.Path:
    """metrics.json, ce_per_label.csv and generated.jsonl into `out_dir`."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(scored, indent=2, allow_nan=True))
    with open(out / "ce_per_label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "precision", "recall", "f1", "support", "predicted"])
        for name, e in scored["ce_per_label"].items():
            w.writerow([name, e["precision"], e["recall"], e["f1"], e["support"], e["predicted"]])
    with open(out / "generated.jsonl", "w") as f:
        for i, ref, gen in zip(generated["id"], generated["reference"], generated["generated"]):
            f.write(json.dumps({"id": i, "reference": ref, "generated": gen}) + "\n")
    return out


@register_evaluator("reportgen")
def reportgen_evaluator(ctx: EvalContext) -> dict[str, float]:
    """Generate for the evaluated split and score (module docstring); scalars for the logs."""
    config = ctx.config
    split = str(cfg_get(cfg_get(config, "eval"), "split", "") or config.data.eval_split)
    generated = generate_split(ctx.model, config, ctx.mesh, split)
    boots = int(cfg_get(config.eval, "reportgen_num_bootstrap", 200)) if ctx.write else 0
    scored = score_reports(generated["reference"], generated["generated"], num_bootstrap=boots,
                           meteor=bool(ctx.write or cfg_get(config.eval, "reportgen_meteor_periodic", False)))
    scored.update(step=int(ctx.step), split=split, decoding=dict(cfg_get(config, "generate", {}) or {}))
    if ctx.write and jax.process_index() == 0:
        out = write_outputs(pathlib.Path(ctx.workdir) / "eval" / str(ctx.step) / "reportgen", scored, generated)
        log.info("reportgen: wrote %s/metrics.json, ce_per_label.csv, generated.jsonl", out)
    return {k: v for k, v in scored["figures"].items() if not (isinstance(v, float) and math.isnan(v))}


def format_table(scored: dict) -> str:
    """The figures with their intervals, then CE per label."""
    lines = [f"Report generation: {scored['num_reports']} '{scored.get('split', '')}' volumes, step "
             f"{scored.get('step', '?')} [95% bootstrap CI]"]
    for name, value in scored["figures"].items():
        ci = scored["intervals"].get(name)
        lines.append(f"  {name:<20}{value:.4f}" + (f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
    lines.append(f"  {'CE per label':<34}{'P':>7}{'R':>7}{'F1':>7}{'n+':>6}")
    for name, e in scored["ce_per_label"].items():
        lines.append(f"  {name:<34}{e['precision']:>7.3f}{e['recall']:>7.3f}{e['f1']:>7.3f}{e['support']:>6}")
    return "\n".join(lines)


def evaluate_checkpoint(config, workdir, *, step: int | None = None, split: str | None = None):
    """launch/evaluate.py for a `reportgen` run: restore, generate for the evaluated split, score
    with intervals, write WORKDIR/eval/STEP/reportgen/, print the table."""
    from t3d_jax.evaluate.run import restored_context

    ctx = restored_context(config, workdir, step=step, split=split)
    figures = reportgen_evaluator(ctx)
    out = pathlib.Path(workdir) / "eval" / str(ctx.step) / "reportgen"
    if jax.process_index() == 0:
        print(format_table(json.loads((out / "metrics.json").read_text())))
        print(f"Wrote {out}/metrics.json, ce_per_label.csv, generated.jsonl")
    return figures, out
