#!/usr/bin/env bash
# Run t3d_jax pretraining on a Cloud TPU VM pod (one slice) or a multi-slice queued resource.
#
# Every TPU host runs the SAME command: `launch/train.py` calls jax.distributed.initialize(),
# which on a TPU VM finds the other hosts itself; each host then loads only its slice of the
# global batch. The workdir (checkpoints, metrics) must be a gs:// path every host can reach.
#
# Usage
#   TPU=my-v5e-256 ZONE=us-west4-a WORKDIR=gs://my-bucket/t3d_base \
#   DATA=gs://my-bucket/ct_rate_prepared \
#     bash launch/tpu_pod.sh all [--config.KEY=VALUE ...]
#
# Steps (first argument): `setup` (copy code + create the venv on every worker),
# `train` (start training on every worker, detached, logs in ~/t3d_train.log), `logs`
# (tail worker 0's log), `stop` (stop the training processes this script started), `all`
# (= setup then train). Anything after the step is passed to launch/train.py.
#
# Environment
#   TPU       TPU VM name (single slice).                    QR   queued-resource id (multi-slice;
#   ZONE      zone.                                                replaces TPU; every node of it runs)
#   PROJECT   gcloud project (optional).
#   WORKDIR   gs://bucket/path for checkpoints and metrics (required for `train`).
#   DATA      prepared dataset folder (launch/prepare_data.py output). gs://... is copied once
#             to local disk on every worker (LOCAL_DATA, default /tmp/t3d_data) because Grain
#             reads ArrayRecord shards with random access; a local/NFS path is used as is.
#   CONFIG    config spec, default configs/t3d.py:base.
#   REMOTE_DIR  code folder on the workers, default ~/t3d_jax.
#   LIBTPU    libtpu pin matching jax 0.10.2 (jax[tpu] asks for libtpu==0.0.42.*), default 0.0.42.1.
#
# Multi-slice (e.g. 2 x v5e-256 over the data-centre network): create a queued resource with
# `--node-count=2`, set QR instead of TPU. The queued resource sets the MEGASCALE_* variables
# on every host; jax then reports devices of both slices (device.slice_index) and the trainer
# builds a hybrid mesh (mesh_utils.create_hybrid_device_mesh: ICI axes inside a slice, the
# 'data' axis across slices), see docs/scaling.md. Check the memory of the slice first:
#   python launch/aot_compile.py --config=configs/t3d.py:base --topology=v5e:16x16 --num_slices=2
set -euo pipefail

STEP=${1:-all}
shift || true
TRAIN_ARGS=("$@")
case "$STEP" in
    setup | train | all | logs | stop) ;;
    *) echo "launch/tpu_pod.sh: unknown step '$STEP' (setup | train | all | logs | stop)" >&2; exit 2 ;;
esac

: "${ZONE:?set ZONE (e.g. us-west4-a)}"
CONFIG=${CONFIG:-configs/t3d.py:base}
REMOTE_DIR=${REMOTE_DIR:-'~/t3d_jax'}
LIBTPU=${LIBTPU:-0.0.42.1}
LOCAL_DATA=${LOCAL_DATA:-/tmp/t3d_data}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [[ -n "${QR:-}" ]]; then
    # All nodes (slices) of the queued resource, all workers of each.
    SSH=(gcloud compute tpus queued-resources ssh "$QR" --zone "$ZONE" "${PROJECT_FLAG[@]}"
         --node=all --worker=all)
    SCP_TARGETS=$(gcloud compute tpus queued-resources describe "$QR" --zone "$ZONE" \
        "${PROJECT_FLAG[@]}" --format='value(tpu.nodeSpec[].nodeId)' | tr ';' ' ')
else
    : "${TPU:?set TPU (the TPU VM name) or QR (a multi-slice queued resource)}"
    SSH=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all)
    SCP_TARGETS=$TPU
fi

run_all() {  # Runs one shell command on every worker of every slice.
    "${SSH[@]}" --command "$1"
}

setup() {
    # Ship the working tree (without venvs, runs, caches) and build the pinned env everywhere.
    local tarball=/tmp/t3d_jax_src.tar.gz
    tar -C "$REPO_ROOT" --exclude=.venv --exclude=.git --exclude='runs' --exclude='demo_out' \
        --exclude='__pycache__' -czf "$tarball" .
    for node in $SCP_TARGETS; do
        gcloud compute tpus tpu-vm scp "$tarball" "$node":/tmp/t3d_jax_src.tar.gz \
            --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
    done
    run_all "set -e; mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/t3d_jax_src.tar.gz
        cd $REMOTE_DIR && (test -x .venv/bin/python || python3 -m venv .venv)
        .venv/bin/pip install --quiet -c requirements-lock.txt -e . && .venv/bin/pip install --quiet libtpu==$LIBTPU
        .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
}

train() {
    : "${WORKDIR:?set WORKDIR=gs://bucket/path}"
    local data_arg=""
    local fetch=":"
    if [[ -n "${DATA:-}" ]]; then
        if [[ "$DATA" == gs://* ]]; then
            # Copy once per worker; rsync makes a restart cheap.
            fetch="mkdir -p $LOCAL_DATA && gcloud storage rsync --recursive $DATA $LOCAL_DATA"
            data_arg="--config.data.dir=$LOCAL_DATA"
        else
            data_arg="--config.data.dir=$DATA"
        fi
    fi
    local args
    args=$(printf ' %q' "${TRAIN_ARGS[@]}")
    # nohup + setsid: the training survives the ssh session; every worker writes its own log.
    run_all "set -e; cd $REMOTE_DIR; $fetch
        setsid nohup .venv/bin/python launch/train.py --config=$CONFIG --workdir=$WORKDIR $data_arg $args \
            > ~/t3d_train.log 2>&1 < /dev/null & echo \$! > ~/t3d_train.pid; echo started pid \$(cat ~/t3d_train.pid) on \$(hostname)"
}

case "$STEP" in
    setup) setup ;;
    train) train ;;
    all) setup; train ;;
    logs) "${SSH[@]/--worker=all/--worker=0}" --command "tail -n 50 -f ~/t3d_train.log" ;;
    stop) run_all "test -f ~/t3d_train.pid && kill \$(cat ~/t3d_train.pid) || true" ;;
    *) echo "launch/tpu_pod.sh: unknown step '$STEP' (setup | train | all | logs | stop)" >&2; exit 2 ;;
esac
