"""Multi-view sampling: crop boxes, resampling against scipy, box/content consistency."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from t3d_jax.data.views import ViewOptions, eval_view, make_views, resample_box, sample_boxes

# float32 resampling of int16-range values (|v| <= ~3e4) against a float64 reference:
# a few float32 roundings of numbers up to 3e4 -> well below 1e-2 absolute.
RESAMPLE_ATOL = 1e-2


def _reference_resample(volume: np.ndarray, box: np.ndarray, out_shape) -> np.ndarray:
    """Independent float64 reference: scipy map_coordinates at the documented voxel centres."""
    axes = []
    for a in range(3):
        n_in, n_out = volume.shape[a], out_shape[a]
        lo, hi = float(box[0, a]), float(box[1, a])
        axes.append((lo + (np.arange(n_out) + 0.5) * (hi - lo) / n_out) * n_in - 0.5)
    grid = np.meshgrid(*axes, indexing="ij")
    return ndimage.map_coordinates(volume.astype(np.float64), grid, order=1, mode="nearest")


def _ramp_volume(shape=(24, 24, 16)) -> np.ndarray:
    """value = x + 32 y + 1024 z: every voxel encodes its own coordinates (fits int16)."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (x + 32 * y + 1024 * z).astype(np.int16)


COEFFS = (1.0, 32.0, 1024.0)


def test_sample_boxes_cover_the_configured_fraction_of_each_axis():
    rng = np.random.default_rng(0)
    boxes = sample_boxes(rng, 4000, 0.5, 1.0)
    assert boxes.shape == (4000, 2, 3) and boxes.dtype == np.float32
    lo, hi = boxes[:, 0], boxes[:, 1]
    extent = hi - lo
    assert lo.min() >= 0.0 and hi.max() <= 1.0
    assert extent.min() >= 0.5 - 1e-6 and extent.max() <= 1.0 + 1e-6
    # The range is actually used, not a degenerate constant: both ends are reached.
    assert extent.min() < 0.52 and extent.max() > 0.98
    # Placement is uniform-ish: small crops start anywhere in [0, 1 - extent].
    small = extent[:, 0] < 0.6
    assert lo[small, 0].min() < 0.05 and lo[small, 0].max() > 0.35
    fixed = sample_boxes(rng, 100, 0.7, 0.7)
    np.testing.assert_allclose(fixed[:, 1] - fixed[:, 0], 0.7, atol=1e-6)


@pytest.mark.parametrize("out_shape", [(13, 9, 17), (24, 20, 16), (7, 31, 5)])
def test_resample_box_matches_scipy_map_coordinates(out_shape):
    rng = np.random.default_rng(1)
    volume = rng.integers(-30000, 30000, size=(24, 20, 16)).astype(np.int16)
    for box in [np.array([[0.1, 0.3, 0.0], [0.7, 1.0, 0.55]]), np.array([[0, 0, 0], [1, 1, 1.0]]),
                sample_boxes(rng, 1, 0.5, 1.0)[0]]:
        got = resample_box(volume, box, out_shape)
        assert got.shape == out_shape and got.dtype == np.float32
        np.testing.assert_allclose(got, _reference_resample(volume, box, out_shape), atol=RESAMPLE_ATOL)


def test_full_box_at_stored_size_is_the_identity():
    volume = np.random.default_rng(2).integers(-1000, 1000, size=(10, 11, 12)).astype(np.int16)
    np.testing.assert_array_equal(resample_box(volume, np.array([[0, 0, 0], [1, 1, 1.0]]), volume.shape), volume)


def test_resampled_ramp_is_analytic():
    """Linear interpolation of a linear ramp is exact: the view holds the ramp at the
    continuous source coordinate of each view voxel centre."""
    volume = _ramp_volume()
    box = np.array([[0.25, 0.125, 0.3], [0.75, 0.875, 0.9]])
    out = (12, 12, 8)
    got = resample_box(volume, box, out)
    expected = np.zeros(out)
    for a, coeff in enumerate(COEFFS):
        n = volume.shape[a]
        c = (box[0, a] + (np.arange(out[a]) + 0.5) * (box[1, a] - box[0, a]) / out[a]) * n - 0.5
        shape = [1, 1, 1]
        shape[a] = -1
        expected = expected + coeff * c.reshape(shape)
    np.testing.assert_allclose(got, expected, atol=RESAMPLE_ATOL)


def _axis_ramp(shape, axis: int) -> np.ndarray:
    """value = 100 * (voxel index along ``axis``)."""
    index = np.indices(shape)[axis]
    return (100 * index).astype(np.int16)


def _box_from_ramp_views(views_per_axis, stored_shape, flipped_x: bool = False) -> np.ndarray:
    """Recovers (lo, hi) per axis from the views of the three axis ramps by a linear fit.

    Along axis a, view voxel j holds the source coordinate c(j) = (lo + (j + .5) s / M) N - .5
    (times 100) with s = hi - lo: the fitted slope gives s, the intercept gives lo.
    """
    box = np.zeros((2, 3))
    for a in range(3):
        view = views_per_axis[a]
        m, n = view.shape[a], stored_shape[a]
        profile = view.mean(axis=tuple(b for b in range(3) if b != a)) / 100.0
        if a == 0 and flipped_x:  # the mirrored frame: x' = N - 1 - x
            profile = (n - 1) - profile
        slope, intercept = np.polyfit(np.arange(m), profile, 1)
        span = slope * m / n
        lo = (intercept + 0.5) / n - 0.5 * span / m
        box[:, a] = (lo, lo + span)
    return box


def _views_of_ramps(shape, seed, options):
    """Views of the three axis ramps drawn with the same generator seed (same boxes)."""
    out = [make_views(_axis_ramp(shape, a), 1.0, 0.0, np.random.default_rng(seed), options) for a in range(3)]
    for _, boxes in out[1:]:
        np.testing.assert_array_equal(boxes, out[0][1])  # boxes do not depend on content
    return [views for views, _ in out], out[0][1]


def test_make_views_boxes_are_consistent_with_view_content():
    shape = (24, 24, 16)
    # view <= crop_min * stored size, so every sample lies between voxel centres (no edge hold)
    options = ViewOptions(num_views=3, view_size=(12, 12, 8), intensity_jitter=0.0, noise_std=0.0)
    for seed in range(5):
        views, boxes = _views_of_ramps(shape, seed, options)
        assert views[0].shape == (3, 12, 12, 8, 1) and boxes.shape == (3, 2, 3)
        assert not np.allclose(boxes[0], boxes[1])  # views differ
        for v in range(3):
            recovered = _box_from_ramp_views([views[a][v, ..., 0] for a in range(3)], shape)
            np.testing.assert_allclose(recovered, boxes[v], atol=1e-4)


def test_flip_lr_mirrors_the_example_and_boxes_follow_the_mirrored_frame():
    shape = (24, 24, 16)
    options = ViewOptions(num_views=2, view_size=(12, 12, 8), intensity_jitter=0.0, noise_std=0.0,
                          flip_lr=True)
    seen = set()
    for seed in range(12):
        views, boxes = _views_of_ramps(shape, seed, options)
        x_views = views[0]
        flipped = bool(x_views[0, -1, 0, 0, 0] < x_views[0, 0, 0, 0, 0])
        seen.add(flipped)
        for v in range(2):  # both views of one example share the frame
            assert bool(x_views[v, -1, 0, 0, 0] < x_views[v, 0, 0, 0, 0]) == flipped
            recovered = _box_from_ramp_views([views[a][v, ..., 0] for a in range(3)], shape, flipped_x=flipped)
            np.testing.assert_allclose(recovered, boxes[v], atol=1e-4)
    assert seen == {True, False}
    default = ViewOptions(view_size=(12, 12, 8), intensity_jitter=0.0, noise_std=0.0)
    for seed in range(12):  # off by default: the x ramp always increases along x
        x_views, _ = make_views(_axis_ramp(shape, 0), 1.0, 0.0, np.random.default_rng(seed), default)
        assert np.all(np.diff(x_views[:, :, 0, 0, 0], axis=1) > 0)


def test_intensity_units_jitter_and_noise():
    volume = np.full((20, 20, 20), 400, dtype=np.int16)
    scale, offset = 1.0 / 1000.0, 0.25  # model units: 0.65
    clean = ViewOptions(num_views=2, view_size=(32, 32, 32), intensity_jitter=0.0, noise_std=0.0)
    views, _ = make_views(volume, scale, offset, np.random.default_rng(0), clean)
    np.testing.assert_allclose(views, 0.65, rtol=1e-6)

    jitter = ViewOptions(num_views=8, view_size=(8, 8, 8), intensity_jitter=0.1, noise_std=0.0)
    views, _ = make_views(volume, scale, offset, np.random.default_rng(1), jitter)
    per_view = views.reshape(8, -1)
    np.testing.assert_allclose(per_view.std(axis=1), 0.0, atol=1e-6)  # one gain/shift per view
    means = per_view.mean(axis=1)
    assert np.all(means >= 0.65 * 0.9 - 0.1 - 1e-6) and np.all(means <= 0.65 * 1.1 + 0.1 + 1e-6)
    assert np.ptp(means) > 0.01  # the jitter is drawn per view

    noisy = ViewOptions(num_views=1, view_size=(32, 32, 32), intensity_jitter=0.0, noise_std=0.05)
    views, _ = make_views(volume, scale, offset, np.random.default_rng(2), noisy)
    # 32768 samples: the std estimate's relative error is ~0.4%; 3% is a safe bound.
    assert abs(views.std() - 0.05) < 0.05 * 0.03
    assert abs(views.mean() - 0.65) < 0.05 * 0.03


def test_make_views_is_deterministic_for_a_generator_seed():
    volume = np.random.default_rng(3).integers(-1000, 1000, size=(24, 24, 16)).astype(np.int16)
    options = ViewOptions(view_size=(12, 12, 8))
    a = make_views(volume, 1e-3, 0.0, np.random.default_rng(7), options)
    b = make_views(volume, 1e-3, 0.0, np.random.default_rng(7), options)
    c = make_views(volume, 1e-3, 0.0, np.random.default_rng(8), options)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_eval_view_is_the_whole_volume_resampled_in_model_units():
    volume = np.random.default_rng(4).integers(-1000, 1000, size=(24, 20, 16)).astype(np.int16)
    got = eval_view(volume, 1e-3, -0.5, (12, 10, 12))
    assert got.shape == (12, 10, 12, 1) and got.dtype == np.float32
    reference = _reference_resample(volume, np.array([[0, 0, 0], [1, 1, 1.0]]), (12, 10, 12)) * 1e-3 - 0.5
    np.testing.assert_allclose(got[..., 0], reference, atol=1e-5)  # 1e-3 * RESAMPLE_ATOL


@pytest.mark.parametrize("kwargs, message", [
    (dict(crop_min=0.0), "crop_min"),
    (dict(crop_min=0.8, crop_max=0.6), "crop_min"),
    (dict(crop_max=1.2), "crop_max"),
    (dict(view_size=(8, 8)), "view_size"),
    (dict(num_views=0), "num_views"),
    (dict(noise_std=-1.0), "noise_std"),
])
def test_bad_options_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViewOptions(**kwargs)


def test_bad_volume_or_box_shape_is_rejected():
    with pytest.raises(ValueError, match="3D volume"):
        resample_box(np.zeros((4, 4)), np.zeros((2, 3)), (2, 2, 2))
    with pytest.raises(ValueError, match="box must have shape"):
        resample_box(np.zeros((4, 4, 4)), np.zeros((3,)), (2, 2, 2))
