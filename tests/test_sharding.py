"""distil_jax.sharding: FSDP and tensor parallelism on a named mesh of 8 simulated CPU devices
give the same training as one device; checkpoints reshard; bad meshes are one-line errors.

The multi-device cases run in a subprocess (tests/sharding_worker.py), because the simulated
device count (XLA_FLAGS) must be set before jax is imported.

Tolerance: SHARD_TOL = 1e-5, relative to each leaf's largest value: float32, the same math with
its reductions split across devices (all-gathers, reduce-scatters, partial sums).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from distil_jax import checkpoint, config as config_lib
from distil_jax import models, sharding
from distil_jax import train_step as ts_lib
from tests import tiny_setup as T

SHARD_TOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tests.sharding_worker", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_meshes_equal_one_device(family):
    """Three steps at fsdp=8, data=2 x fsdp=4 and data=2 x fsdp=2 x tensor=2 (the last through
    the padding-aware bucketed step) end with the losses, parameters and Adam state of one
    device; the student's largest matrix really is split, and each device holds 1/8 of the
    state at fsdp=8; at tensor=2 GPT-2's fused c_attn is split by heads in each of q, k, v."""
    out = _worker("equivalence", family)
    assert out["n_devices"] == 8
    assert out["param_change"] > 1e-3
    for name, shards in (("fsdp8", 8), ("data2_fsdp4", 4), ("data2_fsdp2_tensor2", 4)):
        r = out[name]
        assert r["param_rel_diff"] < SHARD_TOL, (name, r)
        assert r["opt_rel_diff"] < SHARD_TOL, (name, r)
        assert r["loss_rel_diff"] < SHARD_TOL, (name, r)
        assert r["shards"]["param"] == shards, (name, r)
    if family == "gpt2":
        # At tensor=2 each device's c_attn shard is q, k and v of its own 2 of the 4 heads (HF's
        # columns), over its fsdp half of the rows: [L, D / 2, 3, D / 2].
        r = out["data2_fsdp2_tensor2"]["c_attn"]
        assert r["own_heads"] and r["shard_shape"] == [2, 16, 3, 16], r
    # Padding-aware logits were on (a capacity below the 32 positions of each batch shard).
    assert out["capacities"] and all(c is not None and c < 32 for c in out["capacities"])
    # fsdp=8: everything but the norms, biases and step counters is split 8 ways. In these tiny
    # models (width 32) the replicated vectors are ~3% of the bytes, so a device holds ~0.15 of
    # the state; at the reference shape it is 0.126 (docs/scaling.md, tools/sharding_memory.py).
    assert out["fsdp8"]["state_bytes"] < 0.16 * out["state_bytes_1"]
    assert out["fsdp8"]["teacher_bytes"] < 0.16 * out["teacher_bytes_1"]


@pytest.mark.slow
def test_generation_on_a_mesh_equals_one_device():
    """On-policy sampling runs `generate` on the models as training placed them: at data=2 x
    fsdp=2 x tensor=2 the greedy and the sampled tokens of GPT-2 and Llama (grouped-query),
    teacher and student, are those of one device, token for token."""
    out = _worker("generate")
    assert len(out) == 8
    for name, r in out.items():
        assert r["equal"], (name, r)
    # Sampling is not greedy: the same prompts continue differently.
    assert out["gpt2/student/sampled"]["new"] != out["gpt2/student/greedy"]["new"]


def test_checkpoint_reshards(tmp_path):
    """Two steps at fsdp=8, saved; restored at data=2 x fsdp=2 (4 devices) and on 1 device,
    one more step equals three uninterrupted steps."""
    out = _worker("reshard", str(tmp_path))
    assert out["saved_step"] == 2
    for name, devices in (("data2_fsdp2", 4), ("one_device", 1)):
        r = out[name]
        assert r["devices"] == devices and r["step"] == 3, r
        assert r["data_state"] == {"position": 2}
        assert r["param_rel_diff"] < SHARD_TOL, (name, r)
        assert r["opt_rel_diff"] < SHARD_TOL, (name, r)
        assert r["loss_rel_diff"] < SHARD_TOL, (name, r)
    # Export's reader gathers the fsdp=8 checkpoint whole in this 1-device process.
    step, params = checkpoint.restore_params(tmp_path)
    assert step == 2 and params["student"]["wte"]["embedding"].shape == (128, 32)  # T.VOCAB padded


def test_bad_meshes_are_one_line_errors():
    out = _worker("errors")
    for name, words in {
        "product": ["data=3", "fsdp=2", "6 devices", "8"],
        "rest": ["fsdp=3", "multiple of 3", "8"],
        "unknown": ["'model'", "data, fsdp, tensor"],
        "embed": ["fsdp=8", "teacher's embed dimension 36", "(teacher.h.attn.c_attn.kernel)"],
        "heads": ["tensor=8", "4 query heads"],
        "batch": ["batch size 4", "8 batch shards"],
    }.items():
        msg = out[name]
        assert msg is not None and "\n" not in msg, (name, msg)
        for w in words:
            assert w in msg, (name, w, msg)


# ----------------------------------------------------------------------------- one process


def test_mesh_shape_fills_the_rest():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sharding.mesh_shape({"tensor": 2, "fsdp": -1}, 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert sharding.mesh_shape({}, 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(sharding.MeshError, match="only one axis"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_every_gpt2_parameter_has_logical_axes():
    tc, _ = T.teacher()
    for cfg in (tc, tc.replace(tie_word_embeddings=False)):
        axes = models.logical_axes(cfg)
        assert axes[("h", "mlp", "c_fc", "kernel")] == ("layers", "embed", "mlp")
        assert axes[("h", "attn", "c_attn", "kernel")] == ("layers", "embed", None, "heads")
        assert axes[("h", "attn", "c_attn", "bias")] == ("layers", None, "heads")
    assert axes[("lm_head", "kernel")] == ("embed", "vocab")
    assert sharding.logical_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
    assert sharding.logical_spec(("layers", "embed", None, "heads")) == P(None, "fsdp", None, "tensor")
    assert sharding.logical_spec(("batch", None)) == P(("data", "fsdp"), None)


def test_config_mesh_fields_are_validated():
    c = config_lib.default_config()
    assert c.train.mesh.to_dict() == {"data": -1, "fsdp": 1, "tensor": 1}
    config_lib.validate(c)
    for field, value, words in (("mesh", {"data": -1, "fsdp": -1, "tensor": 1}, "at most one"),
                                ("mesh", {"data": 0, "fsdp": 1, "tensor": 1}, "train.mesh.data=0"),
                                ("num_processes", 2, "coordinator_address"),
                                ("process_id", 3, "train.process_id=3"),
                                ("coordinator_address", "localhost", "host:port")):
        bad = config_lib.default_config()
        bad.train[field] = value
        with pytest.raises(ValueError, match=words):
            config_lib.validate(bad)


def test_adam_moments_are_placed_like_their_parameters():
    """Each copy of the parameter tree in the grouped optimizer's state (mu and nu of both groups)
    gets its parameter's spec; frozen modules hold no state; step counts are replicated."""
    tc, tp = T.teacher()
    sc, sp, trainable = T.student(tc, tp, copy_teacher_modules=[("lm_head", True)])
    obj = T.objective(sc, tc)
    params = T.params_tree(obj, sc, tc, sp)
    mask = T.trainable_mask(trainable, params["objective"])
    assert mask["student"]["wte"]["embedding"] is False
    tx, _ = ts_lib.make_optimizer(dict(learning_rate=1e-3, max_grad_norm=1.0,
                                       objective_learning_rate=1e-2), 10, mask)
    state = ts_lib.create_train_state(params, tx, jax.random.PRNGKey(0))
    # A distinct spec per parameter: its own path.
    specs = jax.tree_util.tree_map_with_path(lambda p, _: P(jax.tree_util.keystr(p)), params)
    got = sharding.opt_state_specs(state.tx, state.opt_state, specs)
    is_p = lambda x: isinstance(x, P)  # noqa: E731
    placed = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        spec = [s for p, s in jax.tree_util.tree_flatten_with_path(got, is_leaf=is_p)[0]
                if p == path][0]
        placed.setdefault(spec, []).append(leaf.shape)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = P(jax.tree_util.keystr(path))
        n = len(placed.get(key, []))
        frozen = path[1].key == "wte"
        assert n == (0 if frozen else 2), (key, n)  # Adam's mu and nu, none when frozen
        assert all(shape == x.shape for shape in placed.get(key, []))
    assert set(placed) - {P(jax.tree_util.keystr(p)) for p, _ in
                          jax.tree_util.tree_flatten_with_path(params)[0]} == {P()}


_CONSTRAIN_SCRIPT = """
import json, re, jax, jax.numpy as jnp
from distil_jax import models, sharding
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
def f(x, y):
    return (models.constrain(x, ("batch", None, "heads", None)),
            models.constrain(y, ("batch", None, "heads", None)))
args = (jnp.zeros((8, 3, 4, 5)), jnp.zeros((2, 3, 6, 5)))  # y: 2 rows over 4 batch shards
def lowered():
    return jax.jit(f).lower(*args).as_text()
plain = lowered()
with models.activation_sharding(mesh, sharding.RULES):
    pinned = lowered()
with models.activation_sharding(sharding.make_mesh({}, jax.devices()[:1]), sharding.RULES):
    one = lowered()
lines = lambda t: re.findall(r"sharding_constraint %\\S+ (<@mesh, \\[.*?\\]>)", t)
print("RESULT " + json.dumps({"plain": lines(plain), "pinned": lines(pinned), "one": lines(one)}))
"""


def test_constrain_pins_activations_by_the_logical_rules():
    """Inside activation_sharding the models' constraints follow sharding.RULES (rows over
    data x fsdp, heads over tensor); a dimension its axes do not divide is left to XLA; outside
    the context, and on one device, there is no constraint at all."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CONSTRAIN_SCRIPT], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    assert out["plain"] == [] and out["one"] == []
    x, y = out["pinned"]
    assert x == '<@mesh, [{"data", "fsdp"}, {}, {"tensor"}, {}]>', x
    assert y == '<@mesh, [{?}, {}, {"tensor"}, {}]>', y


def test_a_process_places_its_own_rows():
    """One process: its rows are the whole batch; rows that are neither the batch nor the
    process's share are refused in one line."""
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    assert sharding.process_rows(mesh, 8) == slice(0, 8)
    b = T.batch(T.ROWS_4)
    placed = sharding.place_batch(b, mesh, global_rows=4)
    np.testing.assert_array_equal(np.asarray(placed["input_ids"]), b["input_ids"])
    with pytest.raises(ValueError, match="3 host rows for a global batch of 4"):
        sharding.place_batch({k: v[:3] for k, v in b.items()}, mesh, global_rows=4)


def test_process_batches_are_the_global_batches_rows():
    """A process's batches (BatchIterator(process_rows=...)) are its rows of the global batches,
    the last, partial one of the epoch included, and carry every global row's real tokens, from
    which the padding-aware step picks the same logits bucket as from the global batch."""
    from distil_jax.data.batches import ROW_TOKENS, BatchIterator

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 33, 22)  # rows of 32 positions, padded after `length` tokens
    seg = (np.arange(32)[None] < lengths[:, None]).astype(np.int32)
    arrays = {"input_ids": rng.integers(1, 100, (22, 32)), "segment_ids": seg}
    whole = BatchIterator(arrays, 8, seed=3, drop_last=False)  # 3 batches, the last of 6 rows
    halves = [BatchIterator(arrays, 8, seed=3, drop_last=False, process_rows=slice(i, i + 4))
              for i in (0, 4)]
    capacities = set()
    for _ in range(2 * whole.steps_per_epoch):
        want = next(whole)
        got = [next(h) for h in halves]
        for part, rows in zip(got, (slice(0, 4), slice(4, 8))):
            for k in arrays:
                np.testing.assert_array_equal(part[k], want[k][rows])
            np.testing.assert_array_equal(part[ROW_TOKENS], (want["segment_ids"] > 0).sum(-1))
        for groups, accum in ((2, 1), (4, 1), (2, 2)):
            cap = ts_lib.logits_capacity(want["segment_ids"], groups, accum, buckets=8)
            assert ts_lib.capacity_of_rows(got[1][ROW_TOKENS], 32, groups, accum, 8) == cap
            capacities.add(cap)
    assert len(capacities) > 1  # the cases pick different buckets
    with pytest.raises(ValueError, match="process_rows"):
        BatchIterator({"input_ids": arrays["input_ids"]}, 8, process_rows=slice(0, 4))


# ----------------------------------------------------------------------------- multi-host

TINY = os.path.join(REPO, "configs", "tiny.py")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, n, port, *overrides):
    """`n` processes of the tiny run joined by jax.distributed over localhost, one CPU device
    each (so a 2-process run is data=2 over two hosts)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    return [subprocess.Popen(
        [sys.executable, "-m", "distil_jax.train", "--config", TINY + ":test", "--workdir",
         str(workdir), f"--config.train.coordinator_address=localhost:{port}",
         f"--config.train.num_processes={n}", f"--config.train.process_id={i}", *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(n)]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The tiny run (demo teacher and corpus included) in one process on one device."""
    from distil_jax.train import train

    workdir = tmp_path_factory.mktemp("one")
    c = config_lib.load(TINY + ":test")
    c.train.max_steps = 4
    c.train.save_steps = 2
    train(c, workdir)
    return workdir


@pytest.mark.slow
def test_two_processes_equal_one(one_process_run, tmp_path):
    """Two processes (jax.distributed over localhost, gloo CPU collectives) train the tiny
    config to the parameters of the one-process run; only process 0 writes metrics, and only
    process 0 tokenizes the corpus (process 1 reads the token cache it wrote)."""
    import shutil

    workdir = T.seed_workdir(one_process_run, tmp_path / "two")
    shutil.rmtree(workdir / "cache")
    procs = _launch(workdir, 2, _free_port(), "--config.train.max_steps=4",
                    "--config.train.save_steps=2")
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    s1, one = checkpoint.restore_params(one_process_run)
    s2, two = checkpoint.restore_params(workdir)
    assert s1 == s2 == 4
    for a, b in zip(jax.tree_util.tree_leaves(two), jax.tree_util.tree_leaves(one)):
        np.testing.assert_allclose(a, b, rtol=0, atol=SHARD_TOL * max(1.0, float(np.abs(b).max())))
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one writer: no line twice
    assert "distill" not in outs[1][1]  # process 1 shows no progress bar
    assert "token cache written" in outs[0][1]
    assert "token cache hit" in outs[1][1] and "token cache written" not in outs[1][1]


@pytest.mark.slow
def test_sigterm_to_one_process_checkpoints_the_same_step_on_both(one_process_run, tmp_path):
    """SIGTERM to one of two processes: jax's preemption service spreads the notice, so both save
    the same step and exit 143 naming it (test_train's stop-and-resume test checks that such a
    checkpoint resumes to the uninterrupted run)."""
    import signal
    import time

    workdir = T.seed_workdir(one_process_run, tmp_path / "term")
    procs = _launch(workdir, 2, _free_port(), "--config.train.max_steps=100000",
                    "--config.train.save_steps=1000")
    deadline = time.time() + 300
    while '"loss"' not in ((workdir / "metrics.jsonl").read_text()
                           if (workdir / "metrics.jsonl").exists() else ""):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        assert time.time() < deadline
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    steps = checkpoint.available_steps(workdir)
    assert len(steps) == 1 and 0 < steps[0] < 1000, steps  # no regular save: the SIGTERM one
    for _, err in outs:
        assert f"the checkpoint of step {steps[0]} is written" in err, err[-3000:]


@pytest.mark.slow
def test_killed_process_makes_the_other_exit(one_process_run, tmp_path):
    """SIGKILL one of two processes mid-run: the other exits with an error naming the lost
    peer within the heartbeat timeout instead of waiting forever in a collective."""
    import signal
    import time

    workdir = T.seed_workdir(one_process_run, tmp_path / "killed")
    procs = _launch(workdir, 2, _free_port(), "--config.train.max_steps=100000",
                    "--config.train.save_steps=2", "--config.train.heartbeat_timeout_s=10")
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "2").exists():
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        assert time.time() < deadline
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    _, err = procs[0].communicate(timeout=240)
    assert procs[0].returncode != 0
    assert time.time() - t0 < 240
    # Our one line when the collective fails in Python; jax.distributed's own fatal line when
    # the coordination service notices the lost heartbeat first.
    assert ("error: the multi-host run failed on process 0" in err
            or "another task died" in err), err[-3000:]
    lines = [l for l in err.splitlines() if any(w in l for w in ("task", "heartbeat", "Terminating",
                                                                 "distributed", "Error", "error"))]
    print(f"process 0 exited {procs[0].returncode} after {time.time() - t0:.0f} s:", *lines[-12:],
          sep="\n")


# ----------------------------------------------------------------------------- resume (issue 24)


def _reference_run(tmp_path_factory, name, steps, save_steps, *overrides, devices=1):
    """An uninterrupted one-process run of the tiny config (the result a resume must reach): in
    this process on its one device, or with `devices` simulated devices and the command-line
    `overrides` in a subprocess (the device count is fixed before jax is imported)."""
    from distil_jax.train import train

    workdir = tmp_path_factory.mktemp(name)
    if devices == 1 and not overrides:
        c = config_lib.load(TINY + ":test")
        c.train.max_steps, c.train.save_steps = steps, save_steps
        c.train.save_total_limit = 0  # every checkpoint kept: a test resumes from an earlier one
        train(c, workdir)
        return workdir
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run(
        [sys.executable, "-m", "distil_jax.train", "--config", TINY + ":test", "--workdir",
         str(workdir), f"--config.train.max_steps={steps}", f"--config.train.save_steps={save_steps}",
         "--config.train.save_total_limit=0", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def _assert_params_close(workdir, reference):
    s1, want = checkpoint.restore_params(reference)
    s2, got = checkpoint.restore_params(workdir)
    assert s1 == s2
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=0, atol=SHARD_TOL * max(1.0, float(np.abs(b).max())))


@pytest.fixture(scope="module")
def twelve_steps(tmp_path_factory):
    return _reference_run(tmp_path_factory, "twelve", 12, 2)


def _session_changes(workdir):
    return json.loads((workdir / "sessions.jsonl").read_text().splitlines()[-1])["config_changes"]


def test_resume_on_a_changed_explicit_mesh(twelve_steps, tmp_path):
    """Checkpoint 6 of a one-device run (the later ones removed, as a kill would leave it),
    resumed with --config.train.mesh.data=2 on 2 devices: allowed (docs/scaling.md), recorded in
    sessions.jsonl, and the result equals the uninterrupted one-device run within SHARD_TOL."""
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(twelve_steps, workdir, ignore=shutil.ignore_patterns(".lock"))
    for step in checkpoint.available_steps(workdir):
        if step > 6:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    (workdir / "run_summary.json").unlink()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "distil_jax.train", "--config", TINY + ":test", "--workdir", str(workdir),
         "--config.train.max_steps=12", "--config.train.save_steps=2", "--config.train.mesh.data=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from the checkpoint at step 6" in proc.stderr
    assert _session_changes(workdir)["train.mesh.data"] == [-1, 2]
    _assert_params_close(workdir, twelve_steps)


@pytest.fixture(scope="module")
def data2_twelve_steps(tmp_path_factory):
    """(the uninterrupted run at data=2 in ONE process on two devices, its arguments)."""
    args = ("--config.train.mesh.data=2",)
    return _reference_run(tmp_path_factory, "data2", 12, 2, *args, devices=2), args


@pytest.fixture(scope="module")
def fsdp2_twelve_steps(tmp_path_factory):
    """(the uninterrupted run at fsdp=2 in ONE process on two devices, its arguments). FSDP over
    two processes: each holds half of every large parameter and of its Adam moments and builds
    only its own rows of each batch. The rows are short paragraphs of the demo corpus, padded
    (dataset.layout=pad), so the padding-aware step picks logits buckets, which both processes
    must agree on."""
    from distil_jax.demo import corpus

    text = tmp_path_factory.mktemp("paragraphs") / "paragraphs.txt"
    text.write_text("\n\n".join(corpus.stdlib_docstrings()))
    args = ("--config.train.mesh.data=1", "--config.train.mesh.fsdp=2", "--config.dataset.layout=pad",
            f"--config.dataset.uri={text}", "--config.dataset.sample_by=paragraph")
    return _reference_run(tmp_path_factory, "fsdp2", 12, 2, *args, devices=2), args


@pytest.mark.slow
def test_two_processes_sample_on_policy_like_one(tmp_path_factory, tmp_path):
    """On-policy distillation with FSDP across two processes (data=1 x fsdp=2, one device
    each): every process builds its own rows' prompts, the two generate as one global batch,
    each keeps its rows' completions, and the padding-aware step agrees on a logits bucket from
    every sampled row's tokens. The 4 steps (3 of them sampled at seed 42) end where one process
    on two devices with the same mesh ends, within SHARD_TOL."""
    from distil_jax.training.on_policy import is_on_policy

    assert [is_on_policy(42, s, 0.5) for s in range(4)] == [False, True, True, True]
    args = ("--config.train.mesh.data=1", "--config.train.mesh.fsdp=2", "--config.dataset.layout=pad",
            "--config.objective.on_policy.lmbda=0.5", "--config.objective.on_policy.max_new_tokens=8",
            "--config.train.log_steps=1")
    one = _reference_run(tmp_path_factory, "on_policy_fsdp2", 4, 2, *args, devices=2)
    workdir = T.seed_workdir(one, tmp_path / "two")
    procs = _launch(workdir, 2, _free_port(), "--config.train.max_steps=4",
                    "--config.train.save_steps=2", *args)
    for p, (_, err) in zip(procs, [p.communicate(timeout=600) for p in procs]):
        assert p.returncode == 0, err[-3000:]
    _assert_params_close(workdir, one)
    # The same rows every step (the parameters alone barely move at this learning rate): the
    # losses and counted tokens of each step; steps 2-4 trained on completions only, at most
    # max_new_tokens counted tokens per row.
    logged = [[m for m in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
               if "counted_tokens" in m] for w in (one, workdir)]
    rows = json.loads((one / "config.json").read_text())["train"]["batch_size"]
    assert [m["step"] for m in logged[0]] == [m["step"] for m in logged[1]] == [1, 2, 3, 4]
    for a, b in zip(*logged):
        assert a["counted_tokens"] == b["counted_tokens"], (a, b)
        assert abs(a["loss"] - b["loss"]) <= SHARD_TOL * abs(a["loss"]), (a, b)
    assert all(0 < m["counted_tokens"] <= 8 * rows for m in logged[0][1:])
    assert logged[0][0]["counted_tokens"] > 8 * rows  # step 1: the dataset's rows


def _kill_after_checkpoint_2(workdir, args):
    """Two processes of the tiny run, both SIGKILLed once checkpoint 2 exists; the steps left."""
    import signal
    import time

    procs = _launch(workdir, 2, _free_port(), *args)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "2").exists():
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        assert time.time() < deadline
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate(timeout=60)
    at_kill = checkpoint.available_steps(workdir)
    assert at_kill and at_kill[-1] < 12, at_kill
    return at_kill[-1]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data2", "fsdp2"])
def test_two_processes_resume_after_sigkill(mesh, request, tmp_path):
    """Two processes killed (SIGKILL, both) after checkpoint 2, then the same two commands on a
    new coordinator port: neither is refused nor hangs (process_id and the coordinator are launch
    facts), both exit 0, and the result equals an uninterrupted run within SHARD_TOL.

    Each against one process on two devices with the same mesh, the same program (against the
    one-device run, 12 steps of another reduction order drift past SHARD_TOL on near-zero Adam
    updates; test_two_processes_equal_one compares 4 steps): data2 (one device per process,
    data=2); fsdp2 (data=1 x fsdp=2, padded rows), whose export of the two-process workdir also
    loads in transformers."""
    whole, mesh_args = request.getfixturevalue(f"{mesh}_twelve_steps")
    args = ("--config.train.max_steps=12", "--config.train.save_steps=2", *mesh_args)
    workdir = T.seed_workdir(whole, tmp_path / "two")
    at_kill = _kill_after_checkpoint_2(workdir, args)
    procs = _launch(workdir, 2, _free_port(), *args)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert f"resumed from the checkpoint at step {at_kill}" in err, err[-3000:]
    assert "train.coordinator_address" in _session_changes(workdir)
    _assert_params_close(workdir, whole)
    if mesh == "fsdp2":
        assert "real tokens per device share" in outs[0][1]  # a logits bucket was used
        _assert_export_loads(workdir, tmp_path / "export")


def _assert_export_loads(workdir, out):
    """The export of `workdir` loads in transformers with no missing or unexpected weight, and
    its logits equal the checkpoint's JAX student within 1e-5 (tests/test_export.py's float32
    tolerance)."""
    import torch
    import transformers

    from distil_jax import hf
    from distil_jax.export import export

    export(workdir, out)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                    dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _, params = checkpoint.restore_params(workdir)
    ids = np.random.default_rng(0).integers(0, T.VOCAB, (2, 16))
    with torch.no_grad():
        got = model.eval()(torch.as_tensor(ids)).logits.numpy()
    want = models.forward(hf.load_config(workdir / "student"), params["student"], ids).logits
    assert np.abs(got - np.asarray(want)).max() <= 1e-5
