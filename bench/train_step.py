r"""Train-step speed on this CPU: step time, examples/s and MFU for the tiny, demo, small configs.

  python bench/train_step.py [--configs tiny,demo,small] [--steps 10] [--out bench_train_step.json]
  python bench/train_step.py --configs small --set small:train.global_batch_size=4

The step is the trainer's own (`t3d_jax.train.step.make_train_program`: the jitted, donated
step `launch/train.py` runs) on one CPU device, fed a synthetic batch of the data contract's
shapes (numbers do not change the FLOPs). FLOPs per step come from XLA's cost analysis of the
compiled step; MFU = FLOPs / step time / peak, where the peak is a float32 2048^3 matmul
measured in the same run (best of several, `t3d_jax.train.metrics.measure_peak_flops`, the
trainer's own measurement), i.e. what XLA:CPU itself reaches on the op the step is made of.
Every config runs in float32 (XLA:CPU's bf16 path is slower); `small` is a GPU config and
gets a smaller global batch here so a step takes seconds.

The machine is shared: the load average is recorded next to the figures, and the step time
is the median of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from t3d_jax.train.metrics import measure_peak_flops  # noqa: E402

# Per-config settings for this CPU bench (batch sizes chosen so a step takes < ~10 s here).
BENCH_OVERRIDES = {
    "tiny": {"model.dtype": "float32"},
    "demo": {"model.dtype": "float32"},
    "small": {"model.dtype": "float32", "train.global_batch_size": 8},
}
DEFAULT_STEPS = {"tiny": 20, "demo": 10, "small": 5}
# The MFU denominator: best of PEAK_REPEATS float32 PEAK_N^3 matmuls (the trainer's own
# measurement, t3d_jax.train.metrics.measure_peak_flops, at the size the figures were taken).
PEAK_N, PEAK_REPEATS = 2048, 5


def load_config(name: str, overrides: dict[str, object]):
    """configs/t3d.py:`name` with dotted-key overrides (values converted to the key's type)."""
    from configs import t3d

    config = t3d.get_config(name)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        current = node.get(leaf)  # keys the config file lacks (e.g. optim.flatten) are added
        if isinstance(value, str) and current is not None and not isinstance(current, str):
            value = type(current)(json.loads(value))
        node[leaf] = value
    return config


def synthetic_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A training batch of the pipeline's contract (views, crop boxes, tokens, labels)."""
    b = int(config.train.global_batch_size)
    v = int(config.data.num_views)
    size = tuple(int(s) for s in config.data.view_size)
    length = int(config.preprocess.max_len)
    frac = rng.uniform(config.data.crop_min, config.data.crop_max, size=(b, v, 1, 3))
    lo = rng.uniform(0, 1, size=(b, v, 1, 3)) * (1 - frac)
    boxes = np.concatenate([lo, lo + frac], axis=2).astype(np.float32)
    lengths = rng.integers(length // 4, length, size=b)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1000, int(config.model.text.vocab_size), size=(b, length)).astype(np.int32) * mask
    ids[:, 0] = 101  # [CLS]
    return {
        "views": rng.standard_normal((b, v, *size, 1)).astype(np.float32),
        "boxes": boxes,
        "input_ids": ids,
        "attention_mask": mask,
        "labels": rng.integers(0, 2, size=(b, len(config.data.label_names))).astype(np.float32),
    }


class JaxTrainStep:
    """The trainer's compiled step on one device, callable one step at a time (for interleaving)."""

    def __init__(self, config):
        from t3d_jax.train import mesh as mesh_lib
        from t3d_jax.train import step as step_lib

        config.mesh.shape = (1, 1)
        devices = jax.local_devices()[:1]
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        self.config = config
        with jax.set_mesh(self.mesh):  # as the loop does: the loss's shard_map reads it at trace time
            self.program = step_lib.make_train_program(config, self.mesh)
            t0 = time.perf_counter()
            self.compiled = self.program.step.lower(self.program.abstract_state,
                                                    self.program.abstract_batch).compile()
            self.compile_s = time.perf_counter() - t0
            self.state = self.program.init()
        self.flops = step_lib.flops_per_step(self.compiled)
        batch = synthetic_batch(config, np.random.default_rng(0))
        self.batch = step_lib.global_batch(batch, self.program.batch_shardings)
        self.params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state["params"]))
        mem = self.compiled.memory_analysis()
        self.memory_bytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
        self.last_loss = float("nan")

    def __call__(self) -> float:
        """Runs one step to completion; returns its wall time in seconds."""
        t0 = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)
        loss = metrics["loss"].block_until_ready()
        dt = time.perf_counter() - t0
        self.last_loss = float(loss)
        return dt


def bench_config(name: str, steps: int, overrides: dict, peak: float) -> dict:
    config = load_config(name, {**BENCH_OVERRIDES.get(name, {}), **overrides})
    step = JaxTrainStep(config)
    step()  # first run: allocation, caches
    times = [step() for _ in range(steps)]
    median = statistics.median(times)
    gbs = int(config.train.global_batch_size)
    return {
        "config": name, "overrides": {**BENCH_OVERRIDES.get(name, {}), **overrides},
        "model": str(config.model.name), "image_size": str(config.model.image.size),
        "text_size": str(config.model.text.size), "view_size": list(config.data.view_size),
        "num_views": int(config.data.num_views), "global_batch_size": gbs,
        "params": step.params, "compile_s": step.compile_s, "steps_timed": steps,
        "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
        "examples_per_s": gbs / median, "flops_per_step": step.flops,
        "achieved_flops_per_s": step.flops / median, "mfu": step.flops / median / peak,
        "compiled_memory_bytes": step.memory_bytes, "final_loss": step.last_loss,
    }


# --compare: both guard forms (train.nonfinite_guard), per-leaf and flattened AdamW (opt-in).
VARIANTS = (
    ("per-leaf AdamW, where-guard (default)", {"optim.flatten": "off", "train.nonfinite_guard": "where"}),
    ("per-leaf AdamW, cond guard", {"optim.flatten": "off", "train.nonfinite_guard": "cond"}),
    ("optim.flatten=on, cond guard", {"optim.flatten": "on", "train.nonfinite_guard": "cond"}),
    ("optim.flatten=on, where-guard", {"optim.flatten": "on", "train.nonfinite_guard": "where"}),
)


def compare_variants(name: str, steps: int, overrides: dict, peak: float) -> list[dict]:
    """The variants above built in this process and timed interleaved step by step, so load
    from other users of the machine hits all alike; ratios are against the first."""
    runs = []
    for label, extra in VARIANTS:
        config = load_config(name, {**BENCH_OVERRIDES.get(name, {}), **overrides, **extra})
        step = JaxTrainStep(config)
        step(), step()
        runs.append((label, step))
    times = {label: [] for label, _ in runs}
    for _ in range(steps):
        for label, step in runs:
            times[label].append(step())
    base = statistics.median(times[runs[0][0]])
    return [{"config": name, "variant": label, "step_s_median": statistics.median(times[label]),
             "step_s_min": min(times[label]), "steps_timed": steps,
             "speedup_vs_default": base / statistics.median(times[label]),
             "compiled_memory_bytes": step.memory_bytes, "flops_per_step": step.flops,
             "mfu": step.flops / statistics.median(times[label]) / peak, "final_loss": step.last_loss}
            for label, step in runs]


def _timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def breakdown(name: str, overrides: dict, peak: float, repeats: int = 5) -> list[dict]:
    """Where the step's time goes: each part jitted alone (fwd+bwd), timed, with XLA's FLOPs.

    Parts: image encoder on all views, text encoder, the task's whole loss (both encoders,
    projections, contrastive + TMA), and the full train step (loss + AdamW + guards); the
    difference between the last two is the optimizer/bookkeeping share.
    """
    from flax import nnx

    from t3d_jax import tasks

    config = load_config(name, {**BENCH_OVERRIDES.get(name, {}), **overrides})
    full = JaxTrainStep(config)
    task = tasks.get_task(config)
    model = task.build_model(nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(config, np.random.default_rng(0)).items()}
    b, v = batch["views"].shape[:2]
    views = batch["views"].reshape(b * v, *batch["views"].shape[2:])

    def part(loss_of_module, module, *args):
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        params, rest = params.to_pure_dict(), rest.to_pure_dict()

        def f(p, r, *a):  # the non-param state (RNG streams) goes in as an argument: it mutates
            return loss_of_module(nnx.merge(graphdef, nnx.State(p), nnx.State(r)), *a)

        fn = jax.jit(jax.value_and_grad(f))
        compiled = fn.lower(params, rest, *args).compile()
        flops = float(compiled.cost_analysis().get("flops", float("nan")))
        return _timed(compiled, params, rest, *args, repeats=repeats), flops

    rows = []
    t, f = part(lambda m, x: jnp.sum(m(x, deterministic=False)["pooled"]), model.image_encoder, views)
    rows.append(("image encoder fwd+bwd", t, f))
    t, f = part(lambda m, i, a: jnp.sum(m(i, a, deterministic=False)["hidden"][:, 0]), model.text_encoder,
                batch["input_ids"], batch["attention_mask"])
    rows.append(("text encoder fwd+bwd", t, f))
    t, f = part(lambda m, bt: task.loss(m, bt, step=0, deterministic=False)[0], model, batch)
    rows.append(("model loss fwd+bwd (all)", t, f))
    step_t = statistics.median(full() for _ in range(repeats))
    rows.append(("train step (loss + AdamW + guards)", step_t, full.flops))
    return [{"config": name, "part": p, "ms": 1e3 * t, "gflop": fl / 1e9, "gflop_per_s": fl / t / 1e9,
             "fraction_of_peak": fl / t / peak, "fraction_of_step_time": t / step_t} for p, t, fl in rows]


# XLA:CPU kernel names -> what they do (ynn_fusion = XNNPACK/YNNPACK matmul fusions).
KERNEL_CATEGORIES = (
    ("matmul / conv", re.compile(r"^(ynn_fusion|xnn_fusion|dot|convolution|custom-call)")),
    ("copy / transpose", re.compile(r"(copy|transpose|bitcast|concatenate|slice|pad|gather|scatter)")),
    ("reduction", re.compile(r"reduce")),
    ("loop (while)", re.compile(r"^while")),
    ("elementwise fusion", re.compile(r"fusion|^(add|multiply|subtract|select|broadcast|exp|divide)")),
)
CONTAINER_EVENTS = re.compile(r"^(ThunkExecutor|Thunk|ExecuteHelper|XlaModule|\$|Pjit|Common)")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: the JAX op_name it came from} of a compiled module's text; the
    profiler's XLA:CPU events are named after the instructions."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def step_phase(op_name: str | None) -> str:
    """Which part of the train step an instruction belongs to, from its JAX op_name: the
    backward pass is under transpose(jvp(...)), the forward under jvp(...), the rest (norms,
    NaN guard, optimizer) after the gradient; events without an op_name (runtime copies,
    thread-pool waits, loop bookkeeping) are 'unattributed'."""
    if not op_name:
        return "unattributed"
    if "transpose(jvp" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "after the gradient (norms, guard, optimizer)"


def profile_step(name: str, overrides: dict, steps: int = 3, trace_dir: str | None = None) -> dict:
    """jax.profiler trace of `steps` train steps; XLA:CPU kernel time by category.

    Kernel time is summed over XLA's worker threads (CPU-seconds in kernels per step); the
    step's wall time x threads minus that is time the cores spent outside kernels (dispatch,
    waits between dependent small kernels, other processes on a shared machine).
    """
    import collections
    import glob
    import tempfile

    config = load_config(name, {**BENCH_OVERRIDES.get(name, {}), **overrides})
    step = JaxTrainStep(config)
    op_names = hlo_op_names(step.compiled.as_text())
    step(), step()
    trace_dir = trace_dir or tempfile.mkdtemp(prefix=f"t3d_trace_{name}_")
    jax.profiler.start_trace(trace_dir)
    wall = sum(step() for _ in range(steps)) / steps
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    per_cat, counts, per_kernel, threads = collections.Counter(), collections.Counter(), collections.Counter(), set()
    per_phase, phase_counts = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            threads.add(line.name)
            for ev in line.events:
                if CONTAINER_EVENTS.search(ev.name):
                    continue
                cat = next((c for c, rx in KERNEL_CATEGORIES if rx.search(ev.name)), "other")
                per_cat[cat] += ev.duration_ns / 1e9 / steps
                counts[cat] += 1 / steps
                per_kernel[ev.name] += ev.duration_ns / 1e9 / steps
                phase = step_phase(op_names.get(ev.name))
                per_phase[phase] += ev.duration_ns / 1e9 / steps
                phase_counts[phase] += 1 / steps
    kernel_total = sum(per_cat.values())
    return {
        "config": name, "wall_s": wall, "threads": len(threads), "kernel_cpu_s": kernel_total,
        "outside_kernels_cpu_s": max(0.0, wall * max(len(threads), 1) - kernel_total),
        "categories": {c: {"cpu_s": t, "kernels_per_step": counts[c], "share": t / kernel_total}
                       for c, t in per_cat.most_common()},
        "phases": {p: {"cpu_s": t, "kernels_per_step": phase_counts[p]} for p, t in per_phase.most_common()},
        "top_kernels": [{"name": k, "cpu_s": t, "op_name": op_names.get(k, "")}
                        for k, t in per_kernel.most_common(15)],
        "trace_dir": trace_dir,
    }


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "jax": jax.__version__, "devices": str(jax.devices()),
            "loadavg_start": os.getloadavg()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,demo,small")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per config (0 = per-config default)")
    parser.add_argument("--set", action="append", default=[], metavar="CONFIG:KEY=VALUE",
                        help="extra override for one config, e.g. small:train.global_batch_size=4")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the step's parts (image/text encoder, loss, optimizer) per config")
    parser.add_argument("--profile", action="store_true",
                        help="also trace 3 steps per config with jax.profiler: XLA:CPU kernel time by category")
    parser.add_argument("--compare", action="store_true",
                        help="also time both train.nonfinite_guard forms with per-leaf and "
                             "flattened AdamW, interleaved, per config")
    parser.add_argument("--out", default="bench_train_step.json")
    args = parser.parse_args(argv)

    names = [n for n in args.configs.split(",") if n]
    extra: dict[str, dict] = {n: {} for n in names}
    for item in args.set:
        try:
            cfg_name, kv = item.split(":", 1)
            key, value = kv.split("=", 1)
        except ValueError:
            parser.error(f"--set {item!r}: expected CONFIG:KEY=VALUE")
        extra.setdefault(cfg_name, {})[key] = value

    info = machine_info()
    peak = measure_peak_flops(PEAK_N, seconds=0, repeats=PEAK_REPEATS)
    print(f"{info['cpu']} ({info['cpu_count']} cores), load {info['loadavg_start']}; "
          f"float32 {PEAK_N}^3 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for name in names:
        row = bench_config(name, args.steps or DEFAULT_STEPS.get(name, 10), extra.get(name, {}), peak)
        rows.append(row)
        print(f"  {name}: {row['step_s_median'] * 1e3:.1f} ms/step", flush=True)
    parts = []
    if args.breakdown:
        for name in names:
            parts += breakdown(name, extra.get(name, {}), peak)
    profiles = [profile_step(n, extra.get(n, {})) for n in names] if args.profile else []
    variants = []
    if args.compare:
        for name in names:
            variants += compare_variants(name, args.steps or DEFAULT_STEPS.get(name, 10), extra.get(name, {}), peak)
    peak_end = measure_peak_flops(PEAK_N, seconds=0, repeats=PEAK_REPEATS)
    header = f"{'config':8} {'batch':>5} {'views':>14} {'params':>8} {'step ms':>9} {'ex/s':>8} {'GFLOP/step':>11} {'GFLOP/s':>8} {'MFU':>6}"
    print(header)
    for r in rows:
        views = f"{r['num_views']}x" + "x".join(str(s) for s in r["view_size"])
        print(f"{r['config']:8} {r['global_batch_size']:5d} {views:>14} {r['params'] / 1e6:7.1f}M "
              f"{r['step_s_median'] * 1e3:9.1f} {r['examples_per_s']:8.1f} {r['flops_per_step'] / 1e9:11.2f} "
              f"{r['achieved_flops_per_s'] / 1e9:8.1f} {100 * r['mfu']:5.1f}%")
    if parts:
        print(f"{'config':8} {'part':36} {'ms':>9} {'GFLOP':>8} {'GFLOP/s':>8} {'of peak':>8} {'of step':>8}")
        for p in parts:
            print(f"{p['config']:8} {p['part']:36} {p['ms']:9.1f} {p['gflop']:8.2f} {p['gflop_per_s']:8.1f} "
                  f"{100 * p['fraction_of_peak']:7.1f}% {100 * p['fraction_of_step_time']:7.1f}%")
    if variants:
        print(f"{'config':8} {'variant (interleaved)':40} {'ms median':>10} {'ms min':>8} {'speed-up':>9} {'MFU':>6} {'XLA MiB':>8}")
        for v in variants:
            print(f"{v['config']:8} {v['variant']:40} {v['step_s_median'] * 1e3:10.1f} {v['step_s_min'] * 1e3:8.1f} "
                  f"{v['speedup_vs_default']:8.2f}x {100 * v['mfu']:5.1f}% {v['compiled_memory_bytes'] / 2**20:8.0f}")
    for prof in profiles:
        print(f"{prof['config']}: {prof['wall_s'] * 1e3:.1f} ms/step wall on {prof['threads']} XLA threads; "
              f"{prof['kernel_cpu_s'] * 1e3:.1f} CPU-ms in kernels, {prof['outside_kernels_cpu_s'] * 1e3:.1f} CPU-ms outside")
        for cat, v in prof["categories"].items():
            print(f"    {cat:20} {v['cpu_s'] * 1e3:9.1f} CPU-ms {100 * v['share']:5.1f}%  {v['kernels_per_step']:7.0f} kernels/step")
        for phase, v in prof["phases"].items():
            print(f"    {phase:44} {v['cpu_s'] * 1e3:9.1f} CPU-ms {v['kernels_per_step']:7.0f} events/step")
        for k in prof["top_kernels"]:
            print(f"    {k['cpu_s'] * 1e3:7.2f} CPU-ms  {k['name']:28} {k['op_name'][-70:]}")
    result = {"machine": {**info, "loadavg_end": os.getloadavg()}, "breakdown": parts, "profiles": profiles,
              "variants": variants,
              "peak_flops_per_s": peak, "peak_flops_per_s_end": peak_end,
              "peak_definition": f"best of {PEAK_REPEATS} jitted float32 {PEAK_N}x{PEAK_N}x{PEAK_N} matmuls, "
                                 "same process (t3d_jax.train.metrics.measure_peak_flops)",
              "command": " ".join(["python", "bench/train_step.py", *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
