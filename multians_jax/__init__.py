"""multians_jax: multi-answer RL for language models in JAX/Flax."""

__version__ = "0.1.0"
