"""The supervised ceiling beside a pretraining's figures (`eval.ceiling`).

`bench/ceiling.py` trains the image encoder on the labels themselves and writes per-label
held-out AUC (and a pooled-voxel logistic regression's) to a JSON file, with the prepared
data's fingerprint (`t3d_jax.data.prepared.data_fingerprint`). Naming that file in
`config.eval.ceiling` puts the ceiling in the evaluation's metrics and table, next to
zero-shot and probe AUC, so a reader sees how much of the signal the data and encoder allow
was captured. A file measured on other data is still shown, marked as such: its figures do
not bound this run.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

from t3d_jax.data.prepared import data_fingerprint
from t3d_jax.utils import UserFileNotFoundError, UserValueError


def ceiling_figures(path: str, data_dir: str, label_names: Sequence[str]) -> dict:
    """{"source", "same_data", "mean_auc", "ci_low", "ci_high", "pooled_lr_mean_auc", "per_label_auc"}
    from a bench/ceiling.py JSON; `same_data` compares its fingerprint with `data_dir`'s."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise UserFileNotFoundError(f"{file}: no such ceiling file (config.eval.ceiling; written by "
                                    f"bench/ceiling.py --out)")
    try:
        result = json.loads(file.read_text())
        sup = result["supervised"]
        mean = sup["mean"]["auc"]
        per_label = {n: sup["per_label"][n]["auc"]["value"] for n in label_names if n in sup["per_label"]}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserValueError(f"{file}: not a bench/ceiling.py result ({type(e).__name__}: {e})") from e
    fingerprint = result.get("data_fingerprint", "")
    return {"source": str(file), "same_data": bool(fingerprint) and fingerprint == data_fingerprint(data_dir),
            "data": result.get("data", ""), "mean_auc": mean["value"], "ci_low": mean.get("ci_low"),
            "ci_high": mean.get("ci_high"),
            "pooled_lr_mean_auc": (result.get("pooled_lr") or {}).get("mean", {}).get("auc", {}).get("value"),
            "per_label_auc": per_label}
