"""ArrayRecord shards of a prepared dataset folder: writing, and random-access reading for Grain.

Layout of a prepared folder ``DIR`` (written by :mod:`t3d_jax.data.prepare`)::

    DIR/dataset.json                               preset, label names, tokenizer, splits
    DIR/{split}-{i:05d}-of-{n:05d}.array_record    records (t3d_jax.data.records), group_size 1,
                                                   compressed as dataset.json's "records" says
    DIR/errors.jsonl                               one line per rejected input

``dataset.json`` is written last and is the mark of a complete folder; readers refuse a folder
without it. Records are written with ``group_size:1`` so that reading one record decompresses
only that record (Grain's random access; ArrayRecord logs an error for other group sizes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Iterator

from array_record.python import array_record_data_source, array_record_module

from t3d_jax.data.records import decode_record

DATASET_JSON = "dataset.json"
ERRORS_JSONL = "errors.jsonl"
# Compression of the records (riegeli's option names). Readers detect it per chunk, so folders
# written with any of them read the same way. Measured per example in docs/scaling.md ("Views on
# the accelerator"): "zstd:3" (ArrayRecord's default, what folders prepared before this option
# hold), "zstd:1", "uncompressed".
COMPRESSIONS = ("uncompressed", "zstd:1", "zstd:3", "zstd:6", "brotli:6", "snappy")
DEFAULT_COMPRESSION = "zstd:3"
WRITER_OPTIONS = "group_size:1"


def writer_options(compression: str = DEFAULT_COMPRESSION) -> str:
    """ArrayRecord writer options: one record per group (random access) and ``compression``."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown record compression {compression!r}; choose one of {COMPRESSIONS}")
    return f"{WRITER_OPTIONS},{compression}"
SHARD_PATTERN = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.array_record$")


def has_dataset(data_dir: str | os.PathLike | None) -> bool:
    """True when ``data_dir`` is a complete prepared folder (its ``dataset.json`` exists)."""
    return bool(data_dir) and (pathlib.Path(data_dir) / DATASET_JSON).is_file()


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


class RollingShardWriter:
    """Writes one split's records into numbered shards of at most ``shard_size`` records.

    Shards are first written as ``{split}-{i:05d}.part`` inside ``directory`` (a temporary
    folder) because the total count ``n`` in the final names is only known at the end;
    :meth:`finish` renames them to ``{split}-{i:05d}-of-{n:05d}.array_record``.
    """

    def __init__(self, directory: str | os.PathLike, split: str, shard_size: int,
                 compression: str = DEFAULT_COMPRESSION):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = pathlib.Path(directory)
        self.split = split
        self.shard_size = shard_size
        self.options = writer_options(compression)
        self.counts: list[int] = []
        self._writer = None

    def write(self, record: bytes) -> None:
        if self._writer is None or self.counts[-1] >= self.shard_size:
            self._close_current()
            path = self.directory / f"{self.split}-{len(self.counts):05d}.part"
            self._writer = array_record_module.ArrayRecordWriter(str(path), self.options)
            self.counts.append(0)
        self._writer.write(record)
        self.counts[-1] += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> list[str]:
        """Closes the last shard and gives the shards their final names; returns the names."""
        self._close_current()
        n = len(self.counts)
        names = []
        for i in range(n):
            name = shard_name(self.split, i, n)
            os.replace(self.directory / f"{self.split}-{i:05d}.part", self.directory / name)
            names.append(name)
        return names

    @property
    def num_records(self) -> int:
        return sum(self.counts)


@dataclasses.dataclass(frozen=True)
class _FileInstruction:
    """Implements ArrayRecord's ``FileInstruction`` protocol (a whole shard of known size)."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


def read_dataset_json(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a prepared folder; raises if the folder is missing or incomplete."""
    path = pathlib.Path(directory) / DATASET_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; {directory} is not a complete prepared dataset "
            "(run launch/prepare_data.py, which writes dataset.json last)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shard_paths(directory: str | os.PathLike, split: str, meta: dict | None = None) -> list[str]:
    meta = read_dataset_json(directory) if meta is None else meta
    if split not in meta["splits"]:
        raise KeyError(f"{directory}: no split {split!r}; it has {sorted(meta['splits'])}")
    paths = [str(pathlib.Path(directory) / name) for name in meta["splits"][split]["shards"]]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: shard listed in dataset.json is missing")
    return paths


def open_split(directory: str | os.PathLike, split: str) -> array_record_data_source.ArrayRecordDataSource:
    """Random-access source of the split's encoded records (``len``, ``[i]`` -> bytes).

    It is what Grain's ``MapDataset.source`` takes; decode each element with
    :func:`t3d_jax.data.records.decode_record`.
    """
    meta = read_dataset_json(directory)
    paths = shard_paths(directory, split, meta)
    counts = meta["splits"][split].get("shard_records")
    if counts and len(counts) == len(paths):
        # Known per-shard counts spare opening every shard just to count its records.
        paths = [_FileInstruction(filename=p, skip=0, take=c, examples_in_shard=c)
                 for p, c in zip(paths, counts)]
    return array_record_data_source.ArrayRecordDataSource(paths)


def iter_records(directory: str | os.PathLike, split: str) -> Iterator[dict[str, Any]]:
    """Decoded records of a split in stored order (tests, export, inspection)."""
    for path in shard_paths(directory, split):
        reader = array_record_module.ArrayRecordReader(path)
        try:
            for i in range(reader.num_records()):
                yield decode_record(reader.read([i])[0])
        finally:
            reader.close()
