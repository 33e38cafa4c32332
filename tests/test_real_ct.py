"""Real CT through prepare_data: the TotalSegmentator thorax NIfTI and its abdominal DICOM series.

Both files are fixed (sha256-checked by conftest), so anatomy gives orientation checks that a
flipped axis would fail: the right lung is the larger one, the stomach's gas lies on the
patient's left, the spine lies posterior. HU plausibility: air outside the body near -1000,
lung parenchyma well below -500, soft tissue inside the body near 0-100.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from t3d_jax.data import prepare, preprocess, shards

PRESET = preprocess.PRESETS["merlin"]  # 1.5 x 1.5 x 3 mm, 224 x 224 x 160, [-1000, 1000] HU


def _anatomy(hu: np.ndarray, spacing_x: float) -> dict:
    """Body mask (largest component above -500 HU, holes filled per axial slice) and regions in it.

    Lung: -950..-500 HU inside the body; gas: < -950 HU inside the body (bowel/stomach, airways);
    midline bone: > 700 HU within 20 mm of the body's mid-sagittal plane (the spine in the abdomen;
    in this thorax CT angiogram contrast-filled vessels exceed 700 HU too, so it is not used there).
    """
    body = hu > -500
    lab, n = ndimage.label(body)
    body = lab == 1 + int(np.argmax(ndimage.sum(body, lab, range(1, n + 1))))
    body = np.stack([ndimage.binary_fill_holes(body[:, :, k]) for k in range(body.shape[2])], axis=-1)
    lung = body & (hu > -950) & (hu < -500)
    gas = body & (hu <= -950)
    inner = ndimage.binary_erosion(body, iterations=3) & ~lung & ~gas
    centre = np.argwhere(body).mean(axis=0)
    bone = np.argwhere(hu > 700)
    midline_bone = bone[np.abs(bone[:, 0] - centre[0]) * spacing_x < 20]
    return {
        "body_centre": centre,
        "air_outside_median": float(np.median(hu[~body])),
        "lung_voxels": int(lung.sum()),
        "lung_median": float(np.median(hu[lung])) if lung.any() else np.nan,
        "lung_right_fraction": float((np.argwhere(lung)[:, 0] > centre[0]).mean()) if lung.any() else np.nan,
        "gas_right_fraction": float((np.argwhere(gas)[:, 0] > centre[0]).mean()) if gas.any() else np.nan,
        "soft_median": float(np.median(hu[inner])),
        "midline_bone_y": float(midline_bone[:, 1].mean()) if len(midline_bone) else np.nan,
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, real_ct_nifti, real_ct_dicom_dir, bert_vocab):
    root = tmp_path_factory.mktemp("real")
    manifest = root / "manifest.jsonl"
    rows = [
        {"id": "thorax", "volume": str(real_ct_nifti), "report": "Contrast CT of the thorax. Lungs are clear."},
        {"id": "abdomen", "volume": str(real_ct_dicom_dir), "report": "Upper abdomen: liver and stomach.",
         "split": "valid"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "out"
    # In process (the CLI itself is covered by test_prepare.py): spares a second TensorFlow import.
    result = prepare.prepare_dataset(manifest, out, preset=PRESET.name, vocab=bert_vocab, workers=2,
                                     progress=False)
    assert result.summary() == "read 2, written 2, rejected 0"
    records = {r["id"]: r for split in ("train", "valid") for r in shards.iter_records(out, split)}
    return records


def test_nifti_loader_matches_nibabel_canonical(real_ct_nifti):
    vol = preprocess.load_volume(real_ct_nifti)
    ref = nib.as_closest_canonical(nib.load(str(real_ct_nifti)))
    np.testing.assert_array_equal(vol.data, ref.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-5)
    assert vol.source_orientation == "LPS" and vol.source_shape == (233, 167, 191)


def test_dicom_slices_follow_image_position(real_ct_dicom_dir):
    """Each canonical slice k is the file whose ImagePositionPatient z matches the affine, rescaled."""
    import pydicom

    vol = preprocess.load_volume(real_ct_dicom_dir)
    assert vol.data.shape == (512, 512, 20) and vol.source_orientation == "LPS"
    assert vol.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    by_z = {}
    for f in real_ct_dicom_dir.iterdir():
        ds = pydicom.dcmread(f)
        by_z[round(float(ds.ImagePositionPatient[2]), 3)] = ds
    for k in (0, 7, 19):
        z = round(float((vol.affine @ [0, 0, k, 1])[2]), 3)
        ds = by_z[z]
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        # LPS rows/columns -> RAS: x = reversed column, y = reversed row.
        np.testing.assert_array_equal(vol.data[:, :, k], hu[::-1, ::-1].T)


@pytest.mark.parametrize("ident", ["thorax", "abdomen"])
def test_record_geometry(prepared, ident):
    rec = prepared[ident]
    assert rec["volume"].dtype == np.int16 and rec["volume"].shape == PRESET.size
    np.testing.assert_array_equal(rec["spacing"], np.float32(PRESET.spacing))
    assert rec["source_orientation"] == "LPS"
    expected = {"thorax": ((233, 167, 191), (1.5, 1.5, 1.5)), "abdomen": ((512, 512, 20), (0.9765625,) * 2 + (2.0,))}
    np.testing.assert_array_equal(rec["source_shape"], expected[ident][0])
    np.testing.assert_allclose(rec["source_spacing"], expected[ident][1], rtol=1e-5)
    model_input = rec["volume"] * rec["intensity_scale"] + rec["intensity_offset"]
    assert model_input.min() >= 0 and model_input.max() <= 1.0 + 1e-6  # merlin scales to [0, 1]


@pytest.mark.parametrize("stage", ["loaded", "record"])
def test_thorax_hu_and_orientation(prepared, real_ct_nifti, stage):
    hu = preprocess.load_volume(real_ct_nifti).data if stage == "loaded" else prepared["thorax"]["volume"]
    a = _anatomy(hu.astype(np.float32), 1.5)
    assert -1000 <= a["air_outside_median"] <= -950, a
    assert a["lung_median"] < -700, a  # parenchyma well below -500
    assert 0 <= a["soft_median"] <= 100, a
    # The right lung (towards +x in RAS) is the larger: the heart sits on the left.
    assert 0.53 <= a["lung_right_fraction"] <= 0.65, a


@pytest.mark.parametrize("stage", ["loaded", "record"])
def test_abdomen_hu_and_orientation(prepared, real_ct_dicom_dir, stage):
    hu = preprocess.load_volume(real_ct_dicom_dir).data if stage == "loaded" else prepared["abdomen"]["volume"]
    if stage == "record":
        hu = hu[:, :, np.any(hu > -990, axis=(0, 1))]  # drop the air slices padded above and below
    a = _anatomy(hu.astype(np.float32), 0.9765625 if stage == "loaded" else PRESET.spacing[0])
    assert -1000 <= a["air_outside_median"] <= -950, a
    assert a["lung_median"] < -600, a  # lung bases
    assert 0 <= a["soft_median"] <= 100, a
    assert a["gas_right_fraction"] < 0.1, a  # stomach gas on the patient's left (-x), liver on the right
    assert a["midline_bone_y"] < a["body_centre"][1] - 5, a  # spine posterior (-y)
