"""What a checkpoint needs to know about the saved state of a training iterator.

`t3d_jax.data.pipeline.train_iterator` returns a Grain iterator whose `get_state()` is a JSON
dict, and grain's checkpoint handler writes it as one file per process. A resume with another
process count or another `data.worker_count` has to read those files and move an iterator
state to a batch position itself (`t3d_jax.train.checkpoint`). Everything that depends on
how grain names the files and lays out the state dict is here, next to the pipeline that
builds the iterator, so a grain upgrade is checked in one module (tests/test_resume_worker_count.py
reads real saved states against it).

grain 0.2.18, as `pipeline._to_iterable` builds the iterator (read in
.venv/.../grain/_src/python/dataset/transformations/{prefetch,process_prefetch,interleave}.py
and grain/_src/python/checkpoint/handler.py):

  files: `process_{i}-of-{n}.json` in the checkpoint item's folder, one per process.
  worker_count 0: PrefetchDatasetIterator over this process's batch sequence,
      state {"next_index": k} = batches returned so far;
  worker_count N: mp_prefetch = InterleaveDatasetIterator (cycle N) over N process-prefetch
      iterators, worker i reading the slice [i::N] of the same batch sequence, state
      {"next_index_in_cycle", "next_index_in_datasets", "iterators_in_use_indices",
       "iterators_in_use_states": [{"next_index": j_i}] * N, "exhausted", "future_states"}.
      The interleave takes one element from each worker in turn, so after k batches worker i
      has returned j_i = len(range(i, k, N)) and the cycle is at k % N.

The batches themselves do not depend on the worker count or the process count (see the
pipeline's docstring), which is what makes a position saved under one layout valid under
another.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

STATE_FILE_GLOB = "process_*-of-*.json"


def state_file_name(process_index: int, process_count: int) -> str:
    """The file grain's checkpoint handler writes for one process's iterator state."""
    return f"process_{int(process_index)}-of-{int(process_count)}.json"


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """One saved iterator state (raises OSError / ValueError when missing or damaged)."""
    return json.loads(epath.Path(path).read_text())


def files_of_other_layout(item_dir: str | os.PathLike, process_index: int,
                          process_count: int) -> list[epath.Path]:
    """The state files in `item_dir` when they were written by another number of processes
    (this process's own file is absent), sorted by name; [] otherwise."""
    item_dir = epath.Path(item_dir)
    if not item_dir.exists() or (item_dir / state_file_name(process_index, process_count)).exists():
        return []
    return sorted(item_dir.glob(STATE_FILE_GLOB))


def reader_worker_count(state) -> int | None:
    """The read-worker count whose iterator has this state's shape (0 = in-process); None
    for a shape this module does not know."""
    def position(s):
        return isinstance(s, dict) and set(s) == {"next_index"} and isinstance(s["next_index"], int)

    if position(state):
        return 0
    inner = state.get("iterators_in_use_states") if isinstance(state, dict) else None
    if (isinstance(inner, list) and inner and all(position(s) for s in inner)
            and {"next_index_in_cycle", "next_index_in_datasets", "iterators_in_use_indices",
                 "exhausted"} <= set(state)):
        return len(inner)
    return None


def batches_read(state) -> int | None:
    """How many batches the iterator had returned, or None if the state is not exactly a
    round-robin position (e.g. an exhausted worker), so no single position is proven."""
    workers = reader_worker_count(state)
    if workers is None:
        return None
    if workers == 0:
        return state["next_index"]
    k = sum(s["next_index"] for s in state["iterators_in_use_states"])
    return k if state == iterator_state_at(state, k) else None


def iterator_state_at(template, k: int):
    """`template` (a state of the target iterator, any position) moved to k batches read."""
    workers = reader_worker_count(template)
    if workers == 0:
        return {**template, "next_index": int(k)}
    state = {**template,
             "next_index_in_cycle": k % workers,
             "next_index_in_datasets": workers,
             "iterators_in_use_indices": list(range(workers)),
             "iterators_in_use_states": [{**s, "next_index": len(range(i, k, workers))}
                                         for i, s in enumerate(template["iterators_in_use_states"])],
             "exhausted": [0] * workers}
    if "future_states" in template:  # elastic-resize states; none for a plain round robin
        state["future_states"] = {}
    return state
