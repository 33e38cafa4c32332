r"""Label efficiency: classification fine-tuning from a pretraining's image encoder against the
same fine-tune from scratch, at several fractions of the training labels.

  python bench/label_efficiency.py --data demo_out/prepared --pretrained demo_out/run \
      --fractions 0.01,0.1,1.0 [--steps N] [--mode full|frozen|layer_decay] \
      [--config configs/finetune_cls.py:demo] [--set KEY=VALUE ...] [--out label_efficiency.json]

For each fraction f and each arm (pretrained, scratch) it trains configs/finetune_cls.py (the
`supervised` task) with the normal trainer on the fixed seeded subset `data.train_fraction = f`
of the training split (`data.train_subset_seed`, --subset-seed: the same records for both arms,
nested across fractions), the pretrained arm with `init_from.checkpoint = RUN_DIR/checkpoints`
reading only `image_encoder` (the head fresh), the scratch arm with none; same steps, batch,
learning rate and seed. Every run is scored on the held-out split (--split, default `valid`):
per-label AUC with bootstrap intervals (`t3d_jax.evaluate.zeroshot.evaluate_scores`, the
evaluators' code), and the pretrained-minus-scratch difference per label and of the mean with a
paired bootstrap over the same volumes (`t3d_jax.evaluate.classification.paired_auc_difference`).

The step budget is the same at every fraction (--steps, default the config's): a 1% subset is
seen for many more epochs than 100%, as in the usual label-efficiency protocol. A subset smaller
than the global batch fills each batch from consecutive epochs (t3d_jax/data/pipeline.py).
Without --pretrained only the scratch arm runs (a smoke test of the command). The pretraining's
image settings (`model.image.*`, `data.view_size`) must be the fine-tune config's: a checkpoint
that does not fit stops with the tensors that differ.

Prints the table (mean AUC per fraction and arm with intervals, the difference, then per label)
and writes JSON (--out).
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

ARMS = ("pretrained", "scratch")


def load_config(spec: str, data_dir: str, steps: int | None, mode: str, overrides: list[str]):
    """`configs/finetune_cls.py:VARIANT` in `mode`, with data.dir, the step budget and --set overrides."""
    from bench.compare_methods import apply_overrides, config_from_file  # the bench scripts' shared parts

    path, _, variant = spec.partition(":")
    config = config_from_file(path, f"{variant or 'demo'},{mode}")
    config.data.dir = str(data_dir)
    if steps is not None:
        config.train.num_steps = int(steps)
        config.optim.warmup_steps = min(int(config.optim.warmup_steps), max(int(steps) // 10, 1))
    config.checkpoint.every_steps = int(config.train.num_steps)
    config.init_from.checkpoint = ""
    apply_overrides(config, overrides)
    return config


def pretrained_checkpoints(run_dir: str) -> str:
    """RUN_DIR/checkpoints (a pretraining's workdir) or RUN_DIR itself when it is the folder."""
    path = pathlib.Path(run_dir)
    if (path / "checkpoints").is_dir():
        return str((path / "checkpoints").absolute())
    if path.is_dir():
        return str(path.absolute())
    raise SystemExit(f"--pretrained {run_dir}: no such folder (a pretraining's --workdir, e.g. demo_out/run)")


def run(config, *, fractions: list[float], pretrained: str | None, root: pathlib.Path, split: str,
        num_bootstrap: int, batch_size: int, log=print) -> dict:
    """Trains and scores every (fraction, arm); the JSON-ready result (module docstring)."""
    from t3d_jax.data.pipeline import read_dataset_info, train_subset
    from t3d_jax.data.prepared import check_data_config, data_fingerprint, sync_config_with_data
    from t3d_jax.evaluate.classification import iterate_split, paired_auc_difference, score_checkpoint
    from t3d_jax.evaluate.zeroshot import evaluate_scores
    from t3d_jax.train.loop import train_and_evaluate

    check_data_config(config)
    config = sync_config_with_data(config)
    label_names = list(config.data.label_names)
    num_train = int(read_dataset_info(config.data.dir)["splits"][str(config.data.train_split)]["num_records"])
    arms = ARMS if pretrained else ARMS[1:]
    held_out = None  # the split's volumes and labels, read once
    result = {"data": str(config.data.dir), "data_fingerprint": data_fingerprint(config.data.dir),
              "split": split, "pretrained": pretrained, "arms": list(arms), "label_names": label_names,
              "num_train_records": num_train, "fractions": {},
              "config": {"steps": int(config.train.num_steps), "global_batch_size": int(config.train.global_batch_size),
                         "lr": float(config.optim.lr), "warmup_steps": int(config.optim.warmup_steps),
                         "freeze": list(config.optim.freeze), "layer_decay": float(config.optim.layer_decay),
                         "head_pool": str(config.model.head.pool), "pos_weight": str(config.loss.pos_weight),
                         "subset_seed": int(config.data.train_subset_seed), "seed": int(config.train.seed),
                         "image": dict(config.model.image.to_dict())}}
    for fraction in fractions:
        subset = train_subset(num_train, fraction, int(config.data.train_subset_seed))
        entry = {"num_train": int(num_train if subset is None else len(subset))}
        scores = {}
        for arm in arms:
            c = config.copy_and_resolve_references()
            c.data.train_fraction = float(fraction)
            c.init_from.checkpoint = pretrained if arm == "pretrained" else ""
            workdir = root / f"{arm}_{fraction:g}"
            log(f"== {arm}, fraction {fraction:g} ({entry['num_train']} training volumes): "
                f"{c.train.num_steps} steps -> {workdir}")
            t0 = time.perf_counter()
            trained = train_and_evaluate(c, workdir)
            train_s = time.perf_counter() - t0
            scored = score_checkpoint(c, workdir, split, batch_size, data=held_out)
            held_out = held_out or (scored["volumes"], scored["labels"], scored["ids"])
            scores[arm] = scored["scores"]
            losses = [h["loss"] for h in trained.history if "loss" in h]
            evaluated = evaluate_scores(scored["scores"], scored["labels"], label_names, num_bootstrap=num_bootstrap)
            entry[arm] = {"train_seconds": round(train_s, 1), "steps": int(trained.step),
                          "final_loss": float(losses[-1]) if losses else math.nan, **evaluated}
            log(f"   {train_s:.0f} s, final loss {entry[arm]['final_loss']:.4f}, mean AUC "
                f"{evaluated['mean']['auc']['value']:.3f}")
        if pretrained:
            entry["difference"] = paired_auc_difference(scores["pretrained"], scores["scratch"], held_out[1],
                                                         label_names, num_bootstrap=num_bootstrap)
        result["fractions"][f"{fraction:g}"] = entry
    result["num_test"] = int(len(held_out[1])) if held_out else 0
    return result


def _auc(entry: dict) -> str:
    from t3d_jax.evaluate.classification import format_ci

    return format_ci(entry["auc"])


def _diff(d: dict) -> str:
    v, (lo, hi) = d["value"], d["ci"]
    if not math.isfinite(v):
        return "n/a"
    return f"{v:+.3f}" + ("" if not math.isfinite(lo) else f" [{lo:+.3f}, {hi:+.3f}]")


def table(result: dict) -> str:
    arms, fracs = result["arms"], list(result["fractions"])
    lines = [f"Label efficiency: held-out AUC on {result['num_test']} '{result['split']}' volumes "
             f"[95% bootstrap CI]; {result['config']['steps']} steps per run",
             f"{'fraction':>8} {'n_train':>7}  " + "".join(f"{a + ' mean AUC':<26}" for a in arms)
             + ("difference (paired)" if "pretrained" in arms else "")]
    for f in fracs:
        e = result["fractions"][f]
        row = f"{f:>8} {e['num_train']:>7}  " + "".join(f"{_auc(e[a]['mean']):<26}" for a in arms)
        if "difference" in e:
            row += _diff(e["difference"]["mean"])
        lines.append(row)
    names = result["label_names"]
    width = max(len(n) for n in names) + 2
    for f in fracs:
        e = result["fractions"][f]
        lines.append("")
        lines.append(f"fraction {f} ({e['num_train']} training volumes): per-label AUC")
        lines.append(f"{'label':<{width}}{'n+':>5}  " + "".join(f"{a:<26}" for a in arms)
                     + ("difference" if "difference" in e else ""))
        for n in names:
            first = e[arms[0]]["per_label"][n]
            row = f"{n:<{width}}{first['n_positive']:>5}  " + "".join(
                f"{_auc(e[a]['per_label'][n]):<26}" for a in arms)
            if "difference" in e:
                row += _diff(e["difference"]["per_label"][n])
            lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset folder (launch/prepare_data.py)")
    parser.add_argument("--pretrained", default=None,
                        help="the pretraining run (its --workdir, or its checkpoints folder); omit: scratch only")
    parser.add_argument("--fractions", default="0.01,0.1,1.0", help="label fractions, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="train steps per run (default: the config's)")
    parser.add_argument("--mode", default="full", choices=("full", "frozen", "layer_decay"),
                        help="how the encoder trains (configs/finetune_cls.py)")
    parser.add_argument("--config", default="configs/finetune_cls.py:demo", help="config file:variant")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. optim.lr=0.001 (repeatable; both arms)")
    parser.add_argument("--subset-seed", type=int, default=0, help="data.train_subset_seed")
    parser.add_argument("--split", default="valid", help="held-out split to score")
    parser.add_argument("--workdir", default=None, help="folder of the runs (default: a temporary one, removed)")
    parser.add_argument("--num-bootstrap", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32, help="scoring batch size")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)

    try:
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    except ValueError:
        raise SystemExit(f"--fractions {args.fractions!r}: comma-separated numbers in (0, 1]") from None
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise SystemExit(f"--fractions {args.fractions!r}: comma-separated numbers in (0, 1]")
    from t3d_jax.console import quiet_library_logs

    quiet_library_logs()
    config = load_config(args.config, args.data, args.steps, args.mode,
                         [f"data.train_subset_seed={args.subset_seed}", *args.set])
    from bench.compare_methods import quiet_training, write_json

    quiet_training(config)
    pretrained = pretrained_checkpoints(args.pretrained) if args.pretrained else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="label_efficiency_") as tmp:
        result = run(config, fractions=fractions, pretrained=pretrained, root=pathlib.Path(args.workdir or tmp),
                     split=args.split, num_bootstrap=args.num_bootstrap, batch_size=args.batch_size)
    result["mode"] = args.mode
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["load_average"] = os.getloadavg()
    print(table(result))
    print(f"wall time {result['wall_seconds']:.0f} s")
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
