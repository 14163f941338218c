#!/usr/bin/env python
"""New tokens per second of `distil_jax.generate.generate` against transformers' `generate` on the
same random GPT-2 (saved with save_pretrained and loaded by `distil_jax.hf`), the same batch, in
one process, greedy, every row running all new tokens (no EOS), on the CPU.

    JAX_PLATFORMS=cpu python tools/bench_generate.py --layers 12 --width 768 --heads 12 \\
        --batch 8 --prompt-len 64 --new-tokens 64 --repeats 3

Each side runs once untimed (jax: the compile; torch: its first-call set-up), then `--repeats`
timed calls; the table gives the median and min of a call's wall time (prefill + decoding) and
new tokens/s = batch x new tokens / median. Prompts are random ids of the full prompt length (no
padding). It also says whether the two sides wrote the same tokens (float32 both; a random
model's near-ties can flip a late token, so this is a check, not a requirement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import numpy as np


def _model(args):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads,
                                  vocab_size=args.vocab, n_positions=args.prompt_len + args.new_tokens)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.generation_config.eos_token_id = None  # every row runs all new tokens
    return model


def _time(fn, repeats: int) -> tuple[list[float], object]:
    fn()  # warm-up: compile (jax) / first-call set-up (torch), not timed
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def run(args) -> dict:
    import jax
    import torch

    from distil_jax import hf
    from distil_jax.generate import generate

    load_at_start = os.getloadavg()
    model = _model(args)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config, params = hf.load_pretrained(folder)

    def ours():
        return np.asarray(jax.block_until_ready(generate(config, params, ids, max_new_tokens=args.new_tokens)))

    def theirs():
        with torch.no_grad():
            return model.generate(torch.as_tensor(ids, dtype=torch.long),
                                  attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                  do_sample=False, max_new_tokens=args.new_tokens,
                                  pad_token_id=0).numpy()

    t0 = time.perf_counter()
    ours()
    first_call = time.perf_counter() - t0
    jax_times, jax_out = _time(ours, args.repeats)
    torch_times, torch_out = _time(theirs, args.repeats)
    new = args.batch * args.new_tokens
    same = jax_out.shape == torch_out.shape and float((jax_out == torch_out).mean())
    return {
        "shape": vars(args),
        "jax": _side(jax_times, new) | {"first_call_s (compile + run)": round(first_call, 2)},
        "transformers": _side(torch_times, new),
        "speedup (jax / transformers tokens/s)": round(statistics.median(torch_times)
                                                      / statistics.median(jax_times), 2),
        "same tokens (share)": same,
        "machine": _machine() | {"load_average_at_start": load_at_start},
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "torch threads": torch.get_num_threads()},
    }


def _side(times: list[float], new_tokens: int) -> dict:
    med = statistics.median(times)
    return {"median_s": round(med, 3), "min_s": round(min(times), 3),
            "new_tokens_per_s": round(new_tokens / med, 1)}


def _machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                    if line.startswith("Model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_end": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
