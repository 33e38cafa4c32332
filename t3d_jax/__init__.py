"""t3d_jax: 3D medical vision-language pre-training (T3D, MG-3D, MS-VLM ideas) in JAX/Flax NNX."""

__version__ = "0.1.0"
