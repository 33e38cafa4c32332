"""Retrieval Recall@K on constructed cases with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from t3d_jax.evaluate import retrieval


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def test_known_ranks_on_a_constructed_similarity():
    # Row i's partner is column i. Ranks by construction: 0, 1, 3, 0.
    sim = np.array([
        [0.9, 0.1, 0.2, 0.3],
        [0.8, 0.5, 0.1, 0.0],
        [0.7, 0.6, 0.4, 0.5],
        [0.1, 0.2, 0.3, 0.4],
    ])
    ranks = retrieval.true_partner_ranks(sim)
    np.testing.assert_array_equal(ranks, [0, 1, 3, 0])
    rec = retrieval.recall_at_k(ranks, (1, 2, 3, 4, 100))
    assert rec == {"R@1": 0.5, "R@2": 0.75, "R@3": 0.75, "R@4": 1.0, "R@100": 1.0}


def test_ties_count_against_the_query():
    """A collapsed model (all similarities equal) must not look perfect."""
    ranks = retrieval.true_partner_ranks(np.ones((10, 10)))
    np.testing.assert_array_equal(ranks, np.full(10, 9))
    assert retrieval.recall_at_k(ranks, (1, 5, 10)) == {"R@1": 0.0, "R@5": 0.0, "R@10": 1.0}


def test_both_directions_with_a_planted_permutation():
    """Reports 0..N-1 embed exactly their volume, except a swapped pair and one far-off report."""
    rng = np.random.default_rng(0)
    n, d = 200, 32
    vol = _unit(rng.normal(size=(n, d)))
    vol[4] = _unit(vol[3] + 0.05 * rng.normal(size=d))  # 3 and 4 look alike: each other's runner-up
    txt = vol.copy()
    txt[[3, 4]] = vol[[4, 3]]  # reports 3 and 4 describe each other's volume
    txt[7] = _unit(-vol[7])  # report 7 points away from its volume: the worst rank
    out = retrieval.retrieval_metrics(vol, txt)
    # report -> volume: 197 of 200 at rank 0; 3 and 4 find the other volume first.
    assert out["report_to_volume"]["R@1"] == pytest.approx(197 / 200)
    assert out["volume_to_report"]["R@1"] == pytest.approx(197 / 200)
    # Report 7 is anti-aligned with its volume, so its volume is the least similar: rank N-1;
    # the swapped pair find their partner second.
    ranks = retrieval.true_partner_ranks(txt @ vol.T)
    assert ranks[7] == n - 1
    assert ranks[3] == ranks[4] == 1
    assert out["report_to_volume"]["R@100"] == pytest.approx(199 / 200)
    assert out["chance"] == {"R@1": 1 / n, "R@5": 5 / n, "R@10": 10 / n, "R@50": 50 / n, "R@100": 100 / n}
    assert out["num_items"] == n
    # The ranks an evaluation keeps for its recall plot are the ones behind these figures.
    both = retrieval.partner_ranks(vol, txt)
    np.testing.assert_array_equal(both["report_to_volume"], ranks)
    np.testing.assert_array_equal(both["volume_to_report"], retrieval.true_partner_ranks(vol @ txt.T))
    assert retrieval.metrics_of_ranks(both) == out
    assert out["median_rank"] == {"report_to_volume": 1.0, "volume_to_report": 1.0}


def test_random_embeddings_are_near_chance():
    rng = np.random.default_rng(1)
    n = 400
    vol, txt = _unit(rng.normal(size=(n, 16))), _unit(rng.normal(size=(n, 16)))
    out = retrieval.retrieval_metrics(vol, txt, ks=(50,))
    # Binomial(400, 0.125): sd 0.0165; 4 sd either side.
    assert abs(out["report_to_volume"]["R@50"] - 0.125) < 0.066


def test_recall_curve_is_monotone_and_ends_at_one():
    ranks = np.array([0, 4, 2, 9, 1])
    ks, rec = retrieval.recall_curve(ranks)
    np.testing.assert_array_equal(ks, np.arange(1, 6))
    np.testing.assert_allclose(rec, [0.2, 0.4, 0.6, 0.6, 0.8])
    assert np.all(np.diff(rec) >= 0)


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match="square"):
        retrieval.true_partner_ranks(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="pair"):
        retrieval.retrieval_metrics(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="pair"):
        retrieval.partner_ranks(np.zeros((3, 4)), np.zeros((3, 5)))
