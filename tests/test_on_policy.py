"""On-policy distillation (distil_jax/training/on_policy.py): config errors, the deterministic
choice of steps, the batch layout of sampled rows, the loss on them against a float64 NumPy
recomputation of TRL's generalized JSD, and a tiny run that trains, resumes after SIGKILL to the
uninterrupted run's parameters and exports.

Tolerances: LOSS_TOL = 1e-5 absolute (float32 step against float64 NumPy, losses of order 0.1-10,
as tests/test_objective.py); the resumed run: bitwise (CPU).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distil_jax import checkpoint, config as config_lib, export, models
from distil_jax import train_step as ts
from distil_jax.train import train
from distil_jax.generate import generate
from distil_jax.training.on_policy import (OnPolicy, completion_rows, is_on_policy, prompts,
                                             step_keys)
from tests import tiny_setup as T

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
LOSS_TOL = 1e-5
EOS = 0


def tiny_config(**on_policy):
    c = config_lib.load(TINY + ":test")
    c.objective.on_policy.update(on_policy)
    return c


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value, message", [
    ("lmbda", 1.5, "objective.on_policy.lmbda=1.5"),
    ("lmbda", -0.1, "objective.on_policy.lmbda=-0.1"),
    ("max_new_tokens", 0, "objective.on_policy.max_new_tokens=0"),
    ("max_new_tokens", 32, "use fewer than dataset.max_seq_len=32"),
    ("prompt_tokens", 30, "use at most 16"),
    ("temperature", -1.0, "objective.on_policy.temperature=-1.0"),
    ("top_p", 0.0, "objective.on_policy.top_p=0.0"),
    ("top_k", -2, "objective.on_policy.top_k=-2"),
])
def test_config_values_out_of_range_are_one_line_errors(field, value, message):
    c = tiny_config(lmbda=0.5, max_new_tokens=16)
    c.objective.on_policy[field] = value
    with pytest.raises(ValueError) as e:
        config_lib.validate(c)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_teacher_cache_is_refused_on_policy():
    c = tiny_config(lmbda=0.5)
    c.teacher.cache = "/some/cache"
    with pytest.raises(ValueError, match=r"with teacher.cache: the cache holds"):
        config_lib.validate(c)
    c = tiny_config(lmbda=0.5)  # several processes sample together (tests/test_sharding.py)
    c.train.num_processes, c.train.coordinator_address = 2, "localhost:1234"
    config_lib.validate(c)
    config_lib.validate(tiny_config())  # lmbda 0 (the default): no constraint


def test_a_run_from_before_on_policy_resumes_and_a_change_of_lmbda_is_refused():
    from distil_jax import workdir

    new = tiny_config().to_dict()
    old = tiny_config().to_dict()
    del old["objective"]["on_policy"]
    assert workdir.config_changes(old, new) == ({}, {})
    changed = tiny_config(lmbda=0.5).to_dict()
    assert list(workdir.config_changes(new, changed)[0]) == ["objective.on_policy.lmbda"]


def test_choice_of_steps_is_deterministic_and_a_fraction_lmbda():
    draws = [is_on_policy(7, s, 0.3) for s in range(2000)]
    assert draws == [is_on_policy(7, s, 0.3) for s in range(2000)]
    assert abs(np.mean(draws) - 0.3) < 0.04  # 2000 Bernoulli(0.3) draws: 4 sigma is 0.041
    assert draws != [is_on_policy(8, s, 0.3) for s in range(2000)]
    assert not any(is_on_policy(7, s, 0.0) for s in range(200))
    assert all(is_on_policy(7, s, 1.0) for s in range(200))


# ----------------------------------------------------------------------------- batch layout


def test_prompts_come_from_the_completion_mask_or_the_first_tokens():
    # Row 0: prompt/completion (loss_mask 1 on positions predicting the completion 7, 8, 9);
    # row 1: chat with two assistant turns (the prompt ends before the last one's first token);
    # row 2: no counted position: plain text, its first prompt_tokens tokens; row 3: filler.
    ids = np.array([[1, 2, 3, 7, 8, 9, 0, 0], [4, 5, 6, 5, 6, 6, 6, 0],
                    [11, 12, 13, 14, 15, 0, 0, 0], [0] * 8], np.int32)
    seg = np.array([[1] * 6 + [0] * 2, [1] * 7 + [0], [1] * 5 + [0] * 3, [0] * 8], np.int32)
    loss = np.array([[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 1, 1, 0, 0], [0] * 8, [0] * 8], np.int32)
    out, mask, empty = prompts({"input_ids": ids, "segment_ids": seg, "loss_mask": loss}, 5, 2, 99)
    np.testing.assert_array_equal(out, [[99, 99, 1, 2, 3], [4, 5, 6, 5, 6], [99, 99, 99, 11, 12],
                                        [99, 99, 99, 99, 99]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1],
                                         [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(empty, [False, False, False, True])
    # A prompt longer than the width keeps its last tokens (those next to the completion).
    out, _, _ = prompts({"input_ids": ids, "segment_ids": seg, "loss_mask": loss}, 2, 2, 99)
    np.testing.assert_array_equal(out[:2], [[2, 3], [5, 6]])


def test_completion_rows_count_exactly_the_completion_up_to_eos():
    S = 12  # rows of 12 from prompts of 4 and 5 new tokens
    prompt_mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]], np.int32)
    tokens = np.array([[9, 9, 21, 22, 31, 32, EOS, EOS, EOS],  # EOS after 2 tokens, then fill
                       [1, 2, 3, 4, 41, 42, 43, 44, 45],  # no EOS: all N tokens
                       [9, 9, 9, 5, EOS, EOS, EOS, EOS, EOS],  # EOS at once
                       [9, 9, 9, 9, 7, 7, 7, 7, 7]], np.int32)  # a filler row
    rows = completion_rows(tokens, prompt_mask, np.array([False, False, False, True]), (EOS,), S, 9)
    np.testing.assert_array_equal(rows["input_ids"], [
        [21, 22, 31, 32, EOS] + [9] * 7,
        [1, 2, 3, 4, 41, 42, 43, 44, 45] + [9] * 3,
        [5, EOS] + [9] * 10,
        [9] * 12])
    np.testing.assert_array_equal(rows["segment_ids"] > 0, rows["input_ids"] * 0 + np.array(
        [[1] * 5 + [0] * 7, [1] * 9 + [0] * 3, [1] * 2 + [0] * 10, [0] * 12]))
    # Position p counts iff token p + 1 is a completion token (EOS included, padding never).
    np.testing.assert_array_equal(rows["loss_mask"], [
        [0, 1, 1, 1, 0] + [0] * 7,
        [0, 0, 0, 1, 1, 1, 1, 1, 0] + [0] * 3,
        [1, 0] + [0] * 10,
        [0] * 12])
    assert all(v.shape == (4, S) and v.dtype == np.int32 for v in rows.values())


# ----------------------------------------------------------------------------- the loss


@pytest.fixture(scope="module")
def models_and_sampler():
    tc, tp = T.teacher()
    s_cfg, sp, _ = T.student(tc, tp)
    sampler = OnPolicy(lmbda=1.0, max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0,
                       seq_kd=False, prompt_tokens=5, seed=3, seq_len=T.SEQ, student_cfg=s_cfg,
                       teacher_cfg=tc, eos=(EOS,), pad_id=EOS, dtype=jnp.float32)
    return tc, tp, s_cfg, sp, sampler


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _generalized_jsd64(s_logits, t_logits, beta):
    """TRL's GKDTrainer.generalized_jsd_loss per position, float64: [..., V] -> [...]."""
    ls, lt = _log_softmax64(s_logits), _log_softmax64(t_logits)
    kl = lambda a, b: (np.exp(a) * (a - b)).sum(-1)  # noqa: E731  KL(a || b) of log-probs
    if beta == 0:
        return kl(lt, ls)
    if beta == 1:
        return kl(ls, lt)
    m = np.logaddexp(ls + np.log(1 - beta), lt + np.log(beta))
    return beta * kl(lt, m) + (1 - beta) * kl(ls, m)


@pytest.mark.parametrize("loss_fn, beta", [("kl", 0.0), ("jsd", 0.5), ("reverse_kl", 1.0)])
def test_loss_on_sampled_rows_is_trls_generalized_jsd_over_the_completion(models_and_sampler,
                                                                          loss_fn, beta):
    """The step's logits loss on the student's sampled rows equals TRL's generalized JSD (beta 0:
    forward KL, 1: reverse KL), token-averaged over the completion tokens, recomputed in
    float64 from each row's prompt + completion alone (no layout code of ours)."""
    tc, tp, s_cfg, sp, sampler = models_and_sampler
    data = T.batch(T.ROWS_4)
    batch = sampler(0, data, sp, tp)
    assert jax.tree.map(np.array_equal, batch, sampler(0, data, sp, tp)) == {k: True for k in batch}
    obj = T.objective(s_cfg, tc, logits=dict(weight=1.0, loss_fn=loss_fn), attn=dict(weight=0.0),
                      logits_chunk_tokens=0)
    params = {"student": sp, "objective": obj.init_params(jax.random.PRNGKey(0), s_cfg, tc, T.SEQ)}
    _, parts = ts.distill_loss(ts.StepConfig(tc, s_cfg, obj), params, tp,
                               {k: jnp.asarray(v) for k, v in batch.items()}, None)

    # The reference: generate's own output, each row cut after its first EOS, run alone.
    ids, mask, _ = prompts(data, 5, 5, EOS)
    out = np.asarray(generate(s_cfg, sp, ids, mask, max_new_tokens=8, temperature=1.0,
                              rng=step_keys(3, 0)[1], eos_token_id=EOS))
    per_token = []
    for r in range(len(ids)):
        prompt, new = out[r, :5][mask[r] > 0], out[r, 5:]
        ends = np.flatnonzero(new == EOS)
        new = new[:ends[0] + 1] if len(ends) else new
        row = np.concatenate([prompt, new])[None]
        s_logits = models.forward(s_cfg, sp, row).logits[0]
        t_logits = models.forward(tc, tp, row).logits[0]
        span = slice(len(prompt) - 1, row.shape[1] - 1)  # TRL's logits[:, prompt_len - 1:-1]
        per_token.append(_generalized_jsd64(s_logits[span], t_logits[span], beta))
    reference = np.concatenate(per_token).mean()
    assert sum(len(p) for p in per_token) == int(batch["loss_mask"].sum()) > 4
    assert abs(float(parts["loss/logits"]) - reference) < LOSS_TOL


def test_off_policy_steps_have_the_sampled_rows_keys_and_the_same_loss(models_and_sampler):
    """One compiled step for an on-policy run: an off-policy plain-text batch gets an all-ones
    loss_mask (the sampled rows' keys, dtypes and shapes), and its loss is the loss without one."""
    import dataclasses

    tc, tp, s_cfg, sp, sampler = models_and_sampler
    data = T.batch(T.ROWS_4)
    off = dataclasses.replace(sampler, lmbda=1e-9)(0, data, sp, tp)
    on = sampler(0, data, sp, tp)
    assert {k: (v.dtype, v.shape) for k, v in off.items()} == {k: (v.dtype, v.shape) for k, v in on.items()}
    assert (off["loss_mask"] == 1).all() and (off["input_ids"] == data["input_ids"]).all()
    obj = T.objective(s_cfg, tc, attn=dict(weight=0.0))
    params = {"student": sp, "objective": obj.init_params(jax.random.PRNGKey(0), s_cfg, tc, T.SEQ)}
    loss = lambda b: float(ts.distill_loss(ts.StepConfig(tc, s_cfg, obj), params, tp,  # noqa: E731
                                           {k: jnp.asarray(v) for k, v in b.items()}, None)[0])
    assert loss(off) == loss(data)


def test_same_seed_same_samples_and_seq_kd_samples_the_teacher(models_and_sampler):
    import dataclasses

    tc, tp, s_cfg, sp, sampler = models_and_sampler
    data = T.batch(T.ROWS_4)
    a, b = sampler(1, data, sp, tp), sampler(2, data, sp, tp)
    assert not np.array_equal(a["input_ids"], b["input_ids"])  # another step, other draws
    other = dataclasses.replace(sampler, seed=4)(1, data, sp, tp)
    assert not np.array_equal(a["input_ids"], other["input_ids"])
    teacher = dataclasses.replace(sampler, seq_kd=True, temperature=0.0)(1, data, sp, tp)
    ids, mask, _ = prompts(data, 5, 5, EOS)
    want = completion_rows(generate(tc, tp, ids, mask, max_new_tokens=8, eos_token_id=EOS), mask,
                           np.zeros(4, bool), (EOS,), T.SEQ, EOS)
    for k in want:
        np.testing.assert_array_equal(teacher[k], want[k])
    off = dataclasses.replace(sampler, lmbda=1e-9)(1, data, sp, tp)
    # An off-policy step: the dataset's rows (and an all-ones loss_mask, tested above).
    assert all(np.array_equal(off[k], data[k]) for k in data)


# ----------------------------------------------------------------------------- a run


ON_POLICY_FLAGS = ["--config.objective.on_policy.lmbda=0.5", "--config.objective.on_policy.max_new_tokens=12",
                   "--config.train.max_steps=4", "--config.train.save_steps=2", "--config.train.log_steps=1"]


@pytest.fixture(scope="module")
def on_policy_run(tmp_path_factory):
    """A 4-step tiny run with lmbda 0.5 (steps 1, 2, 3 sampled at seed 42), uninterrupted."""
    workdir = tmp_path_factory.mktemp("on_policy")
    c = tiny_config(lmbda=0.5, max_new_tokens=12)
    c.train.max_steps, c.train.save_steps, c.train.log_steps = 4, 2, 1
    assert [is_on_policy(c.train.seed, s, 0.5) for s in range(4)] == [False, True, True, True]
    return workdir, train(c, workdir)


@pytest.mark.slow
def test_on_policy_run_trains_resumes_after_sigkill_and_exports(on_policy_run, tmp_path):
    src, result = on_policy_run
    ev = result["eval"]["heldout"]
    assert ev["student_end"]["ppl"] < ev["student_start"]["ppl"]

    killed = T.seed_workdir(src, tmp_path / "killed")
    cmd = [sys.executable, "-m", "distil_jax.train", "--config", TINY + ":test", "--workdir",
           str(killed), *ON_POLICY_FLAGS]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = T.start_until_checkpoint(cmd, killed, 2, ROOT)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    at_kill = checkpoint.available_steps(killed)
    assert at_kill and at_kill[-1] < 4, at_kill
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from the checkpoint at step {at_kill[-1]}" in done.stderr

    step_a, resumed = checkpoint.restore_params(killed)
    step_b, uninterrupted = checkpoint.restore_params(src)
    assert step_a == step_b == 4
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)

    # The export holds the resumed run's student: its HF weights are the checkpoint's.
    from safetensors import safe_open

    out = export.export(killed, tmp_path / "export")
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        wte = f.get_tensor("transformer.wte.weight")
    np.testing.assert_array_equal(wte, np.asarray(resumed["student"]["wte"]["embedding"]))
