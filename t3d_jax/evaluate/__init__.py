"""Evaluation: zero-shot classification (CT-CLIP protocol), retrieval, linear probe, plots.

Importing the package registers the evaluators the training loop can run periodically
(``config.eval.evaluators``: "zeroshot", "retrieval", "linear_probe", "full"); see
:mod:`t3d_jax.evaluate.runner` and docs/evaluation.md.
"""

from t3d_jax.evaluate import runner as _runner  # noqa: F401  (registers the evaluators)
