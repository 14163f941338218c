#!/usr/bin/env python
"""Per-device memory of the reference train step on several meshes, from
`compiled.memory_analysis()` (lower + compile only: nothing is run, nothing is downloaded,
parameters are never allocated).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tools/sharding_memory.py --json mem.json

The reference shapes: a GPT-2-small-shaped teacher (12 layers, width 768, vocab 50257) held in
bfloat16, a 6-layer student with float32 master weights and Adam state computing in bfloat16,
the reference objective (KL on logits + attention maps through the 1024 x 1024 orthogonal
projector), batches of 8 x 1024, remat on. `--teacher llama-7b` uses a Llama-2-7B-shaped
teacher (32 layers, 4096 wide, 32 heads, MLP 11008, vocab 32000) and a 16-layer student of the
same width (needs the llama family). `--teacher llama3-8b` is a modern pair: a Llama-3.1-8B-shaped
teacher (32 layers, 4096 wide, 32 query and 8 key/value heads, MLP 14336, vocab 128256, untied,
RoPE theta 500000 with the llama3 scaling of its HF config) and a Llama-3.2-1B-shaped student
(16 layers, 2048 wide, 32 query and 8 key/value heads, MLP 8192, tied embeddings), with the
objective of configs/smollm2.py (the project's Llama-family config).

XLA's CPU compiler schedules for thread concurrency by default
(`--xla_cpu_enable_concurrency_optimized_scheduler`, "trading off extra memory pressure": it
extends the live ranges of temporaries so independent operations run on separate threads). That
is a CPU throughput choice, not what the step needs: the tool compiles with the memory-minimizing
scheduler unless `--cpu-scheduler concurrency` asks for XLA's default (docs/scaling.md has both).
`--logits-chunk-tokens N` sets the objective's `logits_chunk_tokens` (default: the objective's
own setting, whose automatic rule looks at this machine's RAM, not at an accelerator's memory).

For each mesh it prints: the bytes one device holds of the student's parameters + Adam state
(from the shardings), of the teacher, XLA's argument and temporary bytes per device, the ratio of
the sharded state to the replicated one (every byte on each device, as data=8 holds it), and the
seconds to lower and compile the step. The "one device" mesh runs on the first device alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MESHES = {
    "one device": {"data": 1, "fsdp": 1, "tensor": 1},
    "data=8": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp=8": {"data": 1, "fsdp": 8, "tensor": 1},
    "data=2 x fsdp=4": {"data": 2, "fsdp": 4, "tensor": 1},
    "data=2 x fsdp=2 x tensor=2": {"data": 2, "fsdp": 2, "tensor": 2},
}

TEACHERS = {
    "gpt2": (dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
                  n_positions=1024, bos_token_id=50256, eos_token_id=50256), {"n_layer": 6}),
    "llama-7b": (dict(model_type="llama", num_hidden_layers=32, hidden_size=4096,
                      num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                      vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False), {"num_hidden_layers": 16}),
    # Shapes of Llama-3.1-8B and Llama-3.2-1B as in their HF config.json files; the student is a
    # whole config (another width), not overrides of the teacher's.
    "llama3-8b": (dict(model_type="llama", num_hidden_layers=32, hidden_size=4096,
                       num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                       vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=False,
                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0,
                                         original_max_position_embeddings=8192)),
                  dict(model_type="llama", num_hidden_layers=16, hidden_size=2048,
                       num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                       vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=True,
                       rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0,
                                         original_max_position_embeddings=8192))),
}
# The pairs whose objective is a config file's (the others use the reference objective below).
OBJECTIVE_CONFIGS = {"llama3-8b": REPO / "configs" / "smollm2.py"}


def pair(teacher: str):
    """(teacher config, student config): the student is the teacher's config with overrides, or
    a whole HF config of its own (one with a model_type)."""
    from distil_jax import models

    hf, student = TEACHERS[teacher]
    tc = models.config_from_hf(hf)
    return tc, models.config_from_hf(student) if "model_type" in student else tc.replace(**student)


def objective(teacher: str, sc, tc, logits_chunk_tokens=None):
    """The pair's bound objective: its config file's, else the reference run's;
    logits_chunk_tokens (not None) replaces its `logits_chunk_tokens`."""
    import dataclasses

    from distil_jax.objectives.objective import Objective

    if teacher in OBJECTIVE_CONFIGS:
        from distil_jax import config as config_lib
        from distil_jax.training.builders import build_objective

        section = config_lib.load(str(OBJECTIVE_CONFIGS[teacher])).objective.to_dict()
        obj = build_objective(section, sc, tc)
    else:
        obj = Objective.from_config(dict(
            logits=dict(weight=1.0, loss_fn="kl"),
            attn=dict(weight=5.0, loss_fn="raw_mse", layer_mapper="layer-2",
                      norm="layernorm_teacher_only_affine", projector="orthogonal"))).bind(sc, tc)
    if logits_chunk_tokens is not None:
        obj = dataclasses.replace(obj, logits_chunk_tokens=logits_chunk_tokens)
    return obj


def measure(teacher: str, batch: int, seq: int, meshes, logits_chunk_tokens=None) -> dict:
    import jax
    import jax.numpy as jnp

    from distil_jax import models, sharding
    from distil_jax import train_step as ts

    tc, sc = pair(teacher)
    t_shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                                      models.param_shapes(tc))
    obj = objective(teacher, sc, tc, logits_chunk_tokens)
    params = jax.eval_shape(lambda k: {"student": models.init_params(sc, k),
                                       "objective": obj.init_params(k, sc, tc, seq)},
                            jax.random.PRNGKey(0))
    mask = jax.tree_util.tree_map(lambda _: True, params)
    tx, sched = ts.make_optimizer(dict(optimizer="adam", learning_rate=2e-4, max_grad_norm=1.0),
                                  100, mask)
    state = jax.eval_shape(lambda p: ts.create_train_state(p, tx, jax.random.PRNGKey(0)), params)
    step_cfg = ts.StepConfig(tc, sc, obj, dtype=jnp.bfloat16, remat=True)
    out = {"teacher": teacher, "batch": batch, "seq": seq, "devices": jax.device_count(),
           "teacher_params": models.param_count(tc), "student_params": models.param_count(sc),
           "meshes": {}}
    for name, spec in meshes.items():
        t0 = time.time()
        n = spec["data"] * spec["fsdp"] * spec["tensor"]
        mesh = sharding.make_mesh(spec, jax.devices()[:n])
        placement = sharding.make_placement(mesh, state, sc, tc, t_shapes)
        step_cfg_m = ts.for_batch_shape(
            __import__("dataclasses").replace(step_cfg, logits_groups=sharding.batch_shards(mesh)),
            batch, seq)
        step = ts.make_train_step(step_cfg_m, tx, sched, placement=placement)
        abstract = lambda tree, shard: jax.tree_util.tree_map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shard)
        b = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=placement.batch)
             for k in ("input_ids", "segment_ids")}
        compiled = step.lower(abstract(state, placement.state), abstract(t_shapes, placement.teacher),
                              b).compile()
        ma = compiled.memory_analysis()
        out["meshes"][name] = {
            "spec": spec,
            "student_state_bytes": sharding.bytes_per_device(
                (state.params, state.opt_state), (placement.state.params, placement.state.opt_state)),
            "teacher_bytes": sharding.bytes_per_device(t_shapes, placement.teacher),
            "argument_bytes": int(ma.argument_size_in_bytes),
            "temp_bytes": int(ma.temp_size_in_bytes),
            "output_bytes": int(ma.output_size_in_bytes),
            "alias_bytes": int(ma.alias_size_in_bytes),
            "compile_s": round(time.time() - t0, 1),
        }
        print(name, json.dumps(out["meshes"][name]), flush=True)
    # Replicated: every byte on each device (what data=8 or one device holds).
    state_1 = sum(x.size * x.dtype.itemsize
                  for x in jax.tree_util.tree_leaves((state.params, state.opt_state)))
    teacher_1 = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(t_shapes))
    for m in out["meshes"].values():
        m["student_state_vs_replicated"] = m["student_state_bytes"] / state_1
        m["teacher_vs_replicated"] = m["teacher_bytes"] / teacher_1
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def table(out: dict) -> str:
    lines = ["| mesh | trainable params + Adam | teacher | XLA arguments | XLA temporaries | "
             "state / replicated | teacher / replicated | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in out["meshes"].items():
        lines.append(f"| {name} | {_mib(m['student_state_bytes'])} | {_mib(m['teacher_bytes'])} | "
                     f"{_mib(m['argument_bytes'])} | {_mib(m['temp_bytes'])} | "
                     f"{m.get('student_state_vs_replicated', 1):.3f} | "
                     f"{m.get('teacher_vs_replicated', 1):.3f} | {m['compile_s']} |")
    return "\n".join(lines) + "\n(MiB per device)"


def _set_cpu_scheduler(kind: str) -> None:
    """Adds the scheduler flag to XLA_FLAGS. XLA reads them once, when jax starts its CPU
    backend, so this runs before `measure` imports jax."""
    import os

    flag = "--xla_cpu_enable_concurrency_optimized_scheduler="
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag + str(kind == "concurrency").lower()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="gpt2", choices=sorted(TEACHERS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--meshes", default=",".join(m for m in MESHES if m != "one device"),
                   help=f"comma-separated names of MESHES: {', '.join(MESHES)}")
    p.add_argument("--json", default=None)
    p.add_argument("--logits-chunk-tokens", type=int, default=None,
                   help="the objective's logits_chunk_tokens (0: never chunk; default: its own)")
    p.add_argument("--cpu-scheduler", choices=("memory", "concurrency"), default="memory",
                   help="XLA:CPU's schedule: memory-minimizing (default here) or XLA's "
                        "default, which extends live ranges for thread concurrency")
    a = p.parse_args(argv)
    meshes = {k: MESHES[k] for k in a.meshes.split(",")}
    _set_cpu_scheduler(a.cpu_scheduler)
    out = measure(a.teacher, a.batch, a.seq_len, meshes, a.logits_chunk_tokens)
    out.update(cpu_scheduler=a.cpu_scheduler, logits_chunk_tokens=a.logits_chunk_tokens)
    print(table(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
