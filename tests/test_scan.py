"""The blocks as a scan over stacked layer parameters (distil_jax.models.stack): the same
objective and gradients as the unrolled blocks, parity with transformers on the scanned path,
only the mapped layers' outputs held, a graph that does not grow with depth, remat inside the
scan, and freezing one layer of a stacked leaf."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distil_jax import hf, models, student as student_lib
from distil_jax.models import common, stack
from distil_jax import train_step as ts
from tests import hf_utils, llama_utils
from tests import tiny_setup as T

TOL = 1e-5  # float32 max abs: the scan and the unrolled loop run the same block, in another graph

HS = dict(hs=dict(weight=2.0, loss_fn="raw_mse", layer_mapper="uniform_cons",
                  norm="layernorm_affine", projector="linear"))


def test_segments_cut_only_at_the_requested_layers():
    # Attention maps of block 4 (alone), hidden state before block 2 and the final one.
    assert stack.segments(12, [4], [2, 12]) == [(0, 2), (2, 4), (4, 5), (5, 12)]
    assert stack.segments(6, [], []) == [(0, 6)]
    assert stack.segments(3, [1], [], scan=False) == [(0, 1), (1, 2), (2, 3)]


def _objective_and_grads(family, scan):
    """(per-token losses, gradients of their sum w.r.t. the student and objective params) with
    the reference objective + hs (several mapped layers of each kind), teacher 4 blocks,
    student 2, packed rows."""
    tc, tp = T.teacher() if family == "gpt2" else T.llama_teacher()
    s_cfg, sp, _ = T.student(tc, tp, overrides={"num_hidden_layers": 2},
                             copy_teacher_modules=[])
    obj = T.objective(s_cfg, tc, logits_chunk_tokens=0, **HS)
    params = T.params_tree(obj, s_cfg, tc, sp)
    feats = obj.features(s_cfg, tc)
    batch = {k: jnp.asarray(v) for k, v in T.batch().items()}
    assert feats["teacher"]["output_attentions"] and len(feats["teacher"]["output_hidden_states"]) > 1

    def loss(p):
        kw = dict(segment_ids=batch["segment_ids"], scan_layers=scan)
        s_out = models.forward(s_cfg, p["student"], batch["input_ids"], **feats["student"], **kw)
        t_out = models.forward(tc, tp, batch["input_ids"], **feats["teacher"], **kw)
        parts = obj.per_token(p["objective"], s_out, t_out, batch["segment_ids"], batch["input_ids"], False)
        return sum(v.sum() for v in parts.values()), parts

    (_, parts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return T.to_numpy(parts), T.to_numpy(grads)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scan_gives_the_unrolled_objective_and_gradients(family):
    parts_scan, g_scan = _objective_and_grads(family, True)
    parts_loop, g_loop = _objective_and_grads(family, False)
    assert set(parts_scan) == {"loss/logits", "loss/attn", "loss/hs"}
    for k in parts_scan:
        assert parts_scan[k].max() > 1e-3, k  # non-trivial
        np.testing.assert_allclose(parts_scan[k], parts_loop[k], rtol=0, atol=TOL, err_msg=k)
    assert T.max_abs_diff(g_scan, g_loop) < TOL
    stacked = g_scan["student"]["h" if family == "gpt2" else "model"]
    assert all(np.abs(g).max() > 1e-6 for g in jax.tree_util.tree_leaves(stacked))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scanned_blocks_match_transformers(family):
    """No hidden states or maps requested: every block runs inside one scan (the parity tests of
    test_gpt2 / test_llama request every hidden state, which cuts after every block). GPT-2
    with scale_attn_by_inverse_layer_idx, whose scale depends on the (traced) layer index."""
    if family == "gpt2":
        model = hf_utils.tiny_hf_model(seed=2, n_layer=3, scale_attn_by_inverse_layer_idx=True)
        fwd = hf_utils.torch_forward
    else:
        model = llama_utils.tiny_hf_model("qwen3", seed=2, num_key_value_heads=2)
        fwd = llama_utils.torch_forward
    config = hf.config_from_hf(model.config.to_dict())
    params = hf.hf_state_dict_to_params(config, {k: v.detach().numpy() for k, v in model.state_dict().items()})
    ids = np.random.RandomState(1).randint(0, config.vocab_size, (2, 10))
    assert stack.segments(config.num_layers, [], []) == [(0, config.num_layers)]
    ours = models.forward(config, params, ids).logits
    np.testing.assert_allclose(np.asarray(ours), fwd(model, ids).logits.numpy(), rtol=0, atol=TOL)


def test_only_mapped_layers_materialize_attention(monkeypatch):
    """Of 6 blocks, only the requested one computes probabilities explicitly, and only its map
    is returned; the rest run fused in the scan."""
    config = T.TEACHER_CONFIG.replace(n_layer=6)
    params = models.init_params(config, jax.random.PRNGKey(0))
    calls = []
    real = common.attend

    def spy(*args, **kw):
        calls.append(kw["materialize"])
        return real(*args, **kw)

    monkeypatch.setattr(models.gpt2, "attend", spy)
    out = models.forward(config, params, np.zeros((1, 8), np.int32), output_attentions=(3,),
                         output_hidden_states=(1, 6))
    assert sorted(out.attentions) == [3]
    assert [h is not None for h in out.hidden_states] == [False, True, False, False, False, False, True]
    # Traced once per segment: (0,1) (1,3) scan (3,4) alone (4,6) scan.
    assert calls == [False, False, True, False]


def _dot_count(n_layer):
    config = T.TEACHER_CONFIG.replace(n_layer=n_layer)
    params = models.param_shapes(config)
    jaxpr = jax.make_jaxpr(lambda p: models.forward(config, p, jnp.zeros((1, 8), jnp.int32),
                                                    output_attentions=(1,)).logits)(params)
    return str(jaxpr).count("dot_general")


def test_the_graph_does_not_grow_with_depth():
    assert _dot_count(4) == _dot_count(16)


def test_remat_inside_the_scan_keeps_outputs_and_gradients():
    config = T.TEACHER_CONFIG
    params = models.init_params(config, jax.random.PRNGKey(3))
    ids = np.random.RandomState(2).randint(0, config.vocab_size, (2, 8))

    def loss(p, remat):
        return jnp.mean(jax.nn.log_softmax(models.forward(config, p, ids, remat=remat).logits) ** 2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l0, g0 = grad(params, False)
    for policy in ("full", "dots"):
        l1, g1 = grad(params, policy)
        assert float(l0) == float(l1)
        assert T.max_abs_diff(g0, g1) < TOL


def test_freezing_one_layer_of_a_stacked_leaf():
    """copy_teacher_modules [("transformer.h.1", frozen)]: slice 1 of every stacked leaf is
    frozen; the optimizer's update equals the one the per-layer tree gets with that block's
    leaves labelled frozen (the unstacked layout's semantics: no update, no weight decay, not in
    the clipping norm), and the logged grad_norm leaves it out too."""
    tc, tp = T.teacher()
    s_cfg, sp, trainable = T.student(tc, tp, overrides={"n_layer": 3},
                                     copy_teacher_modules=[("lm_head", False), ("transformer.h.1", True)])
    np.testing.assert_array_equal(sp["h"]["mlp"]["c_fc"]["kernel"][1], tp["h"]["mlp"]["c_fc"]["kernel"][1])
    assert all(list(t) == [True, False, True] for t in jax.tree_util.tree_leaves(trainable["h"]))
    assert trainable["wte"]["embedding"] is True
    opt = dict(optimizer="adamw", learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5)
    grads = jax.tree_util.tree_map(lambda x: jnp.asarray(np.random.RandomState(x.size).randn(*x.shape),
                                                         jnp.float32), sp)
    tx, _ = ts.make_optimizer(opt, 10, trainable)
    updates, _ = jax.jit(tx.update)(grads, tx.init(sp), sp)
    # The reference: HF's per-layer view, block 1 frozen as a whole (per-leaf labels).
    view = lambda t: models.unstack_layers(s_cfg, t)  # noqa: E731
    per_layer = jax.tree_util.tree_map(lambda _: True, view(sp))
    per_layer["h"]["1"] = jax.tree_util.tree_map(lambda _: False, per_layer["h"]["1"])
    ref_tx, _ = ts.make_optimizer(opt, 10, per_layer)
    ref, _ = jax.jit(ref_tx.update)(view(grads), ref_tx.init(view(sp)), view(sp))
    assert T.max_abs_diff(view(updates), ref) < 1e-7
    assert not np.any(np.asarray(updates["h"]["attn"]["c_attn"]["kernel"][1]))
    assert np.abs(updates["h"]["attn"]["c_attn"]["kernel"][0]).max() > 1e-4
    kept = [g for g, t in zip(jax.tree_util.tree_leaves(view(grads)), jax.tree_util.tree_leaves(per_layer)) if t]
    np.testing.assert_allclose(float(ts.student_grad_norm(grads, trainable)), float(optax.tree.norm(kept)),
                               rtol=1e-6)
    assert not student_lib.trains(False) and student_lib.trains(np.array([False, True]))


def test_a_checkpoint_in_an_old_layout_is_refused_in_one_line(tmp_path):
    """A checkpoint in the layout before the scan (one subtree per block, `h/0/...`, as
    `unstack_layers` writes it), or with GPT-2's c_attn fused as before [L, D, 3D], is refused on
    resume (`restore`) and on export (`restore_params`) with one line naming the fix, before
    orbax sees the mismatched tree."""
    from distil_jax import checkpoint

    tc, tp = T.teacher()
    s_cfg, sp, _ = T.student(tc, tp)
    tx = optax.sgd(0.1)

    def state(student):
        params = {"student": student, "objective": {}}
        return ts.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(0))

    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, state(models.unstack_layers(s_cfg, sp)), {"epoch": 0, "position": 0})
    for call in (lambda: checkpoint.restore(mngr, 0, state(sp)), lambda: checkpoint.restore_params(tmp_path)):
        with pytest.raises(ValueError, match=r"unrolled layers \(h/0/\.\.\.\) written by an older "
                                             r"distil_jax.*start a new --workdir") as e:
            call()
        assert "\n" not in str(e.value)
    # GPT-2's fused c_attn as it was stored before its heads split over tensor, [L, D, 3D]
    # (HF's column order, one dimension fewer), is refused the same way, naming the leaf.
    attn = sp["h"]["attn"]
    fused = {k: v.reshape(v.shape[:-2] + (-1,)) for k, v in attn["c_attn"].items()}
    old = {**sp, "h": {**sp["h"], "attn": {**attn, "c_attn": fused}}}
    mngr = checkpoint.manager(tmp_path / "fused")
    checkpoint.save(mngr, state(old), {"epoch": 0, "position": 0})
    for call in (lambda: checkpoint.restore(mngr, 0, state(sp)),
                 lambda: checkpoint.restore_params(tmp_path / "fused")):
        with pytest.raises(ValueError, match=r"h/attn/c_attn/(bias \(2, 96\)|kernel \(2, 32, 96\)), "
                                             r"stored now with [34] dimensions .* written by an older distil_jax.*"
                                             r"start a new --workdir") as e:
            call()
        assert "\n" not in str(e.value)
    # The stacked layout restores.
    mngr = checkpoint.manager(tmp_path / "new")
    checkpoint.save(mngr, state(sp), {"epoch": 0, "position": 0})
    restored, _ = checkpoint.restore(mngr, 0, state(sp))
    assert T.max_abs_diff(restored.params["student"], sp) == 0


def test_remat_outside_a_scan_recomputes_on_xla_cpu():
    """A rematerialized block outside a scan recomputes its forward in the backward pass (one
    more matmul in the compiled gradient), with jax.checkpoint's gradients. Fails with plain
    jax.checkpoint on XLA:CPU, whose CSE merges the recomputation into the forward."""
    assert common.xla_cpu()
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 64)) / 8
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 64))

    def loss(w, wrap):
        y = wrap(lambda w, x: jnp.tanh(x @ w))(w, x)
        return jnp.sum(jnp.tanh(y @ w) ** 2)

    def dots(wrap):
        return jax.jit(jax.grad(loss), static_argnums=1).lower(w, wrap).compile().as_text().count(" dot(")

    ours, plain = (lambda f: common.remat_fn(f, True)), (lambda f: f)
    assert dots(ours) > dots(plain)
    # Another graph, so float32 sums of O(1) terms may round differently: 1e-6 absolute.
    np.testing.assert_allclose(jax.grad(loss)(w, ours), jax.grad(loss)(w, jax.checkpoint),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_frozen_bfloat16_stack_gives_the_same_outputs(family):
    """models.frozen_layers (the teacher's stacked bfloat16 blocks as uint16 bits on XLA:CPU):
    the same logits, hidden states and attention maps, bit for bit. (The memory it saves shows
    at real sizes only: docs/scaling.md.)"""
    tc, tp = T.teacher() if family == "gpt2" else T.llama_teacher()
    tp = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), tp)
    frozen = models.frozen_layers(tc, tp)
    assert {x.dtype for x in jax.tree_util.tree_leaves(frozen)} >= {jnp.dtype(jnp.uint16)}
    ids = jnp.asarray(T.batch()["input_ids"])
    kw = dict(output_hidden_states=(1,), output_attentions=(2,), dtype=jnp.bfloat16)
    run = jax.jit(lambda p: models.forward(tc, p, ids, **kw))
    for a, b in zip(jax.tree_util.tree_leaves(run(tp)), jax.tree_util.tree_leaves(run(frozen))):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # The evaluation and the teacher cache's recorder run a teacher the same way, never differentiated.
    from distil_jax.teacher_cache.topk import teacher_top_k
    from distil_jax.train_step import make_eval_step

    seg = jnp.asarray(T.batch()["segment_ids"])
    for fn in (lambda p: make_eval_step(tc, jnp.bfloat16)(p, {"input_ids": ids, "segment_ids": seg}),
               lambda p: teacher_top_k(tc, p, ids, seg, k=4, dtype=jnp.bfloat16)):
        assert "bitcast_convert_type" in str(jax.make_jaxpr(fn)(tp))
