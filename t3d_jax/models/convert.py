"""Import of PyTorch checkpoints: Hugging Face BERT, MONAI's 3D ``ViT``, ``ResNet`` (resnet50 ...)
and ``SwinTransformer`` (the ``swinViT`` of ``SwinUNETR``).

API (two layers, so a trainer can load weights into a sub-module of a bigger model):

* ``hf_bert_state(path) -> (BertConfig, state)``, ``hf_gpt2_state(path) -> (ReportDecoderConfig,
  state)`` (the text part of a report decoder), ``monai_vit_state(sd_or_path, **monai_kwargs)
  -> (ViT3DConfig, state)``, ``monai_resnet_state(sd_or_path, **monai_kwargs) -> (ResNet3DConfig,
  state)`` and ``monai_swin_state(sd_or_path, **monai_kwargs) -> (Swin3DConfig, state)`` (a MONAI
  ``SwinTransformer`` / ``SwinUNETR``: its ``swinViT`` part) read a checkpoint and return the converted weights as a *flat state*: ``{path tuple:
  np.ndarray}`` keyed by our module's parameter paths, e.g. ``('layers', 0, 'attn', 'query',
  'kernel')`` (a ResNet's state also holds its BatchNorm running statistics, ``.../mean|var``).
* ``assign(module, state, *, allow_missing=())`` writes such a state into an existing module
  (any sub-module of a larger model), checking that every path exists, shapes agree and that
  no parameter is left unloaded (except paths starting with an ``allow_missing`` prefix);
  values are cast to each parameter's dtype.  Errors name the offending paths.
* ``into_state(params, state, prefix=('text_encoder',))`` is the functional form for a split
  ``nnx.State`` (what a trainer holds after ``nnx.split``); it keeps each value's sharding.
* ``load_hf_bert(path)`` / ``load_hf_gpt2(path, visual_width=...)`` / ``load_monai_vit(path_or_state_dict, **monai_vit_kwargs)`` /
  ``load_monai_resnet(path_or_state_dict, **monai_resnet_kwargs)`` / ``load_monai_swin(...)`` do
  both and return a ready
  module, e.g.::

      text = convert.load_hf_bert("/models/BiomedBERT")                  # whole encoder
      cfg, state = convert.hf_bert_state("/models/BiomedBERT")
      convert.assign(model.text_encoder, state)                          # into a two-tower model

Safety: ``.bin``/``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)`` --
never an arbitrary unpickle; ``.safetensors`` needs no torch at all.

Layout notes.  PyTorch ``nn.Linear`` stores ``[out, in]``; our kernels are ``[in..., out...]``
with attention split by head: q/k/v ``[h, heads, dh]``, output ``[heads, dh, h]``.  MONAI's
fused ``qkv`` Linear orders its outputs ``(qkv, head, dh)`` (einops ``(qkv l d)``); its
Conv3d patch kernel ``[d, C, px, py, pz]`` becomes our ``[px, py, pz, C, d]`` (every ResNet conv
kernel ``[O, I, kx, ky, kz]`` likewise ``[kx, ky, kz, I, O]``).  MONAI takes
channel-first ``[B, C, X, Y, Z]`` volumes, ours are channel-last ``[B, X, Y, Z, C]``; both
order tokens row-major over (x, y, z), so outputs agree token for token.
The reverse direction (our models as MONAI / Hugging Face checkpoints) is
:mod:`t3d_jax.models.export_torch`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3d_jax.models.bert import BertConfig, BertEncoder
from t3d_jax.models.report_decoder import ReportDecoder, ReportDecoderConfig, TextDecoder
from t3d_jax.models.resnet3d import ARCHS, BLOCK_INPLANES, ResNet3D, ResNet3DConfig
from t3d_jax.models.swin3d import Swin3D, Swin3DConfig, relative_position_index
from t3d_jax.models.vit3d import ViT3D, ViT3DConfig

State = dict[tuple, np.ndarray]


# ----------------------------------------------------------------------------- reading files
def read_torch_weights(path) -> dict[str, np.ndarray]:
    """Reads ``.safetensors`` or a torch pickle (weights-only) into ``{name: float array}``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: torch.load(weights_only=True) refused or failed ({e})") from e
    return _tensors_to_numpy(obj, str(path))


def _tensors_to_numpy(obj: Any, where: str) -> dict[str, np.ndarray]:
    """Unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` and converts tensors to NumPy."""
    import torch

    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                return _tensors_to_numpy(obj[key], where)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
        elif isinstance(v, np.ndarray):
            out[k] = v
    return out


# ----------------------------------------------------------------------------- assigning
def match_layer_stacks(state: Mapping[tuple, Any], targets: Mapping[tuple, tuple]) -> dict[tuple, Any]:
    """Rewrites per-layer entries for a model built with ``scan_layers``.

    Converters name each layer's weights ``(container, i, *rest)`` (``('layers', 3, 'attn',
    'query', 'kernel')``); a scanned model holds ``(container, *rest)`` with the layers stacked
    on a new leading axis. Every group ``(container, 0..n-1, *rest)`` whose stacked path is a
    target (and is not itself a target per layer) becomes one stacked array; a gap in the
    layer indices is an error naming the path. Other entries pass through unchanged, so this
    is a no-op for unscanned models.
    """
    groups: dict[tuple, dict[int, Any]] = {}
    out: dict[tuple, Any] = {}
    for path, value in state.items():
        path = tuple(path)
        index = next((k for k, part in enumerate(path) if isinstance(part, int)), None)
        if index is not None and path not in targets:
            stacked = path[:index] + path[index + 1:]
            if stacked in targets:
                groups.setdefault(stacked, {})[path[index]] = value
                continue
        out[path] = value
    for stacked, by_layer in groups.items():
        count = int(targets[stacked][0])
        if sorted(by_layer) != list(range(count)):
            raise KeyError(f"checkpoint has layers {sorted(by_layer)} for {'/'.join(map(str, stacked))}, "
                           f"the scanned model has {count}")
        out[stacked] = np.stack([np.asarray(by_layer[i]) for i in range(count)])
    return out


def _check_paths(targets: Mapping[tuple, tuple], state: Mapping[tuple, Any], allow_missing, what: str) -> None:
    """Every state path must be a target path with the same shape, and every target be covered."""
    unknown = sorted(set(state) - set(targets), key=str)
    if unknown:
        raise KeyError(f"checkpoint has weights with no place in {what}: {unknown[:10]}")
    missing = [p for p in targets if p not in state and not any(p[:len(a)] == tuple(a) for a in allow_missing)]
    if missing:
        raise KeyError(f"checkpoint lacks weights for {what} parameters: {sorted(missing, key=str)[:10]}")
    for p, value in state.items():
        if tuple(np.shape(value)) != tuple(targets[p]):
            raise ValueError(f"shape mismatch at {'/'.join(map(str, p))}: checkpoint {tuple(np.shape(value))}, "
                             f"model {tuple(targets[p])}")


def assign(module: nnx.Module, state: Mapping[tuple, Any], *, allow_missing: tuple[tuple, ...] = (),
           kinds: tuple[type, ...] = (nnx.Param,)) -> nnx.Module:
    """Writes a flat state ``{path: array}`` into ``module``'s ``nnx.Param`` leaves, in place
    (``kinds``: the variable types written and required, e.g. ``(nnx.Param, nnx.BatchStat)``
    for BatchNorm running statistics)."""
    params = {tuple(p): v for p, v in nnx.iter_graph(module) if isinstance(v, kinds)}
    # get_value/set_value rather than [...]: also fills an abstract module (nnx.eval_shape).
    targets = {p: v.get_value().shape for p, v in params.items()}
    state = match_layer_stacks(state, targets)
    _check_paths(targets, state, allow_missing, type(module).__name__)
    for p, value in state.items():
        var = params[p]
        var.set_value(jnp.asarray(np.asarray(value), dtype=var.get_value().dtype))
    return module


def into_state(params: nnx.State, state: Mapping[tuple, Any], *, prefix: tuple = (),
               allow_missing: tuple[tuple, ...] = ()) -> nnx.State:
    """Functional form of :func:`assign` for a split parameter state (as a trainer holds it).

    ``params`` is e.g. ``nnx.split(model, nnx.Param)[1]`` of a whole two-tower model and
    ``prefix`` the sub-module's path (``('text_encoder',)``); only paths under ``prefix`` are
    checked and replaced.  Each new value keeps the dtype and (if it is a placed
    ``jax.Array``) the sharding of the value it replaces.  Returns a new State.
    """
    prefix = tuple(prefix)
    flat = list(params.flat_state())
    leaves = {tuple(p)[len(prefix):]: leaf for p, leaf in flat if tuple(p)[:len(prefix)] == prefix}
    if not leaves:
        raise KeyError(f"no parameters under {'/'.join(map(str, prefix)) or 'the root'} in this state")

    def raw(leaf):
        return leaf[...] if isinstance(leaf, nnx.Variable) else leaf

    targets = {p: raw(v).shape for p, v in leaves.items()}
    state = match_layer_stacks(state, targets)
    _check_paths(targets, state, allow_missing, "/".join(map(str, prefix)) or "state")
    out = []
    for p, leaf in flat:
        rel = tuple(p)[len(prefix):]
        if tuple(p)[:len(prefix)] == prefix and rel in state:
            old = raw(leaf)
            new = jnp.asarray(np.asarray(state[rel]), dtype=old.dtype)
            if isinstance(old, jax.Array) and hasattr(old, "sharding"):
                new = jax.device_put(new, old.sharding)
            leaf = leaf.replace(new) if isinstance(leaf, nnx.Variable) else new
        out.append((p, leaf))
    return nnx.State.from_flat_path(out)


def _default_rngs(rngs):
    return rngs if rngs is not None else nnx.Rngs(0)


# ----------------------------------------------------------------------------- Hugging Face BERT
def _find_hf_weights(d: pathlib.Path) -> pathlib.Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(f"{d}: no model.safetensors or pytorch_model.bin (sharded checkpoints not supported)")


def _strip_bert_prefix(sd: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Keeps the BertModel part: handles 'bert.' (BertFor*), 'model.' and bare layouts."""
    marker = "embeddings.word_embeddings.weight"
    hits = [k for k in sd if k.endswith(marker)]
    if not hits:
        raise ValueError(f"{where}: no '{marker}' -- not a BERT checkpoint")
    prefix = min(hits, key=len)[: -len(marker)]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def hf_bert_state_from_dict(sd: Mapping[str, np.ndarray], cfg: BertConfig, where: str = "state dict") -> State:
    """Maps Hugging Face ``BertModel`` names onto :class:`BertEncoder` paths (see bert.py)."""
    sd = _strip_bert_prefix({k: np.asarray(v) for k, v in sd.items()}, where)
    # TF-era checkpoints name LayerNorm parameters gamma/beta.
    sd = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
          for k, v in sd.items()}
    h, heads = cfg.hidden_size, cfg.num_heads
    dh = h // heads
    used: set[str] = set()

    def get(name):
        if name not in sd:
            raise KeyError(f"{where}: missing weight {name!r}")
        used.add(name)
        return sd[name]

    st: State = {
        ("embeddings", "word", "embedding"): get("embeddings.word_embeddings.weight"),
        ("embeddings", "position", "embedding"): get("embeddings.position_embeddings.weight"),
        ("embeddings", "token_type", "embedding"): get("embeddings.token_type_embeddings.weight"),
        ("embeddings", "norm", "scale"): get("embeddings.LayerNorm.weight"),
        ("embeddings", "norm", "bias"): get("embeddings.LayerNorm.bias"),
    }
    for i in range(cfg.num_layers):
        src, dst = f"encoder.layer.{i}.", ("layers", i)
        for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
            st[dst + ("attn", ours, "kernel")] = get(f"{src}attention.self.{theirs}.weight").T.reshape(h, heads, dh)
            st[dst + ("attn", ours, "bias")] = get(f"{src}attention.self.{theirs}.bias").reshape(heads, dh)
        st[dst + ("attn", "out", "kernel")] = get(f"{src}attention.output.dense.weight").T.reshape(heads, dh, h)
        st[dst + ("attn", "out", "bias")] = get(f"{src}attention.output.dense.bias")
        st[dst + ("attn_norm", "scale")] = get(f"{src}attention.output.LayerNorm.weight")
        st[dst + ("attn_norm", "bias")] = get(f"{src}attention.output.LayerNorm.bias")
        st[dst + ("mlp", "fc1", "kernel")] = get(f"{src}intermediate.dense.weight").T
        st[dst + ("mlp", "fc1", "bias")] = get(f"{src}intermediate.dense.bias")
        st[dst + ("mlp", "fc2", "kernel")] = get(f"{src}output.dense.weight").T
        st[dst + ("mlp", "fc2", "bias")] = get(f"{src}output.dense.bias")
        st[dst + ("mlp_norm", "scale")] = get(f"{src}output.LayerNorm.weight")
        st[dst + ("mlp_norm", "bias")] = get(f"{src}output.LayerNorm.bias")
    if "pooler.dense.weight" in sd:  # sentence-embedding exports sometimes drop the pooler
        st[("pooler", "kernel")] = get("pooler.dense.weight").T
        st[("pooler", "bias")] = get("pooler.dense.bias")
    extra_layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))
                           and int(m.group(1)) >= cfg.num_layers})
    if extra_layers:
        raise ValueError(f"{where}: has encoder layers {extra_layers} beyond num_hidden_layers={cfg.num_layers}")
    leftover = sorted(k for k in sd if k not in used and not k.endswith("position_ids"))
    if leftover:
        raise ValueError(f"{where}: BERT weights not understood (unsupported architecture?): {leftover[:10]}")
    return {k: np.ascontiguousarray(v) for k, v in st.items()}


def hf_bert_state(path) -> tuple[BertConfig, State]:
    """Reads a local Hugging Face BERT directory into ``(BertConfig, flat state)``."""
    d = pathlib.Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a directory (expected a Hugging Face BERT folder)")
    cfg = BertConfig.from_hf(d / "config.json")
    weights = _find_hf_weights(d)
    return cfg, hf_bert_state_from_dict(read_torch_weights(weights), cfg, str(weights))


def load_hf_bert(path, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs | None = None,
                 **config_overrides) -> BertEncoder:
    """A :class:`BertEncoder` with the weights of the Hugging Face BERT directory ``path``.

    A checkpoint without a pooler keeps a randomly initialised one (``rngs``, default seed 0).
    ``config_overrides`` (e.g. ``hidden_dropout=0.0``, ``remat='full'``) go to ``BertConfig``.
    """
    cfg, state = hf_bert_state(path)
    cfg = BertConfig(**{**cfg.__dict__, "dtype": dtype, "param_dtype": param_dtype, **config_overrides})
    model = BertEncoder(cfg, rngs=_default_rngs(rngs))
    return assign(model, state, allow_missing=(("pooler",),))


# ----------------------------------------------------------------------------- Hugging Face GPT-2
# Buffers older GPT-2 checkpoints store beside the weights (the causal mask): no parameter.
_GPT2_IGNORED = re.compile(r"\.(attn|crossattention)\.(bias|masked_bias)$")


def hf_gpt2_state_from_dict(sd: Mapping[str, np.ndarray], cfg: ReportDecoderConfig,
                            where: str = "state dict") -> State:
    """Maps Hugging Face ``GPT2LMHeadModel`` / ``GPT2Model`` names onto :class:`TextDecoder` paths.

    GPT-2's ``Conv1D`` stores ``[in, out]`` (no transpose); the fused ``c_attn`` [D, 3D] splits
    into q, k, v (cross-attention: ``q_attn`` [D, D] and ``c_attn`` [D, 2D] = k, v), each
    reshaped to [D, heads, dh]. ``lm_head.weight``, when present, must equal ``wte`` (tied).
    Every block must have cross-attention (``add_cross_attention=True``): a plain GPT-2 has
    none, and its missing ``crossattention`` / ``ln_cross_attn`` are reported by name.
    """
    sd = {k: np.asarray(v) for k, v in sd.items()}
    hits = [k for k in sd if k.endswith("wte.weight")]
    if not hits:
        raise ValueError(f"{where}: no 'wte.weight' -- not a GPT-2 checkpoint")
    prefix = min(hits, key=len)[: -len("wte.weight")]  # 'transformer.' (LM head model) or ''
    lm_head = sd.get("lm_head.weight")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    d, heads = cfg.hidden_size, cfg.num_heads
    dh = d // heads
    used: set[str] = set()

    def get(name):
        if name not in sd:
            raise KeyError(f"{where}: missing weight {prefix + name!r}"
                           + (" (a GPT-2 without add_cross_attention=True?)" if "cross" in name else ""))
        used.add(name)
        return np.asarray(sd[name], np.float32)

    st: State = {("wte", "embedding"): get("wte.weight"), ("wpe", "embedding"): get("wpe.weight"),
                 ("ln_f", "scale"): get("ln_f.weight"), ("ln_f", "bias"): get("ln_f.bias")}
    if lm_head is not None and not np.array_equal(np.asarray(lm_head, np.float32), st[("wte", "embedding")]):
        raise ValueError(f"{where}: lm_head.weight differs from wte.weight; only tied GPT-2 heads are supported")
    for i in range(cfg.num_layers):
        src, dst = f"h.{i}.", ("blocks", i)
        for ours, theirs in (("ln_1", "ln_1"), ("ln_cross", "ln_cross_attn"), ("ln_2", "ln_2")):
            st[dst + (ours, "scale")] = get(f"{src}{theirs}.weight")
            st[dst + (ours, "bias")] = get(f"{src}{theirs}.bias")
        w, b = get(f"{src}attn.c_attn.weight"), get(f"{src}attn.c_attn.bias")
        wq, wkv = get(f"{src}crossattention.q_attn.weight"), get(f"{src}crossattention.c_attn.weight")
        bq, bkv = get(f"{src}crossattention.q_attn.bias"), get(f"{src}crossattention.c_attn.bias")
        parts = {"attn": (np.split(w, 3, axis=1), np.split(b, 3)),
                 "cross": ([wq, *np.split(wkv, 2, axis=1)], [bq, *np.split(bkv, 2)])}
        for module, theirs in (("attn", "attn"), ("cross", "crossattention")):
            kernels, biases = parts[module]
            for name, kernel, bias in zip(("query", "key", "value"), kernels, biases):
                st[dst + (module, name, "kernel")] = kernel.reshape(d, heads, dh)
                st[dst + (module, name, "bias")] = bias.reshape(heads, dh)
            st[dst + (module, "out", "kernel")] = get(f"{src}{theirs}.c_proj.weight").reshape(heads, dh, d)
            st[dst + (module, "out", "bias")] = get(f"{src}{theirs}.c_proj.bias")
        st[dst + ("mlp", "fc1", "kernel")] = get(f"{src}mlp.c_fc.weight")
        st[dst + ("mlp", "fc1", "bias")] = get(f"{src}mlp.c_fc.bias")
        st[dst + ("mlp", "fc2", "kernel")] = get(f"{src}mlp.c_proj.weight")
        st[dst + ("mlp", "fc2", "bias")] = get(f"{src}mlp.c_proj.bias")
    leftover = sorted(k for k in sd if k not in used and not _GPT2_IGNORED.search(k))
    if leftover:
        raise ValueError(f"{where}: GPT-2 weights not understood (more layers than n_layer={cfg.num_layers}, "
                         f"or another architecture?): {leftover[:10]}")
    return {k: np.ascontiguousarray(v) for k, v in st.items()}


def hf_gpt2_state(path) -> tuple[ReportDecoderConfig, State]:
    """Reads a local Hugging Face GPT-2 directory into ``(ReportDecoderConfig, flat state)``; the
    state's paths are :class:`TextDecoder`'s (``assign(model.text, state)`` for a ReportDecoder)."""
    d = pathlib.Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a directory (expected a Hugging Face GPT-2 folder)")
    cfg = ReportDecoderConfig.from_hf(d / "config.json")
    weights = _find_hf_weights(d)
    return cfg, hf_gpt2_state_from_dict(read_torch_weights(weights), cfg, str(weights))


def load_hf_gpt2(path, *, visual_width: int | None = None, dtype="float32", param_dtype="float32",
                 seed: int = 0, **config_overrides) -> ReportDecoder:
    """A :class:`ReportDecoder` whose text decoder has the weights of the GPT-2 directory ``path``.

    The visual projection (``visual_width`` -> n_embd) and the resampler (``resampler_latents``
    in ``config_overrides``) are new: randomly initialised from ``seed``.
    """
    cfg, state = hf_gpt2_state(path)
    cfg = dataclasses.replace(cfg, visual_width=visual_width, dtype=dtype, param_dtype=param_dtype,
                              **config_overrides)
    # Every text weight comes from the checkpoint: build the text decoder abstractly (no random
    # init to throw away: op-by-op initialisers take seconds on CPU), fill it, and give its
    # dropout streams real keys.
    text = nnx.eval_shape(lambda: TextDecoder(cfg, rngs=nnx.Rngs(seed)))
    assign(text, state)
    streams = [v for _, v in nnx.iter_graph(text) if isinstance(v, (nnx.RngKey, nnx.RngCount))]
    for i, var in enumerate(streams):
        var.set_value(jax.random.fold_in(jax.random.key(seed), i) if isinstance(var, nnx.RngKey)
                      else jnp.zeros((), jnp.uint32))
    return ReportDecoder(cfg, rngs=nnx.Rngs(seed), text=text)


# ----------------------------------------------------------------------------- MONAI ViT
_MONAI_IGNORED = re.compile(r"(^|\.)(norm_cross_attn|cross_attn)\.|^classification_head\.|causal_mask$")


def _check_given(given: Mapping[str, Any], found: Mapping[str, Any], where: str) -> None:
    """Each size the caller gave (None = not given; an int patch size means all three axes)
    must be what the checkpoint's weights say (`found`)."""
    for k, v in given.items():
        if v is None:
            continue
        if k == "patch_size" and isinstance(v, int):
            v = (v,) * 3
        if (tuple(v) if isinstance(v, (list, tuple)) else v) != found[k]:
            raise ValueError(f"{where}: {k}={v} given, but the weights say {found[k]}")


def _monai_prefix(sd: Mapping[str, np.ndarray], where: str) -> str:
    for marker in ("patch_embedding.patch_embeddings.weight", "patch_embedding.patch_embeddings.1.weight"):
        hits = [k for k in sd if k.endswith(marker)]
        if hits:
            return min(hits, key=len)[: -len(marker)]
    raise ValueError(f"{where}: no 'patch_embedding.patch_embeddings' weight -- not a MONAI ViT state dict")


def monai_vit_config(sd: Mapping[str, np.ndarray], *, img_size, num_heads: int = 12, patch_size=None,
                     in_channels=None, hidden_size=None, mlp_dim=None, num_layers=None, proj_type=None,
                     pos_embed_type: str = "learnable", classification=None, qkv_bias=None, spatial_dims: int = 3,
                     dtype="float32", param_dtype="float32", where: str = "state dict", **ignored) -> ViT3DConfig:
    """The :class:`ViT3DConfig` equal to a MONAI ``ViT(**kwargs)``; shapes are read from ``sd``.

    Arguments that the weights determine (hidden size, patch size, channels, depth, MLP width,
    qkv bias, CLS token) are taken from ``sd`` and, if given, checked; ``img_size`` and
    ``num_heads`` cannot be read from weights and must match the MONAI model.  Training-only
    MONAI kwargs (dropout_rate, num_classes, post_activation, save_attn) are ignored.
    """
    if spatial_dims != 3:
        raise ValueError(f"{where}: only 3D MONAI ViTs are supported (spatial_dims={spatial_dims})")
    if pos_embed_type not in ("learnable", "sincos", "fourier", "none"):
        raise ValueError(f"{where}: unknown MONAI pos_embed_type {pos_embed_type!r}")
    conv = "patch_embedding.patch_embeddings.weight"
    inferred_proj = "conv" if conv in sd else "perceptron"
    if proj_type is not None and proj_type != inferred_proj:
        raise ValueError(f"{where}: proj_type={proj_type!r} but the weights are a {inferred_proj!r} patch embedding")
    pos = sd["patch_embedding.position_embeddings"]
    width = pos.shape[-1]
    img = tuple(int(s) for s in (img_size if not isinstance(img_size, int) else (img_size,) * 3))
    if inferred_proj == "conv":
        w = sd[conv]
        found_patch, found_c = tuple(int(s) for s in w.shape[2:]), int(w.shape[1])
    else:
        if patch_size is None or in_channels is None:
            raise ValueError(f"{where}: a 'perceptron' patch embedding needs patch_size and in_channels")
        found_patch = tuple(int(s) for s in (patch_size if not isinstance(patch_size, int) else (patch_size,) * 3))
        found_c = int(in_channels)
    depth = len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    found = dict(hidden_size=width, patch_size=found_patch, in_channels=found_c, num_layers=depth,
                 mlp_dim=int(sd["blocks.0.mlp.linear1.weight"].shape[0]) if depth else None,
                 qkv_bias=("blocks.0.attn.qkv.bias" in sd or "blocks.0.attn.to_q.bias" in sd),
                 classification="cls_token" in sd)
    given = dict(hidden_size=hidden_size, patch_size=patch_size, in_channels=in_channels, num_layers=num_layers,
                 mlp_dim=mlp_dim, qkv_bias=qkv_bias, classification=classification)
    _check_given(given, found, where)
    return ViT3DConfig(width=width, depth=depth, num_heads=num_heads, mlp_dim=found["mlp_dim"], image_size=img,
                       patch_size=found_patch, in_channels=found_c, pos_embed="learned",
                       pool="cls" if found["classification"] else "mean", qkv_bias=found["qkv_bias"],
                       layer_norm_eps=1e-5, dtype=dtype, param_dtype=param_dtype)


def monai_vit_state_from_dict(sd: Mapping[str, np.ndarray], cfg: ViT3DConfig, where: str = "state dict") -> State:
    """Maps MONAI ``ViT`` names (prefix already stripped) onto :class:`ViT3D` paths."""
    d, heads = cfg.width, cfg.num_heads
    dh = d // heads
    px, py, pz = cfg.patch_size
    used: set[str] = set()

    def get(name):
        if name not in sd:
            raise KeyError(f"{where}: missing weight {name!r}")
        used.add(name)
        return np.asarray(sd[name], np.float32)

    st: State = {}
    if "patch_embedding.patch_embeddings.weight" in sd:  # Conv3d [d, C, px, py, pz]
        st[("patch_embed", "kernel")] = get("patch_embedding.patch_embeddings.weight").transpose(2, 3, 4, 1, 0)
        st[("patch_embed", "bias")] = get("patch_embedding.patch_embeddings.bias")
    else:  # perceptron: Linear over (p1 p2 p3 c)
        w = get("patch_embedding.patch_embeddings.1.weight")
        st[("patch_embed", "kernel")] = w.reshape(d, px, py, pz, cfg.in_channels).transpose(1, 2, 3, 4, 0)
        st[("patch_embed", "bias")] = get("patch_embedding.patch_embeddings.1.bias")
    pos = get("patch_embedding.position_embeddings")
    n = int(np.prod(cfg.grid))
    if pos.shape[-2] != n:
        raise ValueError(f"{where}: {pos.shape[-2]} position embeddings, but img_size {cfg.image_size} / "
                         f"patch {cfg.patch_size} gives {n} tokens")
    st[("pos_embed",)] = pos.reshape(n, d)
    if cfg.pool == "cls":
        st[("cls_token",)] = get("cls_token").reshape(d)
    for i in range(cfg.depth):
        src, dst = f"blocks.{i}.", ("blocks", i)
        if f"{src}attn.qkv.weight" in sd:
            qkv = get(f"{src}attn.qkv.weight").T.reshape(d, 3, heads, dh)
            qkv_b = get(f"{src}attn.qkv.bias").reshape(3, heads, dh) if cfg.qkv_bias else None
            for j, name in enumerate(("query", "key", "value")):
                st[dst + ("attn", name, "kernel")] = qkv[:, j]
                if qkv_b is not None:
                    st[dst + ("attn", name, "bias")] = qkv_b[j]
        else:
            for name, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
                st[dst + ("attn", name, "kernel")] = get(f"{src}attn.{theirs}.weight").T.reshape(d, heads, dh)
                if cfg.qkv_bias:
                    st[dst + ("attn", name, "bias")] = get(f"{src}attn.{theirs}.bias").reshape(heads, dh)
        st[dst + ("attn", "out", "kernel")] = get(f"{src}attn.out_proj.weight").T.reshape(heads, dh, d)
        st[dst + ("attn", "out", "bias")] = get(f"{src}attn.out_proj.bias")
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
            st[dst + (ours, "scale")] = get(f"{src}{theirs}.weight")
            st[dst + (ours, "bias")] = get(f"{src}{theirs}.bias")
        for ours, theirs in (("fc1", "linear1"), ("fc2", "linear2")):
            st[dst + ("mlp", ours, "kernel")] = get(f"{src}mlp.{theirs}.weight").T
            st[dst + ("mlp", ours, "bias")] = get(f"{src}mlp.{theirs}.bias")
    st[("norm", "scale")] = get("norm.weight")
    st[("norm", "bias")] = get("norm.bias")
    leftover = sorted(k for k in sd if k not in used and not _MONAI_IGNORED.search(k))
    if leftover:
        raise ValueError(f"{where}: MONAI weights not understood (unsupported ViT options?): {leftover[:10]}")
    return {k: np.ascontiguousarray(v) for k, v in st.items()}


def _prefixed_state_dict(path_or_state_dict, prefix: str | None, find_prefix) -> tuple[dict[str, np.ndarray], str]:
    """(state dict without ``prefix``, where it came from) of a checkpoint file or an in-memory
    state dict; ``prefix=None`` finds it with ``find_prefix(raw, where)``."""
    if isinstance(path_or_state_dict, (str, pathlib.Path)):
        where = str(path_or_state_dict)
        raw = read_torch_weights(path_or_state_dict)
    else:
        where = "state dict"
        raw = _tensors_to_numpy(path_or_state_dict, where)
    if prefix is None:
        prefix = find_prefix(raw, where)
    return {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}, where


def monai_vit_state(path_or_state_dict, *, prefix: str | None = None, dtype="float32", param_dtype="float32",
                    **monai_vit_kwargs) -> tuple[ViT3DConfig, State]:
    """Reads a MONAI ``ViT`` checkpoint (file or state dict) into ``(ViT3DConfig, flat state)``.

    ``prefix`` (e.g. ``'vision_encoder.'`` in a CLIP checkpoint) is found automatically when
    None: the part before ``patch_embedding.patch_embeddings``.
    """
    sd, where = _prefixed_state_dict(path_or_state_dict, prefix, _monai_prefix)
    cfg = monai_vit_config(sd, dtype=dtype, param_dtype=param_dtype, where=where, **monai_vit_kwargs)
    return cfg, monai_vit_state_from_dict(sd, cfg, where)


def load_monai_vit(path_or_state_dict, *, prefix: str | None = None, dtype="float32", param_dtype="float32",
                   rngs: nnx.Rngs | None = None, **monai_vit_kwargs) -> ViT3D:
    """A :class:`ViT3D` computing what MONAI's ``ViT(**monai_vit_kwargs)`` with these weights computes.

    ``img_size`` and ``num_heads`` are required (as for MONAI); the rest is read from the
    weights.  Our output ``tokens`` equal MONAI's first output ``x`` (after the final norm)
    for the channel-last transpose of MONAI's input; with ``classification=True`` our
    ``pooled`` is MONAI's normed CLS token (the input of its classification head, which is
    not imported).  Position tables of every MONAI ``pos_embed_type`` load as our learned table.
    """
    cfg, state = monai_vit_state(path_or_state_dict, prefix=prefix, dtype=dtype, param_dtype=param_dtype,
                                 **monai_vit_kwargs)
    model = ViT3D(cfg, rngs=_default_rngs(rngs))
    return assign(model, state)


# ----------------------------------------------------------------------------- MONAI ResNet
# MONAI names -> ours inside a block: convN/bnN keep their names, ``downsample.0`` is the
# shortcut conv and ``downsample.1`` its BatchNorm. BatchNorm: weight/bias are parameters,
# running_mean/running_var are our nnx.BatchStat ``mean``/``var``; num_batches_tracked (only
# read by PyTorch when momentum=None) and the ``fc`` head have no place and are skipped.
_MONAI_RESNET_IGNORED = re.compile(r"(^|\.)num_batches_tracked$|^fc\.")
_BN_FIELDS = (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))


def _resnet_prefix(sd: Mapping[str, np.ndarray], where: str) -> str:
    hits = [k for k in sd if k.endswith("layer1.0.conv1.weight")]
    if not hits:
        raise ValueError(f"{where}: no 'layer1.0.conv1.weight' -- not a MONAI ResNet state dict")
    return min(hits, key=len)[: -len("layer1.0.conv1.weight")]


def monai_resnet_config(sd: Mapping[str, np.ndarray], *, conv1_t_stride=1, no_max_pool: bool = False,
                        n_input_channels=None, conv1_t_size=None, shortcut_type=None, widen_factor=None,
                        bias_downsample=None, block=None, layers=None, block_inplanes=None, norm="batch",
                        spatial_dims: int = 3, dtype="float32", param_dtype="float32", where: str = "state dict",
                        **ignored) -> ResNet3DConfig:
    """The :class:`ResNet3DConfig` equal to MONAI's ``ResNet(**kwargs)`` / ``resnet50(**kwargs)``.

    Block kind, blocks per stage, widths (``widen_factor``), input channels, conv1 kernel,
    shortcut type and downsample bias are read from ``sd`` and, if given, checked.
    ``conv1_t_stride`` and ``no_max_pool`` cannot be read from weights: they default to MONAI's
    ``ResNet`` defaults (1, False), so pass what the MONAI model was built with (MedicalNet /
    ``ResNetFeatures``: ``conv1_t_stride=2``). Training-only kwargs (num_classes, feed_forward,
    act) are ignored: ``fc`` is not imported.
    """
    if spatial_dims != 3:
        raise ValueError(f"{where}: only 3D MONAI ResNets are supported (spatial_dims={spatial_dims})")
    if norm not in ("batch", "BATCH", ("batch", {})):
        raise ValueError(f"{where}: only BatchNorm MONAI ResNets are supported (norm={norm!r})")
    if block_inplanes is not None and tuple(block_inplanes) != BLOCK_INPLANES:
        raise ValueError(f"{where}: block_inplanes={tuple(block_inplanes)}: only MONAI's {BLOCK_INPLANES} "
                         "(times widen_factor) is supported")
    w1 = sd["conv1.weight"]
    counts = tuple(len({m.group(1) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5))
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    arch = next((a for a, (b, n) in ARCHS.items() if b == kind and n == counts), None)
    if arch is None:
        raise ValueError(f"{where}: {kind} blocks {counts} per stage match no MONAI resnet "
                         f"({', '.join(f'{a}: {b} {n}' for a, (b, n) in ARCHS.items())})")
    planes0 = int(w1.shape[0])
    found_widen = planes0 / BLOCK_INPLANES[0]
    has_down = any(k.endswith("downsample.0.weight") for k in sd)
    found = dict(n_input_channels=int(w1.shape[1]), conv1_t_size=tuple(int(s) for s in w1.shape[2:]),
                 shortcut_type="B" if has_down else "A", widen_factor=found_widen,
                 bias_downsample=any(k.endswith("downsample.0.bias") for k in sd) if has_down else None,
                 block=kind, layers=counts)
    given = dict(n_input_channels=n_input_channels, conv1_t_size=conv1_t_size, shortcut_type=shortcut_type,
                 widen_factor=widen_factor, bias_downsample=bias_downsample if has_down else None, block=block,
                 layers=layers)
    for k, v in given.items():
        if v is None:
            continue
        if k == "conv1_t_size" and isinstance(v, int):
            v = (v,) * 3
        if k == "widen_factor":
            if int(BLOCK_INPLANES[0] * float(v)) != planes0:
                raise ValueError(f"{where}: widen_factor={v} given, but conv1 has {planes0} channels")
            continue
        if (tuple(v) if isinstance(v, (list, tuple)) else v) != found[k]:
            raise ValueError(f"{where}: {k}={v} given, but the weights say {found[k]}")
    widen = float(widen_factor) if widen_factor is not None else found_widen
    cfg = ResNet3DConfig(arch=arch, widen_factor=widen, in_channels=found["n_input_channels"],
                         conv1_size=found["conv1_t_size"], conv1_stride=conv1_t_stride, no_max_pool=bool(no_max_pool),
                         shortcut=found["shortcut_type"], bias_downsample=bool(found["bias_downsample"]),
                         norm="batch", dtype=dtype, param_dtype=param_dtype)
    last = f"layer4.{counts[3] - 1}.bn{3 if kind == 'bottleneck' else 2}.weight"
    if cfg.width != int(sd[last].shape[0]):
        raise ValueError(f"{where}: stage widths {tuple(int(sd[f'layer{i}.0.bn1.weight'].shape[0]) for i in range(1, 5))} "
                         f"are not MONAI's {BLOCK_INPLANES} x widen_factor {widen}")
    return cfg


def monai_resnet_state_from_dict(sd: Mapping[str, np.ndarray], cfg, where: str = "state dict") -> State:
    """Maps MONAI ``ResNet`` names (prefix already stripped) onto :class:`ResNet3D` paths.

    The state holds the parameters and the BatchNorm running statistics (``.../mean``,
    ``.../var``, our ``nnx.BatchStat``); :func:`load_monai_resnet` assigns both."""
    used: set[str] = set()

    def get(name):
        if name not in sd:
            raise KeyError(f"{where}: missing weight {name!r}")
        used.add(name)
        return np.asarray(sd[name])

    st: State = {}

    def conv(src, dst, bias=False):
        st[dst + ("kernel",)] = get(f"{src}.weight").transpose(2, 3, 4, 1, 0)  # [O,I,x,y,z] -> [x,y,z,I,O]
        if bias:
            st[dst + ("bias",)] = get(f"{src}.bias")

    def bn(src, dst):
        for ours, theirs in _BN_FIELDS:
            st[dst + (ours,)] = get(f"{src}.{theirs}")

    conv("conv1", ("conv1",))
    bn("bn1", ("bn1",))
    convs = 3 if cfg.block == "bottleneck" else 2
    for i, count in enumerate(cfg.layers, start=1):
        for j in range(count):
            src, dst = f"layer{i}.{j}", (f"layer{i}", j)
            for n in range(1, convs + 1):
                conv(f"{src}.conv{n}", dst + (f"conv{n}",))
                bn(f"{src}.bn{n}", dst + (f"bn{n}",))
            if f"{src}.downsample.0.weight" in sd:
                conv(f"{src}.downsample.0", dst + ("downsample_conv",), bias=cfg.bias_downsample)
                bn(f"{src}.downsample.1", dst + ("downsample_norm",))
    leftover = sorted(k for k in sd if k not in used and not _MONAI_RESNET_IGNORED.search(k))
    if leftover:
        raise ValueError(f"{where}: MONAI ResNet weights not understood: {leftover[:10]}")
    return {k: np.ascontiguousarray(v) for k, v in st.items()}


def monai_resnet_state(path_or_state_dict, *, prefix: str | None = None, dtype="float32", param_dtype="float32",
                       **monai_resnet_kwargs) -> tuple[ResNet3DConfig, State]:
    """Reads a MONAI ``ResNet`` checkpoint (file or state dict) into ``(ResNet3DConfig, flat state)``.

    ``prefix`` (e.g. ``'module.'`` or ``'vision_encoder.'``) is found automatically when None:
    the part before ``layer1.0.conv1.weight``."""
    sd, where = _prefixed_state_dict(path_or_state_dict, prefix, _resnet_prefix)
    cfg = monai_resnet_config(sd, dtype=dtype, param_dtype=param_dtype, where=where, **monai_resnet_kwargs)
    return cfg, monai_resnet_state_from_dict(sd, cfg, where)


def load_monai_resnet(path_or_state_dict, *, prefix: str | None = None, dtype="float32", param_dtype="float32",
                      **monai_resnet_kwargs) -> ResNet3D:
    """A :class:`ResNet3D` computing what MONAI's ``ResNet(**kwargs)`` with these weights computes
    in ``eval()`` mode: our ``pooled`` is MONAI's output with ``feed_forward=False`` (the
    average-pooled last stage; with ``fc`` that head is not imported) and our ``tokens`` are
    ``layer4``'s map, channel-last, row-major. Running statistics are imported too.

    ``monai_resnet_kwargs`` are the MONAI constructor's (``conv1_t_stride``, ``no_max_pool``, ...;
    see :func:`monai_resnet_config`)."""
    cfg, state = monai_resnet_state(path_or_state_dict, prefix=prefix, dtype=dtype, param_dtype=param_dtype,
                                    **monai_resnet_kwargs)
    # Every variable comes from the checkpoint: build abstractly (a random init of ResNet-50's
    # 46M parameters takes ~10 s of eager dispatch on CPU) and fill it.
    model = nnx.eval_shape(lambda: ResNet3D(cfg, rngs=nnx.Rngs(0)))
    return assign(model, state, kinds=(nnx.Param, nnx.BatchStat))


# ----------------------------------------------------------------------------- MONAI SwinTransformer
# Keys of MONAI's SwinTransformer (SwinUNETR: under 'swinViT.'; MONAI's self-supervised
# checkpoints: under 'module.'). Keys outside it (SwinUNETR's encoder/decoder convolutions,
# pretraining heads) are not read; unknown keys inside it are an error.
_SWIN_KEYS = re.compile(r"^(patch_embed\.|layers[1-4]c?\.)")


def _swin_prefix(sd: Mapping[str, np.ndarray], where: str) -> str:
    hits = [k for k in sd if k.endswith("patch_embed.proj.weight")]
    if not hits:
        raise ValueError(f"{where}: no 'patch_embed.proj.weight' -- not a MONAI SwinTransformer / SwinUNETR "
                         "state dict")
    return min(hits, key=len)[: -len("patch_embed.proj.weight")]


def monai_swin_config(sd: Mapping[str, np.ndarray], *, window_size=None, downsample: str = "merging",
                      normalize: bool = True, use_v2: bool = False, spatial_dims: int = 3, embed_dim=None,
                      feature_size=None, depths=None, num_heads=None, patch_size=None, in_chans=None,
                      in_channels=None, mlp_ratio=None, qkv_bias=None, patch_norm=None, dtype="float32",
                      param_dtype="float32", where: str = "state dict", **ignored) -> Swin3DConfig:
    """The :class:`Swin3DConfig` equal to MONAI's ``SwinTransformer(**kwargs)`` (or the ``swinViT``
    of ``SwinUNETR(**kwargs)``: ``feature_size``/``in_channels`` are accepted for ``embed_dim``/
    ``in_chans``). Widths, depths, heads, patch size, input channels, MLP ratio, qkv bias and
    patch norm are read from ``sd`` and, if given, checked. ``window_size`` is read from the bias
    tables when the window is cubic (else pass it; it is checked against the stored
    ``relative_position_index``). ``downsample`` ('merging', MONAI's default, or 'mergingv2') and
    ``normalize`` cannot be read from weights: pass what the MONAI model was built with. Training-
    only kwargs (dropout rates, use_checkpoint, SwinUNETR's out_channels ...) are ignored."""
    if spatial_dims != 3:
        raise ValueError(f"{where}: only 3D MONAI Swin transformers are supported (spatial_dims={spatial_dims})")
    if use_v2 or any(re.match(r"layers[1-4]c\.", k) for k in sd):
        raise ValueError(f"{where}: SwinUNETR v2 (use_v2, residual conv blocks 'layersNc') is not supported")
    if ignored.get("use_hyena") or ignored.get("hyena_stages"):
        raise ValueError(f"{where}: Hyena stages are not supported")
    w = sd["patch_embed.proj.weight"]
    depths_found = tuple(len({m.group(1) for k in sd if (m := re.match(rf"layers{i}\.0\.blocks\.(\d+)\.", k))})
                         for i in range(1, 5))
    if min(depths_found) == 0:
        raise ValueError(f"{where}: blocks per stage {depths_found}: a stage has no blocks (not a 4-stage MONAI "
                         "SwinTransformer)")
    tables = [sd[f"layers{i}.0.blocks.0.attn.relative_position_bias_table"] for i in range(1, 5)]
    e = int(w.shape[0])
    found = dict(embed_dim=e, depths=depths_found, num_heads=tuple(int(t.shape[1]) for t in tables),
                 patch_size=tuple(int(s) for s in w.shape[2:]), in_chans=int(w.shape[1]),
                 mlp_ratio=int(sd["layers1.0.blocks.0.mlp.linear1.weight"].shape[0]) / e,
                 qkv_bias="layers1.0.blocks.0.attn.qkv.bias" in sd, patch_norm="patch_embed.norm.weight" in sd)
    given = dict(embed_dim=embed_dim if embed_dim is not None else feature_size, depths=depths,
                 num_heads=num_heads, patch_size=patch_size, in_chans=in_chans if in_chans is not None else in_channels,
                 mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, patch_norm=patch_norm)
    _check_given(given, found, where)
    rows = int(tables[0].shape[0])
    if window_size is None:
        side = round(rows ** (1 / 3))
        if side ** 3 != rows or side % 2 == 0:
            raise ValueError(f"{where}: a bias table of {rows} rows is not a cubic window; pass window_size")
        window_size = (side + 1) // 2
    window = tuple(window_size) if isinstance(window_size, (list, tuple)) else (int(window_size),) * 3
    if int(np.prod([2 * a - 1 for a in window])) != rows:
        raise ValueError(f"{where}: window_size={window} needs {int(np.prod([2 * a - 1 for a in window]))} bias "
                         f"table rows, the weights have {rows}")
    stored = sd.get("layers1.0.blocks.0.attn.relative_position_index")
    if stored is not None and not np.array_equal(np.asarray(stored), relative_position_index(window)):
        raise ValueError(f"{where}: the stored relative_position_index is not the one of window_size={window}")
    return Swin3DConfig(embed_dim=e, depths=depths_found, num_heads_per_stage=found["num_heads"],
                        window_size=window, patch_size=found["patch_size"], in_channels=found["in_chans"],
                        mlp_ratio=found["mlp_ratio"], qkv_bias=found["qkv_bias"], patch_norm=found["patch_norm"],
                        downsample=downsample, normalize=bool(normalize), dtype=dtype, param_dtype=param_dtype)


def monai_swin_state_from_dict(sd: Mapping[str, np.ndarray], cfg: Swin3DConfig, where: str = "state dict") -> State:
    """Maps MONAI ``SwinTransformer`` names (prefix already stripped) onto :class:`Swin3D` paths."""
    used: set[str] = set()

    def get(name):
        if name not in sd:
            raise KeyError(f"{where}: missing weight {name!r}")
        used.add(name)
        return np.asarray(sd[name], np.float32)

    def linear(src, dst, out_shape=None, in_shape=None, bias=True):
        kernel = get(f"{src}.weight").T  # [out, in] -> [in, out]
        st[dst + ("kernel",)] = kernel.reshape(*(in_shape or kernel.shape[:1]), *(out_shape or kernel.shape[1:]))
        if bias:
            b = get(f"{src}.bias")
            st[dst + ("bias",)] = b.reshape(out_shape) if out_shape else b

    def norm(src, dst):
        st[dst + ("scale",)] = get(f"{src}.weight")
        st[dst + ("bias",)] = get(f"{src}.bias")

    st: State = {("patch_embed", "kernel"): get("patch_embed.proj.weight").transpose(2, 3, 4, 1, 0),
                 ("patch_embed", "bias"): get("patch_embed.proj.bias")}
    if cfg.patch_norm:
        norm("patch_embed.norm", ("patch_norm",))
    for s in range(4):
        dim, heads = cfg.stage_dim(s), cfg.num_heads_per_stage[s]
        hd = (heads, dim // heads)
        src_stage, dst_stage = f"layers{s + 1}.0", (f"layers{s + 1}",)
        for j in range(cfg.depths[s]):
            src, dst = f"{src_stage}.blocks.{j}", dst_stage + ("blocks", j)
            norm(f"{src}.norm1", dst + ("norm1",))
            norm(f"{src}.norm2", dst + ("norm2",))
            linear(f"{src}.attn.qkv", dst + ("attn", "qkv"), out_shape=(3, *hd), bias=cfg.qkv_bias)
            linear(f"{src}.attn.proj", dst + ("attn", "proj"), in_shape=hd)
            st[dst + ("attn", "relative_position_bias_table")] = get(f"{src}.attn.relative_position_bias_table")
            used.add(f"{src}.attn.relative_position_index")  # a buffer, recomputed (checked in the config)
            linear(f"{src}.mlp.linear1", dst + ("mlp", "fc1"))
            linear(f"{src}.mlp.linear2", dst + ("mlp", "fc2"))
        norm(f"{src_stage}.downsample.norm", dst_stage + ("downsample", "norm"))
        linear(f"{src_stage}.downsample.reduction", dst_stage + ("downsample", "reduction"), bias=False)
    leftover = sorted(k for k in sd if k not in used and _SWIN_KEYS.match(k))
    if leftover:
        raise ValueError(f"{where}: MONAI SwinTransformer weights not understood: {leftover[:10]}")
    return {k: np.ascontiguousarray(v) for k, v in st.items()}


def monai_swin_state(path_or_state_dict, *, prefix: str | None = None, dtype="float32", param_dtype="float32",
                     **monai_swin_kwargs) -> tuple[Swin3DConfig, State]:
    """Reads a MONAI ``SwinTransformer`` / ``SwinUNETR`` checkpoint (file or state dict) into
    ``(Swin3DConfig, flat state)``. ``prefix`` (``'swinViT.'`` in a SwinUNETR, ``'module.'`` in
    MONAI's self-supervised weights) is found automatically when None: the part before
    ``patch_embed.proj.weight``; keys without it (SwinUNETR's decoder) are not read."""
    sd, where = _prefixed_state_dict(path_or_state_dict, prefix, _swin_prefix)
    cfg = monai_swin_config(sd, dtype=dtype, param_dtype=param_dtype, where=where, **monai_swin_kwargs)
    return cfg, monai_swin_state_from_dict(sd, cfg, where)


def load_monai_swin(path_or_state_dict, *, prefix: str | None = None, dtype="float32", param_dtype="float32",
                    **monai_swin_kwargs) -> Swin3D:
    """A :class:`Swin3D` computing what MONAI's ``SwinTransformer(**kwargs)`` with these weights
    computes: ``features(x)`` = its ``forward(x, normalize)`` list, channel-last (``normalize`` is
    a kwarg here, default True as SwinUNETR). ``monai_swin_kwargs``: see :func:`monai_swin_config`."""
    cfg, state = monai_swin_state(path_or_state_dict, prefix=prefix, dtype=dtype, param_dtype=param_dtype,
                                  **monai_swin_kwargs)
    model = nnx.eval_shape(lambda: Swin3D(cfg, rngs=nnx.Rngs(0)))
    return assign(model, state)
