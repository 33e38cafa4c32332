"""Cross-modal retrieval: Recall@K, report -> volume and volume -> report.

Item i's report belongs to item i's volume. A query's rank is the number of candidates
that score at least as high as its true partner, not counting the partner itself
(pessimistic on exact ties). Why pessimistic: a collapsed model that maps everything to
one point ties every candidate, and an optimistic rule would score it R@1 = 1. Exact ties
otherwise only come from identical inputs (two identical reports), which this rule
counts against the model, as a fixed tie-break would half the time.

Recall@K is the fraction of queries whose rank is < K; chance is K / N.

The ``retrieval`` evaluator (bottom) scores a model on the evaluated split alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from t3d_jax.evaluate.embedding import EmbeddingCache
from t3d_jax.evaluate.registry import EvalContext, register_evaluator

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


def partner_ranks(volume_emb: np.ndarray, text_emb: np.ndarray) -> dict[str, np.ndarray]:
    """0-based true-partner ranks both ways for paired embeddings ([N, D] each, row i a pair)."""
    v = np.asarray(volume_emb, np.float64)
    t = np.asarray(text_emb, np.float64)
    if v.shape != t.shape or v.ndim != 2:
        raise ValueError(f"volume {v.shape} and text {t.shape} embeddings must both be [N, D], row i a pair")
    sim = t @ v.T  # [reports, volumes]
    return {"report_to_volume": true_partner_ranks(sim), "volume_to_report": true_partner_ranks(sim.T)}


def retrieval_metrics(volume_emb: np.ndarray, text_emb: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Recall@K both ways for paired, L2-normalised embeddings ([N, D] each, row i a pair).

    Returns {"report_to_volume": {R@K}, "volume_to_report": {R@K}, "chance": {R@K: K/N},
    "num_items": N, "median_rank": {direction: 1-based median rank}}.
    """
    return metrics_of_ranks(partner_ranks(volume_emb, text_emb), ks)


def metrics_of_ranks(ranks: dict[str, np.ndarray], ks: Sequence[int] = DEFAULT_KS) -> dict:
    """`retrieval_metrics` from precomputed `partner_ranks` (an evaluation keeps the ranks for its recall plot)."""
    n = len(ranks["report_to_volume"])
    return {
        "report_to_volume": recall_at_k(ranks["report_to_volume"], ks),
        "volume_to_report": recall_at_k(ranks["volume_to_report"], ks),
        "chance": {f"R@{k}": min(k, n) / n for k in ks},
        "num_items": int(n),
        "median_rank": {d: float(np.median(r) + 1) for d, r in ranks.items()},
    }


def recall_curve(ranks: np.ndarray, max_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(K = 1..max_k, Recall@K) for plotting."""
    ranks = np.asarray(ranks)
    max_k = max_k or len(ranks)
    ks = np.arange(1, max_k + 1)
    return ks, (ranks[None, :] < ks[:, None]).mean(axis=1)


def figures(cache: EmbeddingCache) -> tuple[dict, dict[str, np.ndarray]]:
    """(`retrieval_metrics` of the evaluated split at ``eval.retrieval_ks``, the ranks)."""
    evaluated = cache.evaluated()
    ranks = partner_ranks(evaluated["volume"], evaluated["text"])
    return metrics_of_ranks(ranks, tuple(cache.setting("retrieval_ks", DEFAULT_KS))), ranks


@register_evaluator("retrieval")
def retrieval_evaluator(ctx: EvalContext) -> dict[str, float]:
    """Recall@K both ways, as "<direction>/R@K"."""
    m, _ = figures(EmbeddingCache.of(ctx))
    return {f"{d}/{k}": v for d in ("report_to_volume", "volume_to_report") for k, v in m[d].items()}
