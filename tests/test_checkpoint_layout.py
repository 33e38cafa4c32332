"""Resuming with another number of processes (t3d_jax.train.checkpoint.restore).

A checkpoint holds the train state and one Grain iterator file per process
(`process_{i}-of-{n}.json`). Saved here by one process; restored as process p of 2 (the
process layout that grain's handler and `checkpoint.restore` see is patched; jax itself
stays one process, so orbax needs no second host). The state must come back as saved, the
step must not be treated as unreadable (moved aside), a warning must say what happened,
and each new process's next batch must be its half of the global batch after the restored
step -- the batch an uninterrupted single-process run would have used -- for in-process
reading (worker_count 0, the tiny config) and with read-worker processes (worker_count 2).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from grain._src.core import sharding as grain_sharding

from t3d_jax.data import iterator_state
from t3d_jax.data.pipeline import train_iterator
from t3d_jax.train import checkpoint as ckpt_lib

GLOBAL_BATCH, SAVED_STEP, SEED = 8, 3, 0


def data_config(data_dir, workers: int) -> ml_collections.ConfigDict:
    from test_train_optim import load_config

    c = load_config("t3d.py", "tiny")
    c.data.dir = str(data_dir)
    c.data.worker_count = workers
    return c.data


def manager_for(directory):
    options = ml_collections.ConfigDict({"keep": 3, "every_steps": 1, "async_save": False})
    return ckpt_lib.make_manager(directory, options)


def use_process_layout(monkeypatch, index: int, count: int) -> None:
    """What grain's checkpoint handler and checkpoint.restore see as (process index, count)."""
    monkeypatch.setattr(grain_sharding, "get_process_index_and_count", lambda: (index, count))
    monkeypatch.setattr(ckpt_lib, "_process_layout", lambda: (index, count))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_two_processes_from_a_one_process_checkpoint(
        tiny_prepared_dir, tmp_path, monkeypatch, caplog, workers):
    config = data_config(tiny_prepared_dir, workers)
    state = {"step": jnp.int32(SAVED_STEP), "params": {"w": jnp.arange(12.0).reshape(3, 4)},
             "rng": jax.random.key(7)}
    abstract = jax.eval_shape(lambda: state)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(
            jax.devices()[0])), abstract)

    # One process: read SAVED_STEP batches (one per step, as the loop does), save, and keep
    # the batch that the next step would use.
    one = train_iterator(config, global_batch_size=GLOBAL_BATCH, seed=SEED)
    for _ in range(SAVED_STEP):
        next(one)
    with manager_for(tmp_path / "ckpt") as manager:
        ckpt_lib.save(manager, SAVED_STEP, state, one, force=True)
        manager.wait_until_finished()
    expected_next = next(one)
    data_dir = tmp_path / "ckpt" / str(SAVED_STEP) / ckpt_lib.DATA
    assert [f.name for f in data_dir.glob(iterator_state.STATE_FILE_GLOB)] == ["process_0-of-1.json"]

    # Two processes: each restores the state and continues with its half of that batch.
    half = GLOBAL_BATCH // 2
    for index in range(2):
        use_process_layout(monkeypatch, index, 2)
        mine = train_iterator(config, global_batch_size=GLOBAL_BATCH, seed=SEED,
                              process_index=index, process_count=2)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__), \
                manager_for(tmp_path / "ckpt") as manager:
            restored, step = ckpt_lib.restore_latest(manager, abstract, mine)
        assert step == SAVED_STEP
        np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
        assert int(restored["step"]) == SAVED_STEP
        np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                      jax.random.key_data(state["rng"]))
        assert "saved by another number of processes" in caplog.text
        assert "cannot be restored" not in caplog.text
        assert (tmp_path / "ckpt" / str(SAVED_STEP)).is_dir()  # not moved aside
        got = next(mine)
        rows = slice(index * half, (index + 1) * half)
        for key in ("views", "boxes", "input_ids", "attention_mask", "labels"):
            np.testing.assert_array_equal(got[key], expected_next[key][rows], err_msg=key)


def test_same_process_count_restores_the_saved_iterator_as_before(tiny_prepared_dir, tmp_path, caplog):
    """No fallback when the layout matches: grain's own restore, no warning."""
    config = data_config(tiny_prepared_dir, 0)
    state = {"w": jnp.ones((2,))}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        jax.eval_shape(lambda: state))
    it = train_iterator(config, global_batch_size=GLOBAL_BATCH, seed=SEED)
    next(it)
    with manager_for(tmp_path / "ckpt") as manager:
        ckpt_lib.save(manager, 1, state, it, force=True)
        manager.wait_until_finished()
    expected = next(it)
    again = train_iterator(config, global_batch_size=GLOBAL_BATCH, seed=SEED)
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__), \
            manager_for(tmp_path / "ckpt") as manager:
        _, step = ckpt_lib.restore_latest(manager, abstract, again)
    assert step == 1 and "another number of processes" not in caplog.text
    np.testing.assert_array_equal(next(again)["views"], expected["views"])
