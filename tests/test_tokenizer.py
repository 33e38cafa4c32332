"""WordPiece tokenizer (tensorflow-text) vs Hugging Face `tokenizers` on the same vocab.

Reference: a `tokenizers.Tokenizer` assembled from BertNormalizer + BertPreTokenizer +
WordPiece with "[CLS] $A [SEP]", truncation to max_len and padding with id 0: the
tokenization every Hugging Face BERT checkpoint uses. Ids must be equal exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from t3d_jax.data import reports as R
from t3d_jax.data.labels import CT_RATE_LABELS
from t3d_jax.data.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer, build_vocab, read_vocab

LONG_REPORT = " ".join(["Long report sentence about consolidation and atelectasis."] * 40)
CORPUS = [
    "FINDINGS: A 3.5 mm nodule in the right upper lobe. IMPRESSION: No acute abnormality.",
    "Bilateral pleural effusions (left > right); cardiothoracic ratio 0.62.",
    "Peribronchial thickening, bronchiectasis & mosaic-attenuation pattern!!",
    "CT dated 2023-04-05 at 10:30, series #4, image 123/456; 1.25mm slices.",
    "Café, naïve, résumé, Ångström, Zürich, São Paulo, façade, Ærø, İstanbul",
    "中文报告：右肺上叶结节。日本語のレポート。한국어 보고서",
    "Emojis 😀🫁❤️ and symbols ± ° µ × ÷ → ≥ ≤ ~ ^ ` | \\ / @ $ % *",
    "",
    "   ",
    "UPPERCASE REPORT WITH MIXED Case and CamelCaseWords",
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 3,
    "x" * 100,
    "x" * 101,
    "é" * 60,
    "tab\tseparated\nnew line\r\ncarriage\u00a0nbsp\u200bzero-width\x00nul\x07bell",
    "quotes “curly” ‘single’ «guillemets» — em dash – en dash … ellipsis",
    "numbers 1,000,000 and 3.14159 and 1e-5 and -42 and 2^10",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ and ﬁ ligature",
    LONG_REPORT,
    "a±b 5°C x→y 3.5mm×4mm",
    "é" * 101,
    "x" * 100 + " " + "y" * 101 + " ok",
    "ab" * 60 + "é",
    "İstanbul ǅ ﬀ ß",
    "a\x1cb\x1fc\x0bd\x0ce\x85f\ufeffg\u00adh\u2028i\u3000j",
    "[CLS] [UNK] [MASK] ## #hashtag",
    "\ufffd\ufffd",
]


def hf_reference(vocab_path, lowercase: bool, max_len: int):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {t: i for i, t in enumerate(read_vocab(vocab_path))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(length=max_len, pad_id=0, pad_token="[PAD]")
    return tok


def hf_encode(tok, texts):
    enc = tok.encode_batch(texts)
    return (np.array([e.ids for e in enc], np.int32), np.array([e.attention_mask for e in enc], np.int32))


@pytest.fixture(scope="module")
def bert_tok(bert_vocab):
    return WordPieceTokenizer(bert_vocab, lowercase=True, max_len=128)


@pytest.fixture(scope="module")
def synthetic_reports():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(150):
        labels = {n: int(rng.random() < 0.3) for n in CT_RATE_LABELS}
        findings = {"Pleural effusion": {"side": "left"}, "Atelectasis": {"side": "bilateral"},
                    "Bronchiectasis": {"side": "right"},
                    "Lung nodule": {"side": "right", "lobe": "upper", "size_mm": int(rng.integers(8, 20))},
                    "Consolidation": {"side": "left", "lobe": "lower"},
                    "Medical material": {"device": "median sternotomy wires"}}
        out.append(R.make_report(rng, labels, findings))
    return out


@pytest.mark.parametrize("max_len,backend", [(128, "tensorflow"), (16, "tensorflow"), (128, "tokenizers")])
def test_parity_with_hf_tokenizers_bert_uncased_vocab(bert_tok, bert_vocab, max_len, backend):
    """Both backends against the reference pipeline (the tokenizers backend normalizes with
    bert_normalize and runs no HF normalizer, so this also checks the two normalizations agree)."""
    tok = (bert_tok if (max_len, backend) == (128, "tensorflow")
           else WordPieceTokenizer(bert_vocab, lowercase=True, max_len=max_len, backend=backend))
    ids, mask = tok.encode(CORPUS)
    ref_ids, ref_mask = hf_encode(hf_reference(bert_vocab, True, max_len), CORPUS)
    for i, text in enumerate(CORPUS):
        np.testing.assert_array_equal(ids[i], ref_ids[i], err_msg=f"text {i}: {text[:60]!r}")
    np.testing.assert_array_equal(mask, ref_mask)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (len(CORPUS), max_len)


def test_layout_truncation_and_padding(bert_tok):
    vocab = bert_tok.vocab
    ids, mask = bert_tok.encode(["", "No pleural effusion.", LONG_REPORT])
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    assert bert_tok.vocab_size == 30522 and vocab[0] == "[PAD]"
    np.testing.assert_array_equal(ids[0, :3], [cls, sep, 0])
    assert mask[0].sum() == 2
    n = int(mask[1].sum())
    assert ids[1, 0] == cls and ids[1, n - 1] == sep and np.all(ids[1, n:] == 0) and np.all(mask[1, :n] == 1)
    assert bert_tok.decode(ids[1]) == "no pleural effusion ."
    assert mask[2].sum() == 128 and ids[2, -1] == sep  # truncated text keeps [SEP]


def test_cased_keeps_case(bert_vocab):
    # bert-base-uncased has no capitalised words, so cased tokenization of "Heart" is [UNK].
    ids, _ = WordPieceTokenizer(bert_vocab, lowercase=False, max_len=8).encode(["Heart heart"])
    vocab = read_vocab(bert_vocab)
    assert ids[0, 1] == vocab.index("[UNK]") and ids[0, 2] == vocab.index("heart")


@pytest.mark.parametrize("lowercase", [True, False])
def test_build_vocab_and_parity(tmp_path, synthetic_reports, lowercase):
    texts = synthetic_reports + ["Ångström café RÉSUMÉ", "Heart SIZE normal"]
    path = build_vocab(texts, vocab_size=600, out_path=tmp_path / "vocab.txt", lowercase=lowercase,
                       min_frequency=1)
    tokens = read_vocab(path)
    assert tuple(tokens[:5]) == SPECIAL_TOKENS and len(tokens) <= 600
    assert ("Cardiomegaly" in tokens) != lowercase  # case kept only when cased
    tok = WordPieceTokenizer(path, lowercase=lowercase, max_len=64)
    corpus = synthetic_reports[:40] + CORPUS
    ids, mask = tok.encode(corpus)
    ref_ids, ref_mask = hf_encode(hf_reference(path, lowercase, 64), corpus)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    hf_ids, _ = WordPieceTokenizer(path, lowercase=lowercase, max_len=64, backend="tokenizers").encode(corpus)
    np.testing.assert_array_equal(hf_ids, ref_ids)  # the other backend, cased and uncased
    unk = tokens.index("[UNK]")
    assert (ids[:40] == unk).sum() == 0  # reports seen in training need no [UNK]


def test_build_vocab_cli_reads_jsonl_and_csv(tmp_path, synthetic_reports):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "launch"))
    import build_vocab as cli

    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": f"a{i}", "volume": "x.nii.gz", "report": r})
                               for i, r in enumerate(synthetic_reports)) + "\n", encoding="utf-8")
    assert cli.main(["--manifest", str(jsonl), "--out", str(tmp_path / "v1.txt"), "--size", "400"]) == 0
    csv_path = tmp_path / "m.csv"
    import csv

    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "volume", "report"])
        w.writerows([[f"a{i}", "x.nii.gz", r] for i, r in enumerate(synthetic_reports)])
    assert cli.main(["--manifest", str(csv_path), "--out", str(tmp_path / "v2.txt"), "--size", "400",
                     "--cased"]) == 0
    v1, v2 = read_vocab(tmp_path / "v1.txt"), read_vocab(tmp_path / "v2.txt")
    assert "findings" in v1 and "FINDINGS" not in v1 and "FINDINGS" in v2


def test_bad_inputs(tmp_path, bert_tok):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        WordPieceTokenizer(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt.*token 0"):
        WordPieceTokenizer(bad)
    bad.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks special tokens \['\[CLS\]', '\[SEP\]'\]"):
        WordPieceTokenizer(bad)
    with pytest.raises(TypeError, match="list of strings"):
        bert_tok.encode("a single string")
    with pytest.raises(TypeError, match="text 1 is int"):
        bert_tok.encode(["ok", 3])
    with pytest.raises(ValueError, match="max_len"):
        WordPieceTokenizer(tmp_path / "missing.txt", max_len=1)


def test_impression_first_moves_the_section_and_nothing_else(bert_vocab):
    from t3d_jax.data.tokenizer import order_sections

    report = "FINDINGS: No pleural effusion. Cardiomegaly is present. IMPRESSION: Cardiomegaly."
    moved = order_sections(report, "impression_first")
    assert moved == "IMPRESSION: Cardiomegaly. FINDINGS: No pleural effusion. Cardiomegaly is present."
    assert order_sections(report, "as_written") == report
    # The section ends at the next capitals header; lower-case headers are found; no header: unchanged.
    three = "Findings: a. Impression: b. COMPARISON: none."
    assert order_sections(three, "impression_first") == "Impression: b. Findings: a. COMPARISON: none."
    assert order_sections("No header here.", "impression_first") == "No header here."
    assert order_sections("IMPRESSION: first already. FINDINGS: x.", "impression_first").startswith("IMPRESSION")
    with pytest.raises(ValueError, match="report order"):
        order_sections(report, "impression_last")
    # The tokenizer applies it before cutting: at 8 tokens the impression survives.
    tok = WordPieceTokenizer(str(bert_vocab), max_len=8, report_order="impression_first")
    assert tok.decode(tok.encode([report])[0][0]) == "impression : cardiomegaly"
    plain = WordPieceTokenizer(str(bert_vocab), max_len=8)
    assert "cardiomegaly" not in plain.decode(plain.encode([report])[0][0])


def test_auto_backend_falls_back_to_tokenizers_without_tensorflow_text(bert_vocab, monkeypatch):
    from t3d_jax.data import tokenizer as tokenizer_lib

    monkeypatch.setattr(tokenizer_lib, "_tensorflow_text_available", lambda: False)
    tok = WordPieceTokenizer(bert_vocab, lowercase=True, max_len=32)
    ids, _ = tok.encode(CORPUS[:5])
    assert tok._tf is None  # TensorFlow was never imported for this tokenizer
    ref_ids, _ = hf_encode(hf_reference(bert_vocab, True, 32), CORPUS[:5])
    np.testing.assert_array_equal(ids, ref_ids)
    with pytest.raises(ValueError, match="backend"):
        WordPieceTokenizer(bert_vocab, backend="sentencepiece")
