"""distil_jax.objectives.objective: chunked == unchunked, temperature, the reference objective
against an independent float64 NumPy recomputation, features requested, errors.

Tolerances (float32 computation against float64 references or against each other):
  LOSS_TOL = 1e-5  absolute, on losses of order 1-10 and on their gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from distil_jax import train_step as ts
from distil_jax import models
from distil_jax.models.gpt2 import GPT2Config
from distil_jax.objectives import objective as objective_lib
from distil_jax.objectives.objective import Objective
from tests import tiny_setup as T

LOSS_TOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    tc, tp = T.teacher()
    s_cfg, sp, trainable = T.student(tc, tp)
    return tc, tp, s_cfg, sp, trainable


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl64(s_logits, t_logits):
    """Per-position KL(teacher || student) in float64: [..., V] -> [...]."""
    ls, lt = _log_softmax64(s_logits), _log_softmax64(t_logits)
    return (np.exp(lt) * (lt - ls)).sum(-1)


def _layer_norm64(x, scale, bias, eps=1e-5):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


# ----------------------------------------------------------------------------- chunking


def test_chunked_logits_loss_equals_unchunked_value_and_gradient(setup):
    tc, tp, s_cfg, sp, _ = setup
    batch = {k: jnp.asarray(v) for k, v in T.batch(T.ROWS_4).items()}  # padding + packed rows
    B, S = batch["input_ids"].shape
    results = {}
    # 0: unchunked; 24: chunks that do not divide B*S = 64 (the last chunk is zero-padded).
    for chunk in (0, 24):
        # (The attention component is off: it does not depend on the chunking.)
        obj = T.objective(s_cfg, tc, attn=dict(weight=0.0), logits_chunk_tokens=chunk, clm_weight=0.5,
                          temperature=2.0)
        assert obj.chunk_tokens(B, S, T.VOCAB) == chunk
        params = T.params_tree(obj, s_cfg, tc, sp)
        step_cfg = ts.with_logits_chunk(ts.StepConfig(tc, s_cfg, obj), B, S)
        assert step_cfg.logits_chunk == chunk
        fn = jax.jit(jax.value_and_grad(lambda p, b: ts.distill_loss(step_cfg, p, tp, b, None),
                                        has_aux=True))
        (loss, parts), grads = fn(params, batch)
        results[chunk] = (float(loss), {k: float(v) for k, v in parts.items()}, T.to_numpy(grads))
    loss0, parts0, grads0 = results[0]
    assert set(parts0) == {"loss", "loss/logits", "loss/clm"}
    assert parts0["loss/logits"] > 1e-3 and parts0["loss/clm"] > 1.0  # non-trivial values
    for chunk in (24,):
        loss, parts, grads = results[chunk]
        assert abs(loss - loss0) < LOSS_TOL
        for k in parts0:
            assert abs(parts[k] - parts0[k]) < LOSS_TOL, k
        assert T.max_abs_diff(grads["student"], grads0["student"]) < LOSS_TOL
    # The gradient is not trivially zero (the student's head gets the logits losses' gradient).
    assert np.abs(grads0["student"]["wte"]["embedding"]).max() > 1e-3


# ----------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_temperature_scales_kl_by_t_squared(setup, temperature):
    tc, tp, s_cfg, sp, _ = setup
    b = T.batch(T.ROWS_4)
    obj = Objective.from_config(dict(logits=dict(weight=1.0, loss_fn="kl"),
                                     temperature=temperature, logits_chunk_tokens=0)).bind(s_cfg, tc)
    s_out = models.forward(s_cfg, sp, b["input_ids"], segment_ids=b["segment_ids"])
    t_out = models.forward(tc, tp, b["input_ids"], segment_ids=b["segment_ids"])
    loss, parts = obj({}, s_out, t_out, jnp.asarray(b["segment_ids"]), jnp.asarray(b["input_ids"]))
    assert set(parts) == {"loss", "loss/logits"}
    s = np.asarray(s_out.logits, np.float64)
    t = np.asarray(t_out.logits, np.float64)
    real = b["segment_ids"] > 0
    expected = temperature ** 2 * _kl64(s / temperature, t / temperature)[real].mean()
    assert expected > 1e-3
    assert abs(float(loss) - expected) < LOSS_TOL
    assert abs(float(parts["loss/logits"]) - expected) < LOSS_TOL


# ----------------------------------------------------------------------------- reference objective


def test_reference_objective_matches_float64_numpy(setup):
    """KL on logits + 5.0 * raw MSE of the layer-2 attention maps (student block n_s-2 vs teacher
    block n_t-2), student side through the orthogonal projector, teacher side through the
    trainable LayerNorm, masked over real query positions; recomputed in float64 NumPy."""
    tc, tp, s_cfg, sp, _ = setup
    b = T.batch(T.ROWS_4)
    obj = T.objective(s_cfg, tc, logits_chunk_tokens=0)
    params = T.params_tree(obj, s_cfg, tc, sp)  # norm scale/bias moved away from 1/0
    loss, parts = jax.jit(lambda p, bb: ts.distill_loss(ts.StepConfig(tc, s_cfg, obj), p, tp, bb, None))(
        params, {k: jnp.asarray(v) for k, v in b.items()})

    s_layer, t_layer = s_cfg.n_layer - 2, tc.n_layer - 2
    s_out = models.forward(s_cfg, sp, b["input_ids"], segment_ids=b["segment_ids"],
                         output_attentions=(s_layer,))
    t_out = models.forward(tc, tp, b["input_ids"], segment_ids=b["segment_ids"],
                         output_attentions=(t_layer,))
    real = b["segment_ids"] > 0  # [B, S]

    kl = _kl64(s_out.logits, t_out.logits)[real].mean()

    w = np.asarray(params["objective"]["attn"]["projector"]["weight"], np.float64)
    a = scipy.linalg.expm((w - w.T) / 2.0)
    np.testing.assert_allclose(a @ a.T, np.eye(T.SEQ), atol=1e-10)
    s_att = np.asarray(s_out.attentions[s_layer], np.float64) @ a[:, :T.SEQ].T  # [B, H, S, S]
    norm = params["objective"]["attn"]["norm"]["teacher"]
    t_att = _layer_norm64(t_out.attentions[t_layer], norm["scale"], norm["bias"])
    row_mse = ((s_att - t_att) ** 2).mean(-1)  # [B, H, S]: mean over key positions
    query_mask = np.broadcast_to(real[:, None, :], row_mse.shape)
    attn = row_mse[query_mask].mean()

    assert abs(float(parts["loss/logits"]) - kl) < LOSS_TOL
    assert abs(float(parts["loss/attn"]) - attn) < LOSS_TOL
    assert abs(float(loss) - (kl + 5.0 * attn)) < LOSS_TOL
    # Padding really is excluded: averaging over every query row gives a different value.
    assert abs(row_mse.mean() - attn) > 1e-3


# ----------------------------------------------------------------------------- features


def test_weight_zero_component_requests_nothing_and_adds_no_key(setup):
    tc, tp, s_cfg, sp, _ = setup
    b = T.batch(T.ROWS_4)
    obj = Objective.from_config(dict(
        logits=dict(weight=1.0, loss_fn="kl"),
        hs=dict(weight=0.0, loss_fn="raw_mse", projector="linear"),
        attn=dict(weight=0.0, loss_fn="raw_mse", layer_mapper="layer-2"))).bind(s_cfg, tc)
    feats = obj.features(s_cfg, tc)
    assert feats == {"student": dict(output_hidden_states=False, output_attentions=()),
                     "teacher": dict(output_hidden_states=False, output_attentions=())}
    assert obj.init_params(jax.random.PRNGKey(0), s_cfg, tc, T.SEQ) == {}
    loss, parts = ts.distill_loss(ts.StepConfig(tc, s_cfg, obj), {"student": sp, "objective": {}}, tp,
                                  {k: jnp.asarray(v) for k, v in b.items()}, None)
    assert set(parts) == {"loss", "loss/logits"}
    # The logits component off, clm on: only the clm key.
    obj = Objective.from_config(dict(logits=dict(weight=0.0), clm_weight=1.0)).bind(s_cfg, tc)
    loss, parts = ts.distill_loss(ts.StepConfig(tc, s_cfg, obj), {"student": sp, "objective": {}}, tp,
                                  {k: jnp.asarray(v) for k, v in b.items()}, None)
    assert set(parts) == {"loss", "loss/clm"}


def test_only_mapped_attention_layers_are_requested():
    s6 = GPT2Config(n_layer=6, n_embd=32, n_head=4, vocab_size=T.VOCAB)
    t12 = GPT2Config(n_layer=12, n_embd=32, n_head=4, vocab_size=T.VOCAB)
    obj = Objective.from_config(T.REFERENCE_OBJECTIVE).bind(s6, t12)
    assert obj.features(s6, t12) == {
        "student": dict(output_hidden_states=False, output_attentions=(4,)),
        "teacher": dict(output_hidden_states=False, output_attentions=(10,)),
    }
    hs = Objective.from_config(dict(hs=dict(weight=1.0, layer_mapper="last"))).bind(s6, t12)
    assert hs.features(s6, t12)["student"] == dict(output_hidden_states=True, output_attentions=())


def test_hs_component_with_linear_projector_end_to_end(setup):
    """A student narrower than the teacher (16 vs 32): hidden states go through a linear
    projector; the step trains it and the loss has an hs key."""
    tc, tp, _, _, _ = setup
    s_cfg, sp, trainable = T.student(tc, tp, overrides={"n_layer": 2, "n_embd": 16},
                                  copy_teacher_modules=[])
    obj = Objective.from_config(dict(
        logits=dict(weight=1.0, loss_fn="kl"),
        hs=dict(weight=2.0, loss_fn="raw_mse", layer_mapper="uniform_cons", norm="layernorm",
                projector="linear"))).bind(s_cfg, tc)
    assert obj.hs_pairs(2, 4) == ((0, 0), (0, 1), (1, 2), (1, 3), (2, 4))
    params = T.params_tree(obj, s_cfg, tc, sp)
    proj = params["objective"]["hs"]["projector"]
    assert proj["kernel"].shape == (16, 32) and proj["bias"].shape == (32,)
    tx, sched = ts.make_optimizer(dict(learning_rate=1e-2), 10,
                                  T.trainable_mask(trainable, params["objective"]))
    state = ts.create_train_state(params, tx, jax.random.PRNGKey(0))
    kernel0 = np.array(proj["kernel"], copy=True)
    step = ts.make_train_step(ts.StepConfig(tc, s_cfg, obj), tx, sched)
    batch = {k: jnp.asarray(v) for k, v in T.batch(T.ROWS_4).items()}
    losses = []
    for _ in range(2):
        state, m = step(state, tp, batch)
        losses.append(float(m["loss/hs"]))
        assert set(m) >= {"loss", "loss/logits", "loss/hs"}
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not np.array_equal(kernel0, np.asarray(state.params["objective"]["hs"]["projector"]["kernel"]))


# ----------------------------------------------------------------------------- errors


def test_unknown_component_field_is_an_error():
    with pytest.raises(ValueError, match="lossfn"):
        Objective.from_config(dict(attn=dict(weight=1.0, lossfn="raw_mse")))
    with pytest.raises(ValueError, match="temprature"):
        Objective.from_config(dict(temprature=2.0))


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ValueError, match="kld") as err:
        Objective.from_config(dict(attn=dict(weight=1.0, loss_fn="kld")))
    for name in ("kl", "reverse_kl", "cakld", "jsd", "raw_mse", "soft_mse", "cos", "ce"):
        assert name in str(err.value)


def test_head_count_mismatch_with_attn_is_an_error(setup):
    tc, _, _, _, _ = setup
    s_cfg = tc.replace(n_layer=2, n_head=2)
    obj = Objective.from_config(T.REFERENCE_OBJECTIVE)
    with pytest.raises(ValueError, match="the student has 2 query heads and the teacher 4"):
        obj.bind(s_cfg, tc)
    with pytest.raises(ValueError, match="heads"):
        obj.init_params(jax.random.PRNGKey(0), s_cfg, tc, T.SEQ)
    # Without the attn component the head counts may differ.
    obj = Objective.from_config(dict(logits=dict(weight=1.0, loss_fn="kl"))).bind(s_cfg, tc)
    assert obj.init_params(jax.random.PRNGKey(0), s_cfg, tc, T.SEQ) == {}


def test_automatic_chunking_follows_device_memory(monkeypatch):
    """logits_chunk_tokens None: chunk only when the unchunked float32 logits arrays (16 bytes per
    logit) would take more than a quarter of the device's memory."""
    obj = Objective.from_config({})
    assert obj.logits_chunk_tokens is None
    B, S, V = 8, 1024, 50257  # the reference micro-batch: 412 M logits, 6.6 GB unchunked
    monkeypatch.setattr(objective_lib, "device_memory_bytes", lambda: 141 * 10**9)  # an H200
    assert obj.chunk_tokens(B, S, V) == 0
    monkeypatch.setattr(objective_lib, "device_memory_bytes", lambda: 16 * 10**9)  # a 16 GB GPU
    assert obj.chunk_tokens(B, S, V) == objective_lib.DEFAULT_CHUNK_TOKENS
    assert obj.chunk_tokens(1, S, V) == 0  # 0.8 GB
    # An explicit setting wins either way.
    assert Objective.from_config({"logits_chunk_tokens": 0}).chunk_tokens(B, S, V) == 0
    assert Objective.from_config({"logits_chunk_tokens": 512}).chunk_tokens(1, 8, 11) == 512
    # The real query: a positive number of bytes on this machine.
    monkeypatch.undo()
    assert objective_lib.device_memory_bytes() > 2**30
