"""Export to PyTorch (t3d_jax/models/export_torch.py, t3d_jax.export.run_export_weights): the
exported files load strictly in MONAI / transformers and compute what our models compute.

Tolerances (float32 on both sides; only summation order differs, as in tests/test_convert.py):
TOL = 1e-4 absolute on LayerNorm-scaled outputs (ViT tokens, BERT states); RTOL = 1e-5 of the
largest magnitude for the ResNet's unnormalised pooled features. A ViT with our default LayerNorm
eps (1e-6) is compared with MONAI's fixed 1e-5: that changes each normalised value by about
(1e-5 - 1e-6) / (2 var) relative, well inside TOL for unit-scale activations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from t3d_jax.models import export_torch
from t3d_jax.models.resnet3d import ResNet3D, ResNet3DConfig
from t3d_jax.models.vit3d import ViT3D, ViT3DConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
monai_nets = pytest.importorskip("monai.networks.nets")
from safetensors.torch import load_file  # noqa: E402

TOL = 1e-4
RTOL = 1e-5


def _perturb(model, seed):
    """Random values everywhere (init leaves biases 0 and norm scales 1, which hide mapping bugs)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = np.asarray(var.get_value())
        var.set_value(jnp.asarray(v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype)))
    return model


def _monai(ctor, path):
    """The MONAI model export.json names, loaded with strict=True, eval mode."""
    model = getattr(monai_nets, ctor["class"].rsplit(".", 1)[1])(**ctor["kwargs"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def test_two_tower_export_vit_and_bert_round_trip(tmp_path, bert_vocab):
    from configs.t3d import get_config
    from t3d_jax.models import build_model_from_config

    c = get_config("tiny")
    model = _perturb(build_model_from_config(c, rngs=nnx.Rngs(0)), 1)
    manifest = export_torch.write_export(model, tmp_path, vocab_path=bert_vocab, max_len=16)
    assert json.loads((tmp_path / "export.json").read_text()) == manifest
    assert manifest["image"]["class"] == "monai.networks.nets.ViT"

    # Image tower: MONAI's ViT output = our tokens (channel-first input, same row-major order).
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 16, 1)).astype(np.float32)
    ours = nnx.jit(lambda m, v: dict(m.volume_tokens(v), embedding=m.embed_volume(v)))(model, jnp.asarray(x))
    ref = _monai(manifest["image"], tmp_path / manifest["image"]["file"])
    with torch.no_grad():
        ref_tokens = ref(torch.tensor(x.transpose(0, 4, 1, 2, 3)))[0].numpy()
    d_img = float(np.abs(np.asarray(ours["tokens"]) - ref_tokens).max())

    # Text tower: a Hugging Face folder with the dataset's vocab.
    bert_dir = tmp_path / manifest["text"]["dir"]
    assert (bert_dir / "vocab.txt").read_bytes() == bert_vocab.read_bytes()
    hf, info = transformers.BertModel.from_pretrained(str(bert_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = transformers.BertTokenizer.from_pretrained(str(bert_dir))
    enc = tok(["No pleural effusion.", "Mild cardiomegaly with a 6 mm nodule in the right upper lobe."],
              padding="max_length", max_length=16, truncation=True, return_tensors="np")
    with torch.no_grad():
        ref_text = hf.eval()(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]))
    out = nnx.jit(lambda m, i, a: m.text_encoder(i, a))(model, jnp.asarray(enc["input_ids"]),
                                                        jnp.asarray(enc["attention_mask"]))
    valid = enc["attention_mask"].astype(bool)
    d_txt = float(np.abs(np.asarray(out["hidden"]) - ref_text.last_hidden_state.numpy())[valid].max())
    d_pool = float(np.abs(np.asarray(out["pooled"]) - ref_text.pooler_output.numpy()).max())

    # Projections: our image embedding from MONAI's tokens and the exported head.
    heads = load_file(str(tmp_path / manifest["projections"]["file"]))
    emb = torch.nn.functional.normalize(torch.tensor(ref_tokens).mean(1) @ heads["image_proj.weight"].T, dim=-1)
    d_emb = float(np.abs(emb.numpy() - np.asarray(ours["embedding"])).max())
    print(f"\nexport ViT max|d| {d_img:.1e}, BERT hidden {d_txt:.1e} pooled {d_pool:.1e}, embedding {d_emb:.1e}")
    assert max(d_img, d_txt, d_pool, d_emb) < TOL


def test_vit_cls_learned_scanned_export():
    cfg = ViT3DConfig(width=32, depth=2, num_heads=4, mlp_dim=48, image_size=(8, 16, 24), patch_size=(4, 8, 8),
                      in_channels=2, pos_embed="learned", pool="cls", qkv_bias=False, scan_layers=True,
                      layer_norm_eps=1e-5)
    model = _perturb(ViT3D(cfg, rngs=nnx.Rngs(2)), 3)
    sd, kwargs = export_torch.vit3d_to_monai(model)
    ref = monai_nets.ViT(**kwargs)
    ref.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
    x = np.random.default_rng(4).standard_normal((2, 8, 16, 24, 2)).astype(np.float32)
    with torch.no_grad():
        got = ref.eval()(torch.tensor(x.transpose(0, 4, 1, 2, 3)))[0].numpy()
    want = np.asarray(nnx.jit(lambda m, v: m(v)["pooled"])(model, jnp.asarray(x)))
    assert float(np.abs(got - want).max()) < TOL


def test_resnet_checkpoint_export_after_training(tmp_path):
    """A BatchNorm ResNet trained one step by the real train program: the running statistics
    move, the checkpoint keeps them, the params-only restore reads them, launch/export_weights'
    library call writes them, and MONAI's resnet10 in eval() reproduces our eval output."""
    from configs.supervised import get_config
    from t3d_jax.export import run_export_weights
    from t3d_jax.train import checkpoint as ckpt_lib
    from t3d_jax.train import mesh as mesh_lib
    from t3d_jax.train import params as params_lib
    from t3d_jax.train import step as step_lib

    c = get_config("tiny")
    c.data.dir = str(tmp_path / "no_data")
    c.checkpoint.async_save = False
    c.model.image.name = "resnet3d"
    r = c.model.image.resnet
    r.arch, r.widen_factor, r.conv1_size, r.conv1_stride, r.no_max_pool = "resnet10", 0.125, (3, 3, 3), (1, 1, 1), True
    # The step on one device (compiles faster; test_resnet3d.py covers the statistics under
    # sharding); the restore and export below lay the checkpoint out on all 8.
    mesh = mesh_lib.make_mesh(c.mesh, devices=jax.devices()[:1])
    rng = np.random.default_rng(5)
    with jax.set_mesh(mesh):
        program = step_lib.make_train_program(c, mesh)
        state = program.init()
        spec = program.task.batch_spec()
        batch = {"views": rng.standard_normal(spec["views"].shape).astype(np.float32) * 2 + 1,
                 "labels": rng.integers(0, 2, spec["labels"].shape).astype(np.float32)}
        batch = {k: jax.device_put(v, program.batch_shardings[k]) for k, v in batch.items()}
        state, metrics = program.step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    trained_mean = np.asarray(state["model_state"]["image_encoder"]["layer2"][0]["bn1"]["mean"])
    assert np.abs(trained_mean).max() > 1e-3  # moved from its initial 0 by the step
    manager = ckpt_lib.make_manager(tmp_path / "run" / "checkpoints", c.checkpoint)
    ckpt_lib.save(manager, 1, state, None, force=True)
    manager.wait_until_finished()
    manager.close()

    manifest = run_export_weights(c, tmp_path / "run", tmp_path / "out")
    assert manifest["checkpoint_step"] == 1 and "text" not in manifest
    assert manifest["image"]["class"] == "monai.networks.nets.resnet10"
    exported = load_file(str(tmp_path / "out" / manifest["image"]["file"]))
    np.testing.assert_array_equal(exported["layer2.0.bn1.running_mean"].numpy(), trained_mean)

    ref = _monai(manifest["image"], tmp_path / "out" / manifest["image"]["file"])
    model, _ = params_lib.restore_model(c, params_lib.checkpoint_dir(c, tmp_path / "run"),
                                        mesh=mesh_lib.make_mesh(c.mesh))
    x = rng.standard_normal((2, 16, 16, 16, 1)).astype(np.float32)
    ours = np.asarray(nnx.jit(lambda m, v: m.image_encoder(v)["pooled"])(model, jnp.asarray(x)))
    with torch.no_grad():
        got = ref(torch.tensor(x.transpose(0, 4, 1, 2, 3))).numpy()
    assert float(np.abs(got - ours).max() / np.abs(got).max()) < RTOL

    c.model.image.resnet.norm = "group"  # no MONAI equivalent
    group = nnx.eval_shape(lambda: ResNet3D(ResNet3DConfig.from_config(c.model.image), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="only a BatchNorm ResNet3D"):
        export_torch.image_encoder_to_monai(group)
