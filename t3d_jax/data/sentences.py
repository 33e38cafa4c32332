"""Each report token's sentence and word, from the token ids alone (the `mg3d` task's batch).

MG-3D works on reports as sentences (at most 32; a report is split at full stops and commas)
and masks whole words. Both indices are computed here, in the input pipeline, with NumPy from
the vocabulary ids, after the report augmentation (`data.report_sentence_drop` /
`data.report_shuffle` reorder the sentences, so indices stored at preparation time would no
longer match the tokens). The jitted step then needs no text processing, and data prepared
before this task existed need not be prepared again.

Rules (the same cuts as `t3d_jax.data.reports.split_sentences`, which cuts the text at "." and
"," followed by a space and drops the FINDINGS: / IMPRESSION: headers):

* A sentence ends after a "." or "," token (the mark stays in its sentence; split_sentences
  drops a comma, the only difference), unless that token sits between two digit tokens
  ("3.5", "1,000": the tokenizer splits those, and the text had no space after the mark).
* A single-token word followed by ":" at the start of a sentence is a section header
  ("findings :", "impression :"): both tokens get sentence -1, as [CLS], [SEP] and padding do.
* Sentences are numbered from 0 in reading order; tokens of sentences past `max_sentences`
  get -1 (they are not pooled). Empty sentences (".," in a row) are not numbered.

Word index: a WordPiece continuation token ("##...") belongs to the word of the token before
it; every other real token starts a new word; special tokens and padding get -1. Words are
numbered from 0 in each report.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BOUNDARIES = (".", ",")
HEADER_MARK = ":"
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_SENTENCES = 32  # MG-3D's cap


@dataclasses.dataclass(frozen=True)
class SentenceIndexer:
    """Vocabulary facts the two indices need; `from_vocab` builds it from the token list."""

    boundary_ids: tuple[int, ...]
    colon_id: int
    is_digit: np.ndarray  # [V] bool: the token is all digits
    is_continuation: np.ndarray  # [V] bool: "##..." tokens
    is_special: np.ndarray  # [V] bool
    max_sentences: int = MAX_SENTENCES

    @classmethod
    def from_vocab(cls, vocab: list[str], max_sentences: int = MAX_SENTENCES, where: str = "the vocab"):
        missing = [t for t in (*BOUNDARIES, HEADER_MARK) if t not in vocab]
        if missing:
            raise ValueError(f"{where}: no token for {missing}; sentence indices need '.', ',' and ':'")
        if not 1 <= max_sentences:
            raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
        return cls(boundary_ids=tuple(vocab.index(t) for t in BOUNDARIES), colon_id=vocab.index(HEADER_MARK),
                   is_digit=np.array([t.isdigit() for t in vocab]),
                   is_continuation=np.array([t.startswith("##") for t in vocab]),
                   is_special=np.array([t in SPECIAL and t != "[UNK]" for t in vocab]),
                   max_sentences=int(max_sentences))

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """One report's ``sentence_index`` and ``word_index``, int32 [L] each (-1 = none)."""
        ids = np.asarray(input_ids, np.int64)
        real = (np.asarray(attention_mask) > 0) & ~self.is_special[ids]
        n = ids.size
        sentence = np.full(n, -1, np.int32)
        count, start, i = 0, True, 0
        while i < n:
            if not real[i]:
                i += 1
                continue
            if start and i + 1 < n and real[i + 1] and ids[i + 1] == self.colon_id \
                    and ids[i] not in self.boundary_ids:
                i += 2  # a section header: "findings :"
                continue
            if ids[i] in self.boundary_ids and start:
                i += 1  # a mark with nothing before it: no sentence
                continue
            if count < self.max_sentences:
                sentence[i] = count
            start = False
            if ids[i] in self.boundary_ids and not self._inside_number(ids, real, i):
                count += 1
                start = True
            i += 1
        word = np.full(n, -1, np.int32)
        starts = real & ~self.is_continuation[ids]
        # A continuation right after a special token or at the start still starts a word.
        first = np.flatnonzero(real)
        if first.size:
            starts[first[0]] = True
        words = np.cumsum(starts) - 1
        word[real] = words[real]
        return {"sentence_index": sentence, "word_index": word}

    def _inside_number(self, ids, real, i) -> bool:
        return (0 < i < ids.size - 1 and real[i - 1] and real[i + 1]
                and bool(self.is_digit[ids[i - 1]]) and bool(self.is_digit[ids[i + 1]]))


def indexer_for_data(data_dir: str, max_sentences: int = MAX_SENTENCES) -> SentenceIndexer:
    """The indexer of a prepared folder's vocabulary (its dataset.json names the vocab)."""
    from t3d_jax.data.tokenizer import tokenizer_for_config

    vocab = tokenizer_for_config({"data": {"dir": data_dir}}).vocab
    return SentenceIndexer.from_vocab(list(vocab), max_sentences, where=f"{data_dir}: the data's vocab")
