"""Periodic evaluation during training: a registry of named evaluators.

The loop runs every evaluator named in `config.eval.evaluators` every
`config.eval.every_steps` steps (0 = only after the last step) and writes what it returns
under `eval/<name>/<metric>` to TensorBoard and metrics.jsonl. Evaluators live with the
evaluation code; they register themselves here:

    from t3d_jax.train.hooks import register_evaluator

    @register_evaluator("zeroshot")
    def zeroshot_during_training(ctx: EvalContext) -> dict[str, float]:
        ...  # ctx.model (an nnx model with the current params), ctx.config, ctx.step

Every process calls the evaluator (models are sharded, so evaluation is collective); only
process 0 writes. Registration happens when `t3d_jax.evaluate` (and its submodules named
in `EVALUATOR_MODULES`) is imported, which `get_evaluator` does on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalContext:
    model: Any  # nnx.Module holding the current parameters (sharded)
    config: Any  # the full ml_collections config
    step: int
    workdir: str
    mesh: Any  # jax.sharding.Mesh of the training program


Evaluator = Callable[[EvalContext], dict[str, float]]
EVALUATORS: dict[str, Evaluator] = {}
# Modules imported before looking an evaluator up (they call register_evaluator).
EVALUATOR_MODULES: list[str] = ["t3d_jax.evaluate"]


def register_evaluator(name: str) -> Callable[[Evaluator], Evaluator]:
    def wrap(fn: Evaluator) -> Evaluator:
        if name in EVALUATORS and EVALUATORS[name] is not fn:
            log.warning("evaluator %r registered twice; the later one wins", name)
        EVALUATORS[name] = fn
        return fn
    return wrap


def get_evaluator(name: str) -> Evaluator:
    if name not in EVALUATORS:
        for module in EVALUATOR_MODULES:
            try:
                importlib.import_module(module)
            except ImportError as e:
                log.debug("could not import %s: %s", module, e)
    if name not in EVALUATORS:
        raise KeyError(f"config.eval.evaluators names {name!r}, but no evaluator of that name is "
                       f"registered; known: {sorted(EVALUATORS)}")
    return EVALUATORS[name]


def run_evaluators(names, ctx: EvalContext) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        results = get_evaluator(name)(ctx) or {}
        out.update({f"eval/{name}/{k}": float(v) for k, v in results.items()})
    return out
