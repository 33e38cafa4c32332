"""Scanned layer stacks (`model.*.scan_layers`): same function, one compiled body, loadable weights.

A scanned encoder stacks its blocks' parameters on a leading 'layers' axis and runs them
with `nnx.scan`. It must compute exactly what the unrolled encoder computes with the same
weights (the converters stack per-layer checkpoints into it), and its program must not grow
with depth -- that is the point: `base` compiles for a TPU pod in minutes.

Tolerances: scanned vs unrolled run the same float32 ops; forward values agree to 1e-6
(measured 0.0 for the encoders). Gradients of the whole two-tower model may be accumulated in
another order through the scan's backward: measured max 1.2e-6 abs (one element of 32,768),
so gradients get 1e-5 -- float32 rounding, far below any wiring error. Against transformers
(PyTorch) the test_convert tolerance 1e-4 applies.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from t3d_jax.models import build_model_from_config, convert
from t3d_jax.tasks.t3d import T3DTask
from t3d_jax.models.bert import BertConfig, BertEncoder
from t3d_jax.models.vit3d import ViT3D, ViT3DConfig

from configs import t3d as t3d_config

SAME_OPS_ATOL = 1e-6
GRAD_ATOL = 1e-5
HF_TOL = 1e-4


def _flat_params(module) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v[...]) for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)}


def _vit_cfg(**kw) -> ViT3DConfig:
    return ViT3DConfig(image_size=(16, 16, 16), patch_size=(8, 8, 8), depth=3, **kw)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_vit_equals_unrolled_values_and_gradients(remat):
    unrolled = ViT3D(_vit_cfg(), rngs=nnx.Rngs(0))
    scanned = ViT3D(_vit_cfg(scan_layers=True, remat=remat), rngs=nnx.Rngs(1))
    convert.assign(scanned, _flat_params(unrolled))  # per-layer weights stacked by the converter
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 16, 1))

    def loss(model):
        out = model(x)
        return jnp.sum(out["pooled"] ** 2) + jnp.mean(out["tokens"])

    l0, g0 = nnx.jit(nnx.value_and_grad(loss))(unrolled)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(scanned)
    np.testing.assert_allclose(float(l1), float(l0), rtol=SAME_OPS_ATOL)
    g0, g1 = nnx.to_pure_dict(g0), nnx.to_pure_dict(g1)
    for name in ("query", "out"):
        stacked = np.stack([g0["blocks"][i]["attn"][name]["kernel"] for i in range(3)])
        np.testing.assert_allclose(g1["blocks"]["attn"][name]["kernel"], stacked, atol=SAME_OPS_ATOL)
    np.testing.assert_allclose(g1["patch_embed"]["kernel"], g0["patch_embed"]["kernel"], atol=SAME_OPS_ATOL)


def test_scanned_bert_loaded_from_transformers_matches_it():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    hf = transformers.BertModel(hf_cfg).eval()
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    cfg = BertConfig(vocab_size=80, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                     max_position_embeddings=32, scan_layers=True, remat="full")
    ours = BertEncoder(cfg, rngs=nnx.Rngs(0))
    convert.assign(ours, convert.hf_bert_state_from_dict(sd, cfg))
    ids = np.array([[2, 5, 9, 11, 3, 0, 0], [2, 7, 7, 3, 0, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = nnx.jit(lambda m, i, a: m(i, a))(ours, jnp.asarray(ids), jnp.asarray(mask))
    diff = float(np.abs(np.asarray(out["hidden"]) - ref.last_hidden_state.numpy()).max())
    print(f"\nscanned BERT vs transformers: max|dh|={diff:.2e}")
    assert diff < HF_TOL
    assert float(np.abs(np.asarray(out["pooled"]) - ref.pooler_output.numpy()).max()) < HF_TOL


def _dots_in_program(depth: int, scanned: bool) -> int:
    model = ViT3D(ViT3DConfig(image_size=(16, 16, 16), patch_size=(8, 8, 8), depth=depth, scan_layers=scanned),
                  rngs=nnx.Rngs(0))
    hlo = nnx.jit(lambda m, x: m(x)["pooled"]).lower(model, jnp.zeros((1, 16, 16, 16, 1))).as_text()
    return hlo.count("stablehlo.dot_general")


def test_scanned_program_size_does_not_grow_with_depth():
    assert _dots_in_program(2, scanned=True) == _dots_in_program(6, scanned=True)
    assert _dots_in_program(6, scanned=False) > _dots_in_program(2, scanned=False)


def test_flop_count_of_a_scanned_stack_is_one_body_and_the_trainer_says_so():
    """Why the trainer warns: XLA's cost analysis counts the scanned loop's body once."""
    from t3d_jax.train import step as step_lib

    def flops(scanned):
        model = ViT3D(ViT3DConfig(image_size=(16, 16, 16), patch_size=(8, 8, 8), depth=6, scan_layers=scanned),
                      rngs=nnx.Rngs(0))
        fn = nnx.jit(lambda m, x: m(x)["pooled"])
        return step_lib.flops_per_step(fn.lower(model, jnp.zeros((1, 16, 16, 16, 1))).compile())

    unrolled, scanned = flops(False), flops(True)
    assert scanned < 0.5 * unrolled  # 6 blocks counted as ~1, plus the patch embedding
    assert step_lib.flop_undercount_reasons(_tiny(False)) == []
    assert step_lib.flop_undercount_reasons(_tiny(True)) == ["model.image.scan_layers", "model.text.scan_layers"]
    accum = _tiny(False)
    accum.train.grad_accum_steps = 2
    assert step_lib.flop_undercount_reasons(accum) == ["train.grad_accum_steps > 1"]


def test_match_layer_stacks_needs_every_layer():
    targets = {("layers", "w"): (3, 2), ("emb",): (4,)}
    state = {("layers", 0, "w"): np.zeros(2), ("layers", 2, "w"): np.ones(2), ("emb",): np.zeros(4)}
    with pytest.raises(KeyError, match=r"layers \[0, 2\].*has 3"):
        convert.match_layer_stacks(state, targets)
    state[("layers", 1, "w")] = np.full(2, 5.0)
    out = convert.match_layer_stacks(state, targets)
    np.testing.assert_array_equal(out[("layers", "w")], [[0, 0], [5, 5], [1, 1]])
    assert convert.match_layer_stacks(out, targets) == out  # already stacked: unchanged


def _tiny(scanned: bool):
    c = t3d_config.get_config("tiny")
    c.model.text.max_len = 12
    c.model.image.scan_layers = scanned
    c.model.text.scan_layers = scanned
    return c


def _batch(rng, n=4):
    return {
        "views": jnp.asarray(rng.standard_normal((n, 2, 16, 16, 16, 1)), jnp.float32),
        "boxes": jnp.asarray(np.tile([[0.0, 0.0, 0.0], [0.8, 0.8, 0.8]], (n, 2, 1, 1)), jnp.float32),
        "input_ids": jnp.asarray(rng.integers(1000, 2000, (n, 12)), jnp.int32),
        "attention_mask": jnp.ones((n, 12), jnp.int32),
        "labels": jnp.zeros((n, 18), jnp.float32),
    }


def test_scanned_t3d_model_loss_and_gradients_equal_unrolled():
    unrolled = build_model_from_config(_tiny(False), rngs=nnx.Rngs(0))
    scanned = build_model_from_config(_tiny(True), rngs=nnx.Rngs(1))
    convert.assign(scanned, _flat_params(unrolled))
    batch = _batch(np.random.default_rng(0))

    task = T3DTask(_tiny(False))

    def loss(model):
        return task.loss(model, batch, step=jnp.int32(0), deterministic=True)[0]

    l0, g0 = nnx.jit(nnx.value_and_grad(loss))(unrolled)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(scanned)
    np.testing.assert_allclose(float(l1), float(l0), rtol=SAME_OPS_ATOL)
    stacked = convert.match_layer_stacks(_flat_params_of_state(g0), _shapes_of_state(g1))
    flat1 = _flat_params_of_state(g1)
    assert stacked.keys() == flat1.keys()
    for path, value in flat1.items():
        np.testing.assert_allclose(value, stacked[path], atol=GRAD_ATOL, err_msg="/".join(map(str, path)))


def _flat_params_of_state(state) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v[...] if isinstance(v, nnx.Variable) else v) for p, v in state.flat_state()}


def _shapes_of_state(state) -> dict[tuple, tuple]:
    return {p: v.shape for p, v in _flat_params_of_state(state).items()}


def test_scanned_train_program_shards_params_but_never_the_layer_axis():
    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import step as step_lib

    config = _tiny(True)
    config.preprocess.max_len = 12
    mesh = mesh_lib.make_mesh(config.mesh)  # (1, -1): all 8 fake devices on fsdp
    with jax.set_mesh(mesh):
        program = step_lib.make_train_program(config, mesh)
        query = program.abstract_state["params"]["image_encoder"]["blocks"]["attn"]["query"]["kernel"]
        assert query.shape == (2, 64, 4, 16)  # ViT 'tiny': 2 blocks, width 64, 4 heads
        assert query.sharding.spec == P(None, "fsdp")  # layers unsplit, embed over fsdp
        mu = program.abstract_state["opt_state"]
        assert any(x.shape == query.shape and x.sharding.spec == P(None, "fsdp") for x in jax.tree.leaves(mu))
        state = program.init()
        batch = step_lib.global_batch({k: np.asarray(v) for k, v in _batch(np.random.default_rng(1), n=8).items()},
                                      program.batch_shardings)
        losses = []
        for _ in range(4):
            state, metrics = program.step(state, batch)
            losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
