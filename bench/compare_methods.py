r"""The method-comparison harness: every method trained on the same data, steps and seeds,
evaluated on the same held-out volumes, compared with paired-bootstrap intervals.

  python bench/compare_methods.py --tasks clip,t3d --seeds 3 [--variant demo] [--steps N] \
      [--data DIR] [--set KEY=VALUE ...] [--out bench/results/compare_methods.json]

For each task (a config file `configs/<task>.py`) and seed: train `configs/<task>.py:<variant>`
with `train.seed=<seed>` (the data order and the initialisation; the data itself is the same
for all), then predict on the evaluated split (`t3d_jax.evaluate.compare.predictions`:
zero-shot scores, linear-probe scores, report->volume ranks). The first task is the baseline;
every other task gets its difference to it (zero-shot AUC, probe AUC, R@5, and per-label
zero-shot AUC) with a 95% paired-bootstrap interval over volumes. Prints the table, writes
JSON (with per-run wall times and final losses) and a plot of the per-label differences next
to it (.png). With the demo variant and no prepared data, the embedded synthetic data set is
made first (configs/common.py `data.synthetic_if_missing`).

Runs go seed by seed (every task's seed 0, then every task's seed 1, ...), so a harness stopped
early holds whole seeds. Each run leaves `<workdir>/<task>_seed<k>/predictions.npz` and
`facts.json`; a run whose files are already there is read back, not trained again, so a
harness killed part-way resumes with `--workdir` (and runs made on another machine can be
copied in and compared).

Adding a method: a task module (t3d_jax/tasks/) and its config file; then name it in --tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def apply_overrides(config, overrides: list[str], flag: str = "--set"):
    """KEY=VALUE items (dotted keys) set on `config`, values parsed as Python literals where they
    parse (lists become tuples) and kept as text for string keys; the bench scripts' `--set`."""
    import ast

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} {item!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        try:
            value = raw if isinstance(node.get(leaf), str) else ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def config_from_file(path: str, arg: str):
    """`path`'s get_config(`arg`): a config file named by path (the bench scripts' --config),
    loaded as a module; a missing file stops the script with its name."""
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("_bench_config", path)
    if module_spec is None or not os.path.isfile(path):
        raise SystemExit(f"--config: {path}: config file not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def quiet_training(config):
    """A bench's training run: no progress bar, no TensorBoard, no evaluators (the bench scores)."""
    config.train.progress_bar = False
    config.metrics.tensorboard = False
    config.eval.evaluators = ()
    return config


def write_json(out, result: dict) -> pathlib.Path:
    """`result` as indented JSON at `out` (folders made); NumPy scalars written as floats."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return out


def load_config(task: str, variant: str, overrides: list[str]):
    """configs/<task>.py:<variant> (the config files are modules of the `configs` package),
    with KEY=VALUE overrides (`apply_overrides`)."""
    import importlib

    if not (REPO / "configs" / f"{task}.py").is_file():
        raise SystemExit(f"bench/compare_methods.py: --tasks names {task!r}, but configs/{task}.py does not exist")
    return apply_overrides(importlib.import_module(f"configs.{task}").get_config(variant), overrides)


def train_and_predict(config, workdir: pathlib.Path) -> tuple[dict, dict]:
    """Trains `config` in `workdir`; (predictions on the evaluated split, run facts)."""
    import jax

    from t3d_jax.data.prepared import sync_config_with_data
    from t3d_jax.evaluate import compare
    from t3d_jax.evaluate.embedding import EmbeddingCache
    from t3d_jax.train.loop import train_and_evaluate

    start = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    train_s = time.perf_counter() - start
    synced = sync_config_with_data(config)
    mesh = result.program.mesh
    with jax.set_mesh(mesh):
        cache = EmbeddingCache(result.program.model(result.state), synced, mesh)
        pred = compare.predictions(cache)
    losses = [h for h in result.history if "loss" in h]
    facts = {"train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - start - train_s, 1),
             "steps": result.step, "device": f"{jax.devices()[0].device_kind} (jax {jax.__version__})",
             "final_loss": losses[-1]["loss"] if losses else None,
             "final_metrics": {k: v for k, v in (losses[-1] if losses else {}).items()
                               if k.startswith(("loss", "tma_", "logit"))}}
    return pred, facts


def save_run(run_dir: pathlib.Path, pred: dict, fact: dict) -> None:
    """A finished run's predictions and facts, written so that a later harness can reuse them
    (facts.json last: it marks the run complete)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    np.savez(run_dir / "predictions.npz", **{k: np.asarray(v) for k, v in pred.items()})
    write_json(run_dir / "facts.json", fact)


def load_run(run_dir: pathlib.Path) -> tuple[dict, dict] | None:
    """(predictions, facts) of a run `save_run` completed in `run_dir`, else None."""
    if not (run_dir / "facts.json").is_file() or not (run_dir / "predictions.npz").is_file():
        return None
    with np.load(run_dir / "predictions.npz", allow_pickle=False) as z:
        pred = {k: z[k] for k in z.files}
    return pred, json.loads((run_dir / "facts.json").read_text())


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["label_names"]
    others = [m for m in result["methods"] if m != result["baseline"]]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(names) + 1.5))
    for i, m in enumerate(others):
        d = result["methods"][m]["per_label_difference"]
        y = np.arange(len(names)) + 0.8 * i / max(len(others), 1)
        values = np.array([d[n]["value"] for n in names])
        lo = values - np.array([d[n]["ci"][0] for n in names])
        hi = np.array([d[n]["ci"][1] for n in names]) - values
        ax.errorbar(values, y, xerr=[lo, hi], fmt="o", capsize=3, label=f"{m} - {result['baseline']}")
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(np.arange(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("zero-shot AUC difference (95% paired bootstrap)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="clip,t3d", help="config files of configs/, the first is the baseline")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variant", default="demo")
    parser.add_argument("--steps", type=int, default=None, help="train.num_steps (default: the variant's)")
    parser.add_argument("--data", default=None, help="prepared data folder (default: the variant's data.dir)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override (all tasks)")
    parser.add_argument("--num_bootstrap", type=int, default=1000)
    parser.add_argument("--workdir", default=None, help="where the runs are written (default: a temp folder)")
    parser.add_argument("--out", default="bench/results/compare_methods.json")
    args = parser.parse_args(argv)

    from t3d_jax.data.prepared import check_data_config, make_synthetic_if_missing
    from t3d_jax.evaluate import compare

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    overrides = list(args.set) + ([f"train.num_steps={args.steps}"] if args.steps else []) + \
        ([f"data.dir={args.data}"] if args.data else [])
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="compare_methods_"))
    runs: dict[str, list[dict]] = {t: [] for t in tasks}
    facts: dict[str, list[dict]] = {t: [] for t in tasks}
    label_names = None
    for seed in range(args.seeds):
        for task in tasks:
            config = load_config(task, args.variant, overrides + [f"train.seed={seed}", "train.progress_bar=False"])
            run_dir = root / f"{task}_seed{seed}"
            done = load_run(run_dir)
            if done is not None:
                print(f"== {task} seed {seed}: read back from {run_dir}", flush=True)
                pred, fact = done
            else:
                make_synthetic_if_missing(config)
                check_data_config(config)
                print(f"== {task} seed {seed}: {config.train.num_steps} steps on {config.data.dir}", flush=True)
                pred, fact = train_and_predict(config, run_dir)
                save_run(run_dir, pred, fact)
                print(f"   trained in {fact['train_s']} s, final loss {fact['final_loss']}", flush=True)
            runs[task].append(pred)
            facts[task].append(fact)
            from t3d_jax.data.pipeline import read_dataset_info
            label_names = tuple(read_dataset_info(config.data.dir).get("label_names") or config.data.label_names)
    result = compare.compare(runs, label_names, baseline=tasks[0], num_bootstrap=args.num_bootstrap)
    result.update(variant=args.variant, seeds=args.seeds, overrides=overrides, runs=facts,
                  load_average=os.getloadavg())
    print(compare.format_comparison(result))
    out = write_json(args.out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
