"""Embedding for evaluation and export: the jitted `Embedder` and the per-context `EmbeddingCache`.

Embedding a split is the expensive part of every evaluator; the figures themselves are
NumPy / scikit-learn on the embeddings. So the evaluators never embed: they ask the
`EmbeddingCache` of their context (`EmbeddingCache.of(ctx)`, stored in `ctx.cache`), which
embeds a split or a list of texts the first time one is asked for and keeps it. Asking for
`retrieval` alone embeds the evaluated split only; asking for several evaluators in one
context embeds each split once.

Compilation: the one jitted function, `_apply`, is module-level and takes the model's graphdef
as a static argument, so jax's own compilation cache holds one program per (model structure, mesh,
input shape). New parameters of the same model (every periodic evaluation, every
checkpoint, every export) reuse it; no table of compiled programs is kept here.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from t3d_jax.train import mesh as mesh_lib
from t3d_jax.utils import cfg_get


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _apply(graphdef, method: str, out_sharding, state, *inputs):
    """`model.<method>(*inputs)` of the model (graphdef, state), replicated on every device."""
    out = getattr(nnx.merge(graphdef, state), method)(*inputs)
    if method == "volume_tokens":
        out = out["tokens"] if isinstance(out, dict) else out
    return jax.lax.with_sharding_constraint(out, out_sharding)


def pad_and_place(x: np.ndarray, multiple: int, sharding) -> tuple[jax.Array, int]:
    """(`x` padded with zero rows to a multiple of `multiple` and placed with `sharding` by
    ``make_array_from_callback``, so every process can hold the full batch; its real row count)."""
    n = x.shape[0]
    padded = -(-n // multiple) * multiple
    if padded != n:
        x = np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)])
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), n


class Embedder:
    """Jitted volume / text embedding of an nnx model, batch split over the data axes.

    Inputs are padded to a multiple of the data-parallel device count (padding rows are
    dropped from the result), placed with ``make_array_from_callback`` so every process of
    a multi-host job can hold the full batch, and the outputs are gathered to every host.
    Embedding one example never depends on the others in its batch (no batch statistics),
    which the export tests check.
    """

    def __init__(self, model: nnx.Module, mesh: jax.sharding.Mesh, rules):
        self.model = model
        self.mesh = mesh
        self.multiple = max(1, mesh_lib.data_parallel_size(mesh, rules))
        self.sharding = mesh_lib.batch_sharding(mesh, rules, 1)
        self._replicated = mesh_lib.replicated(mesh)
        self._graphdef, self._state = nnx.split(model)
        self._grids: dict[tuple, tuple[int, int, int] | None] = {}

    def _place(self, x: np.ndarray) -> tuple[jax.Array, int]:
        return pad_and_place(x, self.multiple, self.sharding)

    def _run(self, method: str, *arrays: np.ndarray) -> np.ndarray:
        placed = [self._place(a) for a in arrays]
        with jax.set_mesh(self.mesh):
            y = _apply(self._graphdef, method, self._replicated, self._state, *(a for a, _ in placed))
        y = multihost_utils.process_allgather(y, tiled=True) if jax.process_count() > 1 else y
        return np.asarray(y, np.float32)[: placed[0][1]]

    def volumes(self, volume: np.ndarray) -> np.ndarray:
        """[B, X, Y, Z, 1] float32 model-input volumes -> [B, D] L2-normalised embeddings."""
        return self._run("embed_volume", np.asarray(volume, np.float32))

    def texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._run("embed_text", np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32))

    def volume_tokens(self, volume: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int] | None]:
        """Patch tokens [B, N, d] of the image encoder and their grid (gx, gy, gz)."""
        if not hasattr(self.model, "volume_tokens"):
            raise NotImplementedError(f"{type(self.model).__name__} has no volume_tokens(volume) method")
        volume = np.asarray(volume, np.float32)
        return self._run("volume_tokens", volume), self._grid(volume.shape[1:])

    def _grid(self, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """The token grid of one volume shape: static in the model, so read while tracing it
        abstractly (no compile), once per shape."""
        if shape not in self._grids:
            seen: list = []

            def trace(state, volume):
                out = nnx.merge(self._graphdef, state).volume_tokens(volume)
                seen.append(tuple(int(g) for g in out["grid"]) if isinstance(out, dict) else None)

            jax.eval_shape(trace, self._state, jax.ShapeDtypeStruct((1, *shape), np.float32))
            self._grids[shape] = seen[0]
        return self._grids[shape]


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


def logit_scale_of(model, config) -> float:
    """The model's effective logit scale, exp(learned log scale) clamped like the loss; 1.0 without one."""
    raw = getattr(model, "logit_scale", None)
    if raw is None:
        return 1.0
    value = float(np.asarray(raw[...] if isinstance(raw, nnx.Variable) else raw).reshape(-1)[0])
    cap = getattr(model, "logit_scale_max", None)
    if cap is None:
        cap = cfg_get(cfg_get(config, "loss"), "logit_scale_max", None)
    return math.exp(min(value, math.log(cap))) if cap else math.exp(value)


class EmbeddingCache:
    """Embeddings of one (model, parameters) computed on first request and kept: a split's
    ids / volume / report embeddings / labels, and any list of texts (prompts).

    It also answers the `config.eval` settings every evaluator shares (`setting`,
    `eval_split`, `num_bootstrap`); each evaluator module reads its own keys with `setting`.
    """

    def __init__(self, model: nnx.Module, config, mesh: jax.sharding.Mesh):
        self.model, self.config, self.mesh = model, config, mesh
        self.label_names = tuple(config.data.label_names)
        self.eval_split = str(self.setting("split", "") or config.data.eval_split)
        self._embedder: Embedder | None = None
        self._tokenizer = None
        self._splits: dict[str, dict[str, np.ndarray]] = {}
        self._texts: dict[tuple[str, ...], np.ndarray] = {}

    @classmethod
    def of(cls, ctx) -> EmbeddingCache:
        """The cache of an evaluation context (created and stored in ``ctx.cache`` on first use)."""
        if ctx.cache is None:
            ctx.cache = cls(ctx.model, ctx.config, ctx.mesh)
        return ctx.cache

    def setting(self, key: str, default):
        """``config.eval.<key>``; ``default`` when absent (docs/evaluation.md lists the keys)."""
        return cfg_get(cfg_get(self.config, "eval"), key, default)

    def num_bootstrap(self, final: bool) -> int:
        """Resamples for the intervals: ``eval.num_bootstrap`` for a final evaluation
        (launch/evaluate.py, `full`), ``eval.periodic_num_bootstrap`` during training."""
        return int(self.setting("num_bootstrap", 1000) if final else self.setting("periodic_num_bootstrap", 0))

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(self.model, self.mesh, self.config.sharding_rules)
        return self._embedder

    def split(self, name: str) -> dict[str, np.ndarray]:
        """The embedded split ``name`` (see `embed_split`)."""
        if name not in self._splits:
            batch_size = int(self.setting("batch_size", 8))
            self._splits[name] = embed_split(self.embedder, self.config.data, name, batch_size)
        return self._splits[name]

    def evaluated(self) -> dict[str, np.ndarray]:
        """The split being evaluated (``config.eval.split``, else ``config.data.eval_split``)."""
        return self.split(self.eval_split)

    def other_split(self, name: str) -> dict[str, np.ndarray] | None:
        """A second split (leak-free thresholds, probe fitting): None when not asked for
        (""), the evaluated split itself, or absent from the prepared data."""
        if not name or name == self.eval_split or name not in self._available_splits():
            return None
        return self.split(name)

    def _available_splits(self) -> set[str]:
        from t3d_jax.data.pipeline import read_dataset_info

        return set((read_dataset_info(self.config.data.dir).get("splits") or {}).keys())

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), D] embeddings of free texts, tokenized as the run's reports were."""
        key = tuple(texts)
        if key not in self._texts:
            if self._tokenizer is None:
                from t3d_jax.data.tokenizer import tokenizer_for_config

                self._tokenizer = tokenizer_for_config(self.config)
            self._texts[key] = self.embedder.texts(*self._tokenizer.encode(list(key)))
        return self._texts[key]

    def logit_scale(self) -> float:
        """The scale zero-shot scores use (``eval.use_logit_scale``, default on; 1.0 when off)."""
        return logit_scale_of(self.model, self.config) if self.setting("use_logit_scale", True) else 1.0
