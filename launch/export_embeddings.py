r"""Export L2-normalised embeddings of your own CT volumes, reports and texts.

  python launch/export_embeddings.py --config=configs/t3d.py:demo --workdir demo_out/run \
      --input my_cts/ --output my_cts.npz
  python launch/export_embeddings.py --config=configs/t3d.py:demo --workdir demo_out/run \
      --input manifest.csv --output emb.parquet --texts findings.txt --tokens

--input: a manifest (CSV/JSONL with id, volume, report), a folder of NIfTI files and/or
DICOM series folders, a DICOM series folder, or one NIfTI file. Volumes are preprocessed
exactly as the training data (the dataset's preset and the eval resize). Inputs that
cannot be read are listed in OUTPUT.errors.jsonl and skipped. docs/evaluation.md
describes the output layout.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/t3d.py:demo.", lock_config=False)
flags.DEFINE_string("workdir", None, "The training run's folder (holds checkpoints/).")
flags.DEFINE_string("input", None, "Manifest, folder of volumes, DICOM series folder or NIfTI file.")
flags.DEFINE_string("output", None, "Output file: .npz or .parquet.")
flags.DEFINE_string("texts", None, "Optional text file: one free text per line to embed.")
flags.DEFINE_bool("tokens", False, "Also export the image encoder's patch tokens and their grid.")
flags.DEFINE_integer("checkpoint", None, "Step to use; default: the latest checkpoint.")
flags.DEFINE_string("split", None, "With a manifest: export only the rows of this split (e.g. valid).")
flags.DEFINE_integer("batch_size", None, "Volumes per batch (rounded up to the device count).")
flags.mark_flags_as_required(["config", "workdir", "input", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from t3d_jax.console import quiet_library_logs

    quiet_library_logs()
    if not FLAGS.output.lower().endswith((".npz", ".parquet")):
        raise app.UsageError(f"--output {FLAGS.output}: must end in .npz or .parquet")
    from t3d_jax.export import errors_path, run_export

    result = run_export(FLAGS.config, FLAGS.workdir, FLAGS.input, FLAGS.output, texts_file=FLAGS.texts,
                        tokens=FLAGS.tokens, step=FLAGS.checkpoint, batch_size=FLAGS.batch_size,
                        split=FLAGS.split)
    logging.info("done")
    print(f"Exported {len(result.ids)} volume(s)"
          f"{'' if result.report_embedding is None else ' with reports'}, {len(result.texts)} text(s) "
          f"to {FLAGS.output}; {len(result.errors)} input(s) skipped (see {errors_path(FLAGS.output)})")


if __name__ == "__main__":
    from t3d_jax.console import run_tool

    run_tool(main)
