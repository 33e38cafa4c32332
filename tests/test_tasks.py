"""Tasks built by name (t3d_jax/tasks): the registry, the batch contracts, and the clip task's
logit-scale clamp after each update."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import clip as clip_config
from configs import t3d as t3d_config
from t3d_jax import tasks
from t3d_jax.train import mesh as mesh_lib
from t3d_jax.train import step as step_lib
from t3d_jax.utils import UserError


def test_tasks_are_built_by_name_and_declare_their_batch_contract():
    t3d, clip = tasks.get_task(t3d_config.get_config("tiny")), tasks.get_task(clip_config.get_config("tiny"))
    assert (type(t3d).__name__, type(clip).__name__) == ("T3DTask", "ClipTask")
    # The clip objective needs no crop boxes; TMA matches tokens across views through them.
    assert set(clip.batch_spec()) == {"views", "input_ids", "attention_mask"}
    assert set(t3d.batch_spec()) == {"views", "boxes", "input_ids", "attention_mask"}
    assert t3d.batch_spec()["boxes"].shape == (8, 2, 2, 3)
    assert clip.batch_spec()["views"].shape == (8, 1, 16, 16, 16, 1)  # configs/clip.py: one view
    bad = t3d_config.get_config("tiny")
    bad.task = "mae"
    assert {"clip", "t3d"} <= set(tasks.TASKS)
    with pytest.raises(UserError, match=r"config.task='mae': unknown task; choose one of \[.*'clip'.*'t3d'"):
        tasks.get_task(bad)


def test_batch_axes_come_from_the_sharding_rule():
    c = t3d_config.get_config("tiny")
    assert tasks.get_task(c).batch_axes == ("data", "fsdp")
    c.sharding_rules.batch = ("data",)
    assert tasks.get_task(c).batch_axes == ("data",)


def test_logit_scale_pushed_past_the_cap_comes_back():
    """With the clamp applied to the parameter after each update (not inside the loss), the
    loss keeps a gradient on the scale at and above the cap, so a scale pushed past it returns
    when the loss asks for a lower one (random embeddings: a sharper softmax only costs)."""
    config = clip_config.get_config("tiny")
    config.preprocess.max_len = 8
    config.optim.warmup_steps = 0
    config.optim.schedule = "constant"
    config.optim.lr = 1e-2
    cap = math.log(config.loss.logit_scale_max)
    task = tasks.get_task(config)
    rng = np.random.default_rng(0)
    batch = {k: (rng.integers(1, 100, v.shape) if v.dtype == jnp.int32 else rng.normal(size=v.shape)).astype(v.dtype)
             for k, v in task.batch_spec().items()}
    batch["attention_mask"][:] = 1

    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        program = step_lib.make_train_program(config, mesh)
        state = program.init()

    # The gradient of the loss of the program's freshly initialised model (copied to the host),
    # in one jitted program: op by op this backward pass costs twice the CPU time.
    host = jax.device_get({"params": state["params"], "rest": state["model_state"]})

    def loss_of_scale(scale, params, rest):
        m = nnx.merge(program.graphdef, dict(params, logit_scale=scale), rest)
        return task.loss(m, batch, step=0)[0]

    grad = float(jax.jit(jax.grad(loss_of_scale))(jnp.float32(cap + 0.5), host["params"], host["rest"]))
    assert grad > 0, grad  # the loss asks for a lower scale even above the cap

    with jax.set_mesh(mesh):
        params = dict(state["params"], logit_scale=jnp.float32(cap + 0.5))
        state = dict(state, params=jax.device_put(params, program.state_shardings["params"]))
        gbatch = step_lib.global_batch(batch, program.batch_shardings)
        scales = []
        for _ in range(4):
            state, _ = program.step(state, gbatch)
            scales.append(float(state["params"]["logit_scale"]))
    assert scales[0] <= cap + 1e-6, scales  # clamped after the first update
    assert scales[-1] < scales[0] - 1e-3, scales  # and moving back down, as the loss asks
    assert all(b < a for a, b in zip(scales, scales[1:])), scales


@pytest.mark.parametrize("config_module", [clip_config, t3d_config])
def test_report_impression_term_is_weighted_infonce_of_reports_and_impressions(config_module):
    """loss.impression_weight w adds w x symmetric InfoNCE between each report's embedding and
    its impression's, recomputed here in float64 NumPy from the model's own embeddings
    (tolerance 1e-5: float32 logits of unit vectors at scale <= 100), on top of the loss the
    task has at w = 0; w > 0 alone asks the pipeline for the impression view (prepare_config)."""
    config = config_module.get_config("tiny")
    config.preprocess.max_len = 8
    rng = np.random.default_rng(0)
    base_task = tasks.get_task(config)
    assert not base_task.prepare_config(config).data.impression_view
    assert not {"impression_ids", "impression_mask"} & set(base_task.batch_spec())
    config.loss.impression_weight = 0.5
    task = tasks.get_task(config)
    assert task.prepare_config(config).data.impression_view
    spec = task.batch_spec()
    assert {"impression_ids", "impression_mask"} <= set(spec)
    batch = {k: (rng.integers(1, 100, v.shape) if v.dtype == jnp.int32 else rng.uniform(size=v.shape)).astype(v.dtype)
             for k, v in spec.items()}
    batch["attention_mask"][:] = 1
    batch["impression_mask"][:] = 1
    batch["impression_mask"][:, 5:] = 0
    model = task.build_model(nnx.Rngs(0))
    total, metrics = task.loss(model, batch, step=0, deterministic=True)
    plain = {k: v for k, v in batch.items() if not k.startswith("impression")}
    without, _ = base_task.loss(model, plain, step=0, deterministic=True)

    _, t = model.encode_text(batch["input_ids"], batch["attention_mask"], deterministic=True)
    _, i = model.encode_text(batch["impression_ids"], batch["impression_mask"], deterministic=True)
    t, i = np.asarray(t, np.float64), np.asarray(i, np.float64)
    logits = math.exp(float(model.logit_scale[...])) * t @ i.T

    def xent(z):
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - np.diag(z)))

    want = 0.5 * (xent(logits) + xent(logits.T))
    np.testing.assert_allclose(float(metrics["loss_impression"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(without) + 0.5 * want, rtol=1e-5)
    config.loss.impression_weight = -1.0
    with pytest.raises(UserError, match="impression_weight"):
        tasks.get_task(config)
