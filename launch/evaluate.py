r"""Evaluate a training run's checkpoint: zero-shot (CT-CLIP protocol), retrieval, linear probe.

  python launch/evaluate.py --config=configs/t3d.py:demo --workdir demo_out/run
  python launch/evaluate.py --config=configs/t3d.py:base --workdir /ckpt/t3d_base \
      --config.data.dir=/data/ct_rate_prepared --checkpoint 20000 --split valid

Writes WORKDIR/eval/STEP/: metrics.json, per_label.csv, predictions.csv, roc_grid.png,
retrieval_recall.png, and prints a short table. Use the same --config (and overrides) as
for training. docs/evaluation.md describes every figure. A `segmentation` run
(configs/finetune_seg.py) is scored by the segmentation evaluator instead: Dice and HD95 per
class, WORKDIR/eval/STEP/segmentation.json and segmentation_per_class.csv (docs/segmentation.md);
a `reportgen` run (configs/reportgen.py) by the report-generation evaluator: BLEU-1..4, METEOR,
ROUGE-L, CIDEr and clinical efficacy, WORKDIR/eval/STEP/reportgen/ (docs/report_generation.md).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/t3d.py:demo.", lock_config=False)
flags.DEFINE_string("workdir", None, "The training run's folder (holds checkpoints/).")
flags.DEFINE_integer("checkpoint", None, "Step to evaluate; default: the latest checkpoint.")
flags.DEFINE_string("split", None, "Split to evaluate; default: config.eval.split or config.data.eval_split.")
flags.DEFINE_integer("num_bootstrap", None, "Bootstrap resamples for the intervals (default 1000).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from t3d_jax.console import quiet_library_logs

    quiet_library_logs()
    config = FLAGS.config
    from t3d_jax.evaluate import reportgen, run, seg_eval

    # The final evaluation of each task (the contrastive tasks: zero-shot, retrieval, probe).
    evaluate_checkpoint = {"segmentation": seg_eval.evaluate_checkpoint,  # Dice / HD95 per class
                           "reportgen": reportgen.evaluate_checkpoint,  # BLEU..CIDEr, METEOR, CE
                           }.get(config.get("task", ""), run.evaluate_checkpoint)

    if FLAGS.num_bootstrap is not None:
        config.eval.num_bootstrap = FLAGS.num_bootstrap
    evaluate_checkpoint(config, FLAGS.workdir, step=FLAGS.checkpoint, split=FLAGS.split)


if __name__ == "__main__":
    from t3d_jax.console import run_tool

    run_tool(main)
