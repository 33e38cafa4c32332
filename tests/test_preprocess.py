"""Volume loading (NIfTI, DICOM) and preprocessing against independent float64 NumPy references.

Synthetic inputs are tiny (<= 40^3) and written with nibabel / pydicom inside each test.
"""

from __future__ import annotations

import gzip
import math
import pathlib
import struct

import nibabel as nib
import numpy as np
import pytest

from t3d_jax.data import preprocess as P
from t3d_jax.data.preprocess import Preset, VolumeError

# Float32 volumes, values up to ~1e3: linear interpolation in float32 is good to ~1e-4 relative.
INTERP_ATOL = 1e-2


def save_nifti(path, data, affine, slope=None, inter=None, dtype=None):
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, np.float64))
    if dtype is not None:
        img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return pathlib.Path(path)


# ----------------------------------------------------------------------------------------------
# Orientation and HU
# ----------------------------------------------------------------------------------------------


def test_same_volume_saved_ras_lps_and_permuted_gives_same_canonical_array(tmp_path):
    rng = np.random.default_rng(0)
    nx, ny, nz = 9, 7, 5
    truth = rng.integers(-1000, 1000, size=(nx, ny, nz)).astype(np.int16)
    ras = np.array([[1.5, 0, 0, -10.0], [0, 2.0, 0, 20.0], [0, 0, 3.0, -30.0], [0, 0, 0, 1]])
    # LPS copy: flip x and y of the array; voxel (i, j, k) shows world point ras @ (nx-1-i, ny-1-j, k).
    flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    lps_data, lps_aff = truth[::-1, ::-1, :], ras @ flip
    # Axes stored as (z, x, y): voxel (k, i, j) shows ras @ (i, j, k).
    perm = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    zxy_data, zxy_aff = np.transpose(truth, (2, 0, 1)), ras @ perm
    assert "".join(nib.aff2axcodes(lps_aff)) == "LPS"
    assert "".join(nib.aff2axcodes(zxy_aff)) == "SRA"

    vols = [P.load_volume(save_nifti(tmp_path / f"{n}.nii.gz", d, a, dtype=np.int16))
            for n, d, a in [("ras", truth, ras), ("lps", lps_data, lps_aff), ("zxy", zxy_data, zxy_aff)]]
    for vol, orient in zip(vols, ["RAS", "LPS", "SRA"]):
        np.testing.assert_array_equal(vol.data, truth.astype(np.float32))
        np.testing.assert_allclose(vol.affine, ras, atol=1e-6)
        assert vol.spacing == pytest.approx((1.5, 2.0, 3.0))
        assert vol.source_orientation == orient
    assert vols[2].source_shape == (nz, nx, ny)
    assert vols[2].source_spacing == pytest.approx((3.0, 1.5, 2.0))


def test_slope_and_intercept_are_applied(tmp_path):
    raw = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    path = save_nifti(tmp_path / "scaled.nii.gz", raw, np.eye(4), slope=2.0, inter=-1024.0, dtype=np.int16)
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj.get_unscaled()), raw)  # stored unscaled
    vol = P.load_volume(path)
    np.testing.assert_array_equal(vol.data, raw.astype(np.float64) * 2.0 - 1024.0)


# ----------------------------------------------------------------------------------------------
# Resampling, window, crop/pad
# ----------------------------------------------------------------------------------------------


def _centre_aligned_positions(n_in, s_in, s_out):
    """Physical positions (mm from voxel 0 of the input) of a resampled axis: same centre, step s_out."""
    n_out = max(1, round(n_in * s_in / s_out))
    return (n_in - 1) * s_in / 2 + (np.arange(n_out) - (n_out - 1) / 2) * s_out


@pytest.mark.parametrize("anti_alias", [False, True])
def test_resampling_reproduces_a_linear_ramp(anti_alias):
    spacing, target = (1.0, 2.0, 2.5), (2.0, 1.5, 3.0)
    shape = (30, 16, 12)
    ramp = lambda x, y, z: 3.0 * x + 0.5 * y - 1.0 * z  # noqa: E731  (mm -> value)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    out = P.resample(ramp(*grids).astype(np.float32), spacing, target, anti_alias=anti_alias)
    pos = [_centre_aligned_positions(n, s, t) for n, s, t in zip(shape, spacing, target)]
    assert out.shape == tuple(len(p) for p in pos) == (15, 21, 10)
    expected = ramp(*np.meshgrid(*pos, indexing="ij"))
    # Linear interpolation (and a symmetric Gaussian) reproduce a linear function exactly away from
    # the borders, where edge clamping / the Gaussian's reach beyond the data change values.
    inner = tuple(slice(2, -2) for _ in range(3))
    np.testing.assert_allclose(out[inner], expected[inner], atol=INTERP_ATOL)


def test_downsampling_smooths_first_to_avoid_aliasing():
    """Along an axis downsampled by r, the input is smoothed with sigma (r - 1)/2 voxels first.

    Reference: float64 Gaussian (scipy.ndimage.gaussian_filter1d) then np.interp at the
    centre-aligned output positions; other axes keep their spacing.
    """
    from scipy.ndimage import gaussian_filter1d

    n, r = 63, 3.0  # output voxels land on input voxels 1, 4, 7, ...: stripes alias fully
    rng = np.random.default_rng(4)
    signal = rng.normal(0, 20, size=n) + 400 * (np.arange(n) % 2)  # noise + Nyquist stripes
    data = np.broadcast_to(signal[:, None, None], (n, 4, 4)).astype(np.float32)
    out = P.resample(data, (1.0, 1.0, 1.0), (r, 1.0, 1.0))
    pos = _centre_aligned_positions(n, 1.0, r)
    smooth = gaussian_filter1d(signal.astype(np.float64), sigma=(r - 1) / 2, mode="nearest", truncate=4.0)
    np.testing.assert_allclose(out[:, 1, 1], np.interp(pos, np.arange(n), smooth), atol=0.05)
    # The stripes (period 2 voxels) would alias into the output at full strength without smoothing.
    no_aa = P.resample(data, (1.0, 1.0, 1.0), (r, 1.0, 1.0), anti_alias=False)[:, 1, 1]
    assert np.std(no_aa) > 150 and np.std(out[:, 1, 1]) < 0.2 * np.std(no_aa)


def test_resampling_preserves_a_spheres_physical_size_and_position():
    spacing, radius = np.array([0.8, 0.8, 2.5]), 20.0
    shape = (100, 90, 40)
    centre = np.array([42.0, 35.0, 48.0])  # mm from voxel 0, off the grid centre on purpose
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    gx, gy, gz = np.meshgrid(*axes, indexing="ij")
    dist = np.sqrt((gx - centre[0]) ** 2 + (gy - centre[1]) ** 2 + (gz - centre[2]) ** 2)
    # Soft edge over ~one voxel so the ball is band-limited, 100 HU inside, -900 outside.
    ball = -900.0 + 1000.0 * np.clip(0.5 - (dist - radius) / 1.6, 0, 1)
    vol = P.Volume(ball.astype(np.float32), np.diag([*spacing, 1.0]), tuple(spacing), shape,
                   tuple(spacing), "RAS", "sphere")
    preset = Preset("t", (2.0, 2.0, 2.0), (-1000.0, 1000.0), (48, 48, 48), "unit")
    stored, scale, offset = P.preprocess_volume(vol, preset)
    inside = stored > -400  # the midpoint between the two levels
    measured_volume = inside.sum() * 8.0
    true_volume = 4 / 3 * math.pi * radius**3
    assert abs(measured_volume / true_volume - 1) < 0.03, measured_volume / true_volume
    # Centroid in physical mm: output voxel j of an axis sits at centre + (j - (48 - 1)/2) * 2 mm
    # (centre-aligned resample, then symmetric crop/pad of the ~even-sized grid).
    idx = np.argwhere(inside).mean(axis=0)
    for a in range(3):
        n_res = round(shape[a] * spacing[a] / 2.0)
        start = (n_res - 48) // 2 if n_res >= 48 else -((48 - n_res) // 2)
        pos_mm = (shape[a] - 1) * spacing[a] / 2 + (idx[a] + start - (n_res - 1) / 2) * 2.0
        assert abs(pos_mm - centre[a]) < 0.5, (a, pos_mm, centre[a])


def _reference_crop_pad(a, size, fill):
    out = a
    for axis, m in enumerate(size):
        n = out.shape[axis]
        if n >= m:
            start = (n - m) // 2
            out = np.take(out, np.arange(start, start + m), axis=axis)
        else:
            before = (m - n) // 2
            pad = [(0, 0)] * 3
            pad[axis] = (before, m - n - before)
            out = np.pad(out, pad, constant_values=fill)
    return out


@pytest.mark.parametrize("shape,size", [((20, 9, 7), (16, 14, 7)), ((21, 10, 3), (16, 15, 8))])
def test_crop_pad_at_same_spacing_matches_numpy_reference(shape, size):
    rng = np.random.default_rng(1)
    data = rng.integers(-1500, 2500, size=shape).astype(np.float32)
    vol = P.Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]), (2.0, 2.0, 2.0), shape, (2.0, 2.0, 2.0), "RAS", "x")
    preset = Preset("t", (2.0, 2.0, 2.0), (-1150.0, 350.0), size, "unit")
    stored, scale, offset = P.preprocess_volume(vol, preset)
    expected = np.clip(_reference_crop_pad(data.astype(np.float64), size, -1000.0), -1150, 350)
    assert stored.dtype == np.int16 and stored.shape == size
    np.testing.assert_array_equal(stored, expected)
    model_input = stored * np.float32(scale) + np.float32(offset)
    np.testing.assert_allclose(model_input, (expected + 1150) / 1500, atol=1e-6)
    assert model_input.min() >= -1e-6 and model_input.max() <= 1 + 1e-6


def test_hu_over_1000_scaling_and_window():
    data = np.linspace(-3000, 3000, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    vol = P.Volume(data, np.eye(4), (1.0, 1.0, 1.0), (8, 8, 8), (1.0, 1.0, 1.0), "RAS", "x")
    preset = Preset("t", (1.0, 1.0, 1.0), (-1000.0, 1000.0), (8, 8, 8), "hu/1000")
    stored, scale, offset = P.preprocess_volume(vol, preset)
    np.testing.assert_array_equal(stored, np.rint(np.clip(data, -1000, 1000)))
    assert (scale, offset) == (pytest.approx(1e-3), 0.0)


def test_m3d_resizes_whole_volume_and_min_max_scales():
    data = np.random.default_rng(2).normal(0, 300, size=(40, 30, 20)).astype(np.float32)
    vol = P.Volume(data, np.eye(4), (0.7, 0.7, 5.0), data.shape, (0.7, 0.7, 5.0), "RAS", "x")
    stored, scale, offset = P.preprocess_volume(vol, "m3d")
    assert stored.shape == (256, 256, 32)
    assert P.target_spacing(vol, "m3d") == pytest.approx((0.7 * 40 / 256, 0.7 * 30 / 256, 5.0 * 20 / 32))
    model_input = stored * scale + offset
    assert model_input.min() >= -1e-3 and model_input.max() <= 1 + 1e-3
    assert model_input.max() - model_input.min() > 0.5


def test_presets_match_design_table():
    assert P.PRESETS["ct_clip"] == Preset("ct_clip", (0.75, 0.75, 1.5), (-1000, 1000), (480, 480, 240), "hu/1000")
    small = P.PRESETS["ct_clip_320"]  # the same 360 mm field on a 320 x 320 x 160 grid
    assert small.size == (320, 320, 160) and small.window == (-1000, 1000) and small.scaling == "hu/1000"
    assert [s * n for s, n in zip(small.spacing, small.size)] == [360.0, 360.0, 360.0]
    assert P.PRESETS["merlin"].spacing == (1.5, 1.5, 3.0) and P.PRESETS["merlin"].size == (224, 224, 160)
    for name in ("fvlm", "hlip"):
        assert P.PRESETS[name].spacing == (1.0, 1.0, 3.0) and P.PRESETS[name].window == (-1150, 350)
    assert P.PRESETS["m3d"].spacing is None and P.PRESETS["m3d"].window is None
    assert P.PRESETS["m3d"].size == (256, 256, 32)
    with pytest.raises(ValueError, match="unknown preprocessing preset"):
        P.get_preset("nope")


# ----------------------------------------------------------------------------------------------
# Bad inputs: each raises VolumeError naming the file and the problem
# ----------------------------------------------------------------------------------------------


def _write_bad(kind: str, d: pathlib.Path) -> pathlib.Path:
    good = np.zeros((8, 8, 8), np.int16)
    if kind == "missing":
        return d / "nope.nii.gz"
    if kind == "truncated":
        p = save_nifti(d / "t.nii.gz", np.arange(16**3, dtype=np.int16).reshape(16, 16, 16), np.eye(4))
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return p
    if kind == "corrupt":
        p = save_nifti(d / "c.nii.gz", np.arange(16**3, dtype=np.int16).reshape(16, 16, 16), np.eye(4))
        blob = bytearray(p.read_bytes())
        for i in range(len(blob) // 2, len(blob) // 2 + 64):
            blob[i] ^= 0xA5
        p.write_bytes(bytes(blob))
        return p
    if kind == "not_nifti":
        p = d / "notes.nii.gz"
        p.write_bytes(gzip.compress(b"this is a radiology report, not an image\n" * 20))
        return p
    if kind == "2d":
        return save_nifti(d / "2d.nii.gz", np.zeros((16, 16), np.int16), np.eye(4))
    if kind == "single_slice":
        return save_nifti(d / "1s.nii.gz", np.zeros((16, 16, 1), np.int16), np.eye(4))
    if kind == "4d":
        return save_nifti(d / "4d.nii.gz", np.zeros((8, 8, 8, 3), np.int16), np.eye(4))
    if kind in ("zero_spacing", "negative_spacing", "nan_spacing"):
        img = nib.Nifti1Image(good, None)  # affine from pixdim (qform/sform codes 0)
        img.header["pixdim"][2] = {"zero_spacing": 0.0, "negative_spacing": -1.0, "nan_spacing": np.nan}[kind]
        nib.save(img, str(d / f"{kind}.nii.gz"))
        return d / f"{kind}.nii.gz"
    if kind == "zero_spacing_sform":
        img = nib.Nifti1Image(good, None)
        img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # the sform, not pixdim, is the geometry
        nib.save(img, str(d / "zs.nii.gz"))
        return d / "zs.nii.gz"
    if kind in ("nan_voxel", "inf_voxel"):
        data = np.zeros((8, 8, 8), np.float32)
        data[3, 4, 5] = np.nan if kind == "nan_voxel" else np.inf
        return save_nifti(d / f"{kind}.nii.gz", data, np.eye(4))
    if kind == "absurd_dims":
        p = save_nifti(d / "absurd.nii", good, np.eye(4))  # uncompressed: patch dim[] in place
        blob = bytearray(p.read_bytes())
        blob[40:56] = struct.pack("<8h", 3, 32000, 32000, 32000, 1, 1, 1, 1)
        p.write_bytes(bytes(blob))
        return p
    raise AssertionError(kind)


BAD_CASES = {
    "missing": "file not found",
    "truncated": "truncated or corrupt",
    "corrupt": "truncated or corrupt",
    "not_nifti": "not a readable NIfTI",
    "2d": "2D image",
    "single_slice": "2D image",
    "4d": "4D image",
    "zero_spacing": "zero, negative or NaN",
    "negative_spacing": "zero, negative or NaN",
    "nan_spacing": "zero, negative or NaN",
    "zero_spacing_sform": "degenerate",
    "nan_voxel": "NaN or infinite",
    "inf_voxel": "NaN or infinite",
    "absurd_dims": "implausible",
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_volume_raises_clear_error(kind, tmp_path):
    path = _write_bad(kind, tmp_path)
    with pytest.raises(VolumeError, match=BAD_CASES[kind]) as info:
        P.load_volume(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def write_dicom_series(folder: pathlib.Path, truth_ras: np.ndarray, spacing, origin_lps, series_uid=None,
                       slopes=None, shuffle_seed=0, name_prefix="IM"):
    """Writes a canonical RAS+ HU grid as an axial DICOM series (LPS, row +L, column +P).

    Pixel [r, c] of slice k shows world LPS origin + c*sx*(1,0,0) + r*sy*(0,1,0) + k*sz*(0,0,1),
    i.e. canonical voxel (nx-1-c, ny-1-r, k). File names are shuffled so order must come from
    ImagePositionPatient. Each slice may have its own RescaleSlope; intercept -1024.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = truth_ras.shape
    sx, sy, sz = spacing
    series_uid = series_uid or generate_uid()
    names = np.random.default_rng(shuffle_seed).permutation(nz)
    for k in range(nz):
        slope = 1.0 if slopes is None else float(slopes[k])
        hu = truth_ras[::-1, ::-1, k].T  # [r, c]
        raw = np.rint((hu + 1024.0) / slope).astype(np.int16)
        assert np.array_equal(raw * slope - 1024.0, hu), "test data must be exactly representable"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.3.4"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(origin_lps[0]), float(origin_lps[1]), float(origin_lps[2] + k * sz)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(sy), float(sx)]  # (between rows, between columns)
        ds.SliceThickness = float(sz)
        ds.Rows, ds.Columns = raw.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, -1024.0
        ds.PixelData = raw.tobytes()
        ds.save_as(folder / f"{name_prefix}{names[k]:04d}.dcm", enforce_file_format=True)
    return folder


def _dicom_truth(shape=(12, 10, 6), seed=3):
    rng = np.random.default_rng(seed)
    return (2 * rng.integers(-600, 600, size=shape)).astype(np.float32)  # even: exact with slope 2


def test_dicom_series_sorted_rescaled_and_canonical(tmp_path):
    truth = _dicom_truth()
    slopes = [1.0, 2.0, 1.0, 2.0, 2.0, 1.0]
    folder = write_dicom_series(tmp_path / "ser", truth, (0.7, 0.8, 2.5), (-50.0, 30.0, -100.0), slopes=slopes)
    (folder / "README.txt").write_text("not a DICOM file; must be ignored")
    vol = P.load_volume(folder)
    np.testing.assert_array_equal(vol.data, truth)
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))
    assert vol.source_orientation == "LPS"
    # Canonical voxel (0, 0, 0) is column nx-1, row ny-1 of the lowest slice: LPS -> RAS world.
    nx, ny, _ = truth.shape
    lps = np.array([-50.0 + (nx - 1) * 0.7, 30.0 + (ny - 1) * 0.8, -100.0])
    np.testing.assert_allclose(vol.affine[:3, 3], lps * [-1, -1, 1], atol=1e-6)


def test_dicom_folder_with_mixed_series_is_rejected(tmp_path):
    truth = _dicom_truth()
    folder = tmp_path / "mixed"
    write_dicom_series(folder, truth, (0.7, 0.8, 2.5), (0, 0, 0), series_uid="1.2.3.1", name_prefix="A")
    write_dicom_series(folder, truth, (0.7, 0.8, 2.5), (0, 0, 0), series_uid="1.2.3.2", name_prefix="B")
    with pytest.raises(VolumeError, match=r"mixes 2 DICOM series .*1\.2\.3\.1 \(6 files\)"):
        P.load_volume(folder)


def test_dicom_folder_without_dicom_and_single_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no DICOM image files"):
        P.load_volume(tmp_path / "empty")
    folder = write_dicom_series(tmp_path / "s", _dicom_truth(), (1, 1, 1), (0, 0, 0))
    with pytest.raises(VolumeError, match="single DICOM file"):
        P.load_volume(next(folder.iterdir()))


def test_rgb_nifti_is_rejected_as_not_ct(tmp_path):
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    with pytest.raises(VolumeError, match="not a scalar intensity"):
        P.load_volume(path)
