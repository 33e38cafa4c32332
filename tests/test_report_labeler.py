"""The CT-RATE report labeler and clinical efficacy (CE) scores.

* Synthetic reports (``reports.make_report``, 300 with sampled labels): the labels read
  back must agree with the labels the reports were written from, >= 0.99 per label (the
  labeler reaches 1.0 on them; every label appears both positive and negated there).
* Hand-written sentences, each with the expected status of every label it names:
  negation scope in lists, "no evidence of", pseudo-negation ("no change in X" is X),
  uncertainty, laterality, coordination, section headers and line breaks.
* CE against scikit-learn's separate precision/recall/f1 functions on fixed random
  arrays (tolerance 1e-12: the same rational counts in float64 on both sides), and a
  case computed by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from t3d_jax.data import reports as R
from t3d_jax.data import synthetic as S
from t3d_jax.data.labels import CT_RATE_LABELS
from t3d_jax.evaluate import report_labeler as L

TOL = 1e-12
DEVICES = ("median sternotomy wires", "a left pectoral pacemaker with a lead in the right ventricle",
           "a right chest wall port with catheter tip in the superior vena cava")
SIDES = ("left", "right", "bilateral")


def synthetic_reports(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    texts, truth = [], []
    for _ in range(n):
        labels = S.sample_labels(rng)
        findings = {
            "Pleural effusion": {"side": SIDES[rng.integers(3)]},
            "Atelectasis": {"side": SIDES[rng.integers(3)]},
            "Bronchiectasis": {"side": SIDES[rng.integers(3)]},
            "Lung nodule": {"side": SIDES[rng.integers(2)], "lobe": ("upper", "lower")[rng.integers(2)],
                            "size_mm": int(rng.integers(4, 30))},
            "Consolidation": {"side": SIDES[rng.integers(2)], "lobe": ("upper", "lower")[rng.integers(2)]},
            "Medical material": {"device": DEVICES[rng.integers(3)]},
        }
        texts.append(R.make_report(rng, labels, findings))
        truth.append([labels[name] for name in CT_RATE_LABELS])
    return texts, np.array(truth)


def test_synthetic_reports_are_read_back_near_perfectly():
    texts, truth = synthetic_reports(300)
    assert (truth.sum(0) >= 5).all() and ((1 - truth).sum(0) >= 5).all()  # both classes per label
    statuses = [L.report_status(t) for t in texts]
    negated = np.array([[s[name] == "negative" for name in CT_RATE_LABELS] for s in statuses])
    assert (negated.sum(0) >= 5).all()  # negations are read as such, not just missed
    pred = L.label_reports(texts)
    agreement = (pred == truth).mean(0)
    assert (agreement >= 0.99).all(), dict(zip(CT_RATE_LABELS, agreement))
    assert not L.label_reports_detailed(texts)[1].any()  # synthetic reports are never uncertain


P, U, N = "positive", "uncertain", "negative"
CASES = [  # (report text, {label: status}); every label not listed must be absent (None)
    ("No pleural effusion or pneumothorax.", {"Pleural effusion": N}),
    ("No consolidation, atelectasis, or pleural effusion.",
     {"Consolidation": N, "Atelectasis": N, "Pleural effusion": N}),
    ("There is no evidence of lymphadenopathy.", {"Lymphadenopathy": N}),
    ("Negative for pulmonary emphysema.", {"Emphysema": N}),
    ("The lungs are clear without consolidation.", {"Consolidation": N}),
    ("Pericardial effusion is not seen.", {"Pericardial effusion": N}),
    ("The previously described left lower lobe consolidation has resolved.", {"Consolidation": N}),
    ("Resolved right pleural effusion.", {"Pleural effusion": N}),
    ("No change in the small right pleural effusion.", {"Pleural effusion": P}),
    ("No significant interval change in the bilateral lung nodules.", {"Lung nodule": P}),
    ("Infection cannot be excluded in the area of ground-glass opacity.", {"Lung opacity": U}),
    ("Early consolidation cannot be excluded.", {"Consolidation": U}),
    ("Pleural effusion cannot be ruled out.", {"Pleural effusion": U}),
    ("Findings are suspicious for lymphadenopathy.", {"Lymphadenopathy": U}),
    ("Possible small hiatal hernia.", {"Hiatal hernia": U}),
    ("Linear density at the left base may represent atelectasis.", {"Atelectasis": U}),
    ("No pleural effusion, possible consolidation in the right lower lobe.", {"Pleural effusion": N, "Consolidation": U}),
    ("Bilateral pleural effusions, left greater than right.", {"Pleural effusion": P}),
    ("Atelectasis in the right and left lower lobes.", {"Atelectasis": P}),
    ("A 6 mm nodule in the right upper lobe.", {"Lung nodule": P}),
    ("Left lower lobe consolidation with air bronchograms.", {"Consolidation": P}),
    ("No pleural effusion, but there is bibasilar atelectasis.", {"Pleural effusion": N, "Atelectasis": P}),
    ("There is no pleural effusion; cardiomegaly is present.", {"Pleural effusion": N, "Cardiomegaly": P}),
    ("No pleural or pericardial effusion.", {"Pleural effusion": N, "Pericardial effusion": N}),
    ("Small pericardial and pleural effusions.", {"Pleural effusion": P, "Pericardial effusion": P}),
    ("Calcific atheroma plaques are observed in the aorta and coronary arteries.",
     {"Arterial wall calcification": P, "Coronary artery wall calcification": P}),
    ("Atherosclerotic calcifications are observed in the aorta and coronary arteries.",
     {"Arterial wall calcification": P, "Coronary artery wall calcification": P}),
    ("Coronary artery calcifications, the aorta is of normal calibre.", {"Coronary artery wall calcification": P}),
    ("Ground glass densities and interlobular septal thickenings are observed in both lungs.",
     {"Lung opacity": P, "Interlobular septal thickening": P}),
    ("Pericardial effusion-thickening was not observed.", {"Pericardial effusion": N}),
    ("The heart is enlarged.", {"Cardiomegaly": P}),
    ("The heart is not enlarged.", {}),
    ("Heart size is normal and there is no cardiomegaly.", {"Cardiomegaly": N}),
    ("A small thyroid nodule is noted.", {}),
    ("Hypodense nodule in the left thyroid lobe.", {}),
    ("No new consolidation, stable emphysema.", {"Consolidation": N, "Emphysema": P}),
    ("No significant lymph node enlargement.", {"Lymphadenopathy": N}),
    ("No enlargement of the heart.", {"Cardiomegaly": N}),
    ("The thyroid gland is unremarkable in the visualized portion.", {}),  # "port" is a whole word only
    ("Median sternotomy wires and a left pectoral pacemaker are noted.", {"Medical material": P}),
    ("Consolidation and pleural effusion are not seen.", {"Consolidation": N, "Pleural effusion": N}),
    ("There is emphysema, and pleural effusion is not seen.", {"Emphysema": P, "Pleural effusion": N}),
    ("Centrilobular emphysematous changes in both upper lobes, no bronchiectasis.",
     {"Emphysema": P, "Bronchiectasis": N}),
    ("Mosaic attenuation pattern with interlobular septal thickening.",
     {"Mosaic attenuation pattern": P, "Interlobular septal thickening": P}),
    ("Peribronchial thickening is absent.", {"Peribronchial thickening": N}),
    ("No mediastinal or hilar lymphadenopathy was detected.", {"Lymphadenopathy": N}),
    ("Lymph nodes of pathological size were not observed in the mediastinum.", {"Lymphadenopathy": N}),
    ("No new nodules.", {"Lung nodule": N}),
    ("Fibrotic sequelae in the right middle lobe.", {"Pulmonary fibrotic sequela": P}),
    ("No pleural effusion. Small hiatal hernia.", {"Pleural effusion": N, "Hiatal hernia": P}),
    ("Impression:\nNo acute cardiopulmonary abnormality.\nStable 4 mm nodule in the left lower lobe.",
     {"Lung nodule": P}),
    ("Small left pleural effusion. No pleural effusion on the right.", {"Pleural effusion": P}),  # any positive wins
    # a whole findings paragraph in CT-RATE's (translated) style
    ("Trachea and both main bronchi are in normal width and no obstructive pathology is detected in the lumen. "
     "Mediastinal structures cannot be evaluated optimally because contrast material is not given. As far as can "
     "be observed: Heart contour and size are normal. Pericardial effusion-thickening was not observed. No lymph "
     "node was detected in mediastinal and both hilar regions in pathological size and appearance. When examined "
     "in the lung parenchyma window; Minimal emphysematous changes are observed in both lungs. There are "
     "millimetric nonspecific nodules in both lungs. There are sequelae fibrotic changes in the middle lobe of the "
     "right lung. No pneumonic infiltration or consolidation area was detected in the lung parenchyma. Bone "
     "structures in the study area are natural.",
     {"Pericardial effusion": N, "Emphysema": P, "Lung nodule": P, "Pulmonary fibrotic sequela": P,
      "Consolidation": N}),
]


def test_hand_written_sentences():
    wrong = []
    for text, expected in CASES:
        got = {name: status for name, status in L.report_status(text).items() if status is not None}
        if got != expected:
            wrong.append((text, got, expected))
    assert not wrong, "\n".join(f"{t!r}: got {g}, expected {e}" for t, g, e in wrong)


def test_uncertain_counts_as_positive_unless_asked_otherwise():
    texts = ["Possible small hiatal hernia. Cardiomegaly.", "No hiatal hernia."]
    j, k = CT_RATE_LABELS.index("Hiatal hernia"), CT_RATE_LABELS.index("Cardiomegaly")
    pos, unc = L.label_reports_detailed(texts)
    assert pos.shape == (2, 18) and pos.dtype == np.int8
    assert (pos[0, j], unc[0, j], pos[0, k], unc[0, k]) == (0, 1, 1, 0)
    assert L.label_reports(texts)[:, j].tolist() == [1, 0]
    assert L.label_reports(texts, uncertain_positive=False)[:, j].tolist() == [0, 0]
    assert L.label_reports(texts).sum() == 2


def test_split_sentences_keeps_lists_for_the_labeler():
    text = "FINDINGS: No X, Y or Z.\nImpression: A, b."
    assert R.split_sentences(text) == ["No X", "Y or Z.", "A", "b."]  # the synthetic-report default
    assert R.split_sentences(text, on_commas=False) == ["No X, Y or Z.", "A, b."]


def test_ce_scores_match_sklearn():
    rng = np.random.default_rng(3)
    truth = (rng.random((40, 18)) < 0.3).astype(int)
    pred = np.where(rng.random((40, 18)) < 0.7, truth, 1 - truth)
    truth[:, 5] = 0  # a label without reference positives
    pred[:, 6] = 0  # a label never predicted
    got = L.ce_scores(truth, pred)
    for avg in ("macro", "micro"):
        assert got[f"precision_{avg}"] == pytest.approx(precision_score(truth, pred, average=avg, zero_division=0), abs=TOL)
        assert got[f"recall_{avg}"] == pytest.approx(recall_score(truth, pred, average=avg, zero_division=0), abs=TOL)
        assert got[f"f1_{avg}"] == pytest.approx(f1_score(truth, pred, average=avg, zero_division=0), abs=TOL)
    for j, name in enumerate(CT_RATE_LABELS):
        row = got["per_label"][name]
        assert row["f1"] == pytest.approx(f1_score(truth[:, j], pred[:, j], zero_division=0), abs=TOL)
        assert (row["support"], row["predicted"]) == (truth[:, j].sum(), pred[:, j].sum())
    assert got["num_reports"] == 40


def test_ce_scores_by_hand():
    truth = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    pred = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 0]])
    got = L.ce_scores(truth, pred, label_names=("a", "b", "c"))
    # a: tp 1 fp 0 fn 1 -> P 1, R 1/2, F 2/3; b: tp 2 fp 1 fn 0 -> P 2/3, R 1, F 4/5; c: no positives -> 0
    assert got["per_label"]["a"] == pytest.approx({"precision": 1, "recall": 0.5, "f1": 2 / 3, "support": 2, "predicted": 1})
    assert got["per_label"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1, "f1": 0.8, "support": 2, "predicted": 3})
    assert got["precision_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3, abs=TOL)
    assert got["recall_macro"] == pytest.approx((0.5 + 1 + 0) / 3, abs=TOL)
    assert got["f1_macro"] == pytest.approx((2 / 3 + 0.8 + 0) / 3, abs=TOL)
    assert (got["precision_micro"], got["recall_micro"], got["f1_micro"]) == pytest.approx((0.75, 0.75, 0.75), abs=TOL)
    assert got["labels_without_positives"] == ["c"]
    ones = L.ce_scores(truth, pred, label_names=("a", "b", "c"), zero_division=1.0)
    assert ones["per_label"]["c"]["f1"] == 1.0 and ones["f1_macro"] == pytest.approx((2 / 3 + 0.8 + 1) / 3, abs=TOL)


def test_clinical_efficacy_of_reports():
    refs = ["Left pleural effusion. No cardiomegaly.", "Cardiomegaly is present. No pleural effusion.",
            "Possible consolidation in the left lower lobe."]
    gens = ["Small pleural effusion on the left.", "No cardiomegaly or pleural effusion.",
            "Left lower lobe consolidation."]
    got = L.clinical_efficacy(gens, refs)
    pe, cm, co = (got["per_label"][n] for n in ("Pleural effusion", "Cardiomegaly", "Consolidation"))
    assert (pe["precision"], pe["recall"], pe["support"]) == (1.0, 1.0, 1)
    assert (cm["precision"], cm["recall"], cm["support"], cm["predicted"]) == (0.0, 0.0, 1, 0)
    assert (co["precision"], co["recall"]) == (1.0, 1.0)  # the uncertain reference counts as positive
    strict = L.clinical_efficacy(gens, refs, uncertain_positive=False)["per_label"]["Consolidation"]
    assert (strict["precision"], strict["support"]) == (0.0, 0)
    assert got["precision_micro"] == pytest.approx(2 / 2) and got["recall_micro"] == pytest.approx(2 / 3)
    assert len(got["labels_without_positives"]) == 15


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="2 generated reports but 1 references"):
        L.clinical_efficacy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no reports"):
        L.clinical_efficacy([], [])
    with pytest.raises(TypeError, match="must be a string"):
        L.label_reports([None])
    with pytest.raises(TypeError, match="not one string"):
        L.label_reports("No effusion.")
    with pytest.raises(ValueError, match="must both be"):
        L.ce_scores(np.zeros((2, 18)), np.zeros((2, 17)))
    with pytest.raises(ValueError, match="0/1"):
        L.ce_scores(np.full((2, 18), 2), np.zeros((2, 18)))
