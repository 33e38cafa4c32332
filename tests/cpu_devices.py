"""XLA flags for tests that fake several CPU devices, in this process and in subprocesses.

XLA:CPU runs each fake device's program on its own thread, and a collective waits for all
of them. When one thread reaches a collective more than
``xla_cpu_collective_call_terminate_timeout_seconds`` (default 40 s) after another, XLA ends
the whole process with ``LOG(FATAL)``: pytest dies with "Fatal Python error: Aborted" and the
log line is lost in pytest's captured stderr. Eight device threads on a shared 2-core machine
can fall that far apart under load (a CI run on main died this way in test_eval_runner), so
tests wait 30 minutes before giving up and warn after 2; a real deadlock still ends the run.
"""

from __future__ import annotations

import os

STRAGGLER_FLAGS = (
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800",
)


_COUNT = "--xla_force_host_platform_device_count="


def xla_flags(base: str = "", devices: int | None = None) -> str:
    """``base`` with the straggler timeouts added and, if given, the fake device count replaced."""
    flags = [f for f in base.split() if devices is None or not f.startswith(_COUNT)]
    if devices is not None and devices > 1:
        flags.append(f"{_COUNT}{devices}")
    names = {f.split("=", 1)[0] for f in flags}
    return " ".join(flags + [f for f in STRAGGLER_FLAGS if f.split("=", 1)[0] not in names])


def env(devices: int, **extra: str) -> dict:
    """``os.environ`` for a JAX subprocess on ``devices`` CPU devices (1: the real one)."""
    return dict(os.environ, XLA_FLAGS=xla_flags(os.environ.get("XLA_FLAGS", ""), devices),
                JAX_PLATFORMS="cpu", **extra)
