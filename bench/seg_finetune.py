r"""Segmentation fine-tuning from a pretraining's image encoder against the same fine-tune from
scratch: Dice per class on held-out label maps, pretrained minus scratch with a paired bootstrap.

  python bench/seg_finetune.py --data demo_out/prepared_seg --pretrained demo_out/run \
      [--steps N] [--mode full|frozen|layer_decay] [--config configs/finetune_seg.py:demo] \
      [--set KEY=VALUE ...] [--out bench/results/seg_finetune_demo.json]

Both arms train configs/finetune_seg.py (the `segmentation` task, UNETR on the ViT) with the
normal trainer on the same data, steps, batch, learning rate and seed; the pretrained arm with
`init_from.checkpoint = RUN_DIR/checkpoints` reading only `image_encoder` (the decoder fresh),
the scratch arm with none. Each is then scored on the held-out split (--split, default
`valid`) by the `segmentation` evaluator's code (t3d_jax/evaluate/seg_eval.py: Gaussian
sliding windows over every whole prepared volume with a mask, Dice and HD95 per class with
bootstrap intervals over cases), and the pretrained-minus-scratch Dice per class and of the
foreground mean gets a paired bootstrap over the same cases (`seg_eval.paired_difference`).
`model.seg.num_classes` is set from the prepared data's class table. The pretraining's image
settings (`model.image.*`, `data.view_size`) must be the fine-tune config's: a checkpoint that
does not fit stops with the tensors that differ. Without --pretrained only the scratch arm runs.

The runs live in --workdir/pretrained and --workdir/scratch. An arm whose folder already holds
its final checkpoint is scored without training again (the trainer resumes at the last step),
so the two arms may be trained elsewhere -- e.g. at the same time, as two `launch/train.py`
runs of the same config -- and scored here; a folder whose config.json differs from the arm's
config in the model, optimizer, loss, training, initialisation or view keys is refused. The
losses are read from each run's metrics.jsonl.

Prints the table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
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

ARMS = ("pretrained", "scratch")


def load_config(spec: str, data_dir: str, steps: int | None, mode: str, overrides: list[str]):
    """`configs/finetune_seg.py:VARIANT` in `mode` on `data_dir`, with the step budget, the class
    count of the data's class table and --set overrides."""
    from bench.compare_methods import apply_overrides, config_from_file
    from t3d_jax.data.pipeline import read_dataset_info

    path, _, variant = spec.partition(":")
    config = config_from_file(path, f"{variant or 'demo'},{mode}")
    config.data.dir = str(data_dir)
    config.data.synthetic_if_missing = 0
    classes = (read_dataset_info(data_dir).get("masks") or {}).get("classes")
    if not classes:
        raise SystemExit(f"--data {data_dir}: dataset.json has no mask class table; prepare a manifest with a "
                         "`mask` column (launch/make_synthetic.py --masks)")
    config.model.seg.num_classes = max(int(k) for k in classes) + 1
    if steps is not None:
        config.train.num_steps = int(steps)
        config.optim.warmup_steps = min(int(config.optim.warmup_steps), max(int(steps) // 10, 1))
    config.checkpoint.every_steps = int(config.train.num_steps)
    config.init_from.checkpoint = ""
    apply_overrides(config, overrides)
    return config


def score_run(config, workdir, split: str) -> dict:
    """`seg_eval.score_cases` of the newest checkpoint in `workdir` on `split`."""
    import jax

    from t3d_jax.evaluate import seg_eval
    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import params as params_lib

    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        model, step = params_lib.restore_model(config, params_lib.checkpoint_dir(config, workdir), None, mesh=mesh)
        scored = seg_eval.score_cases(model, config, split, grid=str(config.eval.seg_grid),
                                      overlap=float(config.eval.seg_overlap),
                                      sw_batch_size=int(config.eval.seg_sw_batch_size or config.eval.batch_size))
    scored["step"] = int(step)
    return scored


COMPARED = ("task", "model", "optim", "loss", "train", "init_from")
COMPARED_DATA = ("dir", "view_size", "crop_min", "crop_max", "masks", "train_split")


def check_same_run(config, workdir: pathlib.Path) -> None:
    """Refuses a run folder whose config.json is not this arm's config (module docstring)."""
    saved = workdir / "config.json"
    if not saved.is_file():
        return
    old, new = json.loads(saved.read_text()), json.loads(config.to_json_best_effort())
    differ = [k for k in COMPARED if old.get(k) != new.get(k)]
    differ += [f"data.{k}" for k in COMPARED_DATA if old.get("data", {}).get(k) != new["data"].get(k)]
    if differ:
        raise SystemExit(f"{workdir}: holds a run trained with another config ({', '.join(differ)} differ); "
                         "use another --workdir or remove it")


def run(config, *, pretrained: str | None, root: pathlib.Path, split: str, num_bootstrap: int, log=print) -> dict:
    """Trains and scores both arms; the JSON-ready result (module docstring)."""
    from t3d_jax.data.prepared import check_data_config, data_fingerprint, sync_config_with_data
    from t3d_jax.evaluate import seg_eval
    from t3d_jax.train.loop import train_and_evaluate

    check_data_config(config)
    config = sync_config_with_data(config)
    names = seg_eval.class_names(config)
    arms = ARMS if pretrained else ARMS[1:]
    result = {"data": str(config.data.dir), "data_fingerprint": data_fingerprint(config.data.dir),
              "split": split, "pretrained": pretrained, "arms": list(arms), "class_names": names,
              "config": {"steps": int(config.train.num_steps), "global_batch_size": int(config.train.global_batch_size),
                         "lr": float(config.optim.lr), "warmup_steps": int(config.optim.warmup_steps),
                         "freeze": list(config.optim.freeze), "layer_decay": float(config.optim.layer_decay),
                         "seed": int(config.train.seed), "view_size": list(config.data.view_size),
                         "crop": [float(config.data.crop_min), float(config.data.crop_max)],
                         "seg": dict(config.model.seg.to_dict()), "image": dict(config.model.image.to_dict()),
                         "eval_grid": str(config.eval.seg_grid), "overlap": float(config.eval.seg_overlap)},
              "arms_result": {}}
    scored = {}
    for arm in arms:
        c = config.copy_and_resolve_references()
        c.init_from.checkpoint = pretrained if arm == "pretrained" else ""
        workdir = root / arm
        check_same_run(c, workdir)
        log(f"== {arm}: {c.train.num_steps} steps -> {workdir}")
        t0 = time.perf_counter()
        trained = train_and_evaluate(c, workdir)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scored[arm] = score_run(c, workdir, split)
        score_s = time.perf_counter() - t0
        logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses = [h["loss"] for h in logged if "loss" in h]
        step_times = [h["perf/step_time_s"] for h in logged if "perf/step_time_s" in h]
        figs = seg_eval.figures(scored[arm], names, num_bootstrap=num_bootstrap)
        result["arms_result"][arm] = {"train_seconds_here": round(train_s, 1), "score_seconds": round(score_s, 1),
                                      "steps": int(trained.step), "logged_losses": losses,
                                      "mean_step_time_s": float(np.mean(step_times)) if step_times else math.nan,
                                      "first_loss": float(losses[0]) if losses else math.nan,
                                      "final_loss": float(losses[-1]) if losses else math.nan, **figs,
                                      "per_case": {"ids": scored[arm]["ids"], "dice": scored[arm]["dice"].tolist()}}
        log(f"   {train_s:.0f} s in the trainer (loss {result['arms_result'][arm]['first_loss']:.3f} -> "
            f"{result['arms_result'][arm]['final_loss']:.3f}), scored {score_s:.0f} s: mean Dice "
            f"{figs['dice']['mean']['value']:.3f}")
    if pretrained:
        if scored["pretrained"]["ids"] != scored["scratch"]["ids"]:
            raise RuntimeError("the two arms were scored on different cases")
        result["difference"] = seg_eval.paired_difference(scored["pretrained"]["dice"], scored["scratch"]["dice"],
                                                          names, num_bootstrap=num_bootstrap)
    result["num_cases"] = len(scored[arms[0]]["ids"])
    return result


def _ci(entry: dict, digits: int = 3, sign: str = "") -> str:
    v, (lo, hi) = entry["value"], entry["ci"]
    if v is None or not math.isfinite(v):
        return "n/a"
    if lo is None or not math.isfinite(lo):
        return f"{v:{sign}.{digits}f}"
    return f"{v:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def table(result: dict) -> str:
    arms, names = result["arms"], result["class_names"]
    width = max(len(n) for n in names) + 2
    r = result["arms_result"]
    lines = [f"Segmentation fine-tune: held-out Dice on {result['num_cases']} '{result['split']}' cases "
             f"[95% bootstrap CI over cases]; {result['config']['steps']} steps per arm",
             f"{'class':<{width}}{'n':>4}  " + "".join(f"{a:<24}" for a in arms)
             + ("pretrained - scratch (paired)" if "difference" in result else "")]
    for name in names[1:] + ["mean (foreground)"]:
        mean = name == "mean (foreground)"
        first = r[arms[0]]["dice"]["mean" if mean else "per_class"]
        first = first if mean else first[name]
        n = "" if mean else first["n"]
        row = f"{name:<{width}}{n:>4}  " + "".join(
            f"{_ci(r[a]['dice']['mean'] if mean else r[a]['dice']['per_class'][name]):<24}" for a in arms)
        if "difference" in result:
            d = result["difference"]["mean"] if mean else result["difference"]["per_class"][name]
            row += _ci(d, sign="+")
        lines.append(row)
    lines.append("HD95 mm (foreground mean): " + "   ".join(f"{a} {_ci(r[a]['hd95_mm']['mean'], 1)}" for a in arms))
    lines.append("false-positive cases (class predicted, absent from the ground truth): " + "; ".join(
        f"{a} " + ", ".join(f"{n} {r[a]['false_positive_cases'][n]}" for n in names[1:]
                            if r[a]["false_positive_cases"][n]) for a in arms))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset folder with masks (launch/prepare_data.py)")
    parser.add_argument("--pretrained", default=None,
                        help="the pretraining run (its --workdir, or its checkpoints folder); omit: scratch only")
    parser.add_argument("--steps", type=int, default=None, help="train steps per arm (default: the config's)")
    parser.add_argument("--mode", default="full", choices=("full", "frozen", "layer_decay"),
                        help="how the encoder trains (configs/finetune_cls.py's modes)")
    parser.add_argument("--config", default="configs/finetune_seg.py:demo", help="config file:variant")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. optim.lr=0.001 (repeatable; both arms)")
    parser.add_argument("--split", default="valid", help="held-out split to score")
    parser.add_argument("--workdir", default=None, help="folder of the runs (default: a temporary one, removed)")
    parser.add_argument("--num-bootstrap", type=int, default=1000)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)

    from t3d_jax.console import quiet_library_logs

    quiet_library_logs()
    from bench.compare_methods import quiet_training, write_json
    from bench.label_efficiency import pretrained_checkpoints
    from t3d_jax.evaluate.report import _json_ready

    config = load_config(args.config, args.data, args.steps, args.mode, args.set)
    quiet_training(config)
    pretrained = pretrained_checkpoints(args.pretrained) if args.pretrained else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seg_finetune_") as tmp:
        result = run(config, pretrained=pretrained, root=pathlib.Path(args.workdir or tmp), split=args.split,
                     num_bootstrap=args.num_bootstrap)
    result["mode"] = args.mode
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["load_average"] = os.getloadavg()
    print(table(result))
    print(f"wall time {result['wall_seconds']:.0f} s")
    if args.out:
        print(f"wrote {write_json(args.out, _json_ready(result))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
