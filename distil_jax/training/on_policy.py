"""On-policy distillation (GKD, Agarwal et al. 2024; TRL's `GKDTrainer`): on a fraction `lmbda`
of the steps the student continues each row's prompt, and the step's losses are taken on its own
completion, which the teacher scores. With `seq_kd` the teacher writes the completions instead
(sequence-level KD). docs/on_policy.md.

`OnPolicy(step, batch, student_params, teacher_params)` is called by the loop before the step:
it returns the batch unchanged on an off-policy step, else a batch of the same shape and keys
the jitted step already takes (`input_ids`, `segment_ids`, `loss_mask` [B, S] int32), each row
one segment: the prompt, then the sampled completion up to and including its EOS, then padding
(segment 0). `loss_mask` is 1 exactly on the positions that predict a completion token, so the
unchanged step counts the completion only, as TRL slices `logits[:, prompt_len - 1:-1]`.

Which steps are on-policy, and what is sampled, follow from `train.seed` and the step alone
(`jax.random.fold_in`), like GKD's `random.random() <= lmbda` but reproducible: a resumed run
makes the same choices and draws the same tokens as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from distil_jax import sharding
from distil_jax.data.batches import ROW_TOKENS
from distil_jax.generate import generate

__all__ = ["OnPolicy", "is_on_policy", "prompts", "completion_rows"]

# Separates these keys from the other uses of train.seed (initialization, dropout).
_TAG = 0x6B44


def step_keys(seed: int, step: int) -> tuple[jax.Array, jax.Array]:
    """(decision key, sampling key) of optimizer step `step` (0-based) of a run seeded `seed`."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _TAG), step)
    decide, sample = jax.random.split(key)
    return decide, sample


def is_on_policy(seed: int, step: int, lmbda: float) -> bool:
    """Whether step `step` trains on sampled completions: a uniform draw from the step's key
    below `lmbda` (so lmbda 0 never, 1 always)."""
    if lmbda <= 0:
        return False
    return bool(jax.random.uniform(step_keys(seed, step)[0]) < lmbda)


def _prompt(ids: np.ndarray, seg: np.ndarray, loss_mask: Optional[np.ndarray],
            prompt_tokens: int) -> np.ndarray:
    """The prompt of one row: its first segment's tokens before the last counted run of the
    loss mask (the last assistant turn / the completion, whose header the prompt keeps), or,
    without a counted position, the segment's first `prompt_tokens` tokens."""
    real = np.flatnonzero(seg == 1)
    tokens = ids[real]
    if loss_mask is not None:
        counted = loss_mask[real] > 0
        if counted.any():
            # Position p counted = token p + 1 counted: the prompt ends at the last run's first p.
            return tokens[:_last_run_start(counted) + 1]
    return tokens[:prompt_tokens]


def _last_run_start(counted: np.ndarray) -> int:
    """The index where the last run of True in `counted` (which has one) begins."""
    end = len(counted) - 1 - int(np.argmax(counted[::-1]))
    start = end
    while start > 0 and counted[start - 1]:
        start -= 1
    return start


def prompts(batch: Mapping[str, np.ndarray], width: int, prompt_tokens: int,
            pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded prompts of a batch's rows.

    Returns (input_ids [B, width] int32, attention_mask [B, width] int32, empty [B] bool). A
    prompt longer than `width` keeps its last `width` tokens (those next to the completion). A
    row with no real token (an epoch's filler row) gets one pad token, to be dropped again
    (`empty`): the generation needs a token to attend to."""
    ids, seg = np.asarray(batch["input_ids"]), np.asarray(batch["segment_ids"])
    loss_mask = batch.get("loss_mask")
    B = ids.shape[0]
    out = np.full((B, width), pad_id, np.int32)
    mask = np.zeros((B, width), np.int32)
    empty = np.zeros(B, bool)
    for r in range(B):
        p = _prompt(ids[r], seg[r], None if loss_mask is None else np.asarray(loss_mask[r]),
                    prompt_tokens)[-width:]
        if len(p) == 0:
            empty[r], p = True, np.array([pad_id], np.int32)
        out[r, width - len(p):], mask[r, width - len(p):] = p, 1
    return out, mask, empty


def completion_rows(tokens: np.ndarray, prompt_mask: np.ndarray, empty: np.ndarray,
                    eos: tuple, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The step's rows from `generate`'s output.

    tokens: [B, W + N] (left-padded prompts of width W, then N new tokens); prompt_mask [B, W].
    Returns {input_ids, segment_ids, loss_mask} int32 [B, seq_len]: each row's prompt, then its
    completion up to and including the first EOS (all N tokens without one), segment 1; then
    padding (pad_id, segment 0). loss_mask is 1 on the positions that predict a completion
    token: prompt_len - 1 ... prompt_len + completion_len - 2."""
    tokens = np.asarray(tokens)
    B, W = prompt_mask.shape
    new = tokens[:, W:]
    ids = np.full((B, seq_len), pad_id, np.int32)
    seg = np.zeros((B, seq_len), np.int32)
    loss = np.zeros((B, seq_len), np.int32)
    for r in range(B):
        if empty[r]:
            continue
        prompt = tokens[r, :W][prompt_mask[r] > 0]
        ends = np.flatnonzero(np.isin(new[r], eos)) if eos else np.array([], int)
        completion = new[r, :ends[0] + 1] if len(ends) else new[r]
        n_p, n = len(prompt), len(prompt) + len(completion)
        ids[r, :n] = np.concatenate([prompt, completion])
        seg[r, :n] = 1
        loss[r, n_p - 1:n - 1] = 1
    return {"input_ids": ids, "segment_ids": seg, "loss_mask": loss}


@dataclasses.dataclass(frozen=True)
class OnPolicy:
    """A run's on-policy sampling (objective.on_policy), called before each step."""

    lmbda: float
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seq_kd: bool
    prompt_tokens: int
    seed: int
    seq_len: int
    student_cfg: Any
    teacher_cfg: Any
    eos: tuple
    pad_id: int
    dtype: Any

    @classmethod
    def from_config(cls, config, student_cfg, teacher_cfg, tokenizer, seq_len: int,
                    dtype) -> Optional["OnPolicy"]:
        """The run's sampler, or None when objective.on_policy.lmbda is 0 (off-policy)."""
        op = config.objective.on_policy
        if not op.lmbda:
            return None
        eos = _eos_ids(student_cfg, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        return cls(lmbda=float(op.lmbda), max_new_tokens=int(op.max_new_tokens),
                   temperature=float(op.temperature), top_k=int(op.top_k), top_p=float(op.top_p),
                   seq_kd=bool(op.seq_kd), prompt_tokens=int(op.prompt_tokens),
                   seed=int(config.train.seed), seq_len=int(seq_len), student_cfg=student_cfg,
                   teacher_cfg=teacher_cfg, eos=eos, pad_id=int(pad), dtype=dtype)

    def prompt_width(self, batch: Mapping) -> int:
        """Prompts of plain text are `prompt_tokens` long; those of chat / prompt-completion rows
        fill the row but for the completion's room. One width per run: one compiled generation."""
        if "loss_mask" in batch:
            return self.seq_len - self.max_new_tokens
        return self.prompt_tokens

    def __call__(self, step: int, batch: Mapping, student_params, teacher_params) -> Mapping:
        """The batch of step `step` (0-based): `batch` itself off-policy, else the sampled rows.
        Every batch it returns has a loss_mask, so the step compiles once: sampled rows carry
        one, and a plain-text batch gets all ones (every position counts, as without one)."""
        if not is_on_policy(self.seed, step, self.lmbda):
            if "loss_mask" in batch:
                return batch
            return {**batch, "loss_mask": np.ones_like(batch["segment_ids"], np.int32)}
        ids, mask, empty = prompts(batch, self.prompt_width(batch), self.prompt_tokens, self.pad_id)
        cfg, params = (self.teacher_cfg, teacher_params) if self.seq_kd else (self.student_cfg, student_params)
        # Several processes: `batch` holds this process's rows (and every row's real tokens,
        # ROW_TOKENS); the prompts become one global batch placed like the step's rows, every
        # process runs the same generation, and each keeps the completions of its own rows.
        mesh = _mesh(params) if jax.process_count() > 1 else None
        global_rows = len(batch[ROW_TOKENS]) if ROW_TOKENS in batch else None
        if mesh is not None:
            g_ids, g_mask = sharding.place_batch({"i": ids, "m": mask}, mesh, global_rows).values()
        out = generate(cfg, params, ids if mesh is None else g_ids, mask if mesh is None else g_mask,
                       max_new_tokens=self.max_new_tokens,
                       temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       rng=step_keys(self.seed, step)[1], eos_token_id=self.eos or None,
                       pad_token_id=self.pad_id, dtype=self.dtype)
        out = jax.device_get(out) if mesh is None else sharding.local_rows(out, mesh)
        rows = completion_rows(out, mask, empty, self.eos, self.seq_len, self.pad_id)
        if ROW_TOKENS in batch:  # the padding-aware step's bucket: every row's real tokens
            tokens = (rows["segment_ids"] > 0).sum(-1).astype(np.int32)
            if mesh is not None:  # a host sync on sampling steps only (they wait for generate anyway)
                tokens = multihost_utils.process_allgather(
                    sharding.place_batch({"t": tokens}, mesh, global_rows)["t"], tiled=True)
            rows[ROW_TOKENS] = np.asarray(tokens, np.int32)
        return rows


def _mesh(params) -> jax.sharding.Mesh:
    """The mesh the (trained, placed) parameters live on."""
    return jax.tree_util.tree_leaves(params)[0].sharding.mesh


def _eos_ids(model_cfg, tokenizer) -> tuple:
    """The ids that end a completion: the model config's eos_token_id where it is inside the
    vocabulary (an instruct model's end of turn), else the tokenizer's."""
    eos = getattr(model_cfg, "eos_token_id", None)
    ids = tuple(int(i) for i in np.atleast_1d(eos)) if eos is not None else ()
    if ids and all(0 <= i < model_cfg.vocab_size for i in ids):
        return ids
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
