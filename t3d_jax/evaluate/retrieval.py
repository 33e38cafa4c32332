"""Cross-modal retrieval: Recall@K, report -> volume and volume -> report.

Item i's report belongs to item i's volume. A query's rank is the number of candidates
that score at least as high as its true partner, not counting the partner itself
(pessimistic on exact ties). Why pessimistic: a collapsed model that maps everything to
one point ties every candidate, and an optimistic rule would score it R@1 = 1. Exact ties
otherwise only come from identical inputs (two identical reports), which this rule
counts against the model, as a fixed tie-break would half the time.

Recall@K is the fraction of queries whose rank is < K; chance is K / N.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 50, 100)


def true_partner_ranks(similarity: np.ndarray) -> np.ndarray:
    """0-based rank of each query's true partner (the diagonal) among all candidates.

    similarity: [N queries, N candidates]; row i's correct candidate is column i.
    """
    sim = np.asarray(similarity, np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"retrieval needs a square [N, N] similarity matrix (item i <-> item i), got {sim.shape}")
    correct = np.diag(sim)[:, None]
    return (sim >= correct).sum(axis=1) - 1  # minus the partner itself


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """{"R@K": fraction of queries with rank < K}."""
    ranks = np.asarray(ranks)
    return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}


def retrieval_metrics(volume_emb: np.ndarray, text_emb: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Recall@K both ways for paired, L2-normalised embeddings ([N, D] each, row i a pair).

    Returns {"report_to_volume": {R@K}, "volume_to_report": {R@K}, "chance": {R@K: K/N},
    "num_items": N, "median_rank": {direction: 1-based median rank}}.
    """
    v = np.asarray(volume_emb, np.float64)
    t = np.asarray(text_emb, np.float64)
    if v.shape != t.shape or v.ndim != 2:
        raise ValueError(f"volume {v.shape} and text {t.shape} embeddings must both be [N, D], row i a pair")
    n = v.shape[0]
    sim = t @ v.T  # [reports, volumes]
    r2v = true_partner_ranks(sim)
    v2r = true_partner_ranks(sim.T)
    return {
        "report_to_volume": recall_at_k(r2v, ks),
        "volume_to_report": recall_at_k(v2r, ks),
        "chance": {f"R@{k}": min(k, n) / n for k in ks},
        "num_items": int(n),
        "median_rank": {"report_to_volume": float(np.median(r2v) + 1), "volume_to_report": float(np.median(v2r) + 1)},
    }


def recall_curve(ranks: np.ndarray, max_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(K = 1..max_k, Recall@K) for plotting."""
    ranks = np.asarray(ranks)
    max_k = max_k or len(ranks)
    ks = np.arange(1, max_k + 1)
    return ks, (ranks[None, :] < ks[:, None]).mean(axis=1)
