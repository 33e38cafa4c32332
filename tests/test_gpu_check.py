"""bench/gpu_check.sh's preconditions, checked on CPU without timing anything.

The GPU image the check runs on lacks monai, ml_collections, grain and the TF tokenizer
(tensorflow, tensorflow_text). These tests prove the bench does without them:

* the PyTorch ViT of bench/vs_pytorch.py (plain torch) is MONAI's ViT: the same parameter names,
  the same initial parameters from the same seed, the same outputs (monai is installed here);
* bench/configdict_shim.py builds every variant of every config file exactly as ml_collections;
* the bench's accelerator path -- config, both train steps built and one PyTorch step run, our
  step traced and lowered -- runs in a fresh interpreter in which importing any of the missing
  packages fails, and leaves none of them loaded.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
MISSING = ("monai", "ml_collections", "grain", "tensorflow", "tensorflow_text")

# Makes every package of MISSING absent, as on the GPU image: every import finder is wrapped so
# that it finds none of them (`import x` raises ModuleNotFoundError, importlib.util.find_spec
# returns None -- torch._dynamo and transformers probe for tensorflow that way), and who asked
# is recorded.
BLOCKER = f"""
import sys
MISSING = {MISSING!r}
ATTEMPTED = []
class _Absent:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            ATTEMPTED.append(name)
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [_Absent(f) for f in sys.meta_path]
sys.path[:0] = [{str(BENCH)!r}, {str(ROOT)!r}]
"""


def _run(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_gpu_path_imports_none_of_the_missing_packages():
    proc = _run("""
import json, numpy as np
import vs_pytorch as vp
import configdict_shim
assert configdict_shim.install_if_missing(), "ml_collections should be blocked here"
config, _ = vp.accel_config("gpu_tiny", "cpu", "bfloat16")
config.model.text.vocab_size = 2048  # the same code at a smaller embedding table: seconds saved
from train_step import synthetic_batch
batch = synthetic_batch(config, np.random.default_rng(0))
torch_step = vp.TorchCLIPStep(config, batch, device="cpu", dtype="bfloat16", vit_attention="sdpa")
torch_step()  # one eager step: autocast, SDPA, AdamW, clipping
cpu_case_step = vp.TorchCLIPStep(config, batch)  # the CPU cases' settings: float32, MONAI's einsum attention
cpu_case_step()
assert cpu_case_step.last_loss == cpu_case_step.last_loss
import jax
from t3d_jax.train import mesh as mesh_lib, step as step_lib
config.mesh.shape = (1, 1)
mesh = mesh_lib.make_mesh(config.mesh, jax.local_devices()[:1])
with jax.set_mesh(mesh):
    program = step_lib.make_train_program(config, mesh)
    program.step.lower(program.abstract_state, program.abstract_batch)  # traced, not compiled
flops = vp.analytic_flops(config)["flops_per_step"]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in MISSING
                and not getattr(sys.modules[m], "__shim__", False))
print(json.dumps({"attempted": sorted(set(ATTEMPTED)), "loaded": loaded, "torch_loss": torch_step.last_loss,
                  "flops": flops}))
""")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], out
    # Probes happen (the shim's for ml_collections; torch._dynamo's find_spec("tensorflow")) and
    # find nothing, as on the image.
    assert "ml_collections" in out["attempted"], out
    assert out["torch_loss"] == out["torch_loss"] and out["flops"] > 0, out


def test_configdict_shim_builds_every_config_as_ml_collections():
    proc = _run("""
import importlib, json
sys.meta_path[:] = [f.finder for f in sys.meta_path]  # ml_collections importable again: compare
def build(shim):
    for m in [k for k in sys.modules if k.split(".")[0] in ("configs", "ml_collections")]:
        del sys.modules[m]
    if shim:
        import configdict_shim
        sys.modules["ml_collections"] = configdict_shim.make_module()
    out = {}
    for name in ("t3d", "clip", "supervised"):
        module = importlib.import_module(f"configs.{name}")
        for v in ("tiny", "demo", "small", "base") + (("resnet_tiny", "resnet_base") if name == "t3d" else ()):
            c = module.get_config(v)
            c.seed = 7  # linked field (train.seed = get_ref("seed")) must follow
            out[f"{name}:{v}"] = json.dumps(c.to_dict(), sort_keys=True, default=repr)
    return out
real, shim = build(False), build(True)
print(json.dumps({"n": len(real), "differ": [k for k in real if real[k] != shim[k]],
                  "seed_linked": json.loads(shim["t3d:base"])["train"]["seed"]}))
""")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"n": 14, "differ": [], "seed_linked": 7}, out


@pytest.mark.parametrize("width,pos", [(48, "sincos"), (64, "learnable")])
def test_torch_vit_is_monais_vit(width, pos):
    torch = pytest.importorskip("torch")
    vit_mod = pytest.importorskip("monai.networks.nets")
    sys.path.insert(0, str(BENCH))
    try:
        import vs_pytorch
    finally:
        sys.path.remove(str(BENCH))
    kw = dict(in_channels=1, img_size=(16, 16, 8), patch_size=(8, 8, 4), hidden_size=width, mlp_dim=2 * width,
              num_layers=2, num_heads=4)
    torch.manual_seed(0)
    monai = vit_mod.ViT(**kw, proj_type="conv", classification=False, pos_embed_type=pos, dropout_rate=0.0,
                        spatial_dims=3, qkv_bias=True)
    torch.manual_seed(0)
    ours = vs_pytorch.TorchViT3D(**kw, pos_embed_type=pos, qkv_bias=True)
    theirs_sd, ours_sd = monai.state_dict(), ours.state_dict()
    assert list(theirs_sd) == list(ours_sd)
    for key in theirs_sd:  # same seed, same draws: the bench's PyTorch model starts where MONAI's would
        assert torch.equal(theirs_sd[key], ours_sd[key]), key
    x = torch.randn(3, 1, 16, 16, 8)
    with torch.no_grad():
        expected = monai(x)[0]
        assert torch.equal(ours(x), expected)  # MONAI's einsum attention: the same ops
        sdpa = vs_pytorch.TorchViT3D(**kw, pos_embed_type=pos, qkv_bias=True, attention="sdpa")
        sdpa.load_state_dict(theirs_sd, strict=True)
        torch.testing.assert_close(sdpa(x), expected, atol=1e-5, rtol=1e-5)
