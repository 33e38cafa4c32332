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

A mesh shape that the devices cannot take is the user's to fix: `make_mesh` raises a
`UserValueError` naming the config key (and, for multi-slice, the shape that works).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from t3d_jax.utils import UserValueError, path_str

log = logging.getLogger(__name__)

BATCH_AXIS = "batch"


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces the single -1 in `shape` by whatever makes the product equal `num_devices`."""
    shape = tuple(int(s) for s in shape)
    unknown = [i for i, s in enumerate(shape) if s == -1]
    if len(unknown) > 1:
        raise UserValueError(f"config.mesh.shape={shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if known <= 0 or num_devices % known:
            raise UserValueError(
                f"config.mesh.shape={shape}: the fixed axes ({known} devices) do not divide the "
                f"{num_devices} available devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise UserValueError(
            f"config.mesh.shape={shape} needs {math.prod(shape)} devices but {num_devices} are "
            f"available; use -1 for one axis to take the rest")
    return shape


def slice_count(devices: Sequence) -> int:
    """How many TPU slices `devices` span (multi-slice jobs join slices over DCN).

    Counted from the devices' `slice_index` on TPU only. CPU devices have no slice; GPU
    devices do carry a `slice_index` (one per NVLink domain, usually one per host), but
    `jax.make_mesh` already lays GPUs out in global device-id order, which is host-major, so
    a `(hosts, -1)` mesh keeps `fsdp` inside a host without a hybrid construction, and the
    default `(1, -1)` keeps working across hosts (fsdp over the network, as configured).
    """
    devices = list(devices)
    if not devices or devices[0].platform != "tpu":
        return 1
    return len({int(getattr(d, "slice_index", 0)) for d in devices})


def make_mesh(mesh_config, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """Builds the mesh of `config.mesh` (axes e.g. ('data','fsdp') or ('data','fsdp','tensor')).

    `devices` defaults to all devices of the job; AOT compilation passes a TPU topology's.
    Axis types are given explicitly as Auto: the compiler propagates shardings inside the step
    (jax >= 0.9 defaults to Explicit, which would require annotating every intermediate).

    One slice (a single host, a GPU cluster, one TPU pod slice): `jax.make_mesh`. Several
    TPU slices (multi-slice, `slice_index` differs; `jax.make_mesh` refuses such device sets):
    a hybrid mesh from `mesh_utils.create_hybrid_device_mesh`. The first mesh axis ('data')
    is split over the slices -- the data-centre network (DCN) then carries only the one
    gradient all-reduce per step -- and every other axis ('fsdp', 'tensor') stays inside a
    slice on ICI, because FSDP gathers weights every layer. So the first axis must be a
    multiple of the slice count.
    """
    axes = tuple(mesh_config.axes)
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config.shape, len(devices))
    if len(shape) != len(axes):
        raise UserValueError(f"config.mesh.shape={tuple(mesh_config.shape)} has {len(shape)} entries "
                         f"but config.mesh.axes={axes} has {len(axes)}")
    axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
    num_slices = slice_count(devices)
    if num_slices == 1:
        return jax.make_mesh(shape, axes, axis_types=axis_types, devices=devices)

    from jax.experimental import mesh_utils

    if shape[0] % num_slices:
        raise UserValueError(
            f"config.mesh.shape={tuple(mesh_config.shape)} (resolved {shape} over "
            f"{len(devices)} devices): the devices span {num_slices} TPU slices, and the first "
            f"mesh axis ('{axes[0]}'={shape[0]}) is split over the slices, so it must be a "
            f"multiple of the slice count ({num_slices}); e.g. "
            f"--config.mesh.shape='({num_slices},-1)' puts '{axes[0]}' across the slices and "
            f"the rest of each slice on '{axes[-1]}'")
    ici_shape = (shape[0] // num_slices, *shape[1:])
    dcn_shape = (num_slices,) + (1,) * (len(shape) - 1)
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                allow_split_physical_axes=True)
    log.info("multi-slice mesh: %d slices over DCN on '%s'; within each slice %s (ICI)",
             num_slices, axes[0], " x ".join(f"{a}={n}" for a, n in zip(axes, ici_shape)))
    return jax.sharding.Mesh(grid, axes, axis_types=axis_types)


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


def tree_shardings(abstract_tree, logical_specs, mesh, rules):
    """NamedShardings for a pytree of arrays given a matching pytree of logical specs."""
    def one(path, x, spec):
        return NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules,
                                                        name=path_str(path)))
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
