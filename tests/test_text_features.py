"""The locked text tower: cached report states (launch/cache_text_features.py,
t3d_jax/data/text_features.py), their delivery by the pipelines, the tasks' batch contract, and
a few training steps that leave the frozen tower's weights untouched.

The tower is the real MiniLM-L6 checkpoint (`minilm_dir`); its vocab.txt is bert-base-uncased's,
the vocab of the tiny prepared data's token ids (101 [CLS], 102 [SEP], ids < 30522).

Tolerance of cached vs live states: the cache stores float16, round-to-nearest, so each value
is off by at most 2**-11 of its magnitude (float16's unit roundoff; values below float16's
smallest normal, 6.1e-5, are off by at most 2**-25 absolutely). The live tower runs the same
float32 weights op by op here and jitted in batches of 8 there: XLA's fused float32 kernels
move MiniLM's states (|x| <= ~6) by up to 3e-5 (measured); ATOL = 1e-4 covers that with room.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import write_tiny_prepared
from test_train_optim import load_config
from t3d_jax.data import pipeline, shards
from t3d_jax.data import text_features as tf_lib
from t3d_jax.models.two_tower import frozen_text_tower, pool_text
from t3d_jax.utils import UserFileNotFoundError, UserValueError

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VALID = 20, 6  # 20 = 2 batches of 8 + a padded one
MAX_LEN = 16
BATCH = 8
RTOL = 2.0 ** -11  # float16 storage (module docstring)
ATOL = 1e-4


def _with_vocab(root: pathlib.Path, vocab) -> pathlib.Path:
    """Records the vocab the tiny data's ids come from, as prepare_data writes it."""
    info = json.loads((root / "dataset.json").read_text())
    info["tokenizer"]["vocab"] = str(vocab)
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not be loaded when the checks refuse")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, bert_vocab) -> pathlib.Path:
    root = write_tiny_prepared(tmp_path_factory.mktemp("text_features") / "data", num_train=NUM_TRAIN,
                               num_valid=NUM_VALID, shape=(16, 16, 16), max_len=MAX_LEN)
    return _with_vocab(root, bert_vocab)


@pytest.fixture(scope="module")
def tokens_meta(data_dir, minilm_dir):
    return tf_lib.cache_text_features(data_dir, minilm_dir, frozen_text_tower, keep="tokens",
                                      batch_size=BATCH, progress=False)


@pytest.fixture(scope="module")
def live(data_dir, minilm_dir) -> dict[str, dict[str, np.ndarray]]:
    """Each split's ids, mask and the live tower's float32 states (our BertEncoder, MiniLM weights)."""
    from t3d_jax.models import convert

    encoder = convert.load_hf_bert(minilm_dir)
    out = {}
    for split in ("train", "valid"):
        recs = list(shards.iter_records(data_dir, split))
        ids = np.stack([r["input_ids"] for r in recs]).astype(np.int32)
        mask = np.stack([r["attention_mask"] for r in recs]).astype(np.int32)
        states = np.asarray(encoder(ids, mask, deterministic=True)["hidden"], np.float32)
        out[split] = {"ids": ids, "mask": mask, "states": states, "id": [r["id"] for r in recs]}
    return out


def _cache(data_dir, split) -> np.ndarray:
    return np.load(data_dir / "text_features" / f"{split}.npy")


# ---------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------


def test_cached_token_states_are_the_live_towers(data_dir, minilm_dir, tokens_meta, live):
    digest = hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert tokens_meta["model"]["sha256"] == digest
    assert tokens_meta["model"]["weights"] == "model.safetensors"
    assert tokens_meta["model"]["hidden_size"] == 384
    assert (tokens_meta["keep"], tokens_meta["pool"], tokens_meta["dtype"]) == ("tokens", None, "float16")
    assert tokens_meta["dataset"] == json.loads((data_dir / "dataset.json").read_text())
    on_disk = json.loads((data_dir / "text_features" / "features.json").read_text())
    assert on_disk == tokens_meta
    assert not list(data_dir.glob(".text_features-*"))  # the temporary folder was swapped in
    for split, n in (("train", NUM_TRAIN), ("valid", NUM_VALID)):
        cached = _cache(data_dir, split)
        assert cached.dtype == np.float16 and cached.shape == (n, MAX_LEN, 384)
        assert tokens_meta["splits"][split] == {"file": f"{split}.npy", "shape": [n, MAX_LEN, 384]}
        np.testing.assert_allclose(cached.astype(np.float32), live[split]["states"], rtol=RTOL, atol=ATOL)
    # The rows are not interchangeable: record order is what the test above checked.
    assert not np.allclose(_cache(data_dir, "train")[0], _cache(data_dir, "train")[1], atol=1e-2)


def test_pooled_cache_is_the_live_pooling(data_dir, minilm_dir, live, tmp_path):
    other = shutil.copytree(data_dir, tmp_path / "data", ignore=shutil.ignore_patterns("text_features"))
    meta = tf_lib.cache_text_features(other, minilm_dir, frozen_text_tower, keep="pooled", pool="mean",
                                      batch_size=BATCH, progress=False)
    assert (meta["keep"], meta["pool"]) == ("pooled", "mean")
    for split in ("train", "valid"):
        want = np.asarray(pool_text(jnp.asarray(live[split]["states"]), live[split]["mask"], "mean"))
        cached = _cache(other, split)
        assert cached.shape == want.shape == (len(want), 384)
        np.testing.assert_allclose(cached.astype(np.float32), want, rtol=RTOL, atol=ATOL)


def test_refused_before_any_compute(tmp_path, minilm_dir, bert_vocab):
    root = write_tiny_prepared(tmp_path / "data", num_train=2, num_valid=1, shape=(8, 8, 8), max_len=MAX_LEN)
    # The data's vocab is not recorded: say how to name it.
    with pytest.raises(UserValueError, match="--vocab"):
        tf_lib.cache_text_features(root, minilm_dir, _no_model, progress=False)
    # Another vocab (two tokens swapped): refused, naming both files.
    tokens = bert_vocab.read_text(encoding="utf-8").splitlines()
    tokens[2000], tokens[2001] = tokens[2001], tokens[2000]
    other_vocab = tmp_path / "other_vocab.txt"
    other_vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    _with_vocab(root, other_vocab)
    with pytest.raises(UserValueError, match="differs from the vocab") as err:
        tf_lib.cache_text_features(root, minilm_dir, _no_model, progress=False)
    assert str(other_vocab) in str(err.value) and str(minilm_dir / "vocab.txt") in str(err.value)
    # The same vocab (another copy) passes this check; too few position embeddings are refused.
    shutil.copy(bert_vocab, other_vocab)
    small = tmp_path / "small_bert"
    small.mkdir()
    shutil.copy(bert_vocab, small / "vocab.txt")
    config = json.loads((minilm_dir / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=MAX_LEN - 1)))
    with pytest.raises(UserValueError, match="max_position_embeddings=15"):
        tf_lib.cache_text_features(root, small, _no_model, progress=False)
    assert not (root / "text_features").exists()


def test_launcher_fails_like_a_tool(tmp_path, minilm_dir):
    """launch/cache_text_features.py: a refusal is one line naming the fix, exit status 1."""
    import subprocess
    import sys

    import cpu_devices

    root = write_tiny_prepared(tmp_path / "data", num_train=2, num_valid=1, shape=(8, 8, 8), max_len=MAX_LEN)
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "cache_text_features.py"), "--data", str(root),
         "--hf_bert_dir", str(minilm_dir), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=cpu_devices.env(1), cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"launch/cache_text_features.py: {root / 'dataset.json'} does not name the vocab its reports were "
        f"tokenized with (tokenizer.vocab); pass it with --vocab PATH/vocab.txt"]


# ---------------------------------------------------------------------------------------
# The pipelines
# ---------------------------------------------------------------------------------------


def _data_config(data_dir, **kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(dict(
        dir=str(data_dir), train_split="train", eval_split="valid", num_views=1, view_size=(8, 8, 8),
        crop_min=0.5, crop_max=1.0, intensity_jitter=0.0, noise_std=0.0, flip_lr=False,
        worker_count=0, prefetch_buffer_size=2, text_features=True), **kw))


@pytest.mark.parametrize("workers", [0, 2])
def test_train_pipeline_delivers_each_records_row(data_dir, tokens_meta, workers):
    seed, gbs, steps = 3, 4, 7  # 28 elements: past the first epoch of 20
    it = pipeline.train_iterator(_data_config(data_dir), global_batch_size=gbs, seed=seed, worker_count=workers)
    batches = [next(it) for _ in range(steps)]
    # The shuffle permutes positions independently of the elements: replay it on the positions.
    order = grain.MapDataset.range(NUM_TRAIN).shuffle(seed=seed).repeat()
    cached = _cache(data_dir, "train")
    ids = np.stack([r["input_ids"] for r in shards.iter_records(data_dir, "train")])
    for s, batch in enumerate(batches):
        assert batch["text_states"].dtype == np.float16 and batch["text_states"].shape == (gbs, MAX_LEN, 384)
        positions = [order[s * gbs + r] for r in range(gbs)]
        np.testing.assert_array_equal(batch["text_states"], cached[positions])
        np.testing.assert_array_equal(batch["input_ids"], ids[positions])  # the same records' ids


def test_eval_pipeline_delivers_rows_by_record_and_pads_with_zeros(data_dir, tokens_meta):
    batches = list(pipeline.eval_iterator(_data_config(data_dir), "valid", 4))
    states = np.concatenate([b["text_states"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    ids = [str(i) for b in batches for i in b["id"]]
    assert len(states) == 8 and valid.sum() == NUM_VALID
    cached = _cache(data_dir, "valid")
    for row, (record_id, ok) in enumerate(zip(ids, valid)):
        if ok:
            np.testing.assert_array_equal(states[row], cached[int(record_id.split("-")[1])])
        else:
            assert not states[row].any()


def test_missing_stale_or_other_cache_is_refused(data_dir, tokens_meta, tmp_path):
    other = shutil.copytree(data_dir, tmp_path / "data", ignore=shutil.ignore_patterns("text_features"))
    with pytest.raises(UserFileNotFoundError, match="launch/cache_text_features.py"):
        pipeline.train_iterator(_data_config(other), global_batch_size=4, seed=0)
    shutil.copytree(data_dir / "text_features", other / "text_features")
    next(pipeline.train_iterator(_data_config(other), global_batch_size=4, seed=0))  # a copy is current
    with pytest.raises(UserValueError, match="keeps 'tokens' features but .* asks for 'pooled'"):
        pipeline.eval_iterator(_data_config(other, text_features="pooled"), "valid", 4)
    info = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps(dict(info, created="prepared again")))
    for make in (lambda: pipeline.train_iterator(_data_config(other), global_batch_size=4, seed=0),
                 lambda: pipeline.eval_iterator(_data_config(other), "valid", 4)):
        with pytest.raises(UserValueError, match="stale.*launch/cache_text_features.py"):
            make()
    # Off (the default): nothing is read, no keys are added.
    batch = next(pipeline.train_iterator(_data_config(other, text_features=False), global_batch_size=4, seed=0))
    assert "text_states" not in batch


# ---------------------------------------------------------------------------------------
# Config checks and the tasks' batch contract
# ---------------------------------------------------------------------------------------


def _run_config(task="t3d", data_dir="", **text):
    c = load_config(f"{task}.py", "tiny")
    c.data.dir = str(data_dir)
    c.preprocess.max_len = MAX_LEN
    c.model.text.size = "minilm"
    c.model.text.locked = True
    c.data.text_features = True
    c.optim.freeze = ("^text_encoder/",)
    c.model.text.update(text)
    return c


def test_check_config_matches_the_cache_to_the_run(data_dir, tokens_meta, minilm_dir, tmp_path):
    c = _run_config(data_dir=data_dir)
    c.init_from.hf_bert_dir = str(minilm_dir)
    assert tf_lib.check_config(c)["keep"] == "tokens"
    c.init_from.hf_bert_dir = ""
    with pytest.raises(UserValueError, match="init_from.hf_bert_dir="):
        tf_lib.check_config(c)  # a locked tower with random weights
    other = tmp_path / "other_bert"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"other weights")
    c.init_from.hf_bert_dir = str(other)
    with pytest.raises(UserValueError, match="sha256"):
        tf_lib.check_config(c)
    c.init_from.hf_bert_dir = str(minilm_dir)
    c.preprocess.max_len = 32
    with pytest.raises(UserValueError, match="preprocess.max_len=32"):
        tf_lib.check_config(c)


def test_locked_batch_contract_and_its_refusals():
    from t3d_jax import tasks

    spec = tasks.get_task(_run_config("t3d")).batch_spec()
    assert "input_ids" not in spec
    assert spec["text_states"].shape == (8, MAX_LEN, 384) and spec["text_states"].dtype == jnp.float16
    assert spec["attention_mask"].shape == (8, MAX_LEN) and "boxes" in spec
    c = _run_config("clip")
    c.data.text_features = "pooled"
    spec = tasks.get_task(c).batch_spec()
    assert spec["text_pooled"].shape == (8, 384) and "text_states" not in spec
    with pytest.raises(UserValueError, match="needs the cached token states"):
        tasks.get_task(_pooled_t3d())
    c = _run_config("clip")
    c.data.text_features = False
    with pytest.raises(UserValueError, match="cache_text_features.py"):
        tasks.get_task(c)
    c = _run_config("clip")
    c.optim.freeze = ()
    with pytest.raises(UserValueError, match=r"\^text_encoder/"):
        tasks.get_task(c)
    c.optim.lr_multipliers.text = 0.0  # freezes the encoder (and, as it warns, text_proj too)
    tasks.get_task(c)
    # Unlocked configs keep today's contract.
    spec = tasks.get_task(_run_config("clip", locked=False)).batch_spec()
    assert "input_ids" in spec and "text_states" not in spec


def _pooled_t3d():
    c = _run_config("t3d")
    c.data.text_features = "pooled"
    return c


@pytest.mark.parametrize("source", ["tokens", "pooled"])
def test_locked_loss_is_the_live_loss_on_the_live_states(source):
    """The task's loss from cached states equals the unlocked loss when the cache holds the
    live tower's states (float16-rounded): the locked path pools and projects like the live one."""
    from t3d_jax import tasks

    c = _run_config("clip", size="tiny", pool="mean")
    c.data.text_features = True if source == "tokens" else "pooled"
    locked = tasks.get_task(c)
    live_task = tasks.get_task(_run_config("clip", size="tiny", pool="mean", locked=False))
    with nnx.use_eager_sharding(False):
        model = live_task.build_model(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 3000, (8, MAX_LEN)).astype(np.int32)
    mask = (np.arange(MAX_LEN)[None] < rng.integers(3, MAX_LEN, (8, 1))).astype(np.int32)
    views = rng.normal(size=(8, 1, 16, 16, 16, 1)).astype(np.float32)
    batch = {"views": views, "input_ids": ids, "attention_mask": mask}
    want, _ = live_task.loss(model, batch, step=0, deterministic=True)
    states = model.text_encoder(ids, mask, deterministic=True)["hidden"]
    cached = {"views": views, "attention_mask": mask}
    if source == "tokens":
        cached["text_states"] = np.asarray(states, np.float16)
    else:
        cached["text_pooled"] = np.asarray(pool_text(states, mask, "mean"), np.float16)
    assert set(cached) == set(locked.batch_spec())
    got, _ = locked.loss(model, cached, step=0, deterministic=True)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-3)


# ---------------------------------------------------------------------------------------
# Training with the locked tower
# ---------------------------------------------------------------------------------------


def test_train_with_locked_minilm_keeps_the_text_encoder(data_dir, tokens_meta, minilm_dir, tmp_path):
    from t3d_jax.models import convert
    from t3d_jax.train.loop import train_and_evaluate

    c = _run_config("t3d", data_dir=data_dir)
    c.init_from.hf_bert_dir = str(minilm_dir)
    c.train.num_steps = 3
    c.train.global_batch_size = 8
    c.optim.warmup_steps = 1
    c.checkpoint.every_steps = 1000
    c.metrics.tensorboard = False
    c.metrics.peak_flops_per_device = 1e12
    tf_lib.check_config(c)
    result = train_and_evaluate(c, tmp_path / "run")
    assert result.step == 3 and all(np.isfinite(h["loss"]) for h in result.history if "loss" in h)
    params = jax.tree.map(np.asarray, result.state["params"])

    # The text encoder is MiniLM's, bit for bit, after the updates.
    _, flat = convert.hf_bert_state(minilm_dir)
    for path, value in flat.items():
        leaf = params["text_encoder"]
        for k in path:
            leaf = leaf[k]
        np.testing.assert_array_equal(leaf, value, err_msg="/".join(map(str, path)))
    # ... it has no optimizer state, while the image side and the text projection moved.
    frozen = result.program.frozen_mask
    assert all(jax.tree.leaves(frozen["text_encoder"])) and not any(jax.tree.leaves(frozen["text_proj"]))
    with jax.set_mesh(result.program.mesh):  # the loop's context: the compiled init is reused
        init = jax.tree.map(np.asarray, result.program.init()["params"])
    for tower in ("image_encoder", "image_proj", "text_proj", "tma_head"):
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[tower]), jax.tree.leaves(init[tower]))]
        assert any(moved), tower
