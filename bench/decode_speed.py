r"""Report decoding speed on this CPU: generated tokens/s, greedy and beam 4, batch 1 and 32,
with the KV cache and without it (the whole prefix recomputed at every step), in one run.

  python bench/decode_speed.py [--size demo] [--max-new-tokens 64] [--out bench/results/decode_speed.json]

The decoder is `t3d_jax.models.report_decoder` at `--size` (random weights: speed does not
depend on them), reading `--visual-tokens` image tokens of width `--visual-width` (a demo
ViT3D's 64 patch tokens of width 192 by default), vocabulary `--vocab-size`. Decoding is
`t3d_jax.models.decoding.generate`, the function the evaluator and the launcher call. EOS is
set to an id the model cannot emit, so every sequence runs the full `--max-new-tokens`
steps: each figure is the cost of that many tokens per report, not of where a random model
happens to stop. Tokens/s counts the tokens handed back (batch x max_new_tokens, the best
beam for beam search, which does num_beams x that work). The compile is timed apart (the
same jitted function `generate` caches); the runs with and without the cache are interleaved
so both see the same load, and each decode time is the best of `--repeats` runs (one run
when a run takes over 5 s).

Without the cache, each step is a full forward over the fixed (1 + max_new_tokens) buffer, so
its cost does not fall with the position: that is what one compiled program can do without a
cache, and why the cache matters. The machine is shared: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from t3d_jax.models import decoding  # noqa: E402
from t3d_jax.models.report_decoder import ReportDecoder, ReportDecoderConfig  # noqa: E402

MIN_SINGLE_S = 5.0


def run_pair(model, visual, configs: list[decoding.DecodeConfig], repeats: int) -> list[dict]:
    """Compiles each config (timed apart), then times the decodes interleaved (cache, no cache,
    cache, ...) so both see the same load: the best of `repeats` runs each; a config whose run
    takes over MIN_SINGLE_S runs once (the uncached beam search at batch 32: minutes)."""
    graphdef, state = nnx.split(model)
    compiled, results = [], []
    for config in configs:
        t0 = time.perf_counter()
        compiled.append(jax.jit(decoding.make_decode_fn(graphdef, config)).lower(state, visual).compile())
        results.append({"compile_s": round(time.perf_counter() - t0, 2), "times": [], "loads": []})
    for _ in range(repeats):
        for fn, r in zip(compiled, results):
            if r["times"] and r["times"][-1] > MIN_SINGLE_S:
                continue
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(state, visual))
            r["times"].append(time.perf_counter() - t0)
            r["loads"].append(os.getloadavg()[0])
            r["tokens"] = int(np.asarray(out["lengths"]).sum())
    for r in results:
        times, loads = r.pop("times"), r.pop("loads")
        best = min(times)
        r.update(decode_s=round(best, 4), runs=len(times), tokens_per_s=round(r["tokens"] / best, 1),
                 load_average=round(float(np.mean(loads)), 2))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="demo")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--visual-tokens", type=int, default=64)
    p.add_argument("--visual-width", type=int, default=192)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--methods", default="greedy,beam4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench/results/decode_speed.json")
    args = p.parse_args(argv)

    cfg = ReportDecoderConfig.from_size(args.size, vocab_size=args.vocab_size, visual_width=args.visual_width,
                                        max_position_embeddings=max(512, args.max_new_tokens + 1))
    model = ReportDecoder(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    rows = []
    print(f"decoder {args.size} (hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab {cfg.vocab_size}), "
          f"{args.visual_tokens} visual tokens x {args.visual_width}, {args.max_new_tokens} new tokens, "
          f"{jax.device_count()} {jax.default_backend()} device(s), load {os.getloadavg()[0]:.1f}")
    print(f"{'method':<8} {'batch':>5} {'cache':>6} {'tokens/s':>10} {'decode s':>9} {'compile s':>10} {'load':>5}")
    for method in args.methods.split(","):
        beams = int(method[4:]) if method.startswith("beam") else 1
        for batch in (int(b) for b in args.batches.split(",")):
            visual = rng.normal(size=(batch, args.visual_tokens, args.visual_width)).astype(np.float32)
            configs = [decoding.DecodeConfig(method="beam" if beams > 1 else "greedy", num_beams=beams,
                                             max_new_tokens=args.max_new_tokens, bos_id=2, eos_id=cfg.vocab_size,
                                             pad_id=0, use_cache=use_cache) for use_cache in (True, False)]
            for use_cache, result in zip((True, False), run_pair(model, visual, configs, args.repeats)):
                rows.append({"method": method, "batch": batch, "cache": use_cache, **result})
                print(f"{method:<8} {batch:>5} {str(use_cache):>6} {result['tokens_per_s']:>10.1f} "
                      f"{result['decode_s']:>9.3f} {result['compile_s']:>10.2f} {result['load_average']:>5.1f}",
                      flush=True)
    speedups = {}
    for r in rows:
        if r["cache"]:
            other = next(o for o in rows if not o["cache"] and o["method"] == r["method"] and o["batch"] == r["batch"])
            speedups[f"{r['method']}_batch{r['batch']}"] = round(r["tokens_per_s"] / other["tokens_per_s"], 2)
    print("cache speed-up:", ", ".join(f"{k} {v}x" for k, v in speedups.items()))
    result = {"size": args.size, "hidden": cfg.hidden_size, "layers": cfg.num_layers, "vocab": cfg.vocab_size,
              "visual_tokens": args.visual_tokens, "visual_width": args.visual_width,
              "max_new_tokens": args.max_new_tokens, "rows": rows, "cache_speedup": speedups,
              "backend": jax.default_backend(), "devices": jax.device_count(), "cpu_count": os.cpu_count(),
              "load_average_end": round(os.getloadavg()[0], 2), "jax": jax.__version__,
              "machine": platform.machine()}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
