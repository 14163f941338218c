"""tools/bench_throughput.py and its PyTorch baseline: a smoke run of both sides on tiny shapes,
the JSON the CLI writes, and the baseline's objective against distil_jax's on the same weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from distil_jax import hf, models
from distil_jax import train_step as ts
from distil_jax.objectives.objective import Objective
from tools import bench_throughput as bt
from tools import torch_baseline as tb

SIDE_KEYS = ("real_tokens_per_s", "tokens_per_s", "step_time_s_median", "peak_memory_bytes", "mfu",
             "real_token_tflops", "gemm_f32_tflops")


def _tiny(**kw):
    base = dict(teacher="tiny", batch=2, seq_len=16, steps=2, warmup_steps=1, windows=2, gemm_size=128,
                gemm_reps=2)
    base.update(kw)
    return bt.BenchConfig(**base)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_make_batch_layouts(layout):
    cfg = _tiny(batch=4, seq_len=64, layout=layout).resolved()
    b = bt.make_batch(cfg)
    assert b["input_ids"].shape == b["segment_ids"].shape == (4, 64)
    assert b["real_tokens"] == int((b["segment_ids"] > 0).sum()) == int(b["attention_mask"].sum())
    if layout == "padded":
        assert b["real_tokens"] == round(4 * 64 * (1 - 0.24))
        # One document per row, right-padded with EOS.
        assert set(np.unique(b["segment_ids"])) <= {0, 1}
        for row_ids, row_seg in zip(b["input_ids"], b["segment_ids"]):
            n = int(row_seg.sum())
            assert row_seg[:n].all() and not row_seg[n:].any()
            assert (row_ids[n:] == bt.TEACHERS["tiny"]["vocab_size"] - 1).all()
    else:
        assert b["real_tokens"] == 4 * 64
        assert b["segment_ids"].max() > 1  # several documents per row


@pytest.mark.slow
def test_smoke_both_sides_in_process():
    cfg = _tiny()
    for side, run in (("jax", bt.run_jax), ("torch", bt.run_torch)):
        r = run(cfg)
        assert r["side"] == side
        for k in SIDE_KEYS:
            assert k in r, (side, k)
        assert r["tokens_per_s"] > r["real_tokens_per_s"] > 0  # padded: real < all positions
        assert r["step_time_s_min"] <= r["step_time_s_median"] <= r["step_time_s_max"]
        assert np.isfinite(r["loss_first"]) and np.isfinite(r["loss_last"])
        assert r["peak_memory_bytes"] > 0


@pytest.mark.slow
def test_cli_json_keys(tmp_path):
    out = tmp_path / "bench.json"
    # Each side in its own subprocess, as the CLI runs by default: distil_jax packed against the
    # baseline on Distily's padded rows, each side also timing its framework's f32 GEMM.
    assert bt.main(["--teacher", "tiny", "--batch", "2", "--seq-len", "16", "--steps", "2",
                    "--warmup-steps", "1", "--windows", "1", "--layout", "packed", "--baseline-layout",
                    "padded", "--gemm-size", "128", "--gemm-reps", "2", "--rounds", "2",
                    "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    # Two rounds, alternated, pooled: a window each; a GEMM sample before each window, 2 after.
    for side in ("jax", "torch"):
        r = d[side]
        assert r["rounds"] == 2 and len(r["step_time_s_windows"]) == 2
        assert len(r["gemm_f32_tflops_samples"]) == 6
        assert r["gemm_f32_tflops"] == pytest.approx(np.median(r["gemm_f32_tflops_samples"]))
        assert r["minor_faults_per_step"] >= 0
    assert {"jax", "torch", "ratio_real_tokens_per_s", "gemm_f32_tflops"} <= set(d)
    for side in ("jax", "torch"):
        for k in SIDE_KEYS:
            assert k in d[side], (side, k)
    assert (d["jax"]["layout"], d["torch"]["layout"]) == ("packed", "padded")
    assert d["ratio_real_tokens_per_s"] == pytest.approx(
        d["jax"]["real_tokens_per_s"] / d["torch"]["real_tokens_per_s"])
    # packed: every position is a real token; padded: 24 % are not
    assert d["jax"]["real_tokens_per_s"] == pytest.approx(d["jax"]["tokens_per_s"])
    assert d["torch"]["real_tokens_per_s"] < 0.8 * d["torch"]["tokens_per_s"]
    # The GEMM rates and each side's model FLOP/s as a share of them.
    gemm = d["gemm_f32_tflops"]
    assert gemm["xla"] == d["jax"]["gemm_f32_tflops"] > 0 and gemm["torch"] == d["torch"]["gemm_f32_tflops"] > 0
    for side in ("jax", "torch"):
        r = d[side]
        for name in ("xla", "torch"):
            assert r["gemm_share"][name]["real_tokens"] == pytest.approx(r["real_token_tflops"] / gemm[name])
            assert r["gemm_share"][name]["all_positions"] == pytest.approx(r["achieved_tflops"] / gemm[name])
    assert d["torch"]["real_token_tflops"] == pytest.approx(
        d["torch"]["flops_per_token"] * d["torch"]["real_tokens_per_s"] / 1e12)
    table = bt.format_table(d)
    assert "distil_jax packed, baseline padded" in table and "f32 GEMM on this machine" in table


def test_pool_rounds_pools_windows_and_rescales_rates():
    def run(windows, gemm, peak):
        med = float(np.median(windows))
        return dict(step_time_s_median=med, step_time_s_windows=windows, tokens_per_s=100 / med,
                    real_tokens_per_s=80 / med, achieved_tflops=1 / med, real_token_tflops=0.8 / med,
                    mfu=None, gemm_f32_tflops=float(np.median(gemm)), gemm_f32_tflops_samples=gemm,
                    peak_memory_bytes=peak)
    rounds = [run([1.0, 2.0], [0.1, 0.3], 5), run([4.0, 5.0, 6.0], [0.2], 7)]
    rounds[0]["minor_faults_per_step"], rounds[1]["minor_faults_per_step"] = 100.0, 300.0
    pooled = bt.pool_rounds(rounds)
    assert pooled["minor_faults_per_step"] == 200.0
    assert pooled["step_time_s_windows"] == [1.0, 2.0, 4.0, 5.0, 6.0]
    assert pooled["step_time_s_median"] == 4.0 and pooled["step_time_s_round_medians"] == [1.5, 5.0]
    assert (pooled["step_time_s_min"], pooled["step_time_s_max"]) == (1.0, 6.0)
    assert pooled["real_tokens_per_s"] == pytest.approx(80 / 4.0)
    assert pooled["real_token_tflops"] == pytest.approx(0.8 / 4.0) and pooled["mfu"] is None
    assert pooled["gemm_f32_tflops"] == pytest.approx(0.2) and pooled["peak_memory_bytes"] == 7
    one = run([3.0], [0.5], 1)
    assert bt.pool_rounds([one]) == one


def test_timed_windows_counts_the_page_faults_of_fresh_memory():
    """A step that writes 64 MiB of freshly mapped memory (above glibc's mmap threshold, so
    mapped anew each time) faults more per step than one that touches nothing; the count is per
    timed step (windows 2 x 2 steps). With 4 KiB pages that is 16,384 faults; with transparent
    huge pages always on, 32: so only the comparison is asserted."""
    cfg = _tiny(steps=2, windows=2)

    def fresh(n):
        for _ in range(n):
            np.ones(64 << 20, np.uint8)

    times, samples, touched = bt.timed_windows(cfg, fresh, None)
    _, _, idle = bt.timed_windows(cfg, lambda n: None, None)
    assert len(times) == 2 and samples == []
    assert touched > idle >= 0 and touched >= 16


def test_flops_formula():
    f = bt.flops_per_token(_tiny(teacher="gpt2-config", seq_len=1024).resolved())
    D, V = 768, 50257
    assert f["student"] == 6 * 12 * D * D * 6 + 12 * 6 * 1024 * D + 6 * D * V
    assert f["teacher"] == 2 * 12 * D * D * 12 + 4 * 12 * 1024 * D + 2 * D * V
    assert f["objective"] == 6 * 12 * 1024 * 1024
    assert f["total"] == f["student"] + f["teacher"] + f["objective"]


# ----------------------------------------------------------------------------- parity

N_TEACHER, N_STUDENT, S = 4, 3, 16  # layer-2 maps student block 1 <-> teacher block 2


def _perturb(model, seed):
    """Non-trivial biases and LayerNorms, so that a mix-up of parameters would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("transformer.ln_f") \
                    or name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


GPT2_TEACHER = dict(model_type="gpt2", n_layer=N_TEACHER, n_embd=32, n_head=4, vocab_size=97, n_positions=32)
# Grouped-query attention (4 query heads, 2 key/value heads), untied head.
LLAMA_TEACHER = dict(model_type="llama", num_hidden_layers=N_TEACHER, hidden_size=32, intermediate_size=64,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=97, max_position_embeddings=32,
                     attention_bias=True, tie_word_embeddings=False)


def _same_weights_both_sides(teacher_fields=GPT2_TEACHER):
    """HF teacher/student + Distily objective in torch, and the same weights in distil_jax."""
    t_cfg = tb.hf_config(**teacher_fields)
    teacher, student, objective = tb.build(t_cfg, N_STUDENT, S, remat=False, seed=3)
    _perturb(teacher, 1)
    _perturb(student, 2)
    with torch.no_grad():
        objective.norm.weight.add_(0.1 * torch.randn(S))
        objective.norm.bias.add_(0.1 * torch.randn(S))
    # No dropout, so that both sides compute the same function (the benchmark trains the
    # baseline's student in train mode, as Distily does).
    student.eval()

    tc = hf.config_from_hf(teacher.config)
    sc_cfg = hf.config_from_hf(student.config)
    # Copies: jax may alias a numpy buffer on the CPU, and torch's optimizer updates in place.
    sd = lambda m: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}  # noqa: E731
    host = lambda t: jnp.asarray(t.detach().numpy().copy())  # noqa: E731
    teacher_params = hf.hf_state_dict_to_params(tc, sd(teacher))
    student_params = hf.hf_state_dict_to_params(sc_cfg, sd(student))
    np.testing.assert_array_equal(models.lm_head(sc_cfg, student_params), models.lm_head(tc, teacher_params))
    obj = Objective.from_config(bt.REFERENCE_OBJECTIVE).bind(sc_cfg, tc)
    assert obj.attn_pairs(N_STUDENT, N_TEACHER) == ((objective.s_layer, objective.t_layer),) == ((1, 2),)
    obj_params = {"attn": {
        "projector": {"weight": host(objective.projector_weight)},
        "norm": {"teacher": {"scale": host(objective.norm.weight), "bias": host(objective.norm.bias)}},
    }}
    layout = obj.init_params(jax.random.PRNGKey(0), sc_cfg, tc, S)
    assert jax.tree_util.tree_structure(layout) == jax.tree_util.tree_structure(obj_params)
    assert jax.tree_util.tree_map(jnp.shape, layout) == jax.tree_util.tree_map(jnp.shape, obj_params)
    params = {"student": student_params, "objective": obj_params}
    sc = ts.StepConfig(tc, sc_cfg, obj)
    return (teacher, student, objective), (sc, params, teacher_params)


@pytest.mark.parametrize("teacher_fields", [GPT2_TEACHER, LLAMA_TEACHER], ids=["gpt2", "llama"])
def test_baseline_loss_equals_distil_jax_loss_on_full_rows(teacher_fields):
    # Full rows, no padding: Distily averages its losses over every position, padding included,
    # while distil_jax averages over real tokens only, so the two objectives agree only when
    # there is no padding (on padded rows they differ by design: docs/design.md, difference 1).
    (teacher, student, objective), (sc, params, teacher_params) = _same_weights_both_sides(teacher_fields)
    ids = np.random.RandomState(0).randint(0, 97, (3, S))
    ones = np.ones((3, S), np.int32)

    t_loss, t_parts = tb.forward_loss(teacher, student, objective, torch.as_tensor(ids),
                                      torch.as_tensor(ones))
    j_loss, j_parts = ts.distill_loss(sc, params, teacher_params,
                                      {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(ones)}, None)
    assert float(t_parts["loss/attn"]) > 1e-3 and float(t_parts["loss/logits"]) > 1e-3  # non-trivial
    assert abs(float(t_parts["loss/logits"]) - float(j_parts["loss/logits"])) < 1e-4
    assert abs(float(t_parts["loss/attn"]) - float(j_parts["loss/attn"])) < 1e-4
    assert abs(float(t_loss.detach()) - float(j_loss)) < 1e-4


def test_baseline_optimizer_step_matches_distil_jax():
    # One step (clipping of the student, schedule, the objective's group) on both sides, then
    # the loss again: the baseline trains the same parameters with the same update rule.
    (teacher, student, objective), (sc, params, teacher_params) = _same_weights_both_sides()
    ids = np.random.RandomState(1).randint(0, 97, (2, S))
    ones = np.ones((2, S), np.int32)
    batch = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(ones)}
    total = 10

    trainer = tb.Trainer(teacher, student, objective, total_steps=total)
    trainer.step(torch.as_tensor(ids), torch.as_tensor(ones))
    t_after, _ = tb.forward_loss(teacher, student, objective, torch.as_tensor(ids), torch.as_tensor(ones))

    tmask = jax.tree_util.tree_map(lambda _: True, params)
    # The reference config's optimizer (Distily's second group for the objective's parameters).
    from distil_jax.config import default_config

    tx, sched = ts.make_optimizer(default_config().optimizer.to_dict(), total, tmask)
    state = ts.create_train_state(params, tx, jax.random.PRNGKey(0))
    state, _ = ts.make_train_step(sc, tx, sched)(state, teacher_params, batch)
    j_after, _ = ts.distill_loss(sc, state.params, teacher_params, batch, None)
    assert abs(float(t_after.detach()) - float(j_after)) < 1e-4


def test_profile_steps_writes_a_trace_and_top_ops(tmp_path):
    step = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)
    out = bt.profile_steps(step, jnp.ones((64, 64)), str(tmp_path / "prof"), steps=2)
    assert out == tmp_path / "prof" / "top_ops.txt"
    assert list((tmp_path / "prof").glob("**/*.trace.json.gz"))
    lines = out.read_text().splitlines()
    assert lines[0].startswith("jax.profiler trace of 2 steps")
    assert len(lines) > 2  # at least one timed event
    assert float(lines[2].split()[0]) >= 0.0


@pytest.mark.slow
def test_teacher_cache_side_against_online(tmp_path):
    """--teacher-cache-k: distil_jax from a top-k cache against its online step, both on the
    logits-only objective, in one invocation (in this process)."""
    out = tmp_path / "bench.json"
    assert bt.main(["--teacher", "tiny", "--batch", "2", "--seq-len", "16", "--steps", "1",
                    "--warmup-steps", "1", "--windows", "1", "--teacher-cache-k", "8", "--no-isolate",
                    "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert {"jax", "jax_cache", "ratio_cache_real_tokens_per_s"} <= set(d) and "torch" not in d
    assert d["config"]["objective"] == "logits" and d["jax_cache"]["teacher_cache_k"] == 8
    assert d["ratio_cache_real_tokens_per_s"] == pytest.approx(
        d["jax_cache"]["real_tokens_per_s"] / d["jax"]["real_tokens_per_s"])
    # No teacher FLOPs from a cache.
    assert d["jax_cache"]["flops_per_token_parts"]["teacher"] == 0 < d["jax"]["flops_per_token_parts"]["teacher"]
    with pytest.raises(ValueError, match="the torch baseline runs the reference objective only"):
        bt.bench(bt.BenchConfig(teacher="tiny", teacher_cache_k=8), sides=("torch",), isolate=False)


def test_bench_defaults_follow_the_library():
    """The bench keeps its own copies of library defaults (its parent process imports no jax);
    they must not drift from the config's."""
    from distil_jax import config as config_lib

    c = config_lib.default_config()
    assert bt.BenchConfig().teacher_cache_tail == c.teacher.cache_tail_samples
    assert bt.BenchConfig().remat_policy == c.train.remat_policy
    assert bt.BenchConfig().logits_buckets == c.train.logits_buckets
