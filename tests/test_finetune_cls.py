"""Classification fine-tuning (issue 12): configs/finetune_cls.py on the `supervised` task, the
positive-weighted BCE, the attention-pooling head, the fine-tuning modes (frozen encoder,
layer-wise lr decay), label fractions of the training split, init from a checkpoint's image
encoder, the paired AUC difference and the label-efficiency bench's table -- all at tiny shapes,
no train step compiled."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import finetune_cls
from t3d_jax import tasks
from t3d_jax.data.labels import CT_RATE_LABELS
from t3d_jax.tasks.supervised import SupervisedTask, masked_bce, resolve_pos_weight
from t3d_jax.train import optim as optim_lib
from t3d_jax.utils import UserValueError, path_str

ROOT = pathlib.Path(__file__).resolve().parents[1]
L = len(CT_RATE_LABELS)


def _tiny(mode: str = "full"):
    return finetune_cls.get_config(f"tiny,{mode}")


def _paths(tree) -> dict:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params(config, seed: int = 0):
    model = SupervisedTask(config).build_model(nnx.Rngs(seed))
    return model, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def tiny_model():
    """(model, params as NumPy) of configs/finetune_cls.py:tiny, built once for the module."""
    return _params(_tiny())


def _weighted_bce_reference(logits: np.ndarray, labels: np.ndarray, w: np.ndarray) -> float:
    """float64: mean over known (example, label) pairs and views of -[w y log p + (1-y) log(1-p)]."""
    z = logits.astype(np.float64)
    y = labels.astype(np.float64)[:, None, :]
    known = np.broadcast_to(~np.isnan(y), z.shape)
    y0 = np.where(known, y, 0.0)
    log_p, log_not_p = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)
    bce = -(w.astype(np.float64) * y0 * log_p + (1 - y0) * log_not_p)
    return float(bce[known].sum() / max(known.sum(), 1))


def test_configs_and_modes():
    full, frozen, decay = _tiny(), _tiny("frozen"), _tiny("layer_decay")
    assert (full.task, full.init_from.checkpoint_params) == ("supervised", ("image_encoder",))
    assert (full.optim.freeze, full.optim.layer_decay) == ((), 0.0)
    assert frozen.optim.freeze == ("^image_encoder/",) and decay.optim.layer_decay == 0.75
    assert (full.model.head.pool, full.loss.pos_weight, full.data.train_fraction) == ("pooled", "none", 1.0)
    demo = finetune_cls.get_config("demo")
    assert demo.train.num_steps == 400 and demo.checkpoint.every_steps == 400
    assert demo.init_from.checkpoint in ("", finetune_cls.DEMO_PRETRAINING)
    with pytest.raises(ValueError, match="unknown mode"):
        finetune_cls.get_config("tiny,partial")


def test_pos_weighted_bce_equals_float64_numpy(tiny_model):
    config = _tiny()
    config.data.num_views = 2
    w = np.linspace(0.5, 6.0, L)
    config.loss.pos_weight = tuple(float(x) for x in w)
    task = SupervisedTask(config)
    model = tiny_model[0]
    rng = np.random.default_rng(0)
    b, v = 4, 2
    views = rng.normal(size=(b, v, 16, 16, 16, 1)).astype(np.float32)
    labels = rng.integers(0, 2, (b, L)).astype(np.float32)
    labels[1, :4] = np.nan
    # One compiled call: the task's loss and the logits it was computed from.
    loss, logits = nnx.jit(lambda m: (task.loss(m, {"views": views, "labels": labels}, step=0, deterministic=True)[0],
                                      m.label_logits(views.reshape(b * v, 16, 16, 16, 1))))(model)
    logits = np.asarray(logits).reshape(b, v, L)
    np.testing.assert_allclose(float(loss), _weighted_bce_reference(logits, labels, w), rtol=1e-5)
    # Large logits stay finite; weights of 1 are the unweighted loss.
    big = np.full((2, 1, L), 60.0, np.float32)
    y = np.tile(np.eye(1, L, 0, dtype=np.float32), (2, 1))
    np.testing.assert_allclose(float(masked_bce(jnp.asarray(-big), jnp.asarray(y), jnp.asarray(w, jnp.float32))[0]),
                               _weighted_bce_reference(-big, y, w), rtol=1e-6)
    np.testing.assert_allclose(float(masked_bce(jnp.asarray(logits), jnp.asarray(labels), jnp.ones(L))[0]),
                               float(masked_bce(jnp.asarray(logits), jnp.asarray(labels))[0]), rtol=1e-6)
    config.loss.pos_weight = (1.0, 2.0)
    with pytest.raises(UserValueError, match="need 18"):
        resolve_pos_weight(config)


def test_balanced_pos_weight_counts_the_training_subset(tiny_prepared_dir):
    from t3d_jax.data.pipeline import train_labels

    config = _tiny()
    config.data.dir = str(tiny_prepared_dir)
    config.loss.pos_weight = "balanced"
    config.data.train_fraction = 0.5
    labels = train_labels(config.data)
    assert labels.shape == (12, L)
    pos, neg = (labels == 1).sum(0), (labels == 0).sum(0)
    expected = [n / p if p and n else 1.0 for p, n in zip(pos, neg)]
    assert resolve_pos_weight(config) == pytest.approx(expected)
    resolved = SupervisedTask(config).prepare_config(config)  # what the trainer trains with
    assert resolved.loss.pos_weight == pytest.approx(expected) and config.loss.pos_weight == "balanced"


def test_attention_pool_head():
    config = _tiny()
    config.model.head.pool = "attention"
    model, params = _params(config)
    assert {"label_pool", "label_head", "image_encoder"} == set(params)
    volume = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    # It pools the tokens: the encoder's tokens through the pool and head give the logits.
    logits, by_hand = nnx.jit(lambda m, v: (m.label_logits(v), m.label_head(m.label_pool(m.image_encoder(v)["tokens"]))))(
        model, volume)
    assert logits.shape == (2, L) and np.all(np.isfinite(np.asarray(logits)))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(by_hand), rtol=1e-5, atol=1e-6)
    config.model.head.pool = "max"
    with pytest.raises(UserValueError, match="head.pool"):
        _params(config)


def test_frozen_encoder_gets_zero_updates(tiny_model):
    """optim.freeze = ('^image_encoder/',) (the `frozen` mode): with real gradients of the loss,
    every encoder update is exactly 0 (weight decay included) and it has no Adam state; the head moves."""
    config = _tiny("frozen")
    config.optim.schedule, config.optim.weight_decay = "constant", 0.1
    task = SupervisedTask(config)
    model, params = tiny_model
    rng = np.random.default_rng(0)
    batch = {"views": rng.normal(size=(2, 1, 16, 16, 16, 1)).astype(np.float32),
             "labels": rng.integers(0, 2, (2, L)).astype(np.float32)}
    grads = nnx.to_pure_dict(nnx.jit(nnx.grad(lambda m: task.loss(m, batch, step=0, deterministic=True)[0]))(model))
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["image_encoder"]))
    tx, _, _ = optim_lib.make_optimizer(config.optim, params, 10)
    state = jax.jit(tx.init)(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    upd = _paths(updates)
    enc = [k for k in upd if k.startswith("image_encoder/")]
    assert enc and all(not np.any(np.asarray(upd[k])) for k in enc)
    assert all(np.abs(np.asarray(upd[k])).max() > 0 for k in upd if k.startswith("label_head/"))
    total, trainable = optim_lib.count_params(params, optim_lib.frozen_mask(params, config.optim))
    assert trainable == L * (params["label_head"]["kernel"].shape[0] + 1) < total
    # No Adam moments for the frozen encoder: the state's array elements are the head's only (x2).
    moments = sum(int(np.size(x)) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
    assert moments == 2 * trainable


def test_layer_decay_depths_and_multipliers(tiny_model):
    vit = ["image_encoder/patch_embed/kernel", "image_encoder/pos_embed", "image_encoder/blocks/0/attn/query/kernel",
           "image_encoder/blocks/1/mlp/fc1/kernel", "image_encoder/blocks/11/norm1/scale", "image_encoder/norm/scale",
           "label_head/kernel", "label_pool/query"]
    depth, num = optim_lib.layer_depth_of(vit)
    assert num == 3  # blocks 0, 1, 11 present -> ranked 1, 2, 3
    assert [depth[p] for p in vit] == [0, 0, 1, 2, 3, 4, 4, 4]
    resnet = ["image_encoder/conv1/kernel", "image_encoder/bn1/scale", "image_encoder/layer1/0/conv1/kernel",
              "image_encoder/layer1/1/conv1/kernel", "image_encoder/layer2/0/conv1/kernel",
              "image_encoder/layer10/0/conv1/kernel", "label_head/kernel"]
    depth, num = optim_lib.layer_depth_of(resnet)
    assert num == 4 and [depth[p] for p in resnet] == [0, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="scan_layers"):
        optim_lib.layer_depth_of(["image_encoder/blocks/attn/query/kernel"])

    # On the tiny model (2 blocks): AdamW's first step moves each parameter by lr x its
    # multiplier (|m / sqrt(v)| = 1 per element), the multiplier d^(L + 1 - depth).
    config = _tiny("layer_decay")
    config.optim.schedule, config.optim.lr, config.optim.weight_decay, config.optim.clip_norm = "constant", 0.01, 0.0, 0.0
    config.optim.eps = 1e-12
    config.optim.lr_multipliers.image = 0.5
    params = tiny_model[1]
    tx, _, label_mult = optim_lib.make_optimizer(config.optim, params, 10)
    d = 0.75
    assert label_mult == pytest.approx({"image@0": 0.5 * d ** 3, "image@1": 0.5 * d ** 2, "image@2": 0.5 * d,
                                        "image@3": 0.5, "default@3": 1.0})
    grads = jax.tree.map(lambda x: np.ones_like(x), params)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    expected = {"image_encoder/patch_embed/kernel": 0.5 * d ** 3, "image_encoder/blocks/0/attn/query/kernel": 0.5 * d ** 2,
                "image_encoder/blocks/1/mlp/fc2/kernel": 0.5 * d, "image_encoder/norm/scale": 0.5,
                "label_head/kernel": 1.0}
    upd = _paths(updates)
    for path, mult in expected.items():
        assert path in upd, (path, sorted(upd)[:8])
        np.testing.assert_allclose(np.asarray(upd[path]), -0.01 * mult, rtol=1e-5, err_msg=path)
    config.optim.layer_decay = 1.5
    with pytest.raises(ValueError, match="layer_decay"):
        optim_lib.make_optimizer(config.optim, params, 10)


def test_label_subset_is_seeded_nested_and_respected(tiny_prepared_dir):
    from t3d_jax.data.pipeline import train_iterator, train_labels, train_subset

    a = train_subset(1269, 0.01, 0)
    assert len(a) == 13 and np.array_equal(a, train_subset(1269, 0.01, 0))  # deterministic
    assert not np.array_equal(a, train_subset(1269, 0.01, 1))  # seeded
    b, c = train_subset(1269, 0.1, 0), train_subset(1269, 0.5, 0)
    assert len(b) == 127 and set(a) <= set(b) <= set(c)  # nested for one seed
    assert train_subset(1269, 1.0, 0) is None and len(train_subset(10, 0.01, 0)) == 1
    with pytest.raises(ValueError, match="train_fraction"):
        train_subset(10, 0.0, 0)

    # The pipeline reads only the subset: 3 of the 24 records, views deterministic (whole
    # volume, no jitter), so a batch of 8 holds exactly 3 distinct volumes -- fewer records than
    # the batch fill it from consecutive epochs.
    config = _tiny()
    config.data.dir = str(tiny_prepared_dir)
    config.data.crop_min, config.data.intensity_jitter, config.data.noise_std = 1.0, 0.0, 0.0
    config.data.train_fraction = 3 / 24
    config.data.train_subset_seed = 5
    positions = train_subset(24, 3 / 24, 5)
    batch = next(train_iterator(config.data, global_batch_size=8, seed=0, worker_count=0))
    views = np.asarray(batch["views"]).reshape(8, -1)
    assert len(np.unique(views.round(5), axis=0)) == 3
    subset_labels = train_labels(config.data)
    assert subset_labels.shape == (3, L)
    config.data.train_fraction = 1.0
    all_labels = train_labels(config.data)
    np.testing.assert_array_equal(subset_labels, all_labels[positions])
    rows = {tuple(r) for r in subset_labels}
    assert all(tuple(r) in rows for r in np.asarray(batch["labels"]))


def test_init_from_checkpoint_loads_the_encoder_exactly_and_leaves_the_head_fresh(tiny_prepared_dir, tmp_path):
    from t3d_jax.train import checkpoint as ckpt_lib
    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import step as step_lib
    from t3d_jax.train.loop import init_from_pretrained

    config = _tiny()
    config.data.dir = str(tiny_prepared_dir)
    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        program = step_lib.make_train_program(config, mesh)
        fresh = program.init()
        # "Pretrained": every parameter moved off this run's initialisation.
        saved = dict(fresh, params=jax.tree.map(lambda x: x + 1.0, fresh["params"]))
        manager = ckpt_lib.make_manager(tmp_path / "ckpt", config.checkpoint)
        ckpt_lib.save(manager, 3, saved, None, force=True)
        manager.wait_until_finished()
        manager.close()
        config.init_from.checkpoint = str(tmp_path / "ckpt")
        state = init_from_pretrained(config, program, fresh)
    got, want, init = _paths(state["params"]), _paths(saved["params"]), _paths(fresh["params"])
    for path in got:
        if path.startswith("image_encoder/"):
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)
            assert got[path].sharding == init[path].sharding
        else:  # the head: this run's own initialisation, not the checkpoint's
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(init[path]), err_msg=path)
            assert not np.array_equal(np.asarray(got[path]), np.asarray(want[path])), path
    assert any(p.startswith("label_head/") for p in got)
    config.init_from.checkpoint_params = ("text_encoder",)
    with pytest.raises(UserValueError, match="checkpoint_params"):
        init_from_pretrained(config, program, fresh)


def test_paired_difference_and_the_bench_table():
    from t3d_jax.evaluate.classification import paired_auc_difference
    from t3d_jax.evaluate.compare import auc_per_label
    from t3d_jax.evaluate.zeroshot import evaluate_scores

    rng = np.random.default_rng(0)
    names = ("a", "b", "c")
    y = rng.integers(0, 2, (60, 3)).astype(float)
    y[:, 2] = 0  # no positive: AUC undefined, out of the mean
    good, weak = y + rng.normal(0, 0.6, y.shape), y + rng.normal(0, 1.5, y.shape)
    diff = paired_auc_difference(good, weak, y, names, num_bootstrap=200)
    point = auc_per_label(y, good) - auc_per_label(y, weak)
    assert diff["per_label"]["a"]["value"] == pytest.approx(point[0])
    assert diff["mean"]["value"] == pytest.approx(np.mean(point[:2])) and diff["num_labels_in_mean"] == 2
    lo, hi = diff["mean"]["ci"]
    assert lo < diff["mean"]["value"] < hi
    assert math.isnan(diff["per_label"]["c"]["value"])
    same = paired_auc_difference(good, good, y, names, num_bootstrap=50)
    assert same["mean"]["value"] == 0.0 and same["mean"]["ci"] == [0.0, 0.0]

    spec = importlib.util.spec_from_file_location("bench_label_efficiency", ROOT / "bench" / "label_efficiency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    arm = lambda s: {**evaluate_scores(s, y, names, num_bootstrap=20)}  # noqa: E731
    result = {"arms": ["pretrained", "scratch"], "split": "valid", "num_test": 60, "label_names": list(names),
              "config": {"steps": 5},
              "fractions": {"0.1": {"num_train": 6, "pretrained": arm(good), "scratch": arm(weak), "difference": diff}}}
    text = bench.table(result)
    assert "difference" in text and f"{diff['mean']['value']:+.3f}" in text and "n/a" in text


def test_the_demo_pretrainings_image_encoder_fits_the_demo_fine_tune():
    """configs/finetune_cls.py:demo reads `image_encoder` from configs/t3d.py:demo's checkpoint:
    the same parameter paths and shapes (abstract models only, nothing initialised)."""
    from configs import t3d

    def encoder_shapes(config):
        task = tasks.get_task(config)
        params = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(task.build_model(nnx.Rngs(0)), nnx.Param)))
        return {k: v.shape for k, v in _paths(params["image_encoder"]).items()}

    pre, fine = encoder_shapes(t3d.get_config("demo")), encoder_shapes(finetune_cls.get_config("demo"))
    assert pre == fine and len(pre) > 10
    # The input standardisation is part of the encoder but not a parameter: it must match too.
    keys = ("input_mean", "input_std", "patch_size", "size", "pool", "name")
    assert {k: t3d.get_config("demo").model.image[k] for k in keys} == \
        {k: finetune_cls.get_config("demo").model.image[k] for k in keys}
    assert tuple(t3d.get_config("demo").data.view_size) == tuple(finetune_cls.get_config("demo").data.view_size)
