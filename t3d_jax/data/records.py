"""One preprocessed example <-> bytes, the unit stored in ArrayRecord shards.

A record is a flat dict of NumPy arrays serialised with ``np.savez`` (read back with
``allow_pickle=False``, so loading a shard never unpickles anything). Keys:

=====================  ========  ===============================================
key                    dtype     meaning
=====================  ========  ===============================================
``volume``             int16     [X, Y, Z] canonical RAS+ voxel grid, stored units
``intensity_scale``    float32   scalar; model input = volume * scale + offset
``intensity_offset``   float32   scalar
``spacing``            float32   [3] mm per voxel of ``volume`` (x, y, z)
``input_ids``          int32     [L] WordPiece ids of the report ([CLS] ... [SEP], 0-padded)
``attention_mask``     int32     [L] 1 for real tokens
``labels``             float32   [num_labels]; NaN where the manifest had no value
``id``                 str       scalar
``split``              str       scalar
``report``             str       scalar, the raw report text
``source_spacing``     float32   [3] spacing of the file as read (x, y, z, mm)
``source_shape``       int32     [3] shape of the file as read
``source_orientation`` str       scalar, axis codes of the file as read, e.g. "LPS"
=====================  ========  ===============================================

The names of the label columns and the preset live once per dataset in
``DIR/dataset.json``, not in every record.
"""

from __future__ import annotations

import io
import threading
from typing import Any, Mapping

import numpy as np

STRING_KEYS = ("id", "split", "report", "source_orientation")

# np.load parses each member's header with `ast`, which CPython 3.11 does not make safe to
# run from several threads at once (seen as "SystemError: AST constructor recursion depth
# mismatch" under Grain's read threads). Decoding is serialised within a process; worker
# processes still decode in parallel.
_DECODE_LOCK = threading.Lock()


def encode_record(example: Mapping[str, Any]) -> bytes:
    """Serialises a record dict (see module docstring) to bytes."""
    arrays = {}
    for key, value in example.items():
        if key in STRING_KEYS:
            arrays[key] = np.asarray(str(value), dtype=np.str_)
        else:
            arrays[key] = np.asarray(value)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_record`; strings come back as Python ``str``."""
    with _DECODE_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as npz:
        out = {key: npz[key] for key in npz.files}
    for key in STRING_KEYS:
        if key in out:
            out[key] = str(out[key])
    return out
