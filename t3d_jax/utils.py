"""Small helpers every layer uses (the bottom of the import graph: imports nothing of t3d_jax).

* `path_str`: a pytree key path as "a/b/0" (parameter names in optimizer rules, sharding
  messages, freeze regexes all use this one spelling);
* `cfg_get`: a config value that may be missing (a ConfigDict, a plain dict, an object with
  attributes or None), so library code can take a section of a config without requiring
  every key;
* `sha256_file`: a file's fingerprint (checkpoints and caches record what they came from);
* `UserError`: the base class of errors a user can fix (a missing checkpoint, an input path
  that does not exist, an unknown config variant, data not prepared). The launchers print
  its message on one line and exit non-zero; any other exception is a bug and keeps its
  traceback.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any


class UserError(Exception):
    """An expected error with a fix the message names (see the module docstring)."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named (or the run needs) does not exist."""


class UserValueError(UserError, ValueError):
    """A value the user set (config key, flag) cannot be used."""


def path_str(path) -> str:
    """A jax key path ((DictKey('a'), SequenceKey(0)), ...) as 'a/0'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg[key] for a ConfigDict / dict / attribute object; `default` when absent or None."""
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        try:
            value = cfg.get(key, default)
        except (AttributeError, KeyError, TypeError):
            value = default
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights files are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_hf_config(config_json, model_type: str, kind: str) -> tuple[Any, dict]:
    """(path, contents) of a Hugging Face ``config.json`` (the file or the folder holding it),
    refusing a missing file, invalid JSON or another ``model_type`` (absent counts as
    `model_type`; `kind` names it in the error): the shared front of the BERT, GPT-2 and ViT
    importers."""
    import json
    import pathlib

    path = pathlib.Path(config_json)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Hugging Face config.json here")
    try:
        contents = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    found = contents.get("model_type", model_type)
    if found != model_type:
        raise ValueError(f"{path}: model_type {found!r} is not a {kind} checkpoint")
    return path, contents
