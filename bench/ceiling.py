r"""The supervised ceiling of a prepared dataset: per-label held-out AUC of the demo's image
encoder trained on the labels, beside a pooled-voxel logistic regression.

  python bench/ceiling.py --data demo_out/prepared [--steps N] [--out ceiling.json]
  python bench/ceiling.py --data DIR --set optim.lr=0.01 --set train.global_batch_size=16

1. Trains the `supervised` task (configs/supervised.py:demo: the demo's ViT3D, `model.image.*`,
   a linear head over its pooled embedding, 18 sigmoids, BCE on the labels) with the normal
   trainer, `t3d_jax.train.loop.train_and_evaluate`, on the `train` split of --data.
2. Restores the final checkpoint's parameters and scores the held-out split (`--split`, default
   `valid`; `t3d_jax.evaluate.classification.score_checkpoint`): whole volumes at the view size,
   `model.predict_labels`.
3. Per-label AUC with bootstrap intervals (`t3d_jax.evaluate.zeroshot.evaluate_scores`).
4. Baseline: scikit-learn LogisticRegression per label on the same whole volumes pooled in
   4^3-voxel blocks (mean, max and min of each block), standardised, fit on the train split.

Prints a table (per label: supervised AUC [CI], pooled-LR AUC) and writes JSON (--out). A
pretraining's zero-shot or linear-probe AUC on the same split is judged against these two: the
LR says how much a fixed, shallow read of the voxels finds, the supervised figure what the
encoder and budget reach when the labels themselves are the target.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

# Restore-and-score and the interval format live in the library (shared with bench/label_efficiency.py).
from t3d_jax.evaluate.classification import format_ci as _fmt, iterate_split, predict, score_checkpoint  # noqa: E402,F401

POOL = 4  # voxels per block edge of the logistic-regression baseline's features
LR_C = 0.1  # inverse L2 strength of the baseline (features standardised)


def load_config(spec: str, data_dir: str, steps: int | None, overrides: list[str]):
    """`configs/supervised.py:VARIANT` with data.dir, the step budget and dotted-key overrides."""
    from bench.compare_methods import apply_overrides, config_from_file  # the bench scripts' shared parts

    path, _, variant = spec.partition(":")
    config = config_from_file(path, variant or "demo")
    config.data.dir = str(data_dir)
    if steps is not None:
        config.train.num_steps = int(steps)
        config.checkpoint.every_steps = int(steps)
    apply_overrides(config, overrides)
    return config


def pooled_features(volumes: np.ndarray, block: int = POOL) -> np.ndarray:
    """[N, 3 * blocks] mean, max and min of each `block`^3 block of [N, X, Y, Z(, 1)] volumes."""
    v = volumes[..., 0] if volumes.ndim == 5 else volumes
    n, sx, sy, sz = v.shape
    gx, gy, gz = sx // block, sy // block, sz // block
    v = v[:, :gx * block, :gy * block, :gz * block]
    b = v.reshape(n, gx, block, gy, block, gz, block).transpose(0, 1, 3, 5, 2, 4, 6).reshape(n, -1, block ** 3)
    return np.concatenate([b.mean(-1), b.max(-1), b.min(-1)], axis=1)


def pooled_lr_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float = LR_C) -> np.ndarray:
    """[N_test, L] decision values of one L2 logistic regression per label on pooled features
    (rows whose label is NaN left out of that label's fit; NaN scores where a label has one class)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(pooled_features(train_x))
    f_train = scaler.transform(pooled_features(train_x))
    f_test = scaler.transform(pooled_features(test_x))
    scores = np.full((len(test_x), train_y.shape[1]), math.nan)
    for j in range(train_y.shape[1]):
        known = ~np.isnan(train_y[:, j])
        y = train_y[known, j].astype(int)
        if np.unique(y).size < 2:
            continue
        lr = LogisticRegression(C=c, max_iter=5000).fit(f_train[known], y)
        scores[:, j] = lr.decision_function(f_test)
    return scores


def table(result: dict) -> str:
    names = list(result["supervised"]["per_label"])
    width = max(len(n) for n in names) + 2
    lines = [f"{'label':<{width}}{'n+':>5}  {'supervised AUC [95% CI]':<26}{'pooled-LR AUC':>14}"]
    for name in names:
        sup = result["supervised"]["per_label"][name]
        lr = result["pooled_lr"]["per_label"][name]["auc"]["value"]
        lr_s = "   n/a" if lr is None or math.isnan(lr) else f"{lr:.3f}"
        lines.append(f"{name:<{width}}{sup['n_positive']:>5}  {_fmt(sup['auc']):<26}{lr_s:>14}")
    sup_mean, lr_mean = result["supervised"]["mean"]["auc"], result["pooled_lr"]["mean"]["auc"]["value"]
    lines.append(f"{'mean':<{width}}{'':>5}  {_fmt(sup_mean):<26}{lr_mean:>14.3f}")
    return "\n".join(lines)


def run(config, *, workdir: pathlib.Path, split: str, num_bootstrap: int, batch_size: int,
        log=print) -> dict:
    """Trains, restores, scores `split`; returns the JSON-ready result (see the module docstring)."""
    from t3d_jax.data.prepared import check_data_config, data_fingerprint, sync_config_with_data
    from t3d_jax.evaluate.zeroshot import evaluate_scores
    from t3d_jax.train.loop import train_and_evaluate

    check_data_config(config)
    config = sync_config_with_data(config)
    label_names = list(config.data.label_names)
    t0 = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    train_s = time.perf_counter() - t0
    log(f"trained {result.step} steps in {train_s:.0f} s")

    t1 = time.perf_counter()
    scored = score_checkpoint(config, workdir, split, batch_size)
    test_x, test_y, scores, step = scored["volumes"], scored["labels"], scored["scores"], scored["step"]
    train_split = str(config.data.train_split)
    train_x, train_y, _ = iterate_split(config, train_split, batch_size)
    supervised = evaluate_scores(scores, test_y, label_names, num_bootstrap=num_bootstrap)
    lr_scores = pooled_lr_scores(train_x, train_y, test_x)
    lr_cols = [j for j in range(len(label_names)) if not np.isnan(lr_scores[:, j]).all()]
    lr_eval = evaluate_scores(np.nan_to_num(lr_scores), test_y, label_names, num_bootstrap=num_bootstrap)
    for j, name in enumerate(label_names):
        if j not in lr_cols:
            lr_eval["per_label"][name]["auc"]["value"] = math.nan
    score_s = time.perf_counter() - t1
    log(f"scored {len(test_x)} {split} volumes (+ pooled-LR on {len(train_x)} {train_split}) in {score_s:.0f} s")
    return {
        "data": str(config.data.dir),
        "data_fingerprint": data_fingerprint(config.data.dir),  # eval.ceiling shows it beside runs on this data
        "split": split,
        "num_test": int(len(test_x)),
        "num_train": int(len(train_x)),
        "checkpoint_step": int(step),
        "train_seconds": round(train_s, 1),
        "score_seconds": round(score_s, 1),
        "config": {
            "view_size": list(config.data.view_size), "num_views": int(config.data.num_views),
            "crop_min": float(config.data.crop_min), "image": dict(config.model.image.to_dict()),
            "steps": int(config.train.num_steps), "global_batch_size": int(config.train.global_batch_size),
            "lr": float(config.optim.lr), "warmup_steps": int(config.optim.warmup_steps),
            "weight_decay": float(config.optim.weight_decay), "seed": int(config.train.seed),
        },
        "supervised": supervised,
        "pooled_lr": {"features": f"{POOL}^3-voxel blocks of the {split} volumes at view size: mean, max, min",
                      "C": LR_C, **lr_eval},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset folder (launch/prepare_data.py)")
    parser.add_argument("--steps", type=int, default=None, help="train steps (default: the config's)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--config", default="configs/supervised.py:demo", help="config file:variant")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. optim.lr=0.01 (repeatable)")
    parser.add_argument("--split", default="valid", help="held-out split to score")
    parser.add_argument("--workdir", default=None, help="run folder (default: a temporary one, removed)")
    parser.add_argument("--num-bootstrap", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32, help="scoring batch size")
    args = parser.parse_args(argv)

    from t3d_jax.console import quiet_library_logs

    quiet_library_logs()
    from bench.compare_methods import quiet_training, write_json

    config = quiet_training(load_config(args.config, args.data, args.steps, args.set))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ceiling_") as tmp:
        workdir = pathlib.Path(args.workdir or tmp)
        result = run(config, workdir=workdir, split=args.split, num_bootstrap=args.num_bootstrap,
                     batch_size=args.batch_size)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(table(result))
    print(f"wall time {result['wall_seconds']:.0f} s (train {result['train_seconds']:.0f} s)")
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
