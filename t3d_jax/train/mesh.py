"""Device mesh from the config, and logical-axis rules -> `NamedSharding`s.

Model code names the axes of every kernel logically ('embed', 'mlp', 'heads', 'vocab', ...)
with `nnx.with_partitioning`; the config's `sharding_rules` table says which mesh axes each
logical name is split over. Changing the parallelism layout (pure data parallel, FSDP,
FSDP + tensor parallel) is then a config edit, never a model edit. This follows maxtext's
logical-axis habit, kept deliberately small.

Rules are forgiving in two ways, both logged, because the same table must serve a tiny test
model on 8 fake CPU devices and a ViT-B on a pod:
  * a rule naming a mesh axis the mesh does not have (e.g. 'tensor' on a ('data','fsdp') mesh)
    maps to "not split";
  * a dimension that the mesh axes do not divide evenly is left unsplit (replicated) rather
    than failing at `device_put`, and a mesh axis is used at most once per array.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

BATCH_AXIS = "batch"


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces the single -1 in `shape` by whatever makes the product equal `num_devices`."""
    shape = tuple(int(s) for s in shape)
    unknown = [i for i, s in enumerate(shape) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"config.mesh.shape={shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if known <= 0 or num_devices % known:
            raise ValueError(
                f"config.mesh.shape={shape}: the fixed axes ({known} devices) do not divide the "
                f"{num_devices} available devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"config.mesh.shape={shape} needs {math.prod(shape)} devices but {num_devices} are "
            f"available; use -1 for one axis to take the rest")
    return shape


def make_mesh(mesh_config, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """Builds the mesh of `config.mesh` (axes e.g. ('data','fsdp') or ('data','fsdp','tensor')).

    `devices` defaults to all devices of the job; AOT compilation passes a TPU topology's.
    Axis types are given explicitly as Auto: the compiler propagates shardings inside the step
    (jax >= 0.9 defaults to Explicit, which would require annotating every intermediate).
    """
    axes = tuple(mesh_config.axes)
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config.shape, len(devices))
    if len(shape) != len(axes):
        raise ValueError(f"config.mesh.shape={tuple(mesh_config.shape)} has {len(shape)} entries "
                         f"but config.mesh.axes={axes} has {len(axes)}")
    return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                         devices=devices)


def rules_dict(rules) -> dict[str, tuple[str, ...]]:
    """Normalises the config's rules (mapping or pairs) to {logical: (mesh axes...)}."""
    items = rules.items() if isinstance(rules, Mapping) or hasattr(rules, "items") else rules
    out = {}
    for logical, mesh_axes in items:
        if mesh_axes is None or mesh_axes == "":
            out[logical] = ()
        elif isinstance(mesh_axes, str):
            out[logical] = (mesh_axes,)
        else:
            out[logical] = tuple(mesh_axes)
    return out


def logical_to_mesh_spec(logical_spec, shape: Sequence[int], mesh: jax.sharding.Mesh,
                         rules, *, name: str = "") -> P:
    """Maps one array's logical PartitionSpec to a mesh PartitionSpec (see module docstring)."""
    rules = rules_dict(rules)
    logical_spec = tuple(logical_spec or ())
    used: set[str] = set()
    out = []
    for dim, logical in enumerate(logical_spec):
        if dim >= len(shape) or logical is None:
            out.append(None)
            continue
        names = (logical,) if isinstance(logical, str) else tuple(logical)
        axes = []
        for ln in names:
            if ln in mesh.axis_names:  # already a mesh axis name
                axes.append(ln)
                continue
            if ln not in rules:
                log.debug("%s: logical axis %r has no rule; not split", name, ln)
            axes.extend(a for a in rules.get(ln, ()) if a in mesh.axis_names)
        axes = [a for a in dict.fromkeys(axes) if a not in used and mesh.shape[a] > 1]
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and shape[dim] % size:
            log.info("%s: dim %d (size %d) not divisible by mesh axes %s (%d); not split",
                     name, dim, shape[dim], axes, size)
            axes = []
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_shardings(abstract_tree, logical_specs, mesh, rules):
    """NamedShardings for a pytree of arrays given a matching pytree of logical specs."""
    def one(path, x, spec):
        return NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules,
                                                        name=_path_name(path)))
    return jax.tree_util.tree_map_with_path(
        one, abstract_tree, logical_specs, is_leaf=lambda s: isinstance(s, P))


def batch_axes(mesh, rules) -> tuple[str, ...]:
    """Mesh axes the global batch dimension is split over (the data-parallel axes)."""
    return tuple(a for a in rules_dict(rules).get(BATCH_AXIS, ("data", "fsdp"))
                 if a in mesh.axis_names)


def batch_sharding(mesh, rules, ndim: int) -> NamedSharding:
    """Leading dimension split over the data-parallel axes, the rest replicated."""
    axes = batch_axes(mesh, rules)
    del ndim
    return NamedSharding(mesh, P(axes if axes else None))


def data_parallel_size(mesh, rules) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh, rules)]))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(mesh) -> str:
    return " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
