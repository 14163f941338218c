"""The teacher cache: the cached loss (k = V against online, k < V against a float64 NumPy
reference of the documented formula), the recorder (format, resume after SIGKILL byte for byte)
and training from it (mismatches refused, resume, evaluation, export, model card)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distil_jax import checkpoint, config as config_lib, fsio, teacher_cache as tc
from distil_jax import train_step as ts
from distil_jax.objectives import losses
from distil_jax.objectives.objective import CACHE_BATCH_KEYS, Objective
from tests import tiny_setup as T
from tests.np_reference import np_divergence_rows, np_log_softmax

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
CACHED_LOSSES = ["kl", "reverse_kl", "cakld", "jsd", "ce"]


# ----------------------------------------------------------------------------- the loss


def _targets(tc_cfg, tp, batch, k, temperature=1.0):
    """The cache's batch keys for `batch`, computed by the recorder's function (host arrays)."""
    ids, lp, rest = jax.jit(lambda p, i, s: tc.teacher_top_k(tc_cfg, p, i, s, k=k, temperature=temperature))(
        tp, batch["input_ids"], batch["segment_ids"])
    return dict(zip(CACHE_BATCH_KEYS, (np.asarray(ids), np.asarray(lp), np.asarray(rest))))


def _loss_and_grad(sc, params, tp, batch):
    fn = jax.value_and_grad(lambda p: ts.distill_loss(sc, p, tp, batch, None)[0])
    loss, grad = fn(params)
    return float(loss), T.to_numpy(grad)


@pytest.fixture(scope="module")
def models_():
    tc_cfg, tp = T.teacher()
    s_cfg, sp, _ = T.student(tc_cfg, tp)
    return tc_cfg, tp, s_cfg, sp


@pytest.mark.parametrize("loss_fn, temperature", [("kl", 1.0), ("kl", 2.0), ("reverse_kl", 2.0),
                                                  ("jsd", 2.0), ("cakld", 1.0), ("ce", 1.0)])
def test_k_equal_vocab_equals_online_values_and_gradients(models_, loss_fn, temperature):
    """k = V: the cached loss and its gradients equal the online step's, to 1e-6."""
    tc_cfg, tp, s_cfg, sp = models_
    obj = Objective.from_config(dict(logits=dict(weight=1.0, loss_fn=loss_fn), clm_weight=0.3,
                                     temperature=temperature)).bind(s_cfg, tc_cfg)
    params = {"student": sp, "objective": {}}
    host = T.batch(T.ROWS_4)
    online = ts.StepConfig(tc_cfg, s_cfg, obj)
    cached = ts.StepConfig(tc_cfg, s_cfg, obj, teacher_cache_k=T.VOCAB)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    cbatch = dict(batch, **_targets(tc_cfg, tp, host, T.VOCAB, temperature))
    l_on, g_on = _loss_and_grad(online, params, tp, batch)
    l_ca, g_ca = _loss_and_grad(cached, params, None, cbatch)
    assert abs(l_on - l_ca) <= 1e-6 * max(1.0, abs(l_on)), (l_on, l_ca)
    assert T.max_abs_diff(g_on, g_ca) <= 1e-6
    assert T.max_abs_diff(g_on, jax.tree_util.tree_map(np.zeros_like, g_on)) > 1e-3  # non-trivial


@pytest.mark.parametrize("chunk, capacity", [(0, 80), (8, None), (8, 80)])
def test_k_equal_vocab_equals_online_with_compaction_and_chunking(models_, chunk, capacity):
    """The cached targets follow the padding-aware gather and the chunked logits path."""
    tc_cfg, tp, s_cfg, sp = models_
    obj = Objective.from_config(dict(logits=dict(weight=1.0, loss_fn="kl"),
                                     logits_chunk_tokens=chunk)).bind(s_cfg, tc_cfg)
    params = {"student": sp, "objective": {}}
    host = T.batch(T.ROWS_8)
    assert ts.logits_capacity(host["segment_ids"]) == 80  # 77 real tokens of 128
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    common = dict(logits_chunk=chunk, logits_capacity=capacity)
    base = ts.StepConfig(tc_cfg, s_cfg, obj)
    l_on, g_on = _loss_and_grad(base, params, tp, batch)
    cached = ts.StepConfig(tc_cfg, s_cfg, obj, teacher_cache_k=T.VOCAB, **common)
    l_ca, g_ca = _loss_and_grad(cached, params, None, dict(batch, **_targets(tc_cfg, tp, host, T.VOCAB)))
    assert abs(l_on - l_ca) <= 1e-6 * max(1.0, abs(l_on)), (l_on, l_ca)
    assert T.max_abs_diff(g_on, g_ca) <= 1e-6


def test_k_equal_vocab_train_step_with_grad_accumulation_equals_online(models_):
    """The whole jitted step (2 micro-batches, padding-aware buckets, clm loss): one update from
    the cache equals the online one."""
    tc_cfg, tp, s_cfg, sp = models_
    obj = Objective.from_config(dict(logits=dict(weight=1.0, loss_fn="kl"), clm_weight=0.5)).bind(s_cfg, tc_cfg)
    params = {"student": sp, "objective": {}}
    mask = jax.tree_util.tree_map(lambda _: True, params)
    tx, sched = ts.make_optimizer(dict(learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=1.0), 10, mask)
    host = T.batch(T.ROWS_8)
    results = []
    for k, teacher, extra in ((0, tp, {}), (T.VOCAB, None, _targets(tc_cfg, tp, host, T.VOCAB))):
        sc = ts.StepConfig(tc_cfg, s_cfg, obj, grad_accum=2, teacher_cache_k=k)
        state = ts.create_train_state(T.to_numpy(params), tx, jax.random.PRNGKey(0))
        state, metrics = ts.BucketedTrainStep(sc, tx, sched, buckets=8)(state, teacher, dict(host, **extra))
        results.append((T.to_numpy(state.params), jax.device_get(metrics)))
    (p_on, m_on), (p_ca, m_ca) = results
    assert T.max_abs_diff(p_on, p_ca) < 1e-6
    assert T.max_abs_diff(p_on, params) > 1e-2
    for key in m_on:
        assert abs(float(m_on[key]) - float(m_ca[key])) <= 1e-6 * max(1.0, abs(float(m_on[key]))), key


def np_topk_loss(name, s_logits, ids, t_logprobs, rest, mask, beta=0.5):
    """float64 reference of the documented formula: both distributions on the k + 1 buckets
    {top-k tokens, the rest}; the teacher's buckets renormalized."""
    q = np.exp(np_log_softmax(s_logits))
    q_top = np.take_along_axis(q, ids, -1)
    q_b = np.concatenate([q_top, (1.0 - q_top.sum(-1))[..., None]], -1)
    # The rest summed directly (not 1 - sum) for the reference too where it is tiny.
    in_top = np.zeros(q.shape, bool)
    np.put_along_axis(in_top, ids, True, -1)
    q_b[..., -1] = np.where(in_top, 0.0, q).sum(-1)
    p_b = np.exp(np.concatenate([np.asarray(t_logprobs, np.float64), np.asarray(rest, np.float64)[..., None]], -1))
    p_b /= p_b.sum(-1, keepdims=True)
    rows = np_divergence_rows(name, q_b, p_b, beta)
    assert rows is not None, name
    return (rows * mask).sum() / max(mask.sum(), 1)


def _random_cache_inputs(seed, shape=(3, 5), V=23, k=6, lp_dtype=np.float32, with_teacher=False):
    """(student logits, top-k ids, their log-probs, rest, mask) of a random teacher; with
    with_teacher also its whole float64 log-softmax [..., V]."""
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal(shape + (V,)) * 3).astype(np.float32)
    t_logp = np_log_softmax(rng.standard_normal(shape + (V,)) * 3)
    order = np.argsort(-t_logp, -1, kind="stable")
    ids = order[..., :k]
    lp = np.take_along_axis(t_logp, ids, -1).astype(lp_dtype)
    rest_lp = np.take_along_axis(t_logp, order[..., k:], -1)
    rest = np.log(np.exp(rest_lp).sum(-1)).astype(np.float32)
    mask = rng.random(shape) < 0.7
    mask[0, 0] = True
    out = (s, ids.astype(np.int32), lp, rest, mask)
    return out + (t_logp,) if with_teacher else out


@pytest.mark.parametrize("name", CACHED_LOSSES)
@pytest.mark.parametrize("lp_dtype", [np.float32, np.float16])
def test_k_below_vocab_matches_float64_reference(name, lp_dtype):
    s, ids, lp, rest, mask = _random_cache_inputs(0, lp_dtype=lp_dtype)
    got = float(losses.topk_loss(name, s, ids, lp, rest, mask))
    want = np_topk_loss(name, s, ids, lp, rest, mask)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", CACHED_LOSSES)
def test_k_below_vocab_gradient_matches_float64_finite_differences(name):
    s, ids, lp, rest, mask = _random_cache_inputs(1, shape=(2, 3), V=9, k=3)
    grad = np.asarray(jax.grad(lambda x: losses.topk_loss(name, x, ids, lp, rest, mask))(jnp.asarray(s)))
    s64, eps = s.astype(np.float64), 1e-6
    fd = np.zeros_like(s64)
    for i in np.ndindex(s64.shape):
        d = np.zeros_like(s64)
        d[i] = eps
        fd[i] = (np_topk_loss(name, s64 + d, ids, lp, rest, mask)
                 - np_topk_loss(name, s64 - d, ids, lp, rest, mask)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=2e-5, rtol=1e-4)


def test_k_below_vocab_is_a_lower_bound_of_the_full_kl():
    """Coarse-graining cannot increase a KL (data-processing inequality): a sanity property."""
    rng = np.random.default_rng(3)
    s = rng.standard_normal((4, 31)).astype(np.float32) * 2
    t = rng.standard_normal((4, 31)).astype(np.float32) * 2
    full = float(losses.kl(s, t))
    t_logp = np_log_softmax(t)
    for k in (1, 4, 16, 30, 31):
        order = np.argsort(-t_logp, -1)
        ids = order[:, :k]
        rest = np.log(np.exp(np.take_along_axis(t_logp, order[:, k:], -1)).sum(-1)) if k < 31 else \
            np.full(4, -np.inf)
        got = float(losses.topk_loss("kl", s, ids, np.take_along_axis(t_logp, ids, -1), rest))
        assert got <= full + 1e-6
    assert got == pytest.approx(full, abs=1e-6)  # k = V


def _tail_inputs(seed, shape=(3, 5), V=23, k=4, m=3):
    """_random_cache_inputs plus m tail ids per position (any tokens outside the top k) and the
    teacher's log-probabilities of them."""
    s, ids, lp, rest, mask, t_logp = _random_cache_inputs(seed, shape, V, k, with_teacher=True)
    rng = np.random.default_rng(seed + 1)
    tail = np.zeros(shape + (m,), np.int32)
    for i in np.ndindex(shape):
        outside = np.setdiff1d(np.arange(V), ids[i])
        tail[i] = rng.choice(outside, m)
    return s, ids, lp, rest, mask, tail, np.take_along_axis(t_logp, tail, -1).astype(np.float32)


def np_tail_loss(name, s_logits, ids, t_logprobs, rest, mask, tail, tail_lp):
    """float64 reference of the documented tail-sampled formula (losses._tail_sampled_rows)."""
    log_q = np_log_softmax(s_logits)
    lp = np.concatenate([np.asarray(t_logprobs, np.float64), np.asarray(rest, np.float64)[..., None]], -1)
    norm = np.log(np.exp(lp).sum(-1, keepdims=True))
    p = np.exp(lp - norm)
    k, m = ids.shape[-1], tail.shape[-1]
    lq_top, lq_tail = np.take_along_axis(log_q, ids, -1), np.take_along_axis(log_q, tail, -1)
    w = p[..., k:] / m
    if name == "kl":
        rows = (p[..., :k] * (np.log(p[..., :k]) - lq_top)).sum(-1) + (w * (tail_lp - norm - lq_tail)).sum(-1)
    else:
        rows = -(p[..., :k] * lq_top).sum(-1) - (w * lq_tail).sum(-1)
    return (rows * mask).sum() / max(mask.sum(), 1)


@pytest.mark.parametrize("name", losses.TAIL_SAMPLED)
def test_tail_sampled_loss_matches_float64_reference(name):
    """kl and ce with tail samples: value against the float64 formula (1e-5), gradient against
    its finite differences."""
    s, ids, lp, rest, mask, tail, tail_lp = _tail_inputs(4)
    got = float(losses.topk_loss(name, s, ids, lp, rest, mask, tail, tail_lp))
    assert got == pytest.approx(np_tail_loss(name, s, ids, lp, rest, mask, tail, tail_lp), rel=1e-5, abs=1e-6)
    # The samples change the value: the test would fail if they were ignored.
    assert abs(got - float(losses.topk_loss(name, s, ids, lp, rest, mask))) > 1e-3
    s, ids, lp, rest, mask, tail, tail_lp = _tail_inputs(5, shape=(2, 3), V=9, k=3, m=2)
    grad = np.asarray(jax.grad(lambda x: losses.topk_loss(name, x, ids, lp, rest, mask, tail, tail_lp))(
        jnp.asarray(s)))
    s64, eps, fd = s.astype(np.float64), 1e-6, np.zeros(s.shape)
    for i in np.ndindex(s64.shape):
        d = np.zeros_like(s64)
        d[i] = eps
        fd[i] = (np_tail_loss(name, s64 + d, ids, lp, rest, mask, tail, tail_lp)
                 - np_tail_loss(name, s64 - d, ids, lp, rest, mask, tail, tail_lp)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=2e-5, rtol=1e-4)


def test_tail_samples_give_the_full_kl_gradient_in_expectation():
    """sample_tail draws only outside the top k, with frequencies p(v) / p_rest; averaged over
    draws, the tail-sampled KL's gradient is the whole-vocabulary KL's (the k + 1 buckets' is
    not: that difference is what the samples are for)."""
    V, k, m, n = 17, 3, 4, 20000
    rng = np.random.default_rng(7)
    s = rng.standard_normal(V).astype(np.float32) * 2
    t_logp = np_log_softmax(rng.standard_normal(V) * 2).astype(np.float32)
    ids = np.argsort(-t_logp)[:k].astype(np.int32)
    top_lp = t_logp[ids]
    in_top = np.isin(np.arange(V), ids)
    rest = np.log(np.exp(t_logp[~in_top].astype(np.float64)).sum()).astype(np.float32)
    u = rng.random(n).astype(np.float32)
    tail = np.asarray(tc.sample_tail(jnp.broadcast_to(t_logp, (n, V)), jnp.broadcast_to(in_top, (n, V)),
                                     jnp.asarray(u), m))
    assert not np.isin(tail, ids).any()
    freq = np.bincount(tail.reshape(-1), minlength=V) / tail.size
    p_tail = np.where(in_top, 0.0, np.exp(t_logp.astype(np.float64))) / np.exp(float(rest))
    np.testing.assert_allclose(freq, p_tail, atol=3e-3)

    def mean_loss(x, tail_ids):
        b = tail_ids.shape[0]
        return losses.topk_loss("kl", jnp.broadcast_to(x, (b, V)), np.broadcast_to(ids, (b, k)),
                                np.broadcast_to(top_lp, (b, k)), np.full(b, rest), None, tail_ids,
                                t_logp[tail_ids])

    sampled = np.asarray(jax.grad(mean_loss)(jnp.asarray(s), tail))
    exact = np.asarray(jax.grad(lambda x: losses.kl(x, t_logp))(jnp.asarray(s)))
    buckets = np.asarray(jax.grad(lambda x: losses.topk_loss("kl", x, ids, top_lp, rest))(jnp.asarray(s)))
    np.testing.assert_allclose(sampled, exact, atol=2e-3)
    assert np.abs(buckets - exact).max() > 10 * 2e-3


def test_recorder_targets_are_the_online_teacher_distribution(models_):
    """teacher_top_k: the top k of the float32 log-softmax of the teacher's logits, sorted, and
    the log of the rest's mass."""
    tc_cfg, tp, _, _ = models_
    host = T.batch(T.ROWS_4)
    t = _targets(tc_cfg, tp, host, 7)
    from distil_jax import models

    logp = np.asarray(jax.nn.log_softmax(models.forward(tc_cfg, tp, host["input_ids"],
                                                        segment_ids=host["segment_ids"]).logits, -1), np.float64)
    ids, lp, rest = (t[k] for k in CACHE_BATCH_KEYS)
    np.testing.assert_allclose(lp, np.take_along_axis(logp, ids, -1), atol=1e-6)
    assert (np.diff(lp, axis=-1) <= 0).all()
    np.testing.assert_allclose(lp[..., -1], np.sort(logp, -1)[..., -7], atol=1e-6)
    in_top = np.zeros(logp.shape, bool)
    np.put_along_axis(in_top, ids, True, -1)
    np.testing.assert_allclose(rest, np.log(np.where(in_top, 0, np.exp(logp)).sum(-1)), atol=1e-5)


@pytest.mark.parametrize("component", ["hs", "attn"])
def test_components_the_cache_lacks_are_refused(component):
    obj = Objective.from_config({"logits": dict(weight=1.0, loss_fn="kl"), component: dict(weight=1.0)})
    with pytest.raises(ValueError, match=f"objective.{component} needs the teacher's .* set "
                                         f"objective.{component}.weight=0"):
        obj.check_cacheable()
    obj = Objective.from_config({"logits": dict(weight=1.0, loss_fn="raw_mse")})
    with pytest.raises(ValueError, match="loss_fn='raw_mse' needs the teacher's logits"):
        obj.check_cacheable()


# ----------------------------------------------------------------------------- record, train


def tiny_config(**overrides):
    """configs/tiny.py:test on 12 documents, a logits-only objective, top 16 of 512 tokens."""
    c = config_lib.load(TINY + ":test")
    c.dataset.sample_size = 12
    c.objective.attn.weight = 0.0
    c.teacher.cache_k = 16
    c.train.max_steps = 20
    for key, value in overrides.items():
        section, field = key.rsplit(".", 1)
        node = c
        for part in section.split("."):
            node = node[part]
        node[field] = value
    return c


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The demo teacher trained once, and its cache recorded in shards of 64 rows."""
    from distil_jax.record_teacher import record

    workdir = tmp_path_factory.mktemp("rec")
    manifest = record(tiny_config(**{"teacher.cache_tail_samples": 0}), workdir, shard_rows=64)
    return workdir, manifest


def _run_of(workdir: Path, cfg):
    """(teacher config, float32 teacher params, training rows, run_pins) of the tiny run `cfg`
    on the demo teacher and corpus in `workdir`."""
    from distil_jax import data, hf
    from distil_jax.training import builders as train_lib

    cfg.teacher.model_name_or_path = str(workdir / "teacher")
    cfg.dataset.uri = str(workdir / "data" / "stdlib_docstrings.jsonl")
    tcfg, tp = hf.load_pretrained(cfg.teacher.model_name_or_path, jnp.float32)
    tok = train_lib.load_tokenizer(cfg.teacher.model_name_or_path)
    rows, _, _ = data.build_datasets(cfg.dataset, tok, 32, "pack", cache_dir=workdir / "cache")
    return tcfg, tp, rows, tc.run_pins(cfg, tcfg, tok, 32, rows,
                                       tc.teacher_fingerprint(cfg.teacher.model_name_or_path))


@pytest.mark.slow
def test_recorded_cache_format(recorded):
    """The manifest pins what the cache was made from; the shards are Arrow that `datasets`
    reads; their records are the teacher's top k for every real token, in row order."""
    import datasets

    workdir, m = recorded
    cache = workdir / "teacher_cache"
    assert m["complete"] and m["k"] == 16 and m["layout"] == "pack" and m["seq_len"] == 32
    assert m["storage"]["ids_dtype"] == "uint16" and m["storage"]["logprobs_dtype"] == "float16"
    assert len(m["shards"]) == m["storage"]["shards"] > 2
    assert m["recording"]["tokens"] == m["real_tokens"] > 0
    assert set(m["teacher_eval"]) == {"heldout"} and m["teacher_eval"]["heldout"]["ppl"] > 1
    assert json.loads((cache / tc.MANIFEST).read_text())["shards"] == m["shards"]
    # Bytes on disk: k x (2 + 2) + 4 + 8 raw, less after zstd.
    assert 0 < tc.bytes_per_token(m) < 16 * 4 + 12

    ds = datasets.Dataset.from_file(str(cache / m["shards"][0]["file"]))
    assert ds.column_names == ["row", "position", "topk_ids", "topk_logprobs", "rest_logmass"]
    assert len(ds) == m["shards"][0]["tokens"] and len(ds[0]["topk_ids"]) == 16

    tcfg, tp, rows, run = _run_of(workdir, tiny_config())
    reader = tc.TeacherCache.open(cache, run, rows, k=16)
    pick = np.array([0, 5, len(rows["input_ids"]) - 1])
    sub = {k: v[pick] for k, v in rows.items()}
    got = reader.targets(pick, sub["segment_ids"])
    want = _targets(tcfg, tp, sub, 16)
    real = sub["segment_ids"] > 0
    np.testing.assert_array_equal(got["teacher_topk_ids"][real], want["teacher_topk_ids"][real])
    np.testing.assert_allclose(got["teacher_topk_logprobs"][real].astype(np.float32),
                               want["teacher_topk_logprobs"][real], atol=2e-2, rtol=2e-3)  # float16
    np.testing.assert_allclose(got["teacher_rest_logmass"][real], want["teacher_rest_logmass"][real], atol=1e-5)
    # Fewer buckets than recorded: the first k, and the rest folded into the rest bucket.
    small = tc.TeacherCache.open(cache, run, rows, k=4).targets(pick, sub["segment_ids"])
    np.testing.assert_array_equal(small["teacher_topk_ids"], got["teacher_topk_ids"][..., :4])
    lp = got["teacher_topk_logprobs"][real].astype(np.float64)
    folded = np.log(np.exp(lp[:, 4:]).sum(-1) + np.exp(got["teacher_rest_logmass"][real].astype(np.float64)))
    np.testing.assert_allclose(small["teacher_rest_logmass"][real], folded, rtol=1e-5)
    with pytest.raises(tc.CacheMismatch, match="holds the top 16 tokens per position, the run asks "
                                               "teacher.cache_k=32"):
        tc.TeacherCache.open(cache, run, rows, k=32)


@pytest.mark.slow
def test_recorded_tail_samples(recorded, tmp_path):
    """teacher.cache_tail_samples = m: m draws per token from outside its top k, stored with the
    teacher's log-probabilities of them; the draws do not depend on the batching (identical
    bytes at another batch size); a run trains from them, and reads them only at the recorded k."""
    from distil_jax import models
    from distil_jax.export import export
    from distil_jax.record_teacher import record
    from distil_jax.train import train

    src, _ = recorded
    workdir = T.seed_workdir(src, tmp_path / "w")
    caches = []
    for bs in (8, 4):
        cfg = tiny_config(**{"teacher.cache_tail_samples": 5, "teacher.cache": str(workdir / f"c{bs}")})
        m = record(cfg, workdir, shard_rows=64, batch_size=bs)
        caches.append(workdir / f"c{bs}")
    assert m["tail_samples"] == 5 and m["tail_seed"] == cfg.train.seed
    assert _files(caches[0]) == _files(caches[1])

    tcfg, tp, rows, run = _run_of(workdir, cfg)
    reader = tc.TeacherCache.open(caches[0], run, rows, k=16)
    pick = np.arange(8)
    sub = {k: v[pick] for k, v in rows.items()}
    got = reader.targets(pick, sub["segment_ids"])
    real = sub["segment_ids"] > 0
    tail, tail_lp = got["teacher_tail_ids"][real], got["teacher_tail_logprobs"][real]
    assert tail.shape[-1] == 5
    assert not (tail[:, :, None] == got["teacher_topk_ids"][real][:, None, :]).any()
    logp = np.asarray(jax.nn.log_softmax(models.forward(tcfg, tp, sub["input_ids"],
                                                        segment_ids=sub["segment_ids"]).logits, -1))[real]
    np.testing.assert_allclose(tail_lp.astype(np.float32), np.take_along_axis(logp, tail.astype(int), -1),
                               atol=2e-2, rtol=2e-3)  # float16
    with pytest.raises(tc.CacheMismatch, match="read at the k it was recorded with"):
        tc.TeacherCache.open(caches[0], run, rows, k=8)

    out = T.seed_workdir(src, tmp_path / "run")
    res = train(tiny_config(**{"teacher.cache": str(caches[0]), "train.max_steps": 4}), out)
    assert res["step"] == 4
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["teacher"]["cache"]["tail_samples"] == 5
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(rec["loss/logits"]) for rec in lines if "loss/logits" in rec)
    card = (export(out, tmp_path / "export") / "README.md").read_text()
    assert "top-16 teacher cache" in card and "5 tokens drawn from that rest" in card


@pytest.mark.slow
def test_recorder_resumes_after_sigkill_with_identical_bytes(recorded, tmp_path):
    """Kill the recorder with SIGKILL mid-run, corrupt a finished shard and leave a killed
    writer's temp file, rerun the same command: the cache ends byte-identical to an
    uninterrupted recording, and no finished shard was written twice."""
    from distil_jax.record_teacher import record

    src, _ = recorded
    workdir = T.seed_workdir(src, tmp_path / "w")
    whole, killed = workdir / "whole", workdir / "killed"
    record(tiny_config(**{"teacher.cache": str(whole)}), workdir, shard_rows=64)

    cmd = [sys.executable, "-m", "distil_jax.record_teacher", "--config", TINY + ":test",
           "--workdir", str(workdir), "--shard_rows", "64", "--config.dataset.sample_size=12",
           "--config.objective.attn.weight=0", "--config.teacher.cache_k=16",
           "--config.train.max_steps=20", f"--config.teacher.cache={killed}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = T.start_until(cmd, lambda: len(list((killed / "data").glob("train-*.arrow"))) >= 2, ROOT)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted((killed / "data").glob("train-*.arrow"))
    n_shards = json.loads((whole / tc.MANIFEST).read_text())["storage"]["shards"]
    assert 2 <= len(done_before) < n_shards
    assert json.loads((killed / tc.MANIFEST).read_text())["complete"] is False
    # A shard damaged after the kill is recorded again; a dead writer's temp file is removed.
    damaged = done_before[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    # fsio's temp name for the last shard, written by a process that no longer exists.
    last = json.loads((whole / tc.MANIFEST).read_text())["shards"][-1]["file"]
    stale = killed / f"{Path(last).parent}/.{Path(last).name}.tmp-{fsio._host()}-999999999-abcd"
    stale.write_bytes(b"partial")
    mtimes = {p.name: p.stat().st_mtime_ns for p in done_before[1:]}

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{n_shards - len(done_before) + 1} to record" in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in done_before[1:]} == mtimes  # not redone
    assert not stale.exists()
    assert _files(killed) == _files(whole)


@pytest.fixture(scope="module")
def trained_from_cache(recorded, tmp_path_factory):
    """A 20-step run from the cache (checkpoints at 10 and 20)."""
    from distil_jax.train import train

    src, _ = recorded
    workdir = T.seed_workdir(src, tmp_path_factory.mktemp("from_cache"))
    cfg = tiny_config(**{"teacher.cache": str(src / "teacher_cache")})
    return workdir, train(cfg, workdir)


@pytest.mark.slow
def test_train_from_cache_resumes_exactly_and_exports(recorded, trained_from_cache, tmp_path):
    """Training from the cache distils (held-out perplexity falls), reports the teacher's
    perplexity from the manifest, resumes from a checkpoint to the same parameters bit for bit
    (prefetched batches are not counted as consumed), and exports with a card that says how."""
    from distil_jax.export import export
    from distil_jax.train import train

    src, m = recorded
    workdir, result = trained_from_cache
    ev = result["eval"]["heldout"]
    assert ev["student_end"]["ppl"] < 0.8 * ev["student_start"]["ppl"]
    assert ev["teacher"]["ppl"] == m["teacher_eval"]["heldout"]["ppl"]
    assert ev["teacher"]["source"] == "teacher cache manifest"
    summary = json.loads((workdir / "run_summary.json").read_text())
    assert summary["teacher"]["cache"]["k"] == 16 and summary["teacher"]["cache"]["host_wait_s"] >= 0
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert "loss/logits" in {k for rec in lines for k in rec}

    resumed = T.seed_workdir(src, tmp_path / "resumed")
    shutil.copytree(workdir / "checkpoints" / "10", resumed / "checkpoints" / "10")
    shutil.copy(workdir / "config.json", resumed / "config.json")  # the run's record: a resume needs it
    again = train(tiny_config(**{"teacher.cache": str(src / "teacher_cache")}), resumed)
    assert again["step"] == 20
    _, a = checkpoint.restore_params(resumed)
    _, b = checkpoint.restore_params(workdir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)

    out = export(workdir, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "top-16 teacher cache" in card
    assert (out / "model.safetensors").exists()


def _expect_refusal(recorded, tmp_path, match, cache=None, **overrides):
    from distil_jax.train import train

    src, _ = recorded
    workdir = T.seed_workdir(src, tmp_path / "w")
    cfg = tiny_config(**{"teacher.cache": str(cache or src / "teacher_cache"), **overrides})
    with pytest.raises(ValueError, match=match):
        train(cfg, workdir)
    assert not (workdir / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("overrides, match", [
    ({"dataset.layout": "pad"}, r"does not match this run: another dataset.layout \(cache: pack, run: pad\)"),
    ({"dataset.max_seq_len": 16}, r"another sequence length \(cache: 32, run: 16\)"),
    ({"dataset.test_size": 0.2}, r"another dataset \(its training rows differ; dataset fields .*test_size differ\)"),
    ({"objective.temperature": 2.0}, r"another objective.temperature .*set objective.temperature=1.0"),
    ({"objective.attn.weight": 5.0}, r"objective.attn needs the teacher's attention maps"),
    ({"objective.hs": dict(weight=1.0)}, r"objective.hs needs the teacher's hidden states"),
    ({"teacher.cache_k": 64}, r"holds the top 16 tokens per position, the run asks teacher.cache_k=64"),
])
def test_run_mismatches_are_refused(recorded, tmp_path, overrides, match):
    _expect_refusal(recorded, tmp_path, match, **overrides)


def _edited_cache(recorded, tmp_path, edit) -> Path:
    src, _ = recorded
    cache = tmp_path / "cache"
    shutil.copytree(src / "teacher_cache", cache)
    edit(cache)
    return cache


def _set_manifest(path, **fields):
    m = json.loads((path / tc.MANIFEST).read_text())
    for key, value in fields.items():
        node = m
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (path / tc.MANIFEST).write_text(json.dumps(m))


def _flip_byte(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def _shard(path, i=1):
    return path / json.loads((path / tc.MANIFEST).read_text())["shards"][i]["file"]


@pytest.mark.slow
@pytest.mark.parametrize("edit, match", [
    (lambda c: _set_manifest(c, **{"teacher.fingerprint": "0" * 64}), r"another teacher \(weights fingerprint\)"),
    (lambda c: _set_manifest(c, **{"tokenizer.fingerprint": "0" * 64}), r"another tokenizer"),
    (lambda c: _set_manifest(c, complete=False), r"is incomplete \(its recording was interrupted\)"),
    (lambda c: _shard(c).write_bytes(_shard(c).read_bytes()[:-10]), r"shard data/train-00001-of-000\d\d.arrow is truncated"),
    (lambda c: _flip_byte(_shard(c)), r"shard data/train-00001-of-000\d\d.arrow is corrupted"),
    (lambda c: _shard(c).unlink(), r"shard data/train-00001-of-000\d\d.arrow is missing"),
    (lambda c: (c / tc.MANIFEST).unlink(), r"no manifest.json there; record the cache first"),
])
def test_cache_mismatches_are_refused(recorded, tmp_path, edit, match):
    _expect_refusal(recorded, tmp_path, match, cache=_edited_cache(recorded, tmp_path, edit))


@pytest.mark.slow
@pytest.mark.parametrize("edit, overrides, match", [
    # The manifest's k halved: read at its k, the shards' k = 16 records would be split in two.
    (lambda c: _set_manifest(c, k=8), {"teacher.cache_k": 8},
     r"shard data/train-00000-of-000\d\d.arrow does not match the manifest \(k is 16 in the shard, "
     r"8 in the manifest\).*delete .* and record the cache again"),
    # The manifest's temperature edited to the run's: the shards hold the distribution at T = 1.
    (lambda c: _set_manifest(c, temperature=2.0), {"objective.temperature": 2.0},
     r"does not match the manifest \(temperature is 1.0 in the shard, 2.0 in the manifest\)"),
    (lambda c: _set_manifest(c, **{"storage.logprobs_dtype": "float32"}), {},
     r"does not match the manifest \(logprobs_dtype is 'float16' in the shard, 'float32'"),
])
def test_manifest_that_disagrees_with_its_shards_is_refused(recorded, tmp_path, edit, overrides, match):
    """Each shard carries its own k, temperature and dtypes: a manifest that says otherwise is
    refused in one line, before any training (not read with the wrong widths)."""
    _expect_refusal(recorded, tmp_path, match, cache=_edited_cache(recorded, tmp_path, edit), **overrides)


def _meta(**overrides):
    meta = {"format_version": tc.FORMAT_VERSION, "k": 3, "tail_samples": 0, "temperature": 1.0,
            "ids_dtype": "uint16", "logprobs_dtype": "float16", "vocab_size": 10,
            "teacher_fingerprint": "t" * 64, "rows_fingerprint": "r" * 64, "rows": [4, 6], "tokens": 6}
    return {**meta, **overrides}


def test_shard_describes_itself(tmp_path):
    """A shard's schema metadata is its own description: read back equal to what it was written
    with, each field and each column width checked against what a manifest expects."""
    rng = np.random.default_rng(0)
    seg = np.array([[1, 1, 2, 0], [1, 1, 1, 0]], np.int32)  # 6 real tokens in rows 4 and 5
    ids = rng.integers(0, 10, (2, 4, 3))
    lp = np.sort(rng.normal(size=(2, 4, 3)), -1)[..., ::-1]
    rest = rng.normal(size=(2, 4))
    path = tmp_path / "shard.arrow"
    tc.write_shard(path, tc.shard_table(_meta(), seg, ids, lp, rest))
    table = tc.open_shard(path)
    assert tc.shard_problem(table, _meta()) is None
    cols = tc.shard_columns(table)
    r, p = np.nonzero(seg > 0)
    np.testing.assert_array_equal(cols["row"], r + 4)
    np.testing.assert_array_equal(cols["topk_ids"], ids[r, p])
    np.testing.assert_array_equal(cols["topk_logprobs"], lp[r, p].astype(np.float16))
    assert tc.shard_problem(table, _meta(k=6)) == "k is 3 in the shard, 6 in the manifest"
    assert "tail_samples is 0 in the shard, 2" in tc.shard_problem(table, _meta(tail_samples=2))
    assert "rows is [4, 6] in the shard, [0, 2]" in tc.shard_problem(table, _meta(rows=[0, 2]))
    # A shard written with another description under the same name: its columns say so too.
    tc.write_shard(path, tc.shard_table(_meta(k=2), seg, ids[..., :2], lp[..., :2], rest))
    assert tc.shard_problem(tc.open_shard(path), _meta()) == "k is 2 in the shard, 3 in the manifest"
    other = tc.open_shard(path).replace_schema_metadata({tc.format.META_KEY: json.dumps(_meta())})
    assert tc.shard_problem(other, _meta()) == ("column topk_ids holds 2 x uint16, the manifest "
                                                "says 3 x uint16")


@pytest.mark.slow
def test_recording_finishes_in_a_moved_workdir(recorded, tmp_path, caplog):
    """An interrupted recording of the demo (its teacher and corpus in the workdir) finishes after
    the workdir is moved: the paths of the inputs are not what the cache pins, their fingerprints
    are. Its shards are the uninterrupted recording's; training reads it. A dataset.max_seq_len
    above the teacher's positions is cut with a warning naming both."""
    import logging

    from distil_jax.record_teacher import record

    src, m = recorded
    before = T.seed_workdir(src, tmp_path / "before")
    shutil.copytree(src / "teacher_cache", before / "teacher_cache")
    _set_manifest(before / "teacher_cache", complete=False)  # as a killed recording leaves it
    _shard(before / "teacher_cache", 1).unlink()
    after = tmp_path / "after"
    shutil.move(before, after)
    with caplog.at_level(logging.INFO, logger="distil_jax"):
        done = record(tiny_config(**{"dataset.max_seq_len": 64, "teacher.cache_tail_samples": 0}),
                      after, shard_rows=64)
    assert done["complete"] and done["recording"]["tokens"] == m["shards"][1]["tokens"]
    assert done["teacher"]["name_or_path"] == str(after / "teacher")
    assert done["shards"] == m["shards"]
    assert _files(after / "teacher_cache" / "data") == _files(src / "teacher_cache" / "data")
    assert "dataset.max_seq_len=64 is more than the teacher's maximum positions (32): rows are 32 " \
           "tokens long" in caplog.text
    tcfg, _, rows, run = _run_of(after, tiny_config())
    tc.TeacherCache.open(after / "teacher_cache", run, rows, k=16)
