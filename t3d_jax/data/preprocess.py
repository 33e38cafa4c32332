"""Reading CT volumes (NIfTI files, DICOM series folders) and turning them into model-ready grids.

Two steps, used by ``launch/prepare_data.py`` and by embedding export alike, so a volume a user
exports later is seen exactly as the training data was:

* :func:`load_volume` reads a NIfTI or NRRD file or a DICOM series folder into a :class:`Volume`: float32
  Hounsfield units (the header's slope/intercept applied) on a canonical RAS+ voxel grid
  ``[X, Y, Z]`` (indices grow towards the patient's Right, Anterior, Superior), with
  the spacing in mm and the file's own shape/spacing/orientation kept as metadata. Any problem
  raises :class:`VolumeError` naming the file and the problem, so a batch job can log it and go on.
* :func:`preprocess_volume` resamples to a preset's spacing (linear, Gaussian anti-aliasing where
  it downsamples), clips to the preset's HU window, centre-crops/pads to the preset's size with air
  and returns int16 HU plus ``(intensity_scale, intensity_offset)`` such that
  ``model input = volume * scale + offset``. Storing integer HU keeps records small (int16) and
  readable; the scaling of each preset is two floats instead of a float32 copy of the volume.

Canonical orientation follows nibabel's ``as_closest_canonical``: axes are permuted and flipped to
the closest RAS+ axes; oblique acquisitions are not resampled onto the world axes (the residual
rotation is small for CT and resampling would blur every volume).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

AIR_HU = -1000.0
# Headers claiming more than this are refused before any voxel is read (a corrupt or hostile
# header must not make a worker allocate terabytes).
MAX_AXIS_VOXELS = 8192
MAX_TOTAL_VOXELS = 1_500_000_000


class VolumeError(ValueError):
    """An input volume cannot be used; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """How the field preprocesses CT for one method (docs/data.md, "Presets").

    spacing: target mm per voxel (x, y, z), or None to resize the whole volume to ``size``.
    window: HU clip range (lo, hi), or None for per-volume min-max.
    size: output voxels (x, y, z) after centre crop/pad.
    scaling: "hu/1000" (model input = HU / 1000) or "unit" (window mapped to [0, 1]).
    """

    name: str
    spacing: tuple[float, float, float] | None
    window: tuple[float, float] | None
    size: tuple[int, int, int]
    scaling: str

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "spacing": None if self.spacing is None else list(self.spacing),
            "window": None if self.window is None else list(self.window),
            "size": list(self.size),
            "scaling": self.scaling,
        }


PRESETS: dict[str, Preset] = {
    # Small and fast: the synthetic demo and CPU tests (a 320 mm cube at 5 mm).
    "demo": Preset("demo", (5.0, 5.0, 5.0), (-1000.0, 1000.0), (64, 64, 64), "unit"),
    # CT-CLIP on CT-RATE.
    "ct_clip": Preset("ct_clip", (0.75, 0.75, 1.5), (-1000.0, 1000.0), (480, 480, 240), "hu/1000"),
    # ct_clip's 360 mm field on a 2/3 grid: 3.4x fewer bytes to store, read and ship per example,
    # and still 1:1 in-plane for the smallest crop (50%) at `base`'s 160 x 160 x 96 views
    # (docs/scaling.md, "Views on the accelerator").
    "ct_clip_320": Preset("ct_clip_320", (1.125, 1.125, 2.25), (-1000.0, 1000.0), (320, 320, 160), "hu/1000"),
    # Merlin.
    "merlin": Preset("merlin", (1.5, 1.5, 3.0), (-1000.0, 1000.0), (224, 224, 160), "unit"),
    # fVLM and HLIP: 1x1x3 mm, [-1150, 350] HU. Their crop sizes differ per method; this one
    # holds a chest field of view (352 x 256 mm in-plane, 336 mm long).
    "fvlm": Preset("fvlm", (1.0, 1.0, 3.0), (-1150.0, 350.0), (352, 256, 112), "unit"),
    "hlip": Preset("hlip", (1.0, 1.0, 3.0), (-1150.0, 350.0), (352, 256, 112), "unit"),
    # M3D: whole volume resized to 256 x 256 x 32, per-volume min-max.
    "m3d": Preset("m3d", None, None, (256, 256, 32), "unit"),
}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preprocessing preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


@dataclasses.dataclass
class Volume:
    """A CT volume in HU on the canonical RAS+ grid.

    data: float32 [X, Y, Z] Hounsfield units.
    affine: 4x4 voxel -> RAS world (mm) of ``data``.
    spacing: mm per voxel of ``data`` along x, y, z.
    source_*: the file as read (before reorientation), for the record's metadata.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    source_orientation: str
    path: str


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_volume(path: str | os.PathLike) -> Volume:
    """Reads a NIfTI file, an NRRD file (``.nrrd``/``.nhdr``) or a DICOM series folder; raises
    :class:`VolumeError` on bad input."""
    path = pathlib.Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    if path.is_dir():
        data, affine_ras = read_dicom_series(path)
        return _make_volume(data, affine_ras, path)
    if path.suffix.lower() in (".nrrd", ".nhdr"):
        data, affine_ras = read_nrrd(path)
        return _make_volume(data, affine_ras, path)
    if _is_dicom_file(path):
        raise VolumeError(f"{path}: a single DICOM file is one slice; give the folder of the whole series")
    return _load_nifti(path)


def _is_dicom_file(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _load_nifti(path: pathlib.Path) -> Volume:
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for foreign or damaged files
        raise VolumeError(f"{path}: not a readable NIfTI image ({type(err).__name__}: {err})") from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: {type(img).__name__} is not a NIfTI image")
    shape = tuple(int(n) for n in img.shape)
    _check_shape(shape, path)
    # nibabel silently "fixes" zero/negative pixdim to 1/abs on load; judge the header as written.
    try:
        with nib.openers.ImageOpener(str(path)) as f:
            raw_header = img.header_class.from_fileobj(f, check=False)
    except Exception as err:
        raise VolumeError(f"{path}: NIfTI header cannot be read ({type(err).__name__}: {err})") from err
    pixdim = tuple(float(z) for z in raw_header["pixdim"][1:4])
    uses_pixdim = int(raw_header["sform_code"]) == 0  # else the affine comes from the sform
    if not all(math.isfinite(z) for z in pixdim) or (uses_pixdim and not all(z > 0 for z in pixdim)):
        raise VolumeError(f"{path}: voxel spacing (pixdim) {pixdim} in the header is zero, negative or NaN")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise VolumeError(f"{path}: voxel type {dtype} is not a scalar intensity (RGB/complex images are not CT)")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))  # applies scl_slope / scl_inter
    except Exception as err:  # truncated gzip, short file, bad zlib stream, ...
        raise VolumeError(f"{path}: voxel data cannot be read, file truncated or corrupt "
                          f"({type(err).__name__}: {err})") from err
    data = data.reshape(data.shape[:3])  # drops trailing singleton dims allowed by _check_shape
    return _make_volume(data, np.asarray(img.affine, dtype=np.float64), path)


def _check_shape(shape: Sequence[int], path) -> None:
    """Accepts 3D volumes (trailing singleton dims allowed); refuses 2D, 4D and absurd headers."""
    if any(n > MAX_AXIS_VOXELS for n in shape) or math.prod(shape) > MAX_TOTAL_VOXELS:
        raise VolumeError(f"{path}: header dimensions {tuple(shape)} are implausible "
                          f"(limit {MAX_AXIS_VOXELS} per axis, {MAX_TOTAL_VOXELS} voxels)")
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise VolumeError(f"{path}: {len(shape)}D image of shape {tuple(shape)}; one 3D volume per row expected")
    if len(shape) < 3 or any(n < 2 for n in shape[:3]):
        raise VolumeError(f"{path}: 2D image of shape {tuple(shape)}; a 3D volume is needed")


def _make_volume(data: np.ndarray, affine: np.ndarray, path) -> Volume:
    """Checks voxels and affine, then reorients to canonical RAS+."""
    affine = np.asarray(affine, dtype=np.float64)
    source_spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    if not np.all(np.isfinite(affine)) or not all(s > 0 for s in source_spacing):
        raise VolumeError(f"{path}: voxel-to-world affine is degenerate (spacing {source_spacing})")
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-12 * math.prod(source_spacing):
        raise VolumeError(f"{path}: voxel-to-world affine is singular")
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise VolumeError(f"{path}: {bad} voxels are NaN or infinite")
    source_orientation = "".join(nib.aff2axcodes(affine))
    ornt = orientations.io_orientation(affine)  # from the file's axes to RAS+
    canonical = orientations.apply_orientation(data, ornt)
    canon_affine = affine @ orientations.inv_ornt_aff(ornt, data.shape)
    spacing = tuple(float(s) for s in np.linalg.norm(canon_affine[:3, :3], axis=0))
    return Volume(
        data=np.ascontiguousarray(canonical, dtype=np.float32),
        affine=canon_affine,
        spacing=spacing,
        source_shape=tuple(int(n) for n in data.shape[:3]),
        source_spacing=source_spacing,
        source_orientation=source_orientation,
        path=str(path),
    )


# NRRD world spaces (the 'space' field) -> sign flips to RAS.
_NRRD_SPACES = {
    "right-anterior-superior": (1.0, 1.0, 1.0), "ras": (1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0), "lps": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0), "las": (-1.0, 1.0, 1.0),
}


def read_nrrd(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads a 3D NRRD file (pynrrd) -> (float32 voxels [i, j, k] in file axis order, 4x4 RAS affine).

    The affine comes from ``space directions`` (one row per axis: that axis's step vector) and
    ``space origin`` in the file's ``space`` (RAS, LPS or LAS), flipped to RAS. Files without that
    geometry, with non-spatial axes (vectors, time) or another space are refused. Values are taken
    as stored (NRRD has no rescale slope; CT is stored in HU).
    """
    import nrrd  # pynrrd; only where NRRD is read

    try:
        header = nrrd.read_header(str(path))
    except Exception as err:
        raise VolumeError(f"{path}: not a readable NRRD file ({type(err).__name__}: {err})") from err
    sizes = tuple(int(n) for n in header.get("sizes", ()))
    _check_shape(sizes, path)
    if int(header.get("dimension", len(sizes))) != 3:
        raise VolumeError(f"{path}: {header.get('dimension')}D NRRD of sizes {sizes}; one 3D volume expected")
    space = str(header.get("space", "")).lower()
    if space not in _NRRD_SPACES or "space directions" not in header:
        raise VolumeError(f"{path}: NRRD without a patient space and space directions (space {space or None!r}); "
                          "its voxel geometry is unknown")
    directions = np.asarray(header["space directions"], dtype=np.float64)
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    if directions.shape != (3, 3) or origin.shape != (3,):
        raise VolumeError(f"{path}: NRRD space directions {directions.tolist()} are not three 3D vectors "
                          "(non-spatial axes are not supported)")
    try:
        data, _ = nrrd.read(str(path))
    except Exception as err:
        raise VolumeError(f"{path}: voxel data cannot be read, file truncated or corrupt "
                          f"({type(err).__name__}: {err})") from err
    if data.dtype.fields is not None or data.dtype.kind not in "biuf":
        raise VolumeError(f"{path}: voxel type {data.dtype} is not a scalar intensity")
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # column i: the step of axis i
    affine[:3, 3] = origin
    return np.asarray(data, dtype=np.float32), np.diag([*_NRRD_SPACES[space], 1.0]) @ affine


def read_dicom_series(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one DICOM series folder -> (float32 HU [col, row, slice], 4x4 RAS affine).

    Slices are sorted by ImagePositionPatient projected on the slice normal (the cross product
    of the ImageOrientationPatient row and column cosines), RescaleSlope/Intercept is applied per
    slice, and the LPS affine built from orientation, PixelSpacing and the first-to-last slice
    vector is flipped to RAS (the NIfTI convention), so the caller treats it like a NIfTI file.
    A folder holding several series is refused rather than guessed at.
    """
    import pydicom  # only where DICOM is read

    slices = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file() or f.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(f)
        except Exception:  # non-DICOM files (notes, thumbnails) in a series folder are ignored
            continue
        if "PixelData" in ds:
            slices.append((f, ds))
    if not slices:
        raise VolumeError(f"{folder}: no DICOM image files in this folder")
    series = {}
    for f, ds in slices:
        series.setdefault(str(ds.get("SeriesInstanceUID", "?")), []).append((f, ds))
    if len(series) > 1:
        counts = ", ".join(f"{uid} ({len(v)} files)" for uid, v in sorted(series.items()))
        raise VolumeError(f"{folder}: folder mixes {len(series)} DICOM series ({counts}); "
                          "one series per folder expected")
    if int(slices[0][1].get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeError(f"{folder}: multi-frame DICOM is not supported; convert it to NIfTI first")
    if len(slices) < 2:
        raise VolumeError(f"{folder}: 2D image: the series has a single slice")
    try:
        iop = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in slices])
        ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
        pixel_spacing = np.array([float(v) for v in slices[0][1].PixelSpacing])
    except (AttributeError, TypeError, ValueError) as err:
        raise VolumeError(f"{folder}: DICOM geometry tags missing or malformed "
                          f"(ImageOrientationPatient/ImagePositionPatient/PixelSpacing): {err}") from err
    if not np.allclose(iop, iop[0], atol=1e-4):
        raise VolumeError(f"{folder}: slices have different ImageOrientationPatient")
    if not (np.all(np.isfinite(pixel_spacing)) and np.all(pixel_spacing > 0)):
        raise VolumeError(f"{folder}: PixelSpacing {pixel_spacing.tolist()} is not positive and finite")
    row_cos, col_cos = iop[0, :3], iop[0, 3:]
    normal = np.cross(row_cos, col_cos)
    order = np.argsort(ipp @ normal, kind="stable")
    positions = (ipp @ normal)[order]
    gaps = np.diff(positions)
    if np.any(gaps < 1e-3):
        raise VolumeError(f"{folder}: several slices share one position (repeated acquisition?)")
    if np.max(np.abs(gaps - np.median(gaps))) > 0.1 * np.median(gaps):
        raise VolumeError(f"{folder}: slice spacing is not uniform ({gaps.min():.3g}-{gaps.max():.3g} mm; "
                          "missing slices?)")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(shapes) > 1:
        raise VolumeError(f"{folder}: slices have different sizes {sorted(shapes)}")
    planes = []
    for idx in order:
        f, ds = slices[idx]
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as err:
            raise VolumeError(f"{f}: pixel data cannot be decoded ({type(err).__name__}: {err})") from err
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        planes.append((pixels * slope + intercept).T)  # [row, col] -> [col, row]
    data = np.stack(planes, axis=-1)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * pixel_spacing[1]  # along columns: PixelSpacing[1]
    affine_lps[:3, 1] = col_cos * pixel_spacing[0]  # along rows: PixelSpacing[0]
    affine_lps[:3, 2] = (ipp[order[-1]] - ipp[order[0]]) / (len(order) - 1)
    affine_lps[:3, 3] = ipp[order[0]]
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


# ----------------------------------------------------------------------------------------------
# Resampling, window, scaling
# ----------------------------------------------------------------------------------------------


def _axis_plan(n_in: int, s_in: float, s_out: float, size: int | None):
    """Where the output voxels of one axis sit in input index space.

    The resampled grid has ``round(n_in * s_in / s_out)`` voxels, centred on the input's centre,
    so the physical spacing is exactly ``s_out``; then it is centre-cropped or padded to ``size``.
    Returns input coordinates of the output voxels and the contiguous range [a, b) that lies on the
    resampled grid (the rest is padding).
    """
    n_res = max(1, int(round(n_in * s_in / s_out)))
    size = n_res if size is None else int(size)
    start = (n_res - size) // 2 if n_res >= size else -((size - n_res) // 2)
    j = np.arange(size) + start
    coords = (n_in - 1) / 2.0 + (j - (n_res - 1) / 2.0) * (s_out / s_in)
    a = int(np.clip(-start, 0, size))
    b = int(np.clip(n_res - start, 0, size))
    return coords, a, b


def resample(data: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float],
             size: Sequence[int] | None = None, fill: float = AIR_HU, anti_alias: bool = True) -> np.ndarray:
    """Linear resampling of a [X, Y, Z] grid to ``target_spacing``, centre-cropped/padded to ``size``.

    Only the voxels that survive the crop are interpolated, so upsampling a long scan does not
    build a huge intermediate. Where an axis is downsampled by r > 1 the input is first smoothed
    with a Gaussian of sigma (r - 1) / 2 voxels (scikit-image's anti-aliasing rule), so thin
    bright structures are averaged rather than randomly hit or missed.
    """
    data = np.asarray(data, dtype=np.float32)
    ratios = [float(t) / float(s) for s, t in zip(spacing, target_spacing)]
    sizes = [None] * 3 if size is None else list(size)
    plans = [_axis_plan(n, s, t, m) for n, s, t, m in zip(data.shape, spacing, target_spacing, sizes)]
    if anti_alias and any(r > 1.0 + 1e-6 for r in ratios):
        sigma = [max(0.0, (r - 1.0) / 2.0) for r in ratios]
        data = ndimage.gaussian_filter(data, sigma=sigma, mode="nearest")
    out = np.full([len(c) for c, _, _ in plans], fill, dtype=np.float32)
    if any(b <= a for _, a, b in plans):
        return out
    region = tuple(slice(a, b) for _, a, b in plans)
    offset = [c[a] for c, a, _ in plans]
    if all(abs(r - 1.0) < 1e-9 for r in ratios) and all(abs(o - round(o)) < 1e-6 for o in offset):
        # Same spacing, integer shift: plain crop/pad, bit-exact.
        src = tuple(slice(int(round(o)), int(round(o)) + (b - a)) for o, (_, a, b) in zip(offset, plans))
        out[region] = data[src]
        return out
    out[region] = ndimage.affine_transform(
        data, matrix=np.asarray(ratios), offset=offset,
        output_shape=tuple(b - a for _, a, b in plans), order=1, mode="nearest", prefilter=False)
    return out


def target_spacing(volume: Volume, preset: str | Preset) -> tuple[float, float, float]:
    """Spacing of the preprocessed grid: the preset's, or for resize presets extent / size."""
    preset = get_preset(preset)
    if preset.spacing is not None:
        return tuple(float(s) for s in preset.spacing)
    return tuple(float(s) * n / m for s, n, m in zip(volume.spacing, volume.data.shape, preset.size))


def preprocess_volume(volume: Volume, preset: str | Preset,
                      keep_slices: bool = False) -> tuple[np.ndarray, float, float]:
    """Resample, window, crop/pad; returns (int16 HU [X, Y, Z], intensity_scale, intensity_offset).

    The model input is ``volume * intensity_scale + intensity_offset`` (float32).

    ``keep_slices`` (``preprocess.keep_slices``, for the per-slice ``msvlm`` encoder): x and y as
    the preset says (its spacing, centre-cropped/padded to its size), z resampled to the preset's
    z spacing but neither cropped nor padded, so every slice of the scan's extent is kept and Z
    varies with the scan (``round(Z_in * spacing_in / spacing_z)``). Needs a preset with a
    spacing (a resize preset has no z spacing to keep).
    """
    preset = get_preset(preset)
    if keep_slices and preset.spacing is None:
        raise ValueError(f"preset {preset.name}: keep_slices needs a preset with a target spacing "
                         f"(this one resizes the whole volume to {preset.size})")
    data = volume.data
    if preset.window is None:
        lo, hi = float(data.min()), float(data.max())
    else:
        lo, hi = (float(v) for v in preset.window)
    lo, hi = max(lo, -32768.0), min(hi, 32767.0)
    if not hi > lo:
        raise VolumeError(f"{volume.path}: constant intensity {lo}; nothing to learn from")
    fill = float(np.clip(AIR_HU, lo, hi))
    size = (*preset.size[:2], None) if keep_slices else preset.size
    grid = resample(data, volume.spacing, target_spacing(volume, preset), size, fill=fill)
    np.clip(grid, lo, hi, out=grid)
    stored = np.rint(grid).astype(np.int16)
    if preset.scaling == "hu/1000":
        scale, offset = 1.0 / 1000.0, 0.0
    elif preset.scaling == "unit":
        scale, offset = 1.0 / (hi - lo), -lo / (hi - lo)
    else:
        raise ValueError(f"preset {preset.name}: unknown scaling {preset.scaling!r}")
    return stored, float(np.float32(scale)), float(np.float32(offset))
