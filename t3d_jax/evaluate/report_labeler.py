"""A rule labeler for the 18 CT-RATE abnormalities, and clinical efficacy (CE) from it.

Report generation is scored clinically by labelling the generated and the reference
report with the same labeler and comparing the labels (R2Gen, MS-VLM: CE precision,
recall, F1). CT-RATE has no CheXpert, so this module is a CheXpert/NegEx-style labeler
for its 18 labels (``t3d_jax.data.labels.CT_RATE_LABELS``); docs/report_generation.md
lists its rules and limits.

How a report is read:

* Sentences: :func:`t3d_jax.data.reports.split_sentences` without its comma split, so a
  list ("no X, Y or Z") stays in one sentence.
* Mentions: per label a set of synonym patterns (:data:`SYNONYMS`; the first is the
  synthetic reports' key term, ``reports.MENTION``), matched as whole words with an
  optional plural ending ("port" is not in "portion"). Laterality and lobe words are not part
  of any key phrase, so "left lower lobe atelectasis" and "atelectasis in the left lower
  lobe" both match; coordinated pairs ("pleural and pericardial effusions") are spelled
  out.
* Cues, found in the lower-cased sentence in this order, a later kind never overlapping
  an earlier one: pseudo-negations ("no change in", "no significant interval change":
  not negations, so "no change in the small pleural effusion" is positive), uncertainty
  ("possible", "suspicious for", "cannot be excluded", ... ; either side of the mention),
  negations before the mention ("no", "without", "no evidence of", "negative for", "free
  of", "resolution of", ...) and after it ("is not seen", "absent", "has resolved", "ruled
  out", ...).
* Scope: a cue before a mention reaches it unless a terminator ("but", "however",
  "except", ";", ", with", "and there", ...) or another cue lies between them; a cue after
  a mention reaches back over the same, and also stops at a comma (so "consolidation, and
  the effusion has resolved" keeps the consolidation).
* A mention is negative if a negation reaches it, else uncertain if an uncertainty cue
  does, else positive. A label is positive if any mention is positive, uncertain if its
  best mention is uncertain, negative if all mentions are negated, absent otherwise.
* Uncertain counts as positive by default (``uncertain_positive=True``): a report saying
  "suspicious for consolidation" asserts what a CT-RATE label would record, and this is
  CheXpert's "U-Ones" reading. R2Gen's CE script instead maps CheXpert's uncertain to 0;
  ``uncertain_positive=False`` gives that, and :func:`label_reports_detailed` returns the
  uncertain flags.

Clinical efficacy (:func:`clinical_efficacy`): the labels of the generated reports are
the predictions, those of the reference reports the truth; precision, recall and F1 per
label and their macro (unweighted mean over the 18 labels; macro F1 is the mean of the
per-label F1, sklearn's definition) and micro averages, all from scikit-learn's
``precision_recall_fscore_support``. A label with no positive reference and no positive
prediction has undefined precision and recall; ``zero_division`` (default 0, what
R2Gen's sklearn calls gave) decides what it counts as, and the result lists such labels.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from t3d_jax.data.labels import CT_RATE_LABELS
from t3d_jax.data.reports import MENTION, NEGATION, split_sentences

_CALC = r"calci(?:fi(?:c|ed|cations?)|um)"
_NOT_CORONARY = "(?<!coronary )(?<!coronary artery )(?<!coronary artery wall )(?<!coronary arterial )"
_PLAQUE = rf"(?:{_CALC}|atheroma(?:tous)?|atherosclerotic)(?: (?:atheroma(?:tous)?|atherosclerotic))? plaques?"

# Per label: patterns for phrases naming it, the synthetic reports' key term first.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "Medical material": (
        MENTION["Medical material"],
        r"(?:sternotomy|cerclage|surgical) wires?", r"pacemaker", r"defibrillator", r"catheters?",
        r"(?:port|chest tube|endotracheal tube|nasogastric tube|tracheostomy(?: tube)?|drain)",
        r"stents?", r"(?:surgical|vascular|metallic) clips?", r"prosthe(?:sis|ses|tic valves?)",
        r"valve replacement", r"(?:metallic|foreign) (?:material|bod(?:y|ies)|densit(?:y|ies))",
        r"(?:cardiac|implanted|electronic) device",
    ),
    "Arterial wall calcification": (
        MENTION["Arterial wall calcification"],
        rf"(?<!coronary )(?:aortic|vascular|arterial|atherosclerotic)(?: wall)? {_CALC}s?",
        rf"{_CALC}s? (?:of|in|along) the (?:thoracic |ascending |descending )?(?:aort\w*|arch|arteri\w*|vessels?)",
        rf"{_PLAQUE}(?: are| is)?(?: seen| noted| observed)? (?:in|of|along|at) (?:the )?(?:thoracic |ascending |descending )?(?:aort\w*|arch)",
        r"(?:aortic|aorta) (?:wall )?atherosclerosis", r"calcified (?:aorta|aortic wall|arteries)",
        rf"{_NOT_CORONARY}{_CALC}s?\b[^.;,]{{0,60}}?\b(?:aort\w*|aortic arch)",
    ),
    "Cardiomegaly": (
        MENTION["Cardiomegaly"],
        r"(?:heart|cardiac silhouette|cardiac contour|heart size|cardiac size)(?: size)? (?:is |was |are )?(?:mildly |markedly |slightly )?(?:enlarged|increased)",
        r"(?:enlarged|enlargement of the) (?:heart|cardiac silhouette)", r"cardiac enlargement",
        r"increased (?:heart|cardiac) size", r"increased cardiothoracic ratio",
    ),
    "Pericardial effusion": (
        MENTION["Pericardial effusion"],
        r"pericardial (?:fluid|thickening-effusion)", r"fluid in the pericardi\w*",
        r"pericardial (?:and|or|,) ?(?:or |and )?pleural effusions?", r"hemopericardium",
    ),
    "Coronary artery wall calcification": (
        MENTION["Coronary artery wall calcification"],
        rf"coronary (?:arter(?:y|ial|ies) )?(?:wall )?{_CALC}s?", r"calcified coronar(?:y|ies)",
        rf"{_CALC}s? (?:of|in|along) (?:the )?(?:\w+ )?coronar\w*", r"coronary (?:artery )?atherosclerosis",
        rf"{_PLAQUE}[^.;]*?\bcoronar\w*", r"coronary arteries (?:are|were) calcified",
        rf"{_CALC}s?\b[^.;,]{{0,60}}?\bcoronar\w*",
    ),
    "Hiatal hernia": (MENTION["Hiatal hernia"], r"hiatus hernia", r"hiatal herniation"),
    "Lymphadenopathy": (
        MENTION["Lymphadenopathy"], r"lymphadenopathies", r"adenopathy",
        r"(?:enlarged|pathologic(?:al)?(?:ly)? (?:enlarged|sized?)) (?:\w+ )?(?:and \w+ )?lymph nodes?",
        r"lymph nodes? (?:of |in |with )?patholog\w* (?:size|dimensions?)", r"lymph nodes? enlargement",
    ),
    "Emphysema": (MENTION["Emphysema"], r"emphysematous"),
    "Atelectasis": (MENTION["Atelectasis"], r"atelectases", r"atelectatic", r"fibroatelecta\w*"),
    "Lung nodule": (  # not a nodule of another organ ("thyroid nodule", "nodule in the left thyroid lobe")
        r"(?<!thyroid )(?<!adrenal )(?<!hepatic )(?<!breast )(?<!renal )(?<!liver )" + MENTION["Lung nodule"]
        + r"(?! (?:is |are |was |were )?(?:seen |noted |observed )?(?:in|of|within) the (?:\w+ ){0,2}"
          r"(?:thyroid|adrenal|liver|hepatic|kidney|renal|breast|spleen|splenic|pancrea\w*))",
        r"micronodules?", r"nodular (?:opacit(?:y|ies)|lesions?|densit(?:y|ies))",
    ),
    "Lung opacity": (
        MENTION["Lung opacity"], r"opacit(?:y|ies)", r"ground[- ]glass", r"\bggos?\b",
        r"(?:increased|increase in) (?:parenchymal )?densit(?:y|ies)",
    ),
    "Pulmonary fibrotic sequela": (
        MENTION["Pulmonary fibrotic sequela"], r"fibrotic (?:sequelae|changes?|strands?|bands?|scarring)",
        r"(?:pulmonary|lung|interstitial) fibrosis", r"fibrosis", r"parenchymal bands?", r"fibrous strands?",
        r"sequelae? (?:fibrotic )?changes?",
    ),
    "Pleural effusion": (
        MENTION["Pleural effusion"], r"(?<!pericardial )(?<!pericardial and )effusions?",
        r"pleural (?:and|or|,) ?(?:or |and )?pericardial effusions?", r"hydrothorax",
        r"fluid in the (?:\w+ )?pleural", r"pleural fluid",
    ),
    "Mosaic attenuation pattern": (MENTION["Mosaic attenuation pattern"], r"mosaic (?:perfusion|pattern|oligemia)"),
    "Peribronchial thickening": (
        MENTION["Peribronchial thickening"], r"peribronchial (?:wall )?thickening", r"peribronchial cuffing",
        r"bronchial wall thickening", r"thickening of the (?:\w+ )?bronchial walls?",
        r"bronchial walls? (?:is |are )?thickened", r"thickened bronchial walls?",
    ),
    "Consolidation": (MENTION["Consolidation"], r"consolidat(?:ions?|ed|ive)", r"air[- ]?space disease"),
    "Bronchiectasis": (MENTION["Bronchiectasis"], r"bronchiectases", r"bronchiectatic"),
    "Interlobular septal thickening": (
        MENTION["Interlobular septal thickening"], r"septal thickening", r"thickening of the (?:interlobular )?septa",
        r"thickened (?:interlobular )?septa", r"crazy[- ]paving",
    ),
}

# Not negations although they contain a negation word: "no change in X" asserts X.
PSEUDO_NEGATION = (
    r"\bno (?:significant |appreciable |interval |significant interval |substantial )?"
    r"(?:change|increase|decrease|progression|regression)s? (?:in|of)\b"
    r"|\bnot (?:significantly )?(?:changed|increased|decreased)\b|\bwithout (?:significant )?(?:change|progression)\b"
    r"|\bnot only\b|\bno longer (?:growing|progress\w*)\b|\bgram[- ]negative\b"
)
# Uncertainty, either side of the mention; these also hide the negation words inside them.
UNCERTAINTY = (
    r"\b(?:can ?not|could not|can't|may not|not) be (?:excluded|ruled out|entirely excluded)\b"
    r"|\bnot (?:excluded|ruled out)\b|\bcannot exclude\b|\bcan't exclude\b|\bdo(?:es)? not exclude\b"
    r"|\b(?:possible|possibly|probable|probably|presumably|presumed|likely|questionable|equivocal|"
    r"suspicious|suspected|suspicion|suspect|uncertain|indeterminate|borderline)\b"
    r"|\b(?:may|might|could) (?:be|represent|reflect|indicate|correspond to|suggest)\b"
    r"|\b(?:suggestive of|suggests?|concern(?:ing)? for|compatible with|cannot be differentiated|"
    r"differential diagnosis|to rule out|rule out|evaluate for|possibility of|in favor of)\b"
)
# Negations that reach forward (the cues of reports.NEGATION, and more).
NEGATION_BEFORE = (
    r"\bno (?:evidence|signs?|findings?|radiological (?:evidence|signs?)) (?:of|for|suggest\w*)\b"
    r"|\babsence of\b|\bresolution of\b|\bneither\b|\bnor\b|\bnever\b|\bwithout\b|\bnone\b"
    r"|\bnegative for\b|\bfree of\b|\bclear of\b|\bno\b|\bnot\b|" + NEGATION
)
# Negations that reach back to a mention before them in the clause.
NEGATION_AFTER = (
    r"\b(?:(?:is|are|was|were|has been|have been) )?(?:not|no longer) (?:\w+ )?(?:present|seen|identified|"
    r"observed|detected|noted|visualized|visualised|evident|demonstrated|appreciated|visible|found|depicted)\b"
    r"|\b(?:has|have) (?:resolved|disappeared|regressed)\b|\b(?:disappeared|regressed completely|completely regressed)\b"
    r"|\bruled out\b|\b(?:is|are|was|were) excluded\b"
)
# Negations that reach both ways ("resolved effusion", "effusion resolved").
NEGATION_BOTH = r"\b(?:resolved|absent)\b"
# Where a cue's reach ends.
TERMINATOR = (
    r";|:|\b(?:but|however|although|though|except|aside from|apart from|other than|whereas|yet|"
    r"nevertheless|while|which|who)\b|,? with\b|(?:,|\band) (?:there|the|a|an)\b|\bthere (?:is|are|was|were)\b"
    # a comma and a word that describes something present starts a new statement
    r"|, (?:stable|unchanged|persistent|persisting|known|residual|redemonstrated|again|mild|moderate|severe|"
    r"minimal|small|large|extensive|marked|new|increased|decreased)\b"
)

# Whole words only ("port" must not match "support" nor "portion"), plurals allowed.
_SYN = {name: re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in SYNONYMS[name]) + r")(?:s|es)?\b")
        for name in CT_RATE_LABELS}
_CUES = [("pseudo", re.compile(PSEUDO_NEGATION)), ("uncertain", re.compile(UNCERTAINTY)),
         ("neg_after", re.compile(NEGATION_AFTER)), ("neg_both", re.compile(NEGATION_BOTH)),
         ("neg_before", re.compile(NEGATION_BEFORE))]
_TERM = re.compile(TERMINATOR)
_RANK = {None: 0, "negative": 1, "uncertain": 2, "positive": 3}


def _cues(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping cue spans (start, end, kind), earlier kinds in ``_CUES`` first."""
    found: list[tuple[int, int, str]] = []
    for kind, pattern in _CUES:
        for m in pattern.finditer(text):
            if m.end() > m.start() and not any(m.start() < e and s < m.end() for s, e, _ in found):
                found.append((m.start(), m.end(), kind))
    return sorted(found)


def _mention_status(text: str, start: int, end: int, cues, terms) -> str:
    """positive / uncertain / negative for the mention text[start:end] of one sentence.

    Only the nearest cue on each side can reach the mention, and only over no terminator
    (after the mention: no comma either).
    """
    reached = set()
    before = [c for c in cues if c[1] <= start]
    if before:
        s, e, kind = before[-1]
        if kind in ("neg_before", "neg_both", "uncertain") and not any(e <= t < start for t in terms):
            reached.add(kind)
    after = [c for c in cues if c[0] >= end]
    if after:
        s, e, kind = after[0]
        if (kind in ("neg_after", "neg_both", "uncertain") and "," not in text[end:s]
                and not any(end <= t < s for t in terms)):
            reached.add(kind)
    if reached - {"uncertain"}:
        return "negative"
    return "uncertain" if reached else "positive"


def report_status(report: str) -> dict[str, str | None]:
    """Per label: "positive", "uncertain", "negative", or None when the report does not name it."""
    if not isinstance(report, str):
        raise TypeError(f"report_status: a report must be a string, got {type(report).__name__}")
    out: dict[str, str | None] = {name: None for name in CT_RATE_LABELS}
    for sentence in split_sentences(report, on_commas=False):
        text = sentence.lower()
        cues = _cues(text)
        terms = [m.start() for m in _TERM.finditer(text)]
        for name in CT_RATE_LABELS:
            for m in _SYN[name].finditer(text):
                if any(s <= m.start() < e or s < m.end() <= e for s, e, _ in cues):
                    continue  # the phrase is part of a cue ("no change in ...")
                status = _mention_status(text, m.start(), m.end(), cues, terms)
                if _RANK[status] > _RANK[out[name]]:
                    out[name] = status
    return out


def label_reports_detailed(reports: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(positive, uncertain)``: [N, 18] 0/1 for affirmed mentions, and for uncertain-only ones."""
    if isinstance(reports, str):
        raise TypeError("label_reports: pass a list of reports, not one string")
    pos = np.zeros((len(reports), len(CT_RATE_LABELS)), np.int8)
    unc = np.zeros_like(pos)
    for i, report in enumerate(reports):
        for j, status in enumerate(report_status(report).values()):
            pos[i, j] = status == "positive"
            unc[i, j] = status == "uncertain"
    return pos, unc


def label_reports(reports: Sequence[str], *, uncertain_positive: bool = True) -> np.ndarray:
    """[N, 18] 0/1 labels (order of ``CT_RATE_LABELS``); uncertain counts as 1 by default."""
    pos, unc = label_reports_detailed(reports)
    return pos | unc if uncertain_positive else pos


def ce_scores(truth: np.ndarray, pred: np.ndarray, *, zero_division: float = 0.0,
              label_names: Sequence[str] = CT_RATE_LABELS) -> dict:
    """Precision / recall / F1 (per label, macro, micro) of 0/1 ``pred`` against ``truth`` [N, L]."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape or truth.ndim != 2 or truth.shape[1] != len(label_names):
        raise ValueError(f"ce_scores: truth {truth.shape} and pred {pred.shape} must both be "
                         f"[N, {len(label_names)}]")
    if not (np.isin(truth, (0, 1)).all() and np.isin(pred, (0, 1)).all()):
        raise ValueError("ce_scores: labels must be 0/1")
    out: dict = {}
    for avg in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(truth, pred, average=avg, zero_division=zero_division)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    p, r, f, support = precision_recall_fscore_support(truth, pred, average=None, zero_division=zero_division)
    out["per_label"] = {name: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]),
                               "support": int(support[j]), "predicted": int(pred[:, j].sum())}
                        for j, name in enumerate(label_names)}
    out["labels_without_positives"] = [name for j, name in enumerate(label_names)
                                       if support[j] == 0 and pred[:, j].sum() == 0]
    out["num_reports"] = int(truth.shape[0])
    return out


def clinical_efficacy(generated_reports: Sequence[str], reference_reports: Sequence[str], *,
                      uncertain_positive: bool = True, zero_division: float = 0.0) -> dict:
    """CE precision / recall / F1 of generated reports against their references (see module doc)."""
    if len(generated_reports) != len(reference_reports):
        raise ValueError(f"clinical_efficacy: {len(generated_reports)} generated reports but "
                         f"{len(reference_reports)} references")
    if not len(generated_reports):
        raise ValueError("clinical_efficacy: no reports")
    truth = label_reports(reference_reports, uncertain_positive=uncertain_positive)
    pred = label_reports(generated_reports, uncertain_positive=uncertain_positive)
    return ce_scores(truth, pred, zero_division=zero_division)
