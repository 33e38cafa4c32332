"""Resuming with another `data.worker_count` (t3d_jax.train.checkpoint.restore, with grain's
state layout from t3d_jax.data.iterator_state).

The checkpoint's data item is the Grain iterator state, whose shape depends on the number of
read-worker processes (0: in-process, N: grain's round robin over N workers). Saved with one
worker count and restored into an iterator built with another, the train state must come
back, the step must stay where it is (not moved aside as unreadable), a warning must name
both worker counts, and the next batches must be exactly the ones the saving run would have
read next. A saved position that cannot be converted is a clear error naming the checkpoint,
both worker counts and the fix, again without moving anything aside.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint_layout import data_config, manager_for, use_process_layout

from t3d_jax.data import iterator_state
from t3d_jax.data.pipeline import train_iterator
from t3d_jax.train import checkpoint as ckpt_lib

# An odd step, so that with 2 workers the next batch comes from worker 1 (mid-cycle).
GLOBAL_BATCH, SAVED_STEP, SEED, NEXT_BATCHES = 8, 3, 0, 3
KEYS = ("views", "boxes", "input_ids", "attention_mask", "labels")


def train_state():
    state = {"step": jnp.int32(SAVED_STEP), "params": {"w": jnp.arange(12.0).reshape(3, 4)},
             "rng": jax.random.key(7)}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            jax.eval_shape(lambda: state))
    return state, abstract


def save_after_steps(config, directory, state):
    """Reads SAVED_STEP batches (one per step), saves, and returns the next NEXT_BATCHES
    batches of the same, uninterrupted iterator."""
    it = train_iterator(config, global_batch_size=GLOBAL_BATCH, seed=SEED)
    for _ in range(SAVED_STEP):
        next(it)
    with manager_for(directory) as manager:
        ckpt_lib.save(manager, SAVED_STEP, state, it, force=True)
        manager.wait_until_finished()
    return [next(it) for _ in range(NEXT_BATCHES)]


def assert_step_in_place(directory):
    assert (directory / str(SAVED_STEP)).is_dir()
    assert not [p.name for p in directory.iterdir() if "unreadable" in p.name]


@pytest.mark.parametrize("old_workers,new_workers", [(0, 2), (2, 0)])
def test_resume_with_another_worker_count_continues_the_same_batches(
        tiny_prepared_dir, tmp_path, caplog, old_workers, new_workers):
    state, abstract = train_state()
    ckpt_dir = tmp_path / "ckpt"
    expected = save_after_steps(data_config(tiny_prepared_dir, old_workers), ckpt_dir, state)
    saved = iterator_state.read_state(
        ckpt_dir / str(SAVED_STEP) / ckpt_lib.DATA / iterator_state.state_file_name(0, 1))
    assert iterator_state.reader_worker_count(saved) == old_workers  # the two state shapes
    assert iterator_state.batches_read(saved) == SAVED_STEP

    resumed = train_iterator(data_config(tiny_prepared_dir, new_workers),
                             global_batch_size=GLOBAL_BATCH, seed=SEED)
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__), manager_for(ckpt_dir) as manager:
        restored, step = ckpt_lib.restore_latest(manager, abstract, resumed)

    assert step == SAVED_STEP and int(restored["step"]) == SAVED_STEP
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))
    assert f"data.worker_count={old_workers}" in caplog.text
    assert f"data.worker_count={new_workers}" in caplog.text
    assert "cannot be restored" not in caplog.text
    assert_step_in_place(ckpt_dir)
    for n, want in enumerate(expected):
        got = next(resumed)
        for key in KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"batch {SAVED_STEP + n} {key}")


def test_worker_and_process_count_both_changed(tiny_prepared_dir, tmp_path, monkeypatch, caplog):
    """1 process, in-process reading -> process 1 of 2 with 2 read workers: its half of the
    global batches after the restored step."""
    state, abstract = train_state()
    ckpt_dir = tmp_path / "ckpt"
    expected = save_after_steps(data_config(tiny_prepared_dir, 0), ckpt_dir, state)

    use_process_layout(monkeypatch, 1, 2)
    resumed = train_iterator(data_config(tiny_prepared_dir, 2), global_batch_size=GLOBAL_BATCH,
                             seed=SEED, process_index=1, process_count=2)
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__), manager_for(ckpt_dir) as manager:
        _, step = ckpt_lib.restore_latest(manager, abstract, resumed)
    assert step == SAVED_STEP
    assert "another number of processes" in caplog.text and "data.worker_count=2" in caplog.text
    assert_step_in_place(ckpt_dir)
    rows = slice(GLOBAL_BATCH // 2, GLOBAL_BATCH)
    for n, want in enumerate(expected[:2]):
        got = next(resumed)
        for key in KEYS:
            np.testing.assert_array_equal(got[key], want[key][rows], err_msg=f"batch {SAVED_STEP + n} {key}")


def test_unconvertible_position_is_a_clear_error_and_moves_nothing(tiny_prepared_dir, tmp_path):
    """A 2-worker state that is not grain's round robin (an exhausted worker) has no single
    batch position: restore_latest names the checkpoint, both counts and the fix, and leaves
    the step (and the older one) where they are instead of falling back or moving them."""
    state, abstract = train_state()
    ckpt_dir = tmp_path / "ckpt"
    config = data_config(tiny_prepared_dir, 0)
    it = train_iterator(config, global_batch_size=GLOBAL_BATCH, seed=SEED)
    with manager_for(ckpt_dir) as manager:
        for step in (SAVED_STEP - 1, SAVED_STEP):
            ckpt_lib.save(manager, step, state, it, force=True)
        manager.wait_until_finished()
    data_file = ckpt_dir / str(SAVED_STEP) / ckpt_lib.DATA / iterator_state.state_file_name(0, 1)
    data_file.write_text(json.dumps({
        "next_index_in_cycle": 1, "next_index_in_datasets": 2, "iterators_in_use_indices": [0, 1],
        "iterators_in_use_states": [{"next_index": 2}, {"next_index": 1}], "exhausted": [1, 0],
        "future_states": {}}))

    resumed = train_iterator(config, global_batch_size=GLOBAL_BATCH, seed=SEED)
    with manager_for(ckpt_dir) as manager, pytest.raises(ckpt_lib.DataPositionError) as error:
        ckpt_lib.restore_latest(manager, abstract, resumed)
    message = str(error.value)
    assert str(ckpt_dir) in message and f"step {SAVED_STEP}" in message
    assert "data.worker_count=2" in message and "data.worker_count=0" in message
    assert "--config.data.worker_count=2" in message
    assert_step_in_place(ckpt_dir)
    assert (ckpt_dir / str(SAVED_STEP - 1)).is_dir()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_round_robin_positions_convert_both_ways(workers):
    """k batches -> the state of an N-worker iterator (grain 0.2.18's shape; the real saved
    states are checked in the first test) -> k, worker i having returned batches i, i+N, ...;
    a state that is not a round-robin position is refused."""
    template = {"next_index_in_cycle": 0, "next_index_in_datasets": workers,
                "iterators_in_use_indices": list(range(workers)),
                "iterators_in_use_states": [{"next_index": 0}] * workers,
                "exhausted": [0] * workers, "future_states": {}}
    assert iterator_state.reader_worker_count(template) == workers
    assert iterator_state.reader_worker_count({"next_index": 5}) == 0
    for k in range(3 * workers + 2):
        state = iterator_state.iterator_state_at(template, k)
        assert iterator_state.batches_read(state) == k
        assert [s["next_index"] for s in state["iterators_in_use_states"]] == [
            len(range(i, k, workers)) for i in range(workers)]  # worker i returned batches i, i+N, ...
        assert state["next_index_in_cycle"] == k % workers
        assert iterator_state.iterator_state_at({"next_index": 0}, k) == {"next_index": k}
    if workers > 1:
        skewed = iterator_state.iterator_state_at(template, 2 * workers)
        skewed["iterators_in_use_states"][0] = {"next_index": 0}
        assert iterator_state.batches_read(skewed) is None
