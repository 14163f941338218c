#!/usr/bin/env python
"""Off-policy against on-policy distillation (docs/on_policy.md): trains configs/on_policy.py's
two variants (lmbda 0 and 1; the same teacher, batches and steps), then for each student gives
its held-out perplexity and the teacher's mean per-token log-likelihood of the student's own
samples (held-out prompts: each held-out row's first prompt_tokens tokens; max_new_tokens
tokens sampled at temperature 1, seed 0, up to EOS), and the seconds per step of each run.

    JAX_PLATFORMS=cpu python tools/compare_on_policy.py --workdir runs/compare_on_policy

Prints one JSON object; the runs stay in WORKDIR/off and WORKDIR/on (a rerun reuses them).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _teacher_loglik(workdir: Path, config, heldout, samples_seed: int = 0) -> dict:
    """The teacher's mean log-probability of the tokens the trained student samples after the
    held-out prompts, over every sampled token (EOS included)."""
    import jax.numpy as jnp

    from distil_jax import checkpoint, hf, models
    from distil_jax.training.builders import load_tokenizer
    from distil_jax.training.on_policy import OnPolicy

    t_cfg, t_params = hf.load_pretrained(workdir / "teacher")
    s_cfg = hf.load_config(workdir / "student")
    _, tree = checkpoint.restore_params(workdir)
    tokenizer = load_tokenizer(str(workdir / "tokenizer"))
    sampler = OnPolicy.from_config(_on(config), s_cfg, t_cfg, tokenizer, config.dataset.max_seq_len,
                                   jnp.float32)
    sampler = type(sampler)(**{**sampler.__dict__, "seed": samples_seed})
    total, count = 0.0, 0
    for start in range(0, len(heldout["input_ids"]), 16):
        rows = {k: v[start:start + 16] for k, v in heldout.items() if k != "loss_mask"}
        batch = sampler(0, rows, tree["student"], t_params)
        logp = jax.nn.log_softmax(models.forward(t_cfg, t_params, batch["input_ids"],
                                                 segment_ids=batch["segment_ids"]).logits)
        nxt = np.asarray(batch["input_ids"])[:, 1:]
        tok = np.take_along_axis(np.asarray(logp)[:, :-1], nxt[..., None], -1)[..., 0]
        counted = np.asarray(batch["loss_mask"])[:, :-1] > 0
        total, count = total + float(tok[counted].sum()), count + int(counted.sum())
    return {"teacher_logp_per_token": total / count, "sampled_tokens": count}


def _on(config):
    c = config.copy_and_resolve_references()
    c.objective.on_policy.lmbda = 1.0
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=20, help="timed steps of each kind (default 20)")
    args = p.parse_args()
    from distil_jax import config as config_lib
    from distil_jax.train import train
    from distil_jax.training import builders

    root = Path(args.workdir)
    out = {}
    for name, arg in (("off", "off"), ("on", "")):
        config = config_lib.load(str(ROOT / "configs" / "on_policy.py") + (":" + arg if arg else ""))
        workdir = root / name
        if name == "on" and not workdir.exists():  # the off run's (deterministic) teacher and data
            workdir.mkdir(parents=True)
            for sub in ("teacher", "data", "cache"):
                shutil.copytree(root / "off" / sub, workdir / sub)
        result = train(config, workdir)
        summary = json.loads((workdir / "run_summary.json").read_text())
        config = builders.with_demo_inputs(config, workdir)
        _, _, tokenizer, seq_len = builders.load_teacher(config)
        _, eval_sets, _ = builders.build_data(config, tokenizer, seq_len, workdir / "cache")
        res = summary["resources"]
        out[name] = {"heldout_ppl": result["eval"]["heldout"]["student_end"]["ppl"],
                     "teacher_ppl": result["eval"]["heldout"]["teacher"]["ppl"],
                     "student_start_ppl": result["eval"]["heldout"]["student_start"]["ppl"],
                     "train_tokens": res["train_tokens"], "steps": result["step"],
                     **_teacher_loglik(workdir, config, eval_sets["heldout"].rows)}
    out["s_per_step"] = _bench(config, root / "on", args.steps)
    print(json.dumps(out, indent=1))


def _bench(config, workdir: Path, steps: int) -> dict:
    """Median seconds per step at the run's shape (8 rows of 64 tokens): the step on the
    dataset's batches, and the sampling (generate + layout) then the step, each after a warm-up
    step (the compiles), every step waited for."""
    import statistics
    import time

    from distil_jax.train_step import BucketedTrainStep
    from distil_jax.training.builders import build_run

    run = build_run(config, workdir)
    # Packed rows, as the run: one step over every position (Session.make_step).
    step_fn = BucketedTrainStep(run.step_config, run.tx, run.schedule, buckets=0,
                                placement=run.step_placement,
                                trainable=run.trainable)
    times = {"off_policy": [], "on_policy": []}
    for i in range(2 * (steps + 1)):
        kind = "on_policy" if i % 2 else "off_policy"
        t = time.perf_counter()
        batch = next(run.batches)
        if kind == "on_policy":
            batch = run.on_policy(i, batch, run.state.params["student"], run.teacher_params)
        run.state, metrics = step_fn(run.state, run.teacher_params, batch)
        jax.block_until_ready(metrics)
        if i >= 2:
            times[kind].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}



if __name__ == "__main__":
    main()
