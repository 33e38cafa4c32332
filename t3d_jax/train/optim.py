"""The optimizer: AdamW, warmup + cosine, per-tower learning rates, freezing, clipping.

Every decision is made from a parameter's *path* ("text_encoder/layers/3/attn/query/kernel")
so that the same rules work for any model the registry builds:

* tower: the top-level submodule. `optim.lr_multipliers = {'image': 1.0, 'text': 0.1}` gives
  each parameter the multiplier of the longest key its top-level name starts with
  (`text_encoder` and `text_proj` -> 'text'); unmatched parameters get 1.0. A multiplier of
  0 freezes the tower.
* frozen: any path matched (`re.search`) by a pattern of `optim.freeze`, e.g.
  `r'^text_encoder/(embeddings|layers/[0-5]/)'` freezes the lower half of a 12-layer BERT.
  Frozen parameters get no update and no optimizer state, and their gradients are zeroed
  before clipping so they do not eat into the clip budget.
* weight decay: not applied to vectors (biases, norm scales, the logit scale) nor to paths
  matched by `optim.no_decay` (position embeddings), as is standard for transformers. A
  stacked (scanned) layer axis, logical name 'layers', does not make a vector a matrix:
  given the logical specs, a [layers, width] LayerNorm scale is not decayed either.
* layer-wise learning-rate decay (`optim.layer_decay = d`, 0 = off): the parameters of the
  image encoder get a further factor d^(L + 1 - depth), depth 0 for what comes before the
  first block (patch embedding, position table, stem), i + 1 for block i, L + 1 for what
  comes after the last (the final norm) and for everything outside the encoder (heads,
  projections: factor 1). See `layer_depth_of`.
* flattening (`optim.flatten=on`, off by default): AdamW over one concatenated vector per
  group of small replicated leaves instead of leaf by leaf (fewer kernels; see
  `resolve_flatten` for why it is not the default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from t3d_jax.models.layers import LAYERS_AXIS
from t3d_jax.utils import cfg_get, path_str

FROZEN = "frozen"
# Leaves above this many elements keep their own (per-leaf) AdamW even when flattening: their
# kernels are long enough that a dispatch does not matter, and concatenating them would add a
# copy of the array per step (measured on `tiny`, whose 30522x64 word embedding is 90% of
# the parameters: flattening it too made the optimizer slower than per-leaf; 2^16 beat 2^14).
FLATTEN_MAX_LEAF_SIZE = 1 << 16


def learning_rate_schedule(optim_config, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine to `lr * end_lr_factor` at `num_steps`."""
    lr = float(optim_config.lr)
    warmup = int(optim_config.warmup_steps)
    kind = optim_config.schedule
    if kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup,
            decay_steps=max(int(num_steps), warmup + 1),
            end_value=lr * float(optim_config.end_lr_factor))
    if kind == "warmup_constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup])
    if kind == "constant":
        return optax.constant_schedule(lr)
    raise ValueError(f"config.optim.schedule={kind!r}: use warmup_cosine | warmup_constant | constant")


def tower_of(path: str, multipliers: dict[str, float]) -> str:
    """The lr-multiplier key for a parameter path ('' when no key matches)."""
    top = path.split("/", 1)[0]
    matches = [k for k in multipliers if top.startswith(k)]
    return max(matches, key=len) if matches else ""


def logical_names(logical_specs) -> dict[str, tuple]:
    """{parameter path: logical axis names} from a tree of logical PartitionSpecs (the
    `nnx.get_partition_spec` of the params, as `make_train_program` collects them); a
    parameter without names maps to ()."""
    if logical_specs is None:
        return {}
    is_spec = lambda s: s is None or isinstance(s, P)
    flat = jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=is_spec)[0]
    return {path_str(p): (tuple(s) if s is not None else ()) for p, s in flat}


def _is_layers_axis(name) -> bool:
    return name == LAYERS_AXIS or (isinstance(name, tuple) and LAYERS_AXIS in name)


def matrix_rank(x, names: tuple | None) -> int:
    """Number of dims of `x` that are not a stacked-layers axis (logical name 'layers').

    A scanned model stores each block's parameters with a leading 'layers' axis, so a
    LayerNorm scale is [layers, width] -- still a vector per layer, never weight-decayed.
    Without logical names every dim counts (unscanned models have no such axis)."""
    if names is None:
        return x.ndim
    return sum(1 for d in range(x.ndim) if not _is_layers_axis(names[d] if d < len(names) else None))


def param_labels(params, optim_config, logical_specs=None) -> tuple[dict, Callable]:
    """Per-parameter label trees: the optax.multi_transform label and the weight-decay mask.

    `logical_specs` (optional, same tree as `params`, leaves logical PartitionSpecs): dims
    named 'layers' do not count towards the decay rule's "matrix" test (see `matrix_rank`).
    """
    multipliers = dict(optim_config.lr_multipliers or {})
    freeze = [re.compile(p) for p in (optim_config.freeze or ())]
    depths = layer_depths(params, optim_config)

    def label(path, x):
        name = path_str(path)
        tower = tower_of(name, multipliers)
        if any(p.search(name) for p in freeze) or (tower and float(multipliers[tower]) == 0.0):
            return FROZEN
        if depths is not None:  # layer decay: one label per (tower, depth), see label_multiplier
            return f"{tower or 'default'}{DEPTH_SEP}{depths[0][name]}"
        return tower or "default"

    return (jax.tree_util.tree_map_with_path(label, params),
            decay_mask_fn(optim_config, logical_specs))


DEPTH_SEP = "@"  # label of a parameter under layer decay: "<tower>@<depth>" (no "/": see _flat_groups)
LAYER_DECAY_PREFIX = "image_encoder"  # the top-level submodule whose blocks layer decay counts
_VIT_BLOCK = re.compile(r"^[^/]+/blocks/(\d+)/")  # ViT3D: blocks/<i>/...
_RESNET_BLOCK = re.compile(r"^[^/]+/layer(\d+)/(\d+)/")  # ResNet3D: layer<stage>/<block>/...
_AFTER_BLOCKS = re.compile(r"^[^/]+/norm/")  # ViT3D's final LayerNorm


def layer_depth_of(paths, prefix: str = LAYER_DECAY_PREFIX) -> tuple[dict[str, int], int]:
    """({path: depth}, L) for parameter paths, L = the number of blocks of the `prefix`
    submodule (the image encoder). Blocks are ViT3D's `blocks/<i>` (depth i + 1) or
    ResNet3D's `layer<s>/<j>` (numbered 1..L in stage then block order); the ViT's final
    `norm` and every path outside `prefix` get L + 1; every other path inside `prefix`
    (patch embedding, position table, CLS token, the ResNet stem) gets 0.

    A stacked encoder (`scan_layers`: its blocks are one leaf with a 'layers' axis, no block
    index in the path) cannot take per-layer rates this way: a ValueError says so."""
    paths = list(paths)
    inside = [p for p in paths if p.split("/", 1)[0] == prefix]
    blocks: dict[str, tuple] = {}
    for p in inside:
        m = _VIT_BLOCK.match(p) or _RESNET_BLOCK.match(p)
        if m:
            blocks[p] = tuple(int(g) for g in m.groups())
        elif re.match(r"^[^/]+/blocks/", p):
            raise ValueError(f"optim.layer_decay: {p!r} has no block index (a scan_layers encoder "
                             f"stacks its blocks); set model.image.scan_layers=False for layer decay")
    order = {key: i + 1 for i, key in enumerate(sorted(set(blocks.values())))}
    num = len(order)
    if inside and not num:
        raise ValueError(f"optim.layer_decay: no blocks found under {prefix!r} (expected "
                         f"{prefix}/blocks/<i>/... or {prefix}/layer<s>/<j>/...)")
    depth = {}
    for p in paths:
        if p in blocks:
            depth[p] = order[blocks[p]]
        elif p.split("/", 1)[0] != prefix or _AFTER_BLOCKS.match(p):
            depth[p] = num + 1
        else:
            depth[p] = 0
    return depth, num


def layer_depths(params, optim_config) -> tuple[dict[str, int], int] | None:
    """`layer_depth_of` the paths of `params` when `optim.layer_decay` is on (in (0, 1)), else None."""
    decay = float(cfg_get(optim_config, "layer_decay", 0.0) or 0.0)
    if decay == 0.0 or decay == 1.0:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"config.optim.layer_decay={decay}: use a factor in (0, 1), or 0 (off)")
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return layer_depth_of(paths)


def label_multiplier(label: str, optim_config, num_layers: int = 0) -> float:
    """The learning-rate factor of an optimizer label: the tower's `optim.lr_multipliers`
    entry (1 for 'default'), times `layer_decay ** (L + 1 - depth)` for a '<tower>@<depth>'
    label, L = `num_layers` (the encoder's blocks, `layer_depth_of`)."""
    multipliers = dict(optim_config.lr_multipliers or {})
    tower, sep, depth = label.partition(DEPTH_SEP)
    mult = 1.0 if tower == "default" else float(multipliers[tower])
    if sep:
        decay = float(cfg_get(optim_config, "layer_decay", 0.0))
        mult *= decay ** (int(num_layers) + 1 - int(depth))
    return mult


def decay_mask_fn(optim_config, logical_specs=None):
    """A callable mask (not a tree) so it also applies to multi_transform's masked sub-trees.

    Decayed: parameters with more than one non-'layers' dim whose path no `optim.no_decay`
    pattern matches. Paths absent from `logical_specs` (when given) are an error: the specs
    must describe the same parameter tree.
    """
    no_decay = [re.compile(p) for p in (optim_config.no_decay or ())]
    names = logical_names(logical_specs) if logical_specs is not None else None

    def decay(path, x):
        name = path_str(path)
        if names is not None and name not in names:
            raise ValueError(f"weight decay: parameter {name!r} has no logical axis names in the "
                             f"specs passed to the optimizer (they describe another model?)")
        rank = matrix_rank(x, None if names is None else names[name])
        return rank > 1 and not any(p.search(name) for p in no_decay)

    return lambda tree: jax.tree_util.tree_map_with_path(decay, tree)


def resolve_flatten(setting) -> bool:
    """`optim.flatten`: "auto" (the default when the key is absent), "on"/True, "off"/False.

    "auto" is per-leaf AdamW (off). Measured on this project's CPU bench (interleaved, one
    device; docs/performance.md) flattening gave no gain on the whole step at `tiny`/`demo`
    (0.97-1.00x with the lax.cond guard, train.nonfinite_guard=cond), and it changes the
    optimizer state's tree, so a checkpoint would no longer resume under a different
    setting or, with "on", on a mesh that splits other parameters. "on" remains for
    measuring elsewhere; it never flattens a parameter split over devices."""
    value = str(setting).strip().lower()
    if value in ("auto", "off", "false", "0", "no", "none"):
        return False
    if value in ("on", "true", "1", "yes"):
        return True
    raise ValueError(f"config.optim.flatten={setting!r}: use auto | on | off")


def flat_eligible(params, param_shardings=None):
    """Tree of bools: leaves that flattening may concatenate -- not split over devices
    (concatenating those would gather them) and at most FLATTEN_MAX_LEAF_SIZE elements."""
    small = jax.tree.map(lambda x: math.prod(x.shape) <= FLATTEN_MAX_LEAF_SIZE, params)
    if param_shardings is None:
        return small
    return jax.tree.map(lambda s, sh: s and sh.is_fully_replicated, small, param_shardings)


def global_norm(tree, eligible=None) -> jax.Array:
    """The L2 norm of all leaves of `tree`, as `optax.tree.norm`; with `eligible` (a bool tree
    from `flat_eligible`) the eligible leaves are concatenated and reduced in ONE kernel
    instead of one square-and-reduce per leaf."""
    if eligible is None:
        return optax.tree.norm(tree)
    leaves = jax.tree.leaves(tree)
    flags = jax.tree.leaves(eligible)
    if len(flags) != len(leaves):
        raise ValueError(f"global_norm: {len(leaves)} leaves but {len(flags)} eligibility flags")
    small = [jnp.ravel(x) for x, f in zip(leaves, flags) if f]
    parts = [jnp.sum(jnp.square(x)) for x, f in zip(leaves, flags) if not f]
    if small:
        parts.append(jnp.sum(jnp.square(jnp.concatenate(small))))
    return jnp.sqrt(sum(parts)) if parts else jnp.zeros((), jnp.float32)


def clip_by_global_norm(max_norm: float, eligible=None) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (same arithmetic, same empty state) with its norm from
    `global_norm(.., eligible)`."""
    def update(updates, state, params=None):
        del params
        g_norm = global_norm(updates, eligible)
        trigger = jnp.squeeze(g_norm < max_norm)
        clip = lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_config, params, num_steps: int, *, logical_specs=None,
                   flatten: bool = False, param_shardings=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule, dict[str, float]]:
    """Builds the optax transformation for `params` (a pytree of arrays or abstract arrays).

    Returns (tx, base schedule, {label: lr multiplier}) so metrics can report each tower's lr.

    The chain is always (zero frozen gradients, clip by global norm, multi_transform by label).
    `flatten=False`: one AdamW per lr label, applied leaf by leaf, weight decay by mask.
    `flatten=True`: the leaves are grouped by (lr label, decayed or not) and each group's
    AdamW runs on ONE concatenated vector (`optax.flatten`): a handful of kernels instead of
    several per leaf, which is what the step of a small model pays for on CPU. Decay is then
    by group (adamw vs adam) rather than by mask -- the same arithmetic per element. Leaves
    that `param_shardings` splits over devices stay per-leaf in their own group, so FSDP
    optimizer state is never replaced by a replicated vector.
    """
    schedule = learning_rate_schedule(optim_config, num_steps)
    labels, decay_mask = param_labels(params, optim_config, logical_specs)
    multipliers = dict(optim_config.lr_multipliers or {})
    used = sorted(set(jax.tree.leaves(labels)))
    hyper = dict(b1=float(optim_config.b1), b2=float(optim_config.b2), eps=float(optim_config.eps))

    def lr(mult: float) -> optax.Schedule:
        return lambda count: schedule(count) * mult

    def adamw(mult: float) -> optax.GradientTransformation:
        return optax.adamw(learning_rate=lr(mult), weight_decay=float(optim_config.weight_decay),
                           mask=decay_mask, **hyper)

    depths = layer_depths(params, optim_config)
    num_layers = depths[1] if depths is not None else 0
    label_mult = {lab: label_multiplier(lab, optim_config, num_layers) for lab in used if lab != FROZEN}
    frozen = jax.tree.map(lambda lab: lab == FROZEN, labels)
    if flatten:
        labels, transforms = _flat_groups(labels, decay_mask(params), params, param_shardings, label_mult,
                                          lr, float(optim_config.weight_decay), hyper)
    else:
        transforms = {lab: adamw(m) for lab, m in label_mult.items()}
    transforms[FROZEN] = optax.set_to_zero()
    chain = [optax.masked(optax.set_to_zero(), frozen)]
    if optim_config.clip_norm and float(optim_config.clip_norm) > 0:
        clip = float(optim_config.clip_norm)
        chain.append(clip_by_global_norm(clip, flat_eligible(params, param_shardings))
                     if flatten else optax.clip_by_global_norm(clip))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain), schedule, label_mult


def _flat_groups(labels, decayed, params, param_shardings, label_mult, lr, weight_decay, hyper):
    """Group labels "<lr label>/decay|no_decay[/leaf]" and their transforms: a flattened
    AdamW (decay) or Adam (no decay) per group of small replicated leaves; "/leaf" groups
    (device-split or large leaves) stay per-leaf."""
    eligible = flat_eligible(params, param_shardings)

    def group(lab, dec, flat):
        if lab == FROZEN:
            return FROZEN
        return f"{lab}/{'decay' if dec else 'no_decay'}" + ("" if flat else "/leaf")

    groups = jax.tree.map(group, labels, decayed, eligible)
    transforms = {}
    for name in sorted(set(jax.tree.leaves(groups)) - {FROZEN}):
        lab, kind, *per_leaf = name.split("/")
        if kind == "decay":
            inner = optax.adamw(learning_rate=lr(label_mult[lab]), weight_decay=weight_decay, **hyper)
        else:
            inner = optax.adam(learning_rate=lr(label_mult[lab]), **hyper)
        transforms[name] = inner if per_leaf else optax.flatten(inner)
    return groups, transforms


def frozen_mask(params, optim_config):
    labels, _ = param_labels(params, optim_config)
    return jax.tree.map(lambda lab: lab == FROZEN, labels)


def zero_frozen(grads, mask):
    """Zeros frozen gradients (so the reported gradient norm is that of trained parameters)."""
    return jax.tree.map(lambda g, m: jnp.zeros_like(g) if m else g, grads, mask)


def count_params(params, mask=None) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    leaves = jax.tree.leaves(params)
    total = sum(int(x.size) for x in leaves)
    if mask is None:
        return total, total
    frozen = sum(int(x.size) for x, m in zip(leaves, jax.tree.leaves(mask)) if m)
    return total, total - frozen


LrFn = Callable[[jax.Array], jax.Array]
