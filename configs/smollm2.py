"""A Llama-family run: SmolLM2-360M distilled into a half-depth student started from its own blocks.

    python -m distil_jax.train --config configs/smollm2.py --workdir runs/smollm2

Teacher `HuggingFaceTB/SmolLM2-360M` (LlamaForCausalLM: 32 layers, 960 wide, 15 query heads and
5 key/value heads (grouped-query attention), SwiGLU MLP 2560 wide, RoPE theta 100,000, vocabulary
49,152, tied embeddings; 361,821,120 params). Student: the teacher's config with 16 layers
(about 204 M params), its blocks initialized from the teacher's even blocks 0, 2, ..., 30
(`student.init_from_teacher_layers`; "uniform" would pick evenly spaced ones including the last)
and the embedding (= tied LM head) copied in and trainable: the strongest cheap start for a
student, as distilgpt2 did with GPT-2's blocks.

The objective is the reference run's, fitted to the pair: KL on the logits + 5.0 x MSE of the
layer-2 attention maps (student block 14 <-> teacher block 30, compared per query head: the
student keeps the teacher's 15 heads) through the teacher-only affine LayerNorm and the
orthogonal projector over the 1024 key positions. Data, optimizer and schedule are the reference
run's (the first 5000 rows of English Wikipedia, Adam 2e-4 with linear decay, batch 8, rows of
1024 tokens, bf16 compute with float32 master weights, gradient checkpointing).

Needs the Hugging Face hub (the teacher and Wikipedia) and a GPU. Not run by the project's CI,
which has no hub access: the tests run the same code path on tiny random Llama models.
"""

from distil_jax.config import default_config


def get_config():
    c = default_config()
    c.teacher.model_name_or_path = "HuggingFaceTB/SmolLM2-360M"
    c.student.config_name_or_path = ""  # the teacher's config with the overrides below
    c.student.overrides = {"num_hidden_layers": 16}
    c.student.init_from_teacher_layers = tuple(range(0, 32, 2))
    c.student.copy_teacher_modules = [("lm_head", False)]
    c.student.dropout = False  # Llama-family configs have attention_dropout 0.0 anyway
    # Distily's sample of English Wikipedia, as configs/base.py (the default takes every row)
    c.dataset.uri, c.dataset.subset, c.dataset.column = "wikimedia/wikipedia", "20231101.en", "text"
    c.dataset.sample_size, c.dataset.test_size = 5000, 0.002
    return c
