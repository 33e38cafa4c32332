r"""Memory levers for `base`, each measured by the compiled step's memory analysis, one table.

  python bench/memory_levers.py [--topology v5e:2x2] [--global_batch 16] [--results bench/results/aot] \
      [--levers default,remat_none,...] [--out bench_memory_levers.json]

Each lever is `configs/t3d.py:base` with one change, written as the `--config.KEY=VALUE`
flags `launch/aot_compile.py` takes, compiled ahead of time for the TPU topology by the
library behind it (`t3d_jax.train.aot.compile_train_step`, in this process, one lever after
the other); each report records the equivalent `launch/aot_compile.py` command. A lever
whose report already exists in --results (same topology, same overrides) is read instead of
recompiled, so the table can be rebuilt from the committed reports. `base` itself is:
bfloat16 compute, full remat of the ViT blocks, every chip on the `fsdp` axis, patch dropout
0, no gradient accumulation, unrolled layers; the global batch is `--global_batch` (the
per-chip batch is what sets the activation memory, so a small topology at the same per-chip
batch answers for a pod in far less compile time).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

# Compile-only TPU devices: never attach a real accelerator (set before jax is imported).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `configs`, imported by the config file

import jax  # noqa: E402

from t3d_jax.train import aot  # noqa: E402
from t3d_jax.utils import UserError  # noqa: E402

CONFIG = "configs/t3d.py:base"
GIB = 1024**3

# name -> (what it changes, overrides of configs/t3d.py:base); topology-independent.
LEVERS = {
    "default": ("base as configured (bf16, remat full, FSDP over all chips)", []),
    "remat_none": ("no rematerialisation", ["--config.model.image.remat=none"]),
    "remat_dots": ("remat keeping matmul outputs (dots_with_no_batch_dims_saveable)",
                   ["--config.model.image.remat=dots_with_no_batch_dims_saveable"]),
    "float32": ("float32 compute instead of bfloat16", ["--config.model.dtype=float32"]),
    "patch_dropout": ("patch dropout 0.5 (half the tokens)", ["--config.model.image.patch_dropout=0.5"]),
    "no_fsdp": ("pure data parallel (params + Adam state replicated)", ["--config.mesh.shape=(-1,1)"]),
    "no_fsdp_remat_none": ("pure data parallel and no remat",
                           ["--config.mesh.shape=(-1,1)", "--config.model.image.remat=none"]),
    "scan_layers": ("blocks of both towers stacked and run by nnx.scan",
                    ["--config.model.image.scan_layers=True", "--config.model.text.scan_layers=True"]),
    "text_remat": ("also rematerialise the BERT layers", ["--config.model.text.remat=full"]),
    "guard_cond": ("non-finite guard as one lax.cond instead of per-leaf where",
                   ["--config.train.nonfinite_guard=cond"]),
    "batch_x4": ("global batch x4", ["--batch_factor=4"]),
    "batch_x4_accum4": ("global batch x4 in 4 accumulated micro-batches",
                        ["--batch_factor=4", "--config.train.grad_accum_steps=4"]),
}


def report_name(topology: str, lever: str, global_batch: int) -> str:
    return f"base_{topology.replace(':', '_')}_gbs{global_batch}_{lever}.json"


def lever_args(lever: str, global_batch: int) -> list[str]:
    """aot_compile arguments for a lever; `--batch_factor=K` multiplies the global batch."""
    args, factor = [], 1
    for a in LEVERS[lever][1]:
        if a.startswith("--batch_factor="):
            factor = int(a.split("=", 1)[1])
        else:
            args.append(a)
    return [f"--config.train.global_batch_size={global_batch * factor}", *args]


def load_config(overrides: list[str]):
    """`CONFIG` with `--config.KEY=VALUE` overrides, parsed exactly as launch/aot_compile.py
    parses its command line (ml_collections' config flag, on a flag set of its own)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["memory_levers", f"--config={ROOT / CONFIG}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def compile_lever(topology: str, lever: str, results: pathlib.Path, global_batch: int) -> dict:
    path = results / report_name(topology, lever, global_batch)
    overrides = lever_args(lever, global_batch)
    if path.exists():
        report = json.loads(path.read_text())
        if report.get("lever_overrides") == overrides:
            return report
    command = " ".join(["python", "launch/aot_compile.py", f"--config={CONFIG}", f"--topology={topology}",
                        *overrides, f"--out={path}"])
    print("$", command, flush=True)
    report = aot.compile_train_step(load_config(overrides), topology)
    jax.clear_caches()  # the next lever compiles a new program; keep the host memory of one
    report["command"] = command
    report["lever_overrides"] = overrides
    path.write_text(json.dumps(report, indent=2))
    return report


def _looped(report: dict) -> bool:
    """Rows whose step runs its bulk inside a loop (XLA's cost analysis sees one iteration):
    the report's ``flops_undercounted_by`` (`step.flop_undercount_reasons`), or for reports
    written before it existed, the same settings read back."""
    if "flops_undercounted_by" in report:
        return bool(report["flops_undercounted_by"])
    return bool(report["settings"].get("scan_layers")) or int(report.get("grad_accum_steps", 1)) > 1


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| lever | global batch (per chip) | guard | arguments | temporaries | total / chip | fits HBM | "
             "TFLOP / chip / step | roofline step | compile | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lever, r in rows:
        m, c = r["memory"], r["cost"]
        lines.append(
            f"| {lever}: {LEVERS[lever][0]} | {r['global_batch_size']} ({r['per_chip_batch']:g}) | "
            f"{r['settings'].get('nonfinite_guard', 'where')} | "
            f"{m['argument_bytes'] / GIB:.2f} GiB | {m['temp_bytes'] / GIB:.2f} GiB | "
            f"{m['total_bytes'] / GIB:.2f} GiB | {'yes' if m['fits_hbm'] else 'NO'} ({m['hbm_gib']:.0f} GiB) | "
            f"{c['flops_per_chip'] / 1e12:.2f}{'*' if _looped(r) else ''} | "
            f"{1e3 * c['roofline_step_s']:.0f} ms | {r['compile_s']:.0f} s | {r.get('code', '?')} |")
    if any(_looped(r) for _, r in rows):
        lines.append("\n* XLA's cost analysis counts a loop body once (scanned layer stacks, accumulated "
                     "micro-batches): the FLOPs and roofline of these rows are undercounted.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--global_batch", type=int, default=16, help="global batch of every lever but batch_x4*")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "aot"))
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--out", default="bench_memory_levers.json")
    args = parser.parse_args(argv)
    results = pathlib.Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    for lever in [x for x in args.levers.split(",") if x]:
        if lever not in LEVERS:
            parser.error(f"unknown lever {lever!r}; choose from {sorted(LEVERS)}")
        try:
            rows.append((lever, compile_lever(args.topology, lever, results, args.global_batch)))
        except UserError as err:  # e.g. a lever whose batch or mesh the topology cannot take
            print(f"{lever}: {err}", file=sys.stderr)
    print(table(rows))
    pathlib.Path(args.out).write_text(json.dumps({lever: r for lever, r in rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
