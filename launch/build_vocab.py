r"""Builds a WordPiece vocab.txt from the reports of a manifest (for users who have none).

  python launch/build_vocab.py --manifest data/manifest.csv --out data/vocab.txt --size 8000 [--cased]

Reads the ``report`` column of a CSV or JSONL manifest (rows with an unusable report are
skipped and counted). Uncased (BERT-uncased normalization) unless --cased; pass the same
choice to prepare_data (config.preprocess.lowercase). Ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK].
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from t3d_jax.data.manifest import read_manifest  # noqa: E402
from t3d_jax.data.tokenizer import build_vocab  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="CSV or JSONL manifest with a report column")
    parser.add_argument("--out", required=True, help="vocab.txt to write")
    parser.add_argument("--size", type=int, default=8000, help="target vocab size")
    parser.add_argument("--cased", action="store_true", help="keep case and accents (BERT-cased)")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merged piece")
    args = parser.parse_args(argv)
    rows, _ = read_manifest(args.manifest)
    reports = [r.report for r in rows if r.report]
    skipped = len(rows) - len(reports)
    if not reports:
        parser.error(f"{args.manifest}: no usable reports ({len(rows)} rows)")
    out = build_vocab(reports, args.size, args.out, lowercase=not args.cased,
                      min_frequency=args.min_frequency)
    size = sum(1 for _ in open(out, encoding="utf-8"))
    print(f"read {len(rows)} rows ({skipped} without a usable report); wrote {size} tokens to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
