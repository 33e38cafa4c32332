"""Evaluate a checkpoint: embed a split, run every evaluator, write DIR/eval/STEP/.

    python launch/evaluate.py --config=configs/t3d.py:demo --workdir runs/demo [--checkpoint STEP] [--split valid]

Steps: restore the checkpoint (latest by default) into the training program's sharded
abstract state -> embed the evaluated split (whole volume at ``view_size``, the eval
pipeline) and the prompt pairs -> zero-shot (CT-CLIP protocol, :mod:`zeroshot`), its
leak-free variant (thresholds from another split, default ``train``), retrieval, linear
probe -> files:

    metrics.json     every figure with its 95 % bootstrap interval, protocol settings
    per_label.csv    one row per label
    predictions.csv  per volume id: the zero-shot score of every label and its labels
    roc_grid.png     per-label ROC curves;  retrieval_recall.png  Recall@K curves

The same code runs during training: the evaluators registered at the bottom
(``zeroshot``, ``retrieval``, ``linear_probe``, ``full``) are named in
``config.eval.evaluators``; they share one embedding pass per step.

Config keys read (all optional, under ``config.eval``): ``batch_size``, ``split``
(default ``config.data.eval_split``), ``threshold_split`` ("train"; "" = no leak-free
variant), ``probe_split`` ("train"; "" = no probe), ``templates``, ``num_bootstrap``
(1000), ``periodic_num_bootstrap`` (0, for the scalar evaluators during training),
``threshold_rule`` ("roc" | "ct_clip_grid"), ``use_logit_scale`` (True), ``probe_C``,
``retrieval_ks``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import pathlib
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from t3d_jax.evaluate import linear_probe as probe_lib
from t3d_jax.evaluate import plots, retrieval, zeroshot
from t3d_jax.train import hooks
from t3d_jax.train import mesh as mesh_lib

log = logging.getLogger(__name__)


def _eval_get(config, key: str, default: Any) -> Any:
    section = config.get("eval") if hasattr(config, "get") else None
    if section is None or not hasattr(section, "get"):
        return default
    value = section.get(key, default)
    return default if value is None else value


# ----------------------------------------------------------------------------------- embedding


_JIT_CACHE: dict = {}


def _make_jitted(graphdef, out_sharding, with_tokens: bool):
    """jitted (state, inputs) -> embeddings for one model structure; grid noted at trace time."""
    grid: dict = {}

    def vol(state, volume):
        return nnx.merge(graphdef, state).embed_volume(volume)

    def txt(state, ids, mask):
        return nnx.merge(graphdef, state).embed_text(ids, mask)

    def tok(state, volume):
        out = nnx.merge(graphdef, state).volume_tokens(volume)
        if isinstance(out, dict):
            grid["grid"] = tuple(int(g) for g in out["grid"])  # static: known while tracing
            return out["tokens"]
        return out

    return (jax.jit(vol, out_shardings=out_sharding), jax.jit(txt, out_shardings=out_sharding),
            jax.jit(tok, out_shardings=out_sharding) if with_tokens else None, grid)


class Embedder:
    """Jitted volume / text embedding of an nnx model, batch split over the data axes.

    Inputs are padded to a multiple of the data-parallel device count (padding rows are
    dropped from the result), placed with ``make_array_from_callback`` so every process of
    a multi-host job can hold the full batch, and the outputs are gathered to every host.
    Embedding one example never depends on the others in its batch (no batch statistics),
    which the export tests check.
    """

    def __init__(self, model: nnx.Module, mesh: jax.sharding.Mesh, rules):
        self.mesh = mesh
        self.multiple = max(1, mesh_lib.data_parallel_size(mesh, rules))
        self.sharding = mesh_lib.batch_sharding(mesh, rules, 1)
        replicated = mesh_lib.replicated(mesh)
        graphdef, state = nnx.split(model)
        self._state = state
        # One compiled program per (model structure, mesh): re-evaluating new parameters of
        # the same model (every periodic evaluation, every checkpoint) reuses it.
        key = (graphdef, mesh, self.sharding)
        if key not in _JIT_CACHE:
            _JIT_CACHE[key] = _make_jitted(graphdef, replicated, hasattr(model, "volume_tokens"))
        self._vol, self._txt, self._tok, self._grid = _JIT_CACHE[key]
        self.model = model

    def _place(self, x: np.ndarray) -> tuple[jax.Array, int]:
        n = x.shape[0]
        padded = -(-n // self.multiple) * self.multiple
        if padded != n:
            x = np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)])
        arr = jax.make_array_from_callback(x.shape, self.sharding, lambda idx: x[idx])
        return arr, n

    @staticmethod
    def _fetch(y, n: int) -> np.ndarray:
        y = multihost_utils.process_allgather(y, tiled=True) if jax.process_count() > 1 else y
        return np.asarray(y, np.float32)[:n]

    def volumes(self, volume: np.ndarray) -> np.ndarray:
        """[B, X, Y, Z, 1] float32 model-input volumes -> [B, D] L2-normalised embeddings."""
        arr, n = self._place(np.asarray(volume, np.float32))
        with jax.set_mesh(self.mesh):
            return self._fetch(self._vol(self._state, arr), n)

    def texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids, n = self._place(np.asarray(input_ids, np.int32))
        mask, _ = self._place(np.asarray(attention_mask, np.int32))
        with jax.set_mesh(self.mesh):
            return self._fetch(self._txt(self._state, ids, mask), n)

    def volume_tokens(self, volume: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int] | None]:
        """Patch tokens [B, N, d] of the image encoder and their grid (gx, gy, gz)."""
        if self._tok is None:
            raise NotImplementedError(f"{type(self.model).__name__} has no volume_tokens(volume) method")
        arr, n = self._place(np.asarray(volume, np.float32))
        with jax.set_mesh(self.mesh):
            tokens = self._fetch(self._tok(self._state, arr), n)
        return tokens, self._grid.get("grid")


def eval_batch_size(requested: int, multiple: int) -> int:
    """The requested batch size rounded up to a multiple of the data-parallel devices."""
    return max(multiple, -(-int(requested) // multiple) * multiple)


def embed_split(embedder: Embedder, data_config, split: str, batch_size: int) -> dict[str, np.ndarray]:
    """Every record of ``split`` once: ids, volume / report embeddings, labels (valid rows only)."""
    from t3d_jax.data.pipeline import eval_iterator

    ids, vols, txts, labels = [], [], [], []
    for batch in eval_iterator(data_config, split, eval_batch_size(batch_size, embedder.multiple)):
        valid = np.asarray(batch["valid"], bool)
        if not valid.any():
            continue
        v = embedder.volumes(batch["volume"])
        t = embedder.texts(batch["input_ids"], batch["attention_mask"])
        ids.extend(str(i) for i in np.asarray(batch["id"])[valid])
        vols.append(v[valid])
        txts.append(t[valid])
        labels.append(np.asarray(batch["labels"], np.float32)[valid])
    if not ids:
        raise ValueError(f"{data_config.dir}: split {split!r} has no records to evaluate")
    return {"id": np.asarray(ids), "volume": np.concatenate(vols), "text": np.concatenate(txts),
            "labels": np.concatenate(labels)}


def make_tokenizer(config, tokenizer_info: dict | None = None):
    """The WordPiece tokenizer the data was prepared with, for prompts and free text.

    Vocab: ``dataset.json``'s tokenizer entry (``tokenizer_info``, read from
    ``config.data.dir`` when not given), else ``config.preprocess.vocab``, else the bundled
    bert-base-uncased vocab; lower-casing and length likewise.
    """
    from t3d_jax.data.prepare import default_vocab_path
    from t3d_jax.data.tokenizer import WordPieceTokenizer

    if tokenizer_info is None:
        data_dir = config.data.get("dir", "")
        if data_dir and (pathlib.Path(data_dir) / "dataset.json").is_file():
            from t3d_jax.data.pipeline import read_dataset_info
            tokenizer_info = read_dataset_info(data_dir).get("tokenizer")
    info = dict(tokenizer_info or {})
    vocab = info.get("vocab") if info.get("vocab") and pathlib.Path(info["vocab"]).is_file() else None
    vocab = vocab or config.preprocess.get("vocab", "") or str(default_vocab_path())
    lowercase = bool(info.get("lowercase", config.preprocess.get("lowercase", True)))
    max_len = int(info.get("max_len", config.preprocess.get("max_len", 128)))
    return WordPieceTokenizer(vocab, lowercase=lowercase, max_len=max_len)


def prompt_embeddings(embedder: Embedder, tokenizer, label_names: Sequence[str],
                      templates: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    positive, negative = zeroshot.build_prompts(label_names, templates)
    ids, mask = tokenizer.encode(positive + negative)
    emb = embedder.texts(ids, mask)
    return emb[: len(positive)], emb[len(positive):]


def logit_scale_of(model, config) -> float:
    """The model's effective logit scale, exp(learned log scale) clamped like the loss; 1.0 without one."""
    raw = getattr(model, "logit_scale", None)
    if raw is None:
        return 1.0
    value = float(np.asarray(raw[...] if isinstance(raw, nnx.Variable) else raw).reshape(-1)[0])
    cap = getattr(model, "logit_scale_max", None)
    if cap is None and hasattr(config, "loss"):
        cap = config.loss.get("logit_scale_max", None)
    return math.exp(min(value, math.log(cap))) if cap else math.exp(value)


# ----------------------------------------------------------------------------------- evaluation


def evaluate_embeddings(
    evaluated: dict[str, np.ndarray],
    label_names: Sequence[str],
    positive: np.ndarray,
    negative: np.ndarray,
    *,
    logit_scale: float = 1.0,
    threshold_set: dict[str, np.ndarray] | None = None,
    threshold_split: str = "",
    probe_set: dict[str, np.ndarray] | None = None,
    probe_split: str = "",
    num_bootstrap: int = 1000,
    threshold_rule: str = "roc",
    templates: Sequence[str] = zeroshot.DEFAULT_TEMPLATES,
    ks: Sequence[int] = retrieval.DEFAULT_KS,
    probe_C: float = 1.0,
    seed: int = 0,
) -> tuple[dict, dict]:
    """All figures for one set of embeddings. Returns (metrics, arrays for files and plots)."""
    scores = zeroshot.pair_softmax_scores(evaluated["volume"], positive, negative, logit_scale)
    labels = evaluated["labels"]
    zs = zeroshot.evaluate_scores(scores, labels, label_names, num_bootstrap=num_bootstrap,
                                  threshold_rule=threshold_rule, seed=seed)
    zs.update(templates=list(templates), logit_scale=logit_scale,
              score="softmax over (present, not present) of logit_scale * cosine; 'present' entry")
    metrics: dict[str, Any] = {"num_volumes": int(len(labels)), "zeroshot": zs}
    # Diagnostic: the same protocol with each volume's *report* in place of the volume. It
    # shows whether the text tower itself tells "present" from "not present" -- the ceiling
    # that aligning volumes to their reports can reach zero-shot.
    by_report = zeroshot.evaluate_scores(
        zeroshot.pair_softmax_scores(evaluated["text"], positive, negative, logit_scale), labels, label_names,
        num_bootstrap=0, threshold_rule=threshold_rule)
    metrics["zeroshot_reports"] = {
        "mean_auc": by_report["mean"]["auc"]["value"],
        "per_label_auc": {n: by_report["per_label"][n]["auc"]["value"] for n in label_names},
        "note": "reports scored against the prompts instead of volumes (text-tower diagnostic, not a result)"}
    arrays: dict[str, Any] = {"scores": scores, "labels": labels, "id": evaluated["id"]}

    if threshold_set is not None:
        other = zeroshot.pair_softmax_scores(threshold_set["volume"], positive, negative, logit_scale)
        chosen = zeroshot.evaluate_scores(other, threshold_set["labels"], label_names, num_bootstrap=0,
                                          threshold_rule=threshold_rule, with_auc=False)
        thr = zeroshot.thresholds_of(chosen, label_names)
        lf = zeroshot.evaluate_scores(scores, labels, label_names, thresholds=thr, num_bootstrap=num_bootstrap,
                                      threshold_rule=threshold_rule, seed=seed, with_auc=False)
        lf.update(thresholds_from=f"split {threshold_split!r} ({len(threshold_set['labels'])} volumes)",
                  note="AUC has no threshold: it is the protocol's AUC (zeroshot.mean.auc)")
        metrics["zeroshot_leakfree"] = lf

    ret = retrieval.retrieval_metrics(evaluated["volume"], evaluated["text"], ks)
    sim = evaluated["text"].astype(np.float64) @ evaluated["volume"].T.astype(np.float64)
    arrays["ranks"] = {"report_to_volume": retrieval.true_partner_ranks(sim),
                       "volume_to_report": retrieval.true_partner_ranks(sim.T)}
    metrics["retrieval"] = ret

    if probe_set is not None:
        pr = probe_lib.linear_probe(probe_set["volume"], probe_set["labels"], evaluated["volume"], labels,
                                    label_names, C=probe_C)
        pr.pop("scores")
        pr["train_split"] = probe_split
        metrics["linear_probe"] = pr
    return metrics, arrays


def _json_ready(x):
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None  # JSON has no NaN / inf
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _json_ready(x.tolist())
    return x


def write_outputs(out_dir: str | os.PathLike, metrics: dict, arrays: dict, label_names: Sequence[str]) -> pathlib.Path:
    """metrics.json, per_label.csv, predictions.csv and the two PNGs into ``out_dir``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_json_ready(metrics), indent=2))

    zs = metrics["zeroshot"]["per_label"]
    lf = metrics.get("zeroshot_leakfree", {}).get("per_label")
    pr = metrics.get("linear_probe", {}).get("per_label")
    with open(out / "per_label.csv", "w", newline="") as f:
        w = csv.writer(f)
        head = ["label", "n", "n_positive", "threshold"]
        for m in zeroshot.METRICS:
            head += [m, f"{m}_ci_low", f"{m}_ci_high"]
        if lf:
            head += ["leakfree_threshold", "leakfree_accuracy", "leakfree_f1_weighted", "leakfree_precision"]
        if pr:
            head += ["probe_auc"]
        w.writerow(head)
        for name in label_names:
            e = zs[name]
            row = [name, e["n"], e["n_positive"], e["threshold"]]
            for m in zeroshot.METRICS:
                row += [e[m]["value"], e[m]["ci_low"], e[m]["ci_high"]]
            if lf:
                row += [lf[name]["threshold"]] + [lf[name][m]["value"] for m in ("accuracy", "f1_weighted", "precision")]
            if pr:
                row += [pr[name]["auc"]]
            w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])

    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id"] + [f"score:{n}" for n in label_names] + [f"label:{n}" for n in label_names])
        for i, vid in enumerate(arrays["id"]):
            labels = ["" if np.isnan(v) else int(v) for v in arrays["labels"][i]]
            w.writerow([vid] + [f"{s:.9g}" for s in arrays["scores"][i]] + labels)

    plots.plot_roc_grid(arrays["scores"], arrays["labels"], label_names, out / "roc_grid.png",
                        aucs=[zs[n]["auc"]["value"] for n in label_names],
                        thresholds=[zs[n]["threshold"] for n in label_names],
                        threshold_rule=metrics["zeroshot"].get("threshold_rule", "roc"))
    plots.plot_recall_curve(arrays["ranks"], out / "retrieval_recall.png")
    return out


def format_table(metrics: dict, label_names: Sequence[str]) -> str:
    """The short console summary: per-label zero-shot figures, means with intervals, retrieval."""
    zs = metrics["zeroshot"]
    f = lambda v: "  n/a" if v is None or not np.isfinite(v) else f"{v:5.3f}"  # noqa: E731
    width = max(5, *(len(n) for n in label_names))
    lines = [f"Zero-shot (CT-CLIP protocol, {zs['num_volumes']} volumes, threshold chosen on this set)",
             f"{'label':<{width}}   AUC    ACC    F1w    PREC   n+"]
    for name in label_names:
        e = zs["per_label"][name]
        lines.append(f"{name:<{width}}  {f(e['auc']['value'])}  {f(e['accuracy']['value'])}  "
                     f"{f(e['f1_weighted']['value'])}  {f(e['precision']['value'])}  {e['n_positive']:3d}")
    m = zs["mean"]
    lines.append(f"{'MEAN':<{width}}  {f(m['auc']['value'])}  {f(m['accuracy']['value'])}  "
                 f"{f(m['f1_weighted']['value'])}  {f(m['precision']['value'])}")
    ci = lambda e: f"[{f(e['ci_low'])}, {f(e['ci_high'])}]"  # noqa: E731
    lines.append(f"95% CI ({zs['num_bootstrap']} bootstrap): AUC {ci(m['auc'])}  ACC {ci(m['accuracy'])}  "
                 f"F1w {ci(m['f1_weighted'])}  PREC {ci(m['precision'])}")
    if "zeroshot_leakfree" in metrics:
        lm = metrics["zeroshot_leakfree"]["mean"]
        lines.append(f"Leak-free (thresholds from {metrics['zeroshot_leakfree']['thresholds_from']}): "
                     f"ACC {f(lm['accuracy']['value'])}  F1w {f(lm['f1_weighted']['value'])}  "
                     f"PREC {f(lm['precision']['value'])}")
    if "zeroshot_reports" in metrics:
        lines.append(f"Text-tower check (reports instead of volumes vs the prompts): mean AUC "
                     f"{f(metrics['zeroshot_reports']['mean_auc'])}")
    r = metrics["retrieval"]
    for d in ("report_to_volume", "volume_to_report"):
        lines.append(f"Retrieval {d.replace('_', ' ')} (N={r['num_items']}): " + "  ".join(
            f"{k} {v:.3f}" for k, v in r[d].items()) + f"   (chance R@5 {r['chance'].get('R@5', float('nan')):.3f})")
    if "linear_probe" in metrics:
        p = metrics["linear_probe"]
        lines.append(f"Linear probe (fit on {p['train_split']!r}): mean AUC {f(p['mean_auc'])} "
                     f"over {p['num_labels_in_mean']} labels")
    return "\n".join(lines)


def run_evaluation(model, config, *, step: int, workdir: str | os.PathLike, mesh, split: str | None = None,
                   write: bool = True, cache: dict | None = None) -> tuple[dict, pathlib.Path | None]:
    """Embeds and evaluates ``split`` with ``model``; writes WORKDIR/eval/STEP/ when ``write``."""
    split = split or _eval_get(config, "split", "") or config.data.eval_split
    label_names = tuple(config.data.label_names)
    batch_size = int(_eval_get(config, "batch_size", 8))
    embedder = Embedder(model, mesh, config.sharding_rules)
    sets = cache if cache is not None else {}

    def get(name: str):
        if name not in sets:
            sets[name] = embed_split(embedder, config.data, name, batch_size)
        return sets[name]

    evaluated = get(split)
    templates = tuple(_eval_get(config, "templates", zeroshot.DEFAULT_TEMPLATES))
    positive, negative = prompt_embeddings(embedder, make_tokenizer(config), label_names, templates)
    thr_split = _eval_get(config, "threshold_split", "train")
    probe_split = _eval_get(config, "probe_split", "train")
    available = _available_splits(config.data.dir)
    metrics, arrays = evaluate_embeddings(
        evaluated, label_names, positive, negative,
        logit_scale=logit_scale_of(model, config) if _eval_get(config, "use_logit_scale", True) else 1.0,
        threshold_set=get(thr_split) if thr_split and thr_split != split and thr_split in available else None,
        threshold_split=thr_split,
        probe_set=get(probe_split) if probe_split and probe_split != split and probe_split in available else None,
        probe_split=probe_split,
        num_bootstrap=int(_eval_get(config, "num_bootstrap", 1000)) if write else int(
            _eval_get(config, "periodic_num_bootstrap", 0)),
        threshold_rule=_eval_get(config, "threshold_rule", "roc"),
        templates=templates,
        ks=tuple(_eval_get(config, "retrieval_ks", retrieval.DEFAULT_KS)),
        probe_C=float(_eval_get(config, "probe_C", 1.0)),
        seed=int(config.get("seed", 0)),
    )
    metrics.update(step=int(step), split=split, data_dir=str(config.data.dir))
    out = None
    if write and jax.process_index() == 0:
        out = write_outputs(pathlib.Path(workdir) / "eval" / str(step), metrics, arrays, label_names)
    return metrics, out


def _available_splits(data_dir: str) -> set[str]:
    from t3d_jax.data.pipeline import read_dataset_info

    return set((read_dataset_info(data_dir).get("splits") or {}).keys())


# ----------------------------------------------------------------------------------- checkpoints


def load_checkpoint(config, workdir: str | os.PathLike, step: int | None = None, *, require_data: bool = True):
    """(model, step, mesh, config) from WORKDIR/checkpoints (or config.checkpoint.dir).

    The state is restored into the training program's abstract sharded state, so a run
    saved on one mesh evaluates on another. ``require_data=False`` (export) works without
    the prepared dataset on this machine; the config must then match the trained shapes.
    """
    from t3d_jax.train import checkpoint as ckpt_lib
    from t3d_jax.train import step as step_lib
    from t3d_jax.train.loop import check_data_config, sync_config_with_data

    if require_data or (config.data.get("dir") and (pathlib.Path(config.data.dir) / "dataset.json").is_file()):
        check_data_config(config)
        config = sync_config_with_data(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):  # scoped: a library call never leaves a global mesh behind
        return _restore_model(config, workdir, step, mesh, step_lib.make_train_program(config, mesh), ckpt_lib)


def _restore_model(config, workdir, step, mesh, program, ckpt_lib):
    ckpt_dir = pathlib.Path(config.checkpoint.get("dir") or pathlib.Path(workdir) / "checkpoints").absolute()
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint folder; train first (launch/train.py --workdir {workdir})")
    manager = ckpt_lib.make_manager(ckpt_dir, config.checkpoint)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{ckpt_dir}: no finished checkpoint")
        if step is None or step < 0:
            state, got = ckpt_lib.restore_latest(manager, program.abstract_state)
            if state is None:
                raise FileNotFoundError(f"{ckpt_dir}: none of the steps {steps} can be restored")
        else:
            if int(step) not in steps:
                raise FileNotFoundError(f"{ckpt_dir}: no checkpoint at step {step}; have {steps}")
            state, got = ckpt_lib.restore(manager, int(step), program.abstract_state), int(step)
    finally:
        manager.close()
    return program.model(state), int(got), mesh, config


def evaluate_checkpoint(config, workdir: str | os.PathLike, *, step: int | None = None,
                        split: str | None = None) -> tuple[dict, pathlib.Path | None]:
    """What ``launch/evaluate.py`` does: restore, evaluate, write, print the table."""
    model, got, mesh, config = load_checkpoint(config, workdir, step)
    metrics, out = run_evaluation(model, config, step=got, workdir=workdir, mesh=mesh, split=split)
    if jax.process_index() == 0:
        print(format_table(metrics, tuple(config.data.label_names)))
        print(f"Wrote {out}/metrics.json, per_label.csv, predictions.csv; plots: {out}/roc_grid.png, "
              f"{out}/retrieval_recall.png")
    return metrics, out


# ----------------------------------------------------------------------------------- during training

_STEP_CACHE: dict[tuple, dict] = {}


def _cached_sets(ctx: hooks.EvalContext) -> dict:
    """One embedding pass per (model, step), shared by the evaluators named for that step."""
    key = (id(ctx.model), ctx.step)
    if key not in _STEP_CACHE:
        _STEP_CACHE.clear()
        _STEP_CACHE[key] = {}
    return _STEP_CACHE[key]


def _periodic(ctx: hooks.EvalContext, write: bool) -> dict:
    sets = _cached_sets(ctx)
    key = f"__metrics_write={write}"
    if key not in sets:
        embeddings = {k: v for k, v in sets.items() if not k.startswith("__")}
        sets[key], _ = run_evaluation(ctx.model, ctx.config, step=ctx.step, workdir=ctx.workdir, mesh=ctx.mesh,
                                      write=write, cache=embeddings)
        sets.update(embeddings)
    return sets[key]


@hooks.register_evaluator("zeroshot")
def zeroshot_evaluator(ctx: hooks.EvalContext) -> dict[str, float]:
    m = _periodic(ctx, write=False)
    out = {f"mean_{k}": v["value"] for k, v in m["zeroshot"]["mean"].items()}
    if "zeroshot_leakfree" in m:
        out.update({f"leakfree_mean_{k}": v["value"] for k, v in m["zeroshot_leakfree"]["mean"].items()
                    if k != "auc"})
    return out


@hooks.register_evaluator("retrieval")
def retrieval_evaluator(ctx: hooks.EvalContext) -> dict[str, float]:
    m = _periodic(ctx, write=False)["retrieval"]
    return {f"{d}/{k}": v for d in ("report_to_volume", "volume_to_report") for k, v in m[d].items()}


@hooks.register_evaluator("linear_probe")
def linear_probe_evaluator(ctx: hooks.EvalContext) -> dict[str, float]:
    m = _periodic(ctx, write=False)
    return {"mean_auc": m["linear_probe"]["mean_auc"]} if "linear_probe" in m else {}


@hooks.register_evaluator("full")
def full_evaluator(ctx: hooks.EvalContext) -> dict[str, float]:
    """Everything, with intervals and files in WORKDIR/eval/STEP/ (as launch/evaluate.py)."""
    m = _periodic(ctx, write=True)
    out = {f"zeroshot/mean_{k}": v["value"] for k, v in m["zeroshot"]["mean"].items()}
    out.update({f"retrieval/report_to_volume/{k}": v for k, v in m["retrieval"]["report_to_volume"].items()})
    return out
