"""The training loop end to end: real T3D model (tiny), real Grain pipeline, tiny prepared data.

In process (8 fake CPU devices): the step is traced once, parameters and optimizer state are
FSDP-sharded, a non-finite step is skipped with parameters unchanged, and too many in a row
stop training with the last good checkpoint intact.

Subprocesses (`launch/train.py`, as users run it): a run killed with SIGKILL and restarted
(past an incomplete checkpoint) logs exactly the losses of an uninterrupted run, with host
and with device views (`data.views_on`); two
processes with 4 CPU devices each log the losses of one process with 8.

Kept fast (the whole suite has a time budget): the uninterrupted reference run is in this
process and writes the step to a persistent compilation cache, which every later run, here
or in a subprocess, loads instead of compiling; every run trains the same NUM_STEPS (the
step's schedule depends on it), takes checkpoints only where a test reads them, and is told
the MFU peak instead of measuring it (host-side settings: the same compiled program).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t3d_jax.train import checkpoint as ckpt_lib
from t3d_jax.train import params as params_lib
from t3d_jax.train.loop import NonFiniteTrainingError, train_and_evaluate

import cpu_devices
from test_train_optim import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent
NUM_STEPS = 10  # every run here uses this many steps, so all share one compiled program
# metrics.peak_flops_per_device: given, so no run spends a second measuring a matmul (host-side).
PEAK_FLOPS = 1e9
NO_PERIODIC_SAVES = 1000  # checkpoint.every_steps of runs whose checkpoints no test reads


def tiny_config(data_dir, **train):
    c = load_config("t3d.py", "tiny")
    c.data.dir = str(data_dir)
    c.train.num_steps = NUM_STEPS
    c.train.update(train)
    c.metrics.peak_flops_per_device = PEAK_FLOPS
    return c


def read_losses(workdir) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (re-run after a resume) keeps the last."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[int(row["step"])] = row["loss"]
    return out


# ---------------------------------------------------------------------------------------
# In process
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def persistent_cache(compile_cache):
    """Loads compiled programs from (and saves them to) `compile_cache`, then restores the settings."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
                jax.config.jax_persistent_cache_min_entry_size_bytes)
    cc.set_cache_dir(str(compile_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    try:
        yield
    finally:
        cc.set_cache_dir(previous[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", previous[2])
        cc.reset_cache()


@contextlib.contextmanager
def poisoned_batches(steps):
    """The data pipeline's batches of these steps (1-based, counted from a fresh start) are
    all-NaN volumes: how the tests feed the loop a diverging step, through its data."""
    from t3d_jax.data import pipeline

    real = pipeline.train_iterator

    def poisoned_iterator(*args, **kwargs):
        it = real(*args, **kwargs)
        fetch, count = type(it).__next__, [0]

        def next_batch(self):
            batch = fetch(self)
            if self is it:
                count[0] += 1
                if count[0] in steps:
                    batch = dict(batch, views=np.full_like(batch["views"], np.nan))
            return batch

        mp.setattr(type(it), "__next__", next_batch)
        return it

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "train_iterator", poisoned_iterator)
        yield


@pytest.fixture(scope="module")
def nan_run(tiny_prepared_dir, tmp_path_factory, uninterrupted, compile_cache):
    """Ten steps in this process; step 3's batch is all-NaN (`poisoned_batches`).

    The program is the one the `uninterrupted` run compiled in this process (the NaN knob
    acts on the host), so it is neither traced nor compiled again. No test reads its
    checkpoints: only the final one is written.
    """
    config = tiny_config(tiny_prepared_dir)
    config.checkpoint.every_steps = NO_PERIODIC_SAVES
    workdir = tmp_path_factory.mktemp("nan_run")
    with persistent_cache(compile_cache), poisoned_batches({3}):
        result = train_and_evaluate(config, workdir)
    history = {int(h["step"]): h for h in result.history if "loss" in h}
    # Same program and data as the uninterrupted run: identical losses until the NaN step.
    assert [history[s]["loss"] for s in (1, 2)] == [uninterrupted[s] for s in (1, 2)]
    return result, history, workdir


def test_step_is_traced_once(nan_run):
    result, history, _ = nan_run
    assert result.step == NUM_STEPS and sorted(history) == list(range(1, NUM_STEPS + 1))
    assert result.program.trace_count == [1]


def test_params_and_optimizer_state_are_fsdp_sharded(nan_run):
    result, _, _ = nan_run
    params = result.state["params"]
    word = params["text_encoder"]["embeddings"]["word"]["embedding"]  # logical ('vocab', 'embed')
    assert word.shape == (30522, 64)
    assert word.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert {s.data.shape for s in word.addressable_shards} == {(30522, 8)}
    assert len({s.device for s in word.addressable_shards}) == 8
    # Every parameter is laid out as the program's rules say, and most bytes are split 8 ways.
    total = split = 0
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(result.program.state_shardings["params"])):
        assert x.sharding == s
        total += x.size
        split += x.size if x.addressable_shards[0].data.size * 8 == x.size else 0
    assert split > 0.95 * total
    # Adam's moments live where their parameters live.
    mu = result.state["opt_state"][2].inner_states["text"].inner_state[0].mu
    assert mu["text_encoder"]["embeddings"]["word"]["embedding"].sharding == word.sharding


def test_nonfinite_step_is_skipped_with_params_unchanged(nan_run):
    result, history, _ = nan_run
    assert history[3]["skipped"] == 1 and np.isnan(history[3]["loss"])
    assert history[3]["bad_steps"] == 1 and history[4]["bad_steps"] == 0
    assert all(history[s]["skipped"] == 0 and np.isfinite(history[s]["loss"])
               for s in range(1, NUM_STEPS + 1) if s != 3)
    # param_norm is measured on the params a step starts from: step 4 starts from exactly
    # the params step 3 started from, because step 3's update was discarded.
    assert history[4]["param_norm"] == history[3]["param_norm"]
    assert history[3]["param_norm"] != history[2]["param_norm"]
    assert history[NUM_STEPS]["skipped_steps"] == 1
    # The optimizer did not count the skipped step either.
    count = result.state["opt_state"][2].inner_states["image"].inner_state[0].count
    assert int(count) == NUM_STEPS - 1
    assert int(result.state["step"]) == NUM_STEPS


def test_input_wait_is_logged_and_counts_a_slow_loader(nan_run, tiny_prepared_dir, tmp_path, compile_cache,
                                                       monkeypatch):
    _, history, _ = nan_run
    assert all(0.0 <= history[s]["perf/data_wait_frac"] <= 1.0 for s in history)
    # A loader that needs 0.3 s per batch more: every step after the first (fetched before
    # compiling) logs at least that long blocked on input. The run has NUM_STEPS (the same
    # compiled program as nan_run's) and stops after step 4 (a preemption request there).
    from t3d_jax.data import pipeline

    real = pipeline.train_iterator
    delay = 0.3

    def slow_iterator(*args, **kwargs):
        it = real(*args, **kwargs)
        fetch = type(it).__next__
        monkeypatch.setattr(type(it), "__next__", lambda self: time.sleep(delay) or fetch(self))
        return it

    monkeypatch.setattr(pipeline, "train_iterator", slow_iterator)
    monkeypatch.setattr(ckpt_lib.PreemptionWatcher, "reached", lambda self, step: step >= 4)
    config = tiny_config(tiny_prepared_dir)
    config.checkpoint.every_steps = NO_PERIODIC_SAVES
    with persistent_cache(compile_cache):
        result = train_and_evaluate(config, tmp_path / "slow")
    assert result.preempted and result.program.trace_count == [1]  # nan_run's program, not a new one
    waits = {int(h["step"]): h["perf/data_wait_s"] for h in result.history if "loss" in h}
    assert sorted(waits) == [1, 2, 3, 4]
    assert waits[1] < delay <= min(waits[2], waits[3], waits[4]), waits


def test_too_many_bad_steps_stop_with_last_good_checkpoint(nan_run, tiny_prepared_dir, tmp_path):
    result, _, _ = nan_run
    config = tiny_config(tiny_prepared_dir, max_bad_steps=2)
    config.checkpoint.every_steps = 2
    with poisoned_batches({3, 4}), pytest.raises(
            NonFiniteTrainingError, match=r"2 consecutive steps.*last good checkpoint is step 2"):
        train_and_evaluate(config, tmp_path)
    manager = ckpt_lib.make_manager(tmp_path / "checkpoints", config.checkpoint)
    assert list(manager.all_steps()) == [2]  # step 4 came after a bad step: not saved
    state, step = ckpt_lib.restore_latest(manager, result.program.abstract_state)
    manager.close()
    assert step == 2 and int(state["step"]) == 2 and int(state["bad_steps"]) == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    assert result.program.trace_count == [1]  # same program as the first run: not retraced
    # init_from.checkpoint reads just these params into a new run's sharded layout.
    params, from_step = params_lib.read_params(tmp_path / "checkpoints", result.program.abstract_state["params"])
    assert from_step == 2
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------
# Subprocesses: launch/train.py as users run it
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _env(compile_cache, devices: int | None = 8) -> dict:
    env = cpu_devices.env(devices or 1)
    env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _train_cmd(data_dir, workdir, num_steps, *extra, every_steps=2):
    return [sys.executable, str(REPO / "launch" / "train.py"), "--config=configs/t3d.py:tiny",
            f"--config.data.dir={data_dir}", f"--config.train.num_steps={num_steps}",
            f"--config.checkpoint.every_steps={every_steps}",
            f"--config.metrics.peak_flops_per_device={PEAK_FLOPS}", f"--workdir={workdir}", *extra]


def _run(cmd, env, log_path, timeout=400):
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{pathlib.Path(log_path).read_text()[-4000:]}")


RESUME_STEPS = NUM_STEPS


@pytest.fixture(scope="module")
def uninterrupted(tiny_prepared_dir, compile_cache, tmp_path_factory):
    """The reference losses: RESUME_STEPS steps in this process, the config launch/train.py
    builds from `_train_cmd`'s flags. Its step goes into the persistent compilation cache,
    from which the subprocesses load it (same program, same XLA flags: bit-identical losses)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    config = tiny_config(tiny_prepared_dir, num_steps=RESUME_STEPS)
    config.checkpoint.every_steps = NO_PERIODIC_SAVES  # host-side: no test reads them
    with persistent_cache(compile_cache):
        train_and_evaluate(config, workdir)
    return read_losses(workdir)


def _finalized_steps(ckpt_dir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def _start_and_signal(cmd, env, log_path, workdir, at_step: int, sig) -> int:
    """Starts a training run and sends `sig` once metrics.jsonl shows `at_step`; returns the code."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        metrics = pathlib.Path(workdir) / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and max(read_losses(workdir), default=0) >= at_step:
                break
            time.sleep(0.02)
        proc.send_signal(sig)
        return proc.wait(timeout=400)


def test_preemption_sigkill_and_incomplete_checkpoint_resume_exactly(uninterrupted, tiny_prepared_dir,
                                                                       compile_cache, tmp_path, caplog):
    """SIGTERM (preemption) -> clean exit with a checkpoint of the current step; restart; SIGKILL
    mid-run; a half-written newer checkpoint appears; restart: the losses of every step equal
    the uninterrupted run's, bit for bit.

    The two runs that are signalled are `launch/train.py` subprocesses (the second one resumes
    as users restart a job); the last restart runs in this process, with the `uninterrupted`
    run's compiled program, and reads the checkpoints and the data position from disk as a
    new process would."""
    assert sorted(uninterrupted) == list(range(1, RESUME_STEPS + 1))
    workdir = tmp_path / "run"
    env = _env(compile_cache)
    cmd = _train_cmd(tiny_prepared_dir, workdir, RESUME_STEPS)
    ckpt_dir = workdir / "checkpoints"

    code = _start_and_signal(cmd, env, tmp_path / "preempted.txt", workdir, 2, signal.SIGTERM)
    log = (tmp_path / "preempted.txt").read_text()
    assert code == 0, log[-3000:]
    assert "preempted: saving step" in log
    stopped_at = max(read_losses(workdir))
    assert stopped_at < RESUME_STEPS and stopped_at in _finalized_steps(ckpt_dir)

    code = _start_and_signal(cmd, env, tmp_path / "killed.txt", workdir, stopped_at + 3, signal.SIGKILL)
    assert code == -signal.SIGKILL, (tmp_path / "killed.txt").read_text()[-3000:]
    assert f"resumed from {ckpt_dir} step {stopped_at}" in (tmp_path / "killed.txt").read_text()
    assert max(read_losses(workdir)) < RESUME_STEPS

    # Simulate a kill in the middle of writing the next checkpoint: a step folder whose array
    # data never landed (non-atomic filesystems), and orbax's own temporary folder.
    good = _finalized_steps(ckpt_dir)[-1]
    broken = ckpt_dir / str(good + 2)
    shutil.copytree(ckpt_dir / str(good), broken)
    removed = [f for f in (broken / "state").rglob("*") if f.is_file() and not f.name.startswith("_")]
    assert removed
    for f in removed:
        f.unlink()
    (ckpt_dir / f"{good + 4}.orbax-checkpoint-tmp").mkdir(exist_ok=True)

    config = tiny_config(tiny_prepared_dir, num_steps=RESUME_STEPS)
    config.checkpoint.every_steps = 2  # as `cmd`
    caplog.set_level(logging.INFO)
    with persistent_cache(compile_cache):
        result = train_and_evaluate(config, workdir)
    assert result.step == RESUME_STEPS and result.program.trace_count == [1]
    log = caplog.text
    assert f"step {good + 2} in" in log and "cannot be restored" in log
    assert f"resumed from {ckpt_dir} step {good}" in log
    assert list(ckpt_dir.glob(f"{good + 2}.unreadable-*"))  # moved aside, kept for inspection
    resumed = read_losses(workdir)
    assert sorted(resumed) == list(range(1, RESUME_STEPS + 1))
    # Same device count, same compiled program, same data order: bit-identical losses.
    assert resumed == uninterrupted


def test_sigkill_resume_with_device_views_repeats_the_killed_runs_losses(uninterrupted, tiny_prepared_dir,
                                                                         compile_cache, tmp_path, monkeypatch):
    """data.views_on='device' (the step's input is the stored volumes; the views are made on the
    devices from the boxes, intensity maps and noise keys the pipeline draws): a run killed with
    SIGKILL and restarted from its step-2 checkpoint logs, bit for bit, the losses the killed run
    logged for steps 3.. (an uninterrupted run's, up to the kill).

    Kept cheap: the train step is the host path's program (loaded from the compilation cache the
    `uninterrupted` run filled), the killed run is the only `launch/train.py` subprocess and also
    the reference, and the restart runs in this process (it reads the checkpoint and the data
    position from disk, as a new process would) and stops after the last step the killed run
    logged (a preemption request at that step)."""
    del uninterrupted  # requested so that the cache holds the step before the subprocess starts
    workdir = tmp_path / "run"
    cmd = _train_cmd(tiny_prepared_dir, workdir, NUM_STEPS, "--config.data.views_on=device")
    code = _start_and_signal(cmd, _env(compile_cache), tmp_path / "killed.txt", workdir, 4, signal.SIGKILL)
    assert code == -signal.SIGKILL, (tmp_path / "killed.txt").read_text()[-3000:]
    killed = read_losses(workdir)
    last = max(killed)
    assert sorted(killed) == list(range(1, last + 1)) and 4 <= last < NUM_STEPS
    # Keep only the step-2 checkpoint, so the restart recomputes every step the killed run logged after it.
    ckpt_dir = workdir / "checkpoints"
    assert 2 in _finalized_steps(ckpt_dir)
    for step in _finalized_steps(ckpt_dir):
        if step != 2:
            shutil.rmtree(ckpt_dir / str(step))

    config = tiny_config(tiny_prepared_dir)
    config.data.views_on = "device"
    config.checkpoint.every_steps = 1000  # host-side settings only: the same compiled programs
    config.metrics.peak_flops_per_device = 1e9
    monkeypatch.setattr(ckpt_lib.PreemptionWatcher, "reached", lambda self, step: step >= last)
    with persistent_cache(compile_cache):
        resumed = train_and_evaluate(config, workdir)
    assert resumed.preempted
    assert "views" not in resumed.program.input_spec and resumed.program.input_spec["volume"].dtype == np.int16
    redone = {int(h["step"]): h["loss"] for h in resumed.history if "loss" in h}
    assert sorted(redone) == list(range(3, last + 1))  # resumed from step 2, not from scratch
    assert redone == {s: killed[s] for s in redone}
    assert len({round(v, 3) for v in killed.values()}) > 1  # training moved: not a constant


def test_two_processes_log_the_losses_of_one(uninterrupted, tiny_prepared_dir, compile_cache, tmp_path):
    """Two local processes x 4 CPU devices (gloo collectives) vs one process x 8 devices.

    Each process feeds its own contiguous block of every global batch; the assembled batch is
    the single-process one row for row (BERT's dropout masks included), so the losses agree
    up to float32 rounding of cross-process all-reduces (rtol 1e-5).
    """
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "two"
    # A cache of its own: both processes then compile the same program at the same time. With
    # a shared cache one process can find the step already compiled and wait in gloo's 30 s
    # start-up rendezvous while the other still compiles.
    env = _env(tmp_path / "jax_cache", devices=None)
    # This program is compiled here and nowhere else, by both processes at once: LLVM at -O0
    # halves its compile time (measured: 26 -> 12.6 CPU-s for the 8-device step). It changes
    # only how XLA:CPU's kernels are code-generated (no fast-math either way), not the HLO
    # or the data each process feeds. Only the final checkpoint is written.
    env["XLA_FLAGS"] = cpu_devices.xla_flags(env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0")
    procs, logs = [], []
    for i in range(2):
        logs.append(open(tmp_path / f"p{i}.txt", "w"))
        cmd = _train_cmd(tiny_prepared_dir, workdir, RESUME_STEPS, f"--coordinator_address=localhost:{port}",
                         "--num_processes=2", f"--process_id={i}", "--cpu_devices=4",
                         every_steps=NO_PERIODIC_SAVES)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    for i, code in enumerate(codes):
        assert code == 0, (tmp_path / f"p{i}.txt").read_text()[-4000:]
    assert "process 1 of 2" in (tmp_path / "p1.txt").read_text()
    two = read_losses(workdir)
    assert sorted(two) == sorted(uninterrupted)
    steps = sorted(two)
    np.testing.assert_allclose([two[s] for s in steps], [uninterrupted[s] for s in steps], rtol=1e-5)
    assert len({round(v, 3) for v in two.values()}) > 1  # training moved: not a constant
