"""Evaluate a checkpoint: restore its parameters, compute every figure, write DIR/eval/STEP/.

    python launch/evaluate.py --config=configs/t3d.py:demo --workdir runs/demo [--checkpoint STEP] [--split valid]

Steps: restore only the parameters of the checkpoint (latest by default; `t3d_jax.train.params`,
so `config.optim` need not match training) -> embed the evaluated split (whole volume at
``view_size``, the eval pipeline) and the prompt pairs -> zero-shot (CT-CLIP protocol) and
its leak-free variant (thresholds from another split, default ``train``), the text-tower
check, retrieval, linear probe -> the files of :mod:`t3d_jax.evaluate.report` and a table.

Each figure comes from its evaluator module (zeroshot.py, retrieval.py, linear_probe.py),
computed from one shared `EmbeddingCache`; `evaluate_embeddings` assembles them. The `full`
evaluator registered here does the same during training. docs/evaluation.md lists the
``config.eval`` keys and describes every figure.
"""

from __future__ import annotations

import os
import pathlib

import jax

from t3d_jax.data.prepared import check_data_config, sync_config_with_data
from t3d_jax.evaluate import ceiling, linear_probe, report, retrieval, zeroshot
from t3d_jax.evaluate.embedding import EmbeddingCache
from t3d_jax.evaluate.registry import EvalContext, register_evaluator
from t3d_jax.train import mesh as mesh_lib
from t3d_jax.train import params as params_lib


def evaluate_embeddings(cache: EmbeddingCache, *, final: bool = True) -> tuple[dict, dict]:
    """Every figure of the cache's model: (metrics for metrics.json, arrays for files and plots).

    ``final``: intervals from ``eval.num_bootstrap`` resamples and the text-tower check
    (else ``eval.periodic_num_bootstrap``, as during training).
    """
    zs, scores = zeroshot.figures(cache, final=final)
    ret, ranks = retrieval.figures(cache)
    evaluated = cache.evaluated()
    metrics = {"num_volumes": int(len(evaluated["labels"])), **zs, "retrieval": ret}
    probe = linear_probe.figures(cache)
    if probe is not None:
        metrics["linear_probe"] = probe
    arrays = {"scores": scores, "labels": evaluated["labels"], "id": evaluated["id"], "ranks": ranks}
    return metrics, arrays


def evaluate(ctx: EvalContext) -> tuple[dict, pathlib.Path | None]:
    """All figures of ``ctx``'s model with intervals; files in WORKDIR/eval/STEP/ (process 0)."""
    cache = EmbeddingCache.of(ctx)
    metrics, arrays = evaluate_embeddings(cache, final=True)
    metrics.update(step=int(ctx.step), split=cache.eval_split, data_dir=str(ctx.config.data.dir))
    ceiling_file = cache.setting("ceiling", "")
    if ceiling_file:
        metrics["ceiling"] = ceiling.ceiling_figures(ceiling_file, str(ctx.config.data.dir), cache.label_names)
    out = None
    if jax.process_index() == 0:
        out = report.write_outputs(pathlib.Path(ctx.workdir) / "eval" / str(ctx.step), metrics, arrays,
                                   cache.label_names)
    return metrics, out


def restored_context(config, workdir: str | os.PathLike, *, step: int | None = None,
                     split: str | None = None) -> EvalContext:
    """A final evaluation's context (`write=True`): `config` synced with its prepared data (a
    private copy; `split` sets `eval.split`), the checkpoint `step` (newest when None) of
    WORKDIR restored on the config's mesh. Expected problems (no prepared data, no checkpoint,
    a checkpoint of another model) are `t3d_jax.utils.UserError`s naming the fix."""
    check_data_config(config)
    config = sync_config_with_data(config)  # a private copy
    if split:
        config.eval.split = split
    mesh = mesh_lib.make_mesh(config.mesh)
    model, got = params_lib.restore_model(config, params_lib.checkpoint_dir(config, workdir), step, mesh=mesh)
    return EvalContext(model=model, config=config, step=got, workdir=os.fspath(workdir), mesh=mesh, write=True)


def evaluate_checkpoint(config, workdir: str | os.PathLike, *, step: int | None = None,
                        split: str | None = None) -> tuple[dict, pathlib.Path | None]:
    """What ``launch/evaluate.py`` does for the contrastive tasks: restore, evaluate, write,
    print the table (`restored_context` for the restore)."""
    ctx = restored_context(config, workdir, step=step, split=split)
    config = ctx.config
    metrics, out = evaluate(ctx)
    if jax.process_index() == 0:
        print(report.format_table(metrics, tuple(config.data.label_names)))
        print(f"Wrote {out}/metrics.json, per_label.csv, predictions.csv; plots: {out}/roc_grid.png, "
              f"{out}/retrieval_recall.png")
    return metrics, out


@register_evaluator("full")
def full_evaluator(ctx: EvalContext) -> dict[str, float]:
    """Everything, with intervals and files in WORKDIR/eval/STEP/ (as launch/evaluate.py)."""
    m, _ = evaluate(ctx)
    out = {f"zeroshot/mean_{k}": v["value"] for k, v in m["zeroshot"]["mean"].items()}
    out.update({f"retrieval/report_to_volume/{k}": v for k, v in m["retrieval"]["report_to_volume"].items()})
    return out
