"""Zero-shot abnormality classification by the CT-CLIP protocol (CT-RATE; docs/evaluation.md).

Protocol, as in CT-CLIP's released scripts (``zero_shot.py``, ``eval.py``,
``bootstrap_values.py``):

* For every label two prompts, "{label} is present." and "{label} is not present."
  (templates configurable; either side may be a prompt ensemble, `template_sets`). The label's score for a volume is the softmax over the pair
  of (logit scale x cosine similarity) and its "present" entry. The logit scale does not
  change the ranking (the softmax of a pair is monotone in the similarity difference), so
  AUC is the same with or without it; it only moves the score values.
* Per label: ROC AUC; a threshold at the ROC point closest to (0, 1), chosen on the
  evaluated set itself; accuracy, weighted F1 and positive-class precision at that
  threshold. Means over labels.
* 1,000 bootstrap resamples of the evaluated volumes (thresholds held fixed, as CT-CLIP
  does) give 95 % percentile intervals for every per-label figure and for the means.

Choosing the threshold on the set it is scored on leaks the labels into the operating
point, which inflates accuracy / F1 / precision. :func:`evaluate_scores` therefore also
accepts thresholds chosen elsewhere; :func:`zeroshot_figures` reports that as the
*leak-free* variant (thresholds from another split), next to the protocol figures, under a
distinct name.

The ``zeroshot`` evaluator (bottom) scores a model: it embeds the prompts and the evaluated
split (and the threshold split) through the context's embedding cache.

Every metric value comes from scikit-learn. NaN labels (unknown in the manifest) are left
out per label; a label with only one class present gets NaN AUC and is left out of means.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import sklearn
from sklearn.metrics import (
    accuracy_score,
    auc,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    roc_auc_score,
    roc_curve,
)

from t3d_jax.evaluate.embedding import EmbeddingCache
from t3d_jax.evaluate.registry import EvalContext, register_evaluator
from t3d_jax.utils import cfg_get

DEFAULT_TEMPLATES: tuple = ("{label} is present.", "{label} is not present.")
METRICS: tuple[str, ...] = ("auc", "accuracy", "f1_weighted", "precision")
THRESHOLD_RULES = ("roc", "ct_clip_grid")


# ----------------------------------------------------------------------------- prompts + scores


def template_sets(templates: Sequence) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``templates`` as (present templates, absent templates).

    ``templates`` is a pair (present, absent); each side is one template string or a
    sequence of them, a prompt ensemble (CLIP's prompt ensembling: a label's side is the
    mean of its prompts' L2-normalised embeddings, normalised again). Every "present" template
    has a ``{label}`` placeholder; an "absent" one may have none, a reference description of a
    normal scan shared by all labels ("No acute cardiopulmonary abnormality.").
    """
    if isinstance(templates, str) or len(templates) != 2:
        raise ValueError(f"zero-shot needs a pair of prompt templates (present, absent), got {templates!r}")
    sides = tuple((side,) if isinstance(side, str) else tuple(side) for side in templates)
    for k, side in enumerate(sides):
        if not side:
            raise ValueError(f"a side of the zero-shot templates is empty: {templates!r}")
        for t in side:
            if not isinstance(t, str) or (k == 0 and "{label}" not in t):
                raise ValueError(f"prompt template {t!r} has no '{{label}}' placeholder")
    return sides[0], sides[1]


def build_prompts(label_names: Sequence[str], templates: Sequence = DEFAULT_TEMPLATES) -> tuple[list[str], list[str]]:
    """The (present, not present) prompts of every label: label-major, template-minor (one
    prompt per label for a plain pair of templates)."""
    present, absent = template_sets(templates)
    positive = [t.format(label=name) for name in label_names for t in present]
    negative = [t.format(label=name) for name in label_names for t in absent]
    return positive, negative


def _ensemble(emb: np.ndarray, num_labels: int) -> np.ndarray:
    """[C * T, D] prompt embeddings (label-major) -> [C, D]: mean over T, L2-normalised."""
    emb = np.asarray(emb, np.float64).reshape(num_labels, -1, np.shape(emb)[-1])
    emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    mean = emb.mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def prompt_embeddings(embed_texts, label_names: Sequence[str],
                      templates: Sequence = DEFAULT_TEMPLATES) -> tuple[np.ndarray, np.ndarray]:
    """([C, D] present, [C, D] absent) embeddings of the prompts; ``embed_texts(list[str])``
    gives L2-normalised [N, D] text embeddings (an `EmbeddingCache.texts`). Ensembles are
    averaged per label (`template_sets`)."""
    positive, negative = build_prompts(label_names, templates)
    emb = np.asarray(embed_texts(positive + negative))
    c = len(label_names)
    return _ensemble(emb[: len(positive)], c), _ensemble(emb[len(positive):], c)


def pair_softmax_scores(
    volume_emb: np.ndarray, positive_emb: np.ndarray, negative_emb: np.ndarray, logit_scale: float = 1.0
) -> np.ndarray:
    """[N, C] probability of "present": softmax over (present, absent) of scale * cosine.

    Embeddings are expected L2-normalised (the model's outputs are), so dot = cosine.
    Computed in float64 as softmax([a, b])[0] = sigmoid(a - b), which never overflows.
    """
    v = np.asarray(volume_emb, np.float64)
    sim_pos = v @ np.asarray(positive_emb, np.float64).T
    sim_neg = v @ np.asarray(negative_emb, np.float64).T
    diff = float(logit_scale) * (sim_pos - sim_neg)
    return 0.5 * (1.0 + np.tanh(0.5 * diff))  # numerically stable sigmoid


# ----------------------------------------------------------------------------- operating point


def choose_threshold(y_true: np.ndarray, y_score: np.ndarray, rule: str = "roc") -> float:
    """Threshold at the ROC point closest to (0, 1): argmin sqrt(FPR^2 + (1 - TPR)^2).

    ``rule="roc"`` searches every ROC vertex of scikit-learn's ``roc_curve`` (predict
    positive when score >= threshold). Intermediate collinear points are kept
    (``drop_intermediate=False``): the closest point of a straight stretch of the curve can
    lie inside it. Ties go to the highest threshold.
    ``rule="ct_clip_grid"`` replicates CT-CLIP's ``find_threshold``: 100 thresholds
    ``linspace(0, 1, 100)``, predict positive when score > threshold, ties to the last
    (highest) threshold. Each rule's threshold is applied with its own comparison
    (:func:`predict`).
    """
    y_true = np.asarray(y_true).astype(int)
    y_score = np.asarray(y_score, np.float64)
    if rule == "roc":
        fpr, tpr, thresholds = roc_curve(y_true, y_score, drop_intermediate=False)
        dist = np.hypot(fpr, 1.0 - tpr)
        best = int(np.argmin(dist))  # thresholds decrease, so the first minimum is the highest
        return float(thresholds[best])
    if rule == "ct_clip_grid":
        best_t, best_d = 0.0, math.inf
        for t in np.linspace(0.0, 1.0, 100):
            pred = predict(y_score, float(t), rule)
            _, rec, _, _ = precision_recall_fscore_support(y_true, pred, labels=[0, 1], zero_division=0)
            tpr, fpr = rec[1], 1.0 - rec[0]  # recall of class 0 = specificity
            d = math.hypot(fpr, 1.0 - tpr)
            if d <= best_d:
                best_t, best_d = float(t), d
        return best_t
    raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")


def predict(y_score: np.ndarray, threshold: float, rule: str = "roc") -> np.ndarray:
    """Binary predictions at a threshold with the comparison the threshold rule uses."""
    y_score = np.asarray(y_score, np.float64)
    return (y_score > threshold if rule == "ct_clip_grid" else y_score >= threshold).astype(int)


def metrics_at_threshold(y_true: np.ndarray, y_score: np.ndarray, threshold: float, rule: str = "roc") -> dict:
    """Accuracy, weighted F1 and positive-class precision of one label at one threshold.

    The straightforward scikit-learn calls; :func:`evaluate_scores` computes the same
    figures for all labels and resamples at once (:func:`_threshold_metrics_all`) and the
    tests check the two agree.
    """
    y_true = np.asarray(y_true).astype(int)
    pred = predict(y_score, threshold, rule)
    return {
        "accuracy": float(accuracy_score(y_true, pred)),
        "f1_weighted": float(f1_score(y_true, pred, average="weighted", zero_division=0)),
        "precision": float(precision_score(y_true, pred, zero_division=0)),
    }


def _threshold_metrics_all(y: np.ndarray, pred: np.ndarray, known: np.ndarray) -> np.ndarray:
    """[3, C] accuracy / weighted F1 / positive precision of every label in ONE sklearn call.

    Why: 1,000 resamples x 18 labels x 3 metric calls at ~1 ms each is a minute of pure
    call overhead. Instead both classes of every label become columns of one multilabel
    indicator matrix ([present_1..C, absent_1..C]) and a single
    ``precision_recall_fscore_support(average=None)`` returns every column's precision,
    recall, F1 and support. Per label, the support-weighted mean of the two classes' F1 is
    scikit-learn's ``average="weighted"`` F1, and the support-weighted mean of their recalls
    is ``recall_score(average="weighted")``, which for a binary label equals accuracy.
    Unknown entries (NaN labels) are zeroed in both columns: a true negative in both, which
    enters neither precision, recall, F1 nor support.
    """
    y = np.where(known, y, 0).astype(int)
    pred = pred.astype(int)
    truth = np.concatenate([y, np.where(known, 1 - y, 0)], axis=1)
    guess = np.concatenate([np.where(known, pred, 0), np.where(known, 1 - pred, 0)], axis=1)
    prec, rec, f1, support = precision_recall_fscore_support(truth, guess, average=None, zero_division=0)
    c = y.shape[1]
    sup_pos, sup_neg = support[:c].astype(np.float64), support[c:].astype(np.float64)
    total = sup_pos + sup_neg
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = (rec[:c] * sup_pos + rec[c:] * sup_neg) / total
        f1_weighted = (f1[:c] * sup_pos + f1[c:] * sup_neg) / total
    return np.stack([accuracy, f1_weighted, prec[:c]])


def _auc(y_true: np.ndarray, y_score: np.ndarray, fast: bool = False) -> float:
    """ROC AUC, NaN when only one class is present.

    ``fast`` uses ``auc(roc_curve(...))``, the computation ``roc_auc_score`` itself does for
    a binary target, without its input checks (used inside the bootstrap loop).
    """
    if np.unique(y_true).size < 2:
        return math.nan
    if fast:
        fpr, tpr, _ = roc_curve(y_true, y_score)
        return float(auc(fpr, tpr))
    return float(roc_auc_score(y_true, y_score))


# ----------------------------------------------------------------------------- full evaluation


def _summary(point: float, samples: np.ndarray, alpha: float) -> dict:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0 or not np.isfinite(point):
        return {"value": point, "ci_low": math.nan, "ci_high": math.nan, "bootstrap_mean": math.nan}
    lo, hi = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"value": point, "ci_low": float(lo), "ci_high": float(hi), "bootstrap_mean": float(finite.mean())}


def evaluate_scores(
    scores: np.ndarray,
    labels: np.ndarray,
    label_names: Sequence[str],
    *,
    thresholds: Sequence[float] | None = None,
    threshold_rule: str = "roc",
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    with_auc: bool = True,
) -> dict:
    """Per-label and mean metrics with bootstrap intervals, for scores in [0, 1] (or any real).

    Args:
      scores: [N, C] zero-shot (or probe) scores, higher = more likely present.
      labels: [N, C] 0/1, NaN = unknown (left out for that label).
      thresholds: per-label thresholds chosen elsewhere (leak-free variant); ``None`` picks
        them on this set by the closest-to-(0, 1) rule (the CT-CLIP protocol).
      num_bootstrap: resamples of the N volumes (with replacement); thresholds stay fixed.
      with_auc: ``False`` skips AUC (NaN in the output): the leak-free variant's AUC is the
        protocol's (AUC has no threshold), and AUC is most of the bootstrap's cost.

    Returns a JSON-ready dict: ``per_label`` {name: {metric: {value, ci_low, ci_high,
    bootstrap_mean}, threshold, n, n_positive}}, ``mean`` {metric: {...}} over labels with a
    defined AUC, and the protocol settings used.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, np.float64)
    if scores.shape != labels.shape or scores.ndim != 2 or scores.shape[1] != len(label_names):
        raise ValueError(
            f"scores {scores.shape} and labels {labels.shape} must both be [N, {len(label_names)}] (one column per label)"
        )
    if thresholds is not None and len(thresholds) != len(label_names):
        raise ValueError(f"got {len(thresholds)} thresholds for {len(label_names)} labels")
    n, num_labels = scores.shape
    alpha = 1.0 - confidence
    known = ~np.isnan(labels)
    rng = np.random.default_rng(seed)
    boot_idx = rng.integers(0, n, size=(num_bootstrap, n))

    # Thresholds: given (leak-free) or chosen per label on this set (protocol).
    used_thresholds = []
    for c in range(num_labels):
        y, s = labels[known[:, c], c].astype(int), scores[known[:, c], c]
        if thresholds is not None:
            used_thresholds.append(float(thresholds[c]))
        elif np.unique(y).size == 2:
            used_thresholds.append(choose_threshold(y, s, threshold_rule))
        else:
            used_thresholds.append(math.nan)
    thr = np.asarray(used_thresholds, np.float64)
    has_threshold = ~np.isnan(thr)  # +inf is a valid ROC threshold (nothing predicted positive)
    pred = np.stack([predict(scores[:, c], thr[c], threshold_rule) for c in range(num_labels)], axis=1)

    def figures(idx: np.ndarray, fast: bool) -> np.ndarray:
        out = np.full((len(METRICS), num_labels), math.nan)
        k = known[idx]
        for c in range(num_labels if with_auc else 0):
            rows = idx[k[:, c]]
            if rows.size:
                out[0, c] = _auc(labels[rows, c].astype(int), scores[rows, c], fast=fast)
        out[1:] = _threshold_metrics_all(labels[idx], pred[idx], k)
        out[1:, ~has_threshold] = math.nan
        return out

    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        point = figures(np.arange(n), fast=False)
        boots = np.full((len(METRICS), num_bootstrap, num_labels), math.nan)
        for b in range(num_bootstrap):
            boots[:, b] = figures(boot_idx[b], fast=True)

    # Labels with both classes on the evaluated set enter the means (AUC is defined).
    defined = np.array([np.unique(labels[known[:, c], c]).size == 2 for c in range(num_labels)], bool)
    per_label = {}
    for c, name in enumerate(label_names):
        y = labels[known[:, c], c]
        entry = {m: _summary(point[i, c], boots[i, :, c], alpha) for i, m in enumerate(METRICS)}
        entry.update(threshold=used_thresholds[c], n=int(y.size), n_positive=int((y == 1).sum()))
        per_label[name] = entry
    mean = {}
    for i, m in enumerate(METRICS):
        pt = float(np.mean(point[i, defined])) if defined.any() else math.nan
        with warnings.catch_warnings():  # a resample may lack every positive of a label
            warnings.simplefilter("ignore", RuntimeWarning)
            sample_means = np.nanmean(np.where(defined[None], boots[i], np.nan), axis=1) if defined.any() else np.array([])
        mean[m] = _summary(pt, sample_means, alpha)
    return {
        "per_label": per_label,
        "mean": mean,
        "num_labels_in_mean": int(defined.sum()),
        "num_volumes": int(n),
        "num_bootstrap": int(num_bootstrap),
        "confidence": confidence,
        "threshold_rule": threshold_rule,
        "thresholds_from": "evaluated set" if thresholds is None else "given",
    }


def thresholds_of(result: dict, label_names: Sequence[str]) -> list[float]:
    """The per-label thresholds an :func:`evaluate_scores` result used (for the leak-free run)."""
    return [float(result["per_label"][name]["threshold"]) for name in label_names]


def roc_points(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, tpr) of one label for plotting; ``None`` without both classes."""
    y_true = np.asarray(y_true, np.float64)
    keep = ~np.isnan(y_true)
    y, s = y_true[keep].astype(int), np.asarray(y_score, np.float64)[keep]
    if np.unique(y).size < 2:
        return None
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


# ----------------------------------------------------------------------------- from embeddings


def zeroshot_figures(
    evaluated: dict[str, np.ndarray],
    label_names: Sequence[str],
    positive: np.ndarray,
    negative: np.ndarray,
    *,
    logit_scale: float = 1.0,
    threshold_set: dict[str, np.ndarray] | None = None,
    threshold_split: str = "",
    num_bootstrap: int = 1000,
    threshold_rule: str = "roc",
    templates: Sequence = DEFAULT_TEMPLATES,
    seed: int = 0,
) -> tuple[dict, np.ndarray]:
    """({"zeroshot": protocol figures[, "zeroshot_leakfree": ...]}, the [N, C] scores).

    ``evaluated`` / ``threshold_set``: {"volume": [N, D] embeddings, "labels": [N, C]};
    ``positive`` / ``negative``: [C, D] prompt embeddings. With ``threshold_set`` the
    leak-free variant scores the evaluated set at the thresholds chosen on that set.
    """
    scores = pair_softmax_scores(evaluated["volume"], positive, negative, logit_scale)
    labels = evaluated["labels"]
    zs = evaluate_scores(scores, labels, label_names, num_bootstrap=num_bootstrap,
                         threshold_rule=threshold_rule, seed=seed)
    zs.update(templates=[s if isinstance(s, str) else list(s) for s in templates], logit_scale=logit_scale,
              score="softmax over (present, not present) of logit_scale * cosine; 'present' entry")
    out = {"zeroshot": zs}
    if threshold_set is not None:
        other = pair_softmax_scores(threshold_set["volume"], positive, negative, logit_scale)
        chosen = evaluate_scores(other, threshold_set["labels"], label_names, num_bootstrap=0,
                                 threshold_rule=threshold_rule, with_auc=False)
        lf = evaluate_scores(scores, labels, label_names, thresholds=thresholds_of(chosen, label_names),
                             num_bootstrap=num_bootstrap, threshold_rule=threshold_rule, seed=seed,
                             with_auc=False)
        lf.update(thresholds_from=f"split {threshold_split!r} ({len(threshold_set['labels'])} volumes)",
                  note="AUC has no threshold: it is the protocol's AUC (zeroshot.mean.auc)")
        out["zeroshot_leakfree"] = lf
    return out, scores


def text_tower_check(evaluated: dict[str, np.ndarray], label_names: Sequence[str], positive: np.ndarray,
                     negative: np.ndarray, *, logit_scale: float = 1.0, threshold_rule: str = "roc") -> dict:
    """The protocol's AUC with each volume's *report* (``evaluated["text"]``) in place of the volume.

    A diagnostic, not a result: it shows whether the text tower itself tells "present" from
    "not present", the ceiling that aligning volumes to their reports can reach zero-shot.
    """
    by_report = evaluate_scores(pair_softmax_scores(evaluated["text"], positive, negative, logit_scale),
                                evaluated["labels"], label_names, num_bootstrap=0, threshold_rule=threshold_rule)
    return {"mean_auc": by_report["mean"]["auc"]["value"],
            "per_label_auc": {n: by_report["per_label"][n]["auc"]["value"] for n in label_names},
            "note": "reports scored against the prompts instead of volumes (text-tower diagnostic, not a result)"}


def figures(cache: EmbeddingCache, *, final: bool) -> tuple[dict, np.ndarray]:
    """`zeroshot_figures` of the cache's model with the ``config.eval`` settings (templates,
    threshold_split, threshold_rule, use_logit_scale); a ``final`` evaluation adds the
    text-tower check and uses ``eval.num_bootstrap`` resamples."""
    templates = tuple(cache.setting("templates", DEFAULT_TEMPLATES))
    rule = cache.setting("threshold_rule", "roc")
    threshold_split = cache.setting("threshold_split", "train")
    positive, negative = prompt_embeddings(cache.texts, cache.label_names, templates)
    evaluated, scale = cache.evaluated(), cache.logit_scale()
    out, scores = zeroshot_figures(
        evaluated, cache.label_names, positive, negative, logit_scale=scale,
        threshold_set=cache.other_split(threshold_split), threshold_split=threshold_split,
        num_bootstrap=cache.num_bootstrap(final), threshold_rule=rule, templates=templates,
        seed=int(cfg_get(cache.config, "seed", 0)))
    if final:
        out["zeroshot_reports"] = text_tower_check(evaluated, cache.label_names, positive, negative,
                                                   logit_scale=scale, threshold_rule=rule)
    return out, scores


@register_evaluator("zeroshot")
def zeroshot_evaluator(ctx: EvalContext) -> dict[str, float]:
    """Mean AUC / accuracy / weighted F1 / precision, and the leak-free means."""
    m, _ = figures(EmbeddingCache.of(ctx), final=ctx.write)
    out = {f"mean_{k}": v["value"] for k, v in m["zeroshot"]["mean"].items()}
    if "zeroshot_leakfree" in m:
        out.update({f"leakfree_mean_{k}": v["value"] for k, v in m["zeroshot_leakfree"]["mean"].items()
                    if k != "auc"})
    return out
