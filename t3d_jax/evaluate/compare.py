"""Paired comparison of methods on the same evaluated volumes, with bootstrap intervals.

The method-comparison harness (`bench/compare_methods.py`) trains every method on the same
data, steps and seeds and asks here: is method A better than the baseline, and by how much?
Each (method, seed) gives per-volume predictions on one evaluated split (`predictions`):
zero-shot scores, linear-probe scores and the report->volume rank of every volume's
report. A figure of a method is its mean over seeds; the interval of a *difference* comes
from one bootstrap over volumes shared by every method and seed (a paired bootstrap: the
same resampled volumes score both sides, so volume difficulty cancels out of the difference).

Figures: mean zero-shot AUC, mean probe AUC (over the labels with both classes), R@5 of
report->volume retrieval, and the zero-shot AUC of each label.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy.stats import rankdata

from t3d_jax.evaluate import linear_probe, zeroshot
from t3d_jax.evaluate.embedding import EmbeddingCache
from t3d_jax.evaluate.retrieval import partner_ranks

FIGURES = ("zeroshot_auc", "probe_auc", "R@5")


def predictions(cache: EmbeddingCache) -> dict[str, np.ndarray]:
    """Per-volume predictions of the cache's model on its evaluated split (`config.eval`
    templates, logit scale and probe settings, as the evaluators use them)."""
    evaluated = cache.evaluated()
    templates = tuple(cache.setting("templates", zeroshot.DEFAULT_TEMPLATES))
    positive, negative = zeroshot.prompt_embeddings(cache.texts, cache.label_names, templates)
    scores = zeroshot.pair_softmax_scores(evaluated["volume"], positive, negative, cache.logit_scale())
    out = {"labels": evaluated["labels"], "id": evaluated["id"], "zeroshot": scores,
           "r2v_rank": partner_ranks(evaluated["volume"], evaluated["text"])["report_to_volume"]}
    train = cache.other_split(cache.setting("probe_split", "train"))
    if train is not None:
        out["probe"] = linear_probe.linear_probe(
            train["volume"], train["labels"], evaluated["volume"], evaluated["labels"], cache.label_names,
            C=float(cache.setting("probe_C", 1.0)))["scores"]
    return out


def auc_per_label(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[L] ROC AUC of every column (Mann-Whitney with mid-ranks for ties, as roc_auc_score);
    NaN where a column lacks a class. NaN labels (unknown) are left out per column."""
    labels, scores = np.asarray(labels, np.float64), np.asarray(scores, np.float64)
    out = np.full(labels.shape[1], math.nan)
    for c in range(labels.shape[1]):
        keep = ~np.isnan(labels[:, c]) & ~np.isnan(scores[:, c])
        y, s = labels[keep, c], scores[keep, c]
        pos, neg = int((y == 1).sum()), int((y == 0).sum())
        if pos and neg:
            ranks = rankdata(s)
            out[c] = (ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg)
    return out


def _figures(pred: dict[str, np.ndarray], idx: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    labels = pred["labels"][idx]
    per_label = auc_per_label(labels, pred["zeroshot"][idx])
    figs = {"zeroshot_auc": float(np.nanmean(per_label)) if np.isfinite(per_label).any() else math.nan,
            "R@5": float(np.mean(pred["r2v_rank"][idx] < 5))}
    if "probe" in pred:
        probe = auc_per_label(labels, pred["probe"][idx])
        figs["probe_auc"] = float(np.nanmean(probe)) if np.isfinite(probe).any() else math.nan
    return figs, per_label


def _over_seeds(runs: Sequence[dict], idx: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    figs = [_figures(r, idx) for r in runs]
    mean = {k: float(np.mean([f[0][k] for f in figs])) for k in figs[0][0]}
    with warnings.catch_warnings():  # a label without both classes in a resample: NaN, left out
        warnings.simplefilter("ignore", RuntimeWarning)
        per_label = np.nanmean(np.stack([f[1] for f in figs]), axis=0)
    return mean, per_label


def compare(runs: dict[str, Sequence[dict]], label_names: Sequence[str], *, baseline: str,
            num_bootstrap: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Figures of every method (mean over its seeds) and, for every other method, its
    difference to `baseline` with a paired-bootstrap (1 - alpha) interval.

    runs: method -> one `predictions` dict per seed, all on the same volumes in the same order.
    """
    ids = [r["id"] for rs in runs.values() for r in rs]
    if any(len(i) != len(ids[0]) or np.any(i != ids[0]) for i in ids):
        raise ValueError("compare: every run must be evaluated on the same volumes in the same order")
    n = len(ids[0])
    everything = np.arange(n)
    point = {m: _over_seeds(rs, everything) for m, rs in runs.items()}
    rng = np.random.default_rng(seed)
    samples = {m: [] for m in runs}
    for _ in range(num_bootstrap):
        idx = rng.integers(0, n, n)
        for m, rs in runs.items():
            samples[m].append(_over_seeds(rs, idx))

    def interval(values: np.ndarray) -> list[float]:
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return [math.nan, math.nan]
        return [float(np.quantile(finite, alpha / 2)), float(np.quantile(finite, 1 - alpha / 2))]

    out = {"num_volumes": n, "num_bootstrap": num_bootstrap, "baseline": baseline,
           "label_names": list(label_names), "methods": {}}
    for m in runs:
        figs, per_label = point[m]
        entry = {"seeds": len(runs[m]), "figures": figs,
                 "per_label_zeroshot_auc": dict(zip(label_names, map(float, per_label)))}
        entry["figure_ci"] = {k: interval(np.array([s[0][k] for s in samples[m]])) for k in figs}
        if m != baseline:
            base_figs, base_labels = point[baseline]
            entry["difference"] = {
                k: {"value": figs[k] - base_figs[k],
                    "ci": interval(np.array([s[0][k] - b[0][k] for s, b in zip(samples[m], samples[baseline])]))}
                for k in figs if k in base_figs}
            diffs = np.stack([s[1] - b[1] for s, b in zip(samples[m], samples[baseline])])
            entry["per_label_difference"] = {
                name: {"value": float(per_label[c] - base_labels[c]), "ci": interval(diffs[:, c])}
                for c, name in enumerate(label_names)}
        out["methods"][m] = entry
    return out


def format_comparison(result: dict) -> str:
    """The console table: per-label zero-shot AUC of every method, then the mean figures with
    the differences to the baseline and their intervals."""
    methods, names = list(result["methods"]), result["label_names"]
    f = lambda v: "  n/a" if v is None or not np.isfinite(v) else f"{v:5.3f}"  # noqa: E731
    width = max(5, *(len(n) for n in names))
    lines = [f"Zero-shot AUC per label ({result['num_volumes']} held-out volumes; mean over seeds)",
             f"{'label':<{width}}  " + "  ".join(f"{m:>8}" for m in methods)]
    for name in names:
        lines.append(f"{name:<{width}}  " + "  ".join(
            f"{f(result['methods'][m]['per_label_zeroshot_auc'][name]):>8}" for m in methods))
    lines.append("")
    lines.append(f"{'figure':<14}" + "".join(f"{m:>22}" for m in methods))
    for k in FIGURES:
        row = f"{k:<14}"
        for m in methods:
            e = result["methods"][m]
            if k not in e["figures"]:
                row += f"{'n/a':>22}"
                continue
            lo, hi = e["figure_ci"][k]
            row += f"{f(e['figures'][k]) + ' [' + f(lo) + ',' + f(hi) + ']':>22}"
        lines.append(row)
    for m in methods:
        if m == result["baseline"]:
            continue
        diff = result["methods"][m]["difference"]
        lines.append(f"{m} - {result['baseline']}: " + "   ".join(
            f"{k} {diff[k]['value']:+.3f} [{diff[k]['ci'][0]:+.3f}, {diff[k]['ci'][1]:+.3f}]" for k in diff))
    return "\n".join(lines)
