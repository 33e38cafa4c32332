"""Report augmentation (t3d_jax/data/report_augment.py): sentences dropped and shuffled on the
stored token ids, re-packed at the same length; an independent reference re-splits the text."""

from __future__ import annotations

import numpy as np
import pytest

from t3d_jax.data.report_augment import ReportAugment, augment_report, sentences

CLS, SEP, DOT = 101, 102, 1012
MAX_LEN = 24


def _report(sentence_lengths, start=2000):
    """[CLS] s1 . s2 . ... [SEP] 0...: sentence k's words are start + 100 k + i."""
    body = []
    for k, n in enumerate(sentence_lengths):
        body += [start + 100 * k + i for i in range(n)] + [DOT]
    ids = np.zeros(MAX_LEN, np.int32)
    ids[:len(body) + 2] = [CLS, *body, SEP]
    return ids, (ids > 0).astype(np.int32)


def _sentences_of(ids, mask):
    n = int(mask.sum())
    assert ids[0] == CLS and ids[n - 1] == SEP and not ids[n:].any() and mask[:n].all() and not mask[n:].any()
    return [tuple(s) for s in sentences(ids[1:n - 1], DOT)]


def test_sentences_split_after_each_end_token():
    assert [list(s) for s in sentences(np.array([5, 6, DOT, 7, DOT, 8]), DOT)] == [[5, 6, DOT], [7, DOT], [8]]


def test_shuffle_permutes_whole_sentences_and_keeps_every_token():
    ids, mask = _report([3, 1, 4, 2])
    original = _sentences_of(ids, mask)
    aug = ReportAugment(shuffle=True, end_id=DOT)
    orders = set()
    for seed in range(20):
        out_ids, out_mask = augment_report(ids, mask, np.random.default_rng(seed), aug)
        got = _sentences_of(out_ids, out_mask)
        assert sorted(got) == sorted(original) and out_ids.shape == ids.shape
        orders.add(tuple(got))
    assert len(orders) > 5  # 24 orders possible


def test_drop_keeps_an_ordered_subset_and_at_least_one_sentence():
    ids, mask = _report([2, 2, 2, 2, 2])
    original = _sentences_of(ids, mask)
    aug = ReportAugment(drop=0.5, end_id=DOT)
    counts = []
    for seed in range(200):
        got = _sentences_of(*augment_report(ids, mask, np.random.default_rng(seed), aug))
        assert 1 <= len(got) and [original.index(s) for s in got] == sorted(original.index(s) for s in got)
        counts.append(len(got))
    # Binomial(5, 0.5) kept, with 0 replaced by 1: mean 2.5 + 1/32; 200 draws, +-0.3 is > 4 sd.
    assert abs(np.mean(counts) - (2.5 + 1 / 32)) < 0.3
    # The same generator state gives the same report (the pipeline keys it by seed and index).
    a = augment_report(ids, mask, np.random.default_rng(7), aug)
    b = augment_report(ids, mask, np.random.default_rng(7), aug)
    np.testing.assert_array_equal(a[0], b[0])


def test_inactive_and_bad_settings():
    ids, mask = _report([2, 2])
    out = augment_report(ids, mask, np.random.default_rng(0), ReportAugment())
    assert out[0] is ids and out[1] is mask
    with pytest.raises(ValueError, match="probability"):
        ReportAugment(drop=1.0)
    with pytest.raises(ValueError, match="end_id"):
        augment_report(ids, mask, np.random.default_rng(0), ReportAugment(drop=0.2))


# -- The impression view (data.impression_view) ------------------------------------------------

def _tokenizer(order):
    from t3d_jax.data.prepare import default_vocab_path
    from t3d_jax.data.tokenizer import WordPieceTokenizer

    return WordPieceTokenizer(str(default_vocab_path()), lowercase=True, max_len=64, report_order=order,
                              backend="tokenizers")


@pytest.mark.parametrize("order", ["as_written", "impression_first"])
def test_impression_span_is_the_impression_section_tokenized_alone(order):
    """On the real WordPiece vocab: the span of a tokenized report equals the impression
    tokenized on its own, whether the impression comes first or last; a report with no
    impression header is left whole."""
    from t3d_jax.data.report_augment import impression_span, impression_view_for_vocab

    tok = _tokenizer(order)
    view = impression_view_for_vocab(tok.vocab)
    report = ("FINDINGS: No pleural effusion. The heart is enlarged. "
              "IMPRESSION: Cardiomegaly, left pleural effusion. COMPARISON: None.")
    ids, mask = (np.asarray(a)[0] for a in tok.encode([report]))
    got_ids, got_mask = impression_span(ids, mask, view)
    want_ids, want_mask = (np.asarray(a)[0] for a in tok.encode(["IMPRESSION: Cardiomegaly, left pleural effusion."]))
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_mask, want_mask)
    short_ids, short_mask = impression_span(ids, mask, view, length=int(want_mask.sum()))
    np.testing.assert_array_equal(short_ids, want_ids[:int(want_mask.sum())])  # data.impression_len: padded there
    assert short_mask.all()
    with pytest.raises(ValueError, match="impression_len"):  # too long for it: an error, never cut
        impression_span(ids, mask, view, length=int(want_mask.sum()) - 1)
    plain_ids, plain_mask = (np.asarray(a)[0] for a in tok.encode(["No pleural effusion. Normal heart."]))
    same = impression_span(plain_ids, plain_mask, view)
    np.testing.assert_array_equal(same[0], plain_ids)
    np.testing.assert_array_equal(same[1], plain_mask)


def test_impression_view_needs_the_header_tokens():
    from t3d_jax.data.report_augment import impression_view_for_vocab

    with pytest.raises(ValueError, match="impression"):
        impression_view_for_vocab(["[PAD]", "[CLS]", "[SEP]", "findings", "."])
