"""Checkpoints: orbax CheckpointManager holding the train state and the Grain iterator.

One checkpoint (a step folder under WORKDIR/checkpoints) holds two items:

    state  the whole train-state dict (params, optimizer state, step, model RNG streams,
           NaN-guard counters), saved asynchronously by orbax's StandardCheckpointHandler;
    data   the Grain iterator position, one JSON per process (grain's handler).

Why it is safe to kill training at any moment:
* orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it when every process has
  finished (commit marker on object stores), so a half-written step is never listed;
* `restore_latest` additionally falls back to the previous step when a listed step cannot be
  read (e.g. files deleted or truncated), logging why, instead of dying or restoring garbage;
* restoring reads into *abstract sharded targets* (the shapes and shardings of the current
  program), so a run saved on one mesh resumes on another (orbax reshards on read);
* a run saved with another number of processes has no `data` file for this process
  (grain names them `process_{i}-of-{n}.json`); `restore` then sets this process's iterator
  to a state the old run saved (see `_plan_data_restore`), with a warning;
* a run saved with another `data.worker_count` wrote an iterator state of another shape;
  `restore` converts it to the same batch position, with a warning (grain's state layout is
  known to `t3d_jax.data.iterator_state`, not here). A position that cannot be applied is
  `DataPositionError`, which names the fix and never moves the step aside (the checkpoint
  itself is fine).

PRNG key arrays (nnx's RNG streams) are stored as their raw uint32 key data.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import threading
import time

import jax
import orbax.checkpoint as ocp
from etils import epath

from t3d_jax.data import iterator_state

log = logging.getLogger(__name__)

STATE, DATA = "state", "data"


# -- typed PRNG keys <-> raw key data (orbax stores plain arrays) --------------------------------

def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_storable(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def abstract_storable(abstract_tree):
    """The abstract tree orbax restores into: key arrays become their uint32 key data."""
    def one(a):
        if not _is_key(a):
            return a
        data = jax.eval_shape(jax.random.key_data, a)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=a.sharding)
    return jax.tree.map(one, abstract_tree)


def from_storable(tree, abstract_tree):
    def one(x, a):
        if not _is_key(a):
            return x
        impl = a.dtype._impl if hasattr(a.dtype, "_impl") else jax.random.key_impl(a)
        return jax.random.wrap_key_data(x, impl=impl)
    return jax.tree.map(one, tree, abstract_tree)


# -- the manager ------------------------------------------------------------------------------------

def make_manager(directory: str | os.PathLike, checkpoint_config) -> ocp.CheckpointManager:
    import grain  # noqa: F401  (registers grain.checkpoint args with orbax)

    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(checkpoint_config.keep),
        save_interval_steps=int(checkpoint_config.every_steps),
        enable_async_checkpointing=bool(checkpoint_config.async_save),
        create=True,
    )
    return ocp.CheckpointManager(
        os.fspath(directory), options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, *,
         force: bool = False) -> bool:
    """Saves if the manager's interval (or `force`) says so; async for the state item."""
    import grain

    args = {STATE: ocp.args.StandardSave(to_storable(state))}
    if data_iterator is not None:
        args[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(int(step), args=ocp.args.Composite(**args), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
    """Restores `step` into `abstract_state`'s shapes/shardings (and the iterator in place).

    The data position is worked out first (`_plan_data_restore`), so a position that cannot be
    applied raises `DataPositionError` before any state is read.
    """
    import grain

    args = {STATE: ocp.args.StandardRestore(abstract_storable(abstract_state))}
    plan = _plan_data_restore(manager, step, data_iterator) if data_iterator is not None else None
    if data_iterator is not None and plan is None:
        args[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(int(step), args=ocp.args.Composite(**args))
    if plan is not None:
        target, why = plan
        log.warning("%s", why)
        data_iterator.set_state(target)
        data_iterator.start_prefetch()  # as grain's own restore does
    return from_storable(restored[STATE], abstract_state)


class DataPositionError(RuntimeError):
    """The step's data position cannot be applied to this run's iterator.

    Not a reason to move the step aside (the checkpoint is intact and a run with the old data
    settings resumes from it), nor to fall back to an older step (it has the same problem):
    `restore_latest` lets it through.
    """


def _process_layout() -> tuple[int, int]:
    """(index, count) of this process, as grain's handler names the data files."""
    return jax.process_index(), jax.process_count()


def _plan_data_restore(manager: ocp.CheckpointManager, step: int, data_iterator):
    """None when grain's own restore applies (this process's file, same worker count), else
    (the iterator state to set, the warning saying why).

    Another process count: every process consumes one of its own batches per step, and a
    process's batch s holds the global elements of global batch s whatever the process count
    (t3d_jax.data.pipeline), so after step S every process of any layout is at position S of
    its own batch sequence. A Grain iterator state records only that position (and the
    read-worker round robin), not the process layout, so the old processes' states are all
    equal and any of them resumes this process exactly at batch S + 1.

    Another worker count: the saved state has another shape (t3d_jax.data.iterator_state) and
    is converted to the same batch position (`batches_read` -> `iterator_state_at`); the
    batches are the same for any worker count, so this too resumes exactly.
    """
    index, count = _process_layout()
    item_dir = epath.Path(manager.directory) / str(int(step)) / DATA
    files = iterator_state.files_of_other_layout(item_dir, index, count)
    if files:
        states = [iterator_state.read_state(f) for f in files]
        if any(s != states[0] for s in states[1:]):
            log.warning("checkpoint step %d: the data iterator states of the previous processes "
                        "differ; using %s", step, files[0].name)
        saved, source = states[0], files[0]
        why = (f"checkpoint step {step} was saved by another number of processes "
               f"({', '.join(f.name for f in files)}; this is process {index} of {count}): "
               f"restored the train state and started this process's data iterator at the batch "
               f"after step {step}, from {files[0].name}")
    else:
        source = item_dir / iterator_state.state_file_name(index, count)
        try:
            saved = iterator_state.read_state(source)
        except (OSError, ValueError):
            return None  # missing or damaged: grain's restore reports it as before
        why = None
    template = data_iterator.get_state()  # a state of this iterator: its shape, worker count
    old = iterator_state.reader_worker_count(saved)
    new = iterator_state.reader_worker_count(template)
    if old == new:
        return None if why is None else (saved, why)
    position = iterator_state.batches_read(saved) if old is not None else None
    problem = ("the saved state has a shape this code does not know" if old is None else
               "this run's iterator state has a shape this code does not know" if new is None else
               "the saved state is not a round-robin position of grain's read workers"
               if position is None else None)
    if problem is not None:
        def describe(n):
            return "UNKNOWN (see the state file)" if n is None else n

        raise DataPositionError(
            f"{manager.directory}: checkpoint step {step}: its data iterator state {source} was "
            f"saved with data.worker_count={describe(old)} and this run reads with "
            f"data.worker_count={describe(new)}; the saved data position cannot be converted "
            f"({problem}). The checkpoint is intact and was not moved. Resume with the old "
            f"worker count (--config.data.worker_count={describe(old)}), or start a new workdir "
            f"with --config.init_from.checkpoint={manager.directory} (params only).")
    converted = (f"its data iterator state was saved with data.worker_count={old} and this run "
                 f"reads with data.worker_count={new}: set the iterator to the same position, "
                 f"after {position} batches of this process (the batches are the same for any "
                 f"worker count)")
    why = (f"checkpoint step {step} in {manager.directory}: restored the train state; {converted}"
           if why is None else f"{why}; {converted}")
    return iterator_state.iterator_state_at(template, position), why


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator=None):
    """(state, step) of the newest readable checkpoint, or (None, None) when there is none.

    A listed step that fails to read is reported and skipped; the previous one is used. If
    there are checkpoints but none can be read, this raises instead of silently starting over.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
        try:
            state = restore(manager, step, abstract_state, data_iterator)
        except DataPositionError:
            raise  # the checkpoint is fine; only this run's data settings do not fit it
        except Exception as e:  # unreadable/incomplete step: fall back, say why
            log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous",
                        step, manager.directory, type(e).__name__, str(e)[:300])
            errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
            _quarantine(manager, step)
            continue
        return state, step
    if steps:
        raise RuntimeError(f"{manager.directory}: none of the checkpoints {steps} can be restored "
                           f"(starting over would overwrite them):\n" + "\n".join(errors))
    return None, None


def _quarantine(manager: ocp.CheckpointManager, step: int) -> None:
    """Moves an unreadable step aside (kept for inspection) so the run can save that step again."""
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        src = pathlib.Path(os.fspath(manager.directory)) / str(step)
        dst = src.with_name(f"{step}.unreadable-{int(time.time())}")
        if src.exists():
            src.rename(dst)
            log.warning("moved the unreadable checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"t3d_quarantine_{step}")
    manager.reload()


# -- preemption ---------------------------------------------------------------------------------------

class PreemptionWatcher:
    """True once the job is asked to stop (SIGTERM), at the same step on every process.

    One process: a SIGTERM handler sets a flag. Several processes: JAX's preemption service
    (started by jax.distributed.initialize) agrees on a sync step through orbax's
    `reached_preemption`, so every host saves the same step.
    """

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self._flag = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting")
        self._flag.set()

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.manager.reached_preemption(int(step))
        return self._flag.is_set()

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
