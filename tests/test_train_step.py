"""distil_jax.train_step: training reduces the loss, frozen/teacher weights stay put, gradient
accumulation equals one big batch, the schedule follows HF's polynomial-decay formula, 4-device data
parallel equals one device, the eval step's log-likelihoods, optimizers.

Tolerances:
  STATE_TOL = 1e-6   parameters after one step, same computation reordered (float32).
  LOSS_TOL = 1e-5    loss metrics / summed log-likelihoods against a reordered or float64 run.
  DP_TOL = 1e-5      parameters, 4-device data parallel vs 1 device (reductions reordered).
  LR_TOL = 1e-6      learning rates against the float64 formula, relative to lr0: the schedule
                     runs in float32, so 1 - (t - w)/(T - w) near t = T carries an absolute
                     error of about one float32 ulp of 1 (relative to lr(t) it can reach 1e-5).
Comparisons of parameters after an Adam step use learning_rate=1, adam_epsilon=1: the first
update is then g / (|g| + 1), a smooth function of the gradient, so the parameter difference
bounds the gradient difference. (With eps=1e-8 Adam maps float noise on an exactly-zero
gradient, such as the attention key bias's, to ±lr.)
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distil_jax import train_step as ts
from distil_jax import models
from tests import tiny_setup as T

STATE_TOL = 1e-6
LOSS_TOL = 1e-5
DP_TOL = 1e-5
LR_TOL = 1e-6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher():
    return T.teacher()


def _jnp(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _setup(tc, tp, objective=None, **student_cfg):
    s_cfg, sp, trainable = T.student(tc, tp, **student_cfg)
    obj = T.objective(s_cfg, tc, **(objective or {}))
    params = T.params_tree(obj, s_cfg, tc, sp)
    return s_cfg, obj, params, T.trainable_mask(trainable, params["objective"])


def _spec_lr(t, lr0, total, warmup, lr_end, power):
    if t < warmup:
        return lr0 * t / warmup
    return (lr0 - lr_end) * (1 - (t - warmup) / (total - warmup)) ** power + lr_end


# ----------------------------------------------------------------------------- training


def test_training_reduces_loss_and_keeps_frozen_weights(teacher):
    tc, tp = teacher
    s_cfg, obj, params, mask = _setup(tc, tp, copy_teacher_modules=[("lm_head", True)])
    assert mask["student"]["wte"]["embedding"] is False
    steps = 30
    opt_cfg = dict(optimizer="adam", learning_rate=1e-2, max_grad_norm=1.0)  # the reference's Adam
    tx, sched = ts.make_optimizer(opt_cfg, steps, mask)
    p0 = T.to_numpy(params)
    t0 = T.to_numpy(tp)
    state = ts.create_train_state(params, tx, jax.random.PRNGKey(0))
    step = ts.make_train_step(ts.StepConfig(tc, s_cfg, obj), tx, sched, trainable=mask)
    batch = _jnp(T.batch(T.ROWS_4))
    # grad_norm is HF's clipping norm: the student's trainable gradients only (not the frozen
    # head's, not the objective's), in float64 from the loss's own gradient.
    loss = lambda p: ts.distill_loss(ts.StepConfig(tc, s_cfg, obj), p, tp, batch, None)[0]  # noqa: E731
    g0 = T.to_numpy(jax.jit(jax.grad(loss))(params))
    leaves = zip(jax.tree_util.tree_leaves(g0["student"]), jax.tree_util.tree_leaves(mask["student"]))
    expected_norm = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g, m in leaves if m))
    losses = []
    for i in range(steps):
        state, m = step(state, tp, batch)
        if i == 0:
            assert abs(float(m["grad_norm"]) - expected_norm) < 1e-5 * expected_norm
        losses.append(float(m["loss"]))
        # The learning rate reported is the one the schedule holds after this step (HF's log).
        assert abs(float(m["learning_rate"]) - _spec_lr(i + 1, 1e-2, steps, 0, 1e-7, 1.0)) <= LR_TOL * 1e-2
        assert float(m["tokens"]) == (T.batch(T.ROWS_4)["segment_ids"] > 0).sum()
    assert int(state.step) == steps
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    # The teacher is untouched, bitwise.
    assert T.max_abs_diff(t0, tp) == 0.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, t0, T.to_numpy(tp))
    # The frozen copied LM head (= tied wte) is bitwise unchanged; the rest of the student moved.
    new = T.to_numpy(state.params)
    np.testing.assert_array_equal(new["student"]["wte"]["embedding"], p0["student"]["wte"]["embedding"])
    np.testing.assert_array_equal(new["student"]["wte"]["embedding"], t0["wte"]["embedding"])
    assert not np.array_equal(new["student"]["h"]["attn"]["c_attn"]["kernel"][0],
                              p0["student"]["h"]["attn"]["c_attn"]["kernel"][0])
    # Projector and norm parameters are trained with the student.
    for path in (("projector", "weight"), ("norm", "teacher", "scale"), ("norm", "teacher", "bias")):
        before, after = p0["objective"]["attn"], new["objective"]["attn"]
        for k in path:
            before, after = before[k], after[k]
        assert np.abs(after - before).max() > 1e-4, path


def test_grad_accumulation_equals_one_batch(teacher):
    """Eight rows with different numbers of real tokens (and of documents): 4 micro-batches of 2
    rows give the same update and metrics as one batch of 8. The clm loss is a mean over
    next-token labels (one fewer per document than real tokens), so it needs its own weights."""
    tc, tp = teacher
    s_cfg, obj, params, mask = _setup(tc, tp, objective=dict(clm_weight=0.5))
    tx, sched = ts.make_optimizer(dict(learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=1.0), 10, mask)
    batch = _jnp(T.batch(T.ROWS_8))
    out = {}
    for accum in (1, 4):
        state = ts.create_train_state(T.to_numpy(params), tx, jax.random.PRNGKey(0))
        step = ts.make_train_step(ts.StepConfig(tc, s_cfg, obj, grad_accum=accum), tx, sched)
        state, m = step(state, tp, batch)
        out[accum] = T.to_numpy(state.params), {k: float(v) for k, v in m.items()}
    (p1, m1), (p4, m4) = out[1], out[4]
    assert T.max_abs_diff(p1, p4) < STATE_TOL
    assert T.max_abs_diff(p1, T.to_numpy(params)) > 1e-2  # the step did move the parameters
    assert set(m1) == set(m4)
    for k in m1:
        assert abs(m1[k] - m4[k]) < LOSS_TOL * max(1.0, abs(m1[k])), (k, m1[k], m4[k])


# ----------------------------------------------------------------------------- Distily's two groups


def test_two_optimizer_groups_match_torch_adamw_for_two_steps():
    """The reference config's optimizer against torch for two steps, the same gradients fed to
    both: torch.optim.AdamW with two parameter groups (the student: lr 2e-4, weight decay 0; the
    objective: lr 1e-3, weight decay 0.01), clip_grad_norm_(1.0) over the student's parameters
    only, transformers' polynomial schedule scaling both groups. The gradients are large enough
    for clipping to act, and a frozen student leaf has a gradient that must count nowhere.
    Tolerance on the parameters (order 1, float32 both): 2 float32 ulps (rtol 2.4e-7) + 1e-7,
    against steps of 2e-4 to 1e-3 per update, so a wrong rate, decay or clip shows."""
    import torch
    import transformers

    from distil_jax.config import default_config

    opt_cfg = default_config().optimizer.to_dict()
    assert (opt_cfg["objective_learning_rate"], opt_cfg["objective_weight_decay"],
            opt_cfg["objective_clip"]) == (1e-3, 0.01, False)
    total = 5
    rs = np.random.RandomState(0)
    shapes = {"student": {"h": {"kernel": (4, 3), "bias": (3,)}, "ln_f": {"scale": (3,)},
                          "wte": {"embedding": (5, 3)}},
              "objective": {"attn": {"projector": {"weight": (4, 4)},
                                     "norm": {"teacher": {"scale": (4,), "bias": (4,)}}}}}
    params = jax.tree_util.tree_map(lambda s: rs.standard_normal(s).astype(np.float32), shapes,
                                    is_leaf=lambda x: isinstance(x, tuple))
    trainable = jax.tree_util.tree_map(lambda _: True, params)
    trainable["student"]["wte"]["embedding"] = False  # a frozen copied module
    grads = [jax.tree_util.tree_map(lambda p: (3.0 * rs.standard_normal(p.shape)).astype(np.float32), params)
             for _ in range(2)]

    tx, sched = ts.make_optimizer(opt_cfg, total, trainable)
    state = tx.init(params)
    p = params
    jax_lrs, jax_norms = [], []
    for t, g in enumerate(grads):
        jax_norms.append(float(ts.student_grad_norm(g, trainable)))
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        jax_lrs.append(float(sched(t + 1)))

    flat = lambda tree: [x for _, x in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],  # noqa: E731
                                             key=lambda kv: jax.tree_util.keystr(kv[0]))]
    names = [jax.tree_util.keystr(k) for k, _ in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                                                         key=lambda kv: jax.tree_util.keystr(kv[0]))]
    mask = flat(trainable)
    tparams = [torch.nn.Parameter(torch.tensor(x)) for x in flat(params)]
    student = [tp for n, tp, m in zip(names, tparams, mask) if n.startswith("['student']") and m]
    objective = [tp for n, tp in zip(names, tparams) if n.startswith("['objective']")]
    opt = torch.optim.AdamW([{"params": student, "weight_decay": opt_cfg["weight_decay"]}],
                            lr=opt_cfg["learning_rate"], betas=(0.9, 0.999), eps=1e-8)
    # Distily: a second group built by the optimizer class with its defaults (lr 1e-3, wd 0.01).
    opt.add_param_group({"params": objective, **{k: v for k, v in torch.optim.AdamW(objective).defaults.items()
                                                 if k in ("lr", "weight_decay")}})
    torch_sched = transformers.get_polynomial_decay_schedule_with_warmup(
        opt, num_warmup_steps=0, num_training_steps=total, lr_end=opt_cfg["lr_end"], power=1.0)
    torch_norms, torch_lrs = [], []
    for g in grads:
        for tp, x, m in zip(tparams, flat(g), mask):
            tp.grad = torch.tensor(x) if m else None  # frozen: no gradient in torch
        torch_norms.append(float(torch.nn.utils.clip_grad_norm_(student, opt_cfg["max_grad_norm"])))
        opt.step()
        torch_sched.step()
        torch_lrs.append(torch_sched.get_last_lr())
    assert min(torch_norms) > 2.0  # clipping acted
    np.testing.assert_allclose(jax_norms, torch_norms, rtol=1e-6)
    assert [lrs[0] for lrs in torch_lrs] == pytest.approx(jax_lrs, rel=1e-6)
    assert [lrs[1] for lrs in torch_lrs] == pytest.approx([lr * 5 for lr in jax_lrs], rel=1e-6)
    for name, mine, theirs, m in zip(names, flat(p), tparams, mask):
        np.testing.assert_allclose(np.asarray(mine), theirs.detach().numpy(), rtol=2.4e-7, atol=1e-7,
                                   err_msg=name)
        if not m:
            np.testing.assert_array_equal(np.asarray(mine), np.asarray(flat(params)[names.index(name)]))
    # The objective moved by about its own lr (1e-3 per step, unclipped), the student by 2e-4.
    moved = {n: np.abs(np.asarray(a) - np.asarray(b)).max() for n, a, b in zip(names, flat(p), flat(params))}
    assert moved["['objective']['attn']['projector']['weight']"] > 1.5e-3
    assert 2e-4 < moved["['student']['h']['kernel']"] < 5e-4


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("warmup", [0, 10])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_schedule_follows_spec_formula(warmup, power):
    lr0, lr_end, total = 2e-4, 1e-7, 100
    sched = ts.lr_schedule(lr0, total, warmup, lr_end, power)
    points = [0, total // 2, total - 1] + ([warmup // 2, warmup] if warmup else [])
    for t in points:
        expected = _spec_lr(t, lr0, total, warmup, lr_end, power)
        assert abs(float(sched(t)) - expected) <= LR_TOL * lr0, (t, float(sched(t)), expected)
    # make_optimizer builds the same schedule from a config (warmup_ratio -> ceil(ratio * T)).
    _, sched2 = ts.make_optimizer(dict(learning_rate=lr0, lr_end=lr_end, power=power,
                                       warmup_ratio=warmup / total), total, {"w": True})
    for t in points:
        assert float(sched2(t)) == float(sched(t))
    # The reference run: 624 steps, no warmup, power 1.
    ref = ts.lr_schedule(2e-4, 624, 0)
    for t in (0, 312, 623):
        assert abs(float(ref(t)) - _spec_lr(t, 2e-4, 624, 0, 1e-7, 1.0)) <= LR_TOL * 2e-4


# ----------------------------------------------------------------------------- data parallel

_DP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from distil_jax import sharding, train_step as ts
    from tests import tiny_setup as T

    tc, tp = T.teacher()
    s_cfg, sp, trainable = T.student(tc, tp)
    obj = T.objective(s_cfg, tc, clm_weight=0.5)
    params = T.params_tree(obj, s_cfg, tc, sp)
    mask = T.trainable_mask(trainable, params["objective"])
    tx, sched = ts.make_optimizer(dict(learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=1.0), 10, mask)
    host_batch = T.batch(T.ROWS_8)
    out = {"n_devices": jax.device_count()}
    results = {}
    def placed(devices):
        # The run's placement path on a data-parallel mesh over `devices`.
        mesh = sharding.make_mesh({"data": -1}, devices)
        state = ts.create_train_state(T.to_numpy(params), tx, jax.random.PRNGKey(0))
        placement = sharding.make_placement(mesh, state, s_cfg, tc, tp)
        return placement, placement.put_state(state), placement.put_teacher(tp)

    for name, devices in (("dp4", jax.devices()[:4]), ("dp1", jax.devices()[:1])):
        placement, state, teacher = placed(devices)
        batch = placement.put_batch(host_batch)
        out[name + "_batch_devices"] = len(batch["input_ids"].sharding.device_set)
        step = ts.make_train_step(ts.StepConfig(tc, s_cfg, obj), tx, sched, placement=placement)
        state, m = step(state, teacher, batch)
        results[name] = (T.to_numpy(state.params), float(m["loss"]))
    # Padding-aware logits on 4 devices: each device compacts its own share of the batch.
    placement, state, teacher = placed(jax.devices()[:4])
    bucketed = ts.BucketedTrainStep(ts.StepConfig(tc, s_cfg, obj), tx, sched, buckets=8,
                                    placement=placement)
    out["dp4_capacity"] = bucketed.capacity(host_batch)
    state, m = bucketed(state, teacher, host_batch)
    results["dp4_bucketed"] = (T.to_numpy(state.params), float(m["loss"]))
    out["bucketed_param_diff"] = T.max_abs_diff(results["dp4_bucketed"][0], results["dp1"][0])
    out["bucketed_loss_diff"] = abs(results["dp4_bucketed"][1] - results["dp1"][1])
    out["max_param_diff"] = T.max_abs_diff(results["dp4"][0], results["dp1"][0])
    out["param_change"] = T.max_abs_diff(results["dp1"][0], T.to_numpy(params))
    out["loss_diff"] = abs(results["dp4"][1] - results["dp1"][1])
    try:
        sharding.place_batch(T.batch(T.ROWS_4[:3]), sharding.make_mesh({"data": 4}, jax.devices()[:4]))
        out["indivisible_error"] = None
    except ValueError as e:
        out["indivisible_error"] = str(e)
    print("RESULT " + json.dumps(out))
""")


def test_data_parallel_4_devices_equals_1():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _DP_SCRIPT], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["n_devices"] == 4
    assert out["dp4_batch_devices"] == 4 and out["dp1_batch_devices"] == 1
    assert out["param_change"] > 1e-2
    assert out["max_param_diff"] < DP_TOL, out
    assert out["loss_diff"] < LOSS_TOL, out
    assert out["indivisible_error"] and "divisible" in out["indivisible_error"]
    # ROWS_8 on 4 devices: shares of 2 rows x 16 = 32 positions with at most 28 real tokens -> 28.
    assert out["dp4_capacity"] == 28
    assert out["bucketed_param_diff"] < DP_TOL, out
    assert out["bucketed_loss_diff"] < LOSS_TOL, out


# ----------------------------------------------------------------------------- padding-aware logits


def test_logits_capacity_buckets():
    seg = np.zeros((4, 8), np.int32)
    seg[0, :8] = 1  # 8 real
    seg[1, :3] = 1  # 3
    seg[2, :5] = 1  # 5
    seg[3, :1] = 1  # 1
    # One group of 32 positions, 17 real, buckets of 4: 20.
    assert ts.logits_capacity(seg, groups=1, grad_accum=1, buckets=8) == 20
    # Two groups (devices) of 16: the fuller holds 11 -> 12.
    assert ts.logits_capacity(seg, groups=2, grad_accum=1, buckets=8) == 12
    # Two micro-batches of one group each: max(11, 6) -> 12; the same shares as above.
    assert ts.logits_capacity(seg, groups=1, grad_accum=2, buckets=8) == 12
    # A full share needs every position: no compaction.
    assert ts.logits_capacity(seg, groups=4, grad_accum=1, buckets=8) is None
    assert ts.logits_capacity(seg, groups=1, grad_accum=1, buckets=0) is None
    # Never below one bucket, even for a nearly empty batch.
    assert ts.logits_capacity(seg[3:], groups=1, grad_accum=1, buckets=4) == 2


@pytest.mark.parametrize("chunk", [0, 8])
def test_padding_aware_logits_equal_every_position(teacher, chunk):
    """The LM heads and logits losses on the real tokens only (capacity buckets) give the same
    update and metrics as on every position: with gradient accumulation, the clm loss and
    both the unchunked and the chunked logits path."""
    tc, tp = teacher
    s_cfg, obj, params, mask = _setup(tc, tp, objective=dict(clm_weight=0.5, logits_chunk_tokens=chunk))
    tx, sched = ts.make_optimizer(dict(learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=1.0), 10, mask)
    host = T.batch(T.ROWS_8)
    step_cfg = ts.for_batch_shape(ts.StepConfig(tc, s_cfg, obj, grad_accum=2), *host["input_ids"].shape)
    assert step_cfg.logits_chunk == chunk
    state = ts.create_train_state(T.to_numpy(params), tx, jax.random.PRNGKey(0))
    p_all, m_all = ts.make_train_step(step_cfg, tx, sched)(state, tp, _jnp(host))
    compiled = []
    bucketed = ts.BucketedTrainStep(step_cfg, tx, sched, buckets=8, on_compile=compiled.append)
    assert bucketed.capacity(host) == 48  # 4 rows x 16 = 64 positions per micro-batch, <= 47 real
    state = ts.create_train_state(T.to_numpy(params), tx, jax.random.PRNGKey(0))
    p_real, m_real = bucketed(state, tp, host)
    assert compiled == [48]
    assert T.max_abs_diff(T.to_numpy(p_all.params), T.to_numpy(p_real.params)) < STATE_TOL
    assert T.max_abs_diff(T.to_numpy(p_all.params), T.to_numpy(params)) > 1e-2
    for k in m_all:
        a, b = float(m_all[k]), float(m_real[k])
        assert abs(a - b) < LOSS_TOL * max(1.0, abs(a)), (k, a, b)
    # A batch of full rows needs every position: the one step without compaction.
    full = T.batch([[T.SEQ]] * 8)
    bucketed(p_real, tp, full)
    assert compiled == [48, None]


# ----------------------------------------------------------------------------- eval


def test_remat_auto_keeps_the_matmul_outputs_only_when_they_fit(monkeypatch, teacher):
    """train.remat_policy="auto": "dots" when every student block's matmul outputs (widths from
    the model config's fields, as the HF modules' out_features) fit in a tenth of the device's
    memory, else "full"; resolved per batch shape before tracing; the step it builds trains as
    the step without checkpointing does."""
    tc, tp = teacher
    s_cfg, obj, params, mask = _setup(tc, tp)
    D = s_cfg.n_embd
    assert models.block_matmul_width(s_cfg) == 3 * D + D + s_cfg.mlp_width + D  # c_attn, c_proj, c_fc, c_proj
    q = models.config_to_hf(T.LLAMA_TEACHER_CONFIG)  # transformers' Qwen3Config
    kv = q.num_key_value_heads * q.head_dim  # q, k, v, o, gate, up, down
    assert models.block_matmul_width(T.LLAMA_TEACHER_CONFIG) == (
        q.num_attention_heads * q.head_dim + 2 * kv + q.hidden_size + 2 * q.intermediate_size + q.hidden_size)
    host = T.batch(T.ROWS_8)
    rows, seq = host["input_ids"].shape
    sc = ts.StepConfig(tc, s_cfg, obj, remat="auto", grad_accum=2, logits_groups=2)
    tokens = rows // 4 * seq  # per device and micro-batch
    kept = tokens * s_cfg.num_layers * models.block_matmul_width(s_cfg) * 4  # float32
    for memory, want in ((10 * kept, "dots"), (10 * kept - 1, "full")):
        monkeypatch.setattr(ts, "device_memory_bytes", lambda m=memory: m)
        assert ts.remat_choice(sc, rows, seq) == (want, kept)
        assert ts.for_batch_shape(sc, rows, seq).remat == want
    tx, sched = ts.make_optimizer(dict(learning_rate=1e-3), 2, mask)
    with pytest.raises(ValueError, match="remat='auto' is decided per batch shape"):
        ts.make_train_step(sc, tx, sched)(ts.create_train_state(T.to_numpy(params), tx, jax.random.PRNGKey(0)),
                                          tp, _jnp(host))
    monkeypatch.setattr(ts, "device_memory_bytes", lambda: 10 * kept)
    got = {}
    for remat in ("auto", False):
        state = ts.create_train_state(T.to_numpy(params), tx, jax.random.PRNGKey(0))
        step = ts.BucketedTrainStep(dataclasses.replace(sc, remat=remat, logits_groups=1), tx, sched)
        got[remat] = T.to_numpy(step(state, tp, host)[0].params)
    assert T.max_abs_diff(got["auto"], got[False]) < STATE_TOL


def test_eval_step_log_likelihood_matches_float64(teacher):
    tc, tp = teacher
    b = T.batch(T.ROWS_4)
    out = jax.device_get(ts.make_eval_step(tc)(tp, _jnp(b)))

    logits = np.asarray(models.forward(tc, tp, b["input_ids"], segment_ids=b["segment_ids"]).logits,
                        np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    seg, ids = b["segment_ids"], b["input_ids"]
    expected_lp, expected_n = 0.0, 0
    doc_lp = np.zeros(seg.shape, np.float64)  # [row, segment id]
    doc_n = np.zeros(seg.shape, np.int64)
    for r in range(seg.shape[0]):
        for t in range(seg.shape[1] - 1):
            if seg[r, t] > 0 and seg[r, t + 1] == seg[r, t]:  # next token in the same document
                expected_lp += logp[r, t, ids[r, t + 1]]
                expected_n += 1
                doc_lp[r, seg[r, t]] += logp[r, t, ids[r, t + 1]]
                doc_n[r, seg[r, t]] += 1
    # 15 + 9 + (4 + 3 + 2) + (6 + 8) next-token pairs inside documents.
    assert expected_n == int(out["tokens"]) == 47
    assert abs(float(out["logprob_sum"]) - expected_lp) < LOSS_TOL * max(1.0, abs(expected_lp))
    np.testing.assert_array_equal(out["doc_tokens"], doc_n)
    np.testing.assert_allclose(out["doc_logprob"], doc_lp, rtol=0, atol=LOSS_TOL)


# ----------------------------------------------------------------------------- optimizers


def test_lion_optimizer_runs(teacher):
    """Lion (adam runs in the training test above)."""
    name = "lion"
    tc, tp = teacher
    s_cfg, obj, params, mask = _setup(tc, tp, copy_teacher_modules=[("lm_head", True)])
    lr = 1e-3
    tx, sched = ts.make_optimizer(dict(optimizer=name, learning_rate=lr, max_grad_norm=1.0), 10, mask)
    p0 = T.to_numpy(params)
    state = ts.create_train_state(params, tx, jax.random.PRNGKey(0))
    step = ts.make_train_step(ts.StepConfig(tc, s_cfg, obj), tx, sched)
    state, m = step(state, tp, _jnp(T.batch(T.ROWS_4)))
    assert np.isfinite(float(m["loss"]))
    new = T.to_numpy(state.params)
    np.testing.assert_array_equal(new["student"]["wte"]["embedding"], p0["student"]["wte"]["embedding"])
    delta = np.abs(new["student"]["h"]["mlp"]["c_fc"]["kernel"][0] - p0["student"]["h"]["mlp"]["c_fc"]["kernel"][0])
    # Lion's step is lr · sign(update) in every coordinate with a nonzero gradient.
    assert np.median(delta) == pytest.approx(lr, rel=1e-3)


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="sgd.*adamw.*lion"):
        ts.make_optimizer(dict(optimizer="sgd", learning_rate=1e-3), 10, {"w": True})


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_kernels_cast_before_the_model_change_nothing(family, monkeypatch):
    """compute_kernels moves the student's kernel casts ahead of the model (so FSDP gathers
    bfloat16): the bfloat16 loss and every gradient stay bitwise what the models' own casts give."""
    if family == "gpt2":
        tc, tp = T.teacher()
        s_cfg, sp, _ = T.student(tc, tp)
    else:
        tc, tp = T.llama_teacher()
        s_cfg, sp, _ = T.student(tc, tp, overrides={"num_hidden_layers": 2})
    obj = T.objective(s_cfg, tc)
    params = {"student": sp, "objective": obj.init_params(jax.random.PRNGKey(0), s_cfg, tc, T.SEQ)}
    batch = _jnp(T.batch(T.ROWS_4))
    sc = ts.StepConfig(tc, s_cfg, obj, dtype=jnp.bfloat16)
    kernels = ts.compute_kernels(sp, jnp.bfloat16)  # kernels bf16; embeddings and norms float32
    assert {x.dtype for x in jax.tree_util.tree_leaves(kernels)} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
    cast = jax.jit(jax.value_and_grad(lambda p: ts.distill_loss(sc, p, tp, batch, None)[0]))(params)
    monkeypatch.setattr(ts, "compute_kernels", lambda p, dtype: p)
    inside = jax.jit(jax.value_and_grad(lambda p: ts.distill_loss(sc, p, tp, batch, None)[0]))(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, T.to_numpy(cast), T.to_numpy(inside))
