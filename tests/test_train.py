"""The training run end to end on the seconds-long demo config (configs/tiny.py:test)."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from distil_jax import checkpoint, config as config_lib, data, hf, train_step
from distil_jax.train import main, train
from distil_jax.workdir import WorkdirBusy
from distil_jax.training import builders, evaluation, metrics
from distil_jax.training.metrics import MetricsWriter
from tests import tiny_setup as T

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def tiny_config(**overrides):
    c = config_lib.load(TINY + ":test")
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One complete tiny run (demo teacher included); other tests copy its teacher and data."""
    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    # An extra evaluator (like Distily's enwikippl): 12 documents of the demo corpus.
    cfg.eval.evaluators = {"stdlib12": {"uri": str(workdir / "data" / "stdlib_docstrings.jsonl"),
                                        "sample_size": 12}}
    result = train(cfg, workdir)
    return workdir, result


_seed_workdir = T.seed_workdir


@pytest.mark.slow
def test_end_to_end_writes_records_and_distills(trained):
    workdir, result = trained
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = {k for rec in lines for k in rec}
    for key in ("loss", "loss/logits", "loss/attn", "grad_norm", "grad_norm_var", "learning_rate",
                "tokens_per_s", "eval/heldout/student_ppl", "eval/heldout/teacher_ppl"):
        assert key in logged, key
    assert "loss/hs" not in logged  # weight 0: not computed
    assert "eval/stdlib12/student_ppl" in logged
    extra = result["eval"]["stdlib12"]
    assert extra["student_end"]["ppl"] < extra["student_start"]["ppl"]
    assert extra["teacher"]["tokens"] > 0
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert checkpoint.available_steps(workdir) == [20, 30]  # save_steps 10, save_total_limit 2
    ev = result["eval"]["heldout"]
    # Distillation works: the student's held-out perplexity falls towards the teacher's.
    assert ev["student_end"]["ppl"] < 0.8 * ev["student_start"]["ppl"]
    summary = json.loads((workdir / "run_summary.json").read_text())
    assert summary["student"]["n_layer"] == 1 and summary["teacher"]["n_layer"] == 2
    assert summary["dataset"]["train"]["real_tokens"] > 0
    assert (summary["dataset"]["row_shape"], summary["dataset"]["loss_on"]) == ("text", "all")
    assert summary["resources"]["train_tokens"] > 0
    assert (workdir / "tokenizer" / "tokenizer.json").exists()
    assert (workdir / "student" / "config.json").exists()


@pytest.mark.slow
def test_rerun_reuses_teacher_and_finished_run(trained):
    workdir, result = trained
    mtime = (workdir / "teacher" / "model.safetensors").stat().st_mtime
    again = train(tiny_config(), workdir)
    assert (workdir / "teacher" / "model.safetensors").stat().st_mtime == mtime
    assert again["step"] == result["step"] == 30
    assert again["eval"]["heldout"]["student_end"] == result["eval"]["heldout"]["student_end"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_stop_and_resume_equals_uninterrupted(trained, tmp_path, sig):
    """Stop the CLI mid-run, rerun the same command: the final student parameters equal those of
    an uninterrupted run with the same config. Tolerance: bitwise (CPU).

    SIGKILL: the last regular checkpoint survives. SIGTERM (a scheduler's notice before it
    stops a job): the run checkpoints the step it reached (its metrics finite) and exits 143 with
    one line naming that checkpoint."""
    src, _ = trained
    killed = _seed_workdir(src, tmp_path / "killed")
    cmd = [sys.executable, "-m", "distil_jax.train", "--config", TINY + ":test", "--workdir", str(killed)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = T.start_until_checkpoint(cmd, killed, 10, ROOT)
    proc.send_signal(sig)
    err = proc.communicate(timeout=300)[1].decode()
    steps_at_kill = checkpoint.available_steps(killed)
    assert steps_at_kill and steps_at_kill[-1] < 30, steps_at_kill
    if sig == signal.SIGTERM:
        # Checkpoint 10 was committed after step 10, so the signal is seen at step 11 or later.
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert steps_at_kill[-1] > 10
        assert (f"stopped by SIGTERM at step {steps_at_kill[-1]} of 30: the checkpoint of step "
                f"{steps_at_kill[-1]} is written" in err), err[-2000:]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from the checkpoint at step {steps_at_kill[-1]}" in done.stderr

    step_a, resumed = checkpoint.restore_params(killed)
    step_b, uninterrupted = checkpoint.restore_params(src)
    assert step_a == step_b == 30
    flat_a, flat_b = jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)
    assert len(flat_a) == len(flat_b)
    for a, b in zip(flat_a, flat_b):
        np.testing.assert_array_equal(a, b)
    # Totals span both sessions: tokens trained on are those of the uninterrupted run.
    summaries = [json.loads((w / "run_summary.json").read_text())["resources"] for w in (killed, src)]
    assert summaries[0]["train_tokens"] == summaries[1]["train_tokens"] > 0
    # metrics.jsonl holds each step once, though steps after the checkpoint ran twice.
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s, line in zip(steps, (killed / "metrics.jsonl").read_text().splitlines())
                   if '"loss"' in line]
    assert train_steps == sorted(set(train_steps))
    # grad_norm_var (the last 16 grad norms) is logged from step 16 on and, its window being
    # saved with the checkpoint, is the uninterrupted run's after the resume too.
    records = [{r["step"]: r for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
                if "loss" in r} for w in (killed, src)]
    assert sorted(records[0]) == sorted(records[1])
    var_steps = [s for s in sorted(records[1]) if "grad_norm_var" in records[1][s]]
    assert var_steps == [20, 25, 30]  # log_steps 5
    for s in var_steps:
        assert records[0][s]["grad_norm_var"] == records[1][s]["grad_norm_var"], s


def _copy_run(src: Path, dst: Path) -> Path:
    """A copy of a whole run's workdir (checkpoints, records, teacher), to resume or break."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("field, value", [
    ("optimizer.learning_rate", 1e-3), ("train.batch_size", 4), ("train.max_steps", 40),
    ("demo_teacher.n_layer", 3), ("student.overrides", {"n_layer": 2})])
def test_resume_with_a_config_that_changes_the_result_is_refused(trained, tmp_path, field, value):
    src, _ = trained
    workdir = _copy_run(src, tmp_path / "w")
    first = (workdir / "config.json").read_text()
    cfg = tiny_config()
    section, key = field.split(".")
    old = cfg[section][key]
    cfg[section][key] = value
    with pytest.raises(ValueError, match=rf"started with another config.*{field}.*{old!r} -> {value!r}"
                                         if not isinstance(value, dict) else rf"started with another config.*{field}"):
        train(cfg, workdir)
    assert (workdir / "config.json").read_text() == first  # the record of the first half is kept
    assert checkpoint.available_steps(workdir) == [20, 30]


@pytest.mark.slow
def test_resume_records_neutral_changes_and_a_stale_lock_does_not_block(trained, tmp_path):
    src, result = trained
    workdir = _copy_run(src, tmp_path / "w")
    first = (workdir / "config.json").read_text()
    # The lock file of a run that was killed: its process is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (workdir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    cfg = tiny_config(**{"train.log_steps": 3, "eval.eval_steps": 7})
    again = train(cfg, workdir)
    assert again["step"] == 30
    assert (workdir / "config.json").read_text() == first
    session = json.loads((workdir / "sessions.jsonl").read_text().splitlines()[-1])
    assert session["step"] == 30
    changes = session["config_changes"]
    assert changes["train.log_steps"] == [5, 3] and changes["eval.eval_steps"] == [0, 7]
    assert all(k.startswith(("train.log_steps", "eval.")) for k in changes)  # (and the evaluator)
    assert (workdir / ".lock").read_text() == ""  # released


@pytest.mark.slow
def test_resume_with_another_teacher_is_refused(trained, tmp_path):
    """The teacher's folder was overwritten (e.g. by an export of the student): the checkpoint's
    teacher fingerprint tells."""
    src, _ = trained
    workdir = _copy_run(src, tmp_path / "w")
    t_cfg, t_params = hf.load_pretrained(workdir / "teacher")
    hf.save_pretrained(t_cfg, jax.tree_util.tree_map(lambda x: x * 1.001, t_params), tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", workdir / "teacher" / "model.safetensors")
    with pytest.raises(ValueError, match="is not the one the run in .* was trained against"):
        train(tiny_config(), workdir)


@pytest.mark.slow
def test_second_run_on_a_busy_workdir_is_refused_naming_the_other(trained, tmp_path):
    src, _ = trained
    workdir = _copy_run(src, tmp_path / "w")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from distil_jax.workdir import WorkdirLock; "
         "l = WorkdirLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(600)",
         str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusy, match=rf"in use by another run \(pid {holder.pid} on "):
            train(tiny_config(), workdir)
    finally:
        holder.kill()
        holder.wait()
    assert checkpoint.available_steps(workdir) == [20, 30]


@pytest.mark.slow
def test_nan_guard_never_checkpoints_a_state_made_by_a_non_finite_step(trained, tmp_path):
    """lr 1e6 with a save every step: step 1's loss and gradient norm are finite, so the state
    after it is finite and saved; step 2's loss is not, so the state after step 2 is never
    saved, and the error names checkpoint 1 as the one kept (docs/design.md, "Checkpoints")."""
    src, _ = trained
    workdir = _seed_workdir(src, tmp_path / "nan")
    cfg = tiny_config(**{"optimizer.learning_rate": 1e6, "train.save_steps": 1})
    with pytest.raises(FloatingPointError, match=r"became (nan|inf) at step 2: lower optimizer."
                                                 r"learning_rate.*the last good checkpoint \(step 1\) is kept"):
        train(cfg, workdir)
    assert checkpoint.available_steps(workdir) == [1]
    _, params = checkpoint.restore_params(workdir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_every_config_file_builds_and_matches_the_schema():
    files = sorted((ROOT / "configs").glob("*.py"))
    assert {f.name for f in files} >= {"base.py", "tiny.py"}
    for f in files:
        cfg = config_lib.load(str(f))
        config_lib.validate(cfg)
    base = config_lib.load(str(ROOT / "configs" / "base.py"))
    # The reference run (docs/design.md).
    assert base.teacher.model_name_or_path == "gpt2"
    assert base.student.config_name_or_path == "distilbert/distilgpt2"
    assert base.dataset.sample_size == 5000 and base.dataset.test_size == 0.002
    assert base.optimizer.learning_rate == 2e-4 and base.optimizer.lr_end == 1e-7
    assert base.train.batch_size == 8 and base.train.seed == 42
    assert base.objective.attn.weight == 5.0 and base.objective.attn.layer_mapper == "layer-2"
    assert config_lib.load(TINY + ":test").train.max_steps == 30


def test_base_config_pad_layout_gives_distilys_624_steps():
    """configs/base.py with --config.dataset.layout=pad: 4990 documents (synthetic, up to 3000
    tokens, so many are truncated) make 4990 rows and 624 steps of 8, as Distily's run; packed
    (the config's default) the same truncated documents need fewer rows and steps."""
    base = config_lib.load(str(ROOT / "configs" / "base.py"))
    assert base.dataset.truncate and not base.dataset.append_eos  # Distily's tokens
    rs = np.random.RandomState(0)
    docs = [rs.randint(0, 50256, n).astype(np.int32) for n in rs.randint(1, 3000, 4990)]
    steps = {}
    for layout in ("pad", "pack"):
        base.dataset.layout = layout
        rows = data.docs_to_rows(docs, base.dataset.max_seq_len, base.dataset.layout, eos_id=50256,
                                 pad_id=50256, truncate=base.dataset.truncate,
                                 append_eos=base.dataset.append_eos)
        steps[layout] = builders.run_steps(base.train, builders.train_batches(base, rows).steps_per_epoch)
        assert data.layout_stats(rows)["real_tokens"] == sum(min(len(d), 1024) for d in docs)
    assert steps["pad"] == 624
    assert steps["pack"] < 600


def test_grad_norm_variance_is_the_sample_variance_of_the_last_16():
    norms = list(np.random.RandomState(0).uniform(0.5, 3.0, 20))
    assert metrics.grad_norm_variance(norms[:15]) is None  # logged once 16 exist
    assert metrics.grad_norm_variance(norms[:16]) == pytest.approx(np.var(norms[:16], ddof=1), rel=1e-12)
    assert metrics.grad_norm_variance(norms) == pytest.approx(np.var(norms[-16:], ddof=1), rel=1e-12)


def test_distily_ppl_is_distilys_evaluator_and_ppl_is_token_weighted(tmp_path):
    """Against transformers: Distily's figure prepends BOS to each document cut to S - 1 tokens
    and averages exp(mean NLL) over documents (the first token scored after BOS); the main
    figure is exp(total NLL / predicted tokens) over the run's (packed) rows, where each
    document's first token has nothing before it. Tolerance: 1e-5 relative (float32 both)."""
    import torch

    from distil_jax import hf
    from distil_jax import sharding
    from distil_jax.train_step import make_eval_step
    from tests.hf_utils import save_tiny

    model = save_tiny(tmp_path / "m")
    cfg, params = hf.load_pretrained(str(tmp_path / "m"), jax.numpy.float32)
    S, bos = 16, cfg.bos_token_id
    rs = np.random.RandomState(0)
    docs = [rs.randint(1, cfg.vocab_size, n).astype(np.int32) for n in (20, 5, 9, 1, 12)]
    rows = data.docs_to_rows(docs, S, "pack", eos_id=0, pad_id=0, truncate=True, append_eos=False)
    eval_set = data.EvalSet(rows, data.distily_eval_rows(docs, S, bos, pad_id=0))
    got = evaluation.evaluate(make_eval_step(cfg), params, eval_set, 2, sharding.make_mesh())

    def nll(ids):  # HF's mean next-token loss over the row, and the number of predictions
        with torch.no_grad():
            t = torch.as_tensor(np.asarray(ids, np.int64))[None]
            return float(model(t, labels=t).loss), len(ids) - 1

    distily = [np.exp(nll(np.concatenate([[bos], d[:S - 1]]))[0]) for d in docs]
    plain = [nll(d[:S]) for d in docs if len(d) > 1]
    total = sum(l * n for l, n in plain)
    count = sum(n for _, n in plain)
    assert got["documents"] == len(docs) and got["tokens"] == count
    assert got["distily_ppl"] == pytest.approx(np.mean(distily), rel=1e-5)
    assert got["ppl"] == pytest.approx(np.exp(total / count), rel=1e-5)


def test_unknown_config_key_is_an_error():
    cfg = config_lib.default_config()
    cfg.train.batch_sizes = 4
    with pytest.raises(ValueError, match="unknown config field 'train.batch_sizes'; did you mean 'train.batch_size'"):
        config_lib.validate(cfg)


@pytest.mark.parametrize("field, value, message", [
    ("train.attention", "flash", r"train.attention='flash': use one of 'xla', 'cudnn'"),
    ("train.logits_buckets", -1, r"train.logits_buckets=-1: use an integer >= 0 \(0 = off"),
    ("optimizer.learning_rate", -1e-3, r"optimizer.learning_rate=-0.001: use a finite number > 0"),
    ("optimizer.learning_rate", float("inf"), r"optimizer.learning_rate=inf: use a finite number > 0"),
    ("train.num_epochs", 0.0, r"train.num_epochs=0.0: use a finite number > 0 \(or set train.max_steps\)"),
    ("train.max_steps", 0, r"train.max_steps=0: use an integer >= 1 or -1"),
    ("train.batch_size", 0, r"train.batch_size=0: use an integer >= 1"),
    ("dataset.test_size", 1.5, r"dataset.test_size=1.5: use a finite number > 0 and < 1"),
    ("dataset.column", "", r"dataset.column='': use a non-empty string"),
    ("optimizer.adam_beta2", 1.0, r"optimizer.adam_beta2=1.0: use a finite number >= 0 and < 1"),
    ("objective.temperature", 0.0, r"objective.temperature=0.0: use a finite number > 0"),
    ("eval.batch_size", -8, r"eval.batch_size=-8: use an integer >= 1"),
    ("train.remat_policy", "offload", r"train.remat_policy='offload': use 'auto', 'full' or 'dots'"),
    ("teacher.cache_tail_samples", -1, r"teacher.cache_tail_samples=-1: use 0 \(none\) or a positive"),
])
def test_config_values_out_of_range_are_errors(field, value, message):
    cfg = config_lib.default_config()
    section, key = field.split(".")
    cfg[section][key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(cfg)


def test_bad_values_are_refused_before_anything_is_written(tmp_path):
    cfg = tiny_config(**{"optimizer.learning_rate": -1e-3})
    with pytest.raises(ValueError, match="optimizer.learning_rate=-0.001"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    cfg = tiny_config()
    cfg.demo_teacher.enabled = False
    cfg.dataset.uri = ""
    cfg.teacher.model_name_or_path = "gpt2"
    with pytest.raises(ValueError, match="dataset.uri='': use a non-empty string"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    empty = config_lib.default_config()
    empty.objective.logits.weight = 0.0
    empty.objective.attn.weight = 0.0
    with pytest.raises(ValueError, match="every weight is 0"):
        config_lib.validate(empty)


def _outside_run_config(src: Path, **overrides):
    """A config that uses the trained run's teacher and corpus from outside a fresh workdir."""
    cfg = tiny_config(**overrides)
    cfg.demo_teacher.enabled = False
    cfg.teacher.model_name_or_path = str(src / "teacher")
    cfg.dataset.uri = str(src / "data" / "stdlib_docstrings.jsonl")
    return cfg


@pytest.mark.slow
def test_dataset_of_empty_texts_is_an_error_and_leaves_nothing(trained, tmp_path):
    src, _ = trained
    (tmp_path / "empty.jsonl").write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(20)))
    cfg = _outside_run_config(src)
    cfg.dataset.uri = str(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match=r"every text of the train split .* is empty"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_config_error_found_after_loading_leaves_no_records(trained, tmp_path):
    """Validate first, write second: a student that cannot hold the sequence is found after the
    teacher is loaded, and a fresh workdir is left as it was (absent)."""
    src, _ = trained
    cfg = _outside_run_config(src)
    cfg.student.overrides = {"n_layer": 1, "n_positions": 16}
    with pytest.raises(ValueError, match="sequence length 32 exceeds the student.s maximum of 16 positions"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_metrics_are_strict_json(tmp_path):
    writer = MetricsWriter(tmp_path, 0)
    writer.write(3, {"eval/heldout/student_ppl": float("inf"), "loss": 1.5})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "Infinity" not in line and json.loads(line) == {"step": 3, "eval/heldout/student_ppl": None,
                                                           "loss": 1.5}


def test_cudnn_attention_on_cpu_is_refused_before_any_work(tmp_path):
    cfg = tiny_config()
    cfg.train.attention = "cudnn"
    cfg.train.dtype = "bfloat16"
    with pytest.raises(ValueError, match="needs an NVIDIA GPU, but jax runs on 'cpu'"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _main(capsys, *args) -> tuple[int, str]:
    rc = main(["distil_jax.train", *args])
    return rc, capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    workdir = ["--workdir", str(tmp_path / "w")]
    rc, err = _main(capsys, "--config", TINY, *workdir, "--config.train.batch_sizes=1")
    assert rc == 2 and err.splitlines() == [err.strip()]
    assert "unknown config field 'train.batch_sizes'; did you mean 'train.batch_size'?" in err
    rc, err = _main(capsys, "--config", str(tmp_path / "nope.py"), *workdir)
    assert rc == 2 and err.strip() == f"error: config file {tmp_path / 'nope.py'} not found; pass an " \
                                      "existing file, e.g. --config configs/tiny.py"
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    rc, err = _main(capsys, "--config", str(tmp_path / "broken.py"), *workdir)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "broken.py: invalid Python at line 1" in err
    rc, err = _main(capsys, "--config", TINY + ":test", *workdir, "--config.train.num_epochs=0")
    assert rc == 2 and err.strip() == "error: train.num_epochs=0.0: use a finite number > 0 (or set " \
                                      "train.max_steps)"
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module", ["train", "export", "record_teacher"])
def test_help_prints_usage_and_exits_0(module, capsys):
    """The three commands share one parser (distil_jax/cli.py): --help is usage, exit status 0."""
    import importlib

    main_ = importlib.import_module(f"distil_jax.{module}").main
    try:
        rc = main_(["--help"] if module == "export" else [module, "--help"])
    except SystemExit as e:  # export's main lets argparse exit, as for its usage errors
        rc = e.code
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith(f"usage: python -m distil_jax.{module}"), out
    assert "--workdir" in out


def test_config_fields_accept_none_from_the_command_line(tmp_path, capsys):
    """`--config.FIELD=None` is None, not the string 'None' (nor a parse error for an int
    field); a field that may not be None is then refused by validation in one line."""
    from distil_jax import cli

    c = cli.load_config(TINY + ":test", ["--config.dataset.subset=None", "--config.dataset.sample_size=None",
                                         "--config.train.max_steps=7"])
    assert c.dataset.subset is None and c.dataset.sample_size is None and c.train.max_steps == 7
    rc, err = _main(capsys, "--config", TINY + ":test", "--workdir", str(tmp_path / "w"),
                    "--config.train.batch_size=None")
    assert rc == 2 and err.strip() == "error: train.batch_size=None: use an integer >= 1", err
    assert not (tmp_path / "w").exists()


def _sys_is_read_only() -> bool:
    """/sys refuses new folders even to root (a chmod-ed folder does not stop root)."""
    try:
        os.mkdir("/sys/distil_jax_probe")
    except OSError:
        return True
    os.rmdir("/sys/distil_jax_probe")
    return False


@pytest.mark.skipif(not _sys_is_read_only(), reason="needs a /sys that refuses new folders")
def test_cli_read_only_workdir_is_one_line(capsys):
    rc, err = _main(capsys, "--config", TINY + ":test", "--workdir", "/sys/distil_jax_test/w")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: cannot write /sys/distil_jax_test") and "use a writable --workdir" in err


@pytest.fixture
def jax_cache_settings():
    """jax's compilation-cache settings as the suite had them, back after the test."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
    yield saved[0]
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_enable_compilation_cache", saved[1])
    cc.reset_cache()


def test_compilation_cache_is_the_configs_folder(jax_cache_settings, tmp_path, monkeypatch, caplog):
    """train.compilation_cache: jax writes what it compiles into the named folder (and a restarted
    run reads it back from there); "" writes nothing; the default is jax's own folder when it
    has one, else <distil_jax cache>/jax_compilation. A folder that cannot be created: a one-line
    error when the config names it, before any work; a warning and no cache for the default."""
    import jax.numpy as jnp

    from distil_jax.teacher_cache import record
    from distil_jax.training.builders import use_compilation_cache

    from distil_jax import workdir

    # Where programs are cached does not change a run: a resume may change it, or not know it.
    new, old = tiny_config().to_dict(), tiny_config().to_dict()
    del old["train"]["compilation_cache"]
    assert workdir.config_changes(old, new) == ({}, {})
    moved = tiny_config(**{"train.compilation_cache": "elsewhere"}).to_dict()
    assert workdir.config_changes(new, moved) == ({}, {"train.compilation_cache": [None, "elsewhere"]})

    assert use_compilation_cache(None) == jax_cache_settings  # the suite's (tests/conftest.py)
    folder = tmp_path / "jc"
    assert use_compilation_cache(str(folder)) == str(folder)
    jax.jit(lambda x: x * 3.0 + 1.0)(jnp.arange(5.0)).block_until_ready()
    written = sorted(folder.iterdir())
    assert written  # the suite caches every program (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)
    assert use_compilation_cache("") is None
    jax.jit(lambda x: x * 5.0 - 2.0)(jnp.arange(5.0)).block_until_ready()
    assert sorted(folder.iterdir()) == written
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_enable_compilation_cache", True)
    monkeypatch.setenv("DISTIL_JAX_CACHE", str(tmp_path / "dj"))
    assert use_compilation_cache(None) == str(tmp_path / "dj" / "jax_compilation")
    if _sys_is_read_only():
        bad = "/sys/distil_jax_test/jc"
        for run in (lambda c: train(c, tmp_path / "w"), lambda c: record(c, tmp_path / "r")):
            with pytest.raises(ValueError, match=f"train.compilation_cache='{bad}': cannot create it "):
                run(tiny_config(**{"train.compilation_cache": bad}))
        assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("DISTIL_JAX_CACHE", "/sys/distil_jax_test")
        with caplog.at_level(logging.WARNING, logger="distil_jax"):
            assert use_compilation_cache(None) is None
        assert "no compilation cache: cannot create /sys/distil_jax_test/jax_compilation" in caplog.text
        assert not jax.config.jax_enable_compilation_cache


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_a_note_on_resuming(trained, tmp_path, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) in the middle of the loop: exit status 130, one note on how to
    resume, the workdir released, and the rerun resumes from the checkpoint."""
    src, _ = trained
    workdir = _seed_workdir(src, tmp_path / "w")
    real_next = data.BatchIterator.__next__
    calls = []

    def interrupt_at_step_13(self):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(data.BatchIterator, "__next__", interrupt_at_step_13)
    rc, err = _main(capsys, "--config", TINY + ":test", "--workdir", str(workdir))
    assert rc == 130
    assert err.strip().splitlines()[-1] == (
        "interrupted at step 12 of 30: the last checkpoint is step 10; run the same command again "
        "to resume from it")
    assert "Traceback" not in err
    assert checkpoint.available_steps(workdir) == [10]
    assert (workdir / ".lock").read_text() == ""


def test_sigterm_with_a_save_every_step_still_stops(trained, tmp_path, capsys, monkeypatch):
    """SIGTERM (sent to this process during step 13's batch) with train.save_steps=1: step 13 is
    both a regular and the preempted save, and the run must stop there all the same: exit status
    143, the line naming checkpoint 13, the workdir released."""
    src, _ = trained
    workdir = _seed_workdir(src, tmp_path / "w")
    real_next = data.BatchIterator.__next__
    calls = []

    def sigterm_at_step_13(self):
        calls.append(1)
        if len(calls) == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self)

    monkeypatch.setattr(data.BatchIterator, "__next__", sigterm_at_step_13)
    rc, err = _main(capsys, "--config", TINY + ":test", "--workdir", str(workdir),
                    "--config.train.save_steps=1")
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "stopped by SIGTERM at step 13 of 30: the checkpoint of step 13 is written; run the same "
        "command again to resume from it")
    assert checkpoint.available_steps(workdir) == [12, 13]  # save_total_limit 2
    assert (workdir / ".lock").read_text() == ""
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the loop's handler is gone


def test_missing_teacher_is_a_clear_error(tmp_path):
    cfg = tiny_config()
    cfg.demo_teacher.enabled = False
    cfg.teacher.model_name_or_path = str(tmp_path / "no-such-teacher")
    cfg.dataset.uri = str(tmp_path / "data.jsonl")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        train(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_sequence_longer_than_student_positions(trained, tmp_path):
    src, _ = trained
    cfg = tiny_config()
    cfg.student.overrides = {"n_layer": 1, "n_positions": 16}
    with pytest.raises(ValueError, match="sequence length 32 exceeds the student.s maximum of 16 positions"):
        train(cfg, _seed_workdir(src, tmp_path / "w"))


@pytest.mark.slow
def test_pad_layout_masks_padding(trained, tmp_path, caplog):
    """Distily's layout (one document per row): short documents leave padding, which is counted
    and masked (only real tokens are trained on). With gradient checkpointing on (the library's
    default; tiny.py turns it off), whose automatic policy the run logs."""
    src, _ = trained
    docs = [json.loads(x)["text"] for x in (src / "data" / "stdlib_docstrings.jsonl").read_text().splitlines()]
    short = [line.strip() for d in docs for line in d.splitlines() if 20 < len(line.strip()) < 80][:80]
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in short))
    cfg = tiny_config()
    cfg.dataset.uri = str(tmp_path / "short.jsonl")
    cfg.dataset.sample_size = None
    cfg.dataset.layout = "pad"
    cfg.dataset.truncate = True  # Distily's rows: one per document (tiny.py keeps every token)
    cfg.train.max_steps = 6
    cfg.train.grad_accum = 2
    cfg.train.remat = True
    with caplog.at_level(logging.INFO, logger="distil_jax"):
        result = train(cfg, _seed_workdir(src, tmp_path / "pad"))
    # 8 rows of 32 tokens per micro-batch keep a few kB of matmul outputs: "dots".
    assert "train.remat_policy=auto chose dots" in caplog.text
    summary = json.loads((tmp_path / "pad" / "run_summary.json").read_text())
    train_stats = summary["dataset"]["train"]
    assert train_stats["rows"] == train_stats["documents"] == 72  # 80 docs, 10% held out
    assert train_stats["padding_fraction"] > 0.1
    # 6 steps of 2 x 8 rows of 32 positions, but only the real tokens count.
    assert 0 < summary["resources"]["train_tokens"] < 0.9 * 6 * 16 * 32
    assert np.isfinite(result["loss"])


@pytest.mark.slow
def test_checkpoint_of_other_shapes_is_refused(trained):
    """The shape check behind the config check (a checkpoint from another version's config)."""
    src, _ = trained
    mngr = checkpoint.manager(src, create=False)
    _, params = checkpoint.restore_params(src)
    params["student"]["wte"] = {"embedding": params["student"]["wte"]["embedding"][:3]}
    like = train_step.create_train_state(params, optax.identity(), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"different shapes \(checkpoint vs this config: "
                                         r"student/wte/embedding: \(512, 64\), expected \(3, 64\)\)"):
        checkpoint.restore(mngr, 30, like)


def _signal_cli(workdir: Path, marker: str, delay: float, sig: int):
    """Run the training command, send `sig` `delay` s after a stderr line containing `marker`;
    (exit status, everything it printed)."""
    # No persistent compilation cache: the first step must really compile (seconds, not a read).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_ENABLE_COMPILATION_CACHE": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "distil_jax.train", "--config", TINY + ":test",
                             "--workdir", str(workdir)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            proc.send_signal(sig)
            break
    seen.append(proc.stdout.read())
    return proc.wait(timeout=120), "".join(seen)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [1.5, 2.5])
def test_ctrl_c_during_the_first_compilation_exits_130_with_one_line(trained, tmp_path, delay):
    """SIGINT while XLA compiles the first step (after the step-0 evaluation): exit 130 and the
    one line on resuming, never a segfault in the interpreter's teardown (it was rc -11)."""
    workdir = _seed_workdir(trained[0], tmp_path / "w")
    rc, out = _signal_cli(workdir, "eval heldout step 0", delay, signal.SIGINT)
    assert rc == 130, out[-3000:]
    assert "Fatal Python error" not in out and "Traceback" not in out, out[-3000:]
    assert "run the same command again" in out.strip().splitlines()[-1]


@pytest.mark.slow
def test_sigterm_before_the_first_step_exits_143_and_releases_the_workdir(trained, tmp_path):
    """SIGTERM while the run is being built: one line, exit 143, the lock released (a second
    run starts at once and finishes), no traceback (it was a silent rc -15)."""
    workdir = _seed_workdir(trained[0], tmp_path / "w")
    rc, out = _signal_cli(workdir, "train: ", 0.0, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "stopped by SIGTERM outside the training steps" in out.strip().splitlines()[-1]
    assert main(["train", "--config", TINY + ":test", "--workdir", str(workdir)]) == 0
