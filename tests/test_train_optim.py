"""Optimizer and sharding rules of the trainer, on the real T3D model's parameter tree.

Few train steps are compiled here: the optimizer is applied to the real parameter structure,
and shardings are read off the program's layout. Where one optimizer is applied once (zero
gradients: which leaves decay) its `init` and `update` are jitted: op by op over ~90 leaves
that costs ~9 CPU-seconds, compiled ~3.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from t3d_jax.train import mesh as mesh_lib
from t3d_jax.train import optim as optim_lib
from t3d_jax import tasks
from t3d_jax.tasks.base import Task
from t3d_jax.train import step as step_lib
from t3d_jax.utils import path_str

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_config(name: str = "t3d.py", variant: str = "tiny"):
    """configs/NAME:VARIANT (the config files are plain modules of the `configs` package)."""
    from configs import clip, t3d

    return {"t3d.py": t3d, "clip.py": clip}[name].get_config(variant)


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
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _jitted(tx):
    """`tx` (an optax GradientTransformation) with `init` and `update` each one jitted program."""
    return optax.GradientTransformation(jax.jit(tx.init), jax.jit(tx.update))


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
    tx = _jitted(tx)
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
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
    state_paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert not any("image_encoder/blocks/0/" in p and "inner_states/frozen" not in p for p in state_paths
                   if "/mu/" in p or "/nu/" in p)

    # Clipping sees only trainable gradients: huge gradients on frozen paths change nothing.
    clipped = scaled.copy_and_resolve_references()
    clipped.optim.clip_norm = 1.0
    tx, _, _ = optim_lib.make_optimizer(clipped.optim, params, 100)
    noisy = jax.tree_util.tree_map_with_path(
        lambda p, g: g * 1e6 if path_str(p).startswith("image_encoder/blocks/0/") else g, grads)
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



class _ProbeTask(Task):
    """A task the trainer has never seen (registered by the tests that use it): the step, its
    accumulation and its guard are generic over tasks."""

    name = "probe"

    def build_model(self, rngs):
        return _LinearProbe(rngs)

    def batch_spec(self):
        b = self.global_batch_size()
        return {"views": jax.ShapeDtypeStruct((b, 1, 16, 16, 16, 1), jnp.float32),
                "labels": jax.ShapeDtypeStruct((b, 18), jnp.float32)}

    def loss(self, model, batch, *, step, deterministic=False):
        del step, deterministic
        x = batch["views"][:, 0].reshape(batch["views"].shape[0], -1)
        err = model.image_proj(x) - batch["labels"]
        loss = jnp.mean(err ** 2)
        return loss, {"loss_mse": loss}


@pytest.fixture
def probe_task(monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "probe", _ProbeTask)
    return "probe"


def test_gradient_accumulation_matches_the_full_batch_step(config, probe_task):
    c = config.copy_and_resolve_references()
    c.task = probe_task
    c.train.global_batch_size = 32  # 4 micro-batches of 8, one example per device each
    mesh = mesh_lib.make_mesh(c.mesh)
    rng = np.random.default_rng(0)
    batch = {k: rng.normal(size=v.shape).astype(v.dtype)
             for k, v in step_lib.abstract_batch(c).items()}
    results = []
    with jax.set_mesh(mesh):
        for accum in (1, 4):
            c.train.grad_accum_steps = accum
            program = step_lib.make_train_program(c, mesh)
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


# ---------------------------------------------------------------------------------------
# Flattened AdamW (optim.flatten), the cheap global norm, the 'layers' decay rule, the guard
# ---------------------------------------------------------------------------------------


def test_flatten_setting_resolves():
    assert optim_lib.resolve_flatten("auto") is False  # measured: no gain on the whole step
    assert optim_lib.resolve_flatten("on") is True and optim_lib.resolve_flatten(True) is True
    assert optim_lib.resolve_flatten("off") is False and optim_lib.resolve_flatten(False) is False
    with pytest.raises(ValueError, match="optim.flatten"):
        optim_lib.resolve_flatten("sometimes")


def test_flattened_adamw_matches_per_leaf_adamw(config, params):
    """Three AdamW steps on the real tiny T3D tree with a text lr multiplier of 0.25, a frozen
    block, weight decay (vectors and position embeddings exempt) and clipping that triggers:
    the flattened groups give the per-leaf optimizer's updates and parameters.

    Tolerance: per element both run the same float32 Adam arithmetic, but compiled as other
    kernels (vectorised over one long vector instead of per leaf; the clip's global norm
    summed in another order), so results differ by a few float32 ulp (measured: at most
    3e-9 with lr 1e-2). Adam moves an element by at most ~lr per step, and where m nearly
    cancels m/sqrt(v) amplifies relative rounding, so the bound is absolute: 1e-5 x lr."""
    c = config.copy_and_resolve_references()
    c.optim.schedule, c.optim.lr, c.optim.weight_decay, c.optim.clip_norm = "constant", 1e-2, 0.05, 1.0
    c.optim.lr_multipliers.text = 0.25
    c.optim.freeze = (r"^image_encoder/blocks/0/",)
    per_leaf, _, _ = optim_lib.make_optimizer(c.optim, params, 100)
    flat, _, mult = optim_lib.make_optimizer(c.optim, params, 100, flatten=True)
    assert mult == {"image": 1.0, "text": 0.25, "tma": 1.0, "logit": 1.0}
    # The real tree exercises every kind of group: flattened decay / no-decay groups and the
    # word embedding (1.95 M elements > FLATTEN_MAX_LEAF_SIZE) in a per-leaf group.
    groups = flat.init(params)[2].inner_states
    assert {"image/decay", "image/no_decay", "text/decay", "text/no_decay", "text/decay/leaf",
            "frozen"} <= set(groups)
    assert jax.tree.leaves(groups["text/decay"].inner_state[0].mu)[0].ndim == 1  # one vector
    rng = np.random.default_rng(0)
    state_a, state_b = per_leaf.init(params), flat.init(params)
    pa = pb = jax.tree.map(jnp.asarray, params)
    for step in range(3):
        grads = jax.tree.map(lambda p: (0.05 * rng.normal(size=p.shape)).astype(np.float32), params)
        assert float(optax.tree.norm(grads)) > 1.0  # the clip is active
        ua, state_a = per_leaf.update(grads, state_a, pa)
        ub, state_b = flat.update(grads, state_b, pb)
        for path, a, b in zip(_paths(params), jax.tree.leaves(ua), jax.tree.leaves(ub)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * 1e-2,
                                       err_msg=f"step {step}: {path}")
            if path.startswith("image_encoder/blocks/0/"):
                assert not np.any(np.asarray(b)), path
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    for path, a, b in zip(_paths(params), jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=3 * 1e-5 * 1e-2, err_msg=path)


def test_global_norm_over_concatenated_leaves_matches_optax(params):
    eligible = optim_lib.flat_eligible(params)
    flags = jax.tree.leaves(eligible)
    assert any(flags) and not all(flags)  # small leaves concatenated, the word embedding not
    # float32 sums in another order: ~1e-7 relative.
    np.testing.assert_allclose(float(optim_lib.global_norm(params, eligible)),
                               float(optax.tree.norm(params)), rtol=1e-6)
    ref = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(params)))
    np.testing.assert_allclose(float(optim_lib.global_norm(params, eligible)), ref, rtol=1e-6)


def _decay_of(tx, params) -> dict[str, bool]:
    """Which leaves the optimizer decays: with zero gradients (and no clipping) AdamW's
    update is exactly -lr*wd*param for decayed leaves and 0 for the others."""
    zeros = jax.tree.map(np.zeros_like, params)
    tx = _jitted(tx)
    updates, _ = tx.update(zeros, tx.init(params), params)
    out = {}
    for path, u, p in zip(_paths(params), jax.tree.leaves(updates), jax.tree.leaves(params)):
        u, p = np.asarray(u), np.asarray(p)
        if np.allclose(u, -0.1 * 0.5 * p, rtol=1e-6, atol=0):
            out[path] = True
        else:
            np.testing.assert_array_equal(u, 0, err_msg=path)
            out[path] = False
    return out


def test_weight_decay_does_not_count_the_stacked_layers_axis(config):
    """Scanned layers give every block parameter a leading 'layers' axis: a stacked LayerNorm
    scale [layers, width] is still a vector per layer and is not decayed; a stacked kernel
    [layers, in, out] is. Without logical specs (paths-only callers) every dim counts."""
    c = config.optim.copy_and_resolve_references()
    c.schedule, c.lr, c.weight_decay, c.clip_norm = "constant", 0.1, 0.5, 0.0
    c.no_decay = ("pos_embed",)
    rng = np.random.default_rng(0)
    shapes = {"blocks": {"norm": {"scale": (3, 8), "bias": (3, 8)},
                         "mlp": {"kernel": (3, 8, 16), "bias": (3, 16)}},
              "pos_embed": (4, 8), "proj": {"kernel": (8, 4)}, "scale": ()}
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
    specs = {"blocks": {"norm": {"scale": P("layers", "embed"), "bias": P("layers", "embed")},
                        "mlp": {"kernel": P("layers", "embed", "mlp"), "bias": P("layers", "mlp")}},
             "pos_embed": P(None, "embed"), "proj": {"kernel": P("embed", "joint")}, "scale": P()}
    expected = {"blocks/norm/scale": False, "blocks/norm/bias": False, "blocks/mlp/kernel": True,
                "blocks/mlp/bias": False, "pos_embed": False, "proj/kernel": True, "scale": False}
    for flatten in (False, True):
        tx, _, _ = optim_lib.make_optimizer(c, params, 10, logical_specs=specs, flatten=flatten)
        assert _decay_of(tx, params) == expected, flatten
    # Paths only: today's rule, every dim counts, so the stacked vectors look like matrices.
    tx, _, _ = optim_lib.make_optimizer(c, params, 10)
    assert _decay_of(tx, params) == {**expected, "blocks/norm/scale": True, "blocks/norm/bias": True,
                                     "blocks/mlp/bias": True}
    # Specs of another tree are an error, not a silent fallback.
    with pytest.raises(ValueError, match="blocks/norm/scale"):
        bad = {**specs, "blocks": {**specs["blocks"], "norm": {"bias": P("layers", "embed")}}}
        optim_lib.make_optimizer(c, params, 10, logical_specs=bad)[0].init(params)


def test_scanned_model_program_exempts_stacked_norm_scales_from_decay(config):
    """The program passes the model's logical specs to the optimizer: with scanned ViT blocks
    the stacked LayerNorm scales ([2, 64]) are not decayed, the stacked kernels are."""
    c = config.copy_and_resolve_references()
    c.model.image.scan_layers = True
    c.optim.schedule, c.optim.lr, c.optim.weight_decay, c.optim.clip_norm = "constant", 0.1, 0.5, 0.0
    mesh = mesh_lib.make_mesh(c.mesh)
    program = step_lib.make_train_program(c, mesh)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                          program.abstract_state["params"])
    decay = _decay_of(program.tx, params)
    scale = "image_encoder/blocks/norm1/scale"
    assert _paths(params)[scale].shape == (2, 64) and decay[scale] is False
    assert decay["image_encoder/blocks/mlp/fc1/kernel"] is True
    assert decay["image_encoder/blocks/mlp/fc1/bias"] is False


def test_flatten_on_a_sharded_mesh_keeps_fsdp_state_sharded(config):
    """optim.flatten=on with FSDP x tensor sharding: every split parameter keeps per-leaf
    moments with its own sharding; only replicated leaves are concatenated, into replicated
    vectors. Layout only (nothing compiled)."""
    c = config.copy_and_resolve_references()
    c.mesh.shape, c.mesh.axes = (2, 2, 2), ("data", "fsdp", "tensor")
    c.optim.flatten = "on"
    program = step_lib.make_train_program(c, mesh_lib.make_mesh(c.mesh))
    param_sh = _paths(program.state_shardings["params"])
    shapes = _paths(program.abstract_state["params"])
    opt_sh = _paths(program.state_shardings["opt_state"])
    opt_abs = _paths(program.abstract_state["opt_state"])
    split = [p for p, s in param_sh.items() if not s.is_fully_replicated]
    assert len(split) > 10
    for p in split:
        mu = [k for k in opt_sh if k.endswith("/mu/" + p)]
        assert len(mu) == 1 and opt_sh[mu[0]] == param_sh[p], p
    flat_mu = [k for k in opt_abs if k.endswith("/mu") and opt_abs[k].ndim == 1]
    assert flat_mu and all(opt_sh[k].is_fully_replicated for k in flat_mu)
    small_replicated = sum(int(np.prod(shapes[p].shape)) for p, s in param_sh.items()
                           if s.is_fully_replicated and np.prod(shapes[p].shape) <= optim_lib.FLATTEN_MAX_LEAF_SIZE)
    assert sum(int(opt_abs[k].shape[0]) for k in flat_mu) == small_replicated


@pytest.mark.parametrize("flatten,guard", [("auto", "where"), ("auto", "cond"), ("on", "where")])
def test_one_device_step_skips_a_nonfinite_batch_exactly(config, flatten, guard, probe_task):
    """On one device (the CPU bench's mesh), per-leaf (auto) and flattened AdamW, both guard
    forms (train.nonfinite_guard): a NaN batch leaves params, optimizer state and model state
    bit-identical and counts itself; the next good step trains again; the optimizer counts
    only good steps; one trace."""
    c = config.copy_and_resolve_references()
    c.task = probe_task
    c.mesh.shape = (1, 1)
    c.optim.flatten = flatten
    c.train.nonfinite_guard = guard
    c.train.global_batch_size = 8
    c.optim.warmup_steps = 0
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    rng = np.random.default_rng(0)
    good = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in step_lib.abstract_batch(c).items()}
    bad = {**good, "views": np.full_like(good["views"], np.nan)}
    with jax.set_mesh(mesh):
        program = step_lib.make_train_program(c, mesh)
        state = program.init()
        flat_mu = [x for p, x in _paths(state["opt_state"]).items() if p.endswith("/mu") and x.ndim == 1]
        assert bool(flat_mu) == (flatten == "on")  # flattened exactly when asked
        feed = lambda b: step_lib.global_batch(b, program.batch_shardings)
        state, m1 = program.step(state, feed(good))
        before = jax.device_get(state)
        state, m2 = program.step(state, feed(bad))
        after = jax.device_get(state)
        state, m3 = program.step(state, feed(good))
    assert int(m1["skipped"]) == 0 and int(m2["skipped"]) == 1 and int(m3["skipped"]) == 0
    assert int(m2["bad_steps"]) == 1 and int(m3["bad_steps"]) == 0 and int(m3["skipped_steps"]) == 1
    for key in ("params", "opt_state", "model_state"):
        for x, y in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key])):
            np.testing.assert_array_equal(x, y, err_msg=key)
    assert int(after["step"]) == 2 and int(state["step"]) == 3
    counts = [int(x) for p, x in _paths(jax.device_get(state["opt_state"])).items() if p.endswith("/count")]
    assert counts and set(counts) == {2}
    assert not np.allclose(jax.tree.leaves(jax.device_get(state["params"]))[0],
                           jax.tree.leaves(after["params"])[0])
    assert program.trace_count == [1]
