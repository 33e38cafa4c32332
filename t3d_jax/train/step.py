"""The sharded training program: abstract state, its shardings, and one jitted step.

`make_train_program(config, mesh)` is the single place that decides how training runs on
devices. It is generic over tasks: `config.task` names a `t3d_jax.tasks` module, which gives
the model, the batch contract (`task.batch_spec()`) and the loss; this module adds the
optimizer, the shardings and the guard against non-finite steps. It returns a `TrainProgram`
whose `step` is one `jax.jit` with explicit `in_shardings`/`out_shardings` and the state
donated (the current form of a pjit step), so

* the loop calls `program.init()` then `program.step(state, batch)`;
* the AOT compiler (`t3d_jax.train.aot`) calls `program.step.lower(program.abstract_state,
  program.abstract_batch).compile()` on a mesh of TPU-topology devices, with no data and no
  parameters in memory.

The train state is a plain dict of arrays (simple to checkpoint, shard and inspect):

    step           int32 []       optimizer steps taken (skipped steps included)
    params         {path: array}  nnx.Param values (pure dict of the model's state)
    model_state    {path: array}  every other nnx variable, e.g. the model's RNG streams
                                  (keys + counters) -- the "RNG" that makes resume exact
    opt_state      optax state    sharded like the params it mirrors
    bad_steps      int32 []       consecutive non-finite steps (reset by a good step)
    skipped_steps  int32 []       total non-finite steps skipped

With `data.views_on='device'` the pipeline delivers the stored volumes instead of the views;
`program.prepare` (one more jitted program, run on the devices right before the step) makes
the views from them (`make_prepare`, `t3d_jax.data.device_views`). The step itself, its
`abstract_batch` and `batch_shardings` stay the task's contract, the same program as with host
views; `input_spec`/`input_shardings` describe the batch the pipeline delivers (the task's
contract with host views, where `prepare` is the identity).

The step is written functionally: `nnx.merge` the pure dicts into a model, compute
`task.loss(model, batch, step=, deterministic=False)` under `jax.value_and_grad`, read the
model's updated non-param state back with `nnx.split`. A step whose loss or gradient norm
is not finite keeps the old params/opt_state/model_state (`train.nonfinite_guard`: a
`jnp.where` per leaf or one `lax.cond` on the scalar flag; no host round trip) and counts
itself; the loop stops after `train.max_bad_steps` in a row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from t3d_jax import tasks
from t3d_jax.data import device_views
from t3d_jax.train import mesh as mesh_lib
from t3d_jax.train import optim as optim_lib
from t3d_jax.train import params as params_lib
from t3d_jax.utils import UserValueError, path_str

def abstract_batch(config) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes/dtypes of one global training batch: the task's batch contract (for AOT)."""
    return tasks.get_task(config).batch_spec()


@dataclasses.dataclass
class TrainProgram:
    """Everything needed to initialise, run, checkpoint and AOT-compile training."""

    mesh: jax.sharding.Mesh
    task: tasks.Task
    graphdef: Any
    init: Callable[[], dict]  # jitted; returns the sharded initial state
    step: Any  # jitted (state, batch) -> (state, metrics); state donated
    abstract_state: dict  # ShapeDtypeStructs carrying their shardings
    state_shardings: dict
    abstract_batch: dict
    batch_shardings: dict
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    lr_multipliers: dict[str, float]
    frozen_mask: dict
    trace_count: list = dataclasses.field(default_factory=lambda: [0])
    # The batch as the pipeline delivers it, and delivered -> `abstract_batch` on the devices
    # (the identity with host views; device views: `make_prepare`).
    input_spec: dict = None
    input_shardings: dict = None
    prepare: Callable[[dict], dict] = lambda batch: batch

    def model(self, state: dict) -> nnx.Module:
        """An nnx model holding `state`'s params (for evaluation and export)."""
        return nnx.merge(self.graphdef, state["params"], state["model_state"])

    def with_shardings(self, tree_abstract, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            tree_abstract, shardings)


def _strong_type(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return x
    return jax.lax.convert_element_type(x, x.dtype)


def _split_model(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def make_train_program(config, mesh: jax.sharding.Mesh) -> TrainProgram:
    """Builds the sharded init and step of `config`'s task on `mesh` (see module docstring)."""
    task = tasks.get_task(config)
    rules = config.sharding_rules
    num_steps = int(config.train.num_steps)
    accum = int(config.train.grad_accum_steps)
    guard = str(config.train.get("nonfinite_guard", "where"))
    if guard not in GUARDS:
        raise UserValueError(f"config.train.nonfinite_guard={guard!r}: choose one of {GUARDS}")
    dp = mesh_lib.data_parallel_size(mesh, rules)
    gbs = int(config.train.global_batch_size)
    if gbs % (accum * dp):
        raise UserValueError(
            f"config.train.global_batch_size={gbs} must be a multiple of grad_accum_steps "
            f"({accum}) x the data-parallel devices ({dp}, mesh {mesh_lib.describe(mesh)})")

    # -- Abstract model: structure, logical axis names, shapes and shardings (no memory) ------
    abstract = params_lib.abstract_model(config, mesh)
    graphdef, param_specs, abs_params = abstract.graphdef, abstract.param_specs, abstract.params
    param_shardings = abstract.shardings(abstract.params)

    # -- Optimizer: decay rule from the logical names; optionally flattened (optim.flatten) ----
    flatten = optim_lib.resolve_flatten(config.optim.get("flatten", "auto"))
    tx, schedule, label_mult = optim_lib.make_optimizer(
        config.optim, abs_params, num_steps, logical_specs=param_specs, flatten=flatten,
        param_shardings=param_shardings)
    frozen = optim_lib.frozen_mask(abs_params, config.optim)
    eligible = optim_lib.flat_eligible(abs_params, param_shardings) if flatten else None

    def init() -> dict:
        _, params, rest = _split_model(abstract.build())
        # Strong types throughout: a weak-typed leaf (e.g. from jnp.asarray(2.6)) would come
        # back strong from the step and force a second trace.
        params = jax.tree.map(_strong_type, nnx.to_pure_dict(params))
        rest = jax.tree.map(_strong_type, rest)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "model_state": nnx.to_pure_dict(rest),
            "opt_state": tx.init(params),
            "bad_steps": jnp.zeros((), jnp.int32),
            "skipped_steps": jnp.zeros((), jnp.int32),
        }

    abstract_state = jax.eval_shape(init)

    # -- Shardings: params by the rules table; optimizer state mirrors its params -------------
    replicated = mesh_lib.replicated(mesh)
    rest_shardings = abstract.shardings(abstract.rest)
    opt_shardings = mirror_param_shardings(
        abstract_state["opt_state"], abs_params, param_shardings, replicated)
    state_shardings = {
        "step": replicated, "params": param_shardings, "model_state": rest_shardings,
        "opt_state": opt_shardings, "bad_steps": replicated, "skipped_steps": replicated,
    }
    batch = task.batch_spec()
    batch_shardings = {k: mesh_lib.batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
    # What the pipeline delivers (with data.views_on='device' the stored volumes, boxes,
    # intensity maps and noise keys) and the jitted function that turns it into `batch`.
    inputs = device_views.input_spec(config, batch)
    input_shardings = {k: mesh_lib.batch_sharding(mesh, rules, v.ndim) for k, v in inputs.items()}
    prepare = make_prepare(config, batch, input_shardings, batch_shardings)
    micro_sharding = NamedSharding(mesh, P(None, *mesh_lib.batch_sharding(mesh, rules, 1).spec))

    trace_count = [0]

    def loss_fn(params, model_state, microbatch, step):
        model = nnx.merge(graphdef, params, model_state)
        loss, metrics = task.loss(model, microbatch, step=step, deterministic=False)
        _, _, rest = _split_model(model)
        return loss, (metrics, nnx.to_pure_dict(rest))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def compute_grads(state, batch):
        params, model_state, step = state["params"], state["model_state"], state["step"]
        if accum == 1:
            (loss, (metrics, model_state)), grads = grad_fn(params, model_state, batch, step)
            return loss, metrics, model_state, grads
        # [B, ...] -> [A, B/A, ...] taking every A-th example, so each micro-batch keeps the
        # batch's sharding over the data axes (no cross-device shuffle).
        micro = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
                micro_sharding), batch)

        def body(carry, mb):
            grads_sum, loss_sum, metrics_sum, ms = carry
            (loss, (metrics, ms)), grads = grad_fn(params, ms, mb, step)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)
            return (add(grads_sum, grads), loss_sum + loss, add(metrics_sum, metrics), ms), None

        zeros_grads = jax.tree.map(jnp.zeros_like, params)
        metrics_shape = jax.eval_shape(
            lambda: grad_fn(params, model_state, jax.tree.map(lambda x: x[0], micro), step))[0][1][0]
        zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)
        (grads, loss, metrics, model_state), _ = jax.lax.scan(
            body, (zeros_grads, jnp.zeros((), jnp.float32), zeros_metrics, model_state), micro)
        scale = 1.0 / accum
        return (loss * scale, jax.tree.map(lambda m: m * scale, metrics), model_state,
                jax.tree.map(lambda g: g * scale, grads))

    def train_step(state, batch):
        trace_count[0] += 1  # runs at trace time only: counts compilations of the step
        loss, metrics, model_state, grads = compute_grads(state, batch)
        grads = optim_lib.zero_frozen(grads, frozen)
        grad_norm = optim_lib.global_norm(grads, eligible)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state, model_state = _guarded_update(
            guard, ok, tx, grads, state["params"], state["opt_state"], model_state, state["model_state"],
            task.after_update)
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "model_state": model_state,
            "opt_state": opt_state,
            "bad_steps": jnp.where(ok, 0, state["bad_steps"] + 1).astype(jnp.int32),
            "skipped_steps": (state["skipped_steps"] + (~ok).astype(jnp.int32)).astype(jnp.int32),
        }
        lr = schedule(state["step"])
        out = dict(metrics)  # the model's loss terms etc., as it names them
        out.update({
            "loss": loss, "grad_norm": grad_norm, "lr": lr,
            "param_norm": optim_lib.global_norm(state["params"], eligible),
            "skipped": (~ok).astype(jnp.int32),
            "bad_steps": new_state["bad_steps"], "skipped_steps": new_state["skipped_steps"],
        })
        for label, mult in label_mult.items():
            if label != "default" and mult != 1.0:
                out[f"lr/{label}"] = lr * mult
        return new_state, out

    step = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
    init_jit = jax.jit(init, out_shardings=state_shardings)

    program = TrainProgram(
        mesh=mesh, task=task, graphdef=graphdef, init=init_jit, step=step,
        abstract_state=None, state_shardings=state_shardings,
        abstract_batch=None, batch_shardings=batch_shardings, tx=tx, schedule=schedule,
        lr_multipliers=label_mult, frozen_mask=frozen, trace_count=trace_count,
        input_shardings=input_shardings, prepare=prepare)
    program.abstract_state = program.with_shardings(abstract_state, state_shardings)
    program.abstract_batch = program.with_shardings(batch, batch_shardings)
    program.input_spec = program.with_shardings(inputs, input_shardings)
    return program


def make_prepare(config, task_batch: dict, input_shardings: dict, batch_shardings: dict
                 ) -> Callable[[dict], dict]:
    """The one place where the delivered batch becomes the task's batch: the identity with host
    views; with ``data.views_on='device'`` one jitted program that makes the views from the
    stored volumes on the devices (`t3d_jax.data.device_views`), each device its own examples,
    laid out over the batch axes exactly as host views arrive.

    A program of its own, run right before the step, rather than the step's first op: the step
    stays the host path's program (its memory plan, AOT figures and compile cache hold for both
    paths), and the int16 volumes (110 MB an example on the ct_clip grid) are released once the
    views exist instead of staying alive as step arguments through the backward pass."""
    if device_views.views_on(config.data) == "host" or "views" not in task_batch:
        return lambda batch: batch
    view_size = tuple(int(s) for s in config.data.view_size)
    noise_std = float(config.data.get("noise_std", 0.0))

    def prepare(batch):
        return device_views.batch_with_views(batch, task_batch, view_size=view_size, noise_std=noise_std)

    return jax.jit(prepare, in_shardings=(input_shardings,), out_shardings=batch_shardings)


GUARDS = ("where", "cond")


def _guarded_update(guard, ok, tx, grads, params, opt_state, new_model_state, old_model_state,
                    after_update=lambda p: p):
    """(params, opt_state, model_state) after the optimizer step if `ok`, else the old ones.

    Two forms with the same result (config `train.nonfinite_guard`), measured both ways:
    * "where" (default): `jnp.where(ok, new, old)` per leaf. XLA fuses the select into the
      update and writes in place: for `base` on TPU v5e (launch/aot_compile.py, v5e:2x2, one
      example per chip) 1.77 GiB per chip against 2.11 GiB with "cond".
    * "cond": one `lax.cond` on the scalar flag; the optimizer runs only on good steps. On
      XLA:CPU the where-form re-inlines Adam's moments into every select fusion and copies
      each moment buffer; the cond form made the `tiny` step 1.12x faster there (demo 1.01x,
      docs/performance.md), but its branches cannot update the donated buffers in place.
    """
    if guard == "cond":
        def apply(operands):
            grads, params, opt_state, new_ms, _ = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            return after_update(optax.apply_updates(params, updates)), opt_state, new_ms

        def keep(operands):
            _, params, opt_state, _, old_ms = operands
            return params, opt_state, old_ms

        return jax.lax.cond(ok, apply, keep, (grads, params, opt_state, new_model_state, old_model_state))
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = after_update(optax.apply_updates(params, updates))
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    return (keep_if_bad(new_params, params), keep_if_bad(new_opt_state, opt_state),
            keep_if_bad(new_model_state, old_model_state))


def mirror_param_shardings(opt_state, params, param_shardings, default):
    """Shardings for optimizer state: a leaf whose path ends with a parameter's path and has
    its shape (Adam's mu/nu, ...) gets that parameter's sharding; the rest (counts) `default`.

    (optax.tree_map_params does this too but trips over multi_transform's MaskedNodes.)
    """
    by_path = {}
    for (path, x), (_, s) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
        by_path[tuple(path_str((k,)) for k in path)] = (x.shape, s)

    def one(path, leaf):
        keys = tuple(path_str((k,)) for k in path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(one, opt_state)


_PROGRAMS: dict[tuple, TrainProgram] = {}
# Config sections that shape the compiled program (everything else is host-side).
_PROGRAM_KEYS = ("task", "model", "loss", "optim", "mesh", "sharding_rules", "preprocess")


def get_train_program(config, mesh: jax.sharding.Mesh) -> TrainProgram:
    """`make_train_program`, memoised per (program-relevant config, mesh), so calling
    `train_and_evaluate` again in one process (tests, notebooks) reuses the compiled step."""
    import json

    sections = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
                for k in _PROGRAM_KEYS if k in config}
    sections["train"] = {k: config.train.get(k) for k in
                         ("global_batch_size", "grad_accum_steps", "num_steps", "seed", "nonfinite_guard")}
    sections["data"] = {k: config.data[k] for k in ("num_views", "view_size", "label_names")}
    if device_views.views_on(config.data) == "device":  # `prepare` makes the views: its settings too
        sections["data"].update(views_on="device", noise_std=float(config.data.get("noise_std", 0.0)),
                                stored_size=device_views.stored_size(config))
    key = (json.dumps(sections, sort_keys=True, default=str), mesh.shape_tuple,
           tuple(d.id for d in mesh.devices.flat))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = make_train_program(config, mesh)
    return _PROGRAMS[key]


def global_batch(local_batch: dict[str, np.ndarray], batch_shardings: dict) -> dict[str, jax.Array]:
    """Assembles this process's slice of the batch into global arrays (multi-host safe).

    Only the keys the step consumes are sent; string ids and the like stay on the host.
    """
    return {k: jax.make_array_from_process_local_data(s, np.asarray(local_batch[k]))
            for k, s in batch_shardings.items()}


def flop_undercount_reasons(config) -> list[str]:
    """The settings under which :func:`flops_per_step` (and so MFU) is too low.

    XLA's cost analysis counts a while loop's body once, whatever its trip count: scanned
    layer stacks and accumulated micro-batches are such loops.
    """
    return [name for name, on in (
        ("model.image.scan_layers", bool(config.model.image.get("scan_layers", False))),
        ("model.text.scan_layers", bool(config.model.text.get("scan_layers", False))),
        ("train.grad_accum_steps > 1", int(config.train.grad_accum_steps) > 1)) if on]


def flops_per_step(compiled) -> float:
    """FLOPs of one compiled step from XLA's cost analysis (per device for SPMD programs)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", math.nan)) if cost else math.nan
