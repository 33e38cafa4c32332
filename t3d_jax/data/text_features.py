"""Cached report states of a frozen text tower, stored next to a prepared folder's shards.

The locked-text mode (`model.text.locked`, docs/training.md "Locked text tower") trains the
image side against a frozen pretrained BERT. Its report states do not change during training,
so they are computed once, here, and the train step pays for the image side only.

Writing (`launch/cache_text_features.py` -> :func:`cache_text_features`): for every record of
every split, in record order, the frozen tower is run on the record's stored `input_ids` /
`attention_mask` (float32) and the result is stored as float16:

    DIR/text_features/features.json      what the cache is (below); written last
    DIR/text_features/{split}.npy        keep='tokens': [N, L, d_t] last hidden states
                                         keep='pooled': [N, d_t] report vectors (`pool`)

Row i of `{split}.npy` belongs to record i of the split (the order of
`t3d_jax.data.shards.open_split`). The folder is built in `DIR/.text_features-tmp-*` and
swapped in with renames, so a reader sees the old complete cache, the new one, or (for an
instant) none, never a mix.

Storage dtype: float16, fixed. It halves the disk, page cache and host-to-device bytes of
float32 (a `base` tokens cache of CT-RATE's ~50k reports at L=128 is ~9.8 GB instead of
~19.7 GB), and its rounding (relative 2**-11) is 8x finer than that of bfloat16, the compute
dtype of the `small`/`base` variants, so the cache is not what limits precision. The
batch contract declares it (`text_states` / `text_pooled` are float16), so an AOT compile
needs no data. BERT's final states are LayerNorm outputs (|x| of order 1-20, far inside
float16's range); the writer checks every value is finite after the cast and refuses
otherwise.

`features.json`: `format`, `model` (`dir`, `weights` file, its `sha256`, `vocab_sha256`,
`hidden_size`, `num_layers`, `max_position_embeddings`), `pool` (None for tokens), `keep`,
`dtype`, `max_len`, `splits` ({split: {file, shape}}), `dataset` (the whole dataset.json it
was computed for) and `created`. A cache is *stale* when `dataset` differs from the folder's
current dataset.json (the data was re-prepared); readers refuse it.

Reading (`t3d_jax.data.pipeline` with `data.text_features`): :func:`open_features` checks
the cache and returns a :class:`FeatureReader`, a picklable per-split reader that memory-maps
the `.npy` lazily in each process (the Grain workers included) and returns one record's
features by its position in the split.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import re
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from t3d_jax.data import records, shards
from t3d_jax.utils import UserFileNotFoundError, UserValueError, cfg_get, sha256_file

log = logging.getLogger(__name__)

FEATURES_DIR = "text_features"
FEATURES_JSON = "features.json"
FORMAT = 1
KEEPS = ("tokens", "pooled")
POOLS = ("cls", "mean")
DTYPE = np.dtype(np.float16)
LAUNCHER = "launch/cache_text_features.py"
# The batch keys the pipeline adds, per `keep`.
BATCH_KEYS = {"tokens": "text_states", "pooled": "text_pooled"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ---------------------------------------------------------------------------------------
# The config key
# ---------------------------------------------------------------------------------------


def mode(data_config: Any) -> str:
    """`data.text_features` as '' (off), 'tokens' or 'pooled' (True means 'tokens')."""
    value = cfg_get(data_config, "text_features", False)
    if value is False or value == "" or value == 0:
        return ""
    if value is True or value == 1:
        return "tokens"
    if isinstance(value, str) and value.strip().lower() in KEEPS:
        return value.strip().lower()
    if isinstance(value, str) and value.strip().lower() in ("false", "off", "none", "no"):
        return ""
    if isinstance(value, str) and value.strip().lower() in ("true", "on", "yes"):
        return "tokens"
    raise UserValueError(f"config.data.text_features={value!r}: use False, True (= 'tokens') or 'pooled'")


LOCKED_FREEZE = r"^text_encoder/"
# Parameter paths of the text encoder that a locked tower's freeze rule must cover (first and
# last pieces of an unscanned and a scanned BERT).
_TEXT_ENCODER_PATHS = ("text_encoder/embeddings/word/embedding", "text_encoder/embeddings/norm/scale",
                       "text_encoder/layers/0/attn/query/kernel", "text_encoder/layers/attn/query/kernel",
                       "text_encoder/pooler/kernel")


def _frozen_by(optim, path: str) -> bool:
    """Whether `optim.freeze` / `optim.lr_multipliers` freeze `path`: the rule of
    t3d_jax/train/optim.py `param_labels` (the data layer sits below the engine, so it is
    restated)."""
    if any(re.search(p, path) for p in (cfg_get(optim, "freeze", ()) or ())):
        return True
    multipliers = dict(cfg_get(optim, "lr_multipliers", {}) or {})
    top = path.split("/", 1)[0]
    matches = [k for k in multipliers if top.startswith(k)]
    return bool(matches) and float(multipliers[max(matches, key=len)]) == 0.0


def locked_source(config) -> str:
    """'' when `model.text.locked` is off, else the cached features it trains on ('tokens' |
    'pooled', from `data.text_features`), after checking the optimizer freezes the encoder
    (the tasks call it when built, so a locked config fails before anything runs)."""
    text = cfg_get(cfg_get(config, "model"), "text")
    if not bool(cfg_get(text, "locked", False)):
        return ""
    source = mode(cfg_get(config, "data"))
    if not source:
        raise UserValueError(
            "model.text.locked=True takes the report states from a cache: compute it once with "
            "`python launch/cache_text_features.py --data DATA_DIR --hf_bert_dir MODEL_DIR` and set "
            "data.text_features=True (or 'pooled' for --keep pooled)")
    optim = cfg_get(config, "optim")
    loose = [p for p in _TEXT_ENCODER_PATHS if not _frozen_by(optim, p)]
    if loose:
        raise UserValueError(
            f"model.text.locked=True needs the text encoder frozen by the optimizer (no updates, no "
            f"weight decay, no optimizer state); optim.freeze={tuple(cfg_get(optim, 'freeze', ()) or ())} "
            f"leaves e.g. {loose[0]} trainable: add {LOCKED_FREEZE!r} to optim.freeze "
            f"(--config.optim.freeze='(\"{LOCKED_FREEZE}\",)')")
    if _frozen_by(optim, "text_proj/kernel"):
        log.warning("model.text.locked=True and the optimizer also freezes text_proj (optim.lr_multipliers."
                    "text=0?): nothing on the text side trains; freeze only %r to train the projection",
                    LOCKED_FREEZE)
    return source


def features_dir(data_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(data_dir) / FEATURES_DIR


def _command(data_dir, keep: str | None = None, model_dir: str | None = None, pool: str | None = None) -> str:
    flags = (f" --keep {keep}" if keep else "") + (f" --pool {pool}" if keep == "pooled" and pool else "")
    return f"python {LAUNCHER} --data {data_dir} --hf_bert_dir {model_dir or 'MODEL_DIR'}{flags}"


# ---------------------------------------------------------------------------------------
# Reading: the cache's description, its checks, the per-split reader
# ---------------------------------------------------------------------------------------


def read_features_json(data_dir: str | os.PathLike) -> dict[str, Any]:
    """`DIR/text_features/features.json`, or a UserError saying how to compute it."""
    path = features_dir(data_dir) / FEATURES_JSON
    if not path.is_file():
        raise UserFileNotFoundError(
            f"{path}: no cached text features (data.text_features is set); compute them once with "
            f"`{_command(data_dir)}`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserValueError(f"{path}: not valid JSON ({e}); recompute it with `{_command(data_dir)}`") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserValueError(f"{path}: not a text-feature cache of format {FORMAT}; recompute it with "
                             f"`{_command(data_dir)}`")
    return meta


def check_cache(data_dir: str | os.PathLike, keep: str, splits=None) -> dict[str, Any]:
    """features.json after checking it describes a cache of `keep` computed for the folder's
    *current* dataset.json, with one complete `.npy` per split (all of `splits`, default every
    split of dataset.json). A UserError naming `launch/cache_text_features.py` otherwise."""
    meta = read_features_json(data_dir)
    path = features_dir(data_dir) / FEATURES_JSON
    model_dir = (meta.get("model") or {}).get("dir")
    info = shards.read_dataset_json(data_dir)
    if meta.get("dataset") != info:
        raise UserValueError(
            f"{path} is stale: it was computed for another {pathlib.Path(data_dir) / shards.DATASET_JSON} "
            f"(the data was prepared again since); recompute it with "
            f"`{_command(data_dir, meta.get('keep'), model_dir, meta.get('pool'))}`")
    if meta.get("keep") != keep:
        raise UserValueError(
            f"{path} keeps {meta.get('keep')!r} features but config.data.text_features asks for {keep!r}; "
            f"recompute it with `{_command(data_dir, keep, model_dir)}` or set data.text_features="
            f"{'True' if meta.get('keep') == 'tokens' else repr(meta.get('keep'))}")
    wanted = list(info.get("splits", {})) if splits is None else list(splits)
    for split in wanted:
        entry = (meta.get("splits") or {}).get(split)
        n = int(info["splits"][split]["num_records"]) if split in info.get("splits", {}) else None
        if entry is None:
            raise UserValueError(f"{path}: no features for split {split!r}; recompute with "
                                 f"`{_command(data_dir, keep, model_dir)}`")
        file = features_dir(data_dir) / entry["file"]
        if not file.is_file():
            raise UserFileNotFoundError(f"{file}: missing (features.json names it); recompute with "
                                        f"`{_command(data_dir, keep, model_dir)}`")
        shape = tuple(int(s) for s in entry["shape"])
        if n is not None and shape[0] != n:
            raise UserValueError(f"{file}: {shape[0]} rows but split {split!r} has {n} records; recompute "
                                 f"with `{_command(data_dir, keep, model_dir)}`")
    return meta


class FeatureReader:
    """One split's cached features by record position: ``reader(i) -> {key: array}``.

    Picklable without its data: the `.npy` is memory-mapped lazily in whichever process calls
    it first (a Grain worker maps it itself), so reading costs one row's pages.
    """

    def __init__(self, path: str | os.PathLike, key: str, shape: tuple[int, ...]):
        self.path = str(path)
        self.key = key
        self.shape = tuple(int(s) for s in shape)
        self._array = None

    def __getstate__(self):
        return {"path": self.path, "key": self.key, "shape": self.shape}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._array = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            # np.load parses the header with `ast`, which CPython 3.11 does not make safe from
            # several threads at once: open under the lock record decoding holds for the same
            # reason (t3d_jax/data/records.py), once per process.
            with records._DECODE_LOCK:
                if self._array is None:
                    array = np.load(self.path, mmap_mode="r", allow_pickle=False)
                    if array.shape != self.shape or array.dtype != DTYPE:
                        raise ValueError(f"{self.path}: shape {array.shape} {array.dtype}, but "
                                         f"features.json says {self.shape} {DTYPE}; recompute with {LAUNCHER}")
                    self._array = array
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        return {self.key: np.array(self.array[int(position)], dtype=DTYPE, copy=True)}


def open_features(data_dir: str | os.PathLike, split: str, keep: str) -> FeatureReader:
    """The checked reader of `split`'s cached features (:func:`check_cache`)."""
    meta = check_cache(data_dir, keep, splits=[split])
    entry = meta["splits"][split]
    return FeatureReader(features_dir(data_dir) / entry["file"], BATCH_KEYS[keep], entry["shape"])


def check_config(config) -> dict[str, Any] | None:
    """A whole run config against its cache (None when `data.text_features` is off): the cache
    is current and of the kind asked for, its token length is `preprocess.max_len`, a pooled
    cache used `model.text.pool`, and the text tower the run loads (`init_from.hf_bert_dir`)
    has the cache's weights (sha256), so evaluation's live tower embeds as the cache did."""
    keep = mode(config.data)
    if not keep:
        return None
    data_dir = config.data.dir
    meta = check_cache(data_dir, keep)
    path = features_dir(data_dir) / FEATURES_JSON
    model = meta.get("model") or {}
    max_len = int(cfg_get(config.preprocess, "max_len", 0) or 0)
    if max_len and int(meta.get("max_len", -1)) != max_len:
        raise UserValueError(f"{path}: features of {meta.get('max_len')} tokens but preprocess.max_len="
                             f"{max_len}; recompute with `{_command(data_dir, keep, model.get('dir'))}`")
    text = config.model.text
    if keep == "pooled" and meta.get("pool") != cfg_get(text, "pool", "cls"):
        raise UserValueError(f"{path}: report vectors pooled with {meta.get('pool')!r} but "
                             f"model.text.pool={cfg_get(text, 'pool', 'cls')!r}; recompute with "
                             f"`{_command(data_dir, keep, model.get('dir'))} --pool {cfg_get(text, 'pool', 'cls')}` "
                             f"or set model.text.pool={meta.get('pool')!r}")
    hf_dir = cfg_get(config.init_from, "hf_bert_dir", "")
    if hf_dir:
        weights = weights_fingerprint(hf_dir)
        if weights["sha256"] != model.get("sha256"):
            raise UserValueError(
                f"{path} was computed with the text tower {model.get('dir')} ({model.get('weights')} sha256 "
                f"{str(model.get('sha256'))[:12]}...) but init_from.hf_bert_dir={hf_dir} has sha256 "
                f"{weights['sha256'][:12]}...; recompute with `{_command(data_dir, keep, hf_dir)}`")
    elif bool(cfg_get(text, "locked", False)) and not cfg_get(config.init_from, "checkpoint", ""):
        raise UserValueError(
            f"model.text.locked=True with no pretrained text tower: set init_from.hf_bert_dir="
            f"{model.get('dir')} (the model {path} was computed with), so the live tower that "
            f"evaluation runs has the cache's weights")
    return meta


# ---------------------------------------------------------------------------------------
# The model folder: fingerprint and the checks made before any compute
# ---------------------------------------------------------------------------------------


def weights_fingerprint(model_dir: str | os.PathLike) -> dict[str, str]:
    """{'weights': file name, 'sha256': its digest} of a Hugging Face BERT folder."""
    d = pathlib.Path(model_dir)
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return {"weights": name, "sha256": sha256_file(d / name)}
    raise UserFileNotFoundError(f"{d}: no {' or '.join(WEIGHT_FILES)} (a Hugging Face BERT folder is expected)")


def _vocab_tokens(path: pathlib.Path) -> list[str]:
    return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines()]


def check_model_for_data(model_dir: str | os.PathLike, info: dict, data_dir, vocab: str | None = None
                         ) -> dict[str, Any]:
    """The model folder's config.json after the checks that make its features meaningful for the
    data: the vocab the reports were tokenized with (dataset.json's tokenizer.vocab, or `vocab`
    when given) is the model's vocab.txt, and the token length fits its position embeddings."""
    d = pathlib.Path(model_dir)
    config_path = d / "config.json"
    if not config_path.is_file():
        raise UserFileNotFoundError(f"{config_path}: not found (--hf_bert_dir must be a Hugging Face BERT folder)")
    hf = json.loads(config_path.read_text())
    tokenizer = info.get("tokenizer") or {}
    dataset_json = pathlib.Path(data_dir) / shards.DATASET_JSON
    model_vocab = d / "vocab.txt"
    if not model_vocab.is_file():
        raise UserFileNotFoundError(f"{model_vocab}: not found; the model's WordPiece vocab is needed to check "
                                    f"that it reads the ids of {dataset_json}")
    data_vocab = vocab or tokenizer.get("vocab")
    if not data_vocab:
        raise UserValueError(f"{dataset_json} does not name the vocab its reports were tokenized with "
                             f"(tokenizer.vocab); pass it with --vocab PATH/vocab.txt")
    data_vocab = pathlib.Path(data_vocab)
    if not data_vocab.is_file():
        raise UserFileNotFoundError(f"{data_vocab}: the vocab {dataset_json} was prepared with is not there; "
                                    f"pass a copy with --vocab PATH/vocab.txt")
    if _vocab_tokens(data_vocab) != _vocab_tokens(model_vocab):
        raise UserValueError(
            f"the model's vocab {model_vocab} differs from the vocab the data was tokenized with "
            f"({data_vocab}, {dataset_json}): its features would read other words. Prepare the data "
            f"with --vocab {model_vocab}, or use a model with that vocab")
    max_len = int(tokenizer.get("max_len") or 0)
    positions = int(hf.get("max_position_embeddings", 512))
    if max_len > positions:
        raise UserValueError(f"{dataset_json}: reports are {max_len} tokens but {config_path} has "
                             f"max_position_embeddings={positions}; prepare the data with --max-len "
                             f"{positions} or less")
    if int(tokenizer.get("vocab_size") or 0) > int(hf.get("vocab_size", 0)):
        raise UserValueError(f"{dataset_json}: vocab_size {tokenizer.get('vocab_size')} > the model's "
                             f"{hf.get('vocab_size')} ({config_path})")
    return hf


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def _tokens(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A record's input_ids and attention_mask without decoding its volume."""
    with records._DECODE_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return np.asarray(npz["input_ids"], np.int32), np.asarray(npz["attention_mask"], np.int32)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="text features", unit="report")


def cache_text_features(data_dir: str | os.PathLike, hf_bert_dir: str | os.PathLike,
                        make_encoder: Callable, *, pool: str = "cls", keep: str = "tokens",
                        batch_size: int = 32, vocab: str | None = None, progress: bool = True
                        ) -> dict[str, Any]:
    """Computes and writes `DIR/text_features/` (module docstring); returns its features.json.

    `make_encoder(hf_bert_dir, pool=None | 'cls' | 'mean') -> (fn, cfg)` builds the frozen tower
    (`t3d_jax.models.two_tower.frozen_text_tower`; passed in because the data layer does not
    import the models). It is called only after the vocab and length checks passed.
    """
    if keep not in KEEPS:
        raise UserValueError(f"--keep {keep!r}: choose one of {KEEPS}")
    if pool not in POOLS:
        raise UserValueError(f"--pool {pool!r}: choose one of {POOLS}")
    if batch_size < 1:
        raise UserValueError(f"--batch_size must be >= 1, got {batch_size}")
    data_dir = pathlib.Path(data_dir)
    model_dir = pathlib.Path(hf_bert_dir)
    if not model_dir.is_dir():
        raise UserFileNotFoundError(f"{model_dir}: not a folder (--hf_bert_dir must be a Hugging Face BERT folder)")
    if not shards.has_dataset(data_dir):
        raise UserFileNotFoundError(f"{data_dir}: no {shards.DATASET_JSON} (--data must be a folder written by "
                                    f"launch/prepare_data.py)")
    info = shards.read_dataset_json(data_dir)
    hf = check_model_for_data(model_dir, info, data_dir, vocab)
    splits = list(info.get("splits") or {})
    if not splits:
        raise UserValueError(f"{data_dir / shards.DATASET_JSON}: no splits")
    sources = {split: shards.open_split(data_dir, split) for split in splits}
    fingerprint = weights_fingerprint(model_dir)
    fn, cfg = make_encoder(model_dir, pool=pool if keep == "pooled" else None)

    out = features_dir(data_dir)
    tmp = data_dir / f".{FEATURES_DIR}-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    bar = _progress(sum(len(s) for s in sources.values()), progress)
    entries, max_len = {}, None
    try:
        for split, source in sources.items():
            n = len(source)
            array, file = None, f"{split}.npy"
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                ids, mask = zip(*(_tokens(source[i]) for i in range(start, stop)))
                ids, mask = np.stack(ids), np.stack(mask)
                if max_len is None:
                    max_len = ids.shape[1]
                if ids.shape[1] != max_len:
                    raise ValueError(f"{data_dir}: split {split!r} has reports of {ids.shape[1]} tokens, "
                                     f"others of {max_len}")
                count = len(ids)
                if count < batch_size:  # one compiled shape: pad with copies of the first row
                    ids = np.concatenate([ids, np.repeat(ids[:1], batch_size - count, axis=0)])
                    mask = np.concatenate([mask, np.repeat(mask[:1], batch_size - count, axis=0)])
                feats = np.asarray(fn(ids, mask), np.float32)[:count]
                stored = feats.astype(DTYPE)
                if not np.all(np.isfinite(stored)):
                    raise UserValueError(f"{model_dir}: text features of {split!r} records {start}-{stop - 1} "
                                     f"are not finite in {DTYPE} (max |x| {np.nanmax(np.abs(feats)):.3g})")
                if array is None:
                    array = np.lib.format.open_memmap(tmp / file, mode="w+", dtype=DTYPE,
                                                      shape=(n, *stored.shape[1:]))
                array[start:stop] = stored
                if bar is not None:
                    bar.update(count)
            array.flush()
            entries[split] = {"file": file, "shape": list(array.shape)}
            del array
        meta = {
            "format": FORMAT,
            "model": {"dir": str(model_dir.resolve()), **fingerprint,
                      "vocab_sha256": sha256_file(model_dir / "vocab.txt"),
                      "hidden_size": int(cfg.hidden_size), "num_layers": int(cfg.num_layers),
                      "max_position_embeddings": int(hf.get("max_position_embeddings", 512))},
            "pool": pool if keep == "pooled" else None,
            "keep": keep,
            "dtype": DTYPE.name,
            "max_len": int(max_len),
            "splits": entries,
            "dataset": info,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / FEATURES_JSON).write_text(json.dumps(meta, indent=2))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return meta


def _swap_in(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Replaces `out` by the complete folder `tmp` with renames (the old cache is removed last)."""
    old = None
    if out.exists():
        old = out.with_name(f".{FEATURES_DIR}-old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
