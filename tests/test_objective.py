"""distil_jax.objectives.objective: chunked == unchunked, temperature, the reference objective
against an independent float64 NumPy recomputation, packed rows against padded rows, float32
logits, features requested, errors.

Tolerances (float32 computation against float64 references or against each other):
  LOSS_TOL = 1e-5  absolute, on losses of order 1-10 and on their gradients.
  PACK_TOL = 1e-6  absolute: the same documents in packed rows and in padded rows, per-token
                   losses (order 0.01-10) and summed gradients, float32 both; the two differ
                   only in the order of float32 reductions.
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
from tests.np_reference import np_log_softmax

LOSS_TOL = 1e-5
PACK_TOL = 1e-6


@pytest.fixture(scope="module")
def setup():
    tc, tp = T.teacher()
    s_cfg, sp, trainable = T.student(tc, tp)
    return tc, tp, s_cfg, sp, trainable


def _kl64(s_logits, t_logits):
    """Per-position KL(teacher || student) in float64: [..., V] -> [...]."""
    ls, lt = np_log_softmax(s_logits), np_log_softmax(t_logits)
    return (np.exp(lt) * (lt - ls)).sum(-1)


def _document_frame64(maps, segment_ids):
    """[B, H, S, S] -> the same rows with key o + j moved to key j (o: the start of the query's
    document in its row), zeros after the row's end; float64, by loops."""
    maps = np.asarray(maps, np.float64)
    out = np.zeros_like(maps)
    B, _, S, _ = maps.shape
    for b in range(B):
        for q in range(S):
            o = q
            while o > 0 and segment_ids[b, o - 1] == segment_ids[b, q]:
                o -= 1
            out[b, :, q, :S - o] = maps[b, :, q, o:]
    return out


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
        step_cfg = ts.for_batch_shape(ts.StepConfig(tc, s_cfg, obj), B, S)
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
    block n_t-2), each row moved into its document's frame, student side through the orthogonal
    projector, teacher side through the trainable LayerNorm, masked over real query positions;
    recomputed in float64 NumPy (ROWS_4 has packed rows, so the frame matters)."""
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
    seg = b["segment_ids"]
    s_att = _document_frame64(s_out.attentions[s_layer], seg) @ a[:, :T.SEQ].T  # [B, H, S, S]
    norm = params["objective"]["attn"]["norm"]["teacher"]
    t_att = _layer_norm64(_document_frame64(t_out.attentions[t_layer], seg), norm["scale"], norm["bias"])
    row_mse = ((s_att - t_att) ** 2).mean(-1)  # [B, H, S]: mean over key positions
    query_mask = np.broadcast_to(real[:, None, :], row_mse.shape)
    attn = row_mse[query_mask].mean()

    assert abs(float(parts["loss/logits"]) - kl) < LOSS_TOL
    assert abs(float(parts["loss/attn"]) - attn) < LOSS_TOL
    assert abs(float(loss) - (kl + 5.0 * attn)) < LOSS_TOL
    # Padding really is excluded: averaging over every query row gives a different value.
    assert abs(row_mse.mean() - attn) > 1e-3


# ----------------------------------------------------------------------------- packed rows

# Documents of a row of 16 or less: data.pack(truncate=True) puts them, whole, in 4 rows, most
# at an offset > 0; data.pad puts each in its own row at offset 0.
PACK_DOC_LENGTHS = [16, 10, 5, 4, 3, 7, 9, 6]
HS_ON = dict(hs=dict(weight=2.0, loss_fn="raw_mse", layer_mapper="uniform_cons",
                     norm="layernorm_affine", projector="linear"))


def _same_documents_pad_and_pack():
    """(pad batch, pack batch, where): the same documents laid out by data.pad and data.pack
    (truncate=True, as the reference config does); where[d] = (pack row, offset) of document d
    (found by its tokens, not by the packing code)."""
    from distil_jax import data

    rs = np.random.RandomState(3)
    docs = [rs.randint(1, T.VOCAB, n).astype(np.int32) for n in PACK_DOC_LENGTHS]
    pad = data.docs_to_rows(docs, T.SEQ, "pad", eos_id=0, pad_id=0, truncate=True, append_eos=False)
    pack = data.docs_to_rows(docs, T.SEQ, "pack", eos_id=0, pad_id=0, truncate=True, append_eos=False)
    assert pad["input_ids"].shape[0] == len(docs) and pack["input_ids"].shape[0] == 4
    where = {}
    for r in range(pack["input_ids"].shape[0]):
        seg = pack["segment_ids"][r]
        for k in range(1, seg.max() + 1):
            pos = np.flatnonzero(seg == k)
            match = [d for d, doc in enumerate(docs) if np.array_equal(doc, pack["input_ids"][r, pos])]
            assert len(match) == 1
            where[match[0]] = (r, int(pos[0]))
    assert sorted(where) == list(range(len(docs)))
    assert sum(o > 0 for _, o in where.values()) >= 4  # most documents start inside a row
    # Empty rows (all padding) up to the pad batch's 8, so that both batches share one shape and
    # one compilation (they change nothing: padding counts in no loss).
    pack = {k: np.concatenate([v, np.zeros((len(docs) - len(v), T.SEQ), v.dtype)])
            for k, v in pack.items()}
    return pad, pack, where


@pytest.mark.parametrize("extra", [{}, HS_ON], ids=["reference", "reference+hs"])
def test_packed_rows_give_the_pad_layouts_per_token_losses_and_gradients(setup, extra):
    """The same documents in padded rows (one per row, offset 0) and in packed rows (several per
    row): every per-token loss and the gradient of the summed loss agree to PACK_TOL, because
    the attention rows are moved into each document's frame before the projector and norm."""
    tc, tp, s_cfg, sp, _ = setup
    pad, pack, where = _same_documents_pad_and_pack()
    obj = T.objective(s_cfg, tc, logits_chunk_tokens=0, **extra)
    params = T.params_tree(obj, s_cfg, tc, sp)
    feats = obj.features(s_cfg, tc)

    def per_token(batch, single_document_rows):
        kw = dict(segment_ids=batch["segment_ids"])
        s_out = models.forward(s_cfg, sp, batch["input_ids"], **feats["student"], **kw)
        t_out = models.forward(tc, tp, batch["input_ids"], **feats["teacher"], **kw)
        return jax.device_get(obj.per_token(params["objective"], s_out, t_out, jnp.asarray(batch["segment_ids"]),
                                            jnp.asarray(batch["input_ids"]), single_document_rows))

    pad_tok, pack_tok = per_token(pad, True), per_token(pack, False)
    keys = {"loss/logits", "loss/attn"} | ({"loss/hs"} if extra else set())
    assert set(pad_tok) == set(pack_tok) == keys
    for key in keys:
        for d, n in enumerate(PACK_DOC_LENGTHS):
            r, o = where[d]
            np.testing.assert_allclose(pack_tok[key][r, o:o + n], pad_tok[key][d, :n], rtol=0,
                                       atol=PACK_TOL, err_msg=f"{key}, document {d}")
        assert pad_tok[key].max() > 1e-2  # non-trivial losses
    # Without the frame (the pad layout's shortcut, wrong on packed rows) the attention term of
    # every document at an offset differs: the projector and norm are not shift-invariant.
    unframed = per_token(pack, True)["loss/attn"]
    for d, n in enumerate(PACK_DOC_LENGTHS):
        r, o = where[d]
        if o > 0:
            assert np.abs(unframed[r, o:o + n] - pad_tok["loss/attn"][d, :n]).max() > 1e-3, d

    # The training step's loss and gradient, one compilation for both layouts (in the padded
    # rows the frame is the identity on every real token, as the per-token check above shows).
    step_cfg = ts.StepConfig(tc, s_cfg, obj)
    fn = jax.jit(jax.value_and_grad(lambda p, b: ts.distill_loss(step_cfg, p, tp, b, None), has_aux=True))
    grads = {}
    for name, batch in (("pad", pad), ("pack", pack)):
        (loss, parts), g = fn(params, {k: jnp.asarray(v) for k, v in batch.items()})
        grads[name] = (T.to_numpy(g), {k: float(v) for k, v in parts.items()})
    (g_pad, parts_pad), (g_pack, parts_pack) = grads["pad"], grads["pack"]
    assert set(parts_pad) == set(parts_pack) == keys | {"loss"}
    for k in parts_pad:
        assert abs(parts_pad[k] - parts_pack[k]) < PACK_TOL, (k, parts_pad[k], parts_pack[k])
    # Means over the same real tokens: equal means, equal gradients of the summed loss.
    n_real = sum(PACK_DOC_LENGTHS)
    for k in keys:
        assert abs(parts_pad[k] - pad_tok[k].sum() / n_real) < PACK_TOL, k
    assert T.max_abs_diff(g_pad, g_pack) < PACK_TOL
    assert np.abs(g_pad["objective"]["attn"]["projector"]["weight"]).max() > 1e-4
    assert np.abs(g_pad["student"]["h"]["attn"]["c_attn"]["kernel"][0]).max() > 1e-4


# ----------------------------------------------------------------------------- float32 logits


@pytest.mark.parametrize("chunk", [0, 24])
def test_logits_are_float32_with_bf16_compute(setup, chunk):
    """bf16 compute: the LM heads accumulate in float32 and the losses see float32 logits, in
    the model (chunk 0: the model's logits) and in the objective's own heads (chunk 24: the
    objective applies the heads to the final hidden states). Reference: float64 NumPy on the
    same bf16 hidden states and head. bf16 logits would be off by up to half a bf16 ulp
    (4e-3 relative), far more than the tolerance."""
    tc, tp, s_cfg, sp, _ = setup
    b = T.batch(T.ROWS_4)
    obj = Objective.from_config(dict(logits=dict(weight=1.0, loss_fn="kl"),
                                     logits_chunk_tokens=chunk)).bind(s_cfg, tc)
    kw = dict(segment_ids=b["segment_ids"], dtype=jnp.bfloat16)
    s_out = models.forward(s_cfg, sp, b["input_ids"], **kw, return_last_hidden=bool(chunk))
    t_out = models.forward(tc, tp, b["input_ids"], **kw, return_last_hidden=bool(chunk))
    s_head, t_head = models.lm_head(s_cfg, sp), models.lm_head(tc, tp)
    heads = dict(student_head=s_head, teacher_head=t_head, logits_chunk=chunk) if chunk else {}
    _, parts = obj({}, s_out, t_out, jnp.asarray(b["segment_ids"]), jnp.asarray(b["input_ids"]), **heads)

    def logits64(out, head):
        h = np.asarray(out.last_hidden_state.astype(jnp.float32), np.float64)  # bf16 values
        return h @ np.asarray(jnp.asarray(head, jnp.bfloat16).astype(jnp.float32), np.float64)

    s64, t64 = logits64(s_out, s_head), logits64(t_out, t_head)
    if not chunk:
        assert s_out.logits.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(s_out.logits), s64, rtol=0, atol=1e-5 * np.abs(s64).max())
        np.testing.assert_allclose(np.asarray(t_out.logits), t64, rtol=0, atol=1e-5 * np.abs(t64).max())
    real = b["segment_ids"] > 0
    expected = _kl64(s64, t64)[real].mean()
    assert expected > 1e-2
    assert abs(float(parts["loss/logits"]) - expected) < LOSS_TOL


# ----------------------------------------------------------------------------- features


def test_weight_zero_component_requests_nothing_and_adds_no_key(setup):
    tc, tp, s_cfg, sp, _ = setup
    b = T.batch(T.ROWS_4)
    obj = Objective.from_config(dict(
        logits=dict(weight=1.0, loss_fn="kl"),
        hs=dict(weight=0.0, loss_fn="raw_mse", projector="linear"),
        attn=dict(weight=0.0, loss_fn="raw_mse", layer_mapper="layer-2"))).bind(s_cfg, tc)
    feats = obj.features(s_cfg, tc)
    assert feats == {"student": dict(output_hidden_states=(), output_attentions=()),
                     "teacher": dict(output_hidden_states=(), output_attentions=())}
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
        "student": dict(output_hidden_states=(), output_attentions=(4,)),
        "teacher": dict(output_hidden_states=(), output_attentions=(10,)),
    }
    # hs indexes the n_layer + 1 hidden states: "last" is the final (normed) one of each.
    hs = Objective.from_config(dict(hs=dict(weight=1.0, layer_mapper="last"))).bind(s6, t12)
    assert hs.features(s6, t12) == {"student": dict(output_hidden_states=(6,), output_attentions=()),
                                    "teacher": dict(output_hidden_states=(12,), output_attentions=())}


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
