#!/usr/bin/env bash
# The README's main command (`make demo`), end to end on this CPU:
#   synthetic chest CTs -> prepare (ArrayRecord) -> train (configs/t3d.py:demo) -> export -> evaluate.
# Evaluation runs last so the run ends with the zero-shot table and the paths of the plots.
set -euo pipefail
PYTHON=${PYTHON:-python}
OUT=${DEMO_DIR:-demo_out}
NUM=${DEMO_NUM:-3200}  # = data.synthetic_if_missing of the demo variant; the ceiling below is of these
mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}  # TF (tokenizer) stays off any GPU
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}  # the demo is sized for a CPU; libtpu (AOT extra) must not probe
CFG=(--config=configs/t3d.py:demo --config.data.dir="$OUT/prepared")

echo "== 1/5 synthetic data: $NUM chest CTs + reports -> $OUT/raw"
"$PYTHON" launch/make_synthetic.py --out "$OUT/raw" --num "$NUM" --seed 0
echo "== 2/5 prepare: NIfTI -> canonical, 5 mm, 64^3, int16 ArrayRecord shards (impression first, 128 tokens) -> $OUT/prepared"
"$PYTHON" launch/prepare_data.py --manifest "$OUT/raw/manifest.csv" --out "$OUT/prepared" --config configs/t3d.py:demo
echo "== 3/5 train: configs/t3d.py:demo -> $OUT/run"
"$PYTHON" launch/train.py "${CFG[@]}" --workdir "$OUT/run"
echo "== 4/5 export embeddings of the held-out volumes and their reports"
"$PYTHON" launch/export_embeddings.py "${CFG[@]}" --workdir "$OUT/run" \
    --input "$OUT/raw/manifest.csv" --split valid --output "$OUT/embeddings_valid.npz"
echo "== 5/5 evaluate: zero-shot (CT-CLIP protocol), retrieval, linear probe, beside the supervised ceiling"
# bench/results/ceiling_demo.json: bench/ceiling.py on these 3,200 volumes (seed 0); the table
# marks it as measured on other data if DEMO_NUM or the generator changed.
"$PYTHON" launch/evaluate.py "${CFG[@]}" --workdir "$OUT/run" --config.eval.ceiling=bench/results/ceiling_demo.json
