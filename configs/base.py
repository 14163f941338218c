"""The reference run: Distily's published gpt2 -> distilgpt2-shaped distillation
(docs/design.md, "What is reimplemented").

    python -m distil_jax.train --config configs/base.py --workdir runs/base

What it trains, as Distily does: teacher `gpt2` (124,439,808 params); student with
`distilbert/distilgpt2`'s config (6 layers, 81,912,576 params, random HF init, the teacher's LM
head (= tied token embedding) copied in and trainable); the first 5000 rows of
`wikimedia/wikipedia` 20231101.en (4990 train / 10 held out), each document cut to its first
1024 tokens with nothing added (Distily's tokens); batch 8, 1 epoch; Adam lr 2e-4 with linear
(power 1) decay to 1e-7, no warmup, clipping at 1.0 over the student's parameters; seed 42;
gradient checkpointing. Objective: KL on the logits + 5.0 x MSE of the layer-2 attention maps
(student block 4 <-> teacher block 10) through the orthogonal projector (student side) and the
teacher-only affine LayerNorm. The projector and norm parameters are a second optimizer group
with Distily's effective settings (torch AdamW's defaults): lr 1e-3, scaled over the run by the
same factor as the student's, weight decay 0.01, not clipped.

What differs from Distily, all deliberate:

* Loss masking: padding never counts in a loss. Distily pads every row to 1024 with EOS and
  averages every loss over the padding too (24 % of the positions in this run).
* Float32 losses and master weights: every loss takes float32 logits (the LM heads accumulate in
  float32) and computes in float32; weights and optimizer state are float32 with bf16 compute.
  Distily trains pure bf16 weights and takes its log-softmax of bf16 logits.
* Packed rows, so fewer steps: `dataset.layout = "pack"` puts the same documents, whole, several
  to a row (best fit) instead of one per row padded to 1024. Each keeps its own positions and
  attention, and each attention row a loss reads is moved into its document's frame before the
  projector and norm, so every token's loss is the one it gets in a padded row. The rows are
  (nearly) full: Distily's card counts 3,884,521 tokens, at least 3,794 rows of 1024, so about
  475 steps of 8 rows instead of 624. Each step averages over more tokens and the schedule
  decays over fewer steps. Rows are shuffled by
  the run's seed (Distily shuffles documents with torch's sampler): same tokens, other batches.
* The student's attention maps are taken before attention dropout (Distily's eager attention
  returns them after it).
* Gradient checkpointing keeps each student block's matmul outputs (`train.remat_policy=auto`
  picks `dots` here: about 0.7 GB in bf16) instead of recomputing the whole block as HF does:
  the same gradients for fewer FLOPs; `--config.train.remat_policy=full` is HF's.

`--config.dataset.layout=pad` gives Distily's rows (one document per row) and its 624 steps;
the first two differences remain.

Needs the Hugging Face hub (gpt2, distilgpt2's config, Wikipedia) and a GPU: about 10 GB of GPU
memory at batch 8; see docs/benchmarks.md for throughput.
"""

from distil_jax.config import default_config


def get_config():
    return default_config()
