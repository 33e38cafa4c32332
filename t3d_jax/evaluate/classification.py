"""Held-out scoring of a model trained on the labels (the `supervised` task: the ceiling, the
classification fine-tune), shared by `bench/ceiling.py` and `bench/label_efficiency.py`.

* `score_checkpoint`: restore a run's parameters (`t3d_jax.train.params.restore_model`) and
  score every volume of a split -- whole volumes at the view size
  (`t3d_jax.data.pipeline.eval_iterator`), `model.predict_labels` (sigmoid probabilities).
* per-label AUC with bootstrap intervals is `t3d_jax.evaluate.zeroshot.evaluate_scores` (the
  evaluators' own code), called by the benches on these scores.
* `paired_auc_difference`: the AUC difference of two models scored on the same volumes, per
  label and its mean, with a paired bootstrap (the same resampled volumes score both sides,
  as `t3d_jax.evaluate.compare` does for methods).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

from t3d_jax.evaluate.compare import auc_per_label


def iterate_split(config, split: str, batch_size: int):
    """(volumes [N, X, Y, Z, C] float32, labels [N, L], ids) of every record of `split`."""
    from t3d_jax.data.pipeline import eval_iterator

    volumes, labels, ids = [], [], []
    for batch in eval_iterator(config.data, split, batch_size, worker_count=0):
        keep = np.asarray(batch["valid"], bool)
        volumes.append(np.asarray(batch["volume"])[keep])
        labels.append(np.asarray(batch["labels"], np.float32)[keep])
        ids += [str(i) for i in np.asarray(batch["id"])[keep]]
    return np.concatenate(volumes), np.concatenate(labels), ids


def predict(model, volumes: np.ndarray, batch_size: int) -> np.ndarray:
    """[N, L] probabilities of `model.predict_labels` (jitted, fixed batch shape)."""
    import jax
    from flax import nnx

    fn = nnx.jit(lambda m, v: m.predict_labels(v))
    out = []
    for start in range(0, len(volumes), batch_size):
        chunk = volumes[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(jax.device_get(fn(model, chunk)))[:batch_size - pad])
    return np.concatenate(out).astype(np.float64)


def score_checkpoint(config, workdir, split: str, batch_size: int, *, step: int | None = None,
                     data: tuple | None = None) -> dict:
    """{scores [N, L], labels [N, L], ids, volumes, step}: the run in `workdir` (its checkpoint
    `step`, newest when None) scored on `split`. `data` = an `iterate_split` result to reuse
    (several runs scored on one split read it once)."""
    import jax

    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import params as params_lib

    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        model, restored = params_lib.restore_model(config, params_lib.checkpoint_dir(config, workdir),
                                                   step, mesh=mesh)
        volumes, labels, ids = data if data is not None else iterate_split(config, split, batch_size)
        scores = predict(model, volumes, batch_size)
    return {"scores": scores, "labels": labels, "ids": ids, "volumes": volumes, "step": int(restored)}


def _interval(values: np.ndarray, alpha: float) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [math.nan, math.nan]
    return [float(np.quantile(finite, alpha / 2)), float(np.quantile(finite, 1 - alpha / 2))]


def paired_auc_difference(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray,
                          label_names: Sequence[str], *, num_bootstrap: int = 1000, seed: int = 0,
                          confidence: float = 0.95) -> dict:
    """AUC(a) - AUC(b) per label and over the labels' mean, both scored on the same volumes,
    with (confidence) intervals from one paired bootstrap over volumes. The mean is over the
    labels with both classes on the whole set (as `evaluate_scores`' mean); a resample in which
    a label lacks a class leaves that label out of that resample's mean.

    Returns {"per_label": {name: {"value", "ci"}}, "mean": {"value", "ci"}, "num_bootstrap"}."""
    labels = np.asarray(labels, np.float64)
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != labels.shape or b.shape != labels.shape or labels.shape[1] != len(label_names):
        raise ValueError(f"scores {a.shape}, {b.shape} and labels {labels.shape} must all be [N, {len(label_names)}]")
    n = len(labels)
    alpha = 1.0 - confidence
    point = auc_per_label(labels, a) - auc_per_label(labels, b)
    defined = np.isfinite(point)
    rng = np.random.default_rng(seed)
    diffs = np.full((num_bootstrap, labels.shape[1]), math.nan)
    for i in range(num_bootstrap):
        idx = rng.integers(0, n, n)
        diffs[i] = auc_per_label(labels[idx], a[idx]) - auc_per_label(labels[idx], b[idx])
    with warnings.catch_warnings():  # a resample may lack a class of every defined label
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(np.where(defined[None], diffs, np.nan), axis=1) if defined.any() else np.array([])
    return {
        "per_label": {name: {"value": float(point[c]), "ci": _interval(diffs[:, c], alpha)}
                      for c, name in enumerate(label_names)},
        "mean": {"value": float(np.mean(point[defined])) if defined.any() else math.nan,
                 "ci": _interval(means, alpha)},
        "num_labels_in_mean": int(defined.sum()),
        "num_bootstrap": int(num_bootstrap),
        "confidence": confidence,
    }


def format_ci(entry: dict) -> str:
    """'0.812 [0.790, 0.833]' of an `evaluate_scores` {value, ci_low, ci_high} entry ('n/a' when
    undefined, no bracket when the interval is)."""
    v, lo, hi = entry["value"], entry.get("ci_low"), entry.get("ci_high")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "   n/a"
    ci = "" if lo is None or (isinstance(lo, float) and math.isnan(lo)) else f" [{lo:.3f}, {hi:.3f}]"
    return f"{v:.3f}{ci}"
