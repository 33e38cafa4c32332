"""Language metrics: pycocoevalcap run in the test on the cleaned text, and hand-computed cases.

The wrapper must give exactly what the library gives on the same {id: [text]} dicts
(tolerance 1e-12: the same float64 code runs on both sides). The hand cases use
closed forms: BLEU-n = brevity penalty exp(1 - r/c) x the geometric mean of the n-gram
precisions, counted by hand; ROUGE-L is the LCS F-measure with beta 1.2; CIDEr of a hypothesis
equal to its reference is 10 when the corpus has 2+ documents. pycocoevalcap adds
1e-15 / 1e-9 to BLEU's n-gram counts, hence the 1e-8 tolerance on hand BLEU values.
METEOR starts a JVM that loads a 60 MB paraphrase table (about 7.5 s of CPU): it runs once,
on identical pairs, where the jar's score is exactly 1; a JVM that fails at once ("corrupt
jarfile", well under a second) checks the failure path.
"""

from __future__ import annotations

import logging
import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from t3d_jax.evaluate import language_metrics as LM

LIB_TOL = 1e-12
HAND_TOL = 1e-8

REFS = [
    "FINDINGS: The heart is enlarged. There is a small left pleural effusion.",
    "No pleural effusion. Ground-glass opacities in both lower lobes; no consolidation.",
    "1. Bilateral pleural effusions. 2. Atelectasis in the right lower lobe.",
    "The trachea is midline. No lymphadenopathy.",
]
HYPS = [
    "The heart is enlarged. Small left pleural effusion.",
    "No pleural effusion. Ground-glass opacity in the lower lobes.",
    "Bilateral pleural effusions.",
    "No lymphadenopathy. The trachea is midline.",
]


def test_clean_report_follows_r2gen():
    # lower case; list numbers dropped; punctuation gone but the hyphen kept; " . " between sentences
    got = LM.clean_report("FINDINGS: 1. The heart is enlarged.. 2. Ground-glass (GGO); effusion!\n  Normal.")
    assert got == "findings the heart is enlarged . ground-glass ggo effusion normal ."
    assert LM.clean_report("") == " ."


def test_language_metrics_equal_the_library_on_the_cleaned_text():
    got = LM.language_metrics(REFS, HYPS, meteor=False)
    gts = {str(i): [LM.clean_report(r)] for i, r in enumerate(REFS)}
    res = {str(i): [LM.clean_report(h)] for i, h in enumerate(HYPS)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    want = {f"BLEU_{n + 1}": b for n, b in enumerate(bleu)}
    want["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    want["CIDEr"] = Cider().compute_score(gts, res)[0]
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=LIB_TOL), name
    assert math.isnan(got["METEOR"])  # meteor=False: not computed
    assert 0 < got["BLEU_4"] < got["BLEU_1"] < 1
    # dict input with several references per id gives the same as the library on those dicts
    many = LM.language_metrics({"a": [REFS[0], REFS[1]], "b": REFS[2]}, {"a": HYPS[1], "b": HYPS[2]}, meteor=False)
    gts2 = {"a": [LM.clean_report(REFS[0]), LM.clean_report(REFS[1])], "b": [LM.clean_report(REFS[2])]}
    res2 = {"a": [LM.clean_report(HYPS[1])], "b": [LM.clean_report(HYPS[2])]}
    assert many["BLEU_1"] == pytest.approx(Bleu(4).compute_score(gts2, res2, verbose=0)[0][0], abs=LIB_TOL)
    assert many["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts2, res2)[0], abs=LIB_TOL)


def test_hand_computed_brevity_penalty_and_rouge():
    # reference "the heart is normal in size ." (7 words), hypothesis "the heart is normal ." (5):
    # n-gram precisions 5/5, 3/4, 2/3, 1/2 (only the n-grams ending in "." miss), brevity
    # penalty exp(1 - 7/5); BLEU-n = BP * (p_1 ... p_n)^(1/n)
    got = LM.language_metrics(["The heart is normal in size."], ["The heart is normal."], meteor=False)
    bp, precisions = math.exp(1 - 7 / 5), [1, 3 / 4, 2 / 3, 1 / 2]
    assert got["BLEU_1"] == pytest.approx(bp, abs=HAND_TOL)
    for n in range(1, 5):
        assert got[f"BLEU_{n}"] == pytest.approx(bp * math.prod(precisions[:n]) ** (1 / n), abs=HAND_TOL), n
    # LCS 5 words: P = 1, R = 5/7, F = (1 + 1.2^2) P R / (R + 1.2^2 P)
    p, r, b2 = 1.0, 5 / 7, 1.2 ** 2
    assert got["ROUGE_L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), abs=LIB_TOL)


def test_identical_reports_score_one_and_meteor_runs_once():
    reports = ["The heart is normal in size.", "No pleural effusion. Small hiatal hernia.",
               "Bilateral lower lobe atelectasis."]
    assert LM.meteor_unavailable_reason() is None, "this machine has /usr/bin/java"
    got = LM.language_metrics(reports, list(reports))  # the one JVM start of this file
    for name in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"):
        assert got[name] == pytest.approx(1.0, abs=HAND_TOL), name
    assert got["ROUGE_L"] == pytest.approx(1.0, abs=LIB_TOL)
    assert got["CIDEr"] == pytest.approx(10.0, abs=1e-9)  # cosine 1 for every n, x10
    assert got["METEOR"] == pytest.approx(1.0, abs=1e-9)


def test_meteor_without_java_is_nan_with_a_reason(monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "java" in LM.meteor_unavailable_reason()
    with caplog.at_level(logging.WARNING, logger=LM.__name__):
        got = LM.language_metrics(["No effusion."], ["No effusion."])
    assert math.isnan(got["METEOR"]) and got["BLEU_1"] == pytest.approx(1.0, abs=HAND_TOL)
    assert "METEOR is missing" in caplog.text and "java" in caplog.text


def test_meteor_subprocess_failure_is_nan_not_zero(monkeypatch, caplog, tmp_path):
    # a real JVM that exits at once ("Invalid or corrupt jarfile"): the scorer reads an empty line
    (tmp_path / "not.jar").write_text("not a jar")
    monkeypatch.setattr(LM._meteor_module, "METEOR_JAR", str(tmp_path / "not.jar"))
    with caplog.at_level(logging.WARNING, logger=LM.__name__):
        got = LM.language_metrics(["No effusion."], ["No effusion."])
    assert math.isnan(got["METEOR"]) and got["ROUGE_L"] == 1.0
    assert "subprocess failed" in caplog.text and "jarfile" in caplog.text


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="different ids"):
        LM.language_metrics({"a": "x"}, {"b": "x"}, meteor=False)
    with pytest.raises(ValueError, match="different ids"):
        LM.language_metrics(["x", "y"], ["x"], meteor=False)
    with pytest.raises(ValueError, match=r"hypotheses\[0\] must be one report"):
        LM.language_metrics(["x"], [["x", "y"]], meteor=False)
    with pytest.raises(ValueError, match=r"references\[0\] must be a string"):
        LM.language_metrics([3], ["x"], meteor=False)
    with pytest.raises(ValueError, match="one string"):
        LM.language_metrics("x", "x", meteor=False)
    with pytest.raises(ValueError, match="no reports"):
        LM.language_metrics([], [], meteor=False)
