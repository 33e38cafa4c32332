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
``mask``               uint8 or  [X, Y, Z] class indices on ``volume``'s grid; only in
                       int16     records whose manifest row has a mask (dataset.json
                                 ``masks``: dtype, class table)
``series_slices``      int32     [S] slices of each series in ``volume``, which then
                                 holds the S series concatenated along z; only in
                                 records prepared with ``keep_slices``
``source``             str       scalar, the series' files, ``;``-separated (with
                                 ``series_slices``)
=====================  ========  ===============================================

The names of the label columns and the preset live once per dataset in
``DIR/dataset.json``, not in every record.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import zipfile
from typing import Any, Mapping

import numpy as np

STRING_KEYS = ("id", "split", "report", "source_orientation", "source")

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
    """Inverse of :func:`encode_record`; strings come back as Python ``str``.

    The arrays are read-only views into ``data`` (no copy): the members of a record are stored
    uncompressed (``np.savez``), so each array is located from the zip directory and its ``.npy``
    header and wrapped with ``np.frombuffer``. The zip's CRC-32 is not recomputed (``np.load``
    does, which at ``ct_clip`` size cost most of the decode time); ArrayRecord already checks each
    chunk it reads with its own hash. Anything but stored members (a compressed ``.npz``) falls back
    to ``np.load``."""
    try:
        out = _decode_stored(data)
    except _NotStored:
        with _DECODE_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as npz:
            out = {key: npz[key] for key in npz.files}
    for key in STRING_KEYS:
        if key in out:
            out[key] = str(out[key])
    return out


class _NotStored(Exception):
    """The record is not a zip of uncompressed .npy members (decode it with np.load)."""


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header, 30 bytes


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
# The header np.save writes for a plain array: {'descr': '<i2', 'fortran_order': False, 'shape': (4, 5), }
_SIMPLE_HEADER = re.compile(r"\{'descr': '([<>|=][A-Za-z]\d*)', 'fortran_order': (True|False), "
                            r"'shape': \(((?:\d+, ?)*\d*)\), \}\s*$")


def _npy_header(view: memoryview, start: int, name: str):
    """(shape, fortran order, dtype, header bytes) of the .npy member at ``start``.

    A plain array's header (every member :func:`encode_record` writes) is read with a regular
    expression; anything else with NumPy's reader, which parses the header with `ast` and so
    holds ``_DECODE_LOCK``."""
    magic = bytes(view[start:start + 8])
    if magic[:6] != b"\x93NUMPY" or (magic[6], magic[7]) not in _HEADER_READERS:
        raise _NotStored(name)
    size_bytes = 2 if magic[6] == 1 else 4
    length = int.from_bytes(view[start + 8:start + 8 + size_bytes], "little")
    header_size = 8 + size_bytes + length
    match = _SIMPLE_HEADER.match(bytes(view[start + 8 + size_bytes:start + header_size]).decode("latin1"))
    if match:
        shape = tuple(int(n) for n in match.group(3).replace(" ", "").split(",") if n)
        return shape, match.group(2) == "True", np.dtype(match.group(1)), header_size
    member = io.BytesIO(view[start:start + header_size])
    with _DECODE_LOCK:
        version = np.lib.format.read_magic(member)
        shape, fortran, dtype = _HEADER_READERS[version](member)
    return shape, fortran, dtype, header_size


def _decode_stored(data: bytes) -> dict[str, np.ndarray]:
    view = memoryview(data)
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:  # reads only the central directory
        infos = archive.infolist()
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
            raise _NotStored(info.filename)
        fields = _LOCAL_HEADER.unpack_from(view, info.header_offset)
        if fields[0] != b"PK\x03\x04":
            raise _NotStored(info.filename)
        start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        shape, fortran, dtype, header_size = _npy_header(view, start, info.filename)
        if dtype.hasobject:
            raise ValueError(f"record member {info.filename} holds Python objects; refusing to load it")
        count = int(np.prod(shape, dtype=np.int64))
        offset = start + header_size
        if offset + count * dtype.itemsize > start + info.file_size:
            raise ValueError(f"record member {info.filename} is shorter than its header says")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        out[info.filename[:-4]] = array.reshape(shape, order="F" if fortran else "C")
    return out
