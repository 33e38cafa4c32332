r"""Pretrain a T3D / CLIP model on prepared CT volumes and reports.

  python launch/train.py --config=configs/t3d.py:demo --workdir runs/demo
  python launch/train.py --config=configs/t3d.py:base --workdir /ckpt/t3d_base \
      --config.data.dir=/data/ct_rate_prepared --config.train.num_steps=50000

Every process of a multi-host job runs the same command; on TPU pods and SLURM the
distributed environment is detected, elsewhere pass --coordinator_address, --num_processes
and --process_id. Restarting with the same --workdir resumes from its newest checkpoint.
The loop itself is t3d_jax.train.loop.train_and_evaluate.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/t3d.py:demo.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics.jsonl and TensorBoard "
                    "(default: runs/<task>_<variant>_<time>).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process jobs).")
flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_integer("cpu_devices", None, "CPU only: number of (fake) devices of this process.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from t3d_jax.console import quiet_library_logs

    quiet_library_logs()
    from t3d_jax.train import distributed

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           local_device_count=FLAGS.cpu_devices)
    import jax
    from t3d_jax.data.prepared import check_data_config, make_synthetic_if_missing
    from t3d_jax.train.loop import default_workdir, train_and_evaluate

    if jax.process_index() == 0 and jax.process_count() == 1:
        make_synthetic_if_missing(FLAGS.config)
    check_data_config(FLAGS.config)
    workdir = FLAGS.workdir or default_workdir(FLAGS.config)
    logging.info("JAX %s: %d process(es), %d devices (%s); workdir %s", jax.__version__,
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform, workdir)
    result = train_and_evaluate(FLAGS.config, workdir)
    logging.info("done: step %d%s; metrics in %s/metrics.jsonl", result.step,
                 " (preempted)" if result.preempted else "", workdir)


if __name__ == "__main__":
    from t3d_jax.console import run_tool

    run_tool(main)
