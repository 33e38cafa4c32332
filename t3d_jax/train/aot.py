"""Ahead-of-time compilation of the real train step for a TPU topology, on a CPU machine.

Why: a pod costs money by the hour; whether `base` fits a chip's HBM at a given global batch,
mesh and remat policy is a compile-time fact. libtpu (from PyPI, no TPU needed) describes the
topology's devices; the trainer's own program (`t3d_jax.train.step.make_train_program`, for
whatever task the config names) is lowered against abstract, sharded inputs over a mesh of
those devices and compiled by the TPU compiler. Nothing is allocated.

    report = compile_train_step(config, "v5e:16x16", num_slices=1)
    print(format_report(report))

The report (a JSON-able dict): per-chip memory from `compiled.memory_analysis()` (arguments,
outputs, aliased (donated) bytes, temporaries, total = arguments + outputs - aliased +
temporaries + code) against the chip's HBM; FLOPs per step per chip and for the whole mesh
from `compiled.cost_analysis()`; the step time the chip's bf16 peak would give (a compute
roofline: FLOPs / peak, i.e. the time at 100% MFU) and a compute-vs-HBM roofline with the MFU
it implies (docs/scaling.md explains how to read them). `launch/aot_compile.py` is the
command-line front end; bench/memory_levers.py compiles one report per memory lever.

libtpu: jax 0.10.2's `jax[tpu]` extra asks for libtpu==0.0.42.*; this module uses the
libtpu.so named by TPU_LIBRARY_PATH, else the installed `libtpu` package (the `aot` extra),
and says how to install it if neither is there. The process must not attach a real TPU (the
devices here are compile-only), so a tool sets JAX_PLATFORMS=cpu before it imports jax (as
launch/aot_compile.py does); this module imports jax, so it cannot set it itself.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import time

import jax

from t3d_jax.train import mesh as mesh_lib
from t3d_jax.train import optim as optim_lib
from t3d_jax.train import step as step_lib
from t3d_jax.utils import UserError, UserFileNotFoundError, UserValueError, cfg_get

LIBTPU_PIN = "0.0.42.1"  # matches jax==0.10.2 (its [tpu] extra: libtpu==0.0.42.*)
GIB = 1024**3

# libtpu looks these up on a TPU VM's metadata server; for compile-only use it is told them
# instead (otherwise it prints errors). Set only while the plugin loads, then restored, so the
# importing process keeps a clean environment (TPU_WORKER_HOSTNAMES would make
# jax.distributed think it runs on a pod).
_LIBTPU_COMPILE_ONLY_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # compile-only: no chip to guard
                            "TPU_ACCELERATOR_TYPE": "v5litepod-4"}


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Public per-chip figures the report divides by (bf16 dense peak, HBM)."""

    name: str
    peak_bf16_flops: float
    hbm_bytes: int
    hbm_bytes_per_s: float
    megacore: bool  # v4/v5p expose one device per chip only in megacore mode


CHIPS = {
    "v4": ChipSpec("TPU v4", 275e12, 32 * GIB, 1228e9, True),
    "v5e": ChipSpec("TPU v5e", 197e12, 16 * GIB, 819e9, False),
    "v5p": ChipSpec("TPU v5p", 459e12, 95 * GIB, 2765e9, True),
    "v6e": ChipSpec("TPU v6e", 918e12, 32 * GIB, 1640e9, False),
}


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
    """'v5e:16x16' -> ('v5e', (16, 16)); a `UserValueError` naming the form otherwise."""
    match = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", topology.strip())
    if not match or match.group(1) not in CHIPS:
        raise UserValueError(
            f"topology {topology!r}: expected CHIP:AxB[xC] with CHIP in {sorted(CHIPS)}, "
            "e.g. v5e:16x16, v5p:4x4x4, v4:4x4x4")
    return match.group(1), tuple(int(d) for d in match.group(2).split("x"))


def ensure_libtpu() -> str:
    """Returns the libtpu.so path jax will load; a `UserError` with the install line if missing."""
    env_path = os.environ.get("TPU_LIBRARY_PATH")
    if env_path:
        if not os.path.exists(env_path):
            raise UserFileNotFoundError(f"TPU_LIBRARY_PATH={env_path} does not exist")
        return env_path
    try:
        import libtpu  # noqa: F401  (the PyPI package that ships libtpu.so)
    except ImportError as err:
        raise UserError(
            "AOT compilation for TPU needs libtpu (compile-only use works on CPU): "
            f"pip install libtpu=={LIBTPU_PIN}   (or set TPU_LIBRARY_PATH=/path/to/libtpu.so)") from err
    return os.path.join(os.path.dirname(libtpu.__file__), "libtpu.so")


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """Compile-only TPU devices of `num_slices` slices of `topology` (e.g. 'v5e:16x16')."""
    from jax.experimental import topologies

    chip, dims = parse_topology(topology)
    library = ensure_libtpu()
    kwargs = {}
    if CHIPS[chip].megacore:
        # One jax device per chip (both TensorCores), as on a real v4/v5p VM; without this
        # libtpu lists each core separately. Torus wrap-around exists from 4 chips per axis.
        full = len(dims) == 3 and all(d >= 4 for d in dims)
        kwargs = dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1),
                      wrap=(full, full, full))
    saved = {k: os.environ.get(k) for k in (*_LIBTPU_COMPILE_ONLY_ENV, "TPU_LIBRARY_PATH")}
    os.environ.update({k: v for k, v in _LIBTPU_COMPILE_ONLY_ENV.items() if k not in os.environ})
    os.environ["TPU_LIBRARY_PATH"] = library
    try:
        desc = topologies.get_topology_desc(topology, platform="tpu", num_slices=num_slices, **kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return list(desc.devices)


def make_topology_mesh(mesh_config, devices, num_slices: int = 1) -> jax.sharding.Mesh:
    """The config's mesh over compile-only TPU devices: exactly the trainer's
    `t3d_jax.train.mesh.make_mesh`, which builds the hybrid (DCN x ICI) mesh itself when the
    devices span several slices. `num_slices` only double-checks the topology."""
    found = mesh_lib.slice_count(devices)
    if found != num_slices:
        raise UserValueError(f"num_slices={num_slices} but the topology's devices span {found} slices")
    return mesh_lib.make_mesh(mesh_config, devices)


def memory_report(compiled, chip: ChipSpec) -> dict:
    """Per-chip memory of one compiled step, from XLA's buffer assignment."""
    mem = compiled.memory_analysis()
    args = int(mem.argument_size_in_bytes)
    outs = int(mem.output_size_in_bytes)
    alias = int(mem.alias_size_in_bytes)
    temp = int(mem.temp_size_in_bytes)
    code = int(mem.generated_code_size_in_bytes)
    total = args + outs - alias + temp + code
    return {
        "argument_bytes": args, "output_bytes": outs, "alias_bytes": alias,
        "temp_bytes": temp, "code_bytes": code, "total_bytes": total,
        "total_gib": total / GIB, "hbm_gib": chip.hbm_bytes / GIB,
        "hbm_fraction": total / chip.hbm_bytes, "fits_hbm": total <= chip.hbm_bytes,
    }


def cost_report(compiled, chip: ChipSpec, num_devices: int, kernel_flops: float = 0.0) -> dict:
    """FLOPs per step and the step time / MFU they imply on `chip`.

    XLA's cost analysis describes the SPMD program one chip runs, so its FLOPs and bytes are
    per chip. Two step-time figures: `step_time_at_peak_s` = FLOPs / peak (the time at 100%
    MFU, a lower bound), and a roofline `roofline_step_s` = max(FLOPs / peak, bytes accessed /
    HBM bandwidth), whose MFU is what the chip's peak would give if nothing but compute and
    HBM traffic took time (collectives over ICI/DCN are not counted; see docs/scaling.md).
    XLA's own `optimal_seconds` is kept when it is meaningful (it is negative for programs
    with loops). ``kernel_flops``: FLOPs of custom-call kernels XLA does not count (Pallas
    attention, `pallas_attention_flops`), added to XLA's figure.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
        cost = cost[0]
    xla_flops = float(cost.get("flops", 0.0))
    flops = xla_flops + float(kernel_flops)
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    compute_s = flops / chip.peak_bf16_flops
    memory_s = bytes_accessed / chip.hbm_bytes_per_s
    roofline_s = max(compute_s, memory_s)
    optimal = float(cost.get("optimal_seconds", -1.0))
    return {
        "flops_per_chip": flops,
        "flops_per_step": flops * num_devices,
        "xla_flops_per_chip": xla_flops,
        "kernel_flops_per_chip": float(kernel_flops),
        "bytes_accessed_per_chip": bytes_accessed,
        "step_time_at_peak_s": compute_s,
        "hbm_time_s": memory_s,
        "roofline_step_s": roofline_s,
        "mfu_at_roofline": compute_s / roofline_s if roofline_s > 0 else None,
        "xla_optimal_seconds": optimal if optimal > 0 else None,
        "peak_bf16_flops_per_chip": chip.peak_bf16_flops,
        "hbm_bytes_per_s": chip.hbm_bytes_per_s,
    }


def compile_train_step(config, topology: str, num_slices: int = 1, hlo_out: str | None = None) -> dict:
    """Builds the trainer's program on the topology's devices, compiles it, returns the report.

    ``hlo_out``: also write the compiled program's HLO text there (for `hlo_traffic` and
    reading by hand without compiling again)."""
    code = code_version()  # before the (long) compile: the code that is compiled
    chip = CHIPS[parse_topology(topology)[0]]
    devices = topology_devices(topology, num_slices)
    mesh = make_topology_mesh(config.mesh, devices, num_slices)
    # As in the training loop: the loss's shard_map reads the ambient mesh while tracing.
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        program = step_lib.make_train_program(config, mesh)
        lowered = program.step.lower(program.abstract_state, program.abstract_batch)
        t_lower = time.perf_counter() - t0
        compiled = lowered.compile()
        t_compile = time.perf_counter() - t0 - t_lower
    total_params, trainable = optim_lib.count_params(program.abstract_state["params"], program.frozen_mask)
    hlo_text = compiled.as_text()
    kernels = pallas_attention_flops(hlo_text)
    if hlo_out:
        pathlib.Path(hlo_out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(hlo_out).write_text(hlo_text)
    gbs = int(config.train.global_batch_size)
    dp = mesh_lib.data_parallel_size(mesh, config.sharding_rules)
    return {
        "topology": topology, "num_slices": num_slices, "chip": chip.name,
        "num_devices": len(devices), "num_hosts": len({d.process_index for d in devices}),
        "mesh": {a: int(n) for a, n in mesh.shape.items()},
        "global_batch_size": gbs, "per_chip_batch": gbs / dp,
        "grad_accum_steps": int(config.train.grad_accum_steps),
        "params": int(total_params), "trainable_params": int(trainable),
        "settings": settings(config),
        "flops_undercounted_by": step_lib.flop_undercount_reasons(config) + (
            ["Pallas kernels other than splash attention: custom calls whose FLOPs XLA does not count"]
            if hlo_text.count('custom_call_target="tpu_custom_call"') > sum(kernels["calls"].values()) else []),
        "pallas_attention": kernels,
        "lower_s": round(t_lower, 2), "compile_s": round(t_compile, 2),
        "memory": memory_report(compiled, chip),
        "cost": cost_report(compiled, chip, len(devices), kernel_flops=kernels["flops"]),
        "hlo_traffic": hlo_traffic(hlo_text),
        "jax": jax.__version__, "libtpu": libtpu_version(), "code": code,
    }


def settings(config) -> dict:
    """The config values that set a step's memory and FLOPs, as the report records them
    (read with defaults: a task's model need not have both towers)."""
    model = config.model
    image, text = cfg_get(model, "image", {}), cfg_get(model, "text", {})
    return {
        "task": str(cfg_get(config, "task", "")),
        "model": str(model.name), "dtype": str(model.dtype),
        "image_size": str(cfg_get(image, "size", "")), "text_size": str(cfg_get(text, "size", "")),
        "view_size": list(config.data.view_size), "num_views": int(config.data.num_views),
        "patch_size": list(cfg_get(image, "patch_size", ())),
        "remat": str(cfg_get(image, "remat", "none")),
        "text_remat": str(cfg_get(text, "remat", "none")),
        "scan_layers": bool(cfg_get(image, "scan_layers", False) or cfg_get(text, "scan_layers", False)),
        "patch_dropout": float(cfg_get(image, "patch_dropout", 0.0)),
        "nonfinite_guard": str(cfg_get(config.train, "nonfinite_guard", "where")),
        "loss_chunked": bool(cfg_get(config.loss, "chunked", False)),
        "attention": str(cfg_get(model, "attention", "reference")),
    }


def code_version() -> str:
    """The repository commit compiled (+ '-dirty' with uncommitted changes), for the report;
    'unknown' outside a git checkout."""
    here = pathlib.Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def libtpu_version() -> str:
    """The libtpu package's version, or the TPU_LIBRARY_PATH the library was loaded from."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("libtpu")
    except PackageNotFoundError:
        return os.environ.get("TPU_LIBRARY_PATH", "unknown")


def format_report(r: dict) -> str:
    """The report as the few lines a person reads (the JSON keeps everything)."""
    m, c, s = r["memory"], r["cost"], r["settings"]
    gib = lambda b: f"{b / GIB:.2f} GiB"
    mfu = c["mfu_at_roofline"]
    lines = [
        f"{r['topology']} x{r['num_slices']} slice(s): {r['num_devices']} chips ({r['chip']}), "
        f"{r['num_hosts']} hosts; mesh {r['mesh']}",
        f"task {s.get('task') or '?'}, model {s['model']} image={s['image_size']} text={s['text_size']} "
        f"{r['params'] / 1e6:.1f}M params, dtype {s['dtype']}, remat {s['remat']}, "
        f"patch_dropout {s['patch_dropout']}",
        f"global batch {r['global_batch_size']} ({r['per_chip_batch']:g}/chip, "
        f"{r['grad_accum_steps']} micro-batches), views {s['num_views']}x{s['view_size']}",
        f"per-chip memory: arguments {gib(m['argument_bytes'])}, outputs {gib(m['output_bytes'])}, "
        f"aliased {gib(m['alias_bytes'])}, temporaries {gib(m['temp_bytes'])}, code {gib(m['code_bytes'])}",
        f"  total {gib(m['total_bytes'])} of {m['hbm_gib']:.0f} GiB HBM ({100 * m['hbm_fraction']:.0f}%): "
        f"{'FITS' if m['fits_hbm'] else 'DOES NOT FIT'}",
        f"FLOPs/step: {c['flops_per_chip'] / 1e9:.4g} GFLOP per chip, {c['flops_per_step'] / 1e12:.4g} TFLOP "
        f"over all chips; {c['bytes_accessed_per_chip'] / GIB:.3g} GiB HBM traffic per chip"
        + (f" ({c['kernel_flops_per_chip'] / 1e9:.4g} GFLOP of it in Pallas attention kernels, counted from "
           "their shapes)" if c.get("kernel_flops_per_chip") else ""),
        f"step time at {c['peak_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s peak (100% MFU): "
        f"{1e3 * c['step_time_at_peak_s']:.2f} ms; roofline (compute vs {c['hbm_bytes_per_s'] / 1e9:.0f} GB/s "
        f"HBM) {1e3 * c['roofline_step_s']:.2f} ms" + (f" -> MFU {100 * mfu:.0f}%" if mfu else ""),
        *([f"  (FLOPs, MFU and roofline are undercounted: {'; '.join(r['flops_undercounted_by'])}; "
           "XLA counts a loop's body once and no FLOPs inside custom calls)"] if r.get("flops_undercounted_by") else []),
        f"lowered in {r['lower_s']}s, compiled in {r['compile_s']}s (jax {r['jax']}, libtpu {r['libtpu']})",
    ]
    if r.get("hlo_traffic"):
        t = r["hlo_traffic"]
        lines.append(f"HBM traffic by the line that made it (operands + results of the top-level HLO ops, "
                     f"{t['total_bytes'] / GIB:.3g} GiB in all; 'bwd:' = backward pass):")
        lines += [f"  {100 * e['fraction']:5.1f}%  {e['bytes'] / GIB:8.3g} GiB  {e['source']}"
                  for e in t.get("top_sources", [])[:8]]
    return "\n".join(lines)


# ------------------------------------------------------------------ where the bytes go
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*?)\)(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?(%?[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Instructions that move no HBM bytes of their own (aliases, control flow, bookkeeping).
_FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
             "call", "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency"}


def _type_bytes(text: str) -> float:
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def scope_of(op_name: str, depth: int = 3) -> str:
    """A readable scope of an HLO op's `op_name` metadata: the jit's name and the autodiff
    wrappers dropped, 'bwd:' marking the backward pass, `depth` path components kept, layer
    indices folded (`blocks/3/attn` -> `blocks/*/attn`)."""
    if not op_name:
        return "(no metadata)"
    backward = "transpose(" in op_name
    parts = [p for p in op_name.split("/") if p and not p.startswith("jit(")]
    wrapper = re.compile(r"^(?:jvp|transpose|vmap|remat|checkpoint|pjit|shard_map)\((.*)\)$")
    for _ in range(4):  # nested wrappers: transpose(jvp(ViT3D)) -> ViT3D
        parts = [wrapper.sub(r"\1", p) for p in parts]
    parts = [p for p in parts if p and not re.fullmatch(r"(jvp|transpose|vmap|remat|checkpoint)\(?\)?", p)]
    parts = ["*" if p.isdigit() else p for p in parts]
    return ("bwd: " if backward else "") + ("/".join(parts[:depth]) or "(top)")


_TABLE_ROW = re.compile(r"^(\d+) (.*)$")


def _stack_frames(hlo_text: str, package: str = "t3d_jax/"):
    """{stack_frame_id: 'file.py:line (function)'} of the innermost frame in ``package`` for
    every frame of the HLO's debug tables (FileNames, FunctionNames, FileLocations,
    StackFrames; a frame's parent_frame_id is the parent's id + 1, 0 = none), so an op can be
    named by the project line that made it rather than by the jax primitive."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in hlo_text.splitlines()[:200000]:
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = line
            tables[current] = {}
            continue
        m = _TABLE_ROW.match(line) if current else None
        if m:
            tables[current][int(m.group(1))] = m.group(2)
        elif current and line.strip():
            current = None
    if "StackFrames" not in tables:
        return {}
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    locs = {}
    for k, v in tables.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", v)
        if f:
            locs[k] = (files.get(int(f.group(1)), "?"), funcs.get(int(f.group(2)), "?"), int(f.group(3)))
    frames = {}
    for k, v in tables["StackFrames"].items():
        f = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", v)
        if f:
            frames[k] = (int(f.group(1)), int(f.group(2)) - 1)
    named = {}
    for k in frames:
        seen, cur = set(), k
        while cur in frames and cur not in seen:
            seen.add(cur)
            loc = locs.get(frames[cur][0])
            if loc and package in loc[0] and "/train/aot.py" not in loc[0]:
                named[k] = f"{loc[0].split(package, 1)[1]}:{loc[2]} ({loc[1]})"
                break
            cur = frames[cur][1]
    return named


# Matmul FLOPs of the splash-attention kernels per unit B*H*Lq*Lk*Dh: forward QK^T and PV (2+2);
# dq recomputes S and dP and forms dS K (2+2+2); dkv recomputes S, dP and forms P^T dO and dS^T Q.
_SPLASH_FLOPS = {"splash_mha_fwd": 4.0, "splash_mha_dq": 6.0, "splash_mha_dkv": 8.0}


def pallas_attention_flops(hlo_text: str) -> dict:
    """FLOPs of the Pallas splash-attention kernels of a compiled TPU program, which XLA's cost
    analysis does not count (custom calls): each kernel's count from its q/k operand shapes
    (the first two floating operands, [B, H, L, Dh] or [H, L, Dh] for one example, lengths
    padded to the tile), so blocks the
    kernel skips for padding are counted (an overestimate by at most the padding fraction).
    Returns {'flops': total, 'calls': {kernel: count}}."""
    total, calls = 0.0, {}
    for m in re.finditer(r"%(splash_mha_(?:fwd|dq|dkv))\w*(?:\.\d+)? = .*?custom_call_target=\"tpu_custom_call\""
                         r".*?operand_layout_constraints=\{(.*?)\}\}", hlo_text):
        shapes = [tuple(int(d) for d in dims.split(",")) for dtype, dims in _SHAPE.findall(m.group(2))
                  if dtype in ("bf16", "f16", "f32") and dims.count(",") in (2, 3)]
        if len(shapes) < 2:
            continue
        q, k = ((1,) + s_ if len(s_) == 3 else s_ for s_ in shapes[:2])  # [H, L, Dh]: one example
        (b, h, lq, dh), lk = q, k[2]
        total += _SPLASH_FLOPS[m.group(1)] * b * h * lq * lk * dh
        calls[m.group(1)] = calls.get(m.group(1), 0) + 1
    return {"flops": total, "calls": calls}


def hlo_traffic(hlo_text: str, *, depth: int = 3, top: int = 12) -> dict:
    """Bytes each top-level HLO instruction of a compiled program reads and writes (its
    operands' and result's sizes, the estimate XLA's cost analysis makes for a fusion; twice the
    result for the -done of an async pair such as a TPU slice or copy), summed
    by the `scope_of` its metadata names. Fused computations are not walked (their insides
    stay in vregs/VMEM) and a loop body is counted once, as XLA's own figure does. Use it to
    name what moves the bytes of a memory-bound step; the total is an estimate close to, not
    equal to, `cost_analysis()['bytes accessed']`.
    """
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1).lstrip("%")
            comps[current] = []
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    nested = set()  # computations entered by fusions and reducers: not HBM traffic of their own
    for lines in comps.values():
        for line in lines:
            for key in ("calls", "to_apply"):
                for name in re.findall(key + r"=%?([\w.\-]+)", line):
                    nested.add(name)
    sources = _stack_frames(hlo_text)
    sizes: dict[str, float] = {}
    by_scope: dict[str, float] = {}
    by_source: dict[str, float] = {}
    by_op: dict[str, float] = {}
    for name, lines in comps.items():
        parsed = []
        for line in lines:
            m = _INSTR.match(line)
            if m:
                sizes[m.group(1).lstrip("%")] = _type_bytes(m.group(2))
                parsed.append(m)
        if name in nested:
            continue
        for m in parsed:
            op = m.group(3)
            if op in _FREE_OPS:
                continue
            if op.endswith("-start"):
                continue  # an async pair's traffic is counted once, at its -done
            result = sizes[m.group(1).lstrip("%")]
            if op.endswith("-done"):
                moved = 2.0 * result  # the data read and written (slice, copy, collective)
            else:
                operands = re.findall(r"%([\w.\-]+)", m.group(4))
                moved = result + sum(sizes.get(o, 0.0) for o in operands)
            kind = op
            if op == "fusion":
                k = re.search(r"kind=(k\w+)", m.group(5))
                kind = f"fusion:{k.group(1)}" if k else op
            elif op == "custom-call":
                t = re.search(r'custom_call_target="([^"]+)"', m.group(5))
                kind = f"custom-call:{t.group(1)}" if t else op
            meta = _OP_NAME.search(m.group(5))
            key = scope_of(meta.group(1), depth) if meta else f"({op}, no metadata)"
            by_scope[key] = by_scope.get(key, 0.0) + moved
            frame = re.search(r"stack_frame_id=(\d+)", m.group(5))
            where = sources.get(int(frame.group(1)), f"({kind}, outside t3d_jax)") if frame else f"({kind})"
            where = ("bwd: " if key.startswith("bwd: ") else "") + where
            by_source[where] = by_source.get(where, 0.0) + moved
            by_op[kind] = by_op.get(kind, 0.0) + moved
    total = sum(by_scope.values())
    ranked = sorted(by_scope.items(), key=lambda kv: -kv[1])
    by_line = sorted(by_source.items(), key=lambda kv: -kv[1])
    return {
        "total_bytes": total,
        "top_scopes": [{"scope": k, "bytes": v, "fraction": v / total if total else 0.0} for k, v in ranked[:top]],
        "top_sources": [{"source": k, "bytes": v, "fraction": v / total if total else 0.0}
                        for k, v in by_line[:top]],
        "by_op": {k: v for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
    }
