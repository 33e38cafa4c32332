#!/usr/bin/env bash
# The README's main command (`make demo`): synthetic chest CT -> prepare -> train -> evaluate -> export.
set -euo pipefail
PYTHON=${PYTHON:-python}
OUT=${DEMO_DIR:-demo_out}
mkdir -p "$OUT"
"$PYTHON" launch/make_synthetic.py --out "$OUT/raw" --num 200 --seed 0
"$PYTHON" launch/prepare_data.py --manifest "$OUT/raw/manifest.csv" --out "$OUT/prepared" --preset demo
