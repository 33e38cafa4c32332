r"""Input pipeline throughput: training views per second at 0, 1 and 2 Grain workers.

Writes its own synthetic shards (CT-like int16 volumes in the prepared-folder format of
``t3d_jax.data.shards``) to a temporary folder, then for each case measures

* the stages of one example in this process, single-threaded: ArrayRecord read,
  record decode, and ``make_views`` (crop + resample + jitter + noise) per view;
* the full ``train_iterator`` pipeline at each worker count: seconds to the first
  batch (includes starting worker processes) and steady-state views/s after it.

Cases (stored volume -> view size):
  demo     64x64x64    -> 48x48x48     (the demo preset's stored grid)
  demo_config  64x64x64 -> 32x32x32, batch 16, 85-100% crops, no jitter/noise (configs/t3d.py:demo)
  ct_clip  480x480x240 -> 160x160x96   (the ct_clip preset's grid -> the `base` config's view)
  ct_clip_224  480x480x240 -> 224x224x112  (optional: a larger view some CT papers use)

  python bench/input_pipeline.py --out bench_input_pipeline.json
  python bench/input_pipeline.py --cases demo --workers 0,2
  python bench/input_pipeline.py --cases demo_config --vs_step demo   # loader vs the demo train step

``--vs_step CONFIG`` also times the trainer's compiled step of ``configs/t3d.py:CONFIG`` (the
one bench/train_step.py measures, float32, one CPU device) in the same run and prints how many
times the views/s the step consumes each worker count delivers.

The figures depend on the free cores: the script records ``os.cpu_count()`` and the
load average next to them.
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
from t3d_jax.data.views import ViewOptions, make_views

CASES = {
    "demo": dict(stored=(64, 64, 64), view=(48, 48, 48), batch=8, records=32, batches=40),
    "demo_config": dict(stored=(64, 64, 64), view=(32, 32, 32), batch=16, records=32, batches=20,
                        crop_min=0.85, intensity_jitter=0.0, noise_std=0.0),
    "ct_clip": dict(stored=(480, 480, 240), view=(160, 160, 96), batch=2, records=6, batches=6),
    "ct_clip_224": dict(stored=(480, 480, 240), view=(224, 224, 112), batch=2, records=6, batches=6),
}
NUM_VIEWS = 2
MAX_LEN = 128


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


def write_dataset(root: pathlib.Path, case: dict, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    name = shards.shard_name("train", 0, 1)
    writer = ArrayRecordWriter(str(root / name), shards.WRITER_OPTIONS)
    for k in range(case["records"]):
        ids = np.zeros(MAX_LEN, np.int32)
        ids[:40] = rng.integers(1000, 30000, 40)
        writer.write(encode_record({
            "volume": synthetic_volume(case["stored"], rng), "intensity_scale": np.float32(1e-3),
            "intensity_offset": np.float32(0.0), "spacing": np.ones(3, np.float32), "input_ids": ids,
            "attention_mask": (ids > 0).astype(np.int32),
            "labels": rng.integers(0, 2, 18).astype(np.float32), "id": f"bench-{k}", "split": "train",
            "report": "synthetic", "source_spacing": np.ones(3, np.float32),
            "source_shape": np.array(case["stored"], np.int32), "source_orientation": "RAS"}))
    writer.close()
    info = {"preset": {"name": "bench"}, "label_names": [f"l{i}" for i in range(18)],
            "tokenizer": {"max_len": MAX_LEN},
            "splits": {"train": {"num_records": case["records"], "shards": [name]}}}
    (root / shards.DATASET_JSON).write_text(json.dumps(info))
    return root


def data_config(root, case):
    import ml_collections

    return ml_collections.ConfigDict(dict(
        dir=str(root), train_split="train", num_views=NUM_VIEWS, view_size=case["view"],
        crop_min=case.get("crop_min", 0.5), crop_max=1.0, intensity_jitter=case.get("intensity_jitter", 0.05),
        noise_std=case.get("noise_std", 0.02), flip_lr=False, worker_count=0,
        prefetch_buffer_size=2))


def stage_times(root, case, repeats: int = 3) -> dict:
    """Median seconds of each stage for one example, in this process, one thread."""
    source = pipeline.open_split(root, "train")
    options = ViewOptions(num_views=1, view_size=case["view"], crop_min=case.get("crop_min", 0.5),
                          intensity_jitter=case.get("intensity_jitter", 0.05), noise_std=case.get("noise_std", 0.02))
    read, decode, view = [], [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        data = source[i % len(source)]
        t1 = time.perf_counter()
        record = decode_record(data)
        t2 = time.perf_counter()
        make_views(record["volume"], 1e-3, 0.0, np.random.default_rng(i), options)
        t3 = time.perf_counter()
        read.append(t1 - t0), decode.append(t2 - t1), view.append(t3 - t2)
    return {"read_s": float(np.median(read)), "decode_s": float(np.median(decode)),
            "view_s": float(np.median(view)), "record_mb": len(data) / 1e6}


def pipeline_rate(root, case, workers: int) -> dict:
    it = pipeline.train_iterator(data_config(root, case), global_batch_size=case["batch"], seed=0,
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
    return {"workers": workers, "first_batch_s": first, "views_per_s": views / elapsed,
            "batches_per_s": case["batches"] / elapsed, "timed_views": views}


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="demo,ct_clip", help=f"comma list of {sorted(CASES)}")
    parser.add_argument("--workers", default="0,1,2", help="comma list of worker counts")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--vs_step", default="", help="also time this config's train step (e.g. demo)")
    parser.add_argument("--step_repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    workers = [int(w) for w in args.workers.split(",")]

    results = {"machine": {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                           "python": platform.python_version()},
               "num_views": NUM_VIEWS, "cases": {}}
    header = (f"{'case':<12} {'stored':>12} {'view':>12} {'workers':>7} {'views/s':>9} "
              f"{'batch/s':>8} {'1st batch s':>11}")
    rows = []
    for name in cases:
        case = CASES[name]
        with tempfile.TemporaryDirectory(prefix=f"t3d_bench_{name}_") as tmp:
            root = write_dataset(pathlib.Path(tmp), case)
            stages = stage_times(root, case)
            runs = [pipeline_rate(root, case, w) for w in workers]
        results["cases"][name] = {**{k: v for k, v in case.items()}, "stages": stages, "runs": runs}
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        for run in runs:
            rows.append(f"{name:<12} {shape(case['stored']):>12} {shape(case['view']):>12} {run['workers']:>7} "
                        f"{run['views_per_s']:>9.2f} {run['batches_per_s']:>8.2f} {run['first_batch_s']:>11.2f}")
        per_view = stages["view_s"] + (stages["read_s"] + stages["decode_s"]) / NUM_VIEWS
        rows.append(f"{'':<12} one thread: read {stages['read_s'] * 1e3:.1f} ms + decode "
                    f"{stages['decode_s'] * 1e3:.1f} ms per record ({stages['record_mb']:.1f} MB), "
                    f"views {stages['view_s'] * 1e3:.1f} ms each -> {1 / per_view:.2f} views/s/core")
    if args.vs_step:
        step = step_consumption(args.vs_step, args.step_repeats)
        results["step"] = step
        rows.append(f"train step {args.vs_step}: {step['step_s'] * 1e3:.0f} ms for {step['views_per_step']} views "
                    f"-> consumes {step['views_per_s']:.1f} views/s")
        for name in cases:
            for run in results["cases"][name]["runs"]:
                run["times_step_need"] = run["views_per_s"] / step["views_per_s"]
                rows.append(f"  {name} with {run['workers']} workers delivers "
                            f"{run['times_step_need']:.2f}x what the step consumes")
    results["machine"]["loadavg_end"] = os.getloadavg()
    print(f"input pipeline, {NUM_VIEWS} views per example, {os.cpu_count()} CPUs, "
          f"load {results['machine']['loadavg_start'][0]:.2f}")
    print(header)
    print("\n".join(rows))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
