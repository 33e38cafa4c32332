r"""Export a trained checkpoint's encoders for PyTorch: MONAI image encoder, Hugging Face BERT.

  python launch/export_weights.py --config=configs/t3d.py:demo --workdir demo_out/run --out demo_out/torch
  python launch/export_weights.py --config=configs/t3d.py:resnet_demo --workdir runs/r --out r_torch

OUT gets image_encoder.safetensors (a monai.networks.nets.ViT / resnet50 /
swin_unetr.SwinTransformer state dict, loadable
with load_state_dict(strict=True)), text_encoder/ (config.json, model.safetensors, vocab.txt:
transformers.BertModel.from_pretrained), projections.safetensors and export.json (the MONAI
constructor arguments, the input standardisation, the data's preprocessing, the step).
docs/architecture.md ("Export to PyTorch") says how to load and feed them.
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
flags.DEFINE_string("out", None, "Output folder (created).")
flags.DEFINE_integer("checkpoint", None, "Step to export; default: the latest checkpoint.")
flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from t3d_jax.console import quiet_library_logs

    quiet_library_logs()
    from t3d_jax.export import run_export_weights

    manifest = run_export_weights(FLAGS.config, FLAGS.workdir, FLAGS.out, step=FLAGS.checkpoint)
    logging.info("done")
    parts = [f"{manifest['image']['class']} state dict" if "image" in manifest else None,
             "Hugging Face BERT folder" if "text" in manifest else None]
    print(f"Exported step {manifest.get('checkpoint_step')}: {', '.join(p for p in parts if p)} "
          f"to {FLAGS.out} (see {os.path.join(FLAGS.out, 'export.json')})")


if __name__ == "__main__":
    from t3d_jax.console import run_tool

    run_tool(main)
