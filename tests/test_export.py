"""Embedding export: batch invariance, training-identical preprocessing, a real CT, bad inputs,
file formats, the CLI."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

import cpu_devices
from configs.t3d import get_config
from t3d_jax import export
from t3d_jax.data import preprocess
from t3d_jax.data.labels import CT_RATE_LABELS
from t3d_jax.data.pipeline import EvalExample
from t3d_jax.data.prepared import sync_config_with_data
from t3d_jax.data.records import encode_record
from t3d_jax.data.tokenizer import tokenizer_for_config
from t3d_jax.evaluate.embedding import Embedder
from t3d_jax.train import checkpoint as ckpt_lib
from t3d_jax.train import mesh as mesh_lib
from t3d_jax.train import params as params_lib
from t3d_jax.train import step as step_lib
from t3d_jax.utils import UserFileNotFoundError

REPO = pathlib.Path(__file__).resolve().parents[1]
# Same volume, same compiled program, different batch companions / padding: only float32
# reassociation could differ, and the model has no cross-example ops, so 1e-5 is ample.
BATCH_TOL = 1e-5


def _write_nifti(path, data, spacing=(5.0, 5.0, 5.0)):
    img = nib.Nifti1Image(np.asarray(data, np.int16), np.diag([*spacing, 1.0]))
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bert_vocab):
    root = tmp_path_factory.mktemp("export")
    data_dir = root / "prepared"
    data_dir.mkdir()
    info = {"preset": preprocess.PRESETS["demo"].to_json(), "label_names": list(CT_RATE_LABELS),
            "tokenizer": {"vocab": str(bert_vocab), "lowercase": True, "max_len": 16, "vocab_size": 30522},
            "splits": {}}
    (data_dir / "dataset.json").write_text(json.dumps(info))
    config = get_config("tiny")
    config.data.dir = str(data_dir)
    config.preprocess.max_len = 16
    config.checkpoint.async_save = False
    workdir = root / "run"
    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        program = step_lib.make_train_program(config, mesh)
        state = program.init()
    manager = ckpt_lib.make_manager(workdir / "checkpoints", config.checkpoint)
    ckpt_lib.save(manager, 1, state, None, force=True)
    manager.wait_until_finished()
    manager.close()
    config = sync_config_with_data(config)  # as run_export does when the data is here
    model, _ = params_lib.restore_model(config, params_lib.checkpoint_dir(config, workdir), mesh=mesh)
    embedder = Embedder(model, mesh, config.sharding_rules)
    rng = np.random.default_rng(0)
    vols = root / "volumes"
    vols.mkdir()
    for k in range(6):
        data = rng.normal(-500, 300, (40, 36, 30))
        data[5 + 3 * k: 20 + 3 * k, 10:25, 5:20] += 800  # a bright block in a different place each
        _write_nifti(vols / f"ct{k}.nii.gz", data)
    return {"root": root, "config": config, "workdir": workdir, "embedder": embedder, "vols": vols}


def _export(setup, items, **kw):
    preset, tok_info = export.dataset_preprocessing(setup["config"])
    tokenizer = tokenizer_for_config(setup["config"], tok_info)
    return export.export_embeddings(setup["embedder"], tokenizer, items, preset=preset,
                                    view_size=setup["config"].data.view_size, progress=False, **kw)


def test_a_volume_alone_and_inside_a_batch_embed_the_same(setup):
    items, errors = export.discover_inputs(setup["vols"])
    assert [i.id for i in items] == [f"ct{k}" for k in range(6)] and not errors
    together = _export(setup, items, batch_size=8)  # one batch of 6 (+2 padding rows)
    chunks = _export(setup, items, batch_size=4)  # 4 + 2
    alone = _export(setup, [items[3]], batch_size=1)  # 1 + 7 padding rows
    assert together.ids == chunks.ids == [i.id for i in items]
    np.testing.assert_allclose(alone.volume_embedding[0], together.volume_embedding[3], atol=BATCH_TOL)
    np.testing.assert_allclose(chunks.volume_embedding, together.volume_embedding, atol=BATCH_TOL)
    np.testing.assert_allclose(np.linalg.norm(together.volume_embedding, axis=1), 1.0, atol=1e-5)
    # Different volumes do get different embeddings (the check above is not vacuous).
    assert np.abs(together.volume_embedding[0] - together.volume_embedding[3]).max() > 1e-3


def test_export_input_is_exactly_the_eval_pipeline_input(setup):
    """The stored-record route of training (int16 + scale/offset -> EvalExample) gives the same array."""
    path = setup["vols"] / "ct2.nii.gz"
    preset, _ = export.dataset_preprocessing(setup["config"])
    view_size = tuple(setup["config"].data.view_size)
    direct = export.prepare_volume(str(path), preset, view_size)
    stored, scale, offset = preprocess.preprocess_volume(preprocess.load_volume(path), preset)
    record = {"volume": stored, "intensity_scale": np.float32(scale), "intensity_offset": np.float32(offset),
              "input_ids": np.zeros(4, np.int32), "attention_mask": np.zeros(4, np.int32),
              "labels": np.zeros(18, np.float32), "id": "x"}
    via_record = EvalExample(view_size).map(encode_record(record))["volume"]
    assert direct.shape == (*view_size, 1)
    np.testing.assert_array_equal(direct, via_record)


def test_real_ct_nifti_and_dicom_series_export_to_finite_unit_embeddings(setup, real_ct_nifti, real_ct_dicom_dir, tmp_path):
    items = export.discover_inputs(real_ct_nifti)[0] + export.discover_inputs(real_ct_dicom_dir)[0]
    assert [i.path for i in items] == [str(real_ct_nifti), str(real_ct_dicom_dir)]
    result = _export(setup, items, tokens=True)
    assert not result.errors
    assert result.volume_embedding.shape == (2, setup["config"].model.embed_dim)
    assert np.isfinite(result.volume_embedding).all()
    np.testing.assert_allclose(np.linalg.norm(result.volume_embedding, axis=1), 1.0, atol=1e-5)
    assert result.token_grid == (2, 2, 2)  # 16^3 view, 8^3 patches
    assert result.tokens.shape[:2] == (2, 8) and np.isfinite(result.tokens).all()
    out = export.write_result(result, tmp_path / "real.parquet")
    back = export.read_parquet(out)
    assert back["id"] == result.ids
    np.testing.assert_array_equal(back["volume_embedding"], result.volume_embedding)
    np.testing.assert_array_equal(back["tokens"], result.tokens)
    assert json.loads(back["meta"]["token_grid"]) == [2, 2, 2] and back["meta"]["preset"] == "demo"


def test_bad_inputs_are_listed_and_skipped(setup, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.nii.gz").write_bytes((setup["vols"] / "ct1.nii.gz").read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    _write_nifti(folder / "flat.nii", np.zeros((30, 30, 1)))
    (folder / "notes.txt").write_text("not a volume")
    (folder / "empty_dir").mkdir()
    items, errors = export.discover_inputs(folder)
    assert sorted(i.id for i in items) == ["broken", "flat", "good"]
    result = _export(setup, items, errors=errors)
    assert result.ids == ["good"]
    reasons = {pathlib.Path(e["path"]).name: e["error"] for e in result.errors}
    assert set(reasons) == {"broken.nii.gz", "flat.nii", "notes.txt", "empty_dir"}
    assert "broken.nii.gz" in reasons["broken.nii.gz"] and "NIfTI" in reasons["broken.nii.gz"]
    assert "2D" in reasons["flat.nii"]
    out = export.write_result(result, tmp_path / "mixed.npz")
    logged = [json.loads(line) for line in export.errors_path(out).read_text().splitlines()]
    assert len(logged) == 4
    with pytest.raises(UserFileNotFoundError, match="input not found"):
        export.discover_inputs(tmp_path / "nope")


def test_manifest_reports_and_free_texts(setup, tmp_path):
    manifest = tmp_path / "m.csv"
    vols = setup["vols"]
    manifest.write_text("id,volume,report,split\n"
                        f"a,{vols / 'ct0.nii.gz'},Emphysema is present.,valid\n"
                        f"b,{tmp_path / 'missing.nii.gz'},Cardiomegaly.,valid\n"
                        f"t,{vols / 'ct1.nii.gz'},Training row.,train\n"
                        f"c,{vols / 'ct4.nii.gz'},No acute findings.,valid\n")
    assert [i.id for i in export.discover_inputs(manifest)[0]] == ["a", "b", "t", "c"]
    items, errors = export.discover_inputs(manifest, split="valid")
    texts = ["Lung nodule is present.", "Pleural effusion is not present."]
    result = _export(setup, items, errors=errors, texts=texts)
    assert result.ids == ["a", "c"]
    assert [pathlib.Path(e["path"]).name for e in result.errors] == ["missing.nii.gz"]
    tok = tokenizer_for_config(setup["config"])
    expected_reports = setup["embedder"].texts(*tok.encode(["Emphysema is present.", "No acute findings."]))
    np.testing.assert_allclose(result.report_embedding, expected_reports, atol=BATCH_TOL)
    np.testing.assert_allclose(result.text_embedding, setup["embedder"].texts(*tok.encode(texts)), atol=BATCH_TOL)
    out = export.write_result(result, tmp_path / "m.npz")
    with np.load(out) as npz:
        assert list(npz["id"]) == ["a", "c"] and list(npz["text"]) == texts
        np.testing.assert_array_equal(npz["report_embedding"], result.report_embedding)
        assert str(npz["preset"]) == "demo" and tuple(npz["view_size"]) == (16, 16, 16)
    with pytest.raises(ValueError, match=r"\.npz or \.parquet"):
        export.write_result(result, tmp_path / "m.csv")


def test_cli_never_dies_on_bad_inputs(setup, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.nii.gz").write_bytes((setup["vols"] / "ct5.nii.gz").read_bytes())
    (folder / "bad.nii.gz").write_bytes(b"garbage")
    out = tmp_path / "cli.npz"
    env = cpu_devices.env(2)
    cmd = [sys.executable, str(REPO / "launch" / "export_embeddings.py"), f"--config={REPO}/configs/t3d.py:tiny",
           f"--config.data.dir={setup['config'].data.dir}", "--config.preprocess.max_len=16",
           f"--workdir={setup['workdir']}", f"--input={folder}", f"--output={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Exported 1 volume(s)" in proc.stdout and "1 input(s) skipped" in proc.stdout
    with np.load(out) as npz:
        assert list(npz["id"]) == ["good"]
    assert "bad.nii.gz" in export.errors_path(out).read_text()
