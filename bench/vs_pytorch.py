r"""Our train step against the PyTorch stack the field runs, same architecture and batch, on CPU.

  python bench/vs_pytorch.py [--cases demo,small] [--steps 8] [--out bench_vs_pytorch.json]

PyTorch side (torch==2.13.0 CPU): MONAI's 3D `ViT` (conv patch embedding, sin-cos position
table, pre-LN blocks, qkv bias) + a randomly initialised `transformers.BertModel` (SDPA
attention, dropout 0.1 as BERT's defaults) + linear projections + the symmetric CLIP loss with
a learnable, clamped logit scale + AdamW with global-norm clipping: the CT-CLIP recipe. Our
side: the trainer's compiled step (`make_train_program`) for the `clip` task and model with
the same widths, depths, heads, MLP sizes, patch size, view size, views per example, token
length, batch, AdamW settings and clipping. Both in float32 (this CPU's fast path for XLA; PyTorch's
is bf16, but mixing precisions would compare different computations).

Timing: both steps run INTERLEAVED in this one process (jax step, torch step, jax step, ...)
so load from other users of the machine hits both alike; the median of each is reported and
the ratio is torch / ours (> 1 = ours faster). Ours runs with XLA's default thread pool.
PyTorch gets its better thread count: on a loaded machine its OpenMP workers spin-wait for
each other and 2 threads can be ~10x slower than 1, so before timing, 1 and all-core threads
are each tried for a few steps and the faster setting is used (both are recorded).

Peak memory: each framework alone in a child process (the same code), as the peak resident
set during the timed steps (Linux VmHWM, reset after set-up and compilation with
/proc/self/clear_refs) minus the resident set right after imports -- i.e. parameters,
optimizer state, activations and the framework's working buffers, without compile-time
memory. For ours, XLA's buffer plan of the compiled step (memory_analysis) is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

# Cases: a config of configs/t3d.py with the CLIP task and model (two views kept), float32,
# and a CPU-sized batch.
CLIP = {"task": "clip", "model.name": "clip", "model.dtype": "float32"}
CASES = {
    "demo": {"config": "demo", "overrides": {**CLIP}},
    "small": {"config": "small", "overrides": {**CLIP, "train.global_batch_size": 4}},
    # The same model with its blocks stacked and run by nnx.scan (same parameters and math;
    # XLA:CPU then fuses the backward far better at depth, docs/performance.md).
    "small_scan": {"config": "small", "overrides": {**CLIP, "train.global_batch_size": 4,
                                                    "model.image.scan_layers": True,
                                                    "model.text.scan_layers": True}},
}


def _vm_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Resets VmHWM (peak resident set) to the current resident set (Linux >= 4.0)."""
    pathlib.Path("/proc/self/clear_refs").write_text("5")


# ======================================================================================
# PyTorch reference stack
# ======================================================================================
class TorchCLIPStep:
    """MONAI ViT + HF BERT + CLIP loss + AdamW: one training step per call."""

    def __init__(self, config, batch: dict[str, np.ndarray], threads: int | None = None):
        import torch
        import torch.nn.functional as F
        from monai.networks.nets import ViT
        from transformers import BertConfig as HFBertConfig, BertModel

        from t3d_jax.models.bert import SIZES as BERT_SIZES
        from t3d_jax.models.vit3d import SIZES as VIT_SIZES

        self.torch, self.F = torch, F
        torch.manual_seed(0)
        if threads:
            torch.set_num_threads(threads)
        width, depth, heads, mlp = VIT_SIZES[config.model.image.size]
        image = config.model.image
        if image.pos_embed != "sincos" or image.pool != "mean":
            raise ValueError("the PyTorch reference implements sincos positions and mean pooling only")
        self.vit = ViT(in_channels=int(image.in_channels), img_size=tuple(config.data.view_size),
                       patch_size=tuple(image.patch_size), hidden_size=width, mlp_dim=mlp, num_layers=depth,
                       num_heads=heads, proj_type="conv", classification=False,
                       # MONAI's 3D sin-cos table needs width % 6 == 0 (ViT-S/B); the tiny
                       # width 64 gets a learned table instead (an add either way).
                       pos_embed_type="sincos" if width % 6 == 0 else "learnable",
                       dropout_rate=0.0, spatial_dims=3, qkv_bias=bool(image.qkv_bias))
        h, n, a, i = BERT_SIZES[config.model.text.size]
        self.bert = BertModel(HFBertConfig(vocab_size=int(config.model.text.vocab_size), hidden_size=h,
                                           num_hidden_layers=n, num_attention_heads=a, intermediate_size=i,
                                           max_position_embeddings=max(512, int(config.model.text.max_len))),
                              add_pooling_layer=False)
        d = int(config.model.embed_dim)
        self.image_proj = torch.nn.Linear(width, d, bias=False)
        self.text_proj = torch.nn.Linear(h, d, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(config.loss.logit_scale_init)))
        self.max_scale = float(config.loss.logit_scale_max)
        self.modules = torch.nn.ModuleList([self.vit, self.bert, self.image_proj, self.text_proj])
        params = list(self.modules.parameters()) + [self.logit_scale]
        o = config.optim
        self.opt = torch.optim.AdamW(params, lr=float(o.lr), betas=(float(o.b1), float(o.b2)), eps=float(o.eps),
                                     weight_decay=float(o.weight_decay))
        self.params = params
        self.clip_norm = float(o.clip_norm)
        self.modules.train()
        # MONAI is channel-first: [B*V, C, X, Y, Z].
        views = batch["views"]
        b, v = views.shape[:2]
        self.b, self.v = b, v
        self.views = torch.from_numpy(np.ascontiguousarray(
            views.reshape(b * v, *views.shape[2:]).transpose(0, 4, 1, 2, 3)))
        self.input_ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
        self.attention_mask = torch.from_numpy(batch["attention_mask"].astype(np.int64))
        self.num_params = sum(p.numel() for p in params)
        self.last_loss = float("nan")

    def loss(self):
        torch, F = self.torch, self.F
        tokens, _ = self.vit(self.views)  # [B*V, N, width] after the final LayerNorm
        image = F.normalize(self.image_proj(tokens.mean(dim=1)), dim=-1).reshape(self.b, self.v, -1)
        hidden = self.bert(input_ids=self.input_ids, attention_mask=self.attention_mask).last_hidden_state
        text = F.normalize(self.text_proj(hidden[:, 0]), dim=-1)
        scale = torch.clamp(self.logit_scale.exp(), max=self.max_scale)
        labels = torch.arange(self.b)
        total = 0.0
        for view in range(self.v):
            logits = scale * image[:, view] @ text.T
            total = total + 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        return total / self.v

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        if self.clip_norm > 0:
            self.torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.opt.step()
        self.last_loss = float(loss.detach())
        return time.perf_counter() - t0


def measure_torch_matmul_peak(n: int, repeats: int) -> float:
    """PyTorch's counterpart of `t3d_jax.train.metrics.measure_peak_flops`: the best of
    `repeats` float32 n^3 matmuls, each framework's MFU measured against its own."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


# ======================================================================================
# Cases
# ======================================================================================
def build_case(name: str):
    from train_step import load_config, synthetic_batch

    spec = CASES[name]
    config = load_config(spec["config"], spec["overrides"])
    return config, synthetic_batch(config, np.random.default_rng(0))


def memory_child(framework: str, case: str, steps: int, threads: int | None = None) -> dict:
    """Runs in a child process: peak RSS of `framework`'s steps above the post-import RSS."""
    import jax  # noqa: F401  (both imports before the baseline, as in the timing run)
    import torch  # noqa: F401

    baseline = _vm_kib("VmRSS")
    config, batch = build_case(case)
    if framework == "torch":
        step = TorchCLIPStep(config, batch, threads=threads)
    else:
        from train_step import JaxTrainStep
        step = JaxTrainStep(config)
    step()  # warm-up: allocator pools, lazy state
    reset_peak_rss()
    for _ in range(steps):
        step()
    peak = _vm_kib("VmHWM")
    out = {"framework": framework, "case": case, "baseline_rss_kib": baseline, "peak_rss_kib": peak,
           "step_peak_above_baseline_bytes": (peak - baseline) * 1024}
    if framework == "jax":
        out["xla_compiled_step_bytes"] = step.memory_bytes
    return out


def run_memory(framework: str, case: str, steps: int, threads: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", framework, "--cases", case, "--steps", str(steps),
           "--torch-threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {framework}/{case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(name: str, steps: int, jax_peak: float, torch_peak: float) -> dict:
    from train_step import JaxTrainStep

    import torch

    config, batch = build_case(name)
    ours = JaxTrainStep(config)
    theirs = TorchCLIPStep(config, batch)
    ours(), theirs()  # warm-up
    calibration = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        theirs()
        calibration[threads] = statistics.median(theirs() for _ in range(2))
    torch_threads = min(calibration, key=calibration.get)
    torch.set_num_threads(torch_threads)
    t_ours, t_theirs = [], []
    for _ in range(steps):
        t_ours.append(ours())
        t_theirs.append(theirs())
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    flops = ours.flops  # same architecture and batch: XLA's count of the whole step
    return {
        "case": name, "config": CASES[name]["config"], "overrides": CASES[name]["overrides"],
        "image_size": str(config.model.image.size), "text_size": str(config.model.text.size),
        "view_size": list(config.data.view_size), "num_views": int(config.data.num_views),
        "patch_size": list(config.model.image.patch_size), "max_len": int(config.preprocess.max_len),
        "global_batch_size": int(config.train.global_batch_size),
        "params_ours": ours.params, "params_torch": theirs.num_params,
        "torch_threads": torch_threads, "torch_thread_calibration_s": calibration,
        "steps_timed": steps, "ours_step_s": t_ours, "torch_step_s": t_theirs,
        "ours_step_s_median": med_ours, "torch_step_s_median": med_theirs,
        "speedup_torch_over_ours": med_theirs / med_ours,
        "flops_per_step": flops,
        "ours_mfu_vs_jax_matmul_peak": flops / med_ours / jax_peak,
        "torch_mfu_vs_torch_matmul_peak": flops / med_theirs / torch_peak,
        "ours_final_loss": ours.last_loss, "torch_final_loss": theirs.last_loss,
        "ours_compile_s": ours.compile_s,
    }


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="demo,small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--cores", type=int, default=0,
                        help="pin this process (both frameworks) to its first N allowed cores before "
                             "JAX and PyTorch start (XLA sizes its thread pool from the affinity); 0 = all")
    parser.add_argument("--out", default="bench_vs_pytorch.json")
    parser.add_argument("--memory-child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--torch-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cores:  # before any import of jax/torch: their thread pools follow the affinity
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    names = [c for c in args.cases.split(",") if c]
    for n in names:
        if n not in CASES:
            parser.error(f"unknown case {n!r}; choose from {sorted(CASES)}")
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, names[0], args.steps, args.torch_threads or None)))
        return None

    import torch
    from train_step import PEAK_N, PEAK_REPEATS, machine_info

    from t3d_jax.train.metrics import measure_peak_flops

    info = machine_info()
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["cores_allowed"] = sorted(os.sched_getaffinity(0))
    jax_peak = measure_peak_flops(PEAK_N, seconds=0, repeats=PEAK_REPEATS)
    torch_peak = measure_torch_matmul_peak(PEAK_N, PEAK_REPEATS)
    print(f"{info['cpu']} ({info['cpu_count']} cores), load {info['loadavg_start']}; float32 {PEAK_N}^3 matmul: "
          f"JAX {jax_peak / 1e9:.1f} GFLOP/s, PyTorch {torch_peak / 1e9:.1f} GFLOP/s")
    rows = []
    for name in names:
        row = run_case(name, args.steps, jax_peak, torch_peak)
        if not args.no_memory:
            row["memory_ours"] = run_memory("jax", name, args.memory_steps)
            row["memory_torch"] = run_memory("torch", name, args.memory_steps, row["torch_threads"])
        rows.append(row)
        print(f"  {name}: ours {row['ours_step_s_median'] * 1e3:.1f} ms, torch {row['torch_step_s_median'] * 1e3:.1f} ms "
              f"({row['torch_threads']} thread(s); calibration {row['torch_thread_calibration_s']})",
              flush=True)
    print(f"{'case':6} {'batch':>5} {'views':>13} {'ours ms':>9} {'torch ms':>9} {'torch/ours':>10} "
          f"{'ours MFU':>9} {'torch MFU':>9} {'ours MiB':>9} {'torch MiB':>9}")
    for r in rows:
        views = f"{r['num_views']}x" + "x".join(str(s) for s in r["view_size"])
        mem = lambda key: (f"{r[key]['step_peak_above_baseline_bytes'] / 2**20:9.0f}" if key in r else f"{'-':>9}")
        print(f"{r['case']:6} {r['global_batch_size']:5d} {views:>13} {r['ours_step_s_median'] * 1e3:9.1f} "
              f"{r['torch_step_s_median'] * 1e3:9.1f} {r['speedup_torch_over_ours']:9.2f}x "
              f"{100 * r['ours_mfu_vs_jax_matmul_peak']:8.1f}% {100 * r['torch_mfu_vs_torch_matmul_peak']:8.1f}% "
              f"{mem('memory_ours')} {mem('memory_torch')}")
    result = {"machine": {**info, "loadavg_end": os.getloadavg()},
              "jax_matmul_peak_flops_per_s": jax_peak, "torch_matmul_peak_flops_per_s": torch_peak,
              "command": " ".join(["python", "bench/vs_pytorch.py", *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
