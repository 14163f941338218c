"""Text generation with either model family: a key/value cache, greedy or sampled tokens.

    python -m distil_jax.generate (--workdir DIR | --model DIR) --prompt TEXT [--prompt TEXT ...]
                                  [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                                  [--seed S] [--step N]

`generate` is one jitted function per (batch, prompt length, max_new_tokens) and setting: a
prefill (one forward over the prompt that fills every layer's keys and values into a
`models.KVCache`), then a `lax.while_loop` that feeds one token per iteration and attends over
the cache, until every row has ended (EOS) or `max_new_tokens` are written. The blocks are the
training modules with their parameters (`forward(..., cache=)`), so what is generated is what the
trained model computes. Prompts are LEFT-padded (attention_mask 0 on the left); positions count
from each row's first real token, as transformers' `generate` derives position_ids from the
attention mask, and the next token is chosen as its `generate` does (`distil_jax.sampling`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import cli, models, sampling
from distil_jax.models.common import head_logits

__all__ = ["generate", "prompt_positions", "main"]


def prompt_positions(attention_mask: jax.Array) -> jax.Array:
    """Position ids [B, S] int32 of left-padded rows: 0 at each row's first real token (padding
    gets 1, as transformers' `generate` fills it; no real token attends to it)."""
    positions = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    return jnp.where(attention_mask.astype(bool), positions, 1)


def generate(config, params: Mapping, input_ids, attention_mask=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rng: Optional[jax.Array] = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: Optional[int] = None, dtype: Any = jnp.float32) -> jax.Array:
    """Continue each prompt by `max_new_tokens` tokens.

    Args:
      config: the model's config (any family); params: its parameters.
      input_ids: [B, P] int prompts, LEFT-padded to a common length P.
      attention_mask: [B, P], 1 on real tokens and 0 on the left padding (None: no padding).
      max_new_tokens: N, the tokens to add (P + N <= config.max_positions).
      temperature: 0 is greedy (argmax); > 0 samples from the softmax of the logits divided by
        it, filtered by top_k (0 = off) and top_p (1 = off), as transformers does.
      rng: the sampling key (needed when temperature > 0); the same key gives the same tokens.
      eos_token_id: a token id (or several) that ends a row; after it the row holds pad_token_id.
      pad_token_id: the fill after EOS (default: the first eos_token_id, transformers' default).
      dtype: the compute dtype (float32 default; the logits are float32 either way).

    Returns:
      [B, P + N] int32: the prompts as given, then the new tokens.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    B, P = input_ids.shape
    mask = jnp.ones((B, P), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    _check(config, P, max_new_tokens, temperature, top_k, top_p, rng)
    eos = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).astype(int).tolist())
    pad = int(pad_token_id if pad_token_id is not None else eos[0] if eos else 0)
    choose = _Choice(float(temperature), int(top_k), float(top_p), eos, pad)
    new = _generate(config, params, input_ids, mask, None if temperature == 0 else rng,
                    n_new=int(max_new_tokens), choose=choose, dtype=jnp.dtype(dtype))
    return jnp.concatenate([input_ids, new], axis=1)


def _check(config, prompt_len: int, max_new_tokens: int, temperature, top_k, top_p, rng) -> None:
    """One-line errors before anything compiles."""
    sampling.check_settings(temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > config.max_positions:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's {config.max_positions} positions; shorten the prompt or ask for "
                         f"at most {config.max_positions - prompt_len} new tokens")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key; pass rng=jax.random.key(seed)")


@dataclasses.dataclass(frozen=True)
class _Choice:
    """How a row's next token is chosen (`sampling.next_token`) and when the row ends: frozen
    and hashable, a static argument of the jitted `_generate` (one compile per setting)."""

    temperature: float
    top_k: int
    top_p: float
    eos: tuple
    pad: int

    def __call__(self, logits, rng, step, done):
        """(token [B] int32, done [B] bool): the pad id for rows that ended before this step."""
        key = None if rng is None else jax.random.fold_in(rng, step)
        token = sampling.next_token(logits, key, temperature=self.temperature, top_k=self.top_k,
                                    top_p=self.top_p)
        token = jnp.where(done, self.pad, token)
        ends = jnp.isin(token, jnp.asarray(self.eos, jnp.int32)) if self.eos else jnp.zeros_like(done)
        return token, done | ends


@functools.partial(jax.jit, static_argnames=("config", "n_new", "choose", "dtype"))
def _generate(config, params, input_ids, mask, rng, *, n_new: int, choose: _Choice, dtype):
    """The new tokens [B, n_new] int32: the prefill, then one token per loop iteration."""
    B, P = input_ids.shape
    cache = models.init_cache(config, B, P + n_new, dtype)
    positions = prompt_positions(mask)
    logits, cache = _logits(config, params, input_ids, mask, positions, cache, dtype)
    token, done = choose(logits, rng, 0, jnp.zeros((B,), bool))
    tokens = jnp.full((B, n_new), choose.pad, jnp.int32).at[:, 0].set(token)
    # The next token's position: one past the row's last (real) prompt token.
    position = positions[:, -1] + 1

    def more(carry):
        step, _, _, _, done = carry
        return (step < n_new) & ~jnp.all(done)

    def one(carry):
        step, tokens, cache, position, done = carry
        logits, cache = _logits(config, params, tokens[:, step - 1, None], jnp.ones((B, 1), jnp.int32),
                                position[:, None], cache, dtype)
        token, done = choose(logits, rng, step, done)
        return step + 1, tokens.at[:, step].set(token), cache, position + 1, done

    carry = (jnp.int32(1), tokens, cache, position, done)
    return jax.lax.while_loop(more, one, carry)[1]


def _logits(config, params, ids, mask, positions, cache, dtype):
    """(float32 logits [B, V] of the last position, the cache with `ids`' keys and values)."""
    out = models.forward(config, params, ids, mask, positions=positions, cache=cache, dtype=dtype,
                         return_last_hidden=True)
    return head_logits(out.last_hidden_state[:, -1], models.lm_head(config, params)), out.cache


# ----------------------------------------------------------------------------- the command


def complete(config, params: Mapping, tokenizer, prompts: Sequence[str], *, seed: int = 0,
             **settings) -> list[str]:
    """The completion (new text only) of each prompt: one left-padded batch through `generate`
    with `settings` (max_new_tokens, temperature, top_k, top_p); EOS ends a row (the config's
    eos_token_id, else the tokenizer's)."""
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else np.atleast_1d(eos)[0] if eos is not None else 0
    rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    for prompt, row in zip(prompts, rows):
        if not row:
            raise ValueError(f"the prompt {prompt!r} has no tokens; give a non-empty --prompt")
    length = max(len(r) for r in rows)
    ids = np.array([[pad] * (length - len(r)) + list(r) for r in rows], np.int32)
    mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows], np.int32)
    out = generate(config, params, ids, mask, rng=jax.random.key(seed), eos_token_id=eos,
                   pad_token_id=int(pad), **settings)
    return tokenizer.batch_decode(np.asarray(out)[:, length:], skip_special_tokens=True)


def _load(args) -> tuple:
    """(config, params, tokenizer) of --workdir (its checkpoint's student, as `export` reads
    it, and the run's tokenizer) or of the HF folder --model."""
    import transformers

    from distil_jax import export, hf

    if args.model is not None:
        config, params = hf.load_pretrained(args.model)
        return config, params, transformers.AutoTokenizer.from_pretrained(hf.resolve_folder(args.model))
    workdir = Path(args.workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist (or is not a folder); pass the "
                                "--workdir of a training run")
    for need in ("student/config.json", "tokenizer"):
        if not (workdir / need).exists():
            raise FileNotFoundError(f"no {need} in {workdir}: pass the --workdir of a run written "
                                    "by python -m distil_jax.train")
    config = hf.load_config(workdir / "student")
    _, params = export._student_params(workdir, args.step, config)
    return config, params, transformers.AutoTokenizer.from_pretrained(workdir / "tokenizer")


def main(argv: Optional[list[str]] = None) -> int:
    p = cli.parser("generate", "Continue prompts with a training run's student (its latest "
                   "checkpoint) or a Hugging Face model folder (e.g. an export).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a training run's workdir (its checkpoint's student)")
    source.add_argument("--model", help="a Hugging Face model folder (or hub id)")
    p.add_argument("--step", type=int, default=None,
                   help="with --workdir: the checkpoint step (default: the latest)")
    p.add_argument("--prompt", action="append", required=True,
                   help="a text to continue (repeat for several; they run as one batch)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=64,
                   help="tokens to add to each prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0,
                   help="sample from the k most likely tokens (0, default: all)")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0,
                   help="sample from the smallest set of tokens with this much probability (1: all)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    return cli.command(p, list(sys.argv[1:] if argv is None else argv), _main)


def _main(args, _config=None) -> int:
    if args.step is not None and args.workdir is None:
        print("error: --step needs --workdir", file=sys.stderr)
        return 2
    try:
        config, params, tokenizer = _load(args)
        texts = complete(config, params, tokenizer, args.prompt, seed=args.seed,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, (prompt, text) in enumerate(zip(args.prompt, texts)):
        print(f"--- {i + 1}/{len(texts)}")
        print(prompt + text)
    return 0


if __name__ == "__main__":
    cli.exit(main())
