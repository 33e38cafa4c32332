"""`train_and_evaluate(config, workdir)`: the pretraining loop, top to bottom.

Every process of a multi-host job runs this same function. Read it in its banner sections:
set-up, data, program, state (resume / init), the loop, the end. The mechanics live in
the sibling modules: mesh.py (sharding rules), step.py (the jitted step, generic over the
task named by config.task), optim.py, checkpoint.py, metrics.py; periodic evaluation goes
through the one interface of t3d_jax/evaluate/registry.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import time
from typing import Any

import jax

from t3d_jax import tasks
from t3d_jax.data import text_features
from t3d_jax.data.prepared import check_data_config, sync_config_with_data
from t3d_jax.evaluate import registry as eval_registry
from t3d_jax.train import checkpoint as ckpt_lib
from t3d_jax.train import mesh as mesh_lib
from t3d_jax.train import metrics as metrics_lib
from t3d_jax.train import optim as optim_lib
from t3d_jax.train import params as params_lib
from t3d_jax.train import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Raised after `train.max_bad_steps` consecutive steps with non-finite loss/gradients."""


@dataclasses.dataclass
class TrainResult:
    step: int  # optimizer steps done
    history: list[dict[str, float]]  # logged metrics (this process's view)
    state: Any  # final train state (sharded arrays)
    program: step_lib.TrainProgram
    preempted: bool = False


def default_workdir(config) -> str:
    """runs/<task>_<variant>_<UTC time>: where a run writes when no --workdir is given. Every
    process of a job must agree on it, so multi-process jobs must pass --workdir."""
    if jax.process_count() > 1:
        from t3d_jax.utils import UserValueError
        raise UserValueError("--workdir is required when several processes train together "
                             "(they must all write to the same folder)")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return os.path.join("runs", f"{config.get('task', 'run')}_{config.get('variant', '')}_{stamp}")


def train_and_evaluate(config, workdir: str | os.PathLike) -> TrainResult:
    """Trains (or resumes) `config`'s task in `workdir`; every process of a job calls this."""
    check_data_config(config)
    tasks.get_task(config)  # an unknown task fails here, before anything is written
    config = sync_config_with_data(config)
    config = tasks.get_task(config).prepare_config(config)  # settings the task reads off the data
    text_features.check_config(config)  # a cached text-feature set must be the run's tower's
    peak = float(config.metrics.peak_flops_per_device)
    if peak <= 0:  # measured before the mesh is set: a single-device matmul
        # All devices of a CPU host share its cores, so the host's measured matmul rate
        # is split over the local devices.
        peak = metrics_lib.measure_peak_flops() / (
            jax.local_device_count() if jax.devices()[0].platform == "cpu" else 1)
        log.info("MFU peak: measured float32 matmul %.3g GFLOP/s per device", peak / 1e9)
    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        return _train(config, pathlib.Path(workdir), mesh, peak)


def _train(config, workdir: pathlib.Path, mesh, peak: float) -> TrainResult:
    # ======================================================================================
    # Set-up
    # ======================================================================================
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    log.info("mesh %s over %d devices in %d process(es)", mesh_lib.describe(mesh),
             jax.device_count(), jax.process_count())
    num_steps = int(config.train.num_steps)
    gbs = int(config.train.global_batch_size)

    # ======================================================================================
    # Data: this process's slice of every global batch
    # ======================================================================================
    from t3d_jax.data.pipeline import train_iterator

    data_iter = train_iterator(config.data, global_batch_size=gbs, seed=int(config.train.seed),
                               process_index=jax.process_index(),
                               process_count=jax.process_count())

    # ======================================================================================
    # Program: sharded state layout + the jitted step (cached per config and mesh)
    # ======================================================================================
    program = step_lib.get_train_program(config, mesh)
    total, trainable = optim_lib.count_params(program.abstract_state["params"], program.frozen_mask)
    log.info("task %s, model %s: %s parameters (%s trainable)", program.task.name, config.model.name,
             f"{total:,}", f"{trainable:,}")

    # ======================================================================================
    # State: resume from WORKDIR, else initialise (optionally from pretrained weights)
    # ======================================================================================
    ckpt_dir = params_lib.checkpoint_dir(config, workdir)
    manager = ckpt_lib.make_manager(ckpt_dir, config.checkpoint)
    state, start = ckpt_lib.restore_latest(manager, program.abstract_state, data_iter)
    if state is not None:
        log.info("resumed from %s step %d", ckpt_dir, start)
    else:
        start = 0
        state = program.init()
        state = init_from_pretrained(config, program, state)
    start = int(start)

    # ======================================================================================
    # Compile: trace + compile the step once on the first real batch; log memory and FLOPs
    # ======================================================================================
    first_local = next(data_iter) if start < num_steps else None
    if first_local is not None:
        _check_batch_contract(first_local, program, config)
    flops = math.nan
    if first_local is not None:
        t0 = time.perf_counter()
        first = program.prepare(step_lib.global_batch(first_local, program.input_shardings))
        compiled = program.step.lower(state, first).compile()
        del first
        flops = step_lib.flops_per_step(compiled)
        log.info("compiled the train step in %.1fs; %.3g GFLOP/step/device",
                 time.perf_counter() - t0, flops / 1e9)
        log.info("%s", metrics_lib.describe_memory(compiled))
        loops = step_lib.flop_undercount_reasons(config)
        if loops:
            log.warning("perf/mfu and perf/tflops_per_device are undercounted with %s: XLA counts "
                        "the loop's body once; compare step times instead", " and ".join(loops))
    watcher = ckpt_lib.PreemptionWatcher(manager)
    logger = metrics_lib.MetricLogger(
        workdir, total_steps=num_steps, start_step=start, log_every=int(config.train.log_every),
        global_batch_size=gbs, flops_per_step_per_device=flops, peak_flops_per_device=peak,
        num_devices=jax.device_count(), tensorboard=bool(config.metrics.tensorboard),
        progress_bar=bool(config.train.progress_bar) and is_main)
    max_bad = int(config.train.max_bad_steps)
    eval_every = int(config.eval.every_steps)
    evaluators = tuple(config.eval.evaluators or ())
    preempted = False

    # ======================================================================================
    # The loop
    # ======================================================================================
    step = start
    try:
        while step < num_steps:
            # The device still runs the previous step: time spent here is input-bound time.
            t_data = time.perf_counter()
            local, first_local = (first_local, None) if first_local is not None else (next(data_iter), None)
            data_wait = time.perf_counter() - t_data
            # With data.views_on='device' `prepare` makes the views on the devices (else identity).
            batch = program.prepare(step_lib.global_batch(local, program.input_shardings))
            state, metrics = program.step(state, batch)  # traced and compiled once (above)
            step += 1
            previous = logger.push(step, metrics, data_wait)  # reads the *previous* step's metrics
            _check_bad_steps(previous, max_bad, manager, ckpt_dir)

            scheduled = step % int(config.checkpoint.every_steps) == 0 or step == num_steps
            if scheduled:
                _save_unless_bad(manager, step, state, data_iter)
            if watcher.reached(step):
                log.warning("preempted: saving step %d and stopping", step)
                if not scheduled:
                    _save_unless_bad(manager, step, state, data_iter)
                preempted = True
                break
            if evaluators and ((eval_every and step % eval_every == 0) or step == num_steps):
                ctx = eval_registry.EvalContext(model=program.model(state), config=config, step=step,
                                                workdir=os.fspath(workdir), mesh=mesh)
                logger.write_scalars(step, eval_registry.run_evaluators(evaluators, ctx))
        _check_bad_steps(logger.flush(), max_bad, manager, ckpt_dir)

    # ======================================================================================
    # The end: wait for checkpoints, close writers
    # ======================================================================================
    finally:
        manager.wait_until_finished()
        logger.close()
        watcher.close()
        manager.close()
    return TrainResult(step=step, history=logger.history, state=state, program=program,
                       preempted=preempted)


def _check_batch_contract(local: dict, program: step_lib.TrainProgram, config) -> None:
    """The pipeline delivers every key the task's batch contract names (else a clear error)."""
    missing = sorted(set(program.input_spec) - set(local))
    if missing:
        raise ValueError(f"task {program.task.name!r} needs batch keys {missing}, which the data "
                         f"pipeline of {config.data.dir} does not deliver (it gives {sorted(local)})")
    for key, spec in program.input_spec.items():
        got = tuple(getattr(local[key], "shape", ()))
        if got[1:] != tuple(spec.shape[1:]):
            raise ValueError(f"batch[{key!r}] from {config.data.dir} has per-example shape {got[1:]}, "
                             f"but the program was built for {tuple(spec.shape[1:])}"
                             + (" (config.data.stored_size: the data's stored grid)" if key == "volume" else ""))


def _check_bad_steps(values: dict[str, float] | None, max_bad: int, manager, ckpt_dir) -> None:
    if not values or max_bad <= 0 or values.get("bad_steps", 0) < max_bad:
        return
    manager.wait_until_finished()
    last = manager.latest_step()
    raise NonFiniteTrainingError(
        f"training stopped: {int(values['bad_steps'])} consecutive steps had a non-finite loss or "
        f"gradient (train.max_bad_steps={max_bad}); those steps were skipped and the parameters "
        f"are unchanged. The last good checkpoint is "
        f"{'step ' + str(last) + ' in ' + str(ckpt_dir) if last is not None else 'none (no save yet)'}. "
        f"Check the data for NaNs, lower optim.lr, or raise optim.warmup_steps.")


def _save_unless_bad(manager, step: int, state, data_iter) -> None:
    """Saves unless the newest steps were skipped as non-finite (never checkpoint a run that
    is diverging; the previous checkpoint stays the newest)."""
    if int(jax.device_get(state["bad_steps"])) > 0:
        log.warning("step %d: not checkpointing, the last step was non-finite", step)
        return
    ckpt_lib.save(manager, step, state, data_iter, force=True)


def init_from_pretrained(config, program: step_lib.TrainProgram, state: dict) -> dict:
    """Applies config.init_from (another run's params, HF BERT, MONAI ViT) to a fresh state."""
    init = config.init_from
    if init.checkpoint:
        wanted = params_lib.select_params(program.abstract_state["params"], init.get("checkpoint_params", ()))
        params, step = params_lib.read_params(
            init.checkpoint, wanted, int(init.checkpoint_step),
            fix="point config.init_from.checkpoint at a run's checkpoints folder (WORKDIR/checkpoints)")
        log.info("initialised %s from %s step %d", ", ".join(sorted(params)) if init.get("checkpoint_params")
                 else "params", init.checkpoint, step)
        state = dict(state, params={**state["params"], **params})
    if init.hf_bert_dir or init.monai_vit or init.get("monai_swin", "") or init.get("hf_gpt2_dir", ""):
        from t3d_jax.train import pretrained
        state = pretrained.load_into_state(config, program, state)
    return state
