"""Our encoders as PyTorch-ecosystem checkpoints: the inverse of :mod:`t3d_jax.models.convert`.

* :func:`vit3d_to_monai`: a :class:`ViT3D` as the state dict of ``monai.networks.nets.ViT`` (+
  the constructor arguments that make ``load_state_dict(strict=True)`` take it);
* :func:`resnet3d_to_monai`: a :class:`ResNet3D` (BatchNorm) as ``monai.networks.nets.resnet50``
  (or resnet10/18/34/101/152/200) with ``feed_forward=False``; the running statistics are the
  model's BatchNorm statistics;
* :func:`swin3d_to_monai`: a :class:`Swin3D` as ``monai.networks.nets.swin_unetr.SwinTransformer``
  (the ``swinViT`` of ``SwinUNETR``; its ``forward(x)`` list = our ``features(x)``);
* :func:`bert_to_hf`: a :class:`BertEncoder` as ``transformers.BertModel`` weights + ``config.json``;
* :func:`write_export`: all of a model's towers into one folder (``launch/export_weights.py``).

No torch needed: the weights are NumPy arrays written as ``.safetensors``. Layouts (see
convert.py): our kernels ``[in..., out...]`` become PyTorch's ``[out, in]``; conv kernels
``[kx, ky, kz, C_in, C_out]`` become ``[C_out, C_in, kx, ky, kz]``; attention kernels split by
head are merged back (MONAI's fused ``qkv`` orders its outputs ``(qkv, head, dh)``).

What a PyTorch user must do to get our outputs: feed channel-first ``[B, C, X, Y, Z]`` volumes
prepared as the training data (``export.json`` names the preset and view size) and standardised
with ``model.image.input_mean/input_std`` (``export.json``: ``image.input_mean/std``; both MONAI
models take the raw input, so this step is the user's); for the text, tokenize with the exported
``vocab.txt`` (WordPiece, [CLS] ... [SEP]) in the data's report order.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Callable

import numpy as np
from flax import nnx

from t3d_jax.models.bert import BertEncoder
from t3d_jax.models.resnet3d import ResNet3D
from t3d_jax.models.swin3d import Swin3D, relative_position_index
from t3d_jax.models.vit3d import ViT3D

StateDict = dict[str, np.ndarray]
ToNumpy = Callable[[object], np.ndarray]

IMAGE_FILE = "image_encoder.safetensors"
PROJECTIONS_FILE = "projections.safetensors"
TEXT_DIR = "text_encoder"
MANIFEST = "export.json"


def flat_values(module: nnx.Module, to_numpy: ToNumpy = np.asarray) -> dict[tuple, np.ndarray]:
    """``{path: float32/int array}`` of every Param and BatchStat of ``module``."""
    out = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, (nnx.Param, nnx.BatchStat)):
            out[tuple(path)] = np.asarray(to_numpy(node.get_value()))
    return out


def _layer_getter(flat: dict[tuple, np.ndarray], scanned: bool):
    """``get(container, i, *rest)``: layer ``i``'s weight, also from a scan_layers stack."""
    def get(*path):
        if not scanned:
            return flat[tuple(path)]
        container, index, *rest = path
        return flat[(container, *rest)][index]
    return get


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32))


# ----------------------------------------------------------------------------- MONAI ViT
def vit3d_to_monai(model: ViT3D, to_numpy: ToNumpy = np.asarray) -> tuple[StateDict, dict]:
    """(state dict, kwargs): ``monai.networks.nets.ViT(**kwargs).load_state_dict(sd, strict=True)``
    computes our ``tokens`` as its first output (``pool='mean'``; our ``pooled`` is their mean) or,
    for ``pool='cls'``, our ``pooled`` as its first output (an identity classification head of
    width ``num_classes = width``, no activation). Fixed sin-cos position tables are written as
    MONAI's learnable table (same values). MONAI's LayerNorms use eps 1e-5: a ViT trained with
    another ``layer_norm_eps`` (our default 1e-6) differs by that eps alone."""
    cfg = model.cfg
    flat = flat_values(model, to_numpy)
    get = _layer_getter(flat, cfg.scan_layers)
    d, heads = cfg.width, cfg.num_heads
    sd: StateDict = {
        "patch_embedding.patch_embeddings.weight": flat[("patch_embed", "kernel")].transpose(4, 3, 0, 1, 2),
        "patch_embedding.patch_embeddings.bias": flat[("patch_embed", "bias")],
        "patch_embedding.position_embeddings": np.asarray(to_numpy(model.position_table(cfg.grid)))[None],
    }
    if cfg.pool == "cls":
        sd["cls_token"] = flat[("cls_token",)].reshape(1, 1, d)
        sd["classification_head.weight"] = np.eye(d, dtype=np.float32)
        sd["classification_head.bias"] = np.zeros(d, np.float32)
    for i in range(cfg.depth):
        src, dst = ("blocks", i), f"blocks.{i}."
        q, k, v = (get(*src, "attn", n, "kernel").reshape(d, d) for n in ("query", "key", "value"))
        sd[dst + "attn.qkv.weight"] = np.concatenate([q, k, v], axis=1).T  # [3d, d], outputs (qkv, head, dh)
        if cfg.qkv_bias:
            sd[dst + "attn.qkv.bias"] = np.concatenate(
                [get(*src, "attn", n, "bias").reshape(d) for n in ("query", "key", "value")])
        sd[dst + "attn.out_proj.weight"] = get(*src, "attn", "out", "kernel").reshape(d, d).T
        sd[dst + "attn.out_proj.bias"] = get(*src, "attn", "out", "bias")
        for n in ("norm1", "norm2"):
            sd[dst + f"{n}.weight"] = get(*src, n, "scale")
            sd[dst + f"{n}.bias"] = get(*src, n, "bias")
        # MONAI's TransformerBlock always builds this LayerNorm; unused without cross-attention.
        sd[dst + "norm_cross_attn.weight"] = np.ones(d, np.float32)
        sd[dst + "norm_cross_attn.bias"] = np.zeros(d, np.float32)
        for ours, theirs in (("fc1", "linear1"), ("fc2", "linear2")):
            sd[dst + f"mlp.{theirs}.weight"] = get(*src, "mlp", ours, "kernel").T
            sd[dst + f"mlp.{theirs}.bias"] = get(*src, "mlp", ours, "bias")
    sd["norm.weight"] = flat[("norm", "scale")]
    sd["norm.bias"] = flat[("norm", "bias")]
    kwargs = dict(in_channels=cfg.in_channels, img_size=list(cfg.image_size), patch_size=list(cfg.patch_size),
                  hidden_size=d, mlp_dim=cfg.mlp_dim, num_layers=cfg.depth, num_heads=heads, proj_type="conv",
                  pos_embed_type="learnable", qkv_bias=bool(cfg.qkv_bias), spatial_dims=3)
    if cfg.pool == "cls":
        kwargs.update(classification=True, num_classes=d, post_activation=None)
    return {k: _f32(v) for k, v in sd.items()}, kwargs


# ----------------------------------------------------------------------------- MONAI ResNet
def resnet3d_to_monai(model: ResNet3D, to_numpy: ToNumpy = np.asarray) -> tuple[StateDict, dict]:
    """(state dict, kwargs): ``monai.networks.nets.<arch>(**kwargs)`` (e.g. ``resnet50``, with
    ``feed_forward=False``) loads it with ``strict=True`` and, in ``eval()``, outputs our
    ``pooled``. BatchNorm only: MONAI's ResNet applies a non-batch ``norm`` to its stem alone,
    so a GroupNorm model has no MONAI equivalent (ValueError)."""
    cfg = model.cfg
    if cfg.norm != "batch":
        raise ValueError(f"model.image.resnet.norm={cfg.norm!r}: only a BatchNorm ResNet3D has a MONAI "
                         "equivalent (MONAI's ResNet applies other norms to its stem only)")
    flat = flat_values(model, to_numpy)
    sd: StateDict = {}

    def conv(src, dst, bias=False):
        sd[f"{dst}.weight"] = flat[src + ("kernel",)].transpose(4, 3, 0, 1, 2)
        if bias:
            sd[f"{dst}.bias"] = flat[src + ("bias",)]

    def bn(src, dst):
        for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")):
            sd[f"{dst}.{theirs}"] = flat[src + (ours,)]

    conv(("conv1",), "conv1")
    bn(("bn1",), "bn1")
    convs = 3 if cfg.block == "bottleneck" else 2
    for i, count in enumerate(cfg.layers, start=1):
        for j in range(count):
            src, dst = (f"layer{i}", j), f"layer{i}.{j}"
            for n in range(1, convs + 1):
                conv(src + (f"conv{n}",), f"{dst}.conv{n}")
                bn(src + (f"bn{n}",), f"{dst}.bn{n}")
            if src + ("downsample_conv", "kernel") in flat:
                conv(src + ("downsample_conv",), f"{dst}.downsample.0", bias=cfg.bias_downsample)
                bn(src + ("downsample_norm",), f"{dst}.downsample.1")
    out = {k: _f32(v) for k, v in sd.items()}
    # PyTorch's BatchNorm counts its batches; it reads the count only when momentum is None.
    for k in [k for k in out if k.endswith(".running_var")]:
        out[k[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    kwargs = dict(n_input_channels=cfg.in_channels, conv1_t_size=list(cfg.conv1_size),
                  conv1_t_stride=list(cfg.conv1_stride), no_max_pool=bool(cfg.no_max_pool),
                  shortcut_type=cfg.shortcut, widen_factor=float(cfg.widen_factor),
                  bias_downsample=bool(cfg.bias_downsample), feed_forward=False, spatial_dims=3)
    return out, kwargs


# ----------------------------------------------------------------------------- MONAI SwinTransformer
def swin3d_to_monai(model: Swin3D, to_numpy: ToNumpy = np.asarray) -> tuple[StateDict, dict]:
    """(state dict, kwargs): ``monai.networks.nets.swin_unetr.SwinTransformer(**kwargs)`` loads it
    with ``strict=True``; its ``forward(x, normalize=cfg.normalize)`` returns our ``features`` (the
    last map, flattened, is our ``tokens``; our ``pooled`` is their mean). A ``SwinUNETR`` takes
    the same weights under ``swinViT.`` (its decoder is not ours). The ``relative_position_index``
    buffers (int64, part of MONAI's state dict) are MONAI's for the window."""
    cfg = model.cfg
    flat = flat_values(model, to_numpy)
    sd: StateDict = {"patch_embed.proj.weight": flat[("patch_embed", "kernel")].transpose(4, 3, 0, 1, 2),
                     "patch_embed.proj.bias": flat[("patch_embed", "bias")]}

    def linear(src, dst, in_dim, bias=True):
        sd[f"{dst}.weight"] = flat[src + ("kernel",)].reshape(in_dim, -1).T
        if bias:
            sd[f"{dst}.bias"] = flat[src + ("bias",)].reshape(-1)

    def norm(src, dst):
        sd[f"{dst}.weight"] = flat[src + ("scale",)]
        sd[f"{dst}.bias"] = flat[src + ("bias",)]

    if cfg.patch_norm:
        norm(("patch_norm",), "patch_embed.norm")
    index = relative_position_index(cfg.window_size)
    for s in range(4):
        dim = cfg.stage_dim(s)
        src_stage, dst_stage = (f"layers{s + 1}",), f"layers{s + 1}.0"
        for j in range(cfg.depths[s]):
            src, dst = src_stage + ("blocks", j), f"{dst_stage}.blocks.{j}"
            norm(src + ("norm1",), f"{dst}.norm1")
            norm(src + ("norm2",), f"{dst}.norm2")
            linear(src + ("attn", "qkv"), f"{dst}.attn.qkv", dim, bias=cfg.qkv_bias)  # outputs (qkv, head, dh)
            linear(src + ("attn", "proj"), f"{dst}.attn.proj", dim)
            sd[f"{dst}.attn.relative_position_bias_table"] = flat[src + ("attn", "relative_position_bias_table")]
            linear(src + ("mlp", "fc1"), f"{dst}.mlp.linear1", dim)
            linear(src + ("mlp", "fc2"), f"{dst}.mlp.linear2", int(dim * cfg.mlp_ratio))
        norm(src_stage + ("downsample", "norm"), f"{dst_stage}.downsample.norm")
        linear(src_stage + ("downsample", "reduction"), f"{dst_stage}.downsample.reduction", 8 * dim, bias=False)
    out = {k: _f32(v) for k, v in sd.items()}
    for s in range(4):
        for j in range(cfg.depths[s]):
            out[f"layers{s + 1}.0.blocks.{j}.attn.relative_position_index"] = np.ascontiguousarray(index)
    kwargs = dict(in_chans=cfg.in_channels, embed_dim=cfg.embed_dim, window_size=list(cfg.window_size),
                  patch_size=list(cfg.patch_size), depths=list(cfg.depths), num_heads=list(cfg.num_heads_per_stage),
                  mlp_ratio=float(cfg.mlp_ratio), qkv_bias=bool(cfg.qkv_bias), patch_norm=bool(cfg.patch_norm),
                  downsample=cfg.downsample, spatial_dims=3)
    return out, kwargs


def image_encoder_to_monai(encoder, to_numpy: ToNumpy = np.asarray) -> tuple[StateDict, dict]:
    """(state dict, {"class": MONAI constructor path, "kwargs": ...}) of an image encoder."""
    if isinstance(encoder, ViT3D):
        sd, kwargs = vit3d_to_monai(encoder, to_numpy)
        return sd, {"class": "monai.networks.nets.ViT", "kwargs": kwargs}
    if isinstance(encoder, ResNet3D):
        sd, kwargs = resnet3d_to_monai(encoder, to_numpy)
        return sd, {"class": f"monai.networks.nets.{encoder.cfg.arch}", "kwargs": kwargs}
    if isinstance(encoder, Swin3D):
        sd, kwargs = swin3d_to_monai(encoder, to_numpy)
        return sd, {"class": "monai.networks.nets.swin_unetr.SwinTransformer", "kwargs": kwargs}
    raise TypeError(f"no MONAI export for image encoder {type(encoder).__name__}")


# ----------------------------------------------------------------------------- Hugging Face BERT
def bert_to_hf(model: BertEncoder, to_numpy: ToNumpy = np.asarray) -> tuple[StateDict, dict]:
    """(``BertModel`` state dict, ``config.json`` dict). ``BertModel.from_pretrained`` of the
    folder :func:`write_hf_bert` makes computes our ``hidden`` as ``last_hidden_state`` and our
    ``pooled`` as ``pooler_output``."""
    cfg = model.cfg
    flat = flat_values(model, to_numpy)
    get = _layer_getter(flat, cfg.scan_layers)
    h = cfg.hidden_size
    sd: StateDict = {
        "embeddings.word_embeddings.weight": flat[("embeddings", "word", "embedding")],
        "embeddings.position_embeddings.weight": flat[("embeddings", "position", "embedding")],
        "embeddings.token_type_embeddings.weight": flat[("embeddings", "token_type", "embedding")],
        "embeddings.LayerNorm.weight": flat[("embeddings", "norm", "scale")],
        "embeddings.LayerNorm.bias": flat[("embeddings", "norm", "bias")],
    }
    for i in range(cfg.num_layers):
        src, dst = ("layers", i), f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            sd[dst + f"attention.self.{n}.weight"] = get(*src, "attn", n, "kernel").reshape(h, h).T
            sd[dst + f"attention.self.{n}.bias"] = get(*src, "attn", n, "bias").reshape(h)
        sd[dst + "attention.output.dense.weight"] = get(*src, "attn", "out", "kernel").reshape(h, h).T
        sd[dst + "attention.output.dense.bias"] = get(*src, "attn", "out", "bias")
        sd[dst + "attention.output.LayerNorm.weight"] = get(*src, "attn_norm", "scale")
        sd[dst + "attention.output.LayerNorm.bias"] = get(*src, "attn_norm", "bias")
        sd[dst + "intermediate.dense.weight"] = get(*src, "mlp", "fc1", "kernel").T
        sd[dst + "intermediate.dense.bias"] = get(*src, "mlp", "fc1", "bias")
        sd[dst + "output.dense.weight"] = get(*src, "mlp", "fc2", "kernel").T
        sd[dst + "output.dense.bias"] = get(*src, "mlp", "fc2", "bias")
        sd[dst + "output.LayerNorm.weight"] = get(*src, "mlp_norm", "scale")
        sd[dst + "output.LayerNorm.bias"] = get(*src, "mlp_norm", "bias")
    sd["pooler.dense.weight"] = flat[("pooler", "kernel")].T
    sd["pooler.dense.bias"] = flat[("pooler", "bias")]
    config = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": h,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": cfg.hidden_act,
        "hidden_dropout_prob": cfg.hidden_dropout, "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range, "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id, "position_embedding_type": "absolute",
    }
    return {k: _f32(v) for k, v in sd.items()}, config


def write_hf_bert(directory, model: BertEncoder, *, vocab_path=None, lowercase: bool = True,
                  max_len: int | None = None, to_numpy: ToNumpy = np.asarray) -> pathlib.Path:
    """A Hugging Face BERT folder: config.json, model.safetensors and, with ``vocab_path``, vocab.txt
    and tokenizer_config.json (``BertTokenizer``; ``do_lower_case`` = ``lowercase``)."""
    from safetensors.numpy import save_file

    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd, config = bert_to_hf(model, to_numpy)
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    if vocab_path:
        lines = pathlib.Path(vocab_path).read_text(encoding="utf-8").splitlines()
        if len(lines) > model.cfg.vocab_size:
            raise ValueError(f"{vocab_path}: {len(lines)} tokens, but the text encoder embeds "
                             f"{model.cfg.vocab_size} (model.text.vocab_size)")
        shutil.copyfile(vocab_path, d / "vocab.txt")
        tok = {"tokenizer_class": "BertTokenizer", "do_lower_case": bool(lowercase),
               "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}
        if max_len:
            tok["model_max_length"] = int(max_len)
        (d / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
    return d


# ----------------------------------------------------------------------------- a whole model
def write_export(model: nnx.Module, out, *, vocab_path=None, lowercase: bool = True, max_len: int | None = None,
                 info: dict | None = None, to_numpy: ToNumpy = np.asarray) -> dict:
    """Writes every tower ``model`` has into the folder ``out`` and returns the manifest
    (also ``out/export.json``):

    * ``image_encoder.safetensors``: the MONAI state dict of ``model.image_encoder``
      (``export.json``: ``image.class`` and ``image.kwargs`` build the MONAI model);
    * ``text_encoder/``: the Hugging Face BERT folder of ``model.text_encoder`` (if any);
    * ``projections.safetensors``: ``image_proj.weight`` / ``text_proj.weight`` (``nn.Linear``
      layout, no bias), ``logit_scale`` (and ``logit_bias``) of a two-tower model: embedding =
      normalize(W pooled);
    * ``info`` (e.g. checkpoint step, preprocessing) is merged into the manifest.
    """
    from safetensors.numpy import save_file

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = dict(info or {})
    encoder = getattr(model, "image_encoder", None)
    if encoder is not None:
        sd, ctor = image_encoder_to_monai(encoder, to_numpy)
        save_file(sd, str(out / IMAGE_FILE), metadata={"format": "pt"})
        cfg = encoder.cfg
        manifest["image"] = {"file": IMAGE_FILE, **ctor, "input_layout": "[B, C, X, Y, Z] (channel-first, RAS+)",
                             "input_mean": float(cfg.input_mean), "input_std": float(cfg.input_std),
                             "load": f"model = {ctor['class']}(**kwargs); model.load_state_dict("
                                     f"safetensors.torch.load_file('{IMAGE_FILE}'), strict=True); model.eval()"}
    text = getattr(model, "text_encoder", None)
    if text is not None:
        write_hf_bert(out / TEXT_DIR, text, vocab_path=vocab_path, lowercase=lowercase, max_len=max_len,
                      to_numpy=to_numpy)
        manifest["text"] = {"dir": TEXT_DIR, "pool": str(getattr(model, "text_pool", "cls")),
                            "load": f"transformers.BertModel.from_pretrained('{TEXT_DIR}')"}
    heads = {}
    for name in ("image_proj", "text_proj"):
        proj = getattr(model, name, None)
        if proj is not None:
            heads[f"{name}.weight"] = _f32(np.asarray(to_numpy(proj.kernel.get_value())).T)
    for name in ("logit_scale", "logit_bias"):
        var = getattr(model, name, None)
        if isinstance(var, nnx.Variable):
            heads[name] = _f32(np.asarray(to_numpy(var.get_value())).reshape(1))
    if heads:
        save_file(heads, str(out / PROJECTIONS_FILE), metadata={"format": "pt"})
        manifest["projections"] = {"file": PROJECTIONS_FILE, "names": sorted(heads)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
