"""A stand-in for the part of `ml_collections` the config files use, for machines without it.

`bench/gpu_check.sh` runs on an accelerator image that has jax, flax, optax, torch and
transformers but not `ml_collections`. The bench needs the configs (`configs/t3d.py` and
`configs/common.py`, which build `ml_collections.ConfigDict`s); the train step itself never
imports `ml_collections`. :func:`install_if_missing` registers this module's small
`ConfigDict` / `FieldReference` under the name ``ml_collections`` only when the real package
cannot be imported, so wherever it is installed (this repository's pinned environment) nothing
changes. `tests/test_gpu_check.py` checks that every variant of every config file comes out
equal (``to_dict()``) under the shim and under the real package.

What is implemented, i.e. what the config files and the bench's step path use: attribute and
item access, construction from a (nested) dict, ``get``, ``in``, ``keys/values/items``,
iteration, ``to_dict``, ``get_ref`` with the linked-field semantics (``c.b = c.get_ref("a")``:
reading ``c.b`` gives ``c.a``'s current value, setting either sets both) and
``FieldReference(value, field_type=...)``. Not implemented: type checking on assignment,
locking, ``copy_and_resolve_references``, placeholders -- a config file that starts using them
fails loudly under the shim (AttributeError), and the equality test names it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class FieldReference:
    """A mutable cell shared by linked fields (ml_collections' FieldReference, untyped)."""

    def __init__(self, default: Any = None, field_type: Any = None):
        del field_type  # ml_collections checks types on assignment; the shim does not
        self._value = default

    def get(self) -> Any:
        value = self._value
        return value.get() if isinstance(value, FieldReference) else value

    def set(self, value: Any) -> None:
        self._value = value


class ConfigDict:
    """Attribute-access dict of fields; nested dicts become ConfigDicts."""

    def __init__(self, initial: dict | None = None):
        object.__setattr__(self, "_fields", {})
        for key, value in (initial or {}).items():
            self[key] = value

    # --- item access -------------------------------------------------------------------
    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, dict) and not isinstance(value, ConfigDict):
            value = ConfigDict(value)
        current = self._fields.get(key)
        if isinstance(current, FieldReference) and not isinstance(value, FieldReference):
            current.set(value)  # a linked field: every field sharing the reference follows
        else:
            self._fields[key] = value

    def __getitem__(self, key: str) -> Any:
        value = self._fields[key]
        return value.get() if isinstance(value, FieldReference) else value

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._fields else default

    def keys(self):
        return list(self._fields)

    def values(self):
        return [self[k] for k in self._fields]

    def items(self):
        return [(k, self[k]) for k in self._fields]

    # --- attribute access ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"ConfigDict (configdict_shim) has no field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    # --- references and export --------------------------------------------------------------
    def get_ref(self, key: str) -> FieldReference:
        """The field's reference, turning a plain field into a referenced one (as ml_collections)."""
        current = self._fields[key]
        if not isinstance(current, FieldReference):
            current = FieldReference(current)
            self._fields[key] = current
        return current

    def to_dict(self) -> dict:
        return {k: (v.to_dict() if isinstance(v, ConfigDict) else v) for k, v in self.items()}

    def __repr__(self) -> str:
        return f"ConfigDict({self.to_dict()!r})"


def make_module() -> types.ModuleType:
    """A module object named ``ml_collections`` holding the shim's classes."""
    module = types.ModuleType("ml_collections", __doc__)
    module.ConfigDict = ConfigDict
    module.FieldReference = FieldReference
    module.__shim__ = True
    return module


def install_if_missing() -> bool:
    """Registers the shim as ``ml_collections`` when the real package cannot be imported.
    Returns True when the shim is (now) in use."""
    existing = sys.modules.get("ml_collections")
    if existing is not None:
        return bool(getattr(existing, "__shim__", False))
    try:
        importlib.import_module("ml_collections")
        return False
    except ImportError:
        sys.modules["ml_collections"] = make_module()
        return True
