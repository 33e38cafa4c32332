"""The files and the console table of a final evaluation (launch/evaluate.py, the `full` evaluator).

    metrics.json     every figure with its 95 % bootstrap interval, protocol settings
    per_label.csv    one row per label
    predictions.csv  per volume id: the zero-shot score of every label and its labels
    roc_grid.png     per-label ROC curves;  retrieval_recall.png  Recall@K curves

docs/evaluation.md describes every figure.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
from typing import Sequence

import numpy as np

from t3d_jax.evaluate import plots, zeroshot


def _json_ready(x):
    """``x`` with NumPy scalars and arrays as Python numbers and lists, NaN / inf as null."""
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None  # JSON has no NaN / inf
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _json_ready(x.tolist())
    return x


def write_outputs(out_dir: str | os.PathLike, metrics: dict, arrays: dict, label_names: Sequence[str]) -> pathlib.Path:
    """metrics.json, per_label.csv, predictions.csv and the two PNGs into ``out_dir``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_json_ready(metrics), indent=2))

    zs = metrics["zeroshot"]["per_label"]
    lf = metrics.get("zeroshot_leakfree", {}).get("per_label")
    pr = metrics.get("linear_probe", {}).get("per_label")
    with open(out / "per_label.csv", "w", newline="") as f:
        w = csv.writer(f)
        head = ["label", "n", "n_positive", "threshold"]
        for m in zeroshot.METRICS:
            head += [m, f"{m}_ci_low", f"{m}_ci_high"]
        if lf:
            head += ["leakfree_threshold", "leakfree_accuracy", "leakfree_f1_weighted", "leakfree_precision"]
        if pr:
            head += ["probe_auc"]
        w.writerow(head)
        for name in label_names:
            e = zs[name]
            row = [name, e["n"], e["n_positive"], e["threshold"]]
            for m in zeroshot.METRICS:
                row += [e[m]["value"], e[m]["ci_low"], e[m]["ci_high"]]
            if lf:
                row += [lf[name]["threshold"]] + [lf[name][m]["value"] for m in ("accuracy", "f1_weighted", "precision")]
            if pr:
                row += [pr[name]["auc"]]
            w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])

    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id"] + [f"score:{n}" for n in label_names] + [f"label:{n}" for n in label_names])
        for i, vid in enumerate(arrays["id"]):
            labels = ["" if np.isnan(v) else int(v) for v in arrays["labels"][i]]
            w.writerow([vid] + [f"{s:.9g}" for s in arrays["scores"][i]] + labels)

    plots.plot_roc_grid(arrays["scores"], arrays["labels"], label_names, out / "roc_grid.png",
                        aucs=[zs[n]["auc"]["value"] for n in label_names],
                        thresholds=[zs[n]["threshold"] for n in label_names],
                        threshold_rule=metrics["zeroshot"].get("threshold_rule", "roc"))
    plots.plot_recall_curve(arrays["ranks"], out / "retrieval_recall.png")
    return out


def format_table(metrics: dict, label_names: Sequence[str]) -> str:
    """The short console summary: per-label zero-shot figures, means with intervals, retrieval."""
    zs = metrics["zeroshot"]
    f = lambda v: "  n/a" if v is None or not np.isfinite(v) else f"{v:5.3f}"  # noqa: E731
    width = max(5, *(len(n) for n in label_names))
    ceil = metrics.get("ceiling")
    prompts = " vs ".join(t if isinstance(t, str) else " | ".join(t) for t in zs.get("templates", ()))
    lines = [f"Zero-shot (CT-CLIP protocol, {zs['num_volumes']} volumes, threshold chosen on this set)",
             f"Prompts (present vs absent; | = ensemble): {prompts}",
             f"{'label':<{width}}   AUC    ACC    F1w    PREC   n+" + ("   CEIL" if ceil else "")]
    for name in label_names:
        e = zs["per_label"][name]
        lines.append(f"{name:<{width}}  {f(e['auc']['value'])}  {f(e['accuracy']['value'])}  "
                     f"{f(e['f1_weighted']['value'])}  {f(e['precision']['value'])}  {e['n_positive']:3d}"
                     + (f"  {f(ceil['per_label_auc'].get(name))}" if ceil else ""))
    m = zs["mean"]
    lines.append(f"{'MEAN':<{width}}  {f(m['auc']['value'])}  {f(m['accuracy']['value'])}  "
                 f"{f(m['f1_weighted']['value'])}  {f(m['precision']['value'])}"
                 + (f"       {f(ceil['mean_auc'])}" if ceil else ""))
    ci = lambda e: f"[{f(e['ci_low'])}, {f(e['ci_high'])}]"  # noqa: E731
    lines.append(f"95% CI ({zs['num_bootstrap']} bootstrap): AUC {ci(m['auc'])}  ACC {ci(m['accuracy'])}  "
                 f"F1w {ci(m['f1_weighted'])}  PREC {ci(m['precision'])}")
    if "zeroshot_leakfree" in metrics:
        lm = metrics["zeroshot_leakfree"]["mean"]
        lines.append(f"Leak-free (thresholds from {metrics['zeroshot_leakfree']['thresholds_from']}): "
                     f"ACC {f(lm['accuracy']['value'])}  F1w {f(lm['f1_weighted']['value'])}  "
                     f"PREC {f(lm['precision']['value'])}")
    if "zeroshot_reports" in metrics:
        lines.append(f"Text-tower check (reports instead of volumes vs the prompts): mean AUC "
                     f"{f(metrics['zeroshot_reports']['mean_auc'])}")
    r = metrics["retrieval"]
    for d in ("report_to_volume", "volume_to_report"):
        lines.append(f"Retrieval {d.replace('_', ' ')} (N={r['num_items']}): " + "  ".join(
            f"{k} {v:.3f}" for k, v in r[d].items()) + f"   (chance R@5 {r['chance'].get('R@5', float('nan')):.3f})")
    if "linear_probe" in metrics:
        p = metrics["linear_probe"]
        lines.append(f"Linear probe (fit on {p['train_split']!r}): mean AUC {f(p['mean_auc'])} "
                     f"over {p['num_labels_in_mean']} labels")
    if ceil:
        where = "this data" if ceil["same_data"] else f"OTHER data ({ceil['data']}): not a bound for this run"
        lines.append(f"Supervised ceiling (CEIL; {ceil['source']}, measured on {where}): mean AUC "
                     f"{f(ceil['mean_auc'])} [{f(ceil['ci_low'])}, {f(ceil['ci_high'])}]; pooled-voxel "
                     f"logistic regression {f(ceil['pooled_lr_mean_auc'])}")
    return "\n".join(lines)
