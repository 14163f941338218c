"""The reference run: Distily's published gpt2 -> distilgpt2-shaped distillation
(docs/design.md, "What is reimplemented").

    python -m distil_jax.train --config configs/base.py --workdir runs/base

Teacher `gpt2` (124,439,808 params), student with `distilbert/distilgpt2`'s config (6 layers,
81,912,576 params, random HF init, the teacher's LM head (= tied token embedding) copied in and
trainable), the first 5000 rows of `wikimedia/wikipedia` 20231101.en (4990 train / 10 held out),
sequences of 1024, batch 8, 1 epoch, Adam lr 2e-4 with linear (power 1) decay to 1e-7, no warmup,
clipping at 1.0, seed 42, bf16 compute, gradient checkpointing. Objective: KL on the logits +
5.0 x MSE of the layer-2 attention maps (student block 4 <-> teacher block 10) through the
teacher-only affine LayerNorm and the orthogonal projector.

Differences from Distily, all deliberate (docs/design.md): padding never counts in a loss; every
loss is computed in float32; weights are float32 masters with bf16 compute (Distily trains pure
bf16); `dataset.layout = "pack"` packs documents (each its own attention segment) into full rows
instead of padding each to 1024, so no compute is spent on padding (Distily's runs are 25-45%
padding). Set `--config.dataset.layout=pad` for Distily's row layout; the step count then
matches Distily's 624 steps (packing gives fewer, fuller rows: the same tokens in fewer steps).

Needs the Hugging Face hub (gpt2, distilgpt2's config, Wikipedia) and a GPU: about 10 GB of GPU
memory at batch 8; see docs/benchmarks.md for throughput.
"""

from distil_jax.config import default_config


def get_config():
    return default_config()
