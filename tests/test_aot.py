"""t3d_jax.train.aot (behind launch/aot_compile.py): topology parsing, compile-only TPU
devices, hybrid (multi-slice) mesh, and the memory / FLOP figures it reports, checked against
quantities known in closed form.

Compiles small functions (seconds), never the `base` model (minutes; that is the tool's job,
not a test). Needs libtpu (compile-only use works on a CPU machine): `pip install
libtpu==0.0.42.1`, the version jax 0.10.2's [tpu] extra pins, which the `aot` extra installs;
without it the `aot_tpu` fixture fails with that install line.
"""

from __future__ import annotations

import numpy as np
import pytest

from t3d_jax.utils import UserValueError


def test_parse_topology_accepts_known_chips_and_rejects_the_rest(aot):
    assert aot.parse_topology("v5e:16x16") == ("v5e", (16, 16))
    assert aot.parse_topology("v5p:4x4x8") == ("v5p", (4, 4, 8))
    for bad in ("v5e", "v9:2x2", "v5e:16", "tpu-v4-32", "v4:4x4x"):
        with pytest.raises(UserValueError, match="topology"):
            aot.parse_topology(bad)


def test_topology_devices_one_per_chip_and_env_left_clean(aot_tpu, monkeypatch):
    import os

    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    devices = aot_tpu.topology_devices("v5e:4x4")
    assert len(devices) == 16 and {d.platform for d in devices} == {"tpu"}
    assert "v5 lite" in devices[0].device_kind.lower()
    # v4/v5p: megacore, one device per chip (without it libtpu lists 2 cores per chip)
    v4 = aot_tpu.topology_devices("v4:2x2x1")
    assert len(v4) == 4 and {d.core_on_chip for d in v4} == {0}
    # the compile-only settings must not leak: jax.distributed treats TPU_WORKER_HOSTNAMES as a pod
    assert "TPU_WORKER_HOSTNAMES" not in os.environ


def test_hybrid_mesh_puts_slices_on_the_data_axis(aot_tpu):
    import ml_collections

    devices = aot_tpu.topology_devices("v5e:2x2", num_slices=2)
    assert len(devices) == 8
    cfg = ml_collections.ConfigDict({"shape": (2, -1), "axes": ("data", "fsdp")})
    mesh = aot_tpu.make_topology_mesh(cfg, devices, num_slices=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    # each row of the data axis is one whole slice: fsdp collectives never cross DCN
    assert (slices == np.arange(2)[:, None]).all()
    bad = ml_collections.ConfigDict({"shape": (1, -1), "axes": ("data", "fsdp")})
    with pytest.raises(UserValueError, match="multiple of the slice count"):
        aot_tpu.make_topology_mesh(bad, devices, num_slices=2)


def test_memory_and_flops_of_a_sharded_matmul_match_closed_form(aot_tpu):
    """y = x @ w with x [1024, 512] split over 4 chips by rows, w [512, 2048] replicated, bf16.

    Per chip: arguments = x/4 + w = (256*512 + 512*2048) * 2 bytes; output = 256*2048*2
    bytes; FLOPs = 2 * 256 * 512 * 2048 (XLA's cost analysis is per chip for SPMD programs).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    devices = aot_tpu.topology_devices("v5e:2x2")
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    x = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((512, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    compiled = jax.jit(jnp.matmul, out_shardings=NamedSharding(mesh, P("data"))).lower(x, w).compile()
    chip = aot_tpu.CHIPS["v5e"]
    mem = aot_tpu.memory_report(compiled, chip)
    assert mem["argument_bytes"] == (256 * 512 + 512 * 2048) * 2
    assert mem["output_bytes"] == 256 * 2048 * 2
    assert mem["total_bytes"] >= mem["argument_bytes"] + mem["output_bytes"]
    assert mem["fits_hbm"] and mem["hbm_gib"] == 16
    cost = aot_tpu.cost_report(compiled, chip, num_devices=4)
    assert cost["flops_per_chip"] == pytest.approx(2 * 256 * 512 * 2048, rel=0.01)
    assert cost["flops_per_step"] == pytest.approx(4 * cost["flops_per_chip"])
    assert cost["step_time_at_peak_s"] == pytest.approx(cost["flops_per_chip"] / 197e12)
    assert 0 < cost["mfu_at_roofline"] <= 1


def test_topology_mesh_is_the_trainers_mesh(aot_tpu):
    """One mechanism: the AOT tool's mesh is `t3d_jax.train.mesh.make_mesh`'s, device for device."""
    import ml_collections

    from t3d_jax.train import mesh as mesh_lib

    devices = aot_tpu.topology_devices("v5e:2x2", num_slices=2)
    cfg = ml_collections.ConfigDict({"shape": (4, -1), "axes": ("data", "fsdp")})
    mesh = aot_tpu.make_topology_mesh(cfg, devices, num_slices=2)
    trainer = mesh_lib.make_mesh(cfg, devices)
    assert mesh.shape == trainer.shape
    assert [d.id for d in mesh.devices.flat] == [d.id for d in trainer.devices.flat]
    with pytest.raises(UserValueError, match="num_slices=1 but the topology's devices span 2 slices"):
        aot_tpu.make_topology_mesh(cfg, devices, num_slices=1)


def test_launcher_reports_a_user_error_on_one_line():
    """launch/aot_compile.py is flags -> t3d_jax.train.aot -> print; a bad topology is one line
    on stderr and a non-zero exit, not a traceback (it fails before libtpu or any compile)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "launch/aot_compile.py", "--config=configs/t3d.py:tiny",
                           "--topology=v9:2x2"], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch/aot_compile.py: topology 'v9:2x2'"), proc.stderr


def test_hlo_traffic_sums_operands_and_results_by_scope(aot):
    """`hlo_traffic` on a compiled y = tanh(x @ w) and its gradient (CPU): every top-level op
    reads its operands and writes its result once, so the total equals the closed form below
    and XLA's own `bytes accessed`; the backward's ops are marked 'bwd:'. Exact (byte counts)."""
    import jax
    import jax.numpy as jnp

    def f(x, w):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    compiled = jax.jit(jax.grad(f, argnums=1)).lower(jnp.ones((64, 128)), jnp.ones((128, 256))).compile()
    report = aot.hlo_traffic(compiled.as_text())
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert report["total_bytes"] == pytest.approx(float(xla["bytes accessed"]))
    scopes = {e["scope"]: e["bytes"] for e in report["top_scopes"]}
    assert any(s.startswith("bwd: ") for s in scopes) and any(not s.startswith("bwd: ") for s in scopes)
    assert sum(scopes.values()) == pytest.approx(report["total_bytes"])
    # forward matmul: reads x [64,128] and w [128,256], writes [64,256], float32
    assert scopes["dot_general"] >= 4 * (64 * 128 + 128 * 256 + 64 * 256)


def test_scope_of_folds_layers_and_marks_the_backward(aot):
    name = "jit(train_step)/transpose(jvp(ViT3D))/blocks/11/attn/dot_general"
    assert aot.scope_of(name, depth=3) == "bwd: ViT3D/blocks/*"
    assert aot.scope_of("jit(step)/jvp(TwoTower)/text/embed", depth=2) == "TwoTower/text"
    assert aot.scope_of("") == "(no metadata)"


def test_pallas_attention_flops_counts_the_splash_kernels_from_their_shapes(aot_tpu):
    """Forward and gradient of splash attention compiled for v5e:2x2: one forward, one dq and
    one dkv kernel, whose FLOPs XLA does not count; `pallas_attention_flops` gives
    (4 + 6 + 8) * B * H * L * L * Dh (see `_SPLASH_FLOPS`), exactly, at a tile-sized L."""
    import jax
    import jax.numpy as jnp

    from t3d_jax.models.attention import dot_product_attention

    b, length, h, dh = 4, 128, 2, 64
    devices = aot_tpu.topology_devices("v5e:2x2")
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), devices=devices)
    spec = jax.ShapeDtypeStruct((b, length, h, dh), jnp.bfloat16,
                                sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, implementation="pallas_tpu").astype(jnp.float32))

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    counted = aot_tpu.pallas_attention_flops(compiled.as_text())
    assert counted["calls"] == {"splash_mha_fwd": 1, "splash_mha_dq": 1, "splash_mha_dkv": 1}
    per_chip_batch = b // 4
    assert counted["flops"] == (4 + 6 + 8) * per_chip_batch * h * length * length * dh
