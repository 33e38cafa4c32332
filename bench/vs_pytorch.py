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

The PyTorch ViT is `TorchViT3D` below: MONAI's `monai.networks.nets.ViT` (conv patch
embedding, the same state-dict names, pre-LN blocks, GELU MLP) written in plain torch, so the
bench runs where MONAI is not installed (the GPU image of bench/gpu_check.sh). With
`attention="einsum"` (the CPU cases) it computes what MONAI's ViT computes, op for op;
`tests/test_gpu_check.py` loads a MONAI ViT's weights into it and compares the outputs.

Accelerator cases (`gpu_small`, `gpu_base`, `gpu_tiny`; run by bench/gpu_check.sh):

  python bench/vs_pytorch.py --device gpu --cases gpu_small --out small.json
  python bench/vs_pytorch.py --device cpu --cases gpu_tiny --out tiny.json   # the same path on CPU
  python bench/vs_pytorch.py --merge small.json base.json --out gpu_check.json  # table of several

Both sides in bfloat16 (ours: `model.dtype=bfloat16`, float32 parameters; PyTorch:
`torch.autocast(bfloat16)`, float32 parameters), the configured view size, patch size and
widths of `small` / `base`, no remat (PyTorch keeps every activation too), BERT's attention
dropout 0 on both sides (cuDNN's fused attention has no dropout; hidden dropout 0.1 stays on
both). Ours: `model.attention=cudnn` on GPU (cuDNN flash attention through
`jax.nn.dot_product_attention`; XLA's attention instead if cuDNN's cannot compile or run, recorded),
`xla` on CPU. PyTorch: `F.scaled_dot_product_attention` in
the ViT and Hugging Face BERT's `sdpa` attention (PyTorch picks flash / memory-efficient
kernels), `torch.compile` of the forward + loss (`--torch-compile auto`: tried, and eager if
compiling raises or runs past `--torch-compile-timeout-s`; the JSON records which ran), fused
AdamW on CUDA. Warm-up (compilation,
autotuning) is excluded; then the steps run interleaved, and `--budget-s` caps the case's wall
time (the timed steps are cut to what the budget still allows, at least 3). FLOPs per step:
the model's matmul FLOPs counted from the shapes (`analytic_flops`: 3x the forward's matmuls
and attention, 2x for the patch embedding, whose input needs no gradient), the same for both
sides; MFU against `--peak-tflops` (H200: 989 dense bf16) or, when 0, a matmul peak measured in
the process. XLA's own count of the compiled step is recorded too (it omits what runs inside
cuDNN's attention kernels). Peak memory: each allocator's own peak on the device -- JAX's
`memory_stats()["peak_bytes_in_use"]` (since process start) and
`torch.cuda.max_memory_allocated()` (since process start) -- so the two frameworks sharing one
process and card are counted apart; on CPU there is no such counter and the columns stay empty.
`--frameworks jax|torch` times one side alone (when the two cannot share a process).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import pathlib
import signal
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
# Accelerator cases (module doc): bfloat16, no remat, BERT attention dropout 0, the plain loss
# (one device). `--device` adds the attention implementation (cudnn on GPU, xla on CPU).
ACCEL = {**CLIP, "model.dtype": "bfloat16", "model.text.attention_dropout": 0.0,
         "model.image.remat": "none", "model.text.remat": "none", "loss.chunked": False}
ACCEL_CASES = {
    # `small` as configured for one GPU: batch 64, 2 views of 96x96x64, ViT-S/16x16x8, BERT-mini.
    "gpu_small": {"config": "small", "overrides": {**ACCEL}},
    # `base` sizes (ViT-B on 2 views of 160x160x96 = 1,200 tokens each, BERT-base, 128 tokens)
    # at a batch one H200 holds for both frameworks at once without remat (~30 GB each).
    "gpu_base": {"config": "base", "overrides": {**ACCEL, "train.global_batch_size": 32}},
    # The same path at the test sizes, for --cpu runs of bench/gpu_check.sh.
    "gpu_tiny": {"config": "tiny", "overrides": {**ACCEL}},
}
CASES.update(ACCEL_CASES)
ATTENTION_BY_DEVICE = {"gpu": "cudnn", "cpu": "xla"}
H200_BF16_DENSE_TFLOPS = 989.0


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
def sincos_position_table(grid, width: int, temperature: float = 10000.0):
    """MONAI's 3D sin-cos position table (`build_sincos_position_embedding`), [1, N, width]."""
    import torch

    if width % 6:
        raise ValueError("the 3D sin-cos table needs width % 6 == 0")
    axes = [torch.arange(int(g), dtype=torch.float32) for g in grid]
    grid_h, grid_w, grid_d = torch.meshgrid(*axes, indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(width // 6, dtype=torch.float32) / (width // 6))
    out = [torch.einsum("m,d->md", g.flatten(), omega) for g in (grid_w, grid_h, grid_d)]
    return torch.cat([f(o) for o in out for f in (torch.sin, torch.cos)], dim=1)[None]


def monai_trunc_normal_(tensor, mean: float, std: float, a: float, b: float):
    """monai.networks.layers.weight_init.trunc_normal_ (inverse-CDF sampling; the same draws)."""
    import torch

    def cdf(x):
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
        tensor.uniform_(2 * lo - 1, 2 * hi - 1).erfinv_().mul_(std * math.sqrt(2.0)).add_(mean).clamp_(min=a, max=b)
    return tensor


@functools.cache
def _torch_vit_classes():
    """The plain-torch copy of MONAI's ViT (classes built on first use: torch imports lazily)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SABlock(nn.Module):  # monai.networks.blocks.selfattention.SABlock, combined qkv
        def __init__(self, hidden: int, heads: int, qkv_bias: bool, attention: str):
            super().__init__()
            self.num_heads, self.dim_head, self.attention = heads, hidden // heads, attention
            self.out_proj = nn.Linear(hidden, hidden)
            self.qkv = nn.Linear(hidden, hidden * 3, bias=qkv_bias)
            self.scale = self.dim_head ** -0.5

        def forward(self, x):
            b, n, _ = x.shape
            # MONAI: Rearrange("b h (qkv l d) -> qkv b l h d") with h = tokens, l = heads.
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4)
            if self.attention == "sdpa":
                x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            else:  # MONAI's own path (use_flash_attention=False)
                att = (torch.einsum("blxd,blyd->blxy", q, k) * self.scale).softmax(dim=-1)
                x = torch.einsum("bhxy,bhyd->bhxd", att, v)
            return self.out_proj(x.transpose(1, 2).reshape(b, n, -1))  # "b l h d -> b h (l d)"

    class MLPBlock(nn.Module):  # monai.networks.blocks.mlp.MLPBlock, GELU, no dropout
        def __init__(self, hidden: int, mlp: int):
            super().__init__()
            self.linear1, self.linear2, self.fn = nn.Linear(hidden, mlp), nn.Linear(mlp, hidden), nn.GELU()

        def forward(self, x):
            return self.linear2(self.fn(self.linear1(x)))

    class TransformerBlock(nn.Module):  # monai.networks.blocks.transformerblock.TransformerBlock
        def __init__(self, hidden: int, mlp: int, heads: int, qkv_bias: bool, attention: str):
            super().__init__()
            self.mlp = MLPBlock(hidden, mlp)
            self.norm1 = nn.LayerNorm(hidden)
            self.attn = SABlock(hidden, heads, qkv_bias, attention)
            self.norm2 = nn.LayerNorm(hidden)
            self.norm_cross_attn = nn.LayerNorm(hidden)  # MONAI builds it (unused without cross-attention)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class PatchEmbeddingBlock(nn.Module):  # proj_type="conv"
        def __init__(self, in_channels, img_size, patch_size, hidden, pos_embed_type):
            super().__init__()
            grid = [i // p for i, p in zip(img_size, patch_size)]
            self.patch_embeddings = nn.Conv3d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)
            if pos_embed_type == "sincos":
                self.position_embeddings = nn.Parameter(sincos_position_table(grid, hidden), requires_grad=False)
            else:  # "learnable"
                self.position_embeddings = nn.Parameter(torch.zeros(1, int(np.prod(grid)), hidden))
                monai_trunc_normal_(self.position_embeddings, mean=0.0, std=0.02, a=-2.0, b=2.0)

        def forward(self, x):
            return self.patch_embeddings(x).flatten(2).transpose(-1, -2) + self.position_embeddings

    class TorchViT3D(nn.Module):
        """monai.networks.nets.ViT(proj_type="conv", classification=False, dropout_rate=0,
        spatial_dims=3) with the same parameter names; `forward` returns MONAI's first output
        (the tokens after the final LayerNorm). attention: "einsum" (MONAI's) | "sdpa"."""

        def __init__(self, in_channels, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads,
                     pos_embed_type="sincos", qkv_bias=False, attention="einsum"):
            super().__init__()
            if attention not in ("einsum", "sdpa"):
                raise ValueError(f"attention must be 'einsum' or 'sdpa', got {attention!r}")
            self.patch_embedding = PatchEmbeddingBlock(in_channels, img_size, patch_size, hidden_size,
                                                       pos_embed_type)
            self.blocks = nn.ModuleList([TransformerBlock(hidden_size, mlp_dim, num_heads, qkv_bias, attention)
                                         for _ in range(num_layers)])
            self.norm = nn.LayerNorm(hidden_size)

        def forward(self, x):
            x = self.patch_embedding(x)
            for block in self.blocks:
                x = block(x)
            return self.norm(x)

    return TorchViT3D


def TorchViT3D(*args, **kwargs):
    """A plain-torch MONAI ViT (see `_torch_vit_classes`)."""
    return _torch_vit_classes()(*args, **kwargs)


class TorchCLIPStep:
    """MONAI's ViT (plain-torch copy) + HF BERT + CLIP loss + AdamW: one training step per call.

    device / dtype / compile / vit_attention: the CPU cases keep "cpu", float32, eager and
    MONAI's einsum attention; the accelerator cases use bfloat16 autocast, SDPA and
    torch.compile (module doc).
    """

    def __init__(self, config, batch: dict[str, np.ndarray], threads: int | None = None, *,
                 device: str = "cpu", dtype: str = "float32", compile: bool = False,
                 vit_attention: str = "einsum"):
        import torch
        import torch.nn.functional as F
        from transformers import BertConfig as HFBertConfig, BertModel

        from t3d_jax.models.bert import SIZES as BERT_SIZES
        from t3d_jax.models.vit3d import SIZES as VIT_SIZES

        self.torch, self.F = torch, F
        self.device = torch.device("cuda" if device == "gpu" else device)
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16}[dtype]
        torch.manual_seed(0)
        if threads:
            torch.set_num_threads(threads)
        width, depth, heads, mlp = VIT_SIZES[config.model.image.size]
        image = config.model.image
        if image.pos_embed != "sincos" or image.pool != "mean":
            raise ValueError("the PyTorch reference implements sincos positions and mean pooling only")
        self.vit = TorchViT3D(in_channels=int(image.in_channels), img_size=tuple(config.data.view_size),
                              patch_size=tuple(image.patch_size), hidden_size=width, mlp_dim=mlp,
                              num_layers=depth, num_heads=heads,
                              # MONAI's 3D sin-cos table needs width % 6 == 0 (ViT-S/B); the tiny
                              # width 64 gets a learned table instead (an add either way).
                              pos_embed_type="sincos" if width % 6 == 0 else "learnable",
                              qkv_bias=bool(image.qkv_bias), attention=vit_attention)
        h, n, a, i = BERT_SIZES[config.model.text.size]
        self.bert = BertModel(HFBertConfig(vocab_size=int(config.model.text.vocab_size), hidden_size=h,
                                           num_hidden_layers=n, num_attention_heads=a, intermediate_size=i,
                                           max_position_embeddings=max(512, int(config.model.text.max_len)),
                                           attention_probs_dropout_prob=float(config.model.text.attention_dropout),
                                           attn_implementation="sdpa"),
                              add_pooling_layer=False)
        self.text_pool = str(config.model.text.get("pool", "cls"))
        d = int(config.model.embed_dim)
        self.image_proj = torch.nn.Linear(width, d, bias=False)
        self.text_proj = torch.nn.Linear(h, d, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(config.loss.logit_scale_init), device=self.device))
        self.max_scale = float(config.loss.logit_scale_max)
        self.modules = torch.nn.ModuleList([self.vit, self.bert, self.image_proj, self.text_proj])
        self.modules.to(self.device)
        params = list(self.modules.parameters()) + [self.logit_scale]
        o = config.optim
        self.opt = torch.optim.AdamW(params, lr=float(o.lr), betas=(float(o.b1), float(o.b2)), eps=float(o.eps),
                                     weight_decay=float(o.weight_decay),
                                     **({"fused": True} if self.device.type == "cuda" else {}))
        self.params = params
        self.clip_norm = float(o.clip_norm)
        self.modules.train()
        # MONAI is channel-first: [B*V, C, X, Y, Z].
        views = batch["views"]
        b, v = views.shape[:2]
        self.b, self.v = b, v
        self.views = torch.from_numpy(np.ascontiguousarray(
            views.reshape(b * v, *views.shape[2:]).transpose(0, 4, 1, 2, 3))).to(self.device)
        self.input_ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(self.device)
        self.attention_mask = torch.from_numpy(batch["attention_mask"].astype(np.int64)).to(self.device)
        self.labels = torch.arange(self.b, device=self.device)
        self.num_params = sum(p.numel() for p in params)
        self.last_loss = float("nan")
        self.compiled = False
        self._loss = self.loss
        if compile:
            self._loss = torch.compile(self.loss, dynamic=False)
            self.compiled = True

    def eager(self) -> None:
        """Drops torch.compile (after it failed or timed out) and runs the forward eagerly. The
        inductor's compile-worker processes are shut down: left running after an interrupted
        compile, they would take CPU from the timed steps."""
        try:
            from torch._inductor.async_compile import shutdown_compile_workers

            shutdown_compile_workers()
        except Exception as e:  # noqa: BLE001 -- a private API: best effort
            print(f"  (could not shut down torch's compile workers: {type(e).__name__}: {e})", flush=True)
        self.torch._dynamo.reset()
        self._loss, self.compiled = self.loss, False

    def loss(self):
        torch, F = self.torch, self.F
        with (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
              else contextlib.nullcontext()):
            tokens = self.vit(self.views)  # [B*V, N, width] after the final LayerNorm
            image = F.normalize(self.image_proj(tokens.mean(dim=1)), dim=-1).reshape(self.b, self.v, -1)
            hidden = self.bert(input_ids=self.input_ids, attention_mask=self.attention_mask).last_hidden_state
            if self.text_pool == "mean":
                w = self.attention_mask[..., None].to(hidden.dtype)
                pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
            else:
                pooled = hidden[:, 0]
            text = F.normalize(self.text_proj(pooled), dim=-1)
            scale = torch.clamp(self.logit_scale.exp(), max=self.max_scale)
            total = 0.0
            for view in range(self.v):
                logits = (scale * image[:, view] @ text.T).float()
                total = total + 0.5 * (F.cross_entropy(logits, self.labels) + F.cross_entropy(logits.T, self.labels))
            return total / self.v

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss()
        loss.backward()
        if self.clip_norm > 0:
            self.torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.opt.step()
        self.last_loss = float(loss.detach())  # waits for the step (the device runs it in order)
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
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


# ======================================================================================
# Accelerator cases (bench/gpu_check.sh)
# ======================================================================================
def analytic_flops(config) -> dict:
    """Matmul FLOPs of one CLIP training step from the shapes (the MFU numerator, module doc).

    Forward: the ViT's patch embedding, q/k/v/out projections, q.k and attention.v products
    and MLPs on every view; BERT's projections, attention products (over all max_len tokens:
    the kernels compute the padding) and MLPs on every report; the two projections and the
    B x B logits per view. Backward: 2x the forward (input and weight gradients), except the
    patch embedding's (its input, the volume, needs no gradient). Norms, softmax, GELU, the
    optimizer and the gathers of the embedding tables are left out (the usual model-FLOPs MFU).
    """
    from t3d_jax.models.bert import SIZES as BERT_SIZES
    from t3d_jax.models.vit3d import SIZES as VIT_SIZES

    b, v = int(config.train.global_batch_size), int(config.data.num_views)
    width, depth, _, mlp = VIT_SIZES[config.model.image.size]
    patch = [int(p) for p in config.model.image.patch_size]
    n = int(np.prod([int(s) // p for s, p in zip(config.data.view_size, patch)]))
    patch_in = int(config.model.image.in_channels) * int(np.prod(patch))
    d = int(config.model.embed_dim)
    embed = 2 * n * patch_in * width
    vit_layer = 2 * n * width * (3 * width + width + 2 * mlp) + 2 * 2 * n * n * width
    h, layers, _, inter = BERT_SIZES[config.model.text.size]
    length = int(config.model.text.max_len)
    bert_layer = 2 * length * h * (3 * h + h + 2 * inter) + 2 * 2 * length * length * h
    image_fwd = b * v * (depth * vit_layer + 2 * width * d)
    text_fwd = b * (layers * bert_layer + 2 * h * d)
    loss_fwd = v * 2 * b * b * d
    total = 3 * (image_fwd + text_fwd + loss_fwd) + 2 * b * v * embed
    return {"flops_per_step": float(total), "image_tokens_per_view": n, "text_tokens": length,
            "image_share": (3 * image_fwd + 2 * b * v * embed) / total}


def device_memory() -> dict:
    """Each framework's peak on the accelerator (None where there is no such counter: CPU)."""
    import jax
    import torch

    out = {"jax_peak_bytes": None, "jax_bytes_limit": None, "torch_peak_bytes": None, "torch_peak_reserved_bytes": None}
    stats = jax.local_devices()[0].memory_stats()
    if stats:
        out["jax_peak_bytes"] = stats.get("peak_bytes_in_use")
        out["jax_bytes_limit"] = stats.get("bytes_limit")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_peak_bytes"] = torch.cuda.max_memory_allocated()
        out["torch_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def accel_config(name: str, device: str, dtype: str):
    """The case's config with the device's attention implementation and the dtype."""
    from train_step import load_config

    spec = CASES[name]
    overrides = {**spec["overrides"], "model.attention": ATTENTION_BY_DEVICE[device], "model.dtype": dtype}
    return load_config(spec["config"], overrides), overrides


class _CompileTimeout(Exception):
    """torch.compile ran past --torch-compile-timeout-s (raised by SIGALRM inside it)."""


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raises _CompileTimeout in this (main) thread after `seconds` (0 = never). torch.compile's
    tracing and scheduling are Python, so the exception lands inside it and unwinds it."""
    if seconds <= 0:
        yield
        return

    def fire(signum, frame):
        raise _CompileTimeout(f"torch.compile still running after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _build_ours(name: str, config, args, row: dict):
    """Our compiled step; on GPU, if the cuDNN attention cannot be compiled or run, XLA's
    attention instead (recorded as ours_attention / ours_attention_error)."""
    from train_step import JaxTrainStep

    row["ours_attention"] = str(config.model.attention)
    try:
        ours = JaxTrainStep(config)
        ours()  # first run: allocation, autotuning
        return ours
    except Exception as e:  # noqa: BLE001
        if config.model.attention != "cudnn" or not args.attention_fallback:
            raise
        row["ours_attention_error"] = f"{type(e).__name__}: {str(e)[:800]}"
        print(f"  {name}: our step with cudnn attention failed ({row['ours_attention_error'][:200]}); "
              "using model.attention=xla", flush=True)
        config.model.attention = row["ours_attention"] = "xla"
        ours = JaxTrainStep(config)
        ours()
        return ours


def _build_theirs(name: str, config, batch, args, row: dict):
    """The PyTorch step, warmed up once (torch.compile compiles in that call); eager when
    compiling raises or runs past --torch-compile-timeout-s (with --torch-compile auto)."""
    want = args.torch_compile in ("auto", "on")
    theirs = TorchCLIPStep(config, batch, device=args.device, dtype=args.dtype, compile=want, vit_attention="sdpa")
    row["torch_compile_error"] = None
    try:
        with _alarm(args.torch_compile_timeout_s if want else 0):
            theirs()
    except Exception as e:  # noqa: BLE001 -- any compile failure: eager instead (recorded)
        if not want or args.torch_compile == "on":
            raise
        row["torch_compile_error"] = f"{type(e).__name__}: {str(e)[:800]}"
        print(f"  {name}: torch.compile failed ({row['torch_compile_error'][:200]}); PyTorch runs eagerly",
              flush=True)
        theirs.eager()
        theirs()
    return theirs


def run_accel_case(name: str, args, save=None) -> dict:
    """One accelerator case: build, warm up (compile) and time both sides interleaved.
    `save(row)` is called after each phase (a partial result survives a kill)."""
    from train_step import synthetic_batch

    save = save or (lambda row: None)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s if args.budget_s > 0 else float("inf")
    frameworks = ("jax", "torch") if args.frameworks == "both" else (args.frameworks,)
    config, overrides = accel_config(name, args.device, args.dtype)
    batch = synthetic_batch(config, np.random.default_rng(0))
    row = {"case": name, "config": CASES[name]["config"], "overrides": overrides, "device": args.device,
           "frameworks": list(frameworks), "interleaved": len(frameworks) == 2, "partial": True,
           "image_size": str(config.model.image.size), "text_size": str(config.model.text.size),
           "view_size": list(config.data.view_size), "num_views": int(config.data.num_views),
           "patch_size": list(config.model.image.patch_size), "max_len": int(config.model.text.max_len),
           "global_batch_size": int(config.train.global_batch_size), "dtype": args.dtype,
           **analytic_flops(config)}
    steps = {}
    if "jax" in frameworks:
        t0 = time.perf_counter()
        ours = _build_ours(name, config, args, row)
        row.update(params_ours=ours.params, ours_compile_s=ours.compile_s, ours_setup_s=time.perf_counter() - t0,
                   xla_flops_per_step=ours.flops, xla_compiled_step_bytes=ours.memory_bytes)
        steps["jax"] = ours
        print(f"  {name}: ours built and compiled in {row['ours_setup_s']:.1f} s "
              f"(attention {row['ours_attention']})", flush=True)
        save(row)
    if "torch" in frameworks:
        t0 = time.perf_counter()
        theirs = _build_theirs(name, config, batch, args, row)
        row.update(params_torch=theirs.num_params, torch_compiled=theirs.compiled,
                   torch_setup_s=time.perf_counter() - t0)
        steps["torch"] = theirs
        print(f"  {name}: PyTorch built{' and compiled' if theirs.compiled else ' (eager)'} in "
              f"{row['torch_setup_s']:.1f} s", flush=True)
        save(row)
    for _ in range(max(args.warmup, 0)):  # more warm-up: recompiles after the first step, allocator pools
        for step in steps.values():
            step()
    # Timed steps, interleaved: as many as asked for, fewer when the budget says so (at least 3).
    pair = sum(step() for step in steps.values())
    timings = {k: [] for k in steps}
    reserve = 10.0  # seconds kept for the JSON and the process exit
    n_steps = max(3, min(args.steps, int((deadline - time.perf_counter() - reserve) / max(pair, 1e-6))))
    for _ in range(n_steps):
        for key, step in steps.items():
            timings[key].append(step())
    row["steps_timed"] = n_steps
    row["steps_requested"] = args.steps
    if "jax" in steps:
        row["ours_step_s"] = timings["jax"]
        row["ours_step_s_median"] = statistics.median(timings["jax"])
        row["ours_final_loss"] = steps["jax"].last_loss
    if "torch" in steps:
        row["torch_step_s"] = timings["torch"]
        row["torch_step_s_median"] = statistics.median(timings["torch"])
        row["torch_final_loss"] = steps["torch"].last_loss
    if len(steps) == 2:
        row["speedup_torch_over_ours"] = row["torch_step_s_median"] / row["ours_step_s_median"]
    row["peak_flops_per_s"] = args.peak_flops
    for key, who in (("ours", "jax"), ("torch", "torch")):
        if who in steps:
            row[f"{key}_mfu"] = row["flops_per_step"] / row[f"{key}_step_s_median"] / args.peak_flops
    row.update(device_memory())
    row["process_peak_rss_bytes"] = _vm_kib("VmHWM") * 1024
    row["wall_s"] = time.perf_counter() - t_start
    row["partial"] = False
    return row


def _mib(value) -> str:
    return f"{value / 2**20:9.0f}" if isinstance(value, (int, float)) and value == value else f"{'-':>9}"


def print_accel_table(rows: list[dict]) -> None:
    print(f"{'case':10} {'batch':>5} {'views':>16} {'ours ms':>9} {'torch ms':>9} {'torch/ours':>10} "
          f"{'ours MFU':>9} {'torch MFU':>9} {'ours MiB':>9} {'torch MiB':>9}  notes")
    for r in rows:
        views = f"{r['num_views']}x" + "x".join(str(s) for s in r["view_size"])
        ms = lambda t: f"{t * 1e3:9.1f}" if t else f"{'-':>9}"  # noqa: E731
        pct = lambda m: f"{100 * m:8.1f}%" if m is not None else f"{'-':>9}"  # noqa: E731
        ratio = f"{r['speedup_torch_over_ours']:9.2f}x" if "speedup_torch_over_ours" in r else f"{'-':>10}"
        notes = []
        if "ours_attention" in r:
            notes.append(f"ours: {r['ours_attention']} attention" + (" (cudnn failed)" if r.get("ours_attention_error")
                                                                      else ""))
        if "torch_compiled" in r:
            error = r.get("torch_compile_error") or ""
            notes.append("torch.compile" if r["torch_compiled"] else
                         "torch eager" + (" (compile timed out)" if "_CompileTimeout" in error
                                          else " (compile failed)" if error else ""))
        if not r.get("interleaved", True):
            notes.append("NOT interleaved (separate processes)")
        if r.get("partial"):
            notes.append("PARTIAL: stopped before the timed steps")
        if "steps_timed" in r:
            notes.append(f"{r['steps_timed']} steps")
        print(f"{r['case']:10} {r['global_batch_size']:5d} {views:>16} {ms(r.get('ours_step_s_median'))} "
              f"{ms(r.get('torch_step_s_median'))} {ratio} {pct(r.get('ours_mfu'))} {pct(r.get('torch_mfu'))} "
              f"{_mib(r.get('jax_peak_bytes'))} {_mib(r.get('torch_peak_bytes'))}  {'; '.join(notes)}")


def _combine_separate(rows: list[dict]) -> list[dict]:
    """Rows of one case timed one framework per process (--frameworks jax / torch, when the two
    could not share a process) -> one row with both, marked interleaved: false."""
    out, alone = [], {}
    for r in rows:
        if len(r.get("frameworks", [])) == 1 and not r.get("partial"):
            alone.setdefault(r["case"], {})[r["frameworks"][0]] = r
        else:
            out.append(r)
    for case, parts in alone.items():
        row = {**parts.get("jax", {}), **parts.get("torch", {})}
        row.update(frameworks=sorted(parts), interleaved=False)
        for key in ("ours_step_s_median", "ours_mfu", "jax_peak_bytes", "params_ours", "ours_attention"):
            if key in parts.get("jax", {}):
                row[key] = parts["jax"][key]
        if "ours_step_s_median" in row and "torch_step_s_median" in row:
            row["speedup_torch_over_ours"] = row["torch_step_s_median"] / row["ours_step_s_median"]
        out.append(row)
    return out


def merge_results(files: list[str], out: str) -> dict:
    """Several accelerator-case JSONs (one per process) -> one JSON and one table."""
    rows, machines, missing = [], [], []
    for f in files:
        path = pathlib.Path(f)
        if not path.is_file():
            missing.append(f)
            continue
        data = json.loads(path.read_text())
        machines.append(data.get("machine"))
        rows.extend(data.get("rows", []))
    rows = _combine_separate(rows)
    result = {"machine": machines[0] if machines else None, "rows": rows, "inputs": files, "missing": missing,
              "peak_flops_per_s": rows[0]["peak_flops_per_s"] if rows else None}
    print_accel_table(rows)
    for f in missing:
        print(f"  (no result: {f})")
    pathlib.Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


def main_accel(args, names: list[str], argv) -> dict:
    """--device gpu|cpu: the accelerator cases (module doc); one JSON for all of them."""
    import jax

    # JAX's backend first: it loads its CUDA libraries (cuDNN among them) before PyTorch can
    # load its own copies into the process.
    backend = jax.default_backend()
    jax.numpy.zeros(8).block_until_ready()
    import torch

    from train_step import machine_info

    from t3d_jax.train.metrics import measure_peak_flops

    if args.device == "gpu":
        if backend != "gpu":
            raise SystemExit(f"--device gpu: JAX's backend is {backend!r} (no GPU visible to JAX)")
        if not torch.cuda.is_available():
            raise SystemExit("--device gpu: torch.cuda.is_available() is False")
    info = machine_info()
    info["torch"] = torch.__version__
    if args.device == "gpu":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_torch"] = torch.version.cuda
        info["jax_device"] = str(jax.local_devices()[0].device_kind)
    if args.peak_tflops > 0:
        args.peak_flops = args.peak_tflops * 1e12
        peak_source = f"given: {args.peak_tflops:g} TFLOP/s"
    else:
        n = PEAK_N_ACCEL if args.device == "gpu" else 1024
        args.peak_flops = measure_peak_flops(n, dtype=getattr(jax.numpy, args.dtype), seconds=0, repeats=5)
        peak_source = f"measured: best {args.dtype} {n}^3 matmul in this process"
    print(f"{info.get('gpu', info['cpu'])}; JAX {info['jax']} ({backend}), PyTorch {info['torch']}; "
          f"peak {args.peak_flops / 1e12:.3g} TFLOP/s ({peak_source}); load {info['loadavg_start']}", flush=True)
    result = {"machine": info, "peak_flops_per_s": args.peak_flops, "peak_source": peak_source,
              "command": " ".join(["python", "bench/vs_pytorch.py", *(argv if argv is not None else sys.argv[1:])]),
              "rows": []}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(row=None):
        rows = result["rows"] + ([row] if row is not None else [])
        out.write_text(json.dumps({**result, "rows": rows}, indent=2))

    for name in names:
        result["rows"].append(run_accel_case(name, args, save=save))
        save()
    print_accel_table(result["rows"])
    result["machine"]["loadavg_end"] = os.getloadavg()
    save()
    print(f"wrote {args.out}")
    return result


PEAK_N_ACCEL = 8192


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
    accel = parser.add_argument_group("accelerator cases (gpu_*; bench/gpu_check.sh)")
    accel.add_argument("--device", choices=("gpu", "cpu"),
                       help="where the gpu_* cases run (required for them): gpu = JAX's CUDA backend and "
                            "torch.cuda; cpu = the same code on this CPU")
    accel.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                       help="compute dtype of both sides (float32 parameters either way)")
    accel.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                       help="torch.compile the PyTorch forward+loss: auto = try, eager if it raises")
    accel.add_argument("--frameworks", choices=("both", "jax", "torch"), default="both",
                       help="both = interleaved in one process; one = that side alone")
    accel.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    accel.add_argument("--budget-s", type=float, default=0,
                       help="wall-time budget of the whole run per case; the timed steps are cut to fit (0 = none)")
    accel.add_argument("--peak-tflops", type=float, default=0,
                       help="MFU denominator in TFLOP/s (H200: 989 dense bf16); 0 = measure a matmul")
    accel.add_argument("--torch-compile-timeout-s", type=float, default=0,
                       help="with --torch-compile auto: stop compiling after this long and run eagerly (0 = none)")
    accel.add_argument("--no-attention-fallback", dest="attention_fallback", action="store_false",
                       help="fail instead of falling back to model.attention=xla when cudnn attention fails")
    accel.add_argument("--merge", nargs="+", metavar="JSON",
                       help="merge accelerator-case JSONs into --out and print their table (runs nothing)")
    args = parser.parse_args(argv)
    if args.merge:
        merge_results(args.merge, args.out)
        return None
    if args.cores:  # before any import of jax/torch: their thread pools follow the affinity
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    names = [c for c in args.cases.split(",") if c]
    for n in names:
        if n not in CASES:
            parser.error(f"unknown case {n!r}; choose from {sorted(CASES)}")
    accel_names = [n for n in names if n in ACCEL_CASES]
    if accel_names:
        if len(accel_names) != len(names):
            parser.error("--cases: run the gpu_* cases apart from the CPU cases")
        if not args.device:
            parser.error(f"--cases {','.join(names)}: name --device gpu or --device cpu")
        # Before JAX starts: on GPU it must not grab 75% of the card (PyTorch shares it); on CPU
        # no accelerator plugin (libtpu, CUDA) is probed.
        if args.device == "gpu":
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        else:
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from configdict_shim import install_if_missing

        install_if_missing()  # the configs' ml_collections, where the image lacks it
        return main_accel(args, names, argv)
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
