"""distil_jax.fsio: atomic files and folders, and the temp leftovers of killed writers."""

import json
import os
import subprocess
import sys

import pytest

from distil_jax import fsio


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_write_json_replaces_and_keeps_old_content_on_error(tmp_path):
    path = tmp_path / "a" / "r.json"
    fsio.write_json(path, {"x": 1, "inf": float("inf"), "nan": [float("nan")]})
    assert json.loads(path.read_text()) == {"x": 1, "inf": None, "nan": [None]}  # strict JSON
    with pytest.raises(RuntimeError):
        with fsio.atomic_file(path) as f:
            f.write("half")
            raise RuntimeError("disk full")
    assert json.loads(path.read_text())["x"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temp left
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # an ordinary file's permissions


def test_stale_temps_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "model"
    dead = tmp_path / f".model.tmp-{fsio._host()}-{_dead_pid()}-abcd"
    live = tmp_path / f".model.tmp-{fsio._host()}-{os.getpid()}-abcd"
    other_host = tmp_path / f".model.tmp-elsewhere-{_dead_pid()}-abcd"
    for d in (dead, live, other_host):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    with fsio.atomic_folder(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not dead.exists()
    assert live.exists() and other_host.exists()  # not provably ours to remove
    assert (out / "config.json").exists()


def test_atomic_folder_replaces_only_when_complete(tmp_path):
    out = tmp_path / "m"
    with fsio.atomic_folder(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with fsio.atomic_folder(out) as tmp:
            (tmp / "a").write_text("2")
            raise KeyboardInterrupt
    assert (out / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
