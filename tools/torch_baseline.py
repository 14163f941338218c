"""A PyTorch baseline that trains the way Distily 0.5.0 does (benchmark use only; not the library).

What Distily does for the reference run (docs/design.md), reproduced with plain torch +
transformers so that `tools/bench_throughput.py` can time it next to distil_jax:

* teacher: the HF causal LM of the config (`GPT2LMHeadModel`, `LlamaForCausalLM`, ...), eval mode,
  forward under `torch.no_grad()`; student: the same class with fewer layers, train mode (dropout
  on, as HF's Trainer runs it), its LM head (the tied token embedding) copied from the teacher
  (`copy_teacher_modules` `[("lm_head", False)]`, trainable);
* both models run eager attention with `output_attentions=True`, so every layer of both models
  materializes its [B, H, S, S] attention probabilities (docs/design.md, difference 7), and
  `output_hidden_states` only when the hidden-state component has a weight (not here);
* padded rows go in with their `attention_mask`; the losses average over ALL positions,
  padding included (docs/design.md, difference 1);
* objective: KL(teacher || student) over the vocabulary (log_softmax of both, summed over the
  vocabulary, mean over positions) + 5.0 x MSE (torch `mse_loss`, mean) between the student's
  attention map at layer n_s-2, mixed over key positions by the orthogonal projector
  (A = matrix_exp((W - W^T)/2), proj = x @ A[:, :sd]^T), and the teacher's map at layer n_t-2
  through a trainable affine LayerNorm (eps 1e-5) over the last axis;
* torch.optim.AdamW (HF's `adamw_torch`; lr 2e-4, betas 0.9/0.999, eps 1e-8, weight decay 0,
  i.e. Adam) over the student, and the projector + norm parameters as a second group with
  AdamW's defaults (lr 1e-3, weight decay 0.01), as Distily adds them; HF's polynomial-decay
  schedule (warmup 0, lr_end 1e-7, power 1) scaling both groups; `clip_grad_norm_(1.0)` over the
  student's parameters only; gradient checkpointing through the model's own switch.
* dtype: the models and the objective's parameters in one dtype (Distily trains pure bf16 on GPU;
  float32 on CPU). The projector's matrix exponential is taken in float32 and cast back.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
import transformers

PAD_ATTN_LAYER_K = 2  # the reference run's `layer-2` attention mapper: layer -2 of each model
ATTN_WEIGHT = 5.0
LOGITS_WEIGHT = 1.0


def hf_gpt2_config(n_layer: int, n_embd: int, n_head: int, vocab_size: int, n_positions: int,
                   **extra) -> transformers.GPT2Config:
    """A GPT-2 config with eager attention (the only implementation that returns the maps)."""
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                                  n_positions=n_positions, bos_token_id=vocab_size - 1,
                                  eos_token_id=vocab_size - 1, use_cache=False, **extra)
    cfg._attn_implementation = "eager"
    return cfg


def hf_config(model_type: str, **fields) -> transformers.PretrainedConfig:
    """Any family's config (gpt2, llama, qwen2, qwen3, mistral) with eager attention; GPT-2's
    bos/eos are the last token, as `hf_gpt2_config` sets them."""
    if model_type == "gpt2":
        return hf_gpt2_config(**fields)
    cls = transformers.AutoConfig.for_model(model_type).__class__
    V = fields["vocab_size"]
    cfg = cls(use_cache=False, **{"bos_token_id": V - 1, "eos_token_id": V - 1, **fields})
    cfg._attn_implementation = "eager"
    return cfg


def enable_gradient_checkpointing(model: transformers.PreTrainedModel) -> None:
    """`model.gradient_checkpointing_enable()` (HF Trainer's switch), under its newer name when
    this transformers has it (5.2x renamed it and warns on the old one)."""
    fn = getattr(model, "activation_checkpointing_enable", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        (fn or model.gradient_checkpointing_enable)()


class DistilyObjective(torch.nn.Module):
    """The reference objective's trainable parts and its loss.

    `projector_weight` [S, S] (init U(+-1/sqrt(S))) and `norm` (LayerNorm(S), affine) act on the
    last axis of the attention maps, i.e. the key position, so their size is the sequence length
    (Distily creates them lazily from the first batch; here they are created up front).
    """

    def __init__(self, n_student: int, n_teacher: int, seq_len: int, attn_layer_k: int = PAD_ATTN_LAYER_K):
        super().__init__()
        self.s_layer = n_student - attn_layer_k
        self.t_layer = n_teacher - attn_layer_k
        if self.s_layer < 0 or self.t_layer < 0:
            raise ValueError(f"layer-{attn_layer_k} needs >= {attn_layer_k} layers in both models")
        bound = 1.0 / math.sqrt(seq_len)
        self.projector_weight = torch.nn.Parameter(torch.empty(seq_len, seq_len).uniform_(-bound, bound))
        self.norm = torch.nn.LayerNorm(seq_len, eps=1e-5, elementwise_affine=True)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Orthogonal projector: x [..., sd] @ A[:, :sd]^T with A = expm((W - W^T)/2) in float32."""
        w = self.projector_weight.float()
        a = torch.linalg.matrix_exp((w - w.T) / 2.0)
        return x @ a[:, : x.shape[-1]].T.to(x.dtype)

    def forward(self, s_out, t_out) -> tuple[torch.Tensor, dict]:
        s_logits, t_logits = s_out.logits, t_out.logits
        V = s_logits.shape[-1]
        # kl: log_softmax of both, sum over the vocabulary, mean over every position (padding too).
        kl = F.kl_div(F.log_softmax(s_logits.reshape(-1, V), dim=-1),
                      F.log_softmax(t_logits.reshape(-1, V), dim=-1),
                      reduction="batchmean", log_target=True)
        # attn: layer_mapper layer-2 -> orthogonal projector (student) -> teacher-only affine
        # LayerNorm -> raw_mse.
        s_map = self.project(s_out.attentions[self.s_layer])
        t_map = self.norm(t_out.attentions[self.t_layer])
        mse = F.mse_loss(s_map, t_map)
        loss = LOGITS_WEIGHT * kl + ATTN_WEIGHT * mse
        return loss, {"loss/logits": kl.detach(), "loss/attn": mse.detach()}


_DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout")


def build(teacher_cfg: transformers.PretrainedConfig, student_layers: int, seq_len: int, *,
          device: str = "cpu", dtype: torch.dtype = torch.float32, remat: bool = True,
          seed: int = 0, teacher: Optional[transformers.PreTrainedModel] = None,
          student: Optional[transformers.PreTrainedModel] = None, dropout: bool = True):
    """(teacher, student, objective), all on `device` in `dtype`, random HF init unless given.

    Any HF causal LM config (GPT-2, Llama, Qwen2/3, Mistral). The student is the teacher's config
    with `student_layers` blocks; its LM head (the tied token embedding, or the separate head) is
    copied from the teacher. dropout=False zeroes the student's dropout rates (Distily trains
    with them; only for like-for-like comparisons).
    """
    torch.manual_seed(seed)
    if teacher is None:
        teacher = transformers.AutoModelForCausalLM.from_config(teacher_cfg)
    if student is None:
        s_cfg = teacher_cfg.__class__(**teacher_cfg.to_dict())
        s_cfg.num_hidden_layers = student_layers  # GPT-2 maps it to n_layer
        if not dropout:
            for f in _DROPOUT_FIELDS:
                if hasattr(s_cfg, f):
                    setattr(s_cfg, f, 0.0)
        s_cfg._attn_implementation = "eager"
        student = transformers.AutoModelForCausalLM.from_config(s_cfg)
        with torch.no_grad():
            student.get_output_embeddings().weight.copy_(teacher.get_output_embeddings().weight)
    teacher = teacher.to(device=device, dtype=dtype).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = student.to(device=device, dtype=dtype).train()
    if remat:
        enable_gradient_checkpointing(student)
    objective = DistilyObjective(student.config.num_hidden_layers, teacher.config.num_hidden_layers, seq_len).to(device=device, dtype=dtype)
    return teacher, student, objective


def forward_loss(teacher, student, objective, input_ids, attention_mask=None):
    """The objective on one batch (graph attached to the student and the objective)."""
    want_hs = False  # the hidden-state component has weight 0 in the reference run
    with torch.no_grad():
        t_out = teacher(input_ids, attention_mask=attention_mask, output_attentions=True,
                        output_hidden_states=want_hs, use_cache=False)
    s_out = student(input_ids, attention_mask=attention_mask, output_attentions=True,
                    output_hidden_states=want_hs, use_cache=False)
    return objective(s_out, t_out)


class Trainer:
    """The training loop's step: forward, backward, clip, AdamW, schedule (what HF's Trainer
    does, minus its logging and data loading)."""

    def __init__(self, teacher, student, objective, total_steps: int, lr: float = 2e-4,
                 max_grad_norm: float = 1.0):
        self.teacher, self.student, self.objective = teacher, student, objective
        self.student_params = [p for p in student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.student_params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=0.0)
        # Distily: a second group from `optimizer.__class__(objective.parameters())`, i.e. with
        # the class's defaults (AdamW: lr 1e-3, weight decay 0.01).
        defaults = torch.optim.AdamW(list(objective.parameters())).defaults
        self.opt.add_param_group({"params": list(objective.parameters()), "lr": defaults["lr"],
                                  "weight_decay": defaults["weight_decay"]})
        self.sched = transformers.get_polynomial_decay_schedule_with_warmup(
            self.opt, num_warmup_steps=0, num_training_steps=total_steps, lr_end=1e-7, power=1.0)
        self.max_grad_norm = max_grad_norm

    def step(self, input_ids, attention_mask=None) -> torch.Tensor:
        """One optimizer step; returns the loss tensor (no host sync)."""
        loss, _ = forward_loss(self.teacher, self.student, self.objective, input_ids, attention_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student_params, self.max_grad_norm)  # HF: model only
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()
