"""Atomic writes: a file or a folder appears complete, or not at all.

Everything distil_jax writes that a later run or a reader trusts (the run's JSON records, the
token cache, the demo corpus, an exported model folder) goes through here:

* ``atomic_file(path)``: a context manager yielding a file object on a temp file beside `path`,
  flushed, fsynced and renamed over `path` on success; removed on any error (a full disk, Ctrl-C),
  so `path` keeps its old content.
* ``write_json(path, obj)`` / ``write_text``: one-call forms of it.
* ``atomic_folder(path)``: the same for a folder (an export): a temp folder beside `path`, renamed
  into place when complete; an earlier `path` is replaced only then.

Temp names are hidden and say whose they are: ``.<name>.tmp-<host>-<pid>-<random>``. A process
killed mid-write (SIGKILL skips every cleanup) leaves one behind; the next write of the same
`path` removes those whose process is gone (`clean_stale`), and never touches another live
process's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

_TMP = ".tmp-"
_OLD = ".old-"


def _host() -> str:
    # A hostname may hold dashes and dots; the pid and the random part after it never do.
    return socket.gethostname().replace("/", "_") or "localhost"


def _tag() -> str:
    return f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _owner(tag: str) -> tuple[str, int] | None:
    """(host, pid) from "<host>-<pid>-<random>", or None if it is not one of ours."""
    parts = tag.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files / folders that an earlier, now dead, process of this machine left
    beside `path` while writing it. Returns what was removed."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    removed = []
    for marker in (_TMP, _OLD):
        prefix = f".{path.name}{marker}"
        for entry in parent.glob(f"{_glob_escape(prefix)}*"):
            owner = _owner(entry.name[len(prefix):])
            if owner is None or owner[0] != _host() or pid_alive(owner[1]):
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as e:  # cleaning is a courtesy: never fail the write on it
                log.warning("could not remove the stale temp %s: %s", entry, e)
                continue
            removed.append(entry)
            log.info("removed %s, left by a killed process (pid %d)", entry, owner[1])
    return removed


def _glob_escape(s: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in s)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, racy with threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_permissions(path: Path) -> None:
    """Temp files and folders are made 0600 / 0700; give the finished ones the permissions an
    ordinary open / mkdir would (0666 / 0777 minus the umask)."""
    umask = _umask()
    if path.is_file():
        os.chmod(path, 0o666 & ~umask)
        return
    for root, _dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (a power cut after it keeps the new name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Yield a file object (mode "w" or "wb") whose content replaces `path` when the block ends
    without an error. The parent folder is created."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode={mode!r}: use 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = path.parent / f".{path.name}{_TMP}{_tag()}"
    f = open(tmp, mode, encoding=encoding if mode == "w" else None)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN / infinite float replaced by None: Python's json writes them as
    NaN / Infinity, which is not JSON, and strict readers (jq, JavaScript) refuse the file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON (non-finite floats as null, see `json_safe`), atomically."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    write_text(path, text + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it is renamed to `path` (replacing an
    earlier one only then). An error or a kill leaves `path` as it was."""
    out = Path(path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.parent / f".{out.name}{_TMP}{_tag()}"
    tmp.mkdir(mode=0o700)
    old = None
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists():
            # Two renames, since a folder cannot be renamed over a non-empty one; between them
            # `path` is missing for an instant, and a failure of the second puts the old back.
            old = out.parent / f".{out.name}{_OLD}{_tag()}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def describe_os_error(e: OSError, fix: str) -> str:
    """One line for an OSError: what could not be done to which file, and the fix (`fix` for a
    place that cannot be written; a full disk has its own)."""
    where = f" {e.filename}" if e.filename else ""
    what = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write{where}: {what}; free some space (old runs, caches) and run the same "
                "command again: files are replaced only once complete")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {what}; {fix}"
    return f"{what}:{where or ' (no file named)'}"
