"""bench/reportgen_baselines.py's encoder arms: `--encoder NAME=CONFIG_FILE:VARIANT[@CHECKPOINT_DIR]`
parsing and the merge of a pretraining's image encoder into the reportgen config (configs only,
no training: the run itself is the bench's)."""

import json

import pytest

from bench import reportgen_baselines as rb
from bench.compare_methods import config_from_file
from configs import reportgen as reportgen_config


def _base():
    return reportgen_config.get_config("demo")


def test_parse_encoder_specs_and_errors(tmp_path):
    arm = rb.parse_encoder(f"msvlm=configs/msvlm.py:demo@{tmp_path}")
    assert arm == rb.EncoderArm("msvlm", "configs/msvlm.py", "demo", str(tmp_path))
    # A variant may hold commas; a relative checkpoint folder becomes absolute; no '@' = random.
    arm = rb.parse_encoder("s=configs/msvlm.py:demo,slices@rel/ckpt")
    assert (arm.variant, arm.checkpoint) == ("demo,slices", str((rb.pathlib.Path("rel/ckpt")).absolute()))
    assert rb.parse_encoder("random=configs/t3d.py:demo").checkpoint == ""
    for bad in ("configs/clip.py:demo", "vit=configs/clip.py", "vit=:demo", "vit=configs/clip.py:demo@",
                "v it=configs/clip.py:demo"):
        with pytest.raises(SystemExit, match="--encoder"):
            rb.parse_encoder(bad)


def test_arm_config_takes_the_pretrainings_encoder_and_input_then_the_overrides():
    base = _base()
    before = base.to_dict()
    c, pre = rb.arm_config(base, rb.EncoderArm("m", "configs/msvlm.py", "demo"),
                           ["model.decoder.resampler_latents=32"])
    msvlm = config_from_file("configs/msvlm.py", "demo")
    assert c.model.image.name == "msvlm" and c.model.image.size == msvlm.model.image.size
    assert c.model.image.msvlm.to_dict() == msvlm.model.image.msvlm.to_dict()
    assert c.model.image.patch_dropout == 0.0
    assert tuple(c.data.view_size) == tuple(msvlm.data.view_size)
    assert c.model.decoder.resampler_latents == 32 and c.init_from.checkpoint == ""
    # The reportgen side (decoder, data, schedule) is the base's; the base is left as it was.
    for key in ("hidden_size", "num_heads", "size"):
        assert c.model.decoder[key] == base.model.decoder[key]
    assert (c.data.dir, c.preprocess.max_len, c.train.num_steps) == (base.data.dir, 224, base.train.num_steps)
    assert base.to_dict() == before and pre.model.image.name == "msvlm"
    # Today's default arms: the T3D demo encoder, which is the reportgen demo's own image setting.
    t3d, random = rb.default_arms(rb.pathlib.Path("/nonexistent_demo"))
    assert (t3d.name, random.name, random.checkpoint) == ("t3d", "random", "")
    c, _ = rb.arm_config(base, random)
    assert c.model.image.to_dict() == base.model.image.to_dict()


def test_arm_config_checks_the_runs_config_json(tmp_path):
    run = tmp_path / "clip_seed0"
    (run / "checkpoints").mkdir(parents=True)
    clip = config_from_file("configs/clip.py", "demo").to_dict()
    del clip["model"]["image"]["swin"]  # a run written before a key existed: no conflict
    (run / "config.json").write_text(json.dumps(clip, default=list))
    c, _ = rb.arm_config(_base(), rb.parse_encoder(f"vit=configs/clip.py:demo@{run}/checkpoints"))
    assert c.init_from.checkpoint == str(run / "checkpoints") and c.model.image.name == "vit3d"
    with pytest.raises(SystemExit, match=r"config\.json does not match.*model\.image\.name: 'msvlm'"):
        rb.arm_config(_base(), rb.parse_encoder(f"m=configs/msvlm.py:demo@{run}/checkpoints"))
    clip["model"]["image"]["resnet"]["arch"] = "resnet18"  # a nested key that differs
    (run / "config.json").write_text(json.dumps(clip, default=list))
    with pytest.raises(SystemExit, match=r"model\.image\.resnet\.arch: 'resnet50' in configs/clip.py:demo, "
                                         r"'resnet18' in the run"):
        rb.arm_config(_base(), rb.parse_encoder(f"vit=configs/clip.py:demo@{run}/checkpoints"))
    with pytest.raises(SystemExit, match="no such checkpoint folder"):
        rb.arm_config(_base(), rb.parse_encoder(f"vit=configs/clip.py:demo@{tmp_path}/missing"))
    (run / "config.json").write_text("[]")
    with pytest.raises(SystemExit, match="not a training run's config.json"):
        rb.arm_config(_base(), rb.parse_encoder(f"vit=configs/clip.py:demo@{run}/checkpoints"))


def test_paired_differences_match_the_per_arm_scores_and_an_independent_rouge_bootstrap():
    import numpy as np
    from pycocoevalcap.rouge.rouge import Rouge

    from t3d_jax.evaluate import language_metrics as lm
    from t3d_jax.evaluate.reportgen import BOOTSTRAPPED, score_reports

    refs = ["there is cardiomegaly . no pleural effusion .", "small left pleural effusion . no cardiomegaly .",
            "emphysema in both upper lobes . no lung nodule .", "no acute abnormality .",
            "a lung nodule in the right lower lobe .", "atelectasis at the bases . mild emphysema ."] * 2
    gen_a = ["no pleural effusion .", "no cardiomegaly .", "no lung nodule .", "no acute abnormality .",
             "no lung nodule .", "no emphysema ."] * 2
    gen_b = ["there is cardiomegaly .", "left pleural effusion .", "emphysema . no lung nodule .",
             "no acute abnormality .", "lung nodule in the right lobe .", "atelectasis at the bases ."] * 2
    d = rb.paired_differences(refs, gen_a, gen_b, num_bootstrap=12)
    sa, sb = (score_reports(refs, g, meteor=False)["figures"] for g in (gen_a, gen_b))
    for k in BOOTSTRAPPED:  # the point estimate is the per-arm scores' difference
        assert d["difference"][k] == pytest.approx(sb[k] - sa[k], abs=1e-12), k
    assert d["difference"]["CE_f1_macro"] > 0  # B names the findings, A only negates them
    # ROUGE-L is the mean per-report score: its paired interval by hand, with the same draws.
    ids = [str(i) for i in range(len(refs))]
    gts = {i: [lm.clean_report(r)] for i, r in zip(ids, refs)}
    per = [np.asarray(Rouge().compute_score(gts, {i: [lm.clean_report(g)] for i, g in zip(ids, gen)})[1])
           for gen in (gen_a, gen_b)]
    rng = np.random.default_rng(0)
    diffs = [float((per[1] - per[0])[idx].mean()) for idx in (rng.integers(0, 12, 12) for _ in range(12))]
    assert d["intervals"]["ROUGE_L"] == pytest.approx([np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)],
                                                      abs=1e-12)  # float64 sums in another order
    same = rb.paired_differences(refs, gen_a, gen_a, num_bootstrap=3)
    assert all(v == 0 for v in same["difference"].values())
    assert all(lo == hi == 0 for lo, hi in same["intervals"].values())
