r"""Caches a frozen text tower's report states next to a prepared folder (the locked-text mode).

  python launch/cache_text_features.py --data DIR --hf_bert_dir MODEL_DIR \
      [--pool cls|mean] [--keep tokens|pooled] [--batch_size 32] [--vocab VOCAB] [--no-progress]

Runs the Hugging Face BERT in MODEL_DIR (our BertEncoder with its weights, float32) on the
stored token ids of every record of every split of DIR and writes DIR/text_features/
({split}.npy float16 + features.json; docs/data.md "Cached text features"). --keep tokens
(default) stores the last hidden states [N, L, d_t] (the `t3d` task's TMA head needs them; the
`clip` task pools them by model.text.pool); --keep pooled stores one vector per report [N, d_t]
pooled by --pool (`clip` only, ~L times smaller). Train with data.text_features=True (or
'pooled'), model.text.locked=True, optim.freeze=("^text_encoder/",) and
init_from.hf_bert_dir=MODEL_DIR (docs/training.md "Locked text tower").

Refused, before any compute: a MODEL_DIR whose vocab.txt is not the vocab the data was
tokenized with (dataset.json's tokenizer.vocab, or --vocab), or a token length above its
position embeddings.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared folder (dataset.json + shards)")
    parser.add_argument("--hf_bert_dir", required=True, help="local Hugging Face BERT folder "
                        "(config.json, vocab.txt, model.safetensors or pytorch_model.bin)")
    parser.add_argument("--pool", default="cls", choices=("cls", "mean"), help="report vector of --keep pooled")
    parser.add_argument("--keep", default="tokens", choices=("tokens", "pooled"),
                        help="tokens: [N, L, d_t] states; pooled: [N, d_t] vectors")
    parser.add_argument("--batch_size", type=int, default=32, help="reports per forward pass")
    parser.add_argument("--vocab", default=None,
                        help="the vocab.txt the data was tokenized with (default: dataset.json's tokenizer.vocab)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from t3d_jax.data.text_features import cache_text_features
    from t3d_jax.models.two_tower import frozen_text_tower

    meta = cache_text_features(args.data, args.hf_bert_dir, frozen_text_tower, pool=args.pool, keep=args.keep,
                               batch_size=args.batch_size, vocab=args.vocab, progress=not args.no_progress)
    shapes = ", ".join(f"{split} {tuple(e['shape'])}" for split, e in meta["splits"].items())
    print(f"wrote {os.path.join(args.data, 'text_features')}: {meta['keep']} {meta['dtype']} {shapes}", flush=True)
    return 0


if __name__ == "__main__":
    from t3d_jax.utils import UserError

    try:
        sys.exit(main())
    except UserError as e:  # an expected problem (vocab mismatch, missing folder): one line
        sys.exit(f"launch/cache_text_features.py: {e}")
