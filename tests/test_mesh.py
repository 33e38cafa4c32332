"""t3d_jax.train.mesh.make_mesh: one slice (the 8 fake CPU devices) and TPU multi-slice.

Multi-slice uses libtpu's compile-only devices of two v5e:2x2 slices (8 chips, `slice_index`
0 and 1; no TPU needed, see t3d_jax.train.aot): the trainer's own `make_mesh` must put
every slice on its own indices of the first ('data') axis, keep 'fsdp' (and 'tensor')
inside one slice, refuse a first axis that the slice count does not divide, and the real
`tiny` train step must compile for that mesh. libtpu is the `aot` extra that `make test`
installs, so a missing libtpu fails (it is a broken environment), never skips.
"""

from __future__ import annotations


import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t3d_jax.train import mesh as mesh_lib
from t3d_jax.utils import UserValueError

from test_train_optim import load_config

AUTO = jax.sharding.AxisType.Auto


def mesh_config(shape, axes=("data", "fsdp")) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"shape": tuple(shape), "axes": tuple(axes)})


@pytest.fixture(scope="module")
def two_slices(aot_tpu):
    """Compile-only devices of 2 x v5e:2x2 (4 chips per slice), via t3d_jax.train.aot."""
    devices = aot_tpu.topology_devices("v5e:2x2", num_slices=2)
    assert sorted({d.slice_index for d in devices}) == [0, 1] and len(devices) == 8
    return devices


# -- one slice: unchanged (jax.make_mesh) ------------------------------------------------------

@pytest.mark.parametrize("shape,expected", [((1, -1), (1, 8)), ((2, -1), (2, 4)), ((-1, 2), (4, 2))])
def test_single_slice_cpu_mesh_is_jax_make_mesh(shape, expected):
    devices = jax.devices()
    assert len(devices) == 8 and mesh_lib.slice_count(devices) == 1
    mesh = mesh_lib.make_mesh(mesh_config(shape))
    reference = jax.make_mesh(expected, ("data", "fsdp"), axis_types=(AUTO, AUTO), devices=devices)
    assert mesh.axis_names == ("data", "fsdp") and mesh.axis_types == (AUTO, AUTO)
    assert tuple(mesh.shape.values()) == expected
    assert [d.id for d in mesh.devices.flat] == [d.id for d in reference.devices.flat]


def test_single_slice_bad_shapes_name_the_config_key():
    with pytest.raises(UserValueError, match=r"config.mesh.shape=\(3, -1\)"):
        mesh_lib.make_mesh(mesh_config((3, -1)))
    with pytest.raises(UserValueError, match=r"config.mesh.axes"):
        mesh_lib.make_mesh(mesh_config((2, 2, 2)))


# -- two TPU slices: hybrid mesh ---------------------------------------------------------------

@pytest.mark.parametrize("shape,axes,expected", [
    ((2, -1), ("data", "fsdp"), {"data": 2, "fsdp": 4}),
    ((4, -1), ("data", "fsdp"), {"data": 4, "fsdp": 2}),
    ((-1, 2), ("data", "fsdp"), {"data": 4, "fsdp": 2}),
    ((2, 2, 2), ("data", "fsdp", "tensor"), {"data": 2, "fsdp": 2, "tensor": 2}),
])
def test_two_slices_split_only_the_data_axis(two_slices, shape, axes, expected):
    # Interleave the slices' devices: a plain reshape of the list would then mix slices.
    interleaved = [d for pair in zip(two_slices[:4], two_slices[4:]) for d in pair]
    assert mesh_lib.slice_count(interleaved) == 2
    mesh = mesh_lib.make_mesh(mesh_config(shape, axes), interleaved)
    assert dict(mesh.shape) == expected and mesh.axis_types == (AUTO,) * len(axes)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in two_slices)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    per_slice = expected["data"] // 2
    for i in range(expected["data"]):
        # everything at one 'data' index (all of fsdp/tensor) lies in one slice: their
        # collectives never cross DCN; consecutive 'data' indices fill a slice, then the next
        assert (slices[i] == i // per_slice).all(), (i, slices)


def test_two_slices_first_axis_not_a_multiple_is_a_clear_error(two_slices):
    for shape in ((1, -1), (-1, 8)):
        with pytest.raises(UserValueError) as err:
            mesh_lib.make_mesh(mesh_config(shape), two_slices)
        message = str(err.value)
        assert f"config.mesh.shape={shape}" in message
        assert "2 TPU slices" in message and "multiple of the slice count" in message
        assert "--config.mesh.shape='(2,-1)'" in message  # the fix


def test_tiny_train_step_compiles_on_two_slices(two_slices):
    """The real train step (tiny model, global batch 8 = one example per chip) on the hybrid
    mesh: params sharded on 'fsdp' only (inside a slice), the batch over ('data', 'fsdp'), and
    the compiled program reduces gradients across the slices over DCN (libtpu's megascale
    collectives). ~25 CPU-seconds of TPU compile."""
    from t3d_jax.train import step as step_lib

    config = load_config("t3d.py", "tiny")
    config.mesh.shape = (2, -1)
    config.train.global_batch_size = 8
    config.preprocess.max_len = 16
    mesh = mesh_lib.make_mesh(config.mesh, two_slices)
    with jax.set_mesh(mesh):  # the loss's shard_map reads the ambient mesh, as in the loop
        program = step_lib.make_train_program(config, mesh)
        param_specs = [s.spec for s in jax.tree.leaves(program.state_shardings["params"])]
        assert any("fsdp" in jax.tree.leaves(tuple(spec)) for spec in param_specs)
        assert not any("data" in jax.tree.leaves(tuple(spec)) for spec in param_specs)
        assert program.batch_shardings["views"].spec == P(("data", "fsdp"))
        compiled = program.step.lower(program.abstract_state, program.abstract_batch).compile()
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes > 0
    assert 'megascale_transfer_type="ALL_REDUCE"' in compiled.as_text()
