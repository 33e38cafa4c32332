#!/usr/bin/env bash
# Our train step against the PyTorch stack on one NVIDIA H200, in at most 8 minutes.
#
#   bench/gpu_check.sh [--out DIR] [--budget-s 470] [--steps 20]   # on the GPU machine
#   bench/gpu_check.sh --cpu [--out DIR]                            # the same path on this CPU
#   PYTHON=/path/to/python bench/gpu_check.sh ...                   # default: .venv/bin/python if
#                                                                   # present, else python3
#
# Runs bench/vs_pytorch.py's accelerator cases, one process per case:
#   gpu_small  `small` as configured for one GPU: batch 64, 2 views of 96x96x64, ViT-S
#              (patch 16x16x8, 288 tokens), BERT-mini, 128 tokens;
#   gpu_base   `base` sizes: ViT-B on 2 views of 160x160x96 (1,200 tokens each), BERT-base,
#              at batch 32 (what one card holds for both frameworks at once without remat).
# Both sides bfloat16 (float32 parameters), CLIP task, no remat, BERT attention dropout 0 on
# both sides (cuDNN's fused attention has none); ours with model.attention=cudnn
# (jax.nn.dot_product_attention -> cuDNN flash attention), PyTorch with SDPA (flash /
# memory-efficient kernels) in the ViT and in BERT, torch.compile of forward + loss (eager if it
# raises or takes longer than the case's compile limit), fused AdamW. Each case prints and
# writes: both step times (median), the ratio torch/ours (> 1 = ours faster), MFU of each
# against the card's 989 TFLOP/s dense bf16 peak (the model's matmul FLOPs counted from the
# shapes, the same numerator for both), and each allocator's peak device memory (JAX:
# memory_stats()["peak_bytes_in_use"]; PyTorch: torch.cuda.max_memory_allocated()).
# With --cpu: the same code at the test sizes (gpu_tiny), bfloat16 on XLA:CPU and CPU autocast,
# model.attention=xla, MFU against a matmul peak measured in the run, no device memory counter
# (the columns stay empty) -- so that on a GPU machine only the device is new.
#
# Design
# (1) The packages the GPU image lacks (monai, ml_collections, grain, tensorflow,
#     tensorflow_text): the bench does without them; no wheels are carried. The device is lent
#     for a few minutes with no network, so the check must not depend on a preparation step
#     that could be forgotten, on wheels matching the image's Python, or on pip at run time.
#     - MONAI's ViT is written in plain torch in bench/vs_pytorch.py (TorchViT3D): the same
#       parameter names and initial parameters from the same seed, and bit-for-bit MONAI's
#       outputs with its einsum attention (tests/test_gpu_check.py, against monai's ViT, which
#       is installed in this repository's environment). It is needed anyway: MONAI's ViT does
#       not pass use_flash_attention to its blocks, so it cannot run SDPA; the GPU cases use
#       the copy's "sdpa" attention (equal to the einsum path within 1e-5 in the test).
#     - The configs (ml_collections.ConfigDict) load through bench/configdict_shim.py, a
#       60-line ConfigDict / FieldReference registered as ml_collections only when the real
#       package cannot be imported; the test builds every variant of every config file with
#       both and compares them.
#     - The train step (t3d_jax.train.step, tasks, models, losses) imports none of the five.
#       tests/test_gpu_check.py runs the bench's GPU path (config, both steps built, one
#       PyTorch step, our step traced and lowered) in an interpreter in which those packages
#       are absent (every import finder hidden from them) and checks none got loaded.
# (2) Timing: ours and PyTorch's steps alternate in one process (jax, torch, jax, ...), as
#     vs_pytorch.py does on CPU, so anything else on the machine hits both alike; compilation
#     and the first steps are excluded (the first call of each plus --warmup more); the
#     median of the timed steps is reported. Hard time budget: the whole script stops within
#     --budget-s (default 470 s, under 8 min): each case runs under `timeout` with a cap
#     (gpu_small 170 s, gpu_base 260 s, less when earlier cases ran long), its torch.compile
#     is cut off after 90 / 120 s (then eager), and vs_pytorch.py cuts its timed steps to what
#     the case's budget still allows (at least 3). A case killed by its cap leaves a partial
#     JSON (setup figures). If a case's process dies (not a timeout) -- e.g. JAX and PyTorch
#     cannot share the process's CUDA libraries -- the case and those after it run one
#     framework per process (--frameworks jax / torch), marked "NOT interleaved".
# (3) Output: the table on stdout and under --out DIR (default bench/results/gpu_check/):
#     <case>.json and <case>.log per case (per framework if split), gpu_check.json (all rows
#     merged) and summary.txt (the table), nvidia-smi.txt on GPU.
#
# Exit status: 0 when every case produced a full row, 1 otherwise (the table shows what ran).
set -uo pipefail
START=$(date +%s)

MODE=gpu
OUT=""
BUDGET=""
STEPS=""
usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) MODE=cpu; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT" || exit 2

export TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ "$MODE" == gpu ]]; then
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX must not take 75% of the card: PyTorch shares it
  BUDGET="${BUDGET:-470}"; STEPS="${STEPS:-20}"; WARMUP=2; PEAK=989; DEVICE=gpu
  CASES=(gpu_small gpu_base); CAPS=(170 260); COMPILE_LIMITS=(90 120)
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  fi
else
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  BUDGET="${BUDGET:-170}"; STEPS="${STEPS:-5}"; WARMUP=1; PEAK=0; DEVICE=cpu
  CASES=(gpu_tiny); CAPS=(150); COMPILE_LIMITS=(60)
fi

elapsed() { echo $(( $(date +%s) - START )); }
MERGE_RESERVE=15   # seconds kept for the merged table
MIN_CASE=60        # a case gets at least this or is skipped
echo "gpu_check: mode $MODE, python $PYTHON, budget ${BUDGET} s, out $OUT"

# run_case CASE CAP COMPILE_LIMIT FRAMEWORKS OUTFILE -> sets RC
run_case() {
  local case="$1" cap="$2" climit="$3" fw="$4" out="$5"
  local left=$(( BUDGET - $(elapsed) - MERGE_RESERVE ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < MIN_CASE )); then
    echo "gpu_check: $case ($fw): skipped, ${left} s of the budget left"; RC=125; return
  fi
  echo "gpu_check: $case ($fw): up to ${limit} s"
  timeout -k 10 "$limit" "$PYTHON" bench/vs_pytorch.py --device "$DEVICE" --cases "$case" \
      --frameworks "$fw" --steps "$STEPS" --warmup "$WARMUP" --budget-s $(( limit - 20 )) \
      --peak-tflops "$PEAK" --torch-compile auto --torch-compile-timeout-s "$climit" \
      --out "$out" 2>&1 | tee "${out%.json}.log"
  RC=${PIPESTATUS[0]}
  if (( RC == 124 || RC == 137 )); then
    echo "gpu_check: $case ($fw): stopped at its ${limit} s cap (partial results in $out if any)"
  elif (( RC != 0 )); then
    echo "gpu_check: $case ($fw): failed (exit $RC), see ${out%.json}.log"
  fi
}

SPLIT=0
FAILED=0
RESULTS=()
for i in "${!CASES[@]}"; do
  case="${CASES[$i]}"; cap="${CAPS[$i]}"; climit="${COMPILE_LIMITS[$i]}"
  # Keep the later cases' minimum in reserve.
  later=$(( (${#CASES[@]} - i - 1) * MIN_CASE ))
  left=$(( BUDGET - $(elapsed) - MERGE_RESERVE - later ))
  cap=$(( cap < left ? cap : left ))
  if (( SPLIT == 0 )); then
    run_case "$case" "$cap" "$climit" both "$OUT/$case.json"
    RESULTS+=("$OUT/$case.json")
    if (( RC == 0 )); then continue; fi
    if (( RC == 124 || RC == 137 || RC == 125 )); then FAILED=1; continue; fi
    SPLIT=1  # the process died: this case and the later ones one framework per process
    unset 'RESULTS[${#RESULTS[@]}-1]'  # its partial JSON stays on disk, out of the table
    echo "gpu_check: running $case (and the later cases) one framework per process"
    left=$(( BUDGET - $(elapsed) - MERGE_RESERVE - later ))
    cap=$(( cap < left ? cap : left ))
  fi
  half=$(( cap / 2 ))
  run_case "$case" "$half" "$climit" jax "$OUT/${case}_jax.json"; rc_jax=$RC
  run_case "$case" $(( cap - half )) "$climit" torch "$OUT/${case}_torch.json"; rc_torch=$RC
  RESULTS+=("$OUT/${case}_jax.json" "$OUT/${case}_torch.json")
  if (( rc_jax != 0 || rc_torch != 0 )); then FAILED=1; fi
done

echo "gpu_check: all cases done after $(elapsed) s"
"$PYTHON" bench/vs_pytorch.py --merge "${RESULTS[@]}" --out "$OUT/gpu_check.json" | tee "$OUT/summary.txt"
MERGE_RC=${PIPESTATUS[0]}
echo "gpu_check: $(elapsed) s in all (budget ${BUDGET} s)" | tee -a "$OUT/summary.txt"
if (( FAILED || MERGE_RC )); then exit 1; fi
exit 0
