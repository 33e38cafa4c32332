"""Evaluation: zero-shot classification (CT-CLIP protocol), retrieval, linear probe, plots.

One module per job: `embedding` (jitted embedding and the per-context embedding cache),
`zeroshot` / `retrieval` / `linear_probe` (each its figures and its evaluator), `report`
(files and table), `run` (a checkpoint's whole evaluation, launch/evaluate.py; the `full`
evaluator), `registry` (evaluators by name, the interface the train loop uses).
docs/evaluation.md describes every figure.
"""
