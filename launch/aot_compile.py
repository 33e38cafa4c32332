r"""Ahead-of-time compile the real train step for a TPU topology, on this (CPU) machine.

  python launch/aot_compile.py --config=configs/t3d.py:base --topology=v5e:16x16 \
      [--num_slices=2] [--config.KEY=VALUE ...] [--out=FILE.json]

Prints the per-chip memory against the chip's HBM, the FLOPs per step and the step time and
MFU they imply, and writes them as JSON with --out. The work is `t3d_jax.train.aot`
(its docstring says what each figure is; docs/scaling.md how to read them); this file only
turns flags into that call. It needs libtpu (the `aot` extra; compile-only use works on CPU).

A user error (unknown topology or config variant, a mesh or batch that does not fit the
topology, libtpu missing) is printed on one line and exits non-zero
(`t3d_jax.console.run_tool`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

# Never attach a real accelerator from this tool: the TPU devices are compile-only. Set
# before jax is imported (it reads JAX_PLATFORMS at import), hence before the imports below.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `configs` (imported by the config files), `t3d_jax`

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from t3d_jax.console import run_tool  # noqa: E402
from t3d_jax.train import aot  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/t3d.py:base.")
flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:16x16, v5p:4x4x4, v4:4x4x4.")
flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice); the 'data' axis spans them.")
flags.DEFINE_string("out", None, "Write the report as JSON here.")
flags.DEFINE_string("hlo", None, "Also write the compiled program's HLO text here.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report = aot.compile_train_step(FLAGS.config, FLAGS.topology, FLAGS.num_slices, hlo_out=FLAGS.hlo)
    report["command"] = " ".join(["python", "launch/aot_compile.py", *sys.argv[1:]])
    print(aot.format_report(report))
    if FLAGS.out:
        out = pathlib.Path(FLAGS.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    run_tool(main)  # a UserError (bad topology, variant, mesh, batch; no libtpu): one line, exit 1
