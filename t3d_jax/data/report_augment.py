"""Training-time augmentation of tokenized reports: drop and shuffle whole sentences.

Why: with a few thousand reports a from-scratch text tower memorises each report by its
incidental details (filler sentences, phrasings, order) and embeds short texts, such as the
zero-shot prompts, out of distribution. Seeing random subsets of each report's sentences in
random order makes every sentence's contribution count on its own and puts short texts in
the training distribution (sentence sampling, as CXR-CLIP and MedCLIP-style recipes do).

Works on the stored token ids ([CLS] tokens [SEP] padding): a sentence ends at a "." token
(`end_id`). Each sentence is kept with probability ``1 - drop`` (at least one is kept);
``shuffle`` permutes the kept ones. The result is re-packed as [CLS] kept [SEP] padding at
the same length, so batch shapes never change. Deterministic given the generator.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ReportAugment:
    drop: float = 0.0  # probability of dropping each sentence
    shuffle: bool = False  # permute the kept sentences
    end_id: int = -1  # token id of "." in the data's vocab; -1 = not resolved yet

    def __post_init__(self):
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"data.report_sentence_drop is a probability in [0, 1), got {self.drop}")

    @property
    def active(self) -> bool:
        return self.drop > 0 or self.shuffle


def sentences(tokens: np.ndarray, end_id: int) -> list[np.ndarray]:
    """``tokens`` (no special tokens) cut after every ``end_id``; a trailing piece without one
    is a sentence too."""
    cuts = np.flatnonzero(tokens == end_id) + 1
    return [s for s in np.split(tokens, cuts) if s.size]


def augment_report(input_ids: np.ndarray, attention_mask: np.ndarray, rng: np.random.Generator,
                   aug: ReportAugment) -> tuple[np.ndarray, np.ndarray]:
    """One report's (input_ids, attention_mask) with sentences dropped / shuffled (see module)."""
    if not aug.active:
        return input_ids, attention_mask
    if aug.end_id < 0:
        raise ValueError("ReportAugment.end_id is unset: resolve the '.' token id from the vocab first")
    n = int(attention_mask.sum())
    if n <= 2:
        return input_ids, attention_mask
    parts = sentences(np.asarray(input_ids[1:n - 1]), aug.end_id)
    keep = rng.random(len(parts)) >= aug.drop
    if not keep.any():
        keep[rng.integers(len(parts))] = True
    kept = [p for p, k in zip(parts, keep) if k]
    if aug.shuffle:
        kept = [kept[i] for i in rng.permutation(len(kept))]
    body = np.concatenate(kept)
    ids = np.zeros_like(input_ids)
    mask = np.zeros_like(attention_mask)
    ids[0], ids[1:1 + body.size], ids[1 + body.size] = input_ids[0], body, input_ids[n - 1]
    mask[:body.size + 2] = 1
    return ids, mask
