"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be
set before jax is imported): `python -m tests.sharding_worker CASE [ARGS]`; prints one line
`RESULT {json}`.

Cases:
  equivalence FAMILY   three steps of the tiny pair at several meshes vs one device
  reshard DIR          a checkpoint written at fsdp=8 resumed at data=2 x fsdp=2 and on 1 device
  errors               the one-line errors of bad meshes
  generate             greedy and sampled generation with both models placed on a mesh vs one device
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import checkpoint, hf, sharding
from distil_jax import train_step as ts
from tests import tiny_setup as T

MESHES = {
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
    "data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}
STEPS = 3


def _pair(family):
    if family == "gpt2":
        tc, tp = T.teacher()
        sc, sp, trainable = T.student(tc, tp)
    else:
        tc, tp = T.llama_teacher()
        sc, sp, trainable = T.student(tc, tp, overrides={"num_hidden_layers": 2})
    obj = T.objective(sc, tc, clm_weight=0.5)
    params = T.params_tree(obj, sc, tc, sp)
    mask = T.trainable_mask(trainable, params["objective"])
    tx, sched = ts.make_optimizer(dict(learning_rate=1e-2, adam_epsilon=1e-3, max_grad_norm=1.0),
                                  10, mask)
    return tc, tp, sc, obj, params, tx, sched


def _batches():
    return [T.batch(T.ROWS_8, seed=i) for i in range(STEPS)]


def _run(tc, tp, sc, obj, params, tx, sched, mesh_spec, devices, bucketed=False, state=None,
         batches=None):
    """STEPS steps on `devices` (None: no mesh, one device) -> (state, losses, placement)."""
    step_cfg = ts.StepConfig(tc, sc, obj)
    if state is None:
        state = ts.create_train_state(T.to_numpy(params), tx, jax.random.PRNGKey(0))
    if devices is None:
        step, placement = ts.make_train_step(step_cfg, tx, sched), None
        teacher = tp
        put = lambda b: {k: jnp.asarray(v) for k, v in b.items()}  # noqa: E731
    else:
        mesh = sharding.make_mesh(mesh_spec, devices)
        placement = sharding.make_placement(mesh, state, sc, tc, tp)
        state, teacher = placement.put_state(state), placement.put_teacher(tp)
        if bucketed:
            step = ts.BucketedTrainStep(step_cfg, tx, sched, placement=placement, buckets=8)
            put = lambda b: b  # noqa: E731
        else:
            step = ts.make_train_step(step_cfg, tx, sched, placement=placement)
            put = placement.put_batch
    losses = []
    for b in batches if batches is not None else _batches():
        state, m = step(state, teacher, put(b))
        losses.append(float(m["loss"]))
        if bucketed:
            _run.capacities.append(step.capacity(b))
    return state, losses, placement


_run.capacities = []


def _rel_diff(a, b):
    """Largest |a - b| relative to the largest |b| of each leaf."""
    out = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out = max(out, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12)))
    return out


def _shard_counts(state, placement):
    """Into how many distinct pieces the student's largest MLP matrix is split."""
    flat = jax.tree_util.tree_flatten_with_path(state.params["student"])[0]
    path, big = max(((p, x) for p, x in flat if "mlp" in jax.tree_util.keystr(p)),
                    key=lambda kv: kv[1].size)
    return {"param": len({tuple((s.start, s.stop) for s in sh.index) for sh in big.addressable_shards}),
            "path": jax.tree_util.keystr(path)}


def _c_attn_heads(sc, state, mesh):
    """Whether each device's shard of GPT-2's c_attn kernel [L, D, 3, D] holds, for each of q, k
    and v, HF's columns (`transformer.h.N.attn.c_attn.weight` [D, 3D], [q | k | v]) of the heads
    at its tensor coordinate, over its fsdp rows; and the shard's shape."""
    L, D, tensor = sc.n_layer, sc.n_embd, mesh.shape["tensor"]
    kernel = state.params["student"]["h"]["attn"]["c_attn"]["kernel"]
    hf_state = hf.params_to_hf_state_dict(sc, T.to_numpy(state.params["student"]))
    weight = np.stack([np.asarray(hf_state[f"transformer.h.{i}.attn.c_attn.weight"]) for i in range(L)])
    coords = {d: idx for idx, d in np.ndenumerate(mesh.devices)}  # device -> (data, fsdp, tensor)
    w = D // tensor  # the columns of one device's heads in each of q, k, v
    ok = True
    for shard in kernel.addressable_shards:
        t, rows = coords[shard.device][2], shard.index[1]
        want = np.stack([weight[:, rows, j * D + t * w: j * D + (t + 1) * w] for j in range(3)], axis=2)
        got = np.asarray(shard.data)
        ok = ok and got.shape == want.shape and np.array_equal(got, want)
    return {"own_heads": bool(ok), "shard_shape": list(kernel.addressable_shards[0].data.shape)}


def equivalence(family):
    tc, tp, sc, obj, params, tx, sched = _pair(family)
    ref, ref_losses, _ = _run(tc, tp, sc, obj, params, tx, sched, None, None)
    ref_params = T.to_numpy(ref.params)
    out = {"n_devices": jax.device_count(), "ref_losses": ref_losses,
           "param_change": T.max_abs_diff(ref_params, T.to_numpy(params))}
    for name, spec in MESHES.items():
        # The data x fsdp x tensor mesh runs the padding-aware (bucketed) step: each batch shard
        # compacts its own rows, the devices of a tensor pair the same rows.
        bucketed = name == "data2_fsdp2_tensor2"
        state, losses, placement = _run(tc, tp, sc, obj, params, tx, sched, spec, jax.devices(),
                                        bucketed=bucketed)
        out[name] = {
            "param_rel_diff": _rel_diff(T.to_numpy(state.params), ref_params),
            "opt_rel_diff": _rel_diff(T.to_numpy(state.opt_state), T.to_numpy(ref.opt_state)),
            "loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
            "shards": _shard_counts(state, placement),
            "teacher_bytes": sharding.bytes_per_device(tp, placement.teacher),
            "state_bytes": sharding.bytes_per_device(state, placement.state),
        }
        if family == "gpt2" and spec["tensor"] > 1:
            out[name]["c_attn"] = _c_attn_heads(sc, state, placement.mesh)
    out["capacities"] = _run.capacities
    out["teacher_bytes_1"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(tp))
    out["state_bytes_1"] = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(ref))
    return out


def reshard(workdir):
    """Two steps at fsdp=8, a checkpoint, then one more step at data=2 x fsdp=2 (4 devices) and
    on one device, each restored from that checkpoint; against three uninterrupted steps."""
    tc, tp, sc, obj, params, tx, sched = _pair("gpt2")
    batches = _batches()
    ref, ref_losses, _ = _run(tc, tp, sc, obj, params, tx, sched, None, None)
    first, _, placement = _run(tc, tp, sc, obj, params, tx, sched, MESHES["fsdp8"], jax.devices(),
                               batches=batches[:2])
    mngr = checkpoint.manager(workdir)
    checkpoint.save(mngr, first, {"position": 2})
    out = {"saved_step": int(first.step)}
    fresh = ts.create_train_state(T.to_numpy(params), tx, jax.random.PRNGKey(1))
    for name, spec, devices in (("data2_fsdp2", {"data": 2, "fsdp": 2}, jax.devices()[:4]),
                                ("one_device", {"data": 1}, jax.devices()[:1])):
        mesh = sharding.make_mesh(spec, devices)
        target = sharding.make_placement(mesh, fresh, sc, tc, tp)
        restored, data_state = checkpoint.restore(mngr, 2, target.put_state(fresh))
        leaf = jax.tree_util.tree_leaves(restored.params["student"])[0]
        state, losses, _ = _run(tc, tp, sc, obj, params, tx, sched, spec, devices,
                                state=restored, batches=batches[2:])
        out[name] = {"devices": len(leaf.sharding.device_set), "step": int(state.step),
                     "data_state": data_state,
                     "param_rel_diff": _rel_diff(T.to_numpy(state.params), T.to_numpy(ref.params)),
                     "opt_rel_diff": _rel_diff(T.to_numpy(state.opt_state), T.to_numpy(ref.opt_state)),
                     "loss_rel_diff": abs(losses[-1] - ref_losses[-1]) / abs(ref_losses[-1])}
    mngr.close()
    return out


def errors():
    tc, tp, sc, obj, params, tx, sched = _pair("gpt2")
    state = ts.create_train_state(T.to_numpy(params), tx, jax.random.PRNGKey(0))
    out = {}

    def err(name, fn):
        try:
            fn()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)

    err("product", lambda: sharding.make_mesh({"data": 3, "fsdp": 2}))
    err("rest", lambda: sharding.make_mesh({"data": -1, "fsdp": 3}))
    err("unknown", lambda: sharding.make_mesh({"model": 2}))
    # fsdp=8 x 1 on 8 devices is fine, but width 32 with fsdp 64 cannot exist here: use a student
    # whose width fsdp=8 does not divide.
    wide_tc = tc.replace(n_embd=36, n_head=4)
    wide_tp = T.models.init_params(wide_tc, jax.random.PRNGKey(0))
    err("embed", lambda: sharding.make_placement(sharding.make_mesh({"fsdp": 8}), state, sc,
                                                 wide_tc, wide_tp))
    err("heads", lambda: sharding.make_placement(sharding.make_mesh({"data": 1, "tensor": 8}),
                                                 state, sc, tc, tp))
    err("batch", lambda: sharding.place_batch(T.batch(T.ROWS_4), sharding.make_mesh({"fsdp": 8})))
    return out


def generate():
    """On-policy distillation samples from the student (or the teacher, seq_kd) as placed for
    training. Both tiny pairs placed at data=2 x fsdp=2 x tensor=2: the greedy and the sampled
    (temperature 1, top-k 20, one key) continuations of left-padded prompts, against the
    same models on one device."""
    from distil_jax.generate import generate as gen

    lengths = [6, 3, 5, 1]  # real tokens of each left-padded prompt
    P = max(lengths)
    mask = (np.arange(P)[None] >= P - np.array(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, np.random.default_rng(0).integers(0, T.VOCAB, mask.shape), 0)
    out = {}
    for family in ("gpt2", "llama"):
        tc, tp, sc, obj, params, tx, sched = _pair(family)
        state = ts.create_train_state(T.to_numpy(params), tx, jax.random.PRNGKey(0))
        mesh = sharding.make_mesh(MESHES["data2_fsdp2_tensor2"], jax.devices())
        placement = sharding.make_placement(mesh, state, sc, tc, tp)
        placed = {"teacher": (tc, tp, placement.put_teacher(tp)),
                  "student": (sc, state.params["student"],
                              placement.put_state(state).params["student"])}
        for who, (cfg, one, on_mesh) in placed.items():
            assert len(jax.tree_util.tree_leaves(on_mesh)[0].sharding.device_set) == 8
            for kind, kw in (("greedy", {}), ("sampled", dict(temperature=1.0, top_k=20,
                                                              rng=jax.random.PRNGKey(3)))):
                a = np.asarray(gen(cfg, one, ids, mask, max_new_tokens=8, **kw))
                b = np.asarray(gen(cfg, on_mesh, ids, mask, max_new_tokens=8, **kw))
                out[f"{family}/{who}/{kind}"] = {"equal": bool((a == b).all()),
                                                 "new": a[:, P:].tolist()}
    return out


if __name__ == "__main__":
    case, *args = sys.argv[1:]
    result = {"equivalence": equivalence, "reshard": reshard, "errors": errors,
              "generate": generate}[case](*args)
    print("RESULT " + json.dumps(result))
