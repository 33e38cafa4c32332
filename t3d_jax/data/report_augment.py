"""Training-time augmentation of tokenized reports: drop and shuffle whole sentences; and the
report's impression section alone (`impression_span`, `data.impression_view`).

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


# -- The impression view ---------------------------------------------------------------------
# Section headers, as WordPiece tokens: a header word followed by ":" (t3d_jax.data.tokenizer's
# order_sections and t3d_jax.data.reports' SECTION_HEADER name the same sections).
IMPRESSION_WORDS = ("impression", "impressions", "conclusion", "conclusions")
OTHER_HEADER_WORDS = ("findings", "finding", "comparison", "technique", "history", "indication")


@dataclasses.dataclass(frozen=True)
class ImpressionView:
    """Token ids of the header words and ":" in the data's vocab (``impression_view_for_vocab``)."""

    start_ids: tuple[int, ...]  # "impression", "conclusion", ... (lower-cased vocab)
    stop_ids: tuple[int, ...]  # "findings", "comparison", ...
    colon_id: int
    length: int = 0  # data.impression_len: the view's padded length (0 = the reports' max_len)


def impression_view_for_vocab(vocab, length: int = 0) -> ImpressionView:
    """The header ids of a WordPiece vocab (a list of tokens); a clear error if it lacks them."""
    index = {t: i for i, t in enumerate(vocab)}
    if ":" not in index or not any(w in index for w in IMPRESSION_WORDS):
        raise ValueError("data.impression_view needs ':' and 'impression' in the data's vocab (an uncased "
                         "WordPiece vocab has both)")
    return ImpressionView(tuple(index[w] for w in IMPRESSION_WORDS if w in index),
                          tuple(index[w] for w in OTHER_HEADER_WORDS if w in index), index[":"], int(length))


def impression_span(input_ids: np.ndarray, attention_mask: np.ndarray, view: ImpressionView,
                    length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The report's impression section alone, re-packed as [CLS] IMPRESSION : ... [SEP] padded
    to ``length`` (0 = the report's length): from the first "impression:" (or "conclusion:")
    header to the next other header ("findings:", ...) or the end. A report without one is its
    own impression view. A view longer than ``length`` is an error, never cut."""
    size = int(length) or input_ids.shape[-1]
    n = int(attention_mask.sum())
    if n < 2:
        raise ValueError(f"a tokenized report of {n} tokens has no [CLS] ... [SEP]")
    body = np.asarray(input_ids[1:n - 1])
    header = np.flatnonzero(np.isin(body[:-1], view.start_ids) & (body[1:] == view.colon_id))
    if header.size:
        start = int(header[0])
        after = np.flatnonzero(np.isin(body[start + 2:-1], view.stop_ids) & (body[start + 3:] == view.colon_id))
        body = body[start:start + 2 + int(after[0]) if after.size else body.size]
    if body.size + 2 > size:
        raise ValueError(f"an impression view of {body.size + 2} tokens does not fit data.impression_len={size}: "
                         "raise it (0 = the reports' max_len always fits)")
    ids = np.zeros(size, input_ids.dtype)
    mask = np.zeros(size, attention_mask.dtype)
    ids[0], ids[1:1 + body.size], ids[1 + body.size] = input_ids[0], body, input_ids[n - 1]
    mask[:body.size + 2] = 1
    return ids, mask
