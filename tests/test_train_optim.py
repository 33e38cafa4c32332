"""Optimizer and sharding rules of the trainer, on the real T3D model's parameter tree.

No train step is compiled here: the optimizer is applied eagerly to the real parameter
structure, and shardings are read off the program's layout, so these run in seconds.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from t3d_jax.train import mesh as mesh_lib
from t3d_jax.train import optim as optim_lib
from t3d_jax.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_config(name: str = "t3d.py", variant: str = "tiny"):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture(scope="module")
def config():
    c = load_config()
    c.preprocess.max_len = 16
    return c


@pytest.fixture(scope="module")
def params(config):
    """The real tiny T3D model's parameters (float32 NumPy, from the model's own init)."""
    from t3d_jax.models import build_model_from_config

    with nnx.use_eager_sharding(False):
        model = build_model_from_config(config, rngs=nnx.Rngs(0))
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _paths(tree):
    return {optim_lib.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_model_towers_have_the_names_the_multipliers_use(params):
    towers = {optim_lib.tower_of(p, {"image": 1, "text": 1, "tma": 1, "logit": 1}) for p in _paths(params)}
    assert towers == {"image", "text", "tma", "logit"}, towers


def test_weight_decay_skips_vectors_and_position_embeddings(config, params):
    """With zero gradients AdamW's update is exactly -lr*wd*param for decayed parameters and 0
    for biases, norm scales, the logit scale and position embeddings."""
    config = config.copy_and_resolve_references()
    config.optim.schedule = "constant"
    config.optim.lr, config.optim.weight_decay, config.optim.clip_norm = 0.1, 0.5, 0.0
    tx, _, _ = optim_lib.make_optimizer(config.optim, params, 100)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    decayed, skipped = 0, 0
    for path, (u, p) in zip(_paths(params), zip(jax.tree.leaves(updates), jax.tree.leaves(params))):
        no_decay = p.ndim <= 1 or any(k in path for k in ("pos_embed", "/position/", "prototypes"))
        expected = np.zeros_like(p) if no_decay else -0.1 * 0.5 * p
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, atol=1e-9, err_msg=path)
        decayed += not no_decay
        skipped += no_decay
    assert decayed > 10 and skipped > 10
    assert "text_encoder/embeddings/position/embedding" in _paths(params)  # a 2-D param the rule skips


def test_tower_multipliers_and_freezing(config, params):
    """A tower's update scales with its multiplier (Adam's step is linear in lr); frozen paths
    get exactly zero update, no optimizer state, and do not count towards clipping."""
    base = config.copy_and_resolve_references()
    base.optim.schedule, base.optim.weight_decay, base.optim.clip_norm = "constant", 0.0, 0.0
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)

    def updates(optim_config):
        tx, _, _ = optim_lib.make_optimizer(optim_config, params, 100)
        state = tx.init(params)
        return _paths(tx.update(grads, state, params)[0]), state

    ref, _ = updates(base.optim)
    scaled = base.copy_and_resolve_references()
    scaled.optim.lr_multipliers.text = 0.25
    scaled.optim.freeze = (r"^image_encoder/blocks/0/",)
    out, state = updates(scaled.optim)
    frozen = [p for p in out if p.startswith("image_encoder/blocks/0/")]
    assert frozen
    for path, u in out.items():
        if path in frozen:
            assert not np.any(np.asarray(u)), path
        elif path.startswith("text_"):
            np.testing.assert_allclose(np.asarray(u), 0.25 * np.asarray(ref[path]), rtol=1e-5, atol=1e-9)
        else:
            np.testing.assert_allclose(np.asarray(u), np.asarray(ref[path]), rtol=1e-6, atol=1e-9)
    # Frozen parameters carry no Adam moments.
    state_paths = [optim_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert not any("image_encoder/blocks/0/" in p and "inner_states/frozen" not in p for p in state_paths
                   if "/mu/" in p or "/nu/" in p)

    # Clipping sees only trainable gradients: huge gradients on frozen paths change nothing.
    clipped = scaled.copy_and_resolve_references()
    clipped.optim.clip_norm = 1.0
    tx, _, _ = optim_lib.make_optimizer(clipped.optim, params, 100)
    noisy = jax.tree_util.tree_map_with_path(
        lambda p, g: g * 1e6 if optim_lib.path_str(p).startswith("image_encoder/blocks/0/") else g, grads)
    a = tx.update(grads, tx.init(params), params)[0]
    b = tx.update(noisy, tx.init(params), params)[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-12)


def test_warmup_cosine_schedule(config):
    c = config.optim.copy_and_resolve_references()
    c.lr, c.warmup_steps, c.end_lr_factor = 1.0, 10, 0.1
    s = optim_lib.learning_rate_schedule(c, 110)
    np.testing.assert_allclose([float(s(0)), float(s(5)), float(s(10))], [0.0, 0.5, 1.0], atol=1e-6)
    # Cosine from 1 to 0.1 over steps 10..110: halfway is the midpoint 0.55.
    np.testing.assert_allclose(float(s(60)), 0.55, atol=1e-6)
    np.testing.assert_allclose(float(s(110)), 0.1, atol=1e-6)


def test_logical_rules_map_to_mesh_axes():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = {"batch": ("data", "fsdp"), "embed": ("fsdp",), "mlp": ("tensor",), "heads": ("tensor",)}
    spec = mesh_lib.logical_to_mesh_spec
    assert spec(("embed", "mlp"), (64, 128), mesh, rules) == P("fsdp", "tensor")
    assert spec(("mlp", "embed"), (128, 64), mesh, rules) == P("tensor", "fsdp")
    assert spec(("embed", "heads", "kv"), (64, 4, 16), mesh, rules) == P("fsdp", "tensor")
    # Not divisible -> left whole; a mesh axis is used once per array; unknown names unsplit.
    assert spec(("embed", "mlp"), (63, 128), mesh, rules) == P(None, "tensor")
    assert spec(("embed", "embed"), (64, 64), mesh, rules) == P("fsdp")
    assert spec(("patch", "embed"), (512, 64), mesh, rules) == P(None, "fsdp")
    # Rules naming an axis the mesh lacks are ignored (the same table serves every mesh).
    mesh2 = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    assert spec(("embed", "mlp"), (64, 128), mesh2, rules) == P("fsdp")
    assert mesh_lib.resolve_mesh_shape((2, -1), 8) == (2, 4)
    with pytest.raises(ValueError, match="divide"):
        mesh_lib.resolve_mesh_shape((3, -1), 8)


def test_program_layout_shards_params_and_optimizer_state_fsdp_and_tensor(config):
    """The real model on a (data=2, fsdp=2, tensor=2) mesh: every kernel is split by the rules
    (checked against the model's own logical names), Adam moments mirror their params, the
    batch is split over data x fsdp. Layout only: nothing is compiled."""
    c = config.copy_and_resolve_references()
    c.mesh.shape, c.mesh.axes = (2, 2, 2), ("data", "fsdp", "tensor")
    mesh = mesh_lib.make_mesh(c.mesh)
    program = step_lib.make_train_program(c, mesh)
    from t3d_jax.models import build_model_from_config

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build_model_from_config(c, rngs=nnx.Rngs(0)))
    logical = _paths(nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param))))
    shardings = _paths(program.state_shardings["params"])
    shapes = _paths(program.abstract_state["params"])
    rules = {"embed": "fsdp", "joint": "fsdp", "mlp": "tensor", "heads": "tensor", "vocab": "tensor"}
    split_fsdp = split_tensor = 0
    for path, sharding in shardings.items():
        names = tuple(logical[path]) if logical[path] is not None else ()
        used = set()
        expected = []
        for dim, name in enumerate(names):
            axis = rules.get(name)
            ok = axis and axis not in used and shapes[path].shape[dim] % 2 == 0
            expected.append(axis if ok else None)
            used |= {axis} if ok else set()
        while expected and expected[-1] is None:
            expected.pop()
        assert sharding.spec == P(*expected), (path, names, sharding.spec)
        split_fsdp += "fsdp" in expected
        split_tensor += "tensor" in expected
    assert split_fsdp > 10 and split_tensor > 5
    assert shardings["text_encoder/embeddings/word/embedding"].spec == P("tensor", "fsdp")
    opt = program.state_shardings["opt_state"]
    for path, s in _paths(opt).items():
        for p_path, p_sharding in shardings.items():
            if path.endswith("/mu/" + p_path) or path.endswith("/nu/" + p_path):
                assert s == p_sharding, path
    assert program.batch_shardings["views"].spec == P(("data", "fsdp"))


def test_init_from_hugging_face_bert_fills_the_sharded_text_encoder(config, minilm_dir):
    """init_from.hf_bert_dir: the real MiniLM-L6 weights land in text_encoder, leaf by leaf with
    each leaf's sharding; the image tower is untouched; a size mismatch is a clear error."""
    from safetensors.numpy import load_file

    from t3d_jax.train import pretrained

    c = config.copy_and_resolve_references()
    c.model.text.size = "minilm"
    c.init_from.hf_bert_dir = str(minilm_dir)
    mesh = mesh_lib.make_mesh(c.mesh)
    program = step_lib.make_train_program(c, mesh)
    zeros = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
                         program.abstract_state["params"])
    new = pretrained.load_into_state(c, program, {"params": zeros})["params"]
    hf = load_file(str(next(minilm_dir.glob("*.safetensors"))))
    prefix = "" if "embeddings.word_embeddings.weight" in hf else "bert."
    word = new["text_encoder"]["embeddings"]["word"]["embedding"]
    np.testing.assert_array_equal(np.asarray(word), hf[prefix + "embeddings.word_embeddings.weight"])
    assert word.sharding == program.state_shardings["params"]["text_encoder"]["embeddings"]["word"]["embedding"]
    q = np.asarray(new["text_encoder"]["layers"][5]["attn"]["query"]["kernel"])  # [h, heads, dh]
    np.testing.assert_array_equal(q.reshape(384, 384), hf[prefix + "encoder.layer.5.attention.self.query.weight"].T)
    assert not np.any(np.asarray(new["image_encoder"]["patch_embed"]["kernel"]))

    c.model.text.size = "tiny"
    small = step_lib.make_train_program(c, mesh)
    zeros = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
                         small.abstract_state["params"])
    with pytest.raises((KeyError, ValueError), match="text_encoder"):
        pretrained.load_into_state(c, small, {"params": zeros})


class _LinearProbe(nnx.Module):
    """A per-example-mean regression loss: for it, averaging the gradients of A micro-batches
    equals the full-batch gradient, so accumulation must reproduce the plain step."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.normal(0.1), ("patch", "embed"))
        self.image_proj = nnx.Linear(16 * 16 * 16, 18, kernel_init=init, rngs=rngs)

    def loss(self, batch, *, step, deterministic):
        del step, deterministic
        x = batch["views"][:, 0].reshape(batch["views"].shape[0], -1)
        err = self.image_proj(x) - batch["labels"]
        loss = jnp.mean(err ** 2)
        return loss, {"loss_mse": loss}


def test_gradient_accumulation_matches_the_full_batch_step(config):
    c = config.copy_and_resolve_references()
    c.train.global_batch_size = 32  # 4 micro-batches of 8, one example per device each
    mesh = mesh_lib.make_mesh(c.mesh)
    rng = np.random.default_rng(0)
    batch = {k: rng.normal(size=v.shape).astype(v.dtype)
             for k, v in step_lib.abstract_batch(c).items()}
    results = []
    with jax.set_mesh(mesh):
        for accum in (1, 4):
            c.train.grad_accum_steps = accum
            program = step_lib.make_train_program(c, mesh, _LinearProbe)
            state = program.init()
            initial = jax.device_get(state["params"])
            for _ in range(3):  # warmup starts at lr 0: take a few steps
                state, metrics = program.step(state, step_lib.global_batch(batch, program.batch_shardings))
            results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    (p1, m1), (p4, m4) = results
    # float32 with a different summation order: loss and gradient norm to ~1e-6 relative.
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    # Adam moves each weight by up to lr per step, and for near-zero gradients m/sqrt(v) is
    # sensitive to that rounding; so params must agree to 1% of one step's peak lr (1e-3).
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert not np.allclose(jax.tree.leaves(p1)[0], jax.tree.leaves(initial)[0])  # the steps did update
