"""Linear probe: one scikit-learn logistic regression per label on frozen volume embeddings.

Fitted on one split (train), scored by ROC AUC on the evaluated split. It measures how
much label information the image tower's embedding carries linearly, independent of the
text tower and of prompt wording (which zero-shot depends on).

The ``linear_probe`` evaluator (bottom) fits on ``eval.probe_split`` (default train) and
scores the evaluated split; it needs both embedded, and nothing else.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from t3d_jax.evaluate.embedding import EmbeddingCache
from t3d_jax.evaluate.registry import EvalContext, register_evaluator


def linear_probe(
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    eval_emb: np.ndarray,
    eval_labels: np.ndarray,
    label_names: Sequence[str],
    *,
    C: float = 1.0,
    max_iter: int = 1000,
) -> dict:
    """Per-label AUC of a logistic regression (L2, ``C``) fitted on the train embeddings.

    Features are standardised first (fitted on train): L2-normalised embeddings have
    coordinates of size ~1/sqrt(D), which would make any fixed ``C`` mean a much stronger
    penalty for wide embeddings than for narrow ones.

    Labels whose train or evaluated part lacks one class get NaN and are left out of the
    mean. NaN labels (unknown) are left out per label. Returns {"per_label": {name: {auc,
    n_train, n_train_positive, n_eval}}, "mean_auc", "num_labels_in_mean", "scores": [N, C]
    probe probabilities on the evaluated split (NaN where not fitted)}.
    """
    xtr = np.asarray(train_emb, np.float64)
    xev = np.asarray(eval_emb, np.float64)
    ytr = np.asarray(train_labels, np.float64)
    yev = np.asarray(eval_labels, np.float64)
    if xtr.shape[0] != ytr.shape[0] or xev.shape[0] != yev.shape[0]:
        raise ValueError(f"embeddings and labels disagree in rows: train {xtr.shape}/{ytr.shape}, eval {xev.shape}/{yev.shape}")
    if ytr.shape[1] != len(label_names) or yev.shape[1] != len(label_names):
        raise ValueError(f"labels must have {len(label_names)} columns, got train {ytr.shape}, eval {yev.shape}")
    per_label = {}
    scores = np.full(yev.shape, math.nan)
    for c, name in enumerate(label_names):
        tr = ~np.isnan(ytr[:, c])
        ev = ~np.isnan(yev[:, c])
        y_tr, y_ev = ytr[tr, c].astype(int), yev[ev, c].astype(int)
        entry = {"auc": math.nan, "n_train": int(tr.sum()), "n_train_positive": int(y_tr.sum()), "n_eval": int(ev.sum())}
        if np.unique(y_tr).size == 2:
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(xtr[tr], y_tr)
            scores[:, c] = clf.predict_proba(xev)[:, 1]
            if np.unique(y_ev).size == 2:
                entry["auc"] = float(roc_auc_score(y_ev, scores[ev, c]))
        per_label[name] = entry
    aucs = np.array([e["auc"] for e in per_label.values()])
    defined = np.isfinite(aucs)
    return {
        "per_label": per_label,
        "mean_auc": float(aucs[defined].mean()) if defined.any() else math.nan,
        "num_labels_in_mean": int(defined.sum()),
        "C": C,
        "scores": scores,
    }


def figures(cache: EmbeddingCache) -> dict | None:
    """`linear_probe` fitted on ``eval.probe_split`` (C = ``eval.probe_C``), scored on the
    evaluated split, without the per-volume scores; None when there is no such other split."""
    probe_split = cache.setting("probe_split", "train")
    train = cache.other_split(probe_split)
    if train is None:
        return None
    evaluated = cache.evaluated()
    out = linear_probe(train["volume"], train["labels"], evaluated["volume"], evaluated["labels"],
                       cache.label_names, C=float(cache.setting("probe_C", 1.0)))
    out.pop("scores")
    out["train_split"] = probe_split
    return out


@register_evaluator("linear_probe")
def linear_probe_evaluator(ctx: EvalContext) -> dict[str, float]:
    """The probe's mean AUC (nothing when the probe split is absent)."""
    m = figures(EmbeddingCache.of(ctx))
    return {} if m is None else {"mean_auc": m["mean_auc"]}
