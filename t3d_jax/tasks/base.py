"""The interface every task implements; the trainer, the AOT compiler and the evaluators use
only this.

A *task* is one training objective: which model it trains, what each batch must hold (its
batch contract), how the loss and its logged terms are computed from model and batch, and
what to do to the parameters after each optimizer update. The train step
(`t3d_jax.train.step`) is generic: it asks the task for the model, the batch shapes and the
loss, and knows nothing else about the method. A new method (fine-tuning, report
generation, MG-3D, MS-VLM) is a new module in `t3d_jax/tasks/` registered by name in
`t3d_jax/tasks/__init__.py`; the loop does not change.

Contract of `loss`: `batch` holds exactly the keys of `batch_spec()` (global arrays inside
the jitted step, sharded over the `batch` sharding rule); `step` may be a traced int32
scalar; it returns `(loss, metrics)` with float32 scalars. Every metric is logged under its
own name (`loss` is overwritten by the step with the returned loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.utils import cfg_get


class Task:
    """Base class: subclasses set `name` and implement `build_model`, `batch_spec`, `loss`."""

    name = ""

    def __init__(self, config):
        self.config = config

    # -- the config -----------------------------------------------------------------------------
    def prepare_config(self, config):
        """The config to train with, from the one given: the trainer calls this once before it
        builds the program, so a task can resolve a setting that depends on the data (e.g.
        `supervised`'s "balanced" `loss.pos_weight`) into plain values. Identity by default."""
        return config

    # -- the model ------------------------------------------------------------------------------
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    # -- the batch contract ---------------------------------------------------------------------
    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one *global* training batch: the keys the pipeline must deliver."""
        raise NotImplementedError

    # -- the objective --------------------------------------------------------------------------
    def loss(self, model: nnx.Module, batch: dict, *, step, deterministic: bool = False
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def after_update(self, params: dict) -> dict:
        """Applied to the parameters (a pure dict) right after each optimizer update, inside the
        step; identity by default (e.g. a task can clamp a parameter to its valid range)."""
        return params

    # -- helpers shared by the tasks -----------------------------------------------------------
    @property
    def batch_axes(self) -> tuple[str, ...]:
        """The mesh axes the batch is split over, from the `batch` sharding rule (one source
        for the step's input shardings and a loss's collectives)."""
        rule = cfg_get(cfg_get(self.config, "sharding_rules"), "batch", ("data", "fsdp"))
        return (rule,) if isinstance(rule, str) else tuple(rule)

    def global_batch_size(self) -> int:
        return int(self.config.train.global_batch_size)

    def views_spec(self) -> jax.ShapeDtypeStruct:
        """`views` of a global batch, [B, V, X, Y, Z, C] float32 (V = `data.num_views`, X, Y, Z =
        `data.view_size`, C = `model.image.in_channels`): what the training pipeline makes."""
        c = self.config
        x, y, z = (int(s) for s in c.data.view_size)
        shape = (self.global_batch_size(), int(c.data.num_views), x, y, z,
                 int(c.model.image.get("in_channels", 1)))
        return jax.ShapeDtypeStruct(shape, jnp.float32)


def f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)
