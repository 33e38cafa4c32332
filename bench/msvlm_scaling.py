r"""MS-VLM encoder: time and memory per volume against the slice count, on this CPU.

  python bench/msvlm_scaling.py [--size demo] [--slice 64] [--slices 32,64,128,256,512]
                                [--out bench/results/msvlm_scaling.json]

One volume (batch 1) of N axial slices, each ``--slice`` x ``--slice`` voxels, through the
MS-VLM image tower (t3d_jax/models/msvlm.py at ``--size``: the slice ViT in chunks of
``slice_chunk`` slices, then the Z-former; both attention patterns' cost is the same masked
dense attention, the 'local' pattern is what is run). Each length is its own bucket, so each
is one compiled program. Plus two series of 128 slices concatenated (256 tokens).

Per case:
* ``forward_s``: median wall time of ``--repeats`` runs of the jitted forward (after one
  warm-up run); the machine is shared, the load average is recorded next to the figures;
* ``forward_*_mib``: XLA's buffer plan of the compiled forward (``memory_analysis()``:
  arguments, outputs, temporaries); ``temp`` is the activations' peak;
* ``mem_grad_temp_mib``: the same for the jitted MEM loss and its gradient w.r.t. every
  parameter (compiled only, not run): the training step's activation memory, with each
  slice chunk rematerialised (``slice_remat``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from t3d_jax.losses import mem  # noqa: E402
from t3d_jax.models import msvlm  # noqa: E402

MIB = 2.0 ** 20


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"argument_mib": m.argument_size_in_bytes / MIB, "output_mib": m.output_size_in_bytes / MIB,
            "temp_mib": m.temp_size_in_bytes / MIB}


def bench_case(model, lengths: list[int], repeats: int, rng) -> dict:
    """One volume made of ``len(lengths)`` series of those slice counts."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    vols = tuple(jnp.asarray(rng.random((1, *cfg.image_size, n, 1), np.float32)) for n in lengths)
    series = tuple(range(len(lengths)))

    def forward(state, vols):
        m = nnx.merge(graphdef, state)
        return m(list(vols), series=series)["pooled"]

    def mem_loss(state, vols, key):
        m = nnx.merge(graphdef, state)
        tokens, valid, ids, pos = m.gather(list(vols), series=series)
        return mem.mem_objective(lambda f, v: m.mem_predict(f, v, ids, pos), tokens, valid, key)[0]

    t0 = time.perf_counter()
    fwd = jax.jit(forward).lower(state, vols).compile()
    compile_s = time.perf_counter() - t0
    grad = jax.jit(jax.grad(mem_loss)).lower(state, vols, jax.random.key(0)).compile()
    jax.block_until_ready(fwd(state, vols))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(state, vols))
        times.append(time.perf_counter() - t0)
    fmem, gmem = memory(fwd), memory(grad)
    return {"series": lengths, "slices": sum(lengths), "forward_s": statistics.median(times),
            "forward_s_all": times, "compile_s": compile_s,
            **{f"forward_{k}": v for k, v in fmem.items()}, "mem_grad_temp_mib": gmem["temp_mib"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="demo", choices=sorted(msvlm.SIZES))
    p.add_argument("--slice", type=int, default=64, help="slice side in voxels (patch 8)")
    p.add_argument("--slices", default="32,64,128,256,512")
    p.add_argument("--two-series", type=int, default=128, help="slices per series of the 2-series case (0: skip)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench/results/msvlm_scaling.json")
    args = p.parse_args()

    counts = [int(s) for s in args.slices.split(",")]
    cfg = msvlm.MSVLMConfig.from_size(args.size, image_size=(args.slice, args.slice), patch_size=(8, 8),
                                      attention_pattern="local", buckets=tuple(sorted(set(counts))))
    model = msvlm.MSVLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    cases = [[n] for n in counts] + ([[args.two_series] * 2] if args.two_series else [])
    rows = []
    print(f"MS-VLM {args.size} (width {cfg.width}, slice ViT depth {cfg.depth}, Z-former depth {cfg.z_depth}, "
          f"{cfg.num_patches + 1} tokens per {args.slice}^2 slice, chunk {cfg.slice_chunk}), batch 1, "
          f"{jax.device_count()} {jax.default_backend()} device(s), load {os.getloadavg()[0]:.1f}")
    print(f"{'series':>10} {'slices':>6} {'fwd s':>7} {'ms/slice':>8} {'fwd temp MiB':>12} "
          f"{'fwd args MiB':>12} {'MEM-grad temp MiB':>17}")
    for lengths in cases:
        r = bench_case(model, lengths, args.repeats, rng)
        r["load_avg_1m"] = os.getloadavg()[0]
        rows.append(r)
        print(f"{'+'.join(map(str, lengths)):>10} {r['slices']:>6} {r['forward_s']:>7.2f} "
              f"{1e3 * r['forward_s'] / r['slices']:>8.1f} {r['forward_temp_mib']:>12.1f} "
              f"{r['forward_argument_mib']:>12.1f} {r['mem_grad_temp_mib']:>17.1f}", flush=True)
    from bench.compare_methods import write_json

    out = write_json(args.out, {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()
                   if k not in ("dtype", "param_dtype")},
        "size": args.size, "slice": args.slice, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
