"""Manifests: one row per volume, CSV or JSONL.

Columns / keys:

* ``id`` (required): unique name of the example.
* ``volume`` (required): a NIfTI or NRRD file or a DICOM series folder; relative paths are resolved
  against the manifest's own folder, so a dataset folder can be moved as a whole. Several series
  of one example (planes, contrast phases, slice thicknesses; the ``msvlm`` encoder reads them as
  one sequence): their paths separated by ``;`` in that order (in JSONL also a list of strings),
  e.g. ``volumes/a_axial.nii.gz;volumes/a_venous.nii.gz``. The order is kept: the first is series
  0 (the one every fixed-view task reads), the second series 1, ... A listed series file that does
  not exist, or an empty entry, rejects the row with a reason naming the manifest, its line and
  the entry. Several series need ``preprocess.keep_slices`` (t3d_jax/data/prepare.py).
* ``report`` (required): the report text (findings + impression).
* ``split`` (optional): e.g. train / valid / test; empty or absent means ``train``.
* ``mask`` (optional): a NIfTI or NRRD label map on the volume's grid (segmentation); relative paths are
  resolved like ``volume``; empty means no mask for this row.
* any other column: a label (number; empty, ``nan`` or ``NA`` = unknown). In JSONL, labels may
  also sit in a nested ``"labels": {name: value}`` object.

Reading never stops at a bad row: a row that cannot be used (no id, invalid UTF-8, empty
report, non-numeric label, ...) comes back as a :class:`ManifestRow` with ``error`` set, so the job
logs it and goes on. Only a manifest that cannot be read at all raises :class:`ManifestError`.
Files are decoded with ``surrogateescape`` so one row with invalid UTF-8 is caught per row
instead of spoiling the whole file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import re

from t3d_jax.utils import UserValueError

REQUIRED = ("id", "volume", "report")
RESERVED = ("id", "volume", "report", "split", "mask", "labels")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # split names go into shard file names
_MISSING = {"", "nan", "na", "n/a", "none", "null"}


class ManifestError(UserValueError):
    """The manifest as a whole cannot be read (missing file, unknown format, missing columns)."""


@dataclasses.dataclass
class ManifestRow:
    line: int  # 1-based line in the manifest file (the header is line 1 in CSV)
    id: str | None
    volume: str | None  # absolute path
    report: str | None
    split: str
    labels: dict[str, float]
    error: str | None = None
    mask: str | None = None  # absolute path of the label map, if the row has one
    series: tuple[str, ...] = ()  # absolute paths of every series, in manifest order (series[0] == volume)


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _to_label(value) -> float:
    if value is None or isinstance(value, bool):
        return math.nan if value is None else float(value)
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if text.lower() in _MISSING:
        return math.nan
    if text.lower() in ("true", "false"):
        return float(text.lower() == "true")
    return float(text)  # ValueError for non-numbers, caught by the caller


SERIES_SEPARATOR = ";"


def _series_paths(value, base: pathlib.Path, where: str) -> tuple[list[str], str | None]:
    """(absolute paths of a ``volume`` entry's series, error or None); ``where`` names the row."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(SERIES_SEPARATOR)
    items = [str(v).strip() for v in items]
    if len(items) > 1 and not all(items):
        return [], (f"{where}: the volume list {SERIES_SEPARATOR.join(items)!r} has an empty entry "
                    f"(series {items.index('') + 1} of {len(items)})")
    paths = []
    for item in items:
        if _has_surrogates(item):
            return [], "volume path is not valid UTF-8"
        path = pathlib.Path(os.path.expanduser(item))
        paths.append(str(path if path.is_absolute() else (base / path)))
    if len(paths) > 1:
        for k, path in enumerate(paths):
            if not os.path.exists(path):
                return [], f"{where}: series {k + 1} of {len(paths)} ({items[k]}): {path}: file not found"
    return paths, None


def _make_row(line: int, raw: dict, base: pathlib.Path, name: str = "manifest") -> ManifestRow:
    row = ManifestRow(line=line, id=None, volume=None, report=None, split="train", labels={})
    ident = raw.get("id")
    row.id = None if ident is None else str(ident).strip()
    if row.id is not None and _has_surrogates(row.id):
        row.id = row.id.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        row.error = "id is not valid UTF-8"
        return row
    if not row.id:
        row.id = None
        row.error = "missing id"
        return row
    volume = raw.get("volume")
    if volume is None or not (volume if isinstance(volume, (list, tuple)) else str(volume).strip()):
        row.error = "missing volume path"
        return row
    paths, error = _series_paths(volume, base, f"{name} line {line} (id {row.id!r})")
    if error:
        row.error = error
        return row
    row.volume, row.series = paths[0], tuple(paths)
    mask = raw.get("mask")
    mask = "" if mask is None else str(mask).strip()
    if mask and len(paths) > 1:
        row.error = f"{name} line {line}: a mask with {len(paths)} series (masks are for one-series rows)"
        return row
    if mask:
        if _has_surrogates(mask):
            row.error = "mask path is not valid UTF-8"
            return row
        mpath = pathlib.Path(os.path.expanduser(mask))
        row.mask = str(mpath if mpath.is_absolute() else (base / mpath))
    report = raw.get("report")
    report = "" if report is None else str(report)
    if _has_surrogates(report):
        row.error = "report is not valid UTF-8"
        return row
    if not report.strip():
        row.error = "empty report"
        return row
    row.report = report.strip()
    split = raw.get("split")
    split = "" if split is None else str(split).strip()
    if split:
        if not _SPLIT_NAME.match(split):
            row.error = f"split name {split!r} must be letters, digits or underscores"
            return row
        row.split = split
    label_items = [(k, v) for k, v in raw.items() if k not in RESERVED]
    if isinstance(raw.get("labels"), dict):
        label_items += list(raw["labels"].items())
    for name, value in label_items:
        try:
            row.labels[str(name)] = _to_label(value)
        except (TypeError, ValueError):
            row.error = f"label {name!r} has non-numeric value {value!r}"
            return row
    return row


def read_manifest(path: str | os.PathLike) -> tuple[list[ManifestRow], list[str]]:
    """Reads a CSV (``.csv``/``.tsv``) or JSONL (``.jsonl``/``.json``) manifest.

    Returns the rows in file order and the label names in order of first appearance.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    base = path.resolve().parent
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        text = f.read()
    if text.startswith("\ufeff"):
        text = text[1:]  # Excel's byte-order mark
    rows: list[ManifestRow] = []
    label_names: list[str] = []
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        fields = [name.strip() for name in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in fields]
        if missing:
            raise ManifestError(f"{path}: CSV header {fields} lacks required column(s) {missing}")
        reader.fieldnames = fields
        label_names = [c for c in fields if c not in RESERVED]
        for raw in reader:
            line = reader.line_num
            raw = {k: v for k, v in raw.items() if k is not None}
            rows.append(_make_row(line, raw, base, path.name))
    elif suffix in (".jsonl", ".json", ".ndjson"):
        for line_no, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                if not isinstance(raw, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                bad = ManifestRow(line_no, None, None, None, "train", {}, f"line is not a JSON object: {err}")
                rows.append(bad)
                continue
            row = _make_row(line_no, raw, base, path.name)
            rows.append(row)
            for name in [k for k in raw if k not in RESERVED] + list(
                    raw["labels"] if isinstance(raw.get("labels"), dict) else []):
                if name not in label_names:
                    label_names.append(str(name))
    else:
        raise ManifestError(f"{path}: unknown manifest format {suffix!r}; use .csv, .tsv or .jsonl")
    return rows, label_names
