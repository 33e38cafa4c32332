"""The config against its prepared data folder (t3d_jax/data/prepared.py)."""

from __future__ import annotations

import pytest

from configs import t3d
from t3d_jax.data import prepared, shards
from t3d_jax.utils import UserError


def test_synthetic_data_is_made_once_when_the_config_asks(tmp_path, capsys):
    config = t3d.get_config("demo")
    config.data.dir = str(tmp_path / "prepared")
    config.data.synthetic_if_missing = 3
    with pytest.raises(UserError, match="no dataset.json there"):
        prepared.check_data_config(config)
    assert prepared.make_synthetic_if_missing(config, progress=False)
    assert f"making the embedded synthetic data set once: 3 chest CTs (seed 0) in {tmp_path / 'raw'}" \
        in capsys.readouterr().out
    assert prepared.check_data_config(config) == tmp_path / "prepared"
    info = shards.read_dataset_json(config.data.dir)
    assert info["num_written"] == 3 and info["preset"]["name"] == "demo"
    assert not prepared.make_synthetic_if_missing(config, progress=False)  # cached: nothing redone
    off = t3d.get_config("demo")
    off.data.dir = str(tmp_path / "elsewhere")
    off.data.synthetic_if_missing = 0
    assert not prepared.make_synthetic_if_missing(off) and not (tmp_path / "elsewhere").exists()
