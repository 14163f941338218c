"""The training run in parts: `builders` (a run from its config), `loop` (`train` and the
session: a step, then the hooks), `hooks`, `evaluation`, `metrics`, `report`. The command line
is `distil_jax.train`."""
