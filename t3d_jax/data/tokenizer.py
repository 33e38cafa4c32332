"""WordPiece tokenization of reports (tensorflow-text or Hugging Face ``tokenizers``), and
building a vocab.txt.

Reports are tokenized once, at preprocessing time (launch/prepare_data.py), so
TensorFlow never enters the training loop or Grain workers. TensorFlow is imported
lazily, the first time :meth:`WordPieceTokenizer.encode` runs, with GPUs hidden from it
(``tf.config.set_visible_devices([], "GPU")``) so it never claims accelerator memory
that JAX needs; importing this module costs nothing.

Two backends give the same ids (tests/test_tokenizer.py runs the corpus through both):
``tensorflow`` (tensorflow-text's FastBertTokenizer, the default where it is installed) and
``tokenizers`` (Hugging Face's WordPiece, a pinned dependency anyway, for machines where
TensorFlow is not installed: GPU images often lack it). ``backend="auto"`` takes the first
that imports.

Token ids match Hugging Face ``tokenizers`` (BertNormalizer + BertPreTokenizer +
WordPiece, [CLS] ... [SEP], truncation to ``max_len`` keeping [SEP]) on the same
vocab; tests/test_tokenizer.py checks this on a varied corpus.

Prompts and free texts at evaluation and export time use :func:`tokenizer_for_config`: the
tokenizer the run's data was prepared with.
"""

from __future__ import annotations

import os
import pathlib
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

from t3d_jax.utils import cfg_get

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_CHARS_PER_WORD = 100  # longer words become [UNK], as in BERT and HF tokenizers


def read_vocab(vocab_path) -> list[str]:
    """Lines of a vocab.txt (one token per line), checked for BERT's special tokens."""
    path = pathlib.Path(vocab_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: vocab file not found")
    try:
        tokens = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: vocab is not UTF-8 text ({err})") from None
    if not tokens:
        raise ValueError(f"{path}: vocab is empty")
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in tokens]
    if missing:
        raise ValueError(f"{path}: vocab lacks special tokens {missing}")
    if tokens[0] != "[PAD]":
        raise ValueError(f"{path}: [PAD] must be token 0 (ids are 0-padded), found {tokens[0]!r}")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{path}: vocab has duplicate tokens")
    return tokens


def _is_cjk(cp: int) -> bool:
    """CJK Unified Ideographs blocks that BERT splits into single characters."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


# Unicode White_Space characters that survive control-character removal.
_WHITESPACE = frozenset("\t\n\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                        "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def bert_normalize(text: str, lowercase: bool) -> str:
    """BERT's text normalization, exactly as Hugging Face's BertNormalizer does it.

    Drops NUL, U+FFFD and other control/format characters (Unicode category C*, except
    tab/newline/carriage return), maps whitespace to ' ', surrounds CJK ideographs with
    spaces, and when ``lowercase``: strips accents (NFD, drop non-spacing marks) and
    lowercases. Done here rather than by tensorflow-text's fast normalizer because that
    one also applies NFKC (full-width letters, ligatures, '…' -> '...'), which BERT
    checkpoints never saw.
    """
    out = []
    for ch in text:
        if ch in _WHITESPACE:
            out.append(" ")
            continue
        if ch == "\ufffd" or unicodedata.category(ch).startswith("C"):
            continue
        out.append(f" {ch} " if _is_cjk(ord(ch)) else ch)
    text = "".join(out)
    if lowercase:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        text = text.lower()
    return text


REPORT_ORDERS = ("as_written", "impression_first")
# A section header: "IMPRESSION:" / "Impressions:" / "CONCLUSION:" (case-insensitive), and the
# header that ends it (any other "WORD(S):" in capitals, e.g. "FINDINGS:", "COMPARISON:").
_IMPRESSION = re.compile(r"\b(?:impressions?|conclusions?)\s*:", re.IGNORECASE)
_NEXT_HEADER = re.compile(r"\b[A-Z][A-Z ]{2,}:")


def order_sections(text: str, order: str = "as_written") -> str:
    """``text`` with its impression section moved to the front (``order="impression_first"``).

    Why: the impression lists the positive findings in a few tokens; truncating a report at
    ``max_len`` then cuts the findings section's detail (and its negations) instead of the
    conclusions. A report without an "IMPRESSION:" / "CONCLUSION:" header is unchanged; the
    section runs to the next all-capitals header ("FINDINGS:") or the end.
    """
    if order == "as_written":
        return text
    if order != "impression_first":
        raise ValueError(f"report order must be one of {REPORT_ORDERS}, got {order!r}")
    m = _IMPRESSION.search(text)
    if m is None or m.start() == 0:
        return text
    end = _NEXT_HEADER.search(text, m.end())
    stop = end.start() if end else len(text)
    pieces = (text[m.start():stop], text[:m.start()], text[stop:])
    return " ".join(p.strip() for p in pieces if p.strip())


BACKENDS = ("auto", "tensorflow", "tokenizers")


def _tensorflow_text_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow_text") is not None


class WordPieceTokenizer:
    """BERT WordPiece tokenizer over a standard ``vocab.txt``.

    ``lowercase=True`` is BERT-uncased normalization (lowercase + NFD accent
    stripping); ``False`` keeps case and accents (BERT-cased). ``encode`` returns
    ``input_ids`` and ``attention_mask``, int32 [B, max_len]: [CLS] tokens [SEP], then
    0 ([PAD]); texts that are too long lose their last tokens, never the [SEP].
    ``report_order`` (`order_sections`) is applied to every text first, so reports tokenized
    for training and for export agree; prompts have no section header and are unchanged.
    """

    def __init__(self, vocab_path, lowercase: bool = True, max_len: int = 128, report_order: str = "as_written",
                 backend: str = "auto"):
        order_sections("", report_order)  # checks the name
        if backend not in BACKENDS:
            raise ValueError(f"tokenizer backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.report_order = str(report_order)
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        self.vocab_path = str(vocab_path)
        self.vocab = read_vocab(vocab_path)
        self.lowercase = bool(lowercase)
        self.max_len = int(max_len)
        index = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.unk_id = index["[PAD]"], index["[UNK]"]
        self.cls_id, self.sep_id = index["[CLS]"], index["[SEP]"]
        self._is_suffix = [t.startswith("##") for t in self.vocab]
        self._tf = None
        self._tokenizer = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _build(self):
        backend = self.backend
        if backend == "auto":
            backend = "tensorflow" if _tensorflow_text_available() else "tokenizers"
        if backend == "tokenizers":
            self._build_hf()
        else:
            self._build_tf()

    def _build_hf(self):
        """Hugging Face WordPiece on the text `bert_normalize` already normalized (no normalizer
        of its own): BERT's pre-tokenizer, words over 100 characters -> [UNK], as BERT."""
        from tokenizers import Tokenizer, pre_tokenizers
        from tokenizers.models import WordPiece

        model = WordPiece({t: i for i, t in enumerate(self.vocab)}, unk_token="[UNK]",
                          max_input_chars_per_word=MAX_CHARS_PER_WORD)
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tokenizer = tok

    def _build_tf(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
        import tensorflow_text as tf_text

        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF already initialised its devices elsewhere in this process
            pass
        self._tf = tf
        self._tokenizer = tf_text.FastBertTokenizer(
            vocab=self.vocab, suffix_indicator="##", max_bytes_per_word=4 * MAX_CHARS_PER_WORD,
            token_out_type=tf.int32, unknown_token="[UNK]", no_pretokenization=False,
            support_detokenization=False, lower_case_nfd_strip_accents=False)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids of each text, without special tokens or truncation."""
        texts = self._check(texts)
        if not texts:
            return []
        if self._tokenizer is None:
            self._build()
        normalized = [bert_normalize(order_sections(t, self.report_order), self.lowercase) for t in texts]
        if self._tf is None:  # the tokenizers backend
            return [e.ids for e in self._tokenizer.encode_batch(normalized, add_special_tokens=False)]
        ragged, starts, ends = self._tokenizer.tokenize_with_offsets(
            self._tf.constant(normalized, dtype=self._tf.string))
        splits = ragged.row_splits.numpy()
        flat = ragged.flat_values.numpy()
        rows = [flat[splits[i]:splits[i + 1]].tolist() for i in range(len(texts))]
        starts, ends = starts.flat_values.numpy(), ends.flat_values.numpy()
        for i, text in enumerate(normalized):
            if any(len(w) > MAX_CHARS_PER_WORD for w in text.split(" ")):
                span = slice(splits[i], splits[i + 1])
                rows[i] = self._unk_long_words(text, rows[i], starts[span], ends[span])
        return rows

    def _unk_long_words(self, text, ids, starts, ends):
        """Replaces the pieces of every word longer than 100 characters by one [UNK].

        tensorflow-text limits words in bytes (set to 4 x 100 here, so no word of <= 100
        characters is cut); BERT and HF tokenizers limit them in characters.
        """
        data = text.encode("utf-8")
        words: list[list[int]] = []  # [first piece, last piece] per word
        for k, tok in enumerate(ids):
            if words and self._is_suffix[tok]:
                words[-1][1] = k
            else:
                words.append([k, k])
        out: list[int] = []
        for first, last in words:
            n_chars = len(data[starts[first]:ends[last]].decode("utf-8", "replace"))
            out += [self.unk_id] if n_chars > MAX_CHARS_PER_WORD else ids[first:last + 1]
        return out

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int32 [len(texts), max_len]."""
        rows = self.tokenize(texts)
        ids = np.zeros((len(rows), self.max_len), np.int32)
        mask = np.zeros((len(rows), self.max_len), np.int32)
        keep = self.max_len - 2
        for i, toks in enumerate(rows):
            seq = [self.cls_id, *toks[:keep], self.sep_id]
            ids[i, :len(seq)] = seq
            mask[i, :len(seq)] = 1
        return ids, mask

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Readable text of ids: '##' pieces joined to the previous token."""
        words: list[str] = []
        for i in ids:
            tok = self.vocab[int(i)]
            if skip_special and tok in SPECIAL_TOKENS:
                continue
            if tok.startswith("##") and words:
                words[-1] += tok[2:]
            else:
                words.append(tok)
        return " ".join(words)

    @staticmethod
    def _check(texts) -> list[str]:
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode expects a list of strings, got a single string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is {type(t).__name__}, expected str")
        return texts


def tokenizer_for_config(config, tokenizer_info: dict | None = None) -> WordPieceTokenizer:
    """The tokenizer the run's data was prepared with, for prompts and free text.

    Evaluation prompts and exported texts must be tokenized as the reports the model saw.
    Vocab, lower-casing, length and report order come from ``dataset.json``'s ``tokenizer`` entry
    (``tokenizer_info``, read from ``config.data.dir`` when not given), else from
    ``config.preprocess``, else the bundled bert-base-uncased vocab. A vocab path recorded
    in dataset.json that is not on this machine falls back the same way.
    """
    from t3d_jax.data import shards
    from t3d_jax.data.prepare import default_vocab_path

    data_dir = cfg_get(cfg_get(config, "data"), "dir", "")
    if tokenizer_info is None and shards.has_dataset(data_dir):
        tokenizer_info = shards.read_dataset_json(data_dir).get("tokenizer")
    info = dict(tokenizer_info or {})
    pre = cfg_get(config, "preprocess")
    vocab = info.get("vocab") if info.get("vocab") and pathlib.Path(info["vocab"]).is_file() else None
    vocab = vocab or cfg_get(pre, "vocab", "") or str(default_vocab_path())
    lowercase = bool(info.get("lowercase", cfg_get(pre, "lowercase", True)))
    max_len = int(info.get("max_len", cfg_get(pre, "max_len", 128)))
    # Data prepared before report_order was recorded was tokenized as written.
    order = info.get("report_order", "as_written" if info else cfg_get(pre, "report_order", "as_written"))
    return WordPieceTokenizer(vocab, lowercase=lowercase, max_len=max_len, report_order=order)


def build_vocab(texts: Iterable[str], vocab_size: int, out_path, lowercase: bool = True,
                min_frequency: int = 2) -> pathlib.Path:
    """Learns a WordPiece vocab.txt from ``texts`` with Hugging Face ``tokenizers``.

    Normalization and pre-tokenization are BERT's (same ``lowercase`` switch as
    :class:`WordPieceTokenizer`), so the vocab fits the tokenizer that will use it.
    Ids 0-4 are [PAD], [UNK], [CLS], [SEP], [MASK].
    """
    from tokenizers import BertWordPieceTokenizer

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("build_vocab: no non-empty texts to learn a vocab from")
    tok = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True,
                                 strip_accents=None if lowercase else False, lowercase=lowercase)
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=list(SPECIAL_TOKENS), limit_alphabet=1000,
                            wordpieces_prefix="##", show_progress=False)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    if tokens[:len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
        raise RuntimeError(f"unexpected special-token layout {tokens[:5]}")
    out = pathlib.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out
