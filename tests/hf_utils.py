"""Tiny random Hugging Face GPT-2 checkpoints, created in the tests (no downloads)."""

import copy
import numpy as np
import torch
import transformers


def tiny_hf_config(**overrides) -> transformers.GPT2Config:
    kw = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64,
              bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    return transformers.GPT2Config(**kw)


def tiny_hf_model(seed=0, **overrides) -> transformers.GPT2LMHeadModel:
    """A randomly initialized GPT2LMHeadModel in eval mode, with eager attention (so that it
    returns attention probabilities)."""
    torch.manual_seed(seed)
    cfg = tiny_hf_config(**overrides)
    cfg._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        # Non-trivial LayerNorms and biases, so that a mix-up of scale/bias would show.
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny(path, seed=0, **overrides):
    model = tiny_hf_model(seed, **overrides)
    model.save_pretrained(path)
    return model


def torch_forward(model, ids, attention_mask=None):
    """The HF model's outputs (logits, hidden states, attentions) for numpy ids [B, S], computed
    in float64 on a copy of the model (its weights as they are, bf16 ones included). The
    reference is then transformers' definition without its own float32 rounding, so a parity
    tolerance measures our error alone: against transformers' float32 run the two roundings can
    add up (5.25.0's Llama logits sat 5.3e-6 from float64 on the other side of ours, 6.9e-6)."""
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        return model(
            torch.as_tensor(np.asarray(ids), dtype=torch.long),
            attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)),
            output_hidden_states=True,
            output_attentions=True,
        )
