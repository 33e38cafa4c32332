"""Zero-shot metrics against independent float64 NumPy references and scikit-learn.

References here are hand-written on purpose (the module itself uses scikit-learn):
AUC as the Mann-Whitney U statistic over all positive/negative pairs, the operating point
by brute force over every distinct score. Tolerance 1e-12: both sides are exact rational
computations in float64, so only summation-order rounding can separate them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, roc_auc_score

from t3d_jax.evaluate import linear_probe, zeroshot

TOL = 1e-12


def mann_whitney_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a random positive > a random negative) + 0.5 P(tie), over all pairs."""
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def brute_force_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """Every distinct score (and +inf) as a ">=" threshold; closest to (0,1), ties -> highest."""
    best_t, best_d = None, math.inf
    for t in sorted(set(s.tolist()) | {math.inf}, reverse=True):
        pred = s >= t
        tpr = (pred & (y == 1)).sum() / (y == 1).sum()
        fpr = (pred & (y == 0)).sum() / (y == 0).sum()
        d = math.sqrt(fpr**2 + (1 - tpr) ** 2)
        if d < best_d - 1e-15:
            best_t, best_d = t, d
    return best_t


def hand_threshold_metrics(y: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    tp = float(((pred == 1) & (y == 1)).sum())
    tn = float(((pred == 0) & (y == 0)).sum())
    fp = float(((pred == 1) & (y == 0)).sum())
    fn = float(((pred == 0) & (y == 1)).sum())
    acc = (tp + tn) / y.size
    prec = tp / (tp + fp) if tp + fp else 0.0
    f1_pos = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    f1_neg = 2 * tn / (2 * tn + fn + fp) if tn + fn + fp else 0.0
    f1_w = (f1_pos * (tp + fn) + f1_neg * (tn + fp)) / y.size
    return acc, f1_w, prec


@pytest.fixture()
def fixed_predictions():
    rng = np.random.default_rng(7)
    n, c = 60, 4
    labels = (rng.random((n, c)) < [0.2, 0.5, 0.35, 0.1]).astype(np.float64)
    scores = np.clip(0.25 * labels + rng.random((n, c)), 0, None)
    scores[:10, 1] = np.round(scores[:10, 1], 1)  # some ties
    return scores, labels, ["a", "b", "c", "d"]


def test_prompts_follow_ct_clip_templates():
    pos, neg = zeroshot.build_prompts(["Emphysema", "Lung nodule"])
    assert pos == ["Emphysema is present.", "Lung nodule is present."]
    assert neg == ["Emphysema is not present.", "Lung nodule is not present."]
    pos, neg = zeroshot.build_prompts(["x"], ("There is {label}.", "No {label}."))
    assert (pos, neg) == (["There is x."], ["No x."])
    with pytest.raises(ValueError, match="placeholder"):
        zeroshot.build_prompts(["x"], ("present", "{label} absent"))
    # An "absent" side without the placeholder is a normal-scan reference shared by all labels.
    assert zeroshot.build_prompts(["x", "y"], ("{label}.", "Normal.")) == (["x.", "y."], ["Normal.", "Normal."])


def test_pair_softmax_matches_explicit_softmax():
    rng = np.random.default_rng(0)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    v, p, q = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(3, 8)))
    got = zeroshot.pair_softmax_scores(v, p, q, logit_scale=14.3)
    logits = np.stack([14.3 * v @ p.T, 14.3 * v @ q.T], axis=-1)
    expected = np.exp(logits)[..., 0] / np.exp(logits).sum(-1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # Huge logit scale must not overflow (softmax of a pair = sigmoid of the difference).
    assert np.isfinite(zeroshot.pair_softmax_scores(v, p, q, logit_scale=1e6)).all()


def test_auc_and_operating_point_against_hand_references(fixed_predictions):
    scores, labels, names = fixed_predictions
    res = zeroshot.evaluate_scores(scores, labels, names, num_bootstrap=0)
    for c, name in enumerate(names):
        y, s = labels[:, c].astype(int), scores[:, c]
        entry = res["per_label"][name]
        assert entry["auc"]["value"] == pytest.approx(mann_whitney_auc(y, s), abs=TOL)
        thr = brute_force_threshold(y, s)
        assert entry["threshold"] == thr
        acc, f1w, prec = hand_threshold_metrics(y, (s >= thr).astype(int))
        assert entry["accuracy"]["value"] == pytest.approx(acc, abs=TOL)
        assert entry["f1_weighted"]["value"] == pytest.approx(f1w, abs=TOL)
        assert entry["precision"]["value"] == pytest.approx(prec, abs=TOL)
    means = {m: np.mean([res["per_label"][n][m]["value"] for n in names]) for m in zeroshot.METRICS}
    for m in zeroshot.METRICS:
        assert res["mean"][m]["value"] == pytest.approx(means[m], abs=TOL)


def test_batched_threshold_metrics_equal_plain_sklearn_calls(fixed_predictions):
    """The one-call multilabel form equals f1_score(weighted) / accuracy / precision per label."""
    scores, labels, names = fixed_predictions
    thr = [0.3, 0.55, 0.9, 1.1]
    res = zeroshot.evaluate_scores(scores, labels, names, thresholds=thr, num_bootstrap=0)
    for c, name in enumerate(names):
        y, pred = labels[:, c].astype(int), (scores[:, c] >= thr[c]).astype(int)
        assert res["per_label"][name]["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred), abs=TOL)
        assert res["per_label"][name]["f1_weighted"]["value"] == pytest.approx(
            f1_score(y, pred, average="weighted", zero_division=0), abs=TOL)
        assert res["per_label"][name]["precision"]["value"] == pytest.approx(
            precision_score(y, pred, zero_division=0), abs=TOL)
        assert res["per_label"][name]["auc"]["value"] == pytest.approx(roc_auc_score(y, scores[:, c]), abs=TOL)


def test_operating_point_inside_a_straight_stretch_of_the_roc_curve():
    """The closest point can be a collinear vertex that roc_curve(drop_intermediate=True) drops.

    Scores 0.9 (pos), 0.8 (pos), 0.7 (pos), 0.6 (neg), 0.5 (neg), 0.4 (neg), 0.3 (pos):
    distinct thresholds trace (0,1/4) (0,2/4) (0,3/4) (1/3,3/4) (2/3,3/4) (1,3/4) (1,1).
    Closest to (0,1) is (0, 3/4) at threshold 0.7.
    """
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    y = np.array([1, 1, 1, 0, 0, 0, 1])
    assert zeroshot.choose_threshold(y, s) == 0.7 == brute_force_threshold(y, s)
    # A symmetric case: both (0, 0.5) and (0.5, 1) are 0.5 away; ties go to the higher threshold.
    s2 = np.array([0.9, 0.8, 0.7, 0.6])
    y2 = np.array([1, 0, 1, 0])
    assert zeroshot.choose_threshold(y2, s2) == brute_force_threshold(y2, s2) == 0.9


def test_ct_clip_grid_rule_replicates_their_search():
    rng = np.random.default_rng(3)
    y = (rng.random(50) < 0.4).astype(int)
    s = np.clip(0.3 * y + 0.7 * rng.random(50), 0, 1)
    expected_t, best = 0.0, math.inf
    for t in np.linspace(0, 1, 100):  # CT-CLIP's find_threshold, transcribed
        pred = s > t
        tpr = (pred & (y == 1)).sum() / (y == 1).sum()
        fpr = (pred & (y == 0)).sum() / (y == 0).sum()
        d = math.sqrt((1 - tpr) ** 2 + fpr**2)
        if d <= best:
            expected_t, best = t, d
    assert zeroshot.choose_threshold(y, s, "ct_clip_grid") == pytest.approx(expected_t, abs=0)


def test_bootstrap_intervals_contain_point_and_are_reproducible(fixed_predictions):
    scores, labels, names = fixed_predictions
    res = zeroshot.evaluate_scores(scores, labels, names, num_bootstrap=300, seed=1)
    again = zeroshot.evaluate_scores(scores, labels, names, num_bootstrap=300, seed=1)
    assert res == again
    for name in names:
        for m in zeroshot.METRICS:
            e = res["per_label"][name][m]
            assert e["ci_low"] <= e["value"] <= e["ci_high"], (name, m, e)
            assert e["ci_low"] < e["ci_high"]
    for m in zeroshot.METRICS:
        e = res["mean"][m]
        assert e["ci_low"] <= e["value"] <= e["ci_high"], (m, e)
        # The mean over labels varies less than its noisiest label.
        widest = max(res["per_label"][n][m]["ci_high"] - res["per_label"][n][m]["ci_low"] for n in names)
        assert e["ci_high"] - e["ci_low"] < widest


def test_bootstrap_interval_matches_direct_resampling(fixed_predictions):
    """Intervals equal percentiles of sklearn's AUC recomputed on the same resamples."""
    scores, labels, names = fixed_predictions
    b, seed = 200, 5
    res = zeroshot.evaluate_scores(scores, labels, names, num_bootstrap=b, seed=seed)
    idx = np.random.default_rng(seed).integers(0, len(scores), size=(b, len(scores)))
    y, s = labels[:, 0].astype(int), scores[:, 0]
    aucs = np.array([roc_auc_score(y[i], s[i]) if len(set(y[i])) == 2 else np.nan for i in idx])
    lo, hi = np.percentile(aucs[np.isfinite(aucs)], [2.5, 97.5])
    assert res["per_label"]["a"]["auc"]["ci_low"] == pytest.approx(lo, abs=TOL)
    assert res["per_label"]["a"]["auc"]["ci_high"] == pytest.approx(hi, abs=TOL)


def test_unknown_labels_and_single_class_labels():
    rng = np.random.default_rng(2)
    labels = (rng.random((40, 3)) < 0.5).astype(np.float64)
    labels[:, 2] = 0.0  # no positives: AUC undefined, left out of means
    labels[::4, 0] = np.nan  # unknown entries are dropped for that label only
    scores = rng.random((40, 3))
    res = zeroshot.evaluate_scores(scores, labels, ["a", "b", "c"], num_bootstrap=50)
    keep = ~np.isnan(labels[:, 0])
    assert res["per_label"]["a"]["n"] == keep.sum()
    assert res["per_label"]["a"]["auc"]["value"] == pytest.approx(
        mann_whitney_auc(labels[keep, 0].astype(int), scores[keep, 0]), abs=TOL)
    assert math.isnan(res["per_label"]["c"]["auc"]["value"])
    assert res["num_labels_in_mean"] == 2
    assert res["mean"]["auc"]["value"] == pytest.approx(
        (res["per_label"]["a"]["auc"]["value"] + res["per_label"]["b"]["auc"]["value"]) / 2, abs=TOL)


def test_leak_free_thresholds_come_from_the_other_split(fixed_predictions):
    scores, labels, names = fixed_predictions
    other = zeroshot.evaluate_scores(scores[:30], labels[:30], names, num_bootstrap=0)
    thr = zeroshot.thresholds_of(other, names)
    leak_free = zeroshot.evaluate_scores(scores[30:], labels[30:], names, thresholds=thr, num_bootstrap=0)
    assert leak_free["thresholds_from"] == "given"
    for c, name in enumerate(names):
        y, pred = labels[30:, c].astype(int), (scores[30:, c] >= thr[c]).astype(int)
        assert leak_free["per_label"][name]["threshold"] == thr[c]
        assert leak_free["per_label"][name]["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred), abs=TOL)


def test_figures_from_embeddings_and_the_leak_free_variant():
    """zeroshot_figures = pair-softmax scores -> evaluate_scores; the leak-free variant scores
    the evaluated set at the thresholds chosen on the other set; the text-tower check is the
    protocol's AUC with the reports in place of the volumes."""
    rng = np.random.default_rng(3)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    names, d = ["a", "b", "c"], 8
    positive, negative = unit(rng.normal(size=(3, d))), unit(rng.normal(size=(3, d)))

    def split(n):
        return {"volume": unit(rng.normal(size=(n, d))), "text": unit(rng.normal(size=(n, d))),
                "labels": (rng.random((n, 3)) < 0.4).astype(np.float64)}

    evaluated, other = split(40), split(30)
    out, scores = zeroshot.zeroshot_figures(evaluated, names, positive, negative, logit_scale=10.0,
                                            threshold_set=other, threshold_split="train", num_bootstrap=0)
    np.testing.assert_array_equal(scores, zeroshot.pair_softmax_scores(evaluated["volume"], positive, negative, 10.0))
    protocol = zeroshot.evaluate_scores(scores, evaluated["labels"], names, num_bootstrap=0)
    np.testing.assert_equal(out["zeroshot"]["per_label"], protocol["per_label"])
    assert out["zeroshot"]["logit_scale"] == 10.0 and out["zeroshot"]["templates"] == list(zeroshot.DEFAULT_TEMPLATES)
    chosen = zeroshot.evaluate_scores(zeroshot.pair_softmax_scores(other["volume"], positive, negative, 10.0),
                                      other["labels"], names, num_bootstrap=0)
    leak_free = out["zeroshot_leakfree"]
    assert zeroshot.thresholds_of(leak_free, names) == zeroshot.thresholds_of(chosen, names)
    assert "'train' (30 volumes)" in leak_free["thresholds_from"]
    assert "zeroshot_leakfree" not in zeroshot.zeroshot_figures(evaluated, names, positive, negative,
                                                                num_bootstrap=0)[0]
    as_reports = dict(evaluated, text=evaluated["volume"])
    check = zeroshot.text_tower_check(as_reports, names, positive, negative, logit_scale=10.0)
    assert check["mean_auc"] == pytest.approx(protocol["mean"]["auc"]["value"], abs=TOL)


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        zeroshot.evaluate_scores(np.zeros((3, 2)), np.zeros((3, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="thresholds"):
        zeroshot.evaluate_scores(np.zeros((3, 2)), np.zeros((3, 2)), ["a", "b"], thresholds=[0.5])


def test_linear_probe_recovers_a_linearly_separable_label():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 16))
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + 0.1 * rng.normal(size=400) > 0.3), np.zeros(400)], 1).astype(float)
    res = linear_probe.linear_probe(x[:300], y[:300], x[300:], y[300:], ["a", "b", "never"])
    assert res["per_label"]["a"]["auc"] > 0.97
    assert res["per_label"]["b"]["auc"] > 0.9
    assert math.isnan(res["per_label"]["never"]["auc"])
    assert res["num_labels_in_mean"] == 2
    # Independent check of the reported AUC from the returned probabilities.
    assert res["per_label"]["a"]["auc"] == pytest.approx(mann_whitney_auc(y[300:, 0].astype(int), res["scores"][:, 0]), abs=TOL)


def test_prompt_ensembles_average_normalised_embeddings():
    """Either side of the templates may be an ensemble: per label, the mean of its prompts'
    L2-normalised embeddings, normalised again (float64 reference, tolerance 1e-12)."""
    pos, neg = zeroshot.build_prompts(["a", "b"], (("{label} here.", "There is {label}."), "No {label}."))
    assert pos == ["a here.", "There is a.", "b here.", "There is b."] and neg == ["No a.", "No b."]
    rng = np.random.default_rng(3)
    table = {t: rng.normal(size=6) for t in pos + neg}
    embed = lambda texts: np.stack([table[t] / np.linalg.norm(table[t]) for t in texts])  # noqa: E731
    p, n = zeroshot.prompt_embeddings(embed, ["a", "b"], (("{label} here.", "There is {label}."), "No {label}."))
    for i, name in enumerate("ab"):
        m = embed([f"{name} here.", f"There is {name}."]).mean(0)
        np.testing.assert_allclose(p[i], m / np.linalg.norm(m), atol=1e-12)
        np.testing.assert_allclose(n[i], embed([f"No {name}."])[0], atol=1e-12)
    with pytest.raises(ValueError, match="pair"):
        zeroshot.build_prompts(["x"], ("{label} is present.",))
    with pytest.raises(ValueError, match="placeholder"):
        zeroshot.build_prompts(["x"], (("{label} a.", "b."), "c."))
