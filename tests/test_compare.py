"""The paired method comparison (t3d_jax/evaluate/compare.py) against scikit-learn and by
construction (identical methods differ by exactly 0)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from t3d_jax.evaluate import compare

LABELS = ("a", "b", "c")


def _run(rng, n=60, quality=0.0, labels=None):
    labels = rng.integers(0, 2, (n, 3)).astype(float) if labels is None else labels
    noise = rng.normal(size=(n, 3))
    zs = np.round(quality * labels + noise, 1)  # rounded: ties, as real scores have
    return {"id": np.array([f"v{i}" for i in range(n)]), "labels": labels, "zeroshot": zs,
            "probe": quality * labels + rng.normal(size=(n, 3)), "r2v_rank": rng.integers(0, 20, n)}


def test_auc_per_label_equals_scikit_learn_with_ties_and_unknown_labels():
    rng = np.random.default_rng(0)
    run = _run(rng, quality=1.0)
    labels = run["labels"].copy()
    labels[::7, 1] = np.nan  # unknown labels are left out of that column only
    labels[:, 2] = 1.0  # one class only: NaN
    got = compare.auc_per_label(labels, run["zeroshot"])
    for c in range(2):
        keep = ~np.isnan(labels[:, c])
        # float64 rank sums vs scikit-learn's trapezoids: equal up to rounding (1e-12).
        assert got[c] == pytest.approx(roc_auc_score(labels[keep, c], run["zeroshot"][keep, c]), abs=1e-12)
    assert np.isnan(got[2])


def test_identical_methods_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    runs = [_run(rng), _run(rng, labels=None)]
    runs[1]["id"], runs[1]["labels"] = runs[0]["id"], runs[0]["labels"]
    result = compare.compare({"clip": runs, "same": [dict(r) for r in runs]}, LABELS, baseline="clip",
                             num_bootstrap=50)
    diff = result["methods"]["same"]["difference"]
    for k in compare.FIGURES:
        assert diff[k]["value"] == 0.0 and diff[k]["ci"] == [0.0, 0.0], k
    # A method's figure is the mean over its seeds of the per-seed figure (scikit-learn here).
    per_seed = [np.mean([roc_auc_score(r["labels"][:, c], r["zeroshot"][:, c]) for c in range(3)]) for r in runs]
    assert result["methods"]["clip"]["figures"]["zeroshot_auc"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert result["methods"]["clip"]["figures"]["R@5"] == pytest.approx(
        np.mean([np.mean(r["r2v_rank"] < 5) for r in runs]))


def test_a_better_method_has_an_interval_above_zero_and_a_table():
    rng = np.random.default_rng(2)
    base = _run(rng)
    better = _run(rng, quality=3.0, labels=base["labels"])
    better["id"] = base["id"]
    result = compare.compare({"clip": [base], "t3d": [better]}, LABELS, baseline="clip", num_bootstrap=200)
    diff = result["methods"]["t3d"]["difference"]["zeroshot_auc"]
    assert diff["value"] > 0.3 and diff["ci"][0] > 0, diff
    assert all(result["methods"]["t3d"]["per_label_difference"][n]["ci"][0] > 0 for n in LABELS)
    table = compare.format_comparison(result)
    assert "t3d - clip: zeroshot_auc +" in table and table.count("\n") > len(LABELS)
    with pytest.raises(ValueError, match="same volumes"):
        other = dict(better, id=better["id"][::-1])
        compare.compare({"clip": [base], "t3d": [other]}, LABELS, baseline="clip", num_bootstrap=2)


def test_harness_saves_a_run_and_reads_it_back_whole(tmp_path):
    """bench/compare_methods.py's resume: a saved run's predictions come back equal (ids are
    text, not pickled objects); a run without facts.json (killed before the end) is not reused."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "compare_methods.py"
    spec = importlib.util.spec_from_file_location("bench_compare_methods", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = _run(np.random.default_rng(1))
    bench.save_run(tmp_path / "clip_seed0", run, {"train_s": 1.5, "steps": 3})
    pred, facts = bench.load_run(tmp_path / "clip_seed0")
    assert set(pred) == set(run) and facts == {"train_s": 1.5, "steps": 3}
    for k in run:
        np.testing.assert_array_equal(pred[k], run[k])
    (tmp_path / "clip_seed0" / "facts.json").unlink()
    assert bench.load_run(tmp_path / "clip_seed0") is None
