"""A run's config against the prepared dataset folder it names (`config.data.dir`).

Training, evaluation and export all start here: `check_data_config` says how to get the
data when the folder is missing, `sync_config_with_data` lets the shapes the data really
has (token length, label names) win over the config. `make_synthetic_if_missing` builds the
embedded synthetic data set once when a config asks for it (`data.synthetic_if_missing`,
the demo variant), so `python launch/train.py --config=configs/t3d.py` trains on a fresh
clone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib

import ml_collections

from t3d_jax.data.shards import has_dataset
from t3d_jax.utils import UserFileNotFoundError, UserValueError

log = logging.getLogger(__name__)


def check_data_config(config) -> pathlib.Path:
    """The prepared dataset folder, or a `UserError` saying how to get one."""
    data_dir = config.data.dir
    if not data_dir:
        raise UserValueError(
            "config.data.dir is empty: point it at a dataset prepared by launch/prepare_data.py, "
            "e.g. --config.data.dir=/data/ct_rate_prepared, or run the synthetic demo (`make demo`, "
            "which prepares demo_out/prepared)")
    if not has_dataset(data_dir):
        raise UserFileNotFoundError(
            f"config.data.dir={data_dir}: no dataset.json there; prepare the data with "
            f"launch/prepare_data.py --out {data_dir} ... (the demo's data: `make demo`)")
    return pathlib.Path(data_dir)


def make_synthetic_if_missing(config, *, progress: bool = True) -> bool:
    """Writes `data.synthetic_if_missing` synthetic volumes next to `data.dir` and prepares them
    into `data.dir` when it holds no prepared data (0 = never). True when it made the data.

    The raw volumes go to `<data.dir>/../raw` (kept, so a rerun after a failed prepare does not
    redraw them); the prepared folder is complete only when its dataset.json exists, so an
    interrupted run starts again here on the next launch.
    """
    num = int(config.data.get("synthetic_if_missing", 0) or 0)
    data_dir = config.data.get("dir", "")
    if num <= 0 or not data_dir or has_dataset(data_dir):
        return False
    from t3d_jax.data import prepare, synthetic

    out = pathlib.Path(data_dir)
    # data.synthetic_series = 2 (configs/msvlm.py:demo,slices): a second series per chest, in
    # its own raw folder (the one-series raw/ of the other demos stays as it is).
    series = int(config.data.get("synthetic_series", 1) or 1)
    raw = out.parent / ("raw" if series == 1 else f"raw_series{series}")
    seed = int(config.data.get("synthetic_seed", 0))
    print(f"{out}: no prepared data; making the embedded synthetic data set once: {num} chest CTs "
          f"(seed {seed}{'' if series == 1 else f', {series} series each'}) in {raw}, prepared into {out}",
          flush=True)
    manifest = raw / "manifest.csv"
    if not manifest.is_file():
        synthetic.write_dataset(raw, num, seed, size="demo", progress=progress, series=series)
    result = prepare.prepare_dataset(manifest, out, preset=config.preprocess.preset,
                                     vocab=config.preprocess.get("vocab", "") or None,
                                     lowercase=bool(config.preprocess.get("lowercase", True)),
                                     max_len=int(config.preprocess.max_len),
                                     report_order=str(config.preprocess.get("report_order", "as_written")),
                                     keep_slices=bool(config.preprocess.get("keep_slices", False)),
                                     progress=progress)
    print(f"{out}: {result.summary()}", flush=True)
    return True


def sync_config_with_data(config) -> ml_collections.ConfigDict:
    """A copy of `config` whose token length, label names and stored grid (`data.stored_size`)
    are those of the prepared data."""
    from t3d_jax.data.pipeline import read_dataset_info

    info = read_dataset_info(config.data.dir)
    config = ml_collections.ConfigDict(config.to_dict())  # a private copy, unlocked
    max_len = (info.get("tokenizer") or {}).get("max_len")
    if max_len and int(max_len) != int(config.preprocess.max_len):
        log.info("data %s has token length %s; using it (config said %s)",
                 config.data.dir, max_len, config.preprocess.max_len)
        config.preprocess.max_len = int(max_len)
    if int(config.preprocess.max_len) > int(config.model.text.max_len):
        raise UserValueError(f"{config.data.dir}: reports are tokenized to {config.preprocess.max_len} "
                             f"tokens but config.model.text.max_len={config.model.text.max_len}")
    names = info.get("label_names")
    if names:
        config.data.label_names = tuple(names)
    size = (info.get("preset") or {}).get("size")
    if size and "data" in config:  # the stored grid (the volumes data.views_on='device' ships)
        config.data.stored_size = tuple(int(s) for s in size)
    return config


def data_fingerprint(data_dir) -> str:
    """A digest of what a prepared folder holds, the same wherever it was prepared: the source
    manifest's sha256, the preset, the label names and each split's record count. "" for data
    prepared before `dataset.json` recorded `manifest_sha256`. Results measured on one data
    set (bench/ceiling.py) carry it, so they are shown only beside runs on the same data."""
    from t3d_jax.data.pipeline import read_dataset_info

    info = read_dataset_info(data_dir)
    if not info.get("manifest_sha256"):
        return ""
    key = {"manifest_sha256": info["manifest_sha256"], "preset": info.get("preset"),
           "label_names": info.get("label_names"),
           "splits": {k: v.get("num_records") for k, v in sorted((info.get("splits") or {}).items())}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
