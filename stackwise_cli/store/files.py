"""Files that are never half-written, checksums, and the exclusive project lock."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from safetensors import SafetensorError

from stackwise_cli.errors import ProjectError, StackwiseError
from stackwise_cli.store import faults

TMP_MARK = ".tmp-"


def tmp_name(path: Path) -> Path:
    """A unique temporary name in the same folder (so the final rename is atomic on one filesystem)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What writers raise: OSError from Python, SafetensorError from safetensors' Rust writer (which reports a full disk
# as "... No space left on device (os error 28)" inside its own message, not as an OSError).
WRITE_ERRORS = (OSError, SafetensorError)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def _errno_of(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    # safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
    found = re.search(r"os error (\d+)|code: (\d+)", str(e))
    return int(found.group(1) or found.group(2)) if found else None


def disk_error(path: Path, e: BaseException) -> StackwiseError:
    """One user-facing line for a failed write (``WRITE_ERRORS``): disk full, read-only, or the OS's reason."""
    code = _errno_of(e)
    if code == errno.ENOSPC:
        return StackwiseError(
            f"disk full while writing {path}; the previous version is untouched",
            hint=f"free space on that disk (`df -h {path.parent}`; `stackwise clean` removes caches and old "
            "checkpoints) and rerun the same command",
        )
    if code in _READ_ONLY:
        return read_only_error(path.parent, e)
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
    return StackwiseError(f"cannot write {path}: {reason}")


def os_write_error(e: OSError) -> StackwiseError | None:
    """The one-line error for an OSError that escaped a writer without its own handling (a log, a plot, a folder):
    a full disk or a place the user cannot write; None for anything else (a bug, shown as such)."""
    path = Path(e.filename) if e.filename else Path(".")
    if e.errno == errno.ENOSPC:
        return StackwiseError(
            f"disk full while writing {path}", hint=f"free space on that disk (`df -h {path.parent}`) and rerun"
        )
    if e.errno in _READ_ONLY:
        return read_only_error(path.parent, e)
    return None


def read_only_error(folder: Path, e: BaseException) -> ProjectError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else "permission denied"
    return ProjectError(
        f"cannot write in {folder} ({reason}): the project is read-only here; nothing was changed",
        hint="commands that change a project need write access: make it writable (`chmod -R u+w`) or work on a "
        "copy (`cp -r`); `stackwise status` reads it as it is",
    )


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(fileobj)`` to a temporary name, flush, fsync, then rename over ``path``.

    A reader sees the old complete file or the new complete file, never a mix; a crash leaves at most a
    stray temporary file, which ``sweep_tmp`` removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            faults.point()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(path, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_with(path: str | Path, write_to: Callable[[Path], None]) -> None:
    """Like ``atomic_write`` for libraries that insist on writing a path themselves (safetensors' save_file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        write_to(tmp)
        faults.point()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except WRITE_ERRORS as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(path, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # filesystem or kernel without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a fully written folder into place; the old one (if any) is removed only after the new one is in.

    Where the kernel and filesystem can swap two paths atomically, the final name always holds either the
    whole old folder or the whole new one. Elsewhere the old folder is first moved aside; a kill in that
    instant leaves it under a temporary name, and ``sweep_tmp`` moves it back.
    """
    if final.exists() and _exchange(tmp_dir, final):
        _fsync_dir(final.parent)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # now holds the old folder
        return
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}{TMP_MARK}old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        faults.point()  # no folder under the final name until the next rename
    os.replace(tmp_dir, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _writer_alive(name: str) -> bool:
    """Is the process that owns this temporary (``<name>.tmp-<pid>-<hex>``) still running on this host?"""
    pid = name.rpartition(TMP_MARK)[2].removeprefix("old-").split("-")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_tmp(folder: Path, min_age_s: float = 3600.0) -> int:
    """Remove temporaries left by killed writers; returns how many were handled.

    A temporary is left alone while its writer may still be at work: its pid is alive on this host, or it was
    touched within ``min_age_s`` (a writer on another node of a shared filesystem). A folder moved aside by
    ``atomic_replace_dir`` whose replacement never arrived is moved back instead of deleted.
    """
    n = 0
    if not folder.exists():
        return 0
    now = time.time()
    for p in sorted(folder.rglob(".tmp??????"), key=lambda p: len(p.parts)):
        # safetensors' own save_file stages its output as ".tmpXXXXXX" beside the target; no pid to check
        if p.is_file() and now - p.lstat().st_mtime >= min_age_s:
            p.unlink(missing_ok=True)
            n += 1
    for p in sorted(folder.rglob(f"*{TMP_MARK}*"), key=lambda p: len(p.parts)):
        if not p.exists() or _writer_alive(p.name) or now - p.lstat().st_mtime < min_age_s:
            continue
        final = p.with_name(p.name.partition(TMP_MARK)[0])
        if p.name.partition(TMP_MARK)[2].startswith("old-") and not final.exists():
            os.replace(p, final)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def _open_lock(lock_path: Path) -> int:
    """The lock file's descriptor, made if missing; a project the user cannot write is one ProjectError."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in _READ_ONLY:
            raise read_only_error(lock_path.parent, e) from None
        raise disk_error(lock_path, e) from None


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) held for the block. The kernel releases it if the process dies,
    so a killed Slurm job can never leave the project locked."""
    fd = _open_lock(lock_path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def holder_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock for the whole of a long job, or fail at once naming the process that holds it.

    ``flock`` is released by the kernel when its process dies, however it dies, so a lock left by a killed job
    is free for the next one to take over; the host, pid and start time written into the file are only there
    to say who holds a live lock.
    """
    fd = _open_lock(lock_path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                h = json.loads(os.pread(fd, 4096, 0) or b"{}")
                holder = f"host {h['host']} pid {h['pid']} since {h['since']}"
            except (ValueError, KeyError):
                holder = "another process"
            raise ProjectError(
                f"{what} is already running ({holder})", hint="wait for it, or stop that process"
            ) from None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": stamp}).encode(), 0)
        yield
    finally:
        os.close(fd)
