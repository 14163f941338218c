"""The reference run: Distily's published gpt2 -> distilgpt2-shaped distillation, reproduced
(docs/design.md, "What is reimplemented").

    python -m distil_jax.train --config configs/base.py --workdir runs/base

What it trains, as Distily does: teacher `gpt2`; the student with `distilbert/distilgpt2`'s
config (6 layers, random HF init, the teacher's LM head copied in and trainable); the first 5000
rows of `wikimedia/wikipedia` 20231101.en, each document cut to its first 1024 tokens; batch 8,
1 epoch; Adam lr 2e-4 with linear decay to 1e-7, clipping at 1.0; seed 42; gradient
checkpointing. Objective: KL on the logits + 5.0 x MSE of the layer-2 attention maps (student
block 4 <-> teacher block 10) through the orthogonal projector and the teacher-only affine
LayerNorm, trained as a second optimizer group with Distily's settings.

What differs from Distily, all deliberate (padding masked out of every loss, float32 losses and
master weights, packed rows and so fewer steps, attention maps before dropout, remat keeping the
matmul outputs): docs/design.md, "Deliberate differences from Distily".
`--config.dataset.layout=pad` gives Distily's rows and step count.

Needs the Hugging Face hub (gpt2, distilgpt2's config, Wikipedia) and a GPU; memory and
throughput: docs/benchmarks.md.
"""

from distil_jax.config import default_config


def get_config():
    c = default_config()
    # Distily's sample: the first 5000 rows of English Wikipedia, 0.002 held out (4990 / 10).
    # (default_config() takes every row of dataset.uri and holds out 1 %.)
    c.dataset.uri = "wikimedia/wikipedia"
    c.dataset.subset = "20231101.en"
    c.dataset.column = "text"
    c.dataset.sample_size = 5000
    c.dataset.test_size = 0.002
    return c
