"""The launchers fail like tools: an expected user error is one line on stderr naming the
problem and its fix, a non-zero exit, no traceback.

Every case fails before anything is compiled, so each costs one interpreter start-up. A
case is a row of CASES: the launcher, its arguments (``{data}``: a prepared dataset,
``{tmp}``: an empty folder of this test) and a phrase the message must contain.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import cpu_devices

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = f"--config={REPO}/configs/t3d.py:tiny"

CASES = {
    "evaluate/no_checkpoint": (
        "launch/evaluate.py", [TINY, "--config.data.dir={data}", "--workdir={tmp}/run"],
        "checkpoints: no checkpoint folder; train first"),
    "evaluate/unknown_variant": (
        "launch/evaluate.py", [f"--config={REPO}/configs/t3d.py:nope", "--workdir={tmp}/run"],
        "unknown variant 'nope'"),
    "evaluate/data_dir_without_dataset_json": (
        "launch/evaluate.py", [TINY, "--config.data.dir={tmp}", "--workdir={tmp}/run"],
        "no dataset.json there; prepare the data"),
    "evaluate/no_data_dir": (
        "launch/evaluate.py", [TINY, "--workdir={tmp}/run"],
        "config.data.dir is empty"),
    "export/no_checkpoint": (
        "launch/export_embeddings.py", [TINY, "--workdir={tmp}/run", "--input={tmp}", "--output={tmp}/e.npz"],
        "checkpoints: no checkpoint folder; train first"),
    "export/input_not_found": (
        "launch/export_embeddings.py",
        [TINY, "--workdir={tmp}/run", "--input={tmp}/missing", "--output={tmp}/e.npz"],
        "missing: input not found"),
    "export/unknown_variant": (
        "launch/export_embeddings.py",
        [f"--config={REPO}/configs/t3d.py:nope", "--workdir={tmp}/run", "--input={tmp}", "--output={tmp}/e.npz"],
        "unknown variant 'nope'"),
    "export_weights/no_checkpoint": (
        "launch/export_weights.py", [f"--config={REPO}/configs/t3d.py:resnet_tiny", "--workdir={tmp}/run",
                                     "--out={tmp}/out"],
        "checkpoints: no checkpoint folder; train first"),
    "train/unknown_variant": (
        "launch/train.py", [f"--config={REPO}/configs/t3d.py:nope", "--workdir={tmp}/run"],
        "unknown variant 'nope'"),
    "train/data_dir_without_dataset_json": (
        "launch/train.py", [TINY, "--config.data.dir={tmp}", "--workdir={tmp}/run"],
        "no dataset.json there; prepare the data"),
    "train/unknown_task": (
        "launch/train.py", [TINY, "--config.data.dir={data}", "--config.task=mae", "--workdir={tmp}/run"],
        "config.task='mae': unknown task"),
    "prepare/manifest_not_found": (
        "launch/prepare_data.py", ["--manifest={tmp}/none.csv", "--out={tmp}/out"],
        "none.csv: manifest not found"),
    "prepare/unknown_variant": (
        "launch/prepare_data.py", ["--manifest={tmp}/none.csv", "--out={tmp}/out",
                                   f"--config={REPO}/configs/t3d.py:nope"],
        "unknown variant 'nope'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_without_traceback(case, tiny_prepared_dir, tmp_path):
    tool, args, expected = CASES[case]
    argv = [a.format(data=tiny_prepared_dir, tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, str(REPO / tool), *argv], capture_output=True, text=True,
                          env=cpu_devices.env(1), cwd=REPO, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{tool}: ") and expected in last, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()  # a failure creates nothing
