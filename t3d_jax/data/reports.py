"""Radiology-style reports for the synthetic chest CTs, consistent with their labels.

A report has a FINDINGS section (one sentence for every positive label, a random subset
of negative labels stated as negations, and neutral filler about normal anatomy, in
shuffled order) and an IMPRESSION (the positives, or a normal statement). Each label
has several phrasings; every phrasing names the label's key term (``MENTION[label]``),
positives never carry a negation cue and negatives always do, so the report can be
checked against the labels mechanically (tests/test_synthetic.py does) and so the
CT-CLIP zero-shot prompts "{label} is present." / "{label} is not present." share words
with the training text. Laterality ("left", "right", "bilateral") and lobe come from
the rendering's ``findings`` dict, so the words match what is drawn.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from t3d_jax.data.labels import CT_RATE_LABELS

# A regex per label matching every phrase that refers to it (positive or negated).
MENTION: dict[str, str] = {
    "Medical material": r"medical material",
    "Arterial wall calcification": r"arterial wall calcification",
    "Cardiomegaly": r"cardiomegaly",
    "Pericardial effusion": r"pericardial effusion",
    "Coronary artery wall calcification": r"coronary artery wall calcification",
    "Hiatal hernia": r"hiatal hernia",
    "Lymphadenopathy": r"lymphadenopathy",
    "Emphysema": r"emphysema",
    "Atelectasis": r"atelectasis",
    "Lung nodule": r"nodules?",
    "Lung opacity": r"lung opacit(?:y|ies)",
    "Pulmonary fibrotic sequela": r"fibrotic sequela",
    "Pleural effusion": r"pleural effusions?",
    "Mosaic attenuation pattern": r"mosaic attenuation",
    "Peribronchial thickening": r"peribronchial thickening",
    "Consolidation": r"consolidation",
    "Bronchiectasis": r"bronchiectasis",
    "Interlobular septal thickening": r"interlobular septal thickening",
}
NEGATION = r"\b(?:no|not|without|absent|negative for|free of)\b"

# Positive phrasings; {side}, {lobe}, {device}, {size} are filled from the rendering.
POSITIVE: dict[str, tuple[str, ...]] = {
    "Medical material": (
        "Medical material is present: {device}.",
        "Medical material consistent with {device} is noted.",
        "There is medical material ({device}).",
    ),
    "Arterial wall calcification": (
        "Arterial wall calcification is present in the thoracic aorta.",
        "Atherosclerotic arterial wall calcification is seen along the aortic wall.",
        "Calcified plaques in the aorta, arterial wall calcification.",
    ),
    "Cardiomegaly": (
        "Cardiomegaly is present.",
        "The heart is enlarged, consistent with cardiomegaly.",
        "Cardiomegaly with an increased cardiothoracic ratio.",
    ),
    "Pericardial effusion": (
        "Pericardial effusion is present.",
        "A pericardial effusion surrounds the heart.",
        "There is a moderate pericardial effusion.",
    ),
    "Coronary artery wall calcification": (
        "Coronary artery wall calcification is present.",
        "Calcified plaques along the coronary arteries, coronary artery wall calcification.",
        "There is coronary artery wall calcification.",
    ),
    "Hiatal hernia": (
        "Hiatal hernia is present.",
        "A hiatal hernia is seen posterior to the heart.",
        "There is a hiatal hernia containing air and fluid.",
    ),
    "Lymphadenopathy": (
        "Mediastinal lymphadenopathy is present.",
        "Lymphadenopathy with enlarged mediastinal and hilar lymph nodes.",
        "There is lymphadenopathy in the mediastinum.",
    ),
    "Emphysema": (
        "Emphysema is present in the upper lobes.",
        "Centrilobular emphysema in both upper lobes.",
        "There are emphysema changes in the upper zones.",
    ),
    "Atelectasis": (
        "Atelectasis is present in the {side} lower lobe{s}.",
        "Subsegmental atelectasis in the {side} lower lobe{s}.",
        "There is {side} basal atelectasis.",
    ),
    "Lung nodule": (
        "A {size} mm nodule in the {side} {lobe} lobe.",
        "Lung nodule is present: {size} mm in the {side} {lobe} lobe.",
        "There is a solid nodule measuring {size} mm in the {side} {lobe} lobe.",
    ),
    "Lung opacity": (
        "Lung opacity is present with ground-glass areas.",
        "Ground-glass lung opacity is seen in both lungs.",
        "There are patchy ground-glass lung opacities.",
    ),
    "Pulmonary fibrotic sequela": (
        "Pulmonary fibrotic sequela is present at the lung bases.",
        "Fibrotic sequela with subpleural reticular strands in the lower zones.",
        "There are fibrotic sequela changes in the lower lobes.",
    ),
    "Pleural effusion": (
        "{Side} pleural effusion{s} {is} present.",
        "There {is} {side} pleural effusion{s}.",
        "{Side} pleural effusion{s} with dependent fluid.",
    ),
    "Mosaic attenuation pattern": (
        "Mosaic attenuation pattern is present.",
        "There is a mosaic attenuation pattern in both lungs.",
        "Mosaic attenuation of the lung parenchyma.",
    ),
    "Peribronchial thickening": (
        "Peribronchial thickening is present.",
        "There is peribronchial thickening around the central airways.",
        "Peribronchial thickening of the bronchial walls.",
    ),
    "Consolidation": (
        "Consolidation is present in the {side} {lobe} lobe.",
        "There is consolidation with air bronchograms in the {side} {lobe} lobe.",
        "Lobar consolidation in the {side} {lobe} lobe.",
    ),
    "Bronchiectasis": (
        "Bronchiectasis is present in the {side} lower lobe{s}.",
        "There is cylindrical bronchiectasis in the {side} lower lobe{s}.",
        "Dilated airways consistent with bronchiectasis in the {side} lower lobe{s}.",
    ),
    "Interlobular septal thickening": (
        "Interlobular septal thickening is present.",
        "There is peripheral interlobular septal thickening.",
        "Smooth interlobular septal thickening in both lungs.",
    ),
}

NEGATIVE_PATTERNS = (
    "No {m}.",
    "{M} is not present.",
    "There is no {m}.",
    "No evidence of {m}.",
    "Negative for {m}.",
)
NEGATIVE_TERM: dict[str, str] = {
    "Medical material": "medical material",
    "Arterial wall calcification": "arterial wall calcification",
    "Cardiomegaly": "cardiomegaly",
    "Pericardial effusion": "pericardial effusion",
    "Coronary artery wall calcification": "coronary artery wall calcification",
    "Hiatal hernia": "hiatal hernia",
    "Lymphadenopathy": "lymphadenopathy",
    "Emphysema": "emphysema",
    "Atelectasis": "atelectasis",
    "Lung nodule": "lung nodule",
    "Lung opacity": "lung opacity",
    "Pulmonary fibrotic sequela": "fibrotic sequela",
    "Pleural effusion": "pleural effusion",
    "Mosaic attenuation pattern": "mosaic attenuation pattern",
    "Peribronchial thickening": "peribronchial thickening",
    "Consolidation": "consolidation",
    "Bronchiectasis": "bronchiectasis",
    "Interlobular septal thickening": "interlobular septal thickening",
}
IMPRESSION_TERM: dict[str, str] = {
    **NEGATIVE_TERM,
    "Lung nodule": "lung nodule",
    "Pleural effusion": "{side} pleural effusion{s}",
    "Consolidation": "{side} {lobe} lobe consolidation",
}
# Neutral statements that contradict none of the 18 labels.
FILLER = (
    "The trachea is midline and patent.",
    "There is no pneumothorax.",
    "The thyroid gland is unremarkable in the visualized portion.",
    "Degenerative changes of the thoracic spine.",
    "The visualized upper abdominal organs are unremarkable.",
    "The osseous structures are intact.",
    "Thoracic aortic diameter is within normal limits.",
)


def _fill(template: str, details: Mapping[str, Any]) -> str:
    side = details.get("side", "")
    plural = side == "bilateral"
    text = template.format(
        side=side,
        Side=side.capitalize(),
        s="s" if plural else "",
        lobe=details.get("lobe", ""),
        device=details.get("device", ""),
        size=details.get("size_mm", ""),
        **{"is": "are" if plural else "is"},
    )
    return text[0].upper() + text[1:]


def make_report(rng: np.random.Generator, labels: Mapping[str, int],
                findings: Mapping[str, Mapping[str, Any]]) -> str:
    """A findings + impression report for ``labels`` ({name: 0/1}).

    ``findings[name]`` holds the rendering's details for a positive label (side, lobe,
    device, size_mm). All positives are reported; each negative is stated with
    probability 0.5; 1-3 neutral filler sentences are mixed in; the order is shuffled.
    """
    sentences = []
    for name in CT_RATE_LABELS:
        if labels[name]:
            template = POSITIVE[name][rng.integers(len(POSITIVE[name]))]
            sentences.append(_fill(template, findings.get(name, {})))
        elif rng.random() < 0.5:
            pattern = NEGATIVE_PATTERNS[rng.integers(len(NEGATIVE_PATTERNS))]
            term = NEGATIVE_TERM[name]
            sentences.append(pattern.format(m=term, M=term[0].upper() + term[1:]))
    n_fill = int(rng.integers(1, 4))
    sentences += [FILLER[i] for i in rng.choice(len(FILLER), n_fill, replace=False)]
    order = rng.permutation(len(sentences))
    findings_text = " ".join(sentences[i] for i in order)

    positives = [n for n in CT_RATE_LABELS if labels[n]]
    if positives:
        terms = [_fill(IMPRESSION_TERM[n], findings.get(n, {})).lower() for n in positives]
        terms = [terms[i] for i in rng.permutation(len(terms))]
        impression = ", ".join(terms)
        impression = impression[0].upper() + impression[1:] + "."
    else:
        impression = ("No acute cardiopulmonary abnormality.", "Normal chest CT.",
                      "No significant thoracic abnormality.")[rng.integers(3)]
    return f"FINDINGS: {findings_text} IMPRESSION: {impression}"


# Section headers ("FINDINGS:", "Impression:") that are not part of any sentence.
SECTION_HEADER = r"\b(?:findings|impressions?|conclusions?|technique|comparison|history|indication)\s*:"


def split_sentences(report: str, *, on_commas: bool = True) -> list[str]:
    """Sentences of a report, section headers removed.

    A sentence ends at ".", "!" or "?" before white space, or at a line break. With
    ``on_commas`` (the default, for the synthetic reports' impression lists) ", " also
    splits, so every impression item is a sentence; the report labeler
    (``t3d_jax.evaluate.report_labeler``) keeps commas, so "no X, Y or Z" stays one list.
    """
    body = re.sub(SECTION_HEADER, " ", report, flags=re.IGNORECASE)
    parts = re.split(r"(?<=[.!?])\s+|\n+" + (r"|,\s+" if on_commas else ""), body)
    return [p.strip() for p in parts if p.strip()]


def mentions(report: str) -> dict[str, dict[str, bool]]:
    """For every label: whether the report asserts it and whether it negates it.

    Used by the tests to check report/label consistency; a sentence naming a label is
    a negation when it carries a negation cue (``NEGATION``).
    """
    out = {name: {"asserted": False, "negated": False} for name in CT_RATE_LABELS}
    for sentence in split_sentences(report):
        low = sentence.lower()
        negated = re.search(NEGATION, low) is not None
        for name in CT_RATE_LABELS:
            if re.search(MENTION[name], low):
                out[name]["negated" if negated else "asserted"] = True
    return out
