"""Every evaluator module, imported so that each registers its evaluators by name.

`registry.get_evaluator` imports this module on first lookup. A new evaluator is a module of
`t3d_jax/evaluate/` with a `@register_evaluator("name")` function, added to the line below.
"""

from t3d_jax.evaluate import linear_probe, reportgen, retrieval, run, seg_eval, zeroshot  # noqa: F401
