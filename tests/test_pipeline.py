"""Grain pipeline over tiny ArrayRecord shards written here: batch contract, determinism,
worker-count independence, per-process slicing, iterator resume, evaluation coverage."""

from __future__ import annotations

import json
import pathlib

import grain
import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from t3d_jax.data import pipeline
from t3d_jax.data.records import decode_record, encode_record
from t3d_jax.data.views import eval_view

SHAPE = (24, 24, 16)
MAX_LEN = 8
NUM_LABELS = 18
SPLITS = {"train": (4, 3), "valid": (3, 2)}  # records per shard
SCALE, OFFSET = 1.0 / 1000.0, 0.0


def _record(k: int, split: str, rng: np.random.Generator) -> dict:
    labels = rng.integers(0, 2, NUM_LABELS).astype(np.float32)
    labels[k % NUM_LABELS] = np.nan  # unknown labels travel as NaN
    ids = np.zeros(MAX_LEN, np.int32)
    ids[:3] = (101, 1000 + k, 102)  # token 1 names the record
    return {
        "volume": rng.integers(-1000, 1000, SHAPE).astype(np.int16),
        "intensity_scale": np.float32(SCALE),
        "intensity_offset": np.float32(OFFSET),
        "spacing": np.ones(3, np.float32),
        "input_ids": ids,
        "attention_mask": (ids > 0).astype(np.int32),
        "labels": labels,
        "id": f"{split}-{k}",
        "split": split,
        "report": f"report {k}",
        "source_spacing": np.ones(3, np.float32),
        "source_shape": np.array(SHAPE, np.int32),
        "source_orientation": "RAS",
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    info = {"preset": {"name": "test"}, "label_names": [f"l{i}" for i in range(NUM_LABELS)],
            "tokenizer": {"max_len": MAX_LEN}, "splits": {}}
    for split, per_shard in SPLITS.items():
        names, k = [], 0
        for i, count in enumerate(per_shard):
            name = f"{split}-{i:05d}-of-{len(per_shard):05d}.array_record"
            writer = ArrayRecordWriter(str(root / name), "group_size:1")
            for _ in range(count):
                writer.write(encode_record(_record(k, split, rng)))
                k += 1
            writer.close()
            names.append(name)
        info["splits"][split] = {"num_records": k, "shards": names}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def _config(data_dir, **overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        dir=str(data_dir), train_split="train", eval_split="valid", num_views=2, view_size=(12, 12, 8),
        crop_min=0.5, crop_max=1.0, intensity_jitter=0.05, noise_std=0.02, flip_lr=False,
        worker_count=0, prefetch_buffer_size=2))
    c.update(overrides)
    return c


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _record_of(batch) -> list[int]:
    return [int(t) - 1000 for t in batch["input_ids"][:, 1]]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_read_dataset_info_and_bad_folders(data_dir, tmp_path):
    info = pipeline.read_dataset_info(data_dir)
    assert info["splits"]["train"]["num_records"] == 7
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        pipeline.read_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        pipeline.read_dataset_info(tmp_path)
    bad = json.loads((data_dir / "dataset.json").read_text())
    bad["splits"]["train"]["num_records"] = 8
    for name in bad["splits"]["train"]["shards"]:
        (tmp_path / name).write_bytes((data_dir / name).read_bytes())
    (tmp_path / "dataset.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="num_records=8"):
        pipeline.open_split(tmp_path, "train")
    with pytest.raises(KeyError, match="no split 'test'"):
        pipeline.open_split(tmp_path, "test")
    bad["splits"]["train"]["shards"].append("train-00009-of-00009.array_record")
    (tmp_path / "dataset.json").write_text(json.dumps(bad))
    with pytest.raises(FileNotFoundError, match="train-00009"):
        pipeline.open_split(tmp_path, "train")


def test_train_batches_follow_the_contract_and_match_the_records(data_dir):
    it = pipeline.train_iterator(_config(data_dir), global_batch_size=3, seed=0)
    batch = next(it)
    expected = {"views": ((3, 2, 12, 12, 8, 1), np.float32), "boxes": ((3, 2, 2, 3), np.float32),
                "input_ids": ((3, MAX_LEN), np.int32), "attention_mask": ((3, MAX_LEN), np.int32),
                "labels": ((3, NUM_LABELS), np.float32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    source = pipeline.open_split(data_dir, "train")
    for row, k in enumerate(_record_of(batch)):
        record = decode_record(source[k])
        np.testing.assert_array_equal(batch["labels"][row], record["labels"])  # NaN == NaN here
        np.testing.assert_array_equal(batch["attention_mask"][row], record["attention_mask"])
        boxes = batch["boxes"][row]
        assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] <= 1)
        extent = boxes[:, 1] - boxes[:, 0]
        assert np.all(extent >= 0.5 - 1e-6)
        # Views are in model units: stored values (|v| < 1000) * 1e-3, jitter 5%, noise 0.02.
        assert np.abs(batch["views"][row]).max() < 1.0 * 1.05 + 0.05 + 0.2


def test_shuffle_repeat_is_seeded_and_each_epoch_is_a_permutation(data_dir):
    config = _config(data_dir)
    first = _take(pipeline.train_iterator(config, global_batch_size=7, seed=3), 3)
    again = _take(pipeline.train_iterator(config, global_batch_size=7, seed=3), 3)
    other = _take(pipeline.train_iterator(config, global_batch_size=7, seed=4), 3)
    _assert_same_batches(first, again)
    epochs = [_record_of(b) for b in first]
    for order in epochs:  # batch size == dataset size: one batch per epoch
        assert sorted(order) == list(range(7))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled per epoch
    assert [_record_of(b) for b in other] != epochs
    # The same record in two epochs gets new random views.
    k = epochs[0][0]
    row0, row1 = epochs[0].index(k), epochs[1].index(k)
    assert not np.array_equal(first[0]["boxes"][row0], first[1]["boxes"][row1])


def test_process_slices_are_disjoint_and_recompose_the_global_batch(data_dir):
    config = _config(data_dir)
    whole = _take(pipeline.train_iterator(config, global_batch_size=4, seed=5), 4)
    parts = [_take(pipeline.train_iterator(config, global_batch_size=4, seed=5, process_index=p,
                                           process_count=2), 4) for p in range(2)]
    for step in range(4):
        a, b = parts[0][step], parts[1][step]
        assert a["views"].shape[0] == 2 and b["views"].shape[0] == 2
        # process p holds the contiguous global elements 2p, 2p + 1 of the step
        for key in whole[step]:
            recomposed = np.concatenate([a[key], b[key]])
            np.testing.assert_array_equal(recomposed, whole[step][key], err_msg=key)
    seen = [k for step in range(2) for p in range(2) for k in _record_of(parts[p][step])]
    first_epoch = seen[:7]  # 8 global elements: one epoch of 7 and one of the next
    assert sorted(first_epoch) == list(range(7))
    with pytest.raises(ValueError, match="multiple of process_count"):
        pipeline.train_iterator(config, global_batch_size=3, seed=0, process_index=0, process_count=2)


def test_resume_from_saved_state_across_an_epoch_boundary(data_dir, tmp_path):
    config = _config(data_dir)
    # 7 records, batch 2: batch 3 straddles epochs 0 and 1, batches 4-6 cross into epoch 2.
    it = pipeline.train_iterator(config, global_batch_size=2, seed=9)
    _take(it, 2)
    state = it.get_state()
    json.dumps(state)  # goes into a checkpoint as JSON
    handler = grain.checkpoint.CheckpointHandler()  # what Orbax's CheckpointManager calls
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
    uninterrupted = _take(it, 6)

    restored = pipeline.train_iterator(config, global_batch_size=2, seed=9)
    restored.set_state(state)
    _assert_same_batches(_take(restored, 6), uninterrupted)

    from_disk = pipeline.train_iterator(config, global_batch_size=2, seed=9)
    handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(from_disk))
    _assert_same_batches(_take(from_disk, 6), uninterrupted)


def test_worker_processes_give_the_same_batches_and_resume(data_dir):
    """0 vs 2 worker processes: identical batches (views keyed by seed and index only);
    a 2-worker iterator restored from a saved state continues exactly."""
    config = _config(data_dir)
    in_process = _take(pipeline.train_iterator(config, global_batch_size=2, seed=1, worker_count=0), 7)
    workers = pipeline.train_iterator(config, global_batch_size=2, seed=1, worker_count=2)
    try:
        got = _take(workers, 3)
        state = workers.get_state()
        got += _take(workers, 4)
    finally:
        workers.close()
    _assert_same_batches(got, in_process)
    restored = pipeline.train_iterator(config, global_batch_size=2, seed=1, worker_count=2)
    try:
        restored.set_state(state)
        _assert_same_batches(_take(restored, 4), in_process[3:])
    finally:
        restored.close()


def test_eval_iterator_covers_every_record_once_with_a_valid_mask(data_dir):
    config = _config(data_dir)
    source = pipeline.open_split(data_dir, "valid")
    batches = list(pipeline.eval_iterator(config, "valid", 2))
    assert len(batches) == 3  # 5 records -> 2 + 2 + 1 real rows, last batch padded
    assert [b["valid"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
    batch = batches[0]
    assert batch["volume"].shape == (2, 12, 12, 8, 1) and batch["volume"].dtype == np.float32
    assert batch["input_ids"].dtype == np.int32 and batch["labels"].dtype == np.float32
    assert batch["id"].dtype.kind == "U" and batch["valid"].dtype == np.bool_
    ids = [i for b in batches for i, v in zip(b["id"], b["valid"]) if v]
    assert ids == [f"valid-{k}" for k in range(5)]
    for b in batches:
        for row in np.flatnonzero(b["valid"]):
            record = decode_record(source[int(b["input_ids"][row, 1]) - 1000])
            np.testing.assert_array_equal(b["volume"][row], eval_view(record["volume"], SCALE, OFFSET, (12, 12, 8)))
            assert b["report"][row] == record["report"]  # the raw text, the reference of report generation
        for row in np.flatnonzero(~b["valid"]):
            assert b["id"][row] == "" and b["report"][row] == "" and not b["volume"][row].any() and not b["attention_mask"][row].any()
    _assert_same_batches(batches, list(pipeline.eval_iterator(config, "valid", 2)))  # deterministic

    # Two processes: equal step counts, disjoint valid rows that together cover the split.
    per_process = [list(pipeline.eval_iterator(config, "valid", 2, process_index=p, process_count=2))
                   for p in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == 2
    ids = [i for batches in per_process for b in batches for i, v in zip(b["id"], b["valid"]) if v]
    assert sorted(ids) == [f"valid-{k}" for k in range(5)]


def test_missing_data_dir_is_a_clear_error(data_dir):
    with pytest.raises(ValueError, match="config.data.dir is empty"):
        pipeline.train_iterator(_config(""), global_batch_size=2, seed=0)
    plain = dict(_config(data_dir))  # a plain dict works as well as a ConfigDict
    batch = next(pipeline.eval_iterator(plain, "valid", 2))
    assert batch["volume"].shape == (2, 12, 12, 8, 1)


def test_report_augmentation_leaves_views_alone_and_refuses_cached_text(data_dir):
    """data.report_sentence_drop / report_shuffle draw from their own stream: the views and
    labels of every batch are those of the plain pipeline, and the result is seeded. (The
    fixture's reports are one sentence, so the ids stay too; tests/test_report_augment.py
    covers the sentence logic.)"""
    plain = _take(pipeline.train_iterator(_config(data_dir), global_batch_size=3, seed=5), 2)
    config = _config(data_dir, report_sentence_drop=0.5, report_shuffle=True)
    aug = _take(pipeline.train_iterator(config, global_batch_size=3, seed=5), 2)
    _assert_same_batches(plain, aug)
    with pytest.raises(ValueError, match="text_features"):
        pipeline.train_iterator(_config(data_dir, report_shuffle=True, text_features=True),
                                global_batch_size=3, seed=5)


def test_impression_view_is_taken_from_the_stored_report_before_augmentation(data_dir):
    """data.impression_view adds impression_ids / impression_mask from the stored ids (the
    fixture's one-token reports have no impression header, so they are the reports as stored,
    even with sentences shuffled); the views are those of the plain pipeline; cached text
    features are refused."""
    plain = _take(pipeline.train_iterator(_config(data_dir), global_batch_size=3, seed=5), 2)
    config = _config(data_dir, impression_view=True, report_sentence_drop=0.5, report_shuffle=True)
    got = _take(pipeline.train_iterator(config, global_batch_size=3, seed=5), 2)
    for a, b in zip(plain, got):
        np.testing.assert_array_equal(a["views"], b["views"])
        np.testing.assert_array_equal(b["impression_ids"], a["input_ids"])
        np.testing.assert_array_equal(b["impression_mask"], a["attention_mask"])
    with pytest.raises(ValueError, match="impression_view"):
        pipeline.train_iterator(_config(data_dir, impression_view=True, text_features=True),
                                global_batch_size=3, seed=5)

    # A report with sections, through the map function itself: the sentences of input_ids are
    # dropped and shuffled, the impression view is still the stored report's impression.
    from t3d_jax.data.prepare import default_vocab_path
    from t3d_jax.data.report_augment import ReportAugment, impression_span, impression_view_for_vocab
    from t3d_jax.data.tokenizer import WordPieceTokenizer
    from t3d_jax.data.views import ViewOptions

    tok = WordPieceTokenizer(str(default_vocab_path()), max_len=48, report_order="impression_first",
                             backend="tokenizers")
    ids, mask = (np.asarray(a)[0].astype(np.int32) for a in tok.encode(
        ["FINDINGS: No effusion. The heart is enlarged. Mild emphysema. IMPRESSION: Cardiomegaly, emphysema."]))
    record = dict(_record(0, "train", np.random.default_rng(0)), input_ids=ids, attention_mask=mask)
    view = impression_view_for_vocab(tok.vocab)
    example = pipeline.TrainExample(ViewOptions.from_config(_config(data_dir)), 5,
                                    report_aug=ReportAugment(drop=0.5, shuffle=True, end_id=tok.vocab.index(".")),
                                    impression=view)
    outs = [example.map_with_index(i, encode_record(record)) for i in range(4)]
    want = impression_span(ids, mask, view)
    assert any(not np.array_equal(o["input_ids"], ids) for o in outs)  # the report was augmented ...
    for o in outs:  # ... its impression view never
        np.testing.assert_array_equal(o["impression_ids"], want[0])
        np.testing.assert_array_equal(o["impression_mask"], want[1])
    text = tok.decode([int(t) for t in want[0] if t > 0])
    assert text.startswith("impression") and "cardiomegaly" in text and "findings" not in text, text
