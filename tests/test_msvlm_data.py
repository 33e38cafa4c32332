"""MS-VLM's data (t3d_jax/data/slices.py, prepare's keep_slices, multi-series manifests) and
the `msvlm` task fed by it.

One tiny manifest is prepared once (real NIfTI files, the real prepare job and Grain pipeline):
example `two` lists two series (`s0;s1`), `swapped` the same two files the other way round,
`thin` one series at half the preset's z spacing, `gone` a second series that does not exist.
The volumes sit on the preset's grid (4 mm, 8 x 8 in-plane) except `thin`'s z, so the expected
model inputs are the files' own HU through the preset's window map, computed here in float64
NumPy (``EXACT_TOL``: the stored int16 HU are exact, the only rounding is float32's of
(HU + 1000) / 2000, < 1e-7).

The task test runs the `msvlm` loss under one jit on pipeline batches padded to two buckets
and counts the traces (one per bucket); the CLIP term of the same examples is the same at
both buckets (``PAD_TOL`` = 1e-5: float32 attention over sequences of different lengths
reduces in another order), and the per-example sequence layout gives the encoder output of
the model's own list-of-series call (``PAD_TOL``).
"""

from __future__ import annotations

import csv
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from configs import msvlm as msvlm_config
from t3d_jax import tasks
from t3d_jax.data import pipeline, prepare, preprocess, slices, synthetic
from t3d_jax.utils import UserValueError

EXACT_TOL = 1e-6
PAD_TOL = 1e-5
PRESET = preprocess.Preset("slices_test", (4.0, 4.0, 4.0), (-1000.0, 1000.0), (8, 8, 99), "unit")
IDS = {"two": 1.0, "swapped": 2.0, "thin": 3.0}  # the one label column names the example in a batch


def _save(path: pathlib.Path, hu: np.ndarray, spacing) -> None:
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([*spacing, 1.0])), str(path))


def _series(z: int, base: int, seed: int) -> np.ndarray:
    """HU [8, 8, z]: every slice its own level (base + 40 z) plus a random in-plane pattern."""
    pattern = np.random.default_rng(seed).integers(-30, 30, size=(8, 8, 1))
    return (base + 40 * np.arange(z)[None, None, :] + pattern).astype(np.int16)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, bert_vocab):
    root = tmp_path_factory.mktemp("slices")
    raw = root / "raw"
    raw.mkdir()
    hu = {"s0": _series(6, -800, 0), "s1": _series(4, 200, 1), "thin": _series(10, -500, 2)}
    for name in ("s0", "s1"):
        _save(raw / f"{name}.nii.gz", hu[name], (4.0, 4.0, 4.0))
    _save(raw / "thin.nii.gz", hu["thin"], (4.0, 4.0, 2.0))  # 10 slices of 2 mm -> 5 of 4 mm
    rows = [("two", "s0.nii.gz;s1.nii.gz", 1), ("swapped", "s1.nii.gz; s0.nii.gz", 2), ("thin", "thin.nii.gz", 3),
            ("gone", "s0.nii.gz;missing.nii.gz", 0)]
    manifest = raw / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "volume", "report", "split", "Emphysema"])
        for ident, vols, label in rows:
            w.writerow([ident, vols, f"Report of {ident}.", "train", label])
    out = root / "prepared"
    result = prepare.prepare_dataset(manifest, out, preset=PRESET, vocab=bert_vocab, max_len=8, workers=0,
                                     progress=False, keep_slices=True)
    return {"out": out, "raw": raw, "hu": hu, "result": result, "manifest": manifest}


def _data_config(out, length, **kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        dir=str(out), view_size=(8, 8, 8), crop_min=1.0, crop_max=1.0, intensity_jitter=0.0, noise_std=0.0,
        worker_count=0, slices=dict(enabled=True, length=length, max_series=4), **kw))


def _batch(out, length, n=3) -> dict:
    """The one pipeline batch holding all three examples (a batch of 3 is one epoch)."""
    return next(pipeline.train_iterator(_data_config(out, length), global_batch_size=n, seed=0, worker_count=0))


def _rows_by_id(batch) -> dict[str, int]:
    return {ident: int(np.flatnonzero(batch["labels"][:, 0] == v)[0]) for ident, v in IDS.items()}


def test_multi_series_manifest_order_series_ids_and_padding(prepared):
    result, out, hu = prepared["result"], prepared["out"], prepared["hu"]
    assert (result.read, result.written, result.rejected) == (4, 3, 1)
    # The bad entry: one line of errors.jsonl naming the manifest, its line, the series and the file.
    (err,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert err["id"] == "gone" and err["line"] == 5
    assert "manifest.csv line 5" in err["reason"] and "series 2 of 2" in err["reason"]
    assert "missing.nii.gz: file not found" in err["reason"]
    summary = json.loads((out / "dataset.json").read_text())["slices"]
    assert summary["max"] == 10 and summary["max_series"] == 2 and summary["longest"]["slices"] in ([6, 4], [4, 6])

    batch = _batch(out, length=16)
    row = _rows_by_id(batch)
    assert batch["slices"].shape == (3, 8, 8, 16, 1) and batch["slices"].dtype == np.float32
    unit = lambda a: (np.asarray(a, np.float64) + 1000.0) / 2000.0  # noqa: E731  (the preset's window map)
    for ident, parts in (("two", ("s0", "s1")), ("swapped", ("s1", "s0"))):
        i = row[ident]
        counts = [hu[p].shape[2] for p in parts]
        n = sum(counts)
        want = unit(np.concatenate([hu[p] for p in parts], axis=2))  # manifest order, slices in z order
        np.testing.assert_allclose(batch["slices"][i, :, :, :n, 0], want, atol=EXACT_TOL)
        assert not batch["slices"][i, :, :, n:].any()  # zero padding to the bucket
        np.testing.assert_array_equal(batch["slice_valid"][i], np.arange(16) < n)
        np.testing.assert_array_equal(batch["series_id"][i, :n], np.repeat([0, 1], counts))
        np.testing.assert_array_equal(batch["slice_position"][i, :n], np.concatenate([np.arange(c) for c in counts]))
        assert not batch["series_id"][i, n:].any() and not batch["slice_position"][i, n:].any()
    # keep_slices: the 2 mm series keeps its whole extent at 4 mm (5 slices), the preset's z size
    # (99) neither pads nor crops it.
    i = row["thin"]
    assert batch["slice_valid"][i].sum() == 5 and not batch["series_id"][i].any()

    # Nothing is cut: a bucket shorter than an example names it and its files.
    with pytest.raises(ValueError, match=r"record '(two|swapped)' \(.*s[01].nii.gz;.*s[01].nii.gz\): 10 slices"):
        _batch(out, length=8)
    # The fixed-view path (evaluation) reads series 0 of a multi-series record.
    ev = next(pipeline.eval_iterator(_data_config(out, 16, eval_split="train"), "train", 3, worker_count=0))
    assert ev["volume"].shape == (3, 8, 8, 8, 1)


def test_length_chosen_once_from_the_buckets_and_bad_configs(prepared, tmp_path, bert_vocab):
    info = pipeline.read_dataset_info(prepared["out"])
    assert slices.resolve_length(info, (8, 16, 32)) == 16  # smallest bucket holding the longest (10)
    assert slices.resolve_length(info, (8, 16, 32), 32) == 32
    with pytest.raises(ValueError, match=r"longest example '(two|swapped)' .*10 slices.*data.slices.length=8"):
        slices.resolve_length(info, (8, 16, 32), 8)
    with pytest.raises(ValueError, match="not one of the encoder's buckets"):
        slices.resolve_length(info, (8, 16, 32), 12)
    with pytest.raises(ValueError, match="largest bucket 8"):
        slices.resolve_length(info, (4, 8))
    # Several series without keep_slices: refused before any work, naming the manifest's line.
    with pytest.raises(UserValueError, match="line 2 .*'two'.* 2 series.*keep_slices"):
        prepare.prepare_dataset(prepared["manifest"], tmp_path / "fixed", preset=PRESET, vocab=bert_vocab,
                                workers=0, progress=False)
    assert not (tmp_path / "fixed").exists()


def test_local_mask_of_per_example_layouts_is_each_examples_own():
    """The 'local' Z-former mask with a layout per example ([B, L]) is, row by row, the mask of
    that example's layout given alone ([L]; the encoder's original, tested form)."""
    from t3d_jax.models.msvlm import zformer_mask

    ids = np.array([[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1]], np.int32)
    pos = np.array([[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]], np.int32)
    valid = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
    both = np.asarray(zformer_mask(valid, ids, pos, pattern="local", window=2, num_global=1))
    for i in range(2):
        alone = np.asarray(zformer_mask(valid[i:i + 1], ids[i], pos[i], pattern="local", window=2, num_global=1))
        np.testing.assert_array_equal(both[i:i + 1], alone)
    assert both.shape == (2, 1, 7, 7) and not both[0, 0, 1, 4]  # series 0 slice 0 does not see series 1


def test_synthetic_second_series_is_another_slice_thickness(tmp_path):
    one = synthetic.write_dataset(tmp_path / "one", 1, 3, workers=0)
    two = synthetic.write_dataset(tmp_path / "two", 1, 3, workers=0, series=2)
    with open(two) as f:
        row = next(csv.DictReader(f))
    first, second = row["volume"].split(";")
    assert (first, second) == ("volumes/syn_00000.nii.gz", "volumes/syn_00000_s1.nii.gz")
    # Series 0, the report and the labels are those of the one-series data set.
    assert (tmp_path / "one" / first).read_bytes() == (tmp_path / "two" / first).read_bytes()
    with open(one) as f:
        assert next(csv.DictReader(f))["report"] == row["report"]
    a, b = nib.load(str(tmp_path / "two" / first)), nib.load(str(tmp_path / "two" / second))
    za, zb = a.header.get_zooms()[2], b.header.get_zooms()[2]
    assert zb > za or zb == min(synthetic.SIZES["demo"].slice_spacings)  # the next thicker (largest wraps)
    assert zb != za and a.shape[:2] == b.shape[:2]
    assert abs(a.shape[2] * za - b.shape[2] * zb) <= max(za, zb)  # the same extent


def _task_config(data_dir, length):
    c = msvlm_config.get_config("tiny,slices")
    c.data.dir = str(data_dir)
    c.data.view_size = (8, 8, 8)
    c.data.slices.length = length
    c.train.global_batch_size = 3
    c.preprocess.max_len = 8
    m = c.model.image.msvlm
    m.depth, m.z_depth, m.patch_size, m.buckets = 1, 1, (4, 4), (16, 32)
    m.slice_chunk, m.slice_remat = 32, False
    c.model.text.locked = True  # the pooled-text cache stands in for BERT (the clip task's text path)
    c.data.text_features = "pooled"
    c.optim.freeze = ("^text_encoder/",)
    return c


def test_task_trains_on_slice_batches_one_trace_per_bucket(prepared):
    out = prepared["out"]
    c16 = _task_config(out, 0)
    task = tasks.get_task(c16)
    c16 = task.prepare_config(c16)  # resolves data.slices.length once: 16
    assert c16.data.slices.length == 16 and c16.data.slices.max_series == 4
    spec = tasks.get_task(c16).batch_spec()
    assert spec["slices"].shape == (3, 8, 8, 16, 1) and spec["slice_valid"].dtype == jnp.bool_
    assert "views" not in spec
    assert tasks.get_task(_task_config(out, 32)).batch_spec()["slices"].shape == (3, 8, 8, 32, 1)

    graphdef, state = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def fill(path, x):  # host-filled random parameters: no compile for the initialisation
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(np.zeros(x.shape, x.dtype))
        if str(path[-1]).endswith("scale"):  # LayerNorm scales, the logit log-scale: 1
            return jnp.asarray(np.ones(x.shape, x.dtype))
        return jnp.asarray(rng.normal(0.0, 0.2, x.shape).astype(x.dtype))

    model = nnx.merge(graphdef, jax.tree.map_with_path(fill, state))
    text = jnp.asarray(rng.normal(size=(3, spec["text_pooled"].shape[1])), jnp.float16)
    traces = [0]

    @nnx.jit
    def run(model, batch):
        traces[0] += 1  # trace time only
        loss, metrics = task.loss(model, batch, step=jnp.int32(3), deterministic=True)
        image = model.image_encoder(batch["slices"], valid=batch["slice_valid"], series_ids=batch["series_id"],
                                    positions=batch["slice_position"])
        return loss, metrics, image["pooled"]

    keys = ("slices", "slice_valid", "series_id", "slice_position", "attention_mask")
    b16 = _batch(out, 16)
    feed = lambda b: {**{k: jnp.asarray(b[k]) for k in keys}, "text_pooled": text}  # noqa: E731
    loss16, m16, pooled16 = run(model, feed(b16))
    shuffled = {k: v[::-1] for k, v in b16.items()}  # other data, same bucket: no new trace
    run(model, feed(shuffled))
    b32 = _batch(out, 32)
    loss32, m32, pooled32 = run(model, feed(b32))
    assert traces[0] == 2  # one program per bucket
    assert np.isfinite(float(loss16)) and 0 < float(m16["mem_masked"]) <= b16["slice_valid"].sum()
    # The same examples (same order: same seed) padded to 16 or 32 slots: same embeddings and CLIP loss.
    np.testing.assert_array_equal(b16["labels"], b32["labels"])
    np.testing.assert_allclose(np.asarray(pooled16), np.asarray(pooled32), atol=PAD_TOL)
    np.testing.assert_allclose(float(m16["loss_clip"]), float(m32["loss_clip"]), rtol=PAD_TOL)

    # The per-example layout is the model's own list-of-series call: `two` alone, as [s0, s1].
    i = _rows_by_id(b16)["two"]
    s = jnp.asarray(b16["slices"][i:i + 1])
    alone = nnx.jit(lambda m, a, b: m.image_encoder([a, b], series=(0, 1))["pooled"])(
        model, s[:, :, :, :6], s[:, :, :, 6:10])
    np.testing.assert_allclose(np.asarray(pooled16)[i], np.asarray(alone)[0], atol=PAD_TOL)
