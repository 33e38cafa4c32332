"""PNG plots of an evaluation: per-label ROC curves on one grid, the retrieval recall curve.

matplotlib's Agg backend (no display needed; safe on servers and in tests). The
functions take plain arrays and write one file each, returning its path.
"""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from t3d_jax.evaluate.retrieval import recall_curve  # noqa: E402
from t3d_jax.evaluate.zeroshot import predict, roc_points  # noqa: E402


def plot_roc_grid(
    scores: np.ndarray,
    labels: np.ndarray,
    label_names: Sequence[str],
    path: str | pathlib.Path,
    *,
    aucs: Sequence[float] | None = None,
    thresholds: Sequence[float] | None = None,
    threshold_rule: str = "roc",
    title: str = "Zero-shot ROC per label",
) -> pathlib.Path:
    """Grid of per-label ROC curves, AUC in each panel title, the chosen operating point marked."""
    num = len(label_names)
    cols = min(6, num)
    rows = math.ceil(num / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for c, name in enumerate(label_names):
        ax = axes[c // cols][c % cols]
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
        pts = roc_points(labels[:, c], scores[:, c])
        head = name if len(name) <= 26 else name[:24] + "..."
        if pts is None:
            ax.set_title(f"{head}\n(one class only)", fontsize=7)
        else:
            ax.plot(pts[0], pts[1], lw=1.4, color="tab:blue")
            auc_txt = "" if aucs is None or not np.isfinite(aucs[c]) else f"AUC {aucs[c]:.3f}"
            ax.set_title(f"{head}\n{auc_txt}", fontsize=7)
            if thresholds is not None and not np.isnan(thresholds[c]):
                known = ~np.isnan(labels[:, c])
                y, s = labels[known, c].astype(int), scores[known, c]
                pred = predict(s, thresholds[c], threshold_rule).astype(bool)
                tpr = pred[y == 1].mean()
                fpr = pred[y == 0].mean()
                ax.plot([fpr], [tpr], "o", color="tab:red", ms=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
    for c in range(num, rows * cols):
        axes[c // cols][c % cols].axis("off")
    fig.suptitle(title + "  (x: FPR, y: TPR; red: operating point)", fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_recall_curve(
    ranks: dict[str, np.ndarray], path: str | pathlib.Path, *, max_k: int | None = None, title: str = "Retrieval"
) -> pathlib.Path:
    """Recall@K against K for each direction (``{name: ranks}``), with the chance line K/N."""
    fig, ax = plt.subplots(figsize=(5, 4))
    n = 0
    for name, r in ranks.items():
        r = np.asarray(r)
        n = max(n, len(r))
        ks, rec = recall_curve(r, max_k or len(r))
        ax.plot(ks, rec, lw=1.6, label=name.replace("_", " "))
    ks = np.arange(1, (max_k or n) + 1)
    ax.plot(ks, np.minimum(ks / max(n, 1), 1.0), ls="--", color="0.5", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title} (N={n})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
