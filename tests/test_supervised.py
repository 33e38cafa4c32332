"""The `supervised` task (t3d_jax/tasks/supervised.py), its config and the ceiling command
(bench/ceiling.py): the masked BCE against a float64 NumPy reference, the batch contract, the
model's deterministic `predict_labels`, the input standardisation of ViT3D, and a few trainer
steps on the tiny prepared fixture followed by the ceiling's restore-and-score path."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import supervised as supervised_config
from t3d_jax import tasks
from t3d_jax.data.labels import CT_RATE_LABELS
from t3d_jax.models.vit3d import ViT3D, ViT3DConfig
from t3d_jax.tasks.supervised import SupervisedModel, SupervisedTask, masked_bce
from t3d_jax.utils import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny():
    return supervised_config.get_config("tiny")


def _bce_reference(logits: np.ndarray, labels: np.ndarray) -> float:
    """float64: mean over known (example, label) pairs and views of -[y log p + (1-y) log(1-p)]."""
    z = logits.astype(np.float64)  # [B, V, L]
    y = labels.astype(np.float64)[:, None, :]
    known = np.broadcast_to(~np.isnan(y), z.shape)
    p = 1.0 / (1.0 + np.exp(-z))
    bce = -(np.where(known, y, 0) * np.log(p) + (1 - np.where(known, y, 0)) * np.log1p(-p))
    return float(bce[known].sum() / max(known.sum(), 1))


def test_registered_by_name_with_its_batch_contract():
    config = _tiny()
    task = tasks.get_task(config)
    assert isinstance(task, SupervisedTask) and tasks.TASKS["supervised"] is SupervisedTask
    spec = task.batch_spec()
    assert set(spec) == {"views", "labels"}
    assert spec["views"].shape == (8, 1, 16, 16, 16, 1) and spec["views"].dtype == jnp.float32
    assert spec["labels"].shape == (8, len(CT_RATE_LABELS)) and spec["labels"].dtype == jnp.float32
    for variant in ("tiny", "demo", "small", "base"):
        c = supervised_config.get_config(variant)
        assert (c.task, c.data.num_views, c.variant) == ("supervised", 1, variant)


def test_loss_equals_numpy_bce_with_unknown_labels_left_out():
    config = _tiny()
    config.data.num_views = 2
    task = SupervisedTask(config)
    model = task.build_model(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    b, v, num = 4, 2, len(CT_RATE_LABELS)
    views = rng.normal(size=(b, v, 16, 16, 16, 1)).astype(np.float32)
    labels = rng.integers(0, 2, (b, num)).astype(np.float32)
    labels[0, :5] = np.nan
    labels[2, 7] = np.nan
    loss, metrics = task.loss(model, {"views": views, "labels": labels}, step=0, deterministic=True)
    logits = np.asarray(model.label_logits(views.reshape(b * v, 16, 16, 16, 1))).reshape(b, v, num)
    assert np.abs(logits).max() > 0.1  # a random head: the check is not at z = 0 only
    np.testing.assert_allclose(float(loss), _bce_reference(logits, labels), rtol=1e-5)
    assert float(metrics["loss_bce"]) == float(loss)
    assert float(metrics["labels_known"]) == pytest.approx(1 - 6 / (b * num))
    # A NaN label contributes nothing, whatever its logit: changing those logits keeps the loss.
    moved = np.asarray(logits).copy()
    moved[0, :, :5] += 7.0
    assert float(masked_bce(jnp.asarray(moved), jnp.asarray(labels))[0]) == pytest.approx(
        _bce_reference(logits, labels), rel=1e-5)
    # Nothing known: zero loss (finite), not 0/0.
    zero, count = masked_bce(jnp.asarray(logits), jnp.full((b, num), jnp.nan))
    assert float(zero) == 0.0 and float(count) == 0.0
    # Large logits stay finite (the stable form).
    big = masked_bce(jnp.full((1, 1, num), 80.0), jnp.zeros((1, num)))[0]
    assert float(big) == pytest.approx(80.0, rel=1e-6)


def test_bad_batches_are_named():
    task = SupervisedTask(_tiny())
    model = task.build_model(nnx.Rngs(0))
    views = np.zeros((2, 1, 16, 16, 16, 1), np.float32)
    with pytest.raises(ValueError, match=r"batch\['labels'\] must be \[B, 18\]"):
        task.loss(model, {"views": views, "labels": np.zeros((2, 5), np.float32)}, step=0)
    with pytest.raises(ValueError, match=r"batch\['views'\] must be \[B, V, X, Y, Z, C\]"):
        task.loss(model, {"views": views[:, 0], "labels": np.zeros((2, 18), np.float32)}, step=0)


def test_predict_labels_is_deterministic_probabilities():
    config = _tiny()
    config.model.image.patch_dropout = 0.5  # training-only: never used by predict_labels
    model = SupervisedModel(config, rngs=nnx.Rngs(0, dropout=1))
    volume = np.random.default_rng(1).normal(size=(3, 16, 16, 16, 1)).astype(np.float32)
    p1, p2 = np.asarray(model.predict_labels(volume)), np.asarray(model.predict_labels(volume))
    assert p1.shape == (3, len(CT_RATE_LABELS)) and np.all((p1 > 0) & (p1 < 1))
    np.testing.assert_array_equal(p1, p2)
    logits = np.asarray(model.label_logits(volume))
    np.testing.assert_allclose(p1, 1 / (1 + np.exp(-logits)), rtol=1e-6)


def test_vit_input_standardisation():
    base = ViT3DConfig(image_size=(16, 16, 16), width=12, num_heads=2, mlp_dim=8, depth=1)
    norm = ViT3DConfig(image_size=(16, 16, 16), width=12, num_heads=2, mlp_dim=8, depth=1,
                       input_mean=0.25, input_std=0.5)
    a, b = ViT3D(base, rngs=nnx.Rngs(0)), ViT3D(norm, rngs=nnx.Rngs(0))  # same weights
    x = np.random.default_rng(0).uniform(size=(2, 16, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(b(x)["pooled"]), np.asarray(a((x - 0.25) / 0.5)["pooled"]),
                               rtol=1e-5, atol=1e-5)
    cfg = ViT3DConfig.from_config({"size": "tiny", "input_mean": 0.17, "input_std": 0.23}, image_size=(16,) * 3)
    assert (cfg.input_mean, cfg.input_std) == (0.17, 0.23)
    assert ViT3DConfig.from_config({"size": "tiny"}, image_size=(16,) * 3).input_std == 1.0  # identity default
    with pytest.raises(ValueError, match="input_std must be > 0"):
        ViT3DConfig(input_std=0.0)


def _load_ceiling():
    spec = importlib.util.spec_from_file_location("bench_ceiling", ROOT / "bench" / "ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pooled_features_are_block_mean_max_min():
    ceiling = _load_ceiling()
    v = np.arange(2 * 8 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 8, 1)
    f = ceiling.pooled_features(v, block=4)
    assert f.shape == (2, 3 * 8)
    block = v[1, 4:8, 0:4, 4:8, 0]  # block (1, 0, 1) = index 1*4 + 0*2 + 1 = 5
    assert (f[1, 5], f[1, 8 + 5], f[1, 16 + 5]) == (block.mean(), block.max(), block.min())


def test_a_few_trainer_steps_then_the_ceiling_scores_the_held_out_split(tiny_prepared_dir, tmp_path):
    """configs/supervised.py:tiny through the normal trainer on the tiny fixture, then the
    ceiling's restore (t3d_jax.train.params) + score + pooled-LR path on its valid split."""
    ceiling = _load_ceiling()
    config = ceiling.load_config(str(ROOT / "configs" / "supervised.py") + ":tiny", tiny_prepared_dir, 4,
                                 ["optim.lr=0.003"])
    config.metrics.tensorboard = False
    assert (config.train.num_steps, config.checkpoint.every_steps, config.optim.lr) == (4, 4, 0.003)
    result = ceiling.run(config, workdir=tmp_path / "run", split="valid", num_bootstrap=20, batch_size=4,
                         log=lambda *_: None)
    assert result["checkpoint_step"] == 4 and result["num_test"] == 8 and result["num_train"] == 24
    assert len(result["supervised"]["per_label"]) == len(CT_RATE_LABELS)
    history = [h for h in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in h]
    assert history, "the trainer logged no loss"
    # The fixture's labels are one-hot octants 0-7: labels 8-17 never positive -> no AUC.
    per = result["supervised"]["per_label"]
    assert math.isnan(per[CT_RATE_LABELS[12]]["auc"]["value"])
    defined = [n for n in CT_RATE_LABELS[:8] if per[n]["n_positive"] > 0 and per[n]["n_positive"] < per[n]["n"]]
    assert all(0.0 <= per[n]["auc"]["value"] <= 1.0 for n in defined)
    assert result["supervised"]["num_labels_in_mean"] == len(defined)
    # The baseline fits a label only where the train split has both classes, else NaN.
    _, train_y, _ = ceiling.iterate_split(config, "train", 8)
    fitted = {n for j, n in enumerate(CT_RATE_LABELS) if np.unique(train_y[:, j]).size == 2}
    lr = result["pooled_lr"]["per_label"]
    for n in defined:
        value = lr[n]["auc"]["value"]
        assert (0.0 <= value <= 1.0) if n in fitted else math.isnan(value), (n, value)
    assert "pooled-LR AUC" in ceiling.table(result)

    # The result carries the data's fingerprint: eval.ceiling shows it beside runs on this data,
    # and marks it as other data beside runs on anything else.
    from t3d_jax.evaluate.ceiling import ceiling_figures
    from conftest import write_tiny_prepared

    assert result["data_fingerprint"]
    path = tmp_path / "ceiling.json"
    path.write_text(json.dumps(result, default=float))
    same = ceiling_figures(str(path), str(tiny_prepared_dir), CT_RATE_LABELS)
    assert same["same_data"] and same["mean_auc"] == result["supervised"]["mean"]["auc"]["value"]
    np.testing.assert_equal([same["per_label_auc"][n] for n in CT_RATE_LABELS],
                            [per[n]["auc"]["value"] for n in CT_RATE_LABELS])  # NaN where undefined
    other = write_tiny_prepared(tmp_path / "other", seed=1)
    assert not ceiling_figures(str(path), str(other), CT_RATE_LABELS)["same_data"]
    with pytest.raises(UserError, match="no such ceiling file"):
        ceiling_figures(str(tmp_path / "missing.json"), str(tiny_prepared_dir), CT_RATE_LABELS)
