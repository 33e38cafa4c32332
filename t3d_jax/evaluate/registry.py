"""Evaluators built by name: the one interface between training and evaluation.

The train loop calls `run_evaluators(config.eval.evaluators, ctx)` every
`config.eval.every_steps` steps (0 = only after the last step) and writes what comes back
under `eval/<name>/<metric>` to TensorBoard and metrics.jsonl. `launch/evaluate.py` uses the
same evaluators on a restored checkpoint.

Each evaluator is one module of `t3d_jax/evaluate/` that computes only its own figures. The
expensive part they share, embedding a split and the prompts, is done once per context by
`ctx.cache` (an `EmbeddingCache` from `evaluate/embedding.py`), so asking for `retrieval`
alone embeds the evaluated split only, and asking for several evaluators embeds it once.

Registered (`evaluate/evaluators.py` imports their modules): `zeroshot`, `retrieval`,
`linear_probe` (scalars, no files), `full` (`evaluate/run.py`: every figure with its
intervals and the files of launch/evaluate.py in WORKDIR/eval/STEP/) and `segmentation`
(`evaluate/seg_eval.py`: Dice / HD95 per class of a segmentation model; files when ctx.write).

Every process calls the evaluators (models are sharded, so evaluation is collective); only
process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from t3d_jax.utils import UserValueError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalContext:
    model: Any  # nnx.Module holding the parameters to evaluate (sharded)
    config: Any  # the full ml_collections config
    step: int
    workdir: str
    mesh: Any  # jax.sharding.Mesh the model's arrays live on
    # A final evaluation (launch/evaluate.py): the scalar evaluators use eval.num_bootstrap
    # resamples instead of eval.periodic_num_bootstrap. (`full` always writes its files.)
    write: bool = False
    cache: Any = None  # set on first use: the shared EmbeddingCache of this (model, step)


Evaluator = Callable[[EvalContext], dict[str, float]]
EVALUATORS: dict[str, Evaluator] = {}


def register_evaluator(name: str) -> Callable[[Evaluator], Evaluator]:
    def wrap(fn: Evaluator) -> Evaluator:
        if name in EVALUATORS and EVALUATORS[name] is not fn:
            log.warning("evaluator %r registered twice; the later one wins", name)
        EVALUATORS[name] = fn
        return fn
    return wrap


def get_evaluator(name: str) -> Evaluator:
    _import_evaluators()
    if name not in EVALUATORS:
        raise UserValueError(f"config.eval.evaluators names {name!r}, but no evaluator of that name is "
                             f"registered; known: {sorted(EVALUATORS)}")
    return EVALUATORS[name]


def run_evaluators(names, ctx: EvalContext) -> dict[str, float]:
    """Runs the named evaluators on one context; returns `{eval/<name>/<metric>: value}`."""
    out: dict[str, float] = {}
    for name in names:
        results = get_evaluator(name)(ctx) or {}
        out.update({f"eval/{name}/{k}": float(v) for k, v in results.items()})
    return out


def _import_evaluators() -> None:
    """The evaluator modules register themselves on import (plain imports, no importlib)."""
    from t3d_jax.evaluate import evaluators  # noqa: F401
