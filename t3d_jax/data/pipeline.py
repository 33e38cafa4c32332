"""Grain input pipelines over the prepared ArrayRecord shards (launch/prepare_data.py).

Training (infinite, per process)::

    MapDataset.source(ArrayRecordDataSource(split shards))
      -> shuffle(seed)             # reshuffled every epoch (grain folds in the epoch)
      -> repeat()                  # infinite; global index = epoch * n + position
      -> map_with_index(decode + views, rng = f(seed, global index))
      -> batch(global_batch_size // process_count, drop_remainder)
      -> slice[process_index::process_count]   # contiguous blocks of each global batch
      -> to_iter_dataset(ReadOptions) -> mp_prefetch(worker_count)

The random views of an element depend only on (seed, global index), never on the
worker count, the thread count or the process count: the map sits before the
per-process slice (Grain datasets are lazy, so each process still decodes only its own
elements), and batching happens before ``mp_prefetch`` so each worker produces whole
batches that are interleaved back in order. A process's batch ``s`` therefore holds
the global elements ``s*G + process_index*G/P + k`` (G = global batch, P = process count,
k < G/P): the processes' batches, concatenated in process order, are the single-process
global batch, row for row, for any number of processes.

With ``data.views_on = "device"`` the map makes no views: it draws the same random state from
the same (seed, index) generator and ships the stored int16 volume with the boxes, intensity
maps and noise key (:func:`t3d_jax.data.views.device_view_params`); the jitted step makes the
views (:mod:`t3d_jax.data.device_views`). Order, slicing and iterator state are unchanged.

The iterator is a ``grain.DatasetIterator``: ``get_state()``/``set_state()`` give a
JSON-able dict, and ``grain.checkpoint.CheckpointSave/CheckpointRestore`` (Orbax
``CheckpointManager`` args, one ``process_{i}-of-{n}.json`` per process) store it next
to the model state. A state restores into an iterator built with the same config and
seed; the saved state does not depend on the process layout, and its shape depends on the
worker count only through grain's round robin, so a step restores onto another process count
or worker count at the same batch position (`t3d_jax.train.checkpoint`, with the state's
layout from `t3d_jax.data.iterator_state`).

Label fractions (``data.train_fraction`` < 1, ``data.train_subset_seed``): training reads only
a fixed subset of the training split, ``round(fraction * n)`` records (at least 1) drawn by
:func:`train_subset` -- the first k of one seeded permutation, so for one seed the subsets are
nested (1% inside 10% inside 100%) and do not depend on ``train.seed``, the process or worker
count. The subset is the source the shuffle, epochs and iterator state see, so a run resumes
exactly as without one. A subset smaller than the global batch is fine: batching comes after
``repeat()``, so a batch is filled from consecutive epochs (each in a fresh order).

Evaluation is finite and deterministic: records in shard order, the whole volume
resampled to ``view_size``, padded at the end to whole batches (``valid`` False on
padding) so every process runs the same number of steps.

Cached text features (``data.text_features``: True = 'tokens', or 'pooled'; the locked text
tower, `t3d_jax.data.text_features`): both pipelines add each record's row of
``DIR/text_features/{split}.npy`` as ``text_states`` [L, d_t] ('tokens') or ``text_pooled``
[d_t] ('pooled'), float16. The record's position in its split is attached right at the
source (before the shuffle), so the row follows the record whatever the shuffle, workers
or processes; the ``.npy`` is memory-mapped in each worker. A missing or stale cache is a
UserError naming ``launch/cache_text_features.py``.

Slice sequences (``data.slices.enabled``, the `msvlm` task; t3d_jax/data/slices.py): the map
makes no views; each example is the record's series concatenated along z, resampled in-plane
to ``view_size[:2]`` and padded to ``data.slices.length`` slots, with ``slice_valid``,
``series_id`` and ``slice_position`` per slot (random in-plane crop, jitter and noise from the
same (seed, index) generator). Order, slicing and iterator state are unchanged. Fixed-view
paths (training views, evaluation) read series 0 of a multi-series record.

Sentences (``data.sentences``, the `mg3d` task): training examples also carry
``sentence_index`` and ``word_index`` [L] int32, computed from the (augmented) token ids by
`t3d_jax.data.sentences` (at most ``data.max_sentences`` sentences).

Impression view (``data.impression_view``, set by the `clip`, `t3d` and `msvlm` tasks for their
report-impression term, ``loss.impression_weight``):
training examples also carry ``impression_ids`` and ``impression_mask`` [``data.impression_len``,
0 = L] int32, the stored
report's impression section alone (before any sentence drop or shuffle;
`t3d_jax.data.report_augment.impression_span`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import grain
import numpy as np

from t3d_jax.data import shards
from t3d_jax.data import slices as slices_lib
from t3d_jax.data import text_features as text_features_lib
from t3d_jax.data.records import decode_record
from t3d_jax.data.report_augment import ImpressionView, ReportAugment, augment_report, impression_span
from t3d_jax.data.views import VIEWS_ON, ViewOptions, device_view_params, eval_view, make_views
from t3d_jax.utils import cfg_get

DATASET_JSON = shards.DATASET_JSON


# ---------------------------------------------------------------------------------------
# Reading the prepared dataset folder
# ---------------------------------------------------------------------------------------


def read_dataset_info(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks ``DIR/dataset.json`` (splits, shards, label names, tokenizer)."""
    path = pathlib.Path(data_dir) / DATASET_JSON
    try:
        info = shards.read_dataset_json(data_dir)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, dict):
        raise ValueError(f"{path}: missing the 'splits' mapping")
    for name, split in splits.items():
        if not isinstance(split, dict) or "shards" not in split or "num_records" not in split:
            raise ValueError(f"{path}: split {name!r} needs 'shards' and 'num_records'")
    return info


def open_split(data_dir: str | os.PathLike, split: str):
    """Random-access source over a split's shards (:func:`t3d_jax.data.shards.open_split`),
    checked against the record count in dataset.json."""
    info = read_dataset_info(data_dir)
    path = pathlib.Path(data_dir) / DATASET_JSON
    if split in info["splits"] and not info["splits"][split]["shards"]:
        raise ValueError(f"{path}: split {split!r} has no shards")
    source = shards.open_split(data_dir, split)  # names missing splits and shards
    expected = int(info["splits"][split]["num_records"])
    if len(source) != expected:
        raise ValueError(
            f"{data_dir}: split {split!r} shards hold {len(source)} records but dataset.json "
            f"says num_records={expected}")
    if expected == 0:
        raise ValueError(f"{path}: split {split!r} has no records")
    return source


def _decode(data: bytes, what: str) -> dict[str, Any]:
    try:
        return decode_record(data)
    except Exception as e:  # a corrupt record should name itself, not fail deep in NumPy
        raise ValueError(f"cannot decode {what}: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------
# Per-element transforms (module-level classes: they are pickled into worker processes)
# ---------------------------------------------------------------------------------------


class WithPosition(grain.transforms.MapWithIndex):
    """Record bytes -> (position in the split, bytes); applied on the source, before any shuffle.

    Grain hands the source's map the index past the first epoch too (shuffle maps index i of
    epoch e to a position + e * n; the source wraps it), hence the modulo. Over a
    :class:`SubsetSource` the source's index i is record ``positions[i]`` of the split."""

    def __init__(self, num_records: int, positions=None):
        self.num_records = int(num_records)
        self.positions = None if positions is None else np.asarray(positions, np.int64)

    def map_with_index(self, index: int, data: bytes) -> tuple[int, bytes]:
        i = int(index) % self.num_records
        return (i if self.positions is None else int(self.positions[i])), data


def train_subset(num_records: int, fraction: float, seed: int) -> np.ndarray | None:
    """Sorted positions of the training records a label fraction keeps (None: all of them):
    the first ``max(1, round(fraction * num_records))`` of ``default_rng(seed).permutation``,
    so the subsets of one seed are nested."""
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.train_fraction={fraction}: use a fraction in (0, 1]")
    if fraction == 1.0:
        return None
    k = max(1, int(round(fraction * num_records)))
    return np.sort(np.random.default_rng(int(seed)).permutation(num_records)[:k])


class SubsetSource:
    """Random access to the records of ``source`` at ``positions`` (picklable: Grain workers)."""

    def __init__(self, source, positions: np.ndarray):
        self.source = source
        self.positions = np.asarray(positions, np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        return self.source[int(self.positions[int(index)])]


def _train_source(data_config: Any, source):
    """(the source training reads, the split positions it holds or None): ``data.train_fraction``."""
    positions = train_subset(len(source), cfg_get(data_config, "train_fraction", 1.0),
                             cfg_get(data_config, "train_subset_seed", 0))
    return (source, None) if positions is None else (SubsetSource(source, positions), positions)


def train_labels(data_config: Any) -> np.ndarray:
    """float32 [k, L] labels of the training records a run trains on (``data.train_fraction``
    applied), in split order; NaN = unknown."""
    source = open_split(_data_dir(data_config), cfg_get(data_config, "train_split", "train"))
    source, _ = _train_source(data_config, source)
    return np.stack([np.asarray(_decode(source[i], f"training record {i}")["labels"], np.float32)
                     for i in range(len(source))])


class TrainExample(grain.transforms.MapWithIndex):
    """Record bytes -> training example with ``num_views`` random views and their boxes.

    With ``features`` (a :class:`t3d_jax.data.text_features.FeatureReader`) the element is
    ``(position, bytes)`` (:class:`WithPosition`) and the record's cached text features are
    added."""

    def __init__(self, options: ViewOptions, seed: int, features=None, report_aug: ReportAugment | None = None,
                 views_on: str = "host", stored_shape: tuple[int, int, int] | None = None, masks: bool = False,
                 sentences=None, slice_options: slices_lib.SliceOptions | None = None,
                 impression: ImpressionView | None = None):
        self.options = options
        self.impression = impression  # data.impression_view: add the report's impression alone
        self.slice_options = slice_options  # data.slices.enabled: a slice sequence, no views
        if slice_options is not None and (masks or views_on != "host"):
            raise ValueError("data.slices.enabled makes slice sequences on the host: it takes neither data.masks "
                             "nor data.views_on='device'")
        self.sentences = sentences  # data.sentences: a t3d_jax.data.sentences.SentenceIndexer
        self.masks = bool(masks)  # data.masks: add each view's labels (`masks`), cut like the view
        if self.masks and views_on != "host":
            raise ValueError("data.masks needs data.views_on='host': the host cuts the masks with the views' boxes")
        self.seed = int(seed)
        self.features = features
        self.report_aug = report_aug or ReportAugment()
        if views_on not in VIEWS_ON:
            raise ValueError(f"views_on must be one of {VIEWS_ON}, got {views_on!r}")
        self.views_on = views_on
        self.stored_shape = None if stored_shape is None else tuple(int(s) for s in stored_shape)

    def map_with_index(self, index: int, data) -> dict[str, np.ndarray]:
        position = None
        if self.features is not None:
            position, data = data
        record = _decode(data, f"training element {index}")
        # A fresh generator keyed by (seed, global index): independent of who computes it.
        rng = np.random.default_rng((self.seed, int(index)))
        scale, offset = float(record["intensity_scale"]), float(record["intensity_offset"])
        if self.slice_options is not None:
            example = slices_lib.slice_sequence(record, self.slice_options, rng)
        elif self.views_on == "host" and self.masks:
            if "mask" not in record:
                raise ValueError(f"training element {index} (record {record.get('id', '?')!r}) has no mask, but "
                                 "data.masks is on (a segmentation task): give every training row of the "
                                 "manifest a `mask` (docs/data.md, Masks)")
            views, boxes, masks = make_views(record["volume"], scale, offset, rng, self.options, mask=record["mask"])
            example = {"views": views, "boxes": boxes, "masks": masks}
        elif self.views_on == "host":
            views, boxes = make_views(slices_lib.primary_volume(record), scale, offset, rng, self.options)
            example = {"views": views, "boxes": boxes}
        else:  # the accelerator makes the views (t3d_jax.data.device_views)
            volume = slices_lib.primary_volume(record)
            if self.stored_shape is not None and tuple(volume.shape) != self.stored_shape:
                raise ValueError(
                    f"training element {index} (record {record.get('id', '?')!r}) has a stored volume of "
                    f"{tuple(volume.shape)}, not the data's {self.stored_shape}: data.views_on='device' "
                    "batches the stored volumes, so every record needs the preset's grid (re-prepare "
                    "the data, or use data.views_on='host')")
            example = device_view_params(volume, scale, offset, rng, self.options)
        ids, mask = record["input_ids"].astype(np.int32), record["attention_mask"].astype(np.int32)
        if self.impression is not None:  # of the stored report, before any augmentation
            try:
                example["impression_ids"], example["impression_mask"] = impression_span(
                    ids, mask, self.impression, self.impression.length)
            except ValueError as e:
                raise ValueError(f"training element {index} (record {record.get('id', '?')!r}): {e}") from None
        if self.report_aug.active:  # its own stream: views are the same with or without it
            ids, mask = augment_report(ids, mask, np.random.default_rng((self.seed, int(index), 1)),
                                       self.report_aug)
        example.update(input_ids=ids, attention_mask=mask, labels=record["labels"].astype(np.float32))
        if self.sentences is not None:  # after the augmentation: the indices follow the tokens
            example.update(self.sentences(ids, mask))
        if self.features is not None:
            example.update(self.features(position))
        return example


class EvalExample(grain.transforms.Map):
    """Record bytes -> deterministic evaluation example (whole volume at ``view_size``).

    With ``features`` the element is ``(position, bytes)`` and the cached text features are
    added, as in :class:`TrainExample`."""

    def __init__(self, view_size: tuple[int, int, int], features=None):
        self.view_size = tuple(int(s) for s in view_size)
        self.features = features

    def map(self, data) -> dict[str, np.ndarray]:
        position = None
        if self.features is not None:
            position, data = data
        record = _decode(data, "evaluation record")
        volume = eval_view(  # series 0 of a multi-series record
            slices_lib.primary_volume(record), float(record["intensity_scale"]), float(record["intensity_offset"]),
            self.view_size)
        example = {
            "volume": volume,
            "input_ids": record["input_ids"].astype(np.int32),
            "attention_mask": record["attention_mask"].astype(np.int32),
            "labels": record["labels"].astype(np.float32),
            "id": np.asarray(record["id"], dtype=np.str_),
            # The raw report (not its possibly truncated ids): the reference text of report generation.
            "report": np.asarray(record.get("report", ""), dtype=np.str_),
            "valid": np.asarray(True),
        }
        if self.features is not None:
            example.update(self.features(position))
        return example


class PaddingExample(grain.transforms.Map):
    """Index -> an all-zero example shaped like a real one, ``valid`` False (fills the last batch).

    Keeps only shapes and dtypes, so pickling it into workers stays cheap for large views.
    """

    def __init__(self, template: dict[str, np.ndarray]):
        self.specs = {k: (np.shape(v), np.asarray(v).dtype) for k, v in template.items() if k not in ("id", "report", "valid")}

    def map(self, index: int) -> dict[str, np.ndarray]:
        del index
        example = {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.specs.items()}
        example["id"] = np.asarray("", dtype=np.str_)
        example["report"] = np.asarray("", dtype=np.str_)
        example["valid"] = np.asarray(False)
        return example


# ---------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------


def _data_dir(data_config: Any) -> str:
    data_dir = cfg_get(data_config, "dir", "")
    if not data_dir:
        raise ValueError("config.data.dir is empty: set it to a folder written by launch/prepare_data.py "
                         "(e.g. --config.data.dir=PATH)")
    return str(data_dir)


def _text_features(data_config: Any, data_dir: str, split: str):
    """The split's cached-feature reader when ``data.text_features`` is on, else None."""
    keep = text_features_lib.mode(data_config)
    return text_features_lib.open_features(data_dir, split, keep) if keep else None


def _report_augment(data_config: Any, data_dir: str) -> ReportAugment:
    """``data.report_sentence_drop`` / ``data.report_shuffle`` with the "." id of the data's vocab."""
    aug = ReportAugment(drop=float(cfg_get(data_config, "report_sentence_drop", 0.0)),
                        shuffle=bool(cfg_get(data_config, "report_shuffle", False)))
    if not aug.active:
        return aug
    if text_features_lib.mode(data_config):
        raise ValueError("data.report_sentence_drop / data.report_shuffle change the reports, but "
                         "data.text_features feeds cached states of the unchanged ones: turn one off")
    from t3d_jax.data.tokenizer import tokenizer_for_config

    vocab = tokenizer_for_config({"data": {"dir": data_dir}}).vocab
    if "." not in vocab:
        raise ValueError(f"{data_dir}: the data's vocab has no '.' token to split reports into sentences")
    return dataclasses.replace(aug, end_id=vocab.index("."))


def _impression_view(data_config: Any, data_dir: str) -> ImpressionView | None:
    """``data.impression_view``: the header ids of the data's vocab, or None when off."""
    if not cfg_get(data_config, "impression_view", False):
        return None
    if text_features_lib.mode(data_config):
        raise ValueError("data.impression_view embeds each report's impression with the live text tower, "
                         "but data.text_features feeds cached states (a locked tower): turn one off")
    from t3d_jax.data.report_augment import impression_view_for_vocab
    from t3d_jax.data.tokenizer import tokenizer_for_config

    try:
        return impression_view_for_vocab(tokenizer_for_config({"data": {"dir": data_dir}}).vocab,
                                         int(cfg_get(data_config, "impression_len", 0) or 0))
    except ValueError as e:
        raise ValueError(f"{data_dir}: {e}") from None


def _allow_unparsed_absl_flags() -> None:
    """Lets grain start worker processes from scripts that never parse absl flags.

    grain 0.2.18 reads an absl flag (worker profiling) when it starts workers and raises
    ``UnparsedFlagAccessError`` unless flags were parsed (google/grain#1355, fixed
    upstream after 0.2.18). Marking them parsed keeps every default; ``absl.app.run``
    still parses the command line as usual when the trainer uses it.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_iterable(dataset: grain.MapDataset, data_config: Any, worker_count: int | None) -> grain.IterDataset:
    """Threaded read within a process, then ``worker_count`` processes (0 = in-process)."""
    workers = int(cfg_get(data_config, "worker_count", 0) if worker_count is None else worker_count)
    if workers < 0:
        raise ValueError(f"worker_count must be >= 0, got {workers}")
    buffer = max(1, int(cfg_get(data_config, "prefetch_buffer_size", 2)))
    # Elements here are whole batches; one thread per worker process keeps memory at
    # `buffer` batches per process, and in-process mode uses the two-thread default
    # because NumPy's gathers and arithmetic release the GIL.
    threads = int(cfg_get(data_config, "read_threads", 0)) or (1 if workers else 2)
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
    if workers:
        _allow_unparsed_absl_flags()
        iterable = iterable.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer))
    return iterable


def stored_grid(data_config: Any, source=None) -> tuple[int, int, int]:
    """The stored grid every training volume must have when the accelerator makes the views:
    ``data.stored_size`` if set, else the preset's ``size`` in dataset.json, else the first
    record's volume shape."""
    size = tuple(int(s) for s in (cfg_get(data_config, "stored_size", ()) or ()))
    if size:
        return size
    preset = read_dataset_info(_data_dir(data_config)).get("preset") or {}
    if preset.get("size"):
        return tuple(int(s) for s in preset["size"])
    source = source if source is not None else open_split(
        _data_dir(data_config), cfg_get(data_config, "train_split", "train"))
    return tuple(int(s) for s in _decode(source[0], "the first training record")["volume"].shape)


def train_dataset(
    data_config: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int | None = None,
) -> grain.IterDataset:
    """The training pipeline of this process (see module docstring); infinite."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of process_count {process_count}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    options = ViewOptions.from_config(data_config)
    report_aug = _report_augment(data_config, _data_dir(data_config))
    impression = _impression_view(data_config, _data_dir(data_config))
    split = cfg_get(data_config, "train_split", "train")
    source = open_split(_data_dir(data_config), split)
    features = _text_features(data_config, _data_dir(data_config), split)
    views_on = str(cfg_get(data_config, "views_on", "host") or "host")
    stored_shape = stored_grid(data_config, source) if views_on == "device" else None
    source, positions = _train_source(data_config, source)  # data.train_fraction: a fixed subset
    ds = grain.MapDataset.source(source)
    if features is not None:
        ds = ds.map_with_index(WithPosition(len(source), positions))
    ds = ds.shuffle(seed=seed).repeat()
    sentences = None
    if cfg_get(data_config, "sentences", False):  # sentence_index / word_index (the mg3d task)
        from t3d_jax.data.sentences import indexer_for_data

        sentences = indexer_for_data(_data_dir(data_config), int(cfg_get(data_config, "max_sentences", 32)))
    slice_options = slices_lib.SliceOptions.from_config(data_config) if slices_lib.enabled(data_config) else None
    ds = ds.map_with_index(TrainExample(options, seed, features, report_aug, views_on, stored_shape,
                                        masks=bool(cfg_get(data_config, "masks", False)), sentences=sentences,
                                        slice_options=slice_options,
                                        impression=impression))
    # Blocks of G/P consecutive elements, block s*P + p to process p: each process holds a
    # contiguous slice of every global batch, the layout make_array_from_process_local_data
    # assembles, so the global batch (row order included) is the same for any process count.
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    ds = ds.slice(slice(process_index, None, process_count))
    return _to_iterable(ds, data_config, worker_count)


def train_iterator(
    data_config: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int | None = None,
) -> grain.DatasetIterator:
    """Iterator of this process's training batches (NumPy dicts, see the batch contract).

    ``process_index``/``process_count`` default to one process; the trainer passes
    ``jax.process_index()``/``jax.process_count()``.
    """
    return iter(train_dataset(
        data_config, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
        process_count=process_count, worker_count=worker_count))


def eval_dataset(
    data_config: Any,
    split: str,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int | None = None,
) -> grain.IterDataset:
    """Finite, deterministic evaluation batches of ``batch_size`` for this process."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    view_size = tuple(cfg_get(data_config, "view_size", ViewOptions().view_size))
    source = open_split(_data_dir(data_config), split)
    features = _text_features(data_config, _data_dir(data_config), split)
    to_example = EvalExample(view_size, features)
    ds = grain.MapDataset.source(source)
    if features is not None:
        ds = ds.map_with_index(WithPosition(len(source)))
    ds = ds.map(to_example)
    per_step = batch_size * process_count
    padding = math.ceil(len(source) / per_step) * per_step - len(source)
    if padding:
        template = to_example.map((0, source[0]) if features is not None else source[0])
        pad = grain.MapDataset.range(padding).map(PaddingExample(template))
        ds = grain.MapDataset.concatenate([ds, pad])
    ds = ds.slice(slice(process_index, None, process_count))
    ds = ds.batch(batch_size, drop_remainder=False)
    return _to_iterable(ds, data_config, worker_count)


def eval_iterator(
    data_config: Any,
    split: str,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int | None = None,
) -> grain.DatasetIterator:
    """Iterator over every record of ``split`` once; ``batch['valid']`` marks real rows."""
    return iter(eval_dataset(
        data_config, split, batch_size, process_index=process_index, process_count=process_count,
        worker_count=worker_count))
