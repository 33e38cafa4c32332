"""A checkpoint's parameters in a model: what evaluation, export and fine-tuning need.

Resuming training needs the whole train state (`t3d_jax.train.checkpoint.restore`); every
other use of a checkpoint needs only its parameters. Reading only `state/params` (an orbax
partial restore) means

* no optimizer is built and no Adam moment is read, so `config.optim` may differ from the
  run's (another learning rate, schedule, `optim.flatten`, weight decay: the optimizer
  state would have another tree, or none is wanted);
* the parameters land directly in the sharded layout of `config.mesh` and
  `config.sharding_rules` (orbax reshards on read), so a run saved on one mesh is used on
  another.

The model's other state (its RNG streams) is not the checkpoint's business here: it comes
from a fresh initialisation, which evaluation (deterministic) never reads. The exception is
BatchNorm's running statistics (`nnx.BatchStat`, the ResNet3D encoder): evaluation normalises
with them, so `restore_model` reads them from `state/model_state` as well.

    ckpt = checkpoint_dir(config, workdir)            # config.checkpoint.dir or WORKDIR/checkpoints
    model, step = restore_model(config, ckpt, mesh=mesh)   # latest step; step=N for another
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from t3d_jax import tasks
from t3d_jax.train import checkpoint as ckpt_lib
from t3d_jax.train import mesh as mesh_lib
from t3d_jax.utils import UserFileNotFoundError, UserValueError, cfg_get, path_str

TRAIN_FIRST = "train first: launch/train.py --workdir WORKDIR saves to WORKDIR/checkpoints"


def checkpoint_dir(config, workdir: str | os.PathLike) -> pathlib.Path:
    """Where a run keeps its checkpoints: `config.checkpoint.dir`, else WORKDIR/checkpoints."""
    custom = cfg_get(cfg_get(config, "checkpoint"), "dir", "")
    return pathlib.Path(custom or pathlib.Path(workdir) / "checkpoints").absolute()


@dataclasses.dataclass
class AbstractModel:
    """The model of `config.task` without memory: structure, shapes and shardings on a mesh."""

    graphdef: Any
    params: dict  # ShapeDtypeStructs with their NamedShardings (the layout of state/params)
    rest: dict  # the same for every non-param variable (RNG streams, BatchNorm statistics)
    param_specs: dict  # logical axis names (PartitionSpecs of names) of every parameter
    build: Any  # () -> the real model (eager sharding off: shardings come from the rules)
    batch_stats: tuple = ()  # paths (key tuples) in `rest` of nnx.BatchStat variables

    def rest_subset(self, paths) -> dict:
        """The nested sub-dict of `rest` holding only `paths`."""
        out: dict = {}
        for path in paths:
            node, src = out, self.rest
            for k in path[:-1]:
                node, src = node.setdefault(k, {}), src[k]
            node[path[-1]] = src[path[-1]]
        return out

    def shardings(self, tree: dict) -> dict:
        return jax.tree.map(lambda a: a.sharding, tree)


def abstract_model(config, mesh: jax.sharding.Mesh) -> AbstractModel:
    """Builds the task's model under `jax.eval_shape` and lays its arrays out on `mesh`.

    The train program (`t3d_jax.train.step`) starts from this too, so what is restored here is
    laid out exactly as training lays it out: `nnx.Param` vs the rest, as pure dicts, sharded
    by the logical names of `nnx.get_partition_spec` mapped through `config.sharding_rules`.
    (jax.eval_shape rather than nnx.eval_shape: the latter would resolve logical names against
    the ambient mesh itself; the graph and the logical specs are static, captured at trace time.)
    """
    task = tasks.get_task(config)
    seed = int(config.train.seed)

    def build() -> nnx.Module:
        with nnx.use_eager_sharding(False):
            return task.build_model(nnx.Rngs(seed))

    static: dict[str, Any] = {}

    def shapes():
        model = build()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        static.update(graphdef=graphdef, param_specs=nnx.to_pure_dict(nnx.get_partition_spec(params)),
                      rest_specs=nnx.to_pure_dict(nnx.get_partition_spec(rest)),
                      batch_stats=tuple(tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))))
        return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    params, rest = jax.eval_shape(shapes)  # the graph and the specs are static: captured while tracing
    rules = config.sharding_rules

    def laid_out(tree, specs):
        shardings = mesh_lib.tree_shardings(tree, specs, mesh, rules)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    return AbstractModel(static["graphdef"], laid_out(params, static["param_specs"]),
                         laid_out(rest, static["rest_specs"]), static["param_specs"], build,
                         static["batch_stats"])


def select_params(params: dict, names) -> dict:
    """The top-level submodules `names` of a params dict (all of it when `names` is empty):
    what `init_from.checkpoint_params` reads from another run, e.g. ("image_encoder",) to
    fine-tune a pretraining's image encoder under a fresh head. A name the model lacks is a
    `UserValueError`."""
    names = tuple(str(n) for n in (names or ()))
    if not names:
        return params
    missing = [n for n in names if n not in params]
    if missing:
        raise UserValueError(f"config.init_from.checkpoint_params names {missing}, which this config's model "
                             f"does not have (its top-level submodules: {sorted(params)})")
    return {n: params[n] for n in names}


def read_params(directory: str | os.PathLike, abstract_params: dict, step: int | None = None,
                *, fix: str = TRAIN_FIRST) -> tuple[dict, int]:
    """(params, step): only `state/params` of checkpoint `step` (None or < 0: the newest) in
    `directory`, read into `abstract_params`' shapes and shardings.

    A missing folder, a folder without a finished step, or an unknown step is a
    `UserFileNotFoundError` naming the folder and ending with `fix`. The folder is only read
    (never created, nothing moved aside).
    """
    parts, step = read_state_parts(directory, {"params": abstract_params}, step, fix=fix)
    return parts["params"], step


def read_state_parts(directory: str | os.PathLike, abstract_parts: dict, step: int | None = None,
                     *, fix: str = TRAIN_FIRST) -> tuple[dict, int]:
    """`read_params` for several parts of the saved train state at once: `abstract_parts` maps
    a key of `state` ('params', 'model_state') to the abstract (sub-)tree to read; each must be
    in the checkpoint with its shapes."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        raise UserFileNotFoundError(f"{directory}: no checkpoint folder; {fix}")
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(os.fspath(directory), options=options,
                               item_handlers={ckpt_lib.STATE: ocp.PyTreeCheckpointHandler()}) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise UserFileNotFoundError(f"{directory}: no finished checkpoint; {fix}")
        step = steps[-1] if step is None or int(step) < 0 else int(step)
        if step not in steps:
            raise UserFileNotFoundError(f"{directory}: no checkpoint at step {step}; have {steps}")
        saved = manager.item_metadata(step)[ckpt_lib.STATE]
        for key, abstract in abstract_parts.items():
            _check_fits(saved[key] if key in saved else {}, abstract, directory, step)
        partial = {key: ckpt_lib.abstract_storable(abstract) for key, abstract in abstract_parts.items()}
        restored = manager.restore(step, args=ocp.args.Composite(**{
            ckpt_lib.STATE: ocp.args.PyTreeRestore(
                item=partial, restore_args=ocp.checkpoint_utils.construct_restore_args(partial),
                partial_restore=True)}))
    return {key: ckpt_lib.from_storable(restored[ckpt_lib.STATE][key], abstract)
            for key, abstract in abstract_parts.items()}, step


def _check_fits(saved, abstract_params: dict, directory: pathlib.Path, step: int) -> None:
    """The checkpoint holds every parameter (or requested state entry) of the model, each with its shape, else a
    `UserValueError` (orbax's partial restore would leave a missing one unread, silently).
    Saved parameters the model lacks are fine: e.g. a `t3d` run evaluated as `clip`."""
    have = {path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
    want = {path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    missing = [k for k in want if k not in have]
    shapes = [f"{k} saved {have[k]}, model {want[k]}" for k in want if k in have and have[k] != want[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameter(s) not saved (e.g. {', '.join(missing[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} of another shape ({'; '.join(shapes[:3])})")
    if problems:
        raise UserValueError(
            f"{directory} step {step}: the checkpoint does not fit this config's model: "
            f"{' and '.join(problems)}; use the config the run was trained with (its WORKDIR/config.json: "
            f"the same --config variant and overrides)")


def restore_model(config, directory: str | os.PathLike, step: int | None = None, *,
                  mesh: jax.sharding.Mesh) -> tuple[nnx.Module, int]:
    """(model, step): `config`'s model on `mesh` holding checkpoint `step`'s parameters (newest
    when None) from `directory` (see `checkpoint_dir`) and its BatchNorm running statistics
    (if the model has any); RNG streams freshly initialised."""
    abstract = abstract_model(config, mesh)
    parts = {"params": abstract.params}
    if abstract.batch_stats:
        parts["model_state"] = abstract.rest_subset(abstract.batch_stats)
    parts, step = read_state_parts(directory, parts, step)

    def fresh_rest():  # the params' initialisers are dead code here: XLA drops them
        return nnx.to_pure_dict(nnx.split(abstract.build(), nnx.Param, ...)[2])

    rest = jax.jit(fresh_rest, out_shardings=abstract.shardings(abstract.rest))()
    for path in abstract.batch_stats:
        node, src = rest, parts["model_state"]
        for k in path[:-1]:
            node, src = node[k], src[k]
        node[path[-1]] = src[path[-1]]
    return nnx.merge(abstract.graphdef, parts["params"], rest), step
