"""`config.init_from`: start training from a Hugging Face BERT / GPT-2 and/or a MONAI ViT / Swin checkpoint.

The converters of `t3d_jax.models.convert` turn a checkpoint into a flat state
`{path tuple: array}` keyed by our encoder's parameter paths; here those arrays replace the
freshly initialised `text_encoder` / `image_encoder` parameters of the *sharded* train
state, one leaf at a time (`jax.device_put` with the leaf's own sharding), so a large
encoder is never assembled on one device. Used only for a fresh run; a resumed run takes
everything from its own checkpoint.

This is the one way to train from a Hugging Face BERT: set `model.text.size` (and
`model.text.vocab_size`) to the checkpoint's and point `init_from.hf_bert_dir` at its folder.
The model itself is always built from its config, never from files: the trainer traces model
construction under `jit` (weights read there would become constants of the init program), and
evaluation, export and AOT compiles of the config then need no checkpoint folder.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

log = logging.getLogger(__name__)

# Checkpoint weights our encoders have no place for, by design (BERT's tanh pooler is unused).
OPTIONAL_PREFIXES = (("pooler",),)


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _copy(tree):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def apply_flat_state(params: dict, shardings: dict, flat: dict, submodule: str, source: str) -> tuple[dict, int]:
    """Returns params with `params[submodule][path] = flat[path]` (cast, sharded); checks that
    every checkpoint weight has a place of the same shape and every submodule param is covered.
    `submodule` may name a nested module with '/' (e.g. 'decoder/text')."""
    keys = tuple(submodule.split("/"))
    node, node_shardings = params, shardings
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"{source}: the model has no {submodule!r} to load into")
        node, node_shardings = node[key], node_shardings[key]
    targets = _flat(node)
    target_shardings = _flat(node_shardings)
    from t3d_jax.models import convert

    flat = convert.match_layer_stacks({tuple(p): v for p, v in flat.items()},
                                      {p: tuple(v.shape) for p, v in targets.items()})
    unknown = [p for p in flat if p not in targets and not any(p[:len(o)] == o for o in OPTIONAL_PREFIXES)]
    if unknown:
        raise KeyError(f"{source}: weights with no place in {submodule}: {unknown[:8]}")
    missing = [p for p in targets if p not in flat]
    if missing:
        raise KeyError(f"{source}: no weights for {submodule} parameters {missing[:8]} (does "
                       f"config.model's size match the checkpoint's?)")
    out = _copy(params)
    for path, value in flat.items():
        if path not in targets:
            continue
        target = targets[path]
        if tuple(np.shape(value)) != tuple(target.shape):
            raise ValueError(f"{source}: {submodule}/{'/'.join(map(str, path))} has shape "
                             f"{tuple(np.shape(value))} in the checkpoint but {tuple(target.shape)} in "
                             f"the model; set config.model to the checkpoint's size")
        _set(out, keys + path, jax.device_put(np.asarray(value, dtype=target.dtype),
                                                   target_shardings[path]))
    return out, len(flat)


def load_into_state(config, program, state: dict) -> dict:
    from t3d_jax.models import convert

    init = config.init_from
    params = state["params"]
    shardings = program.state_shardings["params"]
    if init.hf_bert_dir:
        _, flat = convert.hf_bert_state(init.hf_bert_dir)
        params, n = apply_flat_state(params, shardings, flat, "text_encoder", init.hf_bert_dir)
        log.info("text_encoder: %d tensors from Hugging Face BERT %s", n, init.hf_bert_dir)
    if init.monai_vit:
        image = config.model.image
        _, flat = convert.monai_vit_state(
            init.monai_vit, img_size=tuple(config.data.view_size), patch_size=tuple(image.patch_size),
            num_heads=int(image.get("num_heads", 0) or _image_heads(config)))
        params, n = apply_flat_state(params, shardings, flat, "image_encoder", init.monai_vit)
        log.info("image_encoder: %d tensors from MONAI ViT %s", n, init.monai_vit)
    if init.get("hf_gpt2_dir", ""):
        # The report decoder's GPT-2 part (configs/reportgen.py builds it from the folder's
        # config.json); its visual projection and resampler stay freshly initialised.
        _, flat = convert.hf_gpt2_state(init.hf_gpt2_dir)
        params, n = apply_flat_state(params, shardings, flat, "decoder/text", init.hf_gpt2_dir)
        log.info("decoder/text: %d tensors from Hugging Face GPT-2 %s", n, init.hf_gpt2_dir)
    if init.get("monai_swin", ""):
        image = config.model.image
        if str(image.get("name", "vit3d")) != "swin3d":
            raise ValueError(f"init_from.monai_swin={init.monai_swin} needs model.image.name='swin3d', "
                             f"not {image.get('name', 'vit3d')!r}")
        swin = dict(image.get("swin", None) or {})
        # The window and the merging order cannot be read from the weights: the config's are used
        # (the window is checked against the checkpoint's bias tables and index buffers).
        _, flat = convert.monai_swin_state(init.monai_swin, window_size=tuple(swin.get("window_size", (7, 7, 7))),
                                           downsample=str(swin.get("downsample", "merging")))
        params, n = apply_flat_state(params, shardings, flat, "image_encoder", init.monai_swin)
        log.info("image_encoder: %d tensors from MONAI SwinTransformer %s", n, init.monai_swin)
    return dict(state, params=params)


def _image_heads(config) -> int:
    from t3d_jax.models.vit3d import SIZES

    return int(SIZES[config.model.image.size][2])
