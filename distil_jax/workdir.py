"""What guards a run's workdir: one run at a time, the same config and teacher on every resume.

* ``WorkdirLock``: filelock's `FileLock` (an flock) on ``WORKDIR/.lock``, which also names its
  holder (pid, host, start time, command). The kernel drops the lock when the holder dies, however it dies,
  so a killed run never blocks the resume; a second live run is refused with the holder's name.
* ``config_changes``: what differs between the config a run started with (``config.json``) and
  the one it is resumed with. Fields that cannot change the trained parameters (``NEUTRAL``:
  logging and checkpoint intervals, evaluation) and launch facts (``LAUNCH``: the processes and
  the mesh, which change the result only by the order of float reductions) may change and are
  recorded in ``sessions.jsonl``; any other change is refused (``resume_config_changes``).
* ``held``, ``write_records``, ``remove_new_workdir``: a run's hold on its workdir, the records
  it writes there, and the undoing of a workdir a failed start created.
* ``fingerprint``: a content hash of a parameter tree, so a resume can tell that the teacher is
  the one the run started with (a path can be overwritten, e.g. by an export).
* ``inputs``: the folders and files a run reads, that an export must never replace.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from distil_jax import fsio

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
SESSIONS_FILE = "sessions.jsonl"
# Config fields (and sections) that cannot change the trained parameters: when to log and save,
# everything about evaluation, the model card's license. A resume may change them (they are
# recorded); nothing else.
NEUTRAL = ("train.log_steps", "train.save_steps", "train.save_total_limit", "eval", "license",
           "dataset.num_proc")
# Fields added after runs were started without them, with the value that behaves as those runs
# did: a config.json that lacks one ran with this value (a resume with it is no change).
ADDED = {"dataset.loss_on": "all", "dataset.streaming": False, "dataset.completion_column": None,
         # objective.on_policy (off-policy runs: its defaults)
         "objective.on_policy.lmbda": 0.0, "objective.on_policy.max_new_tokens": 16,
         "objective.on_policy.temperature": 1.0, "objective.on_policy.top_k": 0,
         "objective.on_policy.top_p": 1.0, "objective.on_policy.seq_kd": False,
         "objective.on_policy.prompt_tokens": 8, "train.compilation_cache": None}
# How a session is launched, not what it computes: the processes (each has its own process_id,
# and a restarted job gets a new coordinator), the device mesh (docs/scaling.md: a run may
# resume on another mesh; the result moves only within float reduction order) and where compiled
# programs are cached. Recorded too.
LAUNCH = ("train.coordinator_address", "train.num_processes", "train.process_id",
          "train.heartbeat_timeout_s", "train.mesh", "train.compilation_cache")


def is_neutral(field: str) -> bool:
    """True for a field a resume may change (NEUTRAL or LAUNCH)."""
    return any(field == n or field.startswith(n + ".") for n in NEUTRAL + LAUNCH)
# What a training run writes into its workdir, and reads back on resume.
ENTRIES = ("config.json", "tokenizer", "student", "checkpoints", "metrics.jsonl", "tb", "evals.json",
           "run_summary.json", "cache", "teacher", "data", SESSIONS_FILE, LOCK_FILE)


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir."""


class ConfigChanged(ValueError):
    """A resume with a config (or teacher) that would change the result."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the lock


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir for this process, or raises WorkdirBusy.

    The lock is filelock's `FileLock` on WORKDIR/.lock (an flock, released by the kernel when
    the process ends, even by SIGKILL, so a killed run never blocks the resume); the file's
    content names the holder for the message a second process gets. The file itself is never
    deleted (deleting a locked file lets two processes lock two files)."""

    def __init__(self, workdir: str | os.PathLike):
        import filelock

        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._lock = filelock.FileLock(self.path, timeout=0)

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        import filelock

        previous = _read_holder(self.path)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise WorkdirBusy(
                f"workdir {self.workdir} is in use by another run ({_describe(_read_holder(self.path))}); "
                "wait for it to finish or stop it, or use another --workdir") from None
        if previous.get("pid") and previous.get("pid") != os.getpid():
            # The kernel released its lock: that process is gone (a kill or a crash).
            log.info("taking over %s from a run that ended without releasing it (%s)", self.workdir,
                     _describe(previous))
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now(),
                  "command": " ".join(sys.argv)}
        try:
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps(holder) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self._lock.release()
            raise

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        try:
            with open(self.path, "w"):  # an empty lock file: nobody holds the workdir
                pass
        except OSError:
            pass
        self._lock.release()


def _read_holder(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        holder = json.loads(text) if text else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: Mapping) -> str:
    if not holder.get("pid"):
        return "a process that is still starting"
    return (f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started_at', '?')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


# ----------------------------------------------------------------------------- config changes


def _flat(config: Mapping) -> dict[str, Any]:
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(config), sep=".", keep_empty_nodes=True)


def config_changes(old: Mapping, new: Mapping) -> tuple[dict, dict]:
    """(refused, allowed): {field: [old value, new value]} between two JSON config dicts. A
    field only one of them has counts as a change (its value on the other side is None)."""
    from flax import traverse_util

    a, b = _flat(old), _flat(new)
    for key, value in ADDED.items():
        if key not in a and key.split(".")[0] in old:
            a[key] = value
    changed = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        va = {} if va is traverse_util.empty_node else va
        vb = {} if vb is traverse_util.empty_node else vb
        if va != vb:
            changed[key] = [va, vb]
    refused = {k: v for k, v in changed.items() if not is_neutral(k)}
    allowed = {k: v for k, v in changed.items() if is_neutral(k)}
    return refused, allowed


def describe_changes(changes: Mapping) -> str:
    return ", ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in changes.items())


def record_session(workdir: Path, step: int, changes: Mapping) -> None:
    """Append this session (start step, neutral config changes) to WORKDIR/sessions.jsonl."""
    rec = {"started_at": _now(), "step": int(step), "pid": os.getpid(), "host": socket.gethostname(),
           "config_changes": dict(changes)}
    with open(workdir / SESSIONS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(fsio.json_safe(rec)) + "\n")


# ----------------------------------------------------------------------------- the teacher


def fingerprint(params: Any) -> str:
    """sha256 (hex, first 16) of a parameter tree: every leaf's path, dtype, shape and bytes."""
    import jax
    import numpy as np

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}\0".encode())
        h.update(np.ascontiguousarray(arr).view(np.uint8).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- inputs


def inputs(workdir: Path, config: Mapping) -> list[Path]:
    """The local paths a run in `workdir` reads or writes: its own entries, and the teacher,
    tokenizer, student and dataset paths of its config that exist on this machine."""
    paths = [workdir / name for name in ENTRIES]
    cfg = config if isinstance(config, Mapping) else {}

    def get(*keys):
        node = cfg
        for k in keys:
            node = node.get(k) if isinstance(node, Mapping) else None
        return node

    candidates = [get("teacher", "model_name_or_path"), get("tokenizer_name_or_path"),
                  get("student", "model_name_or_path"), get("student", "config_name_or_path"),
                  get("dataset", "uri")]
    evaluators = get("eval", "evaluators")
    if isinstance(evaluators, Mapping):
        candidates += [spec.get("uri") for spec in evaluators.values() if isinstance(spec, Mapping)]
    for c in candidates:
        if isinstance(c, str) and c and Path(c).expanduser().exists():
            paths.append(Path(c).expanduser())
    return paths


# ----------------------------------------------------------------------------- a run's workdir


@contextlib.contextmanager
def held(workdir: Path):
    """Hold the workdir (created if missing) for this process; yields whether it was created."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} exists and is not a folder; use a folder path")
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir)
    try:
        lock.acquire()
    except BaseException:
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        yield created
    finally:
        lock.release()


def resume_config_changes(workdir: Path, given: dict) -> Optional[dict]:
    """Compare the config of this session with the one the run in `workdir` started with.

    Returns the changes a resume may make, to record ({} for none), or None when there is no
    earlier run to continue (a fresh workdir, or one whose earlier start left no checkpoint: it
    starts over). Raises ConfigChanged naming every field that would change the result."""
    from distil_jax import checkpoint

    path = workdir / "config.json"
    if not path.exists():
        if checkpoint.available_steps(workdir):
            raise ValueError(f"{workdir} holds checkpoints but no config.json, the record of the "
                             "config they were trained with: restore it, or use a new --workdir")
        return None
    try:
        first = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e}), the config this run started with: restore it, "
                         "or use a new --workdir") from None
    refused, allowed = config_changes(first, given)
    if not checkpoint.available_steps(workdir):
        if refused or allowed:
            log.warning("%s holds no checkpoint yet: starting it over with this config (changed: %s)",
                        workdir, describe_changes({**refused, **allowed}))
        return None
    if refused:
        raise ConfigChanged(
            f"the run in {workdir} was started with another config, and resuming it with this one "
            f"would change its result: {describe_changes(refused)}; rerun with the values "
            f"of {path}, or use a new --workdir")
    return allowed


def write_records(workdir: Path, tokenizer, student_hf_config, given: dict,
                  changes: Optional[dict], start: int) -> None:
    """config.json (the first session only), this session in sessions.jsonl, tokenizer/ and
    student/ (what the export needs). `changes`: resume_config_changes' answer."""
    if changes is None:
        fsio.write_json(workdir / "config.json", given)
    elif changes:
        log.info("config changes a resume may make (logging, evaluation, processes, mesh), recorded "
                 "in %s: %s", workdir / SESSIONS_FILE, describe_changes(changes))
    record_session(workdir, start, changes or {})
    for name, obj in (("tokenizer", tokenizer), ("student", student_hf_config)):
        if changes is None or not (workdir / name).exists():  # a resume has them already
            with fsio.atomic_folder(workdir / name) as tmp:
                obj.save_pretrained(tmp)


def remove_new_workdir(workdir: Path) -> None:
    """Undo a workdir this call created, when the run failed before starting: nothing of it is
    kept but the demo's teacher and corpus (a run's own, reusable inputs, expensive to redo)."""
    from distil_jax import demo

    keep = {demo.teacher_path(workdir).name, demo.corpus_path(workdir).relative_to(workdir).parts[0],
            LOCK_FILE}
    for p in workdir.iterdir():
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if all(p.name == LOCK_FILE for p in workdir.iterdir()):
        shutil.rmtree(workdir, ignore_errors=True)
