"""The `segmentation` evaluator (t3d_jax/evaluate/seg_eval.py) on a tiny prepared split with masks.

The model is an oracle whose logits pick the class a voxel's intensity encodes, so the label
map it predicts is known exactly; the evaluator's Dice / HD95 are checked against float64
references computed here (Dice by its formula, HD95 with scipy's exact Euclidean distance
transform instead of the module's k-d tree), and its intervals against the bootstrap written
out in NumPy.
"""

import csv
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from configs import finetune_seg
from t3d_jax.evaluate import seg_eval
from t3d_jax.evaluate.registry import EvalContext, get_evaluator
from t3d_jax.utils import UserValueError

K = 3
NAMES = ["background", "lung", "lesion"]
SHAPE = (16, 16, 16)
SPACING = (1.0, 1.5, 2.0)


class Oracle(nnx.Module):
    """logits_k = -1e4 (x - 0.1 k)^2: the class whose code 0.1 k the input equals (one-hot softmax)."""

    def logits(self, x, *, deterministic=True):
        del deterministic
        return -1e4 * (x - 0.1 * jnp.arange(K, dtype=jnp.float32)) ** 2


def _cases(num: int, seed: int = 0):
    """(predicted, truth) label maps. The prediction is constant over 2-voxel slabs along x (so
    resampling 16 -> 8 -> 16 voxels keeps it exactly); the truth is a blob structure per case."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE).astype(np.float64)
    out = []
    for i in range(num):
        a, b = 2 * rng.integers(1, 4), 2 * rng.integers(5, 7)
        pred = np.zeros(SHAPE, np.int32)
        pred[a:b + 2] = 1
        pred[b:b + 2, 4:12] = 2 if i != 1 else 1  # case 1 never predicts the lesion
        truth = np.zeros(SHAPE, np.int32)
        centre = rng.uniform(5, 11, 3)
        truth[np.sum((grid - centre[:, None, None, None]) ** 2, axis=0) < rng.uniform(12, 30)] = 1
        if i != 2:  # case 2 has no lesion in the ground truth
            truth[b - 1:b + 2, 5:10, 3:9] = 2
        out.append((pred, truth))
    return out


def _write_prepared(root: pathlib.Path, cases, *, masks=True, classes=NAMES) -> pathlib.Path:
    from array_record.python.array_record_module import ArrayRecordWriter

    from t3d_jax.data.records import encode_record

    root.mkdir(parents=True)
    info = {"preset": {"name": "seg-test", "size": list(SHAPE)}, "splits": {}}
    if masks:
        info["masks"] = {"classes": {str(i): n for i, n in enumerate(classes)}}
    for split, chunk in (("train", cases[:1]), ("valid", cases)):
        writer = ArrayRecordWriter(str(root / f"{split}.array_record"), "group_size:1")
        for i, (pred, truth) in enumerate(chunk):
            record = {"volume": (pred * 100).astype(np.int16), "intensity_scale": np.float32(1e-3),
                      "intensity_offset": np.float32(0.0), "spacing": np.asarray(SPACING, np.float32),
                      "id": f"{split}-{i}"}
            if masks:
                record["mask"] = truth.astype(np.uint8)
            writer.write(encode_record(record))
        writer.close()
        info["splits"][split] = {"num_records": len(chunk), "shards": [f"{split}.array_record"]}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def _config(data_dir, **eval_keys):
    c = finetune_seg.get_config("tiny")
    c.data.dir = str(data_dir)
    c.data.view_size = (8, 8, 8)
    c.data.crop_min = c.data.crop_max = 1.0  # whole-volume views: windows on an 8^3 grid
    c.model.seg.num_classes = K
    c.eval.batch_size = 4
    c.eval.update(eval_keys)
    return c


def _reference(pred, truth):
    """float64 Dice and HD95 (mm) per class: the formula, and the exact Euclidean distance
    transform of the other mask's surface (scipy.ndimage, not the evaluator's k-d tree)."""
    dice, hd = np.full(K, np.nan), np.full(K, np.nan)
    for k in range(K):
        p, g = pred == k, truth == k
        if g.any():
            dice[k] = 2.0 * np.sum(p & g) / (p.sum() + g.sum())
        if p.any() and g.any():
            sp, sg = p & ~ndimage.binary_erosion(p), g & ~ndimage.binary_erosion(g)
            d_pg = ndimage.distance_transform_edt(~sg, sampling=SPACING)[sp]
            d_gp = ndimage.distance_transform_edt(~sp, sampling=SPACING)[sg]
            hd[k] = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    return dice, hd


def _bootstrap_reference(values, seed, num, classes_in_mean, confidence=0.95):
    """Percentile bootstrap over cases of per-class nan-means, written out in float64."""
    n = len(values)
    idx = np.random.default_rng(seed).integers(0, n, (num, n))
    with warnings.catch_warnings():  # a class absent from a resample: NaN, left out
        warnings.simplefilter("ignore", RuntimeWarning)
        boots = np.array([np.nanmean(values[i], axis=0) for i in idx])
    lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    per_class = [np.percentile(b[np.isfinite(b)], [lo_q, hi_q]) for b in boots.T]
    mean = np.nanmean(boots[:, classes_in_mean], axis=1)
    return per_class, np.percentile(mean, [lo_q, hi_q])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cases = _cases(6)
    return _write_prepared(tmp_path_factory.mktemp("seg_eval") / "prepared", cases), cases


def _ctx(config, workdir, write):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    return EvalContext(model=Oracle(), config=config, step=7, workdir=str(workdir), mesh=mesh, write=write)


def test_evaluator_scores_whole_volumes_against_float64_references(data, tmp_path):
    """Through the registry with files (as launch/evaluate.py): per-case Dice / HD95 equal the
    references on both window grids (rtol 1e-9: the same float64 counts; HD95 atol 1e-9 mm:
    exact distances both ways), the intervals equal the written-out bootstrap, and the table
    lands in WORKDIR/eval/STEP/."""
    data_dir, cases = data
    refs = [_reference(p, t) for p, t in cases]
    ref_dice, ref_hd = np.array([r[0] for r in refs]), np.array([r[1] for r in refs])
    assert np.isnan(ref_dice[2, 2]) and ref_dice[1, 2] == 0.0  # the empty cases are exercised

    config = _config(data_dir, num_bootstrap=200)
    scalars = get_evaluator("segmentation")(_ctx(config, tmp_path, write=True))
    saved = json.loads((tmp_path / "eval" / "7" / "segmentation.json").read_text())
    assert saved["grid"] == [8, 8, 8] and saved["per_case"]["ids"] == [f"valid-{i}" for i in range(6)]
    dice = np.array(saved["per_case"]["dice"], dtype=np.float64)  # null -> nan
    hd = np.array(saved["per_case"]["hd95_mm"], dtype=np.float64)
    np.testing.assert_allclose(dice, ref_dice, rtol=1e-9)
    np.testing.assert_allclose(hd, ref_hd, rtol=0, atol=1e-9)
    assert saved["false_positive_cases"] == {"background": 0, "lung": 0, "lesion": 1}  # case 2 predicts it

    in_mean = [1, 2]
    np.testing.assert_allclose(scalars["mean_dice"], np.mean(np.nanmean(ref_dice, axis=0)[in_mean]), rtol=1e-12)
    for k, name in enumerate(NAMES):
        assert scalars[f"dice/{name}"] == pytest.approx(np.nanmean(ref_dice[:, k]), rel=1e-12)
    per_class_ci, mean_ci = _bootstrap_reference(ref_dice, 0, 200, in_mean)
    for k, name in enumerate(NAMES):
        np.testing.assert_allclose(saved["dice"]["per_class"][name]["ci"], per_class_ci[k], rtol=1e-9)
    np.testing.assert_allclose(saved["dice"]["mean"]["ci"], mean_ci, rtol=1e-9)
    rows = list(csv.DictReader(open(tmp_path / "eval" / "7" / "segmentation_per_class.csv")))
    assert [r["class"] for r in rows] == NAMES and int(rows[2]["n_cases"]) == 5

    # The stored grid (27 overlapping windows per volume) gives the same label maps here.
    stored = seg_eval.score_cases(Oracle(), _config(data_dir), "valid", grid="stored", sw_batch_size=4)
    assert stored["grid"] == list(SHAPE)
    np.testing.assert_allclose(stored["dice"], ref_dice, rtol=1e-9)


def test_paired_difference_and_grids():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, (9, K))
    a[3, 2] = np.nan
    b = np.clip(a - 0.1 + rng.normal(0, 0.05, a.shape), 0, 1)
    same = seg_eval.paired_difference(a, a, NAMES, num_bootstrap=50)
    assert all(e["value"] == 0 and e["ci"] == [0, 0] for e in same["per_class"].values())
    diff = seg_eval.paired_difference(a, b, NAMES, num_bootstrap=300, seed=4)
    idx = np.random.default_rng(4).integers(0, 9, (300, 9))
    boots = np.array([np.nanmean(a[i], 0) - np.nanmean(b[i], 0) for i in idx])
    for k, name in enumerate(NAMES):
        assert diff["per_class"][name]["value"] == pytest.approx(np.nanmean(a[:, k]) - np.nanmean(b[:, k]), rel=1e-12)
        np.testing.assert_allclose(diff["per_class"][name]["ci"], np.percentile(boots[:, k], [2.5, 97.5]), rtol=1e-9)
    np.testing.assert_allclose(diff["mean"]["ci"], np.percentile(boots[:, 1:].mean(1), [2.5, 97.5]), rtol=1e-9)
    with pytest.raises(ValueError, match="must both be"):
        seg_eval.paired_difference(a, b[:5], NAMES)
    # Windows on the training views' voxel size: view / mean crop extent per axis.
    d = {"view_size": (32, 32, 16), "crop_min": 0.5, "crop_max": 1.0}
    assert seg_eval.inference_grid(d, (64, 64, 40)) == (43, 43, 21)
    assert seg_eval.inference_grid(d, (64, 64, 40), "stored") == (64, 64, 40)
    with pytest.raises(UserValueError, match="eval.seg_grid"):
        seg_eval.inference_grid(d, (64, 64, 40), "native")


def test_clear_errors_without_masks_or_with_too_few_classes(tmp_path):
    cases = _cases(2)
    bare = _write_prepared(tmp_path / "bare", cases, masks=False)
    with pytest.raises(UserValueError, match="no record of split 'valid' has a mask"):
        seg_eval.score_cases(Oracle(), _config(bare), "valid")
    wide = _write_prepared(tmp_path / "wide", cases, classes=NAMES + ["extra"])
    with pytest.raises(UserValueError, match=r"dataset.json.*num_classes is 3.*num_classes=4"):
        seg_eval.class_names(_config(wide))


def test_demo_config_evaluates_with_the_segmentation_evaluator():
    from t3d_jax.data.synthetic import MASK_CLASSES

    c = finetune_seg.get_config("demo")
    assert tuple(c.eval.evaluators) == ("segmentation",) and c.model.seg.num_classes == len(MASK_CLASSES)
