r"""Input pipeline throughput: training examples per second per host core, by stage, and at 0, 1
and 2 Grain workers; host views vs views made on the accelerator; record formats.

Writes its own synthetic shards (CT-like int16 volumes in the prepared-folder format of
``t3d_jax.data.shards``, or copies of one real CT preprocessed with ``--volume_from``) to a
temporary folder, then for each case, stored grid, record compression and ``--views_on`` mode
measures

* the stages of one example in this process, single-threaded: ArrayRecord read, record decode,
  the example's host work (``host``: ``make_views``, both views; ``device``:
  ``device_view_params``, the boxes/jitter/noise-key draw) and its share of batching (the copy
  into the batch array); their sum gives the host examples/s per core;
* the full ``train_iterator`` pipeline at each worker count (``--workers``; "" skips it): seconds
  to the first batch (includes starting worker processes) and steady-state examples/s after it.

With ``device``, the views are made on the accelerator (``data.views_on='device'``,
``t3d_jax/data/device_views.py``); ``--device_cost`` adds XLA's cost analysis of that program for
one example (compiled for this CPU: bytes accessed and FLOPs, not a chip timing). Each format row
also gives the storage bandwidth a run consuming ``--consume`` examples/s would need (default: a
v5e-256 at global batch 1024 and the 70.9 ms roofline step of docs/scaling.md, 64 hosts).

Cases (stored volume -> view size):
  demo     64x64x64    -> 48x48x48     (the demo preset's stored grid)
  demo_config  64x64x64 -> 32x32x32, batch 16, 85-100% crops, no jitter/noise (configs/t3d.py:demo)
  ct_clip  480x480x240 -> 160x160x96   (the ct_clip preset's grid -> the `base` config's view)
  ct_clip_224  480x480x240 -> 224x224x112  (optional: a larger view some CT papers use)

  python bench/input_pipeline.py --out bench_input_pipeline.json
  python bench/input_pipeline.py --cases demo --workers 0,2
  python bench/input_pipeline.py --cases demo_config --vs_step demo   # loader vs the demo train step
  python bench/input_pipeline.py --cases ct_clip --views_on host,device --workers 0 \
      --compressions zstd:3,zstd:1,uncompressed --stored 480x480x240,320x320x160

``--vs_step CONFIG`` also times the trainer's compiled step of ``configs/t3d.py:CONFIG`` (the
one bench/train_step.py measures, float32, one CPU device) in the same run and prints how many
times the views/s the step consumes each worker count delivers.

The shards are read right after being written, so reads come from the page cache: the read
stage is the CPU cost of reading (and decompressing), not the storage's; the bandwidth column
says what the storage must deliver. The figures depend on the free cores: the script records
``os.cpu_count()`` and the load average next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from t3d_jax.data import pipeline, shards
from t3d_jax.data.records import decode_record, encode_record
from t3d_jax.data.views import ViewOptions, device_view_params, make_views

CASES = {
    "demo": dict(stored=(64, 64, 64), view=(48, 48, 48), batch=8, records=32, batches=40),
    "demo_config": dict(stored=(64, 64, 64), view=(32, 32, 32), batch=16, records=32, batches=20,
                        crop_min=0.85, intensity_jitter=0.0, noise_std=0.0),
    "ct_clip": dict(stored=(480, 480, 240), view=(160, 160, 96), batch=2, records=6, batches=6),
    "ct_clip_224": dict(stored=(480, 480, 240), view=(224, 224, 112), batch=2, records=6, batches=6),
}
NUM_VIEWS = 2
MAX_LEN = 128
# What a v5e-256 run of `base` consumes at the recommended setting (docs/scaling.md): global batch
# 1024 on mesh (16,16), fused attention, roofline step 70.9 ms
# (bench/results/aot/base_v5e_16x16_gbs1024_data16_fsdp16_attn_auto_textdrop0.json), 64 hosts.
V5E_256 = {"examples_per_s": 1024 / 0.0709, "hosts": 64, "what": "v5e-256, global batch 1024, 70.9 ms step"}


def synthetic_volume(shape, rng: np.random.Generator) -> np.ndarray:
    """Air (-1000 HU) around an elliptic body of noisy soft tissue with darker lungs:
    compresses and decodes like a CT grid, unlike uniform noise."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    x, y = [(g - n / 2) / (n / 2) for g, n in zip(grids[:2], shape[:2])]
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1.0
    lungs = ((np.abs(x) - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 < 1.0
    volume = np.full(shape, -1000, np.int16)
    tissue = rng.normal(40, 30, size=shape).astype(np.int16)
    volume[:] = np.where(body, tissue, volume)
    volume[:] = np.where(lungs, tissue - 900, volume)
    return volume


def real_volume(path: str, stored) -> np.ndarray:
    """One real CT (NIfTI/DICOM) preprocessed as the ct_clip preset does (0.75 x 0.75 x 1.5 mm,
    [-1000, 1000] HU), at the spacing that puts the same 360 x 360 x 360 mm field on ``stored``."""
    from t3d_jax.data import preprocess

    base = preprocess.PRESETS["ct_clip"]
    spacing = tuple(s * n / m for s, n, m in zip(base.spacing, base.size, stored))
    preset = preprocess.Preset(f"ct_clip@{'x'.join(map(str, stored))}", spacing, base.window, tuple(stored),
                               base.scaling)
    volume, _, _ = preprocess.preprocess_volume(preprocess.load_volume(path), preset)
    return volume


def write_dataset(root: pathlib.Path, case: dict, seed: int = 0, compression: str = shards.DEFAULT_COMPRESSION,
                  volume: np.ndarray | None = None) -> pathlib.Path:
    """``case['records']`` records of ``case['stored']`` volumes (synthetic, or copies of ``volume``)."""
    rng = np.random.default_rng(seed)
    name = shards.shard_name("train", 0, 1)
    writer = ArrayRecordWriter(str(root / name), shards.writer_options(compression))
    for k in range(case["records"]):
        ids = np.zeros(MAX_LEN, np.int32)
        ids[:40] = rng.integers(1000, 30000, 40)
        writer.write(encode_record({
            "volume": synthetic_volume(case["stored"], rng) if volume is None else volume,
            "intensity_scale": np.float32(1e-3),
            "intensity_offset": np.float32(0.0), "spacing": np.ones(3, np.float32), "input_ids": ids,
            "attention_mask": (ids > 0).astype(np.int32),
            "labels": rng.integers(0, 2, 18).astype(np.float32), "id": f"bench-{k}", "split": "train",
            "report": "synthetic", "source_spacing": np.ones(3, np.float32),
            "source_shape": np.array(case["stored"], np.int32), "source_orientation": "RAS"}))
    writer.close()
    info = {"preset": {"name": "bench", "size": list(case["stored"])}, "label_names": [f"l{i}" for i in range(18)],
            "tokenizer": {"max_len": MAX_LEN},
            "splits": {"train": {"num_records": case["records"], "shards": [name]}}}
    (root / shards.DATASET_JSON).write_text(json.dumps(info))
    return root


def data_config(root, case, views_on: str = "host"):
    import ml_collections

    return ml_collections.ConfigDict(dict(
        dir=str(root), train_split="train", num_views=NUM_VIEWS, view_size=case["view"],
        crop_min=case.get("crop_min", 0.5), crop_max=1.0, intensity_jitter=case.get("intensity_jitter", 0.05),
        noise_std=case.get("noise_std", 0.02), flip_lr=False, worker_count=0,
        prefetch_buffer_size=2, views_on=views_on))


def view_options(case) -> ViewOptions:
    return ViewOptions(num_views=NUM_VIEWS, view_size=case["view"], crop_min=case.get("crop_min", 0.5),
                       intensity_jitter=case.get("intensity_jitter", 0.05), noise_std=case.get("noise_std", 0.02))


def stage_times(root, case, views_on: str = "host", repeats: int = 3) -> dict:
    """Median seconds of each stage of one example, in this process, one thread.

    ``example_s``: the example's own host work (``host``: both views; ``device``: the parameter
    draw); ``batch_s``: its share of the batch array copy (Grain stacks the examples)."""
    source = pipeline.open_split(root, "train")
    options = view_options(case)
    read, decode, example, batch = [], [], [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        data = source[i % len(source)]
        t1 = time.perf_counter()
        record = decode_record(data)
        t2 = time.perf_counter()
        rng = np.random.default_rng((0, i))
        if views_on == "host":
            out = make_views(record["volume"], 1e-3, 0.0, rng, options)[0]
        else:
            out = device_view_params(record["volume"], 1e-3, 0.0, rng, options)["volume"]
        t3 = time.perf_counter()
        np.stack([out] * case["batch"])
        t4 = time.perf_counter()
        read.append(t1 - t0), decode.append(t2 - t1), example.append(t3 - t2), batch.append((t4 - t3) / case["batch"])
    stages = {"read_s": float(np.median(read)), "decode_s": float(np.median(decode)),
              "example_s": float(np.median(example)), "batch_s": float(np.median(batch)),
              "record_mb": len(data) / 1e6, "views_on": views_on}
    stages["host_s_per_example"] = stages["read_s"] + stages["decode_s"] + stages["example_s"] + stages["batch_s"]
    stages["examples_per_s_per_core"] = 1.0 / stages["host_s_per_example"]
    return stages


def device_cost(case) -> dict:
    """XLA's cost analysis of the device views of one example (compiled for this CPU, not run)."""
    import jax

    from t3d_jax.data import device_views

    fn = jax.jit(lambda vol, box, ab, key: device_views.make_views(
        vol, box, ab, key, view_size=case["view"], noise_std=case.get("noise_std", 0.02)))
    args = (jax.ShapeDtypeStruct((1, *case["stored"]), np.int16), jax.ShapeDtypeStruct((1, NUM_VIEWS, 2, 3), np.float32),
            jax.ShapeDtypeStruct((1, NUM_VIEWS, 2), np.float32), jax.ShapeDtypeStruct((1, 2), np.uint32))
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    return {"bytes_accessed": float(cost.get("bytes accessed", float("nan"))), "flops": float(cost.get("flops", 0.0)),
            "temp_bytes": float(getattr(memory, "temp_size_in_bytes", float("nan"))),
            "argument_bytes": float(getattr(memory, "argument_size_in_bytes", float("nan"))),
            "output_bytes": float(getattr(memory, "output_size_in_bytes", float("nan")))}


def pipeline_rate(root, case, workers: int, views_on: str = "host") -> dict:
    it = pipeline.train_iterator(data_config(root, case, views_on), global_batch_size=case["batch"], seed=0,
                                 worker_count=workers)
    try:
        t0 = time.perf_counter()
        next(it)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(case["batches"]):
            next(it)
        elapsed = time.perf_counter() - t0
    finally:
        it.close()
    views = case["batches"] * case["batch"] * NUM_VIEWS
    return {"workers": workers, "views_on": views_on, "first_batch_s": first, "views_per_s": views / elapsed,
            "examples_per_s": views / NUM_VIEWS / elapsed, "batches_per_s": case["batches"] / elapsed,
            "timed_views": views}


def step_consumption(config_name: str, repeats: int) -> dict:
    """Median wall time of the trainer's compiled step for `configs/t3d.py:config_name` (float32,
    one CPU device, synthetic batch), via bench/train_step.py's harness."""
    import statistics

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import train_step  # bench/train_step.py

    config = train_step.load_config(config_name, train_step.BENCH_OVERRIDES.get(config_name, {}))
    step = train_step.JaxTrainStep(config)
    step()
    times = [step() for _ in range(repeats)]
    views = int(config.train.global_batch_size) * int(config.data.num_views)
    median = statistics.median(times)
    return {"config": config_name, "step_s": median, "views_per_step": views, "views_per_s": views / median,
            "view_size": list(config.data.view_size)}


def _grid(text: str) -> tuple[int, int, int]:
    grid = tuple(int(n) for n in text.lower().split("x"))
    if len(grid) != 3:
        raise argparse.ArgumentTypeError(f"a stored grid is XxYxZ, got {text!r}")
    return grid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="demo,ct_clip", help=f"comma list of {sorted(CASES)}")
    parser.add_argument("--workers", default="0,1,2", help="comma list of worker counts ('' = stages only)")
    parser.add_argument("--views_on", default="host", help="comma list of host | device (data.views_on)")
    parser.add_argument("--compressions", default=shards.DEFAULT_COMPRESSION,
                        help=f"comma list of record compressions, from {shards.COMPRESSIONS}")
    parser.add_argument("--stored", default="", help="comma list of stored grids XxYxZ (default: the case's)")
    parser.add_argument("--records", type=int, default=0, help="records per shard (default: the case's)")
    parser.add_argument("--repeats", type=int, default=3, help="examples timed per stage (median)")
    parser.add_argument("--volume_from", default="", help="a real CT (NIfTI/DICOM): every record is it, "
                        "preprocessed to the stored grid (ct_clip's field of view), instead of synthetic volumes")
    parser.add_argument("--device_cost", action="store_true",
                        help="with device views: XLA's cost analysis of the views of one example")
    parser.add_argument("--consume", type=float, default=V5E_256["examples_per_s"],
                        help="examples/s a run consumes, for the storage bandwidth column")
    parser.add_argument("--hosts", type=int, default=V5E_256["hosts"], help="hosts that run shares")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--vs_step", default="", help="also time this config's train step (e.g. demo)")
    parser.add_argument("--step_repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    modes = [m.strip() for m in args.views_on.split(",") if m.strip()]
    if not modes or set(modes) - {"host", "device"}:
        parser.error("--views_on takes host and/or device")
    compressions = [c.strip() for c in args.compressions.split(",") if c.strip()]
    bad = [c for c in compressions if c not in shards.COMPRESSIONS]
    if bad:
        parser.error(f"unknown compressions {bad}; choose from {shards.COMPRESSIONS}")
    stored_grids = [_grid(g) for g in args.stored.split(",") if g.strip()]

    results = {"machine": {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                           "python": platform.python_version()},
               "num_views": NUM_VIEWS, "consume": {"examples_per_s": args.consume, "hosts": args.hosts},
               "volume_from": args.volume_from or "synthetic", "cases": {}, "formats": []}
    header = (f"{'case':<12} {'stored':>12} {'compression':>12} {'view':>12} {'views on':>8} {'workers':>7} {'examples/s':>10} "
              f"{'views/s':>9} {'1st batch s':>11}")
    rows, format_rows = [], []
    shape = lambda s: "x".join(map(str, s))  # noqa: E731
    for name in cases:
        base_case = CASES[name]
        for stored in stored_grids or [base_case["stored"]]:
            case = dict(base_case, stored=tuple(stored))
            if args.records:
                case["records"] = args.records
            volume = real_volume(args.volume_from, case["stored"]) if args.volume_from else None
            cost = device_cost(case) if args.device_cost and "device" in modes else None
            if cost is not None:
                format_rows.append(f"{name:<12} {shape(case['stored']):>12} -> {shape(case['view'])}: device views of "
                                   f"one example (XLA cost analysis, this CPU's compile): "
                                   f"{cost['bytes_accessed'] / 1e6:.0f} MB accessed, {cost['flops'] / 1e6:.0f} MFLOP; "
                                   f"memory: {cost['argument_bytes'] / 1e6:.0f} MB in, {cost['output_bytes'] / 1e6:.0f} MB "
                                   f"out, {cost['temp_bytes'] / 1e6:.0f} MB temporaries")
            for compression in compressions:
                key = name if (len(compressions) == 1 and not stored_grids) else f"{name}@{shape(stored)}/{compression}"
                with tempfile.TemporaryDirectory(prefix=f"t3d_bench_{name}_") as tmp:
                    root = write_dataset(pathlib.Path(tmp), case, compression=compression, volume=volume)
                    file_bytes = sum(p.stat().st_size for p in pathlib.Path(tmp).glob("*.array_record"))
                    per_mode = {m: stage_times(root, case, m, args.repeats) for m in modes}
                    runs = [pipeline_rate(root, case, w, m) for m in modes for w in workers]
                bytes_per_example = file_bytes / case["records"]
                entry = {**case, "compression": compression, "bytes_per_example": bytes_per_example,
                         "stages": per_mode, "runs": runs}
                if cost is not None:
                    entry["device_cost_per_example"] = cost
                results["cases"][key] = entry
                for run in runs:
                    rows.append(f"{name:<12} {shape(case['stored']):>12} {compression:>12} {shape(case['view']):>12} "
                                f"{run['views_on']:>8} "
                                f"{run['workers']:>7} {run['examples_per_s']:>10.2f} {run['views_per_s']:>9.2f} "
                                f"{run['first_batch_s']:>11.2f}")
                for mode, st in per_mode.items():
                    need = args.consume * bytes_per_example
                    # What crosses to the accelerator per example: the float32 views, or the int16 volume.
                    h2d = (NUM_VIEWS * int(np.prod(case["view"])) * 4 if mode == "host"
                           else int(np.prod(case["stored"])) * 2)
                    row = {"case": name, "stored": shape(case["stored"]), "compression": compression,
                           "views_on": mode, "mb_per_example": bytes_per_example / 1e6,
                           "read_ms": st["read_s"] * 1e3, "decode_ms": st["decode_s"] * 1e3,
                           "example_ms": st["example_s"] * 1e3, "batch_ms": st["batch_s"] * 1e3,
                           "examples_per_s_per_core": st["examples_per_s_per_core"],
                           "host_to_device_mb_per_example": h2d / 1e6, "storage_gb_per_s": need / 1e9, "storage_gb_per_s_per_host": need / args.hosts / 1e9,
                           "cores_per_host": args.consume / args.hosts / st["examples_per_s_per_core"]}
                    results["formats"].append(row)
                    format_rows.append(
                        f"{name:<12} {row['stored']:>12} {compression:>12} {mode:>6} {row['mb_per_example']:>8.1f} "
                        f"{row['read_ms']:>8.1f} {row['decode_ms']:>7.1f} {row['example_ms']:>8.1f} "
                        f"{row['batch_ms']:>7.1f} {row['examples_per_s_per_core']:>9.2f} {h2d / 1e6:>7.1f} "
                        f"{row['storage_gb_per_s']:>8.1f} {row['storage_gb_per_s_per_host']:>7.2f} "
                        f"{row['cores_per_host']:>6.0f}")
    if args.vs_step:
        step = step_consumption(args.vs_step, args.step_repeats)
        results["step"] = step
        rows.append(f"train step {args.vs_step}: {step['step_s'] * 1e3:.0f} ms for {step['views_per_step']} views "
                    f"-> consumes {step['views_per_s']:.1f} views/s")
        for key, entry in results["cases"].items():
            for run in entry["runs"]:
                run["times_step_need"] = run["views_per_s"] / step["views_per_s"]
                rows.append(f"  {key} ({run['views_on']} views) with {run['workers']} workers delivers "
                            f"{run['times_step_need']:.2f}x what the step consumes")
    results["machine"]["loadavg_end"] = os.getloadavg()
    print(f"input pipeline, {NUM_VIEWS} views per example, {os.cpu_count()} CPUs, "
          f"load {results['machine']['loadavg_start'][0]:.2f}, volumes: {results['volume_from']}")
    print(f"per example, one thread ({args.repeats} examples, median); storage for {args.consume:.0f} examples/s "
          f"over {args.hosts} hosts")
    print(f"{'case':<12} {'stored':>12} {'compression':>12} {'views':>6} {'MB/ex':>8} {'read ms':>8} "
          f"{'dec ms':>7} {'views ms':>8} {'batch ms':>7} {'ex/s/core':>9} {'H2D MB':>7} {'GB/s':>8} {'GB/s/h':>7} "
          f"{'cores/h':>6}")
    print("\n".join(format_rows))
    if rows:
        print(header)
        print("\n".join(rows))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
