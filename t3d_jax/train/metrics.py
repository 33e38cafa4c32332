"""Metrics out of the loop: TensorBoard + metrics.jsonl (process 0), progress bar, MFU, memory.

The loop hands each step's metrics (device arrays) to `MetricLogger.push` and only reads
them back one step later, after the next step has been dispatched, so the host never waits
for the device just to log (maxtext's habit). Host-side timings (step time, examples/s,
MFU) are computed from wall-clock time between consecutive reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


def measure_peak_flops(n: int = 1024, dtype=jnp.float32, *, seconds: float = 0.5,
                       repeats: int = 2) -> float:
    """Best FLOP/s of a jitted n x n x n matmul on the first local device, timing one call at
    a time for at least `seconds` and at least `repeats` calls.

    The MFU denominator: the loop's when the config gives no peak, the CPU benches' always
    (bench/train_step.py, bench/vs_pytorch.py) -- what XLA itself reaches on the op a step is
    made of. The best call rather than the mean, because a shared machine only ever slows a
    call down. On CPU every fake device shares the same cores (the caller divides).
    """
    device = jax.local_devices()[0]
    rng = np.random.default_rng(0)
    a, b = (jax.device_put(rng.standard_normal((n, n)).astype(dtype), device) for _ in range(2))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best, calls, start = math.inf, 0, time.perf_counter()
    while calls < repeats or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return 2.0 * n**3 / best


def describe_memory(compiled) -> str:
    """One line from the compiled step's memory analysis (per device)."""
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # not every backend implements it
        return f"memory analysis unavailable ({type(e).__name__})"
    if m is None:
        return "memory analysis unavailable"
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    parts = [f"{f.replace('_size_in_bytes', '')}={mib(getattr(m, f, 0))}" for f in fields]
    total = (getattr(m, "argument_size_in_bytes", 0) + getattr(m, "output_size_in_bytes", 0)
             - getattr(m, "alias_size_in_bytes", 0) + getattr(m, "temp_size_in_bytes", 0))
    return "per-device memory: " + ", ".join(parts) + f"; peak estimate={mib(total)}"


class MetricLogger:
    """Writes scalars to TensorBoard and WORKDIR/metrics.jsonl (process 0 only) and drives
    the console progress bar."""

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, start_step: int,
                 log_every: int, global_batch_size: int, flops_per_step_per_device: float,
                 peak_flops_per_device: float, num_devices: int, tensorboard: bool = True,
                 progress_bar: bool = True):
        self.is_writer = jax.process_index() == 0
        self.log_every = max(1, int(log_every))
        self.total_steps = int(total_steps)
        self.global_batch_size = int(global_batch_size)
        self.flops = float(flops_per_step_per_device)
        self.peak = float(peak_flops_per_device)
        self.num_devices = int(num_devices)
        self.pending: tuple[int, Any, float] | None = None
        self.data_wait = 0.0  # seconds the host waited for input since the last write
        self.last_time = time.perf_counter()
        self.last_step = int(start_step)
        self.latest: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.tb = None
        self.jsonl = None
        self.bar = None
        if self.is_writer:
            workdir = pathlib.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.fspath(workdir / "tensorboard"))
            if progress_bar:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=self.total_steps, initial=int(start_step), unit="step",
                                dynamic_ncols=True, smoothing=0.1)

    def push(self, step: int, metrics: Any, data_wait_s: float = 0.0) -> dict[str, float] | None:
        """Queues `metrics` of `step` (device arrays) and the seconds the host waited for that
        step's batch; writes the previously queued step and returns its values (None on the
        first push). The wait is logged per step and as a fraction of wall time: near 0 when
        the input pipeline keeps ahead of the step."""
        previous, self.pending = self.pending, (int(step), metrics, float(data_wait_s))
        return self._write(*previous) if previous is not None else None

    def flush(self) -> dict[str, float] | None:
        """Writes the queued step; returns its values."""
        pending, self.pending = self.pending, None
        return self._write(*pending) if pending is not None else None

    def _write(self, step: int, metrics: Any, data_wait_s: float = 0.0) -> dict[str, float]:
        self.data_wait += data_wait_s
        values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        result = dict(values)
        now = time.perf_counter()
        steps_done = step - self.last_step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{values.get('loss', math.nan):.4f}", refresh=False)
        if step % self.log_every and step != self.total_steps:
            return result
        elapsed = max(now - self.last_time, 1e-9)
        step_time = elapsed / max(steps_done, 1)
        values["perf/step_time_s"] = step_time
        values["perf/examples_per_s"] = self.global_batch_size / step_time
        values["perf/steps_per_s"] = 1.0 / step_time
        values["perf/data_wait_s"] = self.data_wait / max(steps_done, 1)
        values["perf/data_wait_frac"] = min(self.data_wait / elapsed, 1.0)
        self.data_wait = 0.0
        if self.flops > 0 and self.peak > 0:
            values["perf/mfu"] = self.flops / step_time / self.peak
            values["perf/tflops_per_device"] = self.flops / step_time / 1e12
        self.last_time, self.last_step = now, step
        self.latest = values
        self.history.append({"step": step, **values})
        if not self.is_writer:
            return result
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.bar is None:
            log.info("step %d: %s", step, ", ".join(
                f"{k}={v:.4g}" for k, v in values.items() if not k.startswith("lr/")))
        return result

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """Other scalars (evaluation results) into the same sinks, immediately."""
        values = {k: float(v) for k, v in values.items()}
        self.history.append({"step": int(step), **values})
        if not self.is_writer:
            return
        self.jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
