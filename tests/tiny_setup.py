"""Tiny, deterministic teacher / student / objective / batches shared by the objective, student
and train-step tests (4-layer teacher, width 32, vocab 101, sequences of 16)."""

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import student as student_lib
from distil_jax import models
from distil_jax.training import builders
from distil_jax.models.gpt2 import GPT2Config

VOCAB = 101
SEQ = 16
TEACHER_CONFIG = GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                                 bos_token_id=0, eos_token_id=0)

# The reference run's objective (configs/base.py), on the tiny models.
REFERENCE_OBJECTIVE = dict(
    logits=dict(weight=1, loss_fn="kl"),
    attn=dict(weight=5.0, loss_fn="raw_mse", layer_mapper="layer-2",
              norm="layernorm_teacher_only_affine", projector="orthogonal"),
)


def teacher(seed=0, sharpness=4.0):
    """(config, params): a random GPT-2 whose token embedding (= tied LM head) is scaled up so
    that its next-token distributions are far from uniform (a non-trivial target)."""
    params = models.init_params(TEACHER_CONFIG, jax.random.PRNGKey(seed))
    params = dict(params, wte={"embedding": params["wte"]["embedding"] * sharpness})
    return TEACHER_CONFIG, params


# A tiny Qwen3 (the Llama family with every optional parameter: q/k/v/o biases, q/k norms) with
# grouped-query attention (4 query heads, 2 key/value heads), for the sharding tests.
LLAMA_TEACHER_CONFIG = models.config_from_hf(dict(
    model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
    attention_bias=True, tie_word_embeddings=False, initializer_range=0.2, bos_token_id=0,
    eos_token_id=0))


def llama_teacher(seed=0):
    """(config, params): a random tiny Qwen3 (LLAMA_TEACHER_CONFIG)."""
    return LLAMA_TEACHER_CONFIG, models.init_params(LLAMA_TEACHER_CONFIG, jax.random.PRNGKey(seed))


def student(t_config, t_params, seed=1, **cfg):
    """build_student with a 2-layer student by default."""
    cfg.setdefault("overrides", {"n_layer": 2})
    return student_lib.build_student(t_config, t_params, cfg, jax.random.PRNGKey(seed))


def objective(s_config, t_config, **cfg):
    """A bound Objective: the reference objective, updated by `cfg`."""
    full = dict(REFERENCE_OBJECTIVE)
    full.update(cfg)
    return builders.build_objective(full, s_config, t_config)


def params_tree(obj, s_config, t_config, s_params, seed=2, seq=SEQ):
    """{"student", "objective"} with the objective's norm scale/bias moved away from 1/0, so a
    mix-up of the affine terms would show."""
    obj_params = obj.init_params(jax.random.PRNGKey(seed), s_config, t_config, seq)
    rs = np.random.RandomState(seed)

    def perturb(path, x):
        key = getattr(path[-1], "key", None)
        if key == "scale":
            return x + jnp.asarray(0.3 * rs.standard_normal(x.shape), jnp.float32)
        if key == "bias":
            return x + jnp.asarray(0.1 * rs.standard_normal(x.shape), jnp.float32)
        return x

    obj_params = jax.tree_util.tree_map_with_path(perturb, obj_params)
    return {"student": s_params, "objective": obj_params}


def segments(lengths, seq=SEQ):
    """One row of segment ids from a list of document lengths; the rest is padding (0)."""
    row = np.zeros(seq, np.int32)
    pos = 0
    for i, n in enumerate(lengths):
        row[pos:pos + n] = i + 1
        pos += n
    assert pos <= seq
    return row


# Rows: one full document; a padded document; three packed documents then padding; two packed
# documents filling the row.
ROWS_4 = [[SEQ], [10], [5, 4, 3], [7, 9]]
# Eight rows with different numbers of real tokens (for gradient accumulation).
ROWS_8 = [[SEQ], [3], [5, 4, 3], [7, 9], [1], [12], [2, 2, 2, 2], [8, 1]]


def batch(rows=ROWS_4, seed=0, seq=SEQ):
    """{"input_ids", "segment_ids"} as numpy int32; padded positions hold token 0 (EOS)."""
    seg = np.stack([segments(r, seq) for r in rows])
    ids = np.random.RandomState(seed).randint(1, VOCAB, seg.shape).astype(np.int32)
    ids = np.where(seg > 0, ids, 0).astype(np.int32)
    return {"input_ids": ids, "segment_ids": seg}


# The run's own mask of the trained tree {"student", "objective"}.
trainable_mask = builders.trainable_mask


def to_numpy(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def tiny_run_config(max_steps=None):
    """configs/tiny.py:test, the seconds-long run on the demo teacher (optionally cut to
    max_steps)."""
    path = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("test")
    if max_steps is not None:
        config.train.max_steps = max_steps
    return config


def run_and_export(tmp_path_factory, config):
    """(workdir, export folder) of a real training run of `config`."""
    from distil_jax import train
    from distil_jax.export import export

    workdir = tmp_path_factory.mktemp("run")
    train.train(config, workdir)
    return workdir, export(workdir, tmp_path_factory.mktemp("exports") / "student")


def seed_workdir(src: Path, dst: Path) -> Path:
    """A fresh workdir that reuses the (deterministic) demo teacher and corpus of `src` (no
    data folder when dataset.uri names the corpus)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("teacher", "data", "cache"):
        if (src / name).exists():
            shutil.copytree(src / name, dst / name)
    return dst


def start_until(cmd, ready, cwd, timeout: float = 300) -> subprocess.Popen:
    """Start the command `cmd` (on the CPU) and return it, still running, once `ready()` is
    true (its stderr kept for the caller; a crash or `timeout` seconds fail the test)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    return proc


def start_until_checkpoint(cmd, workdir: Path, step: int, cwd, timeout: float = 300) -> subprocess.Popen:
    """Start the training command `cmd` (on the CPU) and return it, still running, once the
    checkpoint of `step` exists in `workdir` (its stderr kept for the caller)."""
    return start_until(cmd, (workdir / "checkpoints" / str(step)).exists, cwd, timeout)
