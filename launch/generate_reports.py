r"""Generate reports for your own CT volumes with a trained `reportgen` model.

  python launch/generate_reports.py --config=configs/reportgen.py:demo --workdir demo_out/reportgen \
      --input my_cts/ --output reports.jsonl
  python launch/generate_reports.py --config=configs/reportgen.py:demo --workdir demo_out/reportgen \
      --input manifest.csv --split valid --output valid_reports.jsonl --config.generate.method=greedy

--input: a manifest (CSV/JSONL with id, volume[, report]), a folder of NIfTI files and/or DICOM
series folders, a DICOM series folder, or one NIfTI file. Volumes are preprocessed exactly as
the training data (the dataset's preset, the eval resize). OUTPUT gets one JSON line per volume
(id, path, generated, and reference where the manifest has a report), written batch by batch;
ids already in OUTPUT are skipped, so a killed run continues. Unreadable inputs are listed in
OUTPUT.errors.jsonl. Decoding is `config.generate` (docs/report_generation.md).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/reportgen.py:demo.", lock_config=False)
flags.DEFINE_string("workdir", None, "The training run's folder (holds checkpoints/).")
flags.DEFINE_string("input", None, "Manifest, folder of volumes, DICOM series folder or NIfTI file.")
flags.DEFINE_string("output", None, "Output JSONL file.")
flags.DEFINE_integer("checkpoint", None, "Step to use; default: the latest checkpoint.")
flags.DEFINE_string("split", None, "With a manifest: only the rows of this split (e.g. valid).")
flags.mark_flags_as_required(["config", "workdir", "input", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from t3d_jax.console import quiet_library_logs

    quiet_library_logs()
    if FLAGS.config.get("task", "") != "reportgen":
        raise app.UsageError(f"--config: task {FLAGS.config.get('task', '')!r} does not generate reports; "
                             "use configs/reportgen.py")
    from t3d_jax.export import errors_path, run_generate_reports

    done = run_generate_reports(FLAGS.config, FLAGS.workdir, FLAGS.input, FLAGS.output,
                                       step=FLAGS.checkpoint, split=FLAGS.split)
    print(f"checkpoint step {done['step']}: wrote {done['written']} report(s) to {FLAGS.output} "
          f"({done['skipped_existing']} already there); {done['errors']} input(s) skipped "
          f"(see {errors_path(FLAGS.output)})")


if __name__ == "__main__":
    from t3d_jax.console import run_tool

    run_tool(main)
