"""distil_jax: distill a large causal language model into a smaller one with JAX/Flax.

A reimplementation of Distily's recipe (see docs/) on jax, flax, optax and orbax.
"""

__version__ = "0.1.0"
