"""Synthetic chest-CT demo data: files, determinism, label statistics, renderings, reports.

Rendering checks compare two noise-free volumes drawn from the same seed, one without
findings and one with a single label switched on; the generator gives anatomy, noise and
each label their own random streams, so the two differ exactly where that label is drawn.
Both difficulties are checked: `realistic` (clinical sizes, the renderings of earlier
versions voxel for voxel) and `demo` (larger, denser findings that survive ~10 mm voxels).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math

import nibabel as nib
import numpy as np
import pytest

from t3d_jax.data import reports as R
from t3d_jax.data import synthetic as S
from t3d_jax.data.labels import CT_RATE_LABELS

NONE = {n: 0 for n in CT_RATE_LABELS}


def _phantom(seed, label=None, difficulty="realistic"):
    labels = dict(NONE, **({label: 1} if label else {}))
    return S.make_volume(np.random.default_rng(seed), labels, noise=False, difficulty=difficulty)


def _coords(ph, mask):
    """Centred RAS mm coordinates (x, y, z) of the voxels in ``mask``."""
    idx = np.nonzero(mask)
    return [(i - (n - 1) / 2.0) * s for i, n, s in zip(idx, ph.hu.shape, ph.spacing)]


def _block_mean(v, spacing, mm=5.0):
    f = [max(1, int(round(mm / s))) for s in spacing]
    sh = [n // k * k for n, k in zip(v.shape, f)]
    v = v[:sh[0], :sh[1], :sh[2]]
    return v.reshape(sh[0] // f[0], f[0], sh[1] // f[1], f[1], sh[2] // f[2], f[2]).mean((1, 3, 5))


# ------------------------------------------------------------------------- files ------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_a")
    S.write_dataset(out, 6, seed=11, workers=1)
    return out


def _read_manifest(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_across_runs_and_worker_counts(dataset, tmp_path):
    S.write_dataset(tmp_path / "b", 6, seed=11, workers=2)
    assert _digest(dataset) == _digest(tmp_path / "b")  # byte-identical volumes and manifest
    S.write_dataset(tmp_path / "c", 2, seed=12, workers=1)
    assert _digest(tmp_path / "c")["volumes/syn_00000.nii.gz"] != _digest(dataset)["volumes/syn_00000.nii.gz"]


def test_manifest_columns_and_files(dataset):
    fields, rows = _read_manifest(dataset / "manifest.csv")
    assert fields == ["id", "volume", "report", "split", *CT_RATE_LABELS]
    assert [r["id"] for r in rows] == [f"syn_{i:05d}" for i in range(6)]
    for r in rows:
        assert (dataset / r["volume"]).is_file() and r["split"] in ("train", "valid")
        assert all(r[n] in ("0", "1") for n in CT_RATE_LABELS)
        assert r["report"].startswith("FINDINGS: ") and " IMPRESSION: " in r["report"]
    splits = [S.split_of(f"syn_{i:05d}") for i in range(1000)]
    assert 0.75 < splits.count("train") / 1000 < 0.85


def test_nifti_storage_slope_intercept_orientation(dataset):
    for i in range(4):
        ex = S.make_example(11, i)
        ph = ex["phantom"]
        img = nib.load(dataset / "volumes" / f"syn_{i:05d}.nii.gz")
        assert img.get_data_dtype() == np.int16
        assert (img.dataobj.slope, img.dataobj.inter) == (ex["slope"], ex["inter"])
        assert "".join(nib.aff2axcodes(img.affine)) == ("RAS" if i % 2 == 0 else "LPS")
        canon = nib.as_closest_canonical(img)
        assert canon.shape == ph.hu.shape
        np.testing.assert_allclose(canon.header.get_zooms(), ph.spacing, rtol=1e-6)
        hu = np.asarray(canon.dataobj, dtype=np.float32)  # HU = stored * slope + inter
        # Tolerance: rounding to the int16 grid loses at most half a slope step.
        assert np.abs(hu - ph.hu).max() <= ex["slope"] / 2 + 1e-3
    slopes = {S.make_example(11, i)["slope"] for i in range(12)}
    assert slopes == {1.0, 2.0}  # both scalings occur


def test_ras_and_lps_files_hold_the_same_physical_anatomy(tmp_path):
    ph = _phantom(5, "Pleural effusion")
    origin = (-100.0, 20.0, -300.0)
    for orient in ("RAS", "LPS"):
        (tmp_path / f"{orient}.nii").write_bytes(S.nifti_bytes(ph.hu, ph.spacing, orient, 1.0, -1024.0, origin))
    ras, lps = (nib.load(tmp_path / f"{o}.nii") for o in ("RAS", "LPS"))
    assert not np.array_equal(np.asarray(ras.dataobj), np.asarray(lps.dataobj))  # stored differently
    c_ras, c_lps = nib.as_closest_canonical(ras), nib.as_closest_canonical(lps)
    np.testing.assert_array_equal(np.asarray(c_ras.dataobj), np.asarray(c_lps.dataobj))
    np.testing.assert_allclose(c_ras.affine, c_lps.affine, atol=1e-4)  # header floats are float32
    # same world position for the same voxel, read through each file's own affine
    ijk = np.array([3, 7, 11])
    w_ras = ras.affine @ [*ijk, 1]
    n = np.array(ph.hu.shape)
    w_lps = lps.affine @ [n[0] - 1 - ijk[0], n[1] - 1 - ijk[1], ijk[2], 1]
    np.testing.assert_allclose(w_ras, w_lps, atol=1e-4)
    # the anatomy is where a radiologist expects it in RAS+: spine posterior, heart left
    hu = np.asarray(c_lps.dataobj, np.float32)
    bone_y = _coords(ph, hu > 600)[1].mean()
    lm = ph.landmarks
    assert bone_y < lm["heart_center"][1] and lm["heart_center"][0] < 0


def test_grid_sizes_follow_the_documented_ranges():
    for size, g in S.SIZES.items():
        for k in range(40):
            shape, sp = S.sample_grid(np.random.default_rng(k), size)
            assert g.inplane_spacing[0] <= sp[0] == sp[1] <= g.inplane_spacing[1]
            assert sp[2] in g.slice_spacings
            assert 295 <= shape[0] * sp[0] <= 365 and 245 <= shape[2] * sp[2] <= 305
            if size == "demo":
                assert 90 <= shape[0] <= 155 and 48 <= shape[2] <= 102
    assert S.SIZES["realistic"].inplane_spacing == (0.6, 1.5)
    with pytest.raises(ValueError, match="unknown synthetic size"):
        S.sample_grid(np.random.default_rng(0), "huge")


# ------------------------------------------------------------------------ labels ------
def test_labels_independent_with_target_rates():
    # Labels are drawn exactly as write_dataset draws them (one stream per example).
    n = 4000
    y = np.array([[v for v in S.sample_labels(np.random.default_rng(np.random.SeedSequence([0, i]))).values()]
                  for i in range(n)], float)
    rates = np.array([S.LABEL_RATES[k] for k in CT_RATE_LABELS])
    assert np.all((rates >= 0.05) & (rates <= 0.40))
    # 5 binomial standard errors: fails only if the sampler's rates are wrong.
    np.testing.assert_array_less(np.abs(y.mean(0) - rates), 5 * np.sqrt(rates * (1 - rates) / n))
    corr = np.corrcoef(y.T)
    off = np.abs(corr[~np.eye(len(rates), dtype=bool)])
    assert off.max() < 0.07  # independent draws: |r| ~ N(0, 1/sqrt(n)=0.016); 0.07 is > 4 sigma


def test_lungs_near_minus_850_with_noise():
    ph = S.make_volume(np.random.default_rng(3), NONE)
    lung = ph.hu[(ph.hu > -960) & (ph.hu < -700)]
    assert -880 < np.median(lung) < -820
    assert lung.size * np.prod(ph.spacing) / 1e6 > 2.0  # litres of aerated lung
    assert 4 < (ph.hu - _phantom(3).hu).std() < 16  # mild noise (HU)


# --------------------------------------------------------------------- renderings ------
def _in_range(values, lo, hi, frac=0.97):
    return np.mean((values >= lo) & (values <= hi)) >= frac


def _sides_ok(x, side):
    left, right = np.mean(x < 0), np.mean(x > 0)
    return {"left": left > 0.95, "right": right > 0.95, "bilateral": min(left, right) > 0.15}[side]


def _check(label, base, pos, changed, difficulty="realistic"):
    """Label-specific assertions about what changed, where and to which HU."""
    if difficulty == "demo" and label in _DEMO_CHECKS:
        return _DEMO_CHECKS[label](base, pos, changed)
    v, b = pos.hu[changed], base.hu[changed]
    x, y, z = _coords(pos, changed)
    lung = (base.hu > -960) & (base.hu < -600)  # aerated lung (noise-free: outside air is -1000)
    in_lung = np.mean(b < -600)  # set-mode lesions may cover a few vessel voxels
    lx, ly, lz = (c.mean() for c in _coords(base, lung))
    f, lm = pos.findings[label], pos.landmarks
    if label == "Medical material":
        assert v.max() > 2000 and base.hu.max() < 1500 and f["kind"] in ("port", "pacemaker", "sternotomy")
    elif label in ("Arterial wall calcification", "Coronary artery wall calcification"):
        assert _in_range(v, 900, 1500, 1.0) and len(f["foci_mm"]) >= 6
        assert v.min() > base.hu.max()  # brighter than any bone of the same chest
        c, r, a = np.array(lm["heart_center"]), np.array(lm["heart_radii"]), lm["heart_angle"]
        for q in np.array(f["foci_mm"]):
            d = q - c
            u_, w_ = d[0] * math.cos(a) + d[1] * math.sin(a), -d[0] * math.sin(a) + d[1] * math.cos(a)
            rho = math.sqrt((u_ / r[0]) ** 2 + (w_ / r[1]) ** 2 + (d[2] / r[2]) ** 2)
            wall = [abs(_segment_distance(q, np.array(p0), np.array(p1)) - rad - 0.5) for p0, p1, rad in lm["aorta"]]
            if label.startswith("Arterial"):
                assert min(wall) < 0.1  # centred on the aortic wall (foci_mm rounded to 0.1 mm)
            else:
                assert 0.95 < rho < 1.3  # on the heart surface (epicardium)
    elif label == "Cardiomegaly":
        ratio = np.array(pos.landmarks["heart_radii"]) / np.array(base.landmarks["heart_radii"])
        assert np.all((ratio > 1.37) & (ratio < 1.51))
        assert ((pos.hu > -960) & (pos.hu < -600)).sum() < 0.95 * lung.sum()  # heart takes lung space
    elif label == "Pericardial effusion":
        assert _in_range(v, 0, 30) and changed.sum() * np.prod(pos.spacing) > 50e3
    elif label == "Hiatal hernia":
        air, fluid = changed & (pos.hu < -900), changed & (pos.hu > 0) & (pos.hu < 30)
        assert air.any() and fluid.any()
        assert _coords(pos, air)[2].mean() > _coords(pos, fluid)[2].mean()  # air-fluid level
        assert f["center"][1] < lm["heart_center"][1]  # behind the heart
    elif label == "Lymphadenopathy":
        assert _in_range(v, 30, 60, 1.0) and np.all(b < 0) and changed.sum() * np.prod(pos.spacing) > 8e3
    elif label == "Emphysema":
        assert _in_range(v, -1000, -950, 1.0) and np.all(b < -600) and z.mean() > lz
    elif label == "Atelectasis":
        assert _in_range(v, 15, 65, 1.0) and in_lung > 0.9 and _sides_ok(x, f["side"]) and z.mean() < lz
    elif label == "Lung nodule":
        c = np.array(f["center"])
        idx = tuple(int(round(c[d] / pos.spacing[d] + (pos.hu.shape[d] - 1) / 2)) for d in range(3))
        assert 15 <= pos.hu[idx] <= 85 and base.hu[idx] < -600
        assert _in_range(v, 15, 85, 1.0) and (c[0] > 0) == (f["side"] == "right")
    elif label == "Lung opacity":
        assert _in_range(v, -500, -300, 1.0) and np.all(b < -600)
    elif label == "Pulmonary fibrotic sequela":
        assert _in_range(v, -100, 30, 1.0) and np.all(b < -600) and z.mean() < lz
    elif label == "Pleural effusion":
        assert _in_range(v, 0, 25, 1.0) and _sides_ok(x, f["side"])
        assert y.mean() < ly and z.mean() < lz  # dependent (posterior) and basal
    elif label == "Mosaic attenuation pattern":
        d = pos.hu[changed] - base.hu[changed]
        assert _in_range(np.abs(d), 75, 115, 1.0) and np.mean(d > 0) > 0.25 and np.mean(d < 0) > 0.25
    elif label == "Peribronchial thickening":
        assert _in_range(v, 20, 50, 1.0) and pos.findings[label]["wall_mm"] >= 3.5
    elif label == "Consolidation":
        assert _in_range(v, 15, 55, 0.9) and _sides_ok(x, f["side"])
    elif label == "Bronchiectasis":
        assert (v < -950).sum() > 50 and ((v > 15) & (v < 45)).sum() > 50 and _sides_ok(x, f["side"])
    elif label == "Interlobular septal thickening":
        assert _in_range(v, -155, -55, 1.0) and np.all(b < -600)
    else:
        raise AssertionError(f"no rendering check for {label}")


def _lung_mask(ph):
    return (ph.hu > -960) & (ph.hu < -600)


def _demo_emphysema(base, pos, changed):
    """Hyperinflation (lower, flatter diaphragm: more aerated lung) and upper-zone bullae."""
    f, lung = pos.findings["Emphysema"], _lung_mask(base)
    assert 20 <= f["diaphragm_lowered_mm"] <= 35 and 0.3 <= f["dome_height_factor"] <= 0.5
    assert pos.landmarks["z_diaphragm"] < base.landmarks["z_diaphragm"] - 19
    inside = base.hu > -995  # noise-free: the air around the body is exactly -1000 HU
    assert ((pos.hu < -600) & inside).sum() > 1.05 * ((base.hu < -600) & inside).sum()  # more aerated lung
    bullae = (pos.hu <= -984) & (base.hu > -960) & (base.hu < -600)  # lung that became near-air
    assert bullae.sum() * np.prod(pos.spacing) > 50e3
    assert _coords(pos, bullae)[2].mean() > _coords(base, lung)[2].mean()  # upper zones


def _demo_atelectasis(base, pos, changed):
    """A dense plate in the lower lobe(s) and volume loss: the hemidiaphragm(s) raised."""
    f, lung = pos.findings["Atelectasis"], _lung_mask(base)
    raised = f["hemidiaphragm_raised_mm"]
    assert set(raised) == set(S._Chest._sides(f["side"])) and all(20 <= v <= 30 for v in raised.values())
    v, b = pos.hu[changed], base.hu[changed]
    x, _, z = _coords(pos, changed)
    assert _in_range(v, 15, 85, 0.97) and np.mean(b < -600) > 0.8 and _sides_ok(x, f["side"])
    assert z.mean() < _coords(base, lung)[2].mean()
    assert _lung_mask(pos).sum() < 0.95 * lung.sum()  # volume loss


def _demo_fibrosis(base, pos, changed):
    """Thick subpleural strands (-80..20 HU) and a reticular band (-350..-200 HU), lower zones."""
    v, b = pos.hu[changed], base.hu[changed]
    z = _coords(pos, changed)[2]
    assert _in_range(v, -360, 30, 1.0) and np.all(b < -600) and z.mean() < _coords(base, _lung_mask(base))[2].mean()
    assert np.mean(v < -150) > 0.2 and np.mean(v > -100) > 0.05  # band and strands


def _demo_mosaic(base, pos, changed):
    """Checkerboard of darker (-180..-210 HU, clipped at -1024) and brighter (+350..+420 HU) lung."""
    d = pos.hu[changed] - base.hu[changed]
    assert np.mean(d > 0) > 0.25 and np.mean(d < 0) > 0.25
    assert _in_range(d[d > 0], 345, 425, 1.0) and _in_range(-d[d < 0], 30, 215, 1.0)
    assert pos.findings["Mosaic attenuation pattern"]["cell_mm"] >= 70


_DEMO_CHECKS = {"Emphysema": _demo_emphysema, "Atelectasis": _demo_atelectasis,
                "Pulmonary fibrotic sequela": _demo_fibrosis, "Mosaic attenuation pattern": _demo_mosaic}


def _segment_distance(q, p0, p1):
    d = p1 - p0
    t = np.clip((q - p0) @ d / max(d @ d, 1e-9), 0, 1)
    return float(np.linalg.norm(q - p0 - t * d))


@pytest.mark.parametrize("difficulty", S.DIFFICULTIES)
@pytest.mark.parametrize("label", CT_RATE_LABELS)
def test_each_label_renders_where_and_how_it_should(label, difficulty):
    for seed in (1, 2):
        base, pos = _phantom(seed, None, difficulty), _phantom(seed, label, difficulty)
        changed = np.abs(pos.hu - base.hu) > 30
        assert changed.any(), f"{label}: nothing drawn"
        _check(label, base, pos, changed, difficulty)
        # survives resampling to ~5 mm voxels: many 5 mm blocks change by > 60 HU
        diff = np.abs(_block_mean(pos.hu, pos.spacing) - _block_mean(base.hu, base.spacing))
        assert (diff > 60).sum() >= 8, f"{label}: only {(diff > 60).sum()} 5-mm blocks change"


@pytest.mark.parametrize("difficulty, other", [("realistic", "Emphysema"), ("demo", "Medical material")])
def test_unrelated_labels_leave_volume_unchanged(difficulty, other):
    # A label's stream is independent: switching another label on does not move a nodule.
    # (At demo difficulty emphysema hyperinflates the lungs, so it does move them: pair the
    # nodule with a finding outside the lungs there.)
    a = _phantom(4, "Lung nodule", difficulty)
    b = S.make_volume(np.random.default_rng(4), dict(NONE, **{"Lung nodule": 1, other: 1}), noise=False,
                      difficulty=difficulty)
    assert a.findings["Lung nodule"] == b.findings["Lung nodule"]


# -------------------------------------------------------------------- difficulty ------
# sha256 of the float32 HU grid of this noise-free, all-findings realistic volume, as the
# generator drew it before difficulties existed: `realistic` is that rendering, voxel for voxel.
REALISTIC_DIGEST = "0f7976184d650f2c5d6e781e5679bd35cdf5eeaf08d4b988a8c6d974a79b48ff"


def test_realistic_is_the_earlier_rendering_and_demo_changes_only_findings():
    every = {n: 1 for n in CT_RATE_LABELS}
    real = S.make_volume(np.random.default_rng(2024), every, noise=False, difficulty="realistic")
    assert hashlib.sha256(real.hu.tobytes()).hexdigest() == REALISTIC_DIGEST
    demo = S.make_volume(np.random.default_rng(2024), every, noise=False, difficulty="demo")
    assert demo.hu.shape == real.hu.shape and not np.array_equal(demo.hu, real.hu)
    # Without findings both difficulties draw the same chest.
    np.testing.assert_array_equal(_phantom(3, None, "demo").hu, _phantom(3, None, "realistic").hu)
    # The default follows the grid size: demo for the demo size.
    assert (S.default_difficulty("demo"), S.default_difficulty("realistic")) == ("demo", "realistic")
    np.testing.assert_array_equal(S.make_volume(np.random.default_rng(5), every, noise=False).hu,
                                  S.make_volume(np.random.default_rng(5), every, noise=False, difficulty="demo").hu)
    with pytest.raises(ValueError, match="unknown synthetic difficulty 'hard'"):
        S.make_volume(np.random.default_rng(0), NONE, difficulty="hard")


def test_demo_findings_are_larger_at_5_mm():
    """Each finding whose rendering differs changes more 5-mm blocks by > 60 HU at demo difficulty;
    the ones kept as they are (already visible at 5 mm) change exactly as at realistic."""
    same = {"Cardiomegaly", "Hiatal hernia", "Interlobular septal thickening"}
    for label in CT_RATE_LABELS:
        blocks = {}
        for difficulty in S.DIFFICULTIES:
            base, pos = _phantom(1, None, difficulty), _phantom(1, label, difficulty)
            diff = np.abs(_block_mean(pos.hu, pos.spacing) - _block_mean(base.hu, base.spacing))
            blocks[difficulty] = int((diff > 60).sum())
        if label in same:
            assert blocks["demo"] == blocks["realistic"], label
        else:
            assert blocks["demo"] > 1.3 * blocks["realistic"], (label, blocks)
    nodule = _phantom(1, "Lung nodule", "demo").findings["Lung nodule"]
    assert 24 <= nodule["size_mm"] <= 30  # realistic: 12-20 mm


def test_examples_keep_labels_and_report_across_difficulties():
    for i in range(6):
        a, b = S.make_example(3, i, difficulty="realistic"), S.make_example(3, i, difficulty="demo")
        assert a["labels"] == b["labels"] and (a["slope"], a["inter"]) == (b["slope"], b["inter"])
        m = R.mentions(b["report"])
        for name in CT_RATE_LABELS:
            assert m[name]["asserted"] == bool(b["labels"][name]), (name, b["report"])
        if b["labels"]["Lung nodule"]:
            size = b["phantom"].findings["Lung nodule"]["size_mm"]
            assert f"{size} mm" in b["report"]  # the report states what was drawn


def test_dataset_records_its_difficulty(tmp_path):
    S.write_dataset(tmp_path / "d", 2, seed=1, workers=1)
    S.write_dataset(tmp_path / "r", 2, seed=1, workers=1, difficulty="realistic")
    for name, difficulty in (("d", "demo"), ("r", "realistic")):
        lines = [json.loads(line) for line in (tmp_path / name / "findings.jsonl").read_text().splitlines()]
        assert [d["difficulty"] for d in lines] == [difficulty] * 2
        settings = json.loads((tmp_path / name / "synthetic.json").read_text())
        assert (settings["difficulty"], settings["size"], settings["seed"], settings["num"]) == (difficulty, "demo", 1, 2)
        assert settings["render"] == json.loads(json.dumps(S.RENDER[difficulty]))
    assert _digest(tmp_path / "d")["volumes/syn_00000.nii.gz"] != _digest(tmp_path / "r")["volumes/syn_00000.nii.gz"]
    with pytest.raises(ValueError, match="unknown synthetic difficulty"):
        S.write_dataset(tmp_path / "x", 1, seed=0, difficulty="easy")


# ----------------------------------------------------------------------- reports ------
def test_reports_consistent_with_labels_and_findings():
    asserted_neg = 0
    for i in range(60):
        rng = np.random.default_rng(np.random.SeedSequence([99, i]))
        labels = S.sample_labels(rng)
        ph = S.make_volume(rng, labels, noise=False) if i < 6 else None
        findings = ph.findings if ph else {
            "Pleural effusion": {"side": ("left", "right", "bilateral")[i % 3]},
            "Atelectasis": {"side": "right"}, "Bronchiectasis": {"side": "bilateral"},
            "Lung nodule": {"side": "left", "lobe": "lower", "size_mm": 12},
            "Consolidation": {"side": "right", "lobe": "upper"},
            "Medical material": {"device": "median sternotomy wires"}}
        report = R.make_report(rng, labels, findings)
        m = R.mentions(report)
        for name in CT_RATE_LABELS:
            if labels[name]:
                assert m[name]["asserted"] and not m[name]["negated"], (name, report)
            else:
                assert not m[name]["asserted"], (name, report)
                asserted_neg += m[name]["negated"]
        for name in ("Pleural effusion", "Atelectasis", "Bronchiectasis", "Consolidation"):
            if labels[name]:
                side = findings[name]["side"]
                sentence = [s for s in R.split_sentences(report) if s.lower().find(name.split()[-1].lower()) >= 0]
                assert any(side in s.lower() for s in sentence), (name, side, report)
    assert asserted_neg > 100  # negations are stated, not only positives


def test_reports_vary_in_wording_and_order():
    labels = dict(NONE, **{"Emphysema": 1, "Lung nodule": 1, "Cardiomegaly": 1})
    findings = {"Lung nodule": {"side": "left", "lobe": "upper", "size_mm": 14}}
    texts = {R.make_report(np.random.default_rng(k), labels, findings) for k in range(30)}
    assert len(texts) > 20
    firsts = {t.split(": ", 1)[1].split(". ")[0] for t in texts}
    assert len(firsts) > 5
    assert all("14 mm" in t and "left upper lobe" in t for t in texts)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown labels.*Pneumothorax"):
        S.make_volume(np.random.default_rng(0), {"Pneumothorax": 1})
    with pytest.raises(ValueError, match="orientation must be"):
        S.make_volume(np.random.default_rng(0), NONE, orientation="LAS")
    with pytest.raises(ValueError, match="--num must be >= 1"):
        S.write_dataset(tmp_path, 0, seed=0)
