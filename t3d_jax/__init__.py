"""t3d_jax: 3D medical vision-language pre-training on CT volumes and reports, in JAX/Flax NNX.

Two training objectives are implemented (``config.task``, ``t3d_jax/tasks``): ``t3d``, this
project's reading of T3D (CLIP-style volume-report alignment plus Text-informed Multi-view
Alignment), and ``clip``, the CT-CLIP-style contrastive baseline. docs/method.md describes both;
docs/architecture.md maps the package.
"""

__version__ = "0.1.0"
