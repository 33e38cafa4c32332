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
  matched by `optim.no_decay` (position embeddings), as is standard for transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

FROZEN = "frozen"


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


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


def param_labels(params, optim_config) -> tuple[dict, dict]:
    """Per-parameter label trees: the optax.multi_transform label and the weight-decay mask."""
    multipliers = dict(optim_config.lr_multipliers or {})
    freeze = [re.compile(p) for p in (optim_config.freeze or ())]

    def label(path, x):
        name = path_str(path)
        tower = tower_of(name, multipliers)
        if any(p.search(name) for p in freeze) or (tower and float(multipliers[tower]) == 0.0):
            return FROZEN
        return tower or "default"

    return jax.tree_util.tree_map_with_path(label, params), decay_mask_fn(optim_config)


def decay_mask_fn(optim_config):
    """A callable mask (not a tree) so it also applies to multi_transform's masked sub-trees."""
    no_decay = [re.compile(p) for p in (optim_config.no_decay or ())]

    def decay(path, x):
        name = path_str(path)
        return x.ndim > 1 and not any(p.search(name) for p in no_decay)

    return lambda tree: jax.tree_util.tree_map_with_path(decay, tree)


def make_optimizer(optim_config, params, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule, dict[str, float]]:
    """Builds the optax transformation for `params` (a pytree of arrays or abstract arrays).

    Returns (tx, base schedule, {label: lr multiplier}) so metrics can report each tower's lr.
    """
    schedule = learning_rate_schedule(optim_config, num_steps)
    labels, decay_mask = param_labels(params, optim_config)
    multipliers = dict(optim_config.lr_multipliers or {})
    used = sorted(set(jax.tree.leaves(labels)))

    def adamw(mult: float) -> optax.GradientTransformation:
        return optax.adamw(
            learning_rate=lambda count: schedule(count) * mult,
            b1=float(optim_config.b1), b2=float(optim_config.b2), eps=float(optim_config.eps),
            weight_decay=float(optim_config.weight_decay), mask=decay_mask)

    label_mult = {lab: (1.0 if lab == "default" else float(multipliers[lab]))
                  for lab in used if lab != FROZEN}
    transforms: dict[str, optax.GradientTransformation] = {
        lab: adamw(m) for lab, m in label_mult.items()}
    transforms[FROZEN] = optax.set_to_zero()
    frozen_mask = jax.tree.map(lambda lab: lab == FROZEN, labels)
    chain = [optax.masked(optax.set_to_zero(), frozen_mask)]
    if optim_config.clip_norm and float(optim_config.clip_norm) > 0:
        chain.append(optax.clip_by_global_norm(float(optim_config.clip_norm)))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain), schedule, label_mult


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
