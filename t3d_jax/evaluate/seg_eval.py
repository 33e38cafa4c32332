"""The `segmentation` evaluator: Dice and 95% Hausdorff per class on held-out label maps.

For every record of the evaluated split (``eval.split``, else ``data.eval_split``) that carries
a mask, the whole prepared volume goes through Gaussian-weighted sliding windows of
``data.view_size`` (t3d_jax/evaluate/segmentation.py, MONAI's algorithm) and the argmax label
map is scored against the stored mask on the stored grid, class by class
(`segmentation.dice_per_class`, `segmentation.hausdorff95_per_class` in mm of the record's
``spacing``). Per class the figure is the mean over the cases whose ground truth holds the class
(MONAI's ``ignore_empty``), with a percentile bootstrap interval over cases; the summary figure
is the mean over the foreground classes (class 0 left out).

**The grid the windows run on** (``eval.seg_grid``). Training views are boxes of
``crop_min..crop_max`` of each axis resampled to ``view_size``, so a view voxel is ``extent *
stored / view`` stored voxels. ``"views"`` (default) first resamples the stored volume (linear,
`t3d_jax.data.views.resample_box`, as the views are made) to ``round(view / mean extent)``
voxels per axis, where a window's voxel has the training views' mean size, and brings the
averaged class probabilities back to the stored grid (linear) before the argmax;
``"stored"`` runs the windows on the stored grid itself. The demo's whole-volume views
(``crop_min = crop_max = 1``: 64^3 stored, 32^3 views) are thus scored on one 32^3 window per
volume whose prediction is upsampled to 64^3, and a 50-100% crop range on windows of
``view / 0.75`` voxels.

**Intervals.** ``num_bootstrap`` resamples of the cases with replacement (the same draw for every
class, ``np.random.default_rng(seed).integers(0, n, (B, n))`` as `zeroshot.evaluate_scores`);
per resample the per-class mean over the finite values and their mean over the classes defined
on the whole set; the interval is the (1 - confidence) / 2 and 1 - (1 - confidence) / 2
percentiles of the finite resampled values. `paired_difference` does the same for two models
scored on the same cases (the same resampled cases score both: a paired bootstrap).

``eval`` keys read here: ``seg_grid`` ("views" | "stored"), ``seg_overlap`` (0.5),
``seg_sw_batch_size`` (default ``eval.batch_size``), ``seg_max_cases`` (0 = all; a periodic
evaluation may score the first N), ``num_bootstrap`` / ``periodic_num_bootstrap``.
With ``ctx.write`` (launch/evaluate.py) it writes WORKDIR/eval/STEP/segmentation.json (every
figure, per-case values) and segmentation_per_class.csv.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import warnings
from typing import Sequence

import numpy as np

from t3d_jax.evaluate import segmentation as seg
from t3d_jax.evaluate.registry import EvalContext, register_evaluator
from t3d_jax.evaluate.report import _json_ready
from t3d_jax.utils import UserValueError, cfg_get

GRIDS = ("views", "stored")


def _setting(config, key: str, default):
    return cfg_get(cfg_get(config, "eval"), key, default)


def class_names(config) -> list[str]:
    """Names of classes 0..K-1 (K = ``model.seg.num_classes``) from the prepared data's class
    table (dataset.json ``masks.classes``); refuses a table that does not fit K."""
    from t3d_jax.data.pipeline import read_dataset_info

    k = int(config.model.seg.num_classes)
    table = (read_dataset_info(config.data.dir).get("masks") or {}).get("classes")
    if not table:
        return ["background"] + [f"class_{i}" for i in range(1, k)]
    table = {int(i): str(n) for i, n in table.items()}
    if max(table) >= k:
        raise UserValueError(f"{config.data.dir}/dataset.json: the mask class table has indices up to "
                             f"{max(table)}, but model.seg.num_classes is {k}; set "
                             f"--config.model.seg.num_classes={max(table) + 1}")
    return [table.get(i, f"class_{i}") for i in range(k)]


def inference_grid(data_config, stored_shape: Sequence[int], grid: str = "views") -> tuple[int, int, int]:
    """Voxels per axis the sliding windows run on (module docstring): the stored grid, or the
    one whose voxel has the training views' mean size (never smaller than a window)."""
    if grid not in GRIDS:
        raise UserValueError(f"eval.seg_grid must be one of {GRIDS}, got {grid!r}")
    stored = tuple(int(s) for s in stored_shape)
    if grid == "stored":
        return stored
    view = [int(s) for s in cfg_get(data_config, "view_size", stored)]
    extent = 0.5 * (float(cfg_get(data_config, "crop_min", 1.0)) + float(cfg_get(data_config, "crop_max", 1.0)))
    return tuple(max(v, int(round(v / extent))) for v in view)


def _resample_channels(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """[X, Y, Z, C] -> [*shape, C], each channel linearly over the whole extent (resample_box)."""
    from t3d_jax.data.views import resample_box

    if tuple(x.shape[:3]) == tuple(shape):
        return x
    full = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    return np.stack([resample_box(x[..., c], full, shape) for c in range(x.shape[-1])], axis=-1)


def read_cases(config, split: str, max_cases: int = 0):
    """Yields (id, model-input volume [X, Y, Z, 1] float32 on the stored grid, mask [X, Y, Z]
    int32, spacing (3,) mm) of every record of ``split`` with a mask (the first ``max_cases``
    when > 0). Records without a mask are skipped; none at all is an error."""
    from t3d_jax.data.pipeline import _decode, open_split

    source = open_split(config.data.dir, split)
    found = 0
    for index in range(len(source)):
        record = _decode(source[index], f"record {index} of split {split!r} in {config.data.dir}")
        if "mask" not in record:
            continue
        volume = record["volume"].astype(np.float32) * np.float32(record["intensity_scale"])
        volume += np.float32(record["intensity_offset"])
        spacing = np.asarray(record.get("spacing", np.ones(3)), np.float64)
        yield str(record["id"]), volume[..., None], np.asarray(record["mask"], np.int32), spacing
        found += 1
        if max_cases and found >= max_cases:
            return
    if not found:
        raise UserValueError(f"{config.data.dir}: no record of split {split!r} has a mask; the segmentation "
                             "evaluator needs label maps (prepare a manifest with a `mask` column, docs/data.md)")


def score_cases(model, config, split: str, *, grid: str = "views", overlap: float = 0.5,
                sw_batch_size: int = 8, max_cases: int = 0) -> dict:
    """{ids, dice [N, K], hd95 [N, K], predicted [N, K] (class predicted anywhere), spacing
    [N, 3], grid}: the model's label maps of every masked case of ``split`` scored against the
    stored masks (module docstring). Cases of one stored shape go through the windows
    ``sw_batch_size`` at a time (one window per case at the demo's size: a batch of cases)."""
    k = int(config.model.seg.num_classes)
    roi = tuple(int(s) for s in config.data.view_size)
    predictor = seg.window_predictor(model)
    out = {"ids": [], "dice": [], "hd95": [], "predicted": [], "spacing": []}
    grids = set()

    def flush(batch):
        shape = inference_grid(config.data, batch[0][2].shape, grid)
        grids.add(shape)
        x = np.stack([_resample_channels(volume, shape) for _, volume, _, _ in batch])
        probs = seg.sliding_window_inference(x, roi, predictor, overlap=overlap, mode="gaussian",
                                             sw_batch_size=sw_batch_size)
        for (case_id, _, mask, spacing), p in zip(batch, probs):
            labels = np.argmax(_resample_channels(p, mask.shape), axis=-1)
            out["ids"].append(case_id)
            out["dice"].append(seg.dice_per_class(labels, mask, k))
            out["hd95"].append(seg.hausdorff95_per_class(labels, mask, k, spacing=spacing))
            out["predicted"].append(np.bincount(labels.ravel(), minlength=k)[:k] > 0)
            out["spacing"].append(spacing)

    batch = []
    for case in read_cases(config, split, max_cases):
        if batch and (len(batch) == sw_batch_size or case[2].shape != batch[0][2].shape):
            flush(batch)
            batch = []
        batch.append(case)
    flush(batch)
    result = {key: (v if key == "ids" else np.asarray(v)) for key, v in out.items()}
    result["grid"] = [list(g) for g in sorted(grids)][0] if len(grids) == 1 else [list(g) for g in sorted(grids)]
    return result


# ----------------------------------------------------------------------------------- bootstrap
def _class_means(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # a class with no finite case in a resample: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=0)


def _interval(samples: np.ndarray, confidence: float) -> list[float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [math.nan, math.nan]
    alpha = 1.0 - confidence
    lo, hi = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)]


def _mean_over(per_class: np.ndarray, classes: np.ndarray) -> float | np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(per_class[..., classes], axis=-1)


def bootstrap_classes(per_case: np.ndarray, names: Sequence[str], *, num_bootstrap: int = 1000, seed: int = 0,
                      confidence: float = 0.95, foreground_from: int = 1) -> dict:
    """Per-class mean over cases of ``per_case`` [N, K] (finite values only) with bootstrap
    intervals, and the mean over classes ``foreground_from..K-1`` defined on the whole set.
    Returns {"per_class": {name: {value, ci, n}}, "mean": {value, ci}, "classes_in_mean"}."""
    values = np.asarray(per_case, np.float64)
    n, k = values.shape
    if k != len(names):
        raise ValueError(f"per_case has {k} classes, names {len(names)}")
    point = _class_means(values)
    in_mean = np.array([c for c in range(foreground_from, k) if np.isfinite(point[c])], np.int64)
    boots = np.full((num_bootstrap, k), math.nan)
    for b, idx in enumerate(np.random.default_rng(seed).integers(0, n, (num_bootstrap, n))):
        boots[b] = _class_means(values[idx])
    mean_boots = _mean_over(boots, in_mean) if in_mean.size else np.full(num_bootstrap, math.nan)
    counts = np.isfinite(values).sum(axis=0)
    return {
        "per_class": {name: {"value": float(point[c]), "ci": _interval(boots[:, c], confidence), "n": int(counts[c])}
                      for c, name in enumerate(names)},
        "mean": {"value": float(_mean_over(point, in_mean)) if in_mean.size else math.nan,
                 "ci": _interval(np.asarray(mean_boots), confidence)},
        "classes_in_mean": [names[c] for c in in_mean],
        "num_cases": int(n), "num_bootstrap": int(num_bootstrap), "confidence": confidence,
    }


def paired_difference(a: np.ndarray, b: np.ndarray, names: Sequence[str], *, num_bootstrap: int = 1000,
                      seed: int = 0, confidence: float = 0.95, foreground_from: int = 1) -> dict:
    """Per-class mean of ``a`` minus that of ``b`` ([N, K] each, the same cases in the same
    order), and of the foreground mean over classes defined in both, with intervals from one
    paired bootstrap over cases (the same resampled cases for both)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.shape[1] != len(names):
        raise ValueError(f"paired_difference: {a.shape} and {b.shape} must both be [N, {len(names)}]")
    n, k = a.shape
    point = _class_means(a) - _class_means(b)
    in_mean = np.array([c for c in range(foreground_from, k) if np.isfinite(point[c])], np.int64)
    boots = np.full((num_bootstrap, k), math.nan)
    for i, idx in enumerate(np.random.default_rng(seed).integers(0, n, (num_bootstrap, n))):
        boots[i] = _class_means(a[idx]) - _class_means(b[idx])
    mean_boots = _mean_over(boots, in_mean) if in_mean.size else np.full(num_bootstrap, math.nan)
    return {
        "per_class": {name: {"value": float(point[c]), "ci": _interval(boots[:, c], confidence)}
                      for c, name in enumerate(names)},
        "mean": {"value": float(_mean_over(point, in_mean)) if in_mean.size else math.nan,
                 "ci": _interval(np.asarray(mean_boots), confidence)},
        "classes_in_mean": [names[c] for c in in_mean],
        "num_cases": int(n), "num_bootstrap": int(num_bootstrap), "confidence": confidence,
    }


def figures(scored: dict, names: Sequence[str], *, num_bootstrap: int, seed: int = 0) -> dict:
    """Dice and HD95 (`bootstrap_classes`) of a `score_cases` result, with per class the number
    of cases predicting it where the ground truth lacks it (`false_positive_cases`: Dice leaves
    these cases out)."""
    present = np.isfinite(scored["dice"])
    out = {"num_cases": len(scored["ids"]), "class_names": list(names), "grid": scored["grid"],
           "dice": bootstrap_classes(scored["dice"], names, num_bootstrap=num_bootstrap, seed=seed),
           "hd95_mm": bootstrap_classes(scored["hd95"], names, num_bootstrap=num_bootstrap, seed=seed),
           "false_positive_cases": {n: int(np.sum(scored["predicted"][:, c] & ~present[:, c]))
                                    for c, n in enumerate(names)}}
    return out


# ----------------------------------------------------------------------------------- the evaluator
def _format(entry: dict, digits: int = 3) -> str:
    v, (lo, hi) = entry["value"], entry["ci"]
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}f}" + ("" if not math.isfinite(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]")


def format_table(metrics: dict) -> str:
    names = metrics["class_names"]
    width = max(len(n) for n in names) + 2
    lines = [f"Segmentation: {metrics['num_cases']} '{metrics.get('split', '?')}' cases, windows on a "
             f"{'x'.join(map(str, metrics['grid']))} grid [95% bootstrap CI over cases]",
             f"{'class':<{width}}{'n':>4}  {'Dice':<24}{'HD95 mm':<24}{'FP cases':>8}"]
    for name in names:
        d, h = metrics["dice"]["per_class"][name], metrics["hd95_mm"]["per_class"][name]
        lines.append(f"{name:<{width}}{d['n']:>4}  {_format(d):<24}{_format(h, 1):<24}"
                     f"{metrics['false_positive_cases'][name]:>8}")
    lines.append(f"{'mean (foreground)':<{width}}      {_format(metrics['dice']['mean']):<24}"
                 f"{_format(metrics['hd95_mm']['mean'], 1):<24}")
    return "\n".join(lines)


def write_files(out_dir: pathlib.Path, metrics: dict, scored: dict) -> pathlib.Path:
    """segmentation.json (figures + per-case Dice/HD95) and segmentation_per_class.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = metrics["class_names"]
    per_case = {"ids": scored["ids"], "dice": scored["dice"], "hd95_mm": scored["hd95"]}
    (out_dir / "segmentation.json").write_text(json.dumps(_json_ready({**metrics, "per_case": per_case}), indent=1))
    with open(out_dir / "segmentation_per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "index", "n_cases", "dice", "dice_ci_low", "dice_ci_high", "hd95_mm",
                    "hd95_ci_low", "hd95_ci_high", "false_positive_cases"])
        for c, name in enumerate(names):
            d, h = metrics["dice"]["per_class"][name], metrics["hd95_mm"]["per_class"][name]
            w.writerow([name, c, d["n"], d["value"], *d["ci"], h["value"], *h["ci"],
                        metrics["false_positive_cases"][name]])
    return out_dir


def evaluate(ctx: EvalContext) -> tuple[dict, dict]:
    """(figures, the `score_cases` result) of ``ctx``'s model on the evaluated split; files
    under WORKDIR/eval/STEP/ when ``ctx.write`` (process 0)."""
    import jax

    config = ctx.config
    split = str(_setting(config, "split", "") or config.data.eval_split)
    names = class_names(config)
    final = bool(ctx.write)
    num_bootstrap = int(_setting(config, "num_bootstrap", 1000) if final
                        else _setting(config, "periodic_num_bootstrap", 0))
    with jax.set_mesh(ctx.mesh):
        scored = score_cases(ctx.model, config, split, grid=str(_setting(config, "seg_grid", "views")),
                             overlap=float(_setting(config, "seg_overlap", 0.5)),
                             sw_batch_size=int(_setting(config, "seg_sw_batch_size", 0)
                                               or _setting(config, "batch_size", 8)),
                             max_cases=0 if final else int(_setting(config, "seg_max_cases", 0)))
    metrics = figures(scored, names, num_bootstrap=num_bootstrap)
    metrics.update(step=int(ctx.step), split=split, data_dir=str(config.data.dir))
    if ctx.write and jax.process_index() == 0:
        write_files(pathlib.Path(ctx.workdir) / "eval" / str(ctx.step), metrics, scored)
    return metrics, scored


@register_evaluator("segmentation")
def segmentation_evaluator(ctx: EvalContext) -> dict[str, float]:
    """Mean foreground Dice and HD95, and the Dice of every class (`dice/<name>`)."""
    m, _ = evaluate(ctx)
    out = {"mean_dice": m["dice"]["mean"]["value"], "mean_hd95_mm": m["hd95_mm"]["mean"]["value"]}
    out.update({f"dice/{name}": e["value"] for name, e in m["dice"]["per_class"].items()})
    return out


def evaluate_checkpoint(config, workdir: str | os.PathLike, *, step: int | None = None,
                        split: str | None = None) -> tuple[dict, pathlib.Path]:
    """launch/evaluate.py for a `segmentation` run: restore the parameters, score, write
    WORKDIR/eval/STEP/segmentation.json and segmentation_per_class.csv, print the table."""
    import jax

    from t3d_jax.data.prepared import check_data_config, sync_config_with_data
    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import params as params_lib

    check_data_config(config)
    config = sync_config_with_data(config)
    if split:
        config.eval.split = split
    mesh = mesh_lib.make_mesh(config.mesh)
    model, got = params_lib.restore_model(config, params_lib.checkpoint_dir(config, workdir), step, mesh=mesh)
    ctx = EvalContext(model=model, config=config, step=got, workdir=os.fspath(workdir), mesh=mesh, write=True)
    metrics, _ = evaluate(ctx)
    out = pathlib.Path(workdir) / "eval" / str(got)
    if jax.process_index() == 0:
        print(format_table(metrics))
        print(f"Wrote {out}/segmentation.json, {out}/segmentation_per_class.csv")
    return metrics, out
