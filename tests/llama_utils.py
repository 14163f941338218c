"""Tiny random Hugging Face Llama-family models, created in the tests (no downloads)."""

import torch
import transformers

from tests.hf_utils import torch_forward  # noqa: F401  (one home for the HF forward; re-exported)

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def tiny_hf_config(model_type="llama", **overrides):
    """A tiny config of `model_type`: 3 layers, width 32, 4 query heads, vocab 97, and weights
    10x HF's usual scale (initializer_range 0.2), so that attention is far from uniform and logits
    are O(1): with std 0.02 every q.k is ~0, and a wrong rotary embedding would not show. `rope`
    (a dict, e.g. {"rope_type": "linear", "factor": 2.0}) and `rope_theta` become transformers 5's
    `rope_parameters`."""
    rope = dict(overrides.pop("rope", None) or {"rope_type": "default"})
    rope["rope_theta"] = overrides.pop("rope_theta", 10000.0)
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
              initializer_range=0.2, bos_token_id=0, eos_token_id=0, rope_parameters=rope)
    if model_type == "qwen3":
        kw["head_dim"] = 8  # Qwen3Config's default is 128, not hidden_size // heads
    kw.update(overrides)
    return _CLASSES[model_type][0](**kw)


def tiny_hf_model(model_type="llama", seed=0, **overrides):
    """A randomly initialized *ForCausalLM in eval mode with eager attention (so that it returns
    attention probabilities), its norms and biases perturbed away from 1 and 0 so that a mix-up
    of weight, scale or bias would show."""
    torch.manual_seed(seed)
    cfg = tiny_hf_config(model_type, **overrides)
    cfg._attn_implementation = "eager"
    model = _CLASSES[model_type][1](cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model
