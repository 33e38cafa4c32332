r"""Manifest (CSV/JSONL) of CT volumes + reports -> ArrayRecord shards for training.

  python launch/prepare_data.py --manifest data/manifest.csv --out data/prepared --preset demo
  python launch/prepare_data.py --manifest M --out DIR --config=configs/t3d.py:base \
      [--vocab vocab.txt] [--lowercase | --cased] [--max-len 128] [--workers 8] [--shard-size 64]
      [--compression zstd:3] [--mask-classes classes.json] [--keep-slices]

Explicit flags win over the config (``config.preprocess``: preset, vocab, lowercase, max_len, report_order,
keep_slices (--keep-slices: every slice at the preset's z spacing, several series per row; the msvlm
encoder, ``configs/msvlm.py:VARIANT,slices`` sets it);
``config.data.label_names`` selects and orders the label columns). Without --config the
defaults of ``configs/t3d.py:demo`` apply. See docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the tokenizer's TensorFlow stays off GPUs
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_config(spec: str):
    """``path/to/config.py[:variant]`` -> its ConfigDict, read by ml_collections' config-file
    parser: the same loader as the --config flag of launch/train.py and launch/evaluate.py."""
    from ml_collections.config_flags import config_flags

    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise SystemExit(f"launch/prepare_data.py: --config: {path}: config file not found")
    try:
        return config_flags.ConfigFileFlagParser(name="config").parse(spec)
    except Exception as e:  # the config file's own error (e.g. an unknown variant), on one line
        last = str(e).strip().splitlines()[-1].split("Error: ", 1)[-1]
        raise SystemExit(f"launch/prepare_data.py: --config={spec}: {last}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="CSV or JSONL: id, volume, report[, split, labels...]")
    parser.add_argument("--out", required=True, help="output folder (shards, dataset.json, errors.jsonl)")
    parser.add_argument("--config", default=None, help="configs/t3d.py:VARIANT (default: configs/t3d.py:demo)")
    parser.add_argument("--preset", default=None, help="demo | ct_clip | ct_clip_320 | merlin | fvlm | hlip | m3d")
    parser.add_argument("--vocab", default=None, help="WordPiece vocab.txt (default: bundled bert-base-uncased)")
    case = parser.add_mutually_exclusive_group()
    case.add_argument("--lowercase", dest="lowercase", action="store_true", default=None)
    case.add_argument("--cased", dest="lowercase", action="store_false")
    parser.add_argument("--max-len", type=int, default=None, help="token ids per report")
    parser.add_argument("--report-order", default=None, choices=("as_written", "impression_first"),
                        help="impression_first: the IMPRESSION section first, so max_len cuts findings detail")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (0 = in process)")
    parser.add_argument("--shard-size", type=int, default=64, help="records per shard")
    from t3d_jax.data.shards import COMPRESSIONS, DEFAULT_COMPRESSION

    parser.add_argument("--compression", default=DEFAULT_COMPRESSION, choices=COMPRESSIONS,
                        help=f"record compression (default {DEFAULT_COMPRESSION}; docs/scaling.md measures them)")
    parser.add_argument("--label-names", default=None,
                        help="comma-separated label columns to keep, in order (default: config, else all)")
    parser.add_argument("--mask-classes", default=None,
                        help="class table of the manifest's masks (default: classes.json beside the manifest)")
    parser.add_argument("--keep-slices", action="store_true", default=None,
                        help="keep every slice at the preset's z spacing (no z crop/pad) and allow several "
                             "';'-separated series per row: slice sequences for the msvlm encoder "
                             "(default: config.preprocess.keep_slices)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    explicit_config = args.config is not None
    config = load_config(args.config or str(REPO / "configs" / "t3d.py") + ":demo")
    pre = config.preprocess
    preset = args.preset or pre.preset
    vocab = args.vocab if args.vocab is not None else (pre.vocab or None)
    lowercase = pre.lowercase if args.lowercase is None else args.lowercase
    max_len = args.max_len or pre.max_len
    report_order = args.report_order or pre.get("report_order", "as_written")
    keep_slices = bool(pre.get("keep_slices", False)) if args.keep_slices is None else True
    if args.label_names is not None:
        label_names = [n.strip() for n in args.label_names.split(",") if n.strip()]
    elif explicit_config and "label_names" in config.data:
        label_names = list(config.data.label_names)
    else:
        label_names = None

    from t3d_jax.data.prepare import prepare_dataset

    result = prepare_dataset(args.manifest, args.out, preset=preset, vocab=vocab, lowercase=lowercase,
                             max_len=max_len, report_order=report_order, workers=args.workers,
                             shard_size=args.shard_size,
                             compression=args.compression, mask_classes=args.mask_classes,
                             label_names=label_names, progress=not args.no_progress, keep_slices=keep_slices)
    if result.rejected:
        print(f"rejected inputs and reasons: {pathlib.Path(args.out) / 'errors.jsonl'}", file=sys.stderr)
    print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    from t3d_jax.utils import UserError

    try:
        sys.exit(main())
    except UserError as e:  # an expected problem (e.g. the manifest is missing): one line, no traceback
        sys.exit(f"launch/prepare_data.py: {e}")
