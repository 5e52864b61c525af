"""Atomic file output: write to a temporary file beside the target, rename it over the target on success."""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import HeartsegError, InputError

try:
    import fcntl
except ImportError:  # not POSIX: runs go unlocked
    fcntl = None  # type: ignore[assignment]

FileId = tuple[int, int]


class WriteError(HeartsegError):
    """A file that could not be written (a full disk, a quota, a vanished folder): a failure, not a usage error."""

    exit_code = 1


# The files atomic_output puts in place while tracking_replacements is active (per thread and task).
_replacements: contextvars.ContextVar[list[tuple[Path, FileId | None]] | None] = contextvars.ContextVar(
    "heartseg_replacements", default=None)


def _full_suffix(name: str) -> str:
    # nibabel picks compression from the name, so '.nii.gz' must survive as a whole.
    return name[-len(".nii.gz"):] if name.lower().endswith(".nii.gz") else Path(name).suffix


# A temporary file without a writer's process id (older heartseg) is stale after this long.
UNOWNED_STALE_SECONDS = 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files of path left by writers that were killed (their process is gone); returns them."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    prefix, suffix = f".{path.name}.", ".tmp" + _full_suffix(path.name)
    removed = []
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix)]
    except OSError:
        return removed
    for candidate in candidates:
        owner = candidate.name[len(prefix):-len(suffix)].split(".")[0]
        try:
            stale = (not _pid_alive(int(owner))) if owner.isdigit() else (
                time.time() - candidate.stat().st_mtime > UNOWNED_STALE_SECONDS)
            if stale:
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in path's folder; it replaces path when the block succeeds and is removed otherwise.

    The temporary file's name carries the writer's process id, so that a later write to the same path
    removes what a killed writer (SIGKILL, power loss) left behind. An OSError while writing the temporary
    file or renaming it becomes a WriteError that names path.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp" + _full_suffix(path.name),
                                   dir=folder)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    os.close(fd)
    # mkstemp creates the file private (0600); give it the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        _replace(Path(tmp), path)
    except OSError as exc:
        if exc.filename is not None and str(exc.filename) not in (tmp, str(path)):
            raise  # about another file the block read, not this write
        raise WriteError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _replace(tmp: Path, path: Path) -> None:
    """Rename tmp over path, telling tracking_replacements first which file path will then be."""
    replaced = _replacements.get()
    if replaced is not None:
        # The rename keeps the file's identity: taken before it, a stop right after the rename cannot lose it.
        replaced.append((path, file_id(tmp)))
    os.replace(tmp, path)


@contextlib.contextmanager
def tracking_replacements() -> Iterator[list[tuple[Path, FileId | None]]]:
    """Collect (path, file_id) of every file atomic_output puts in place during the block, for a rollback
    (remove_if_unchanged) that knows each file this process wrote, even one renamed an instant before a stop."""
    replaced: list[tuple[Path, FileId | None]] = []
    outer = _replacements.get()
    token = _replacements.set(replaced)
    try:
        yield replaced
    finally:
        _replacements.reset(token)
        if outer is not None:
            outer.extend(replaced)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to path through a temporary file in the same folder and a rename."""
    path = Path(path)
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    return path


def file_id(path: str | os.PathLike) -> FileId | None:
    """The (device, inode) of the file at path now, or None when there is none."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def remove_if_unchanged(path: str | os.PathLike, written: FileId | None) -> bool:
    """Delete path only while it is still the file this process wrote (written: its file_id right after writing).

    Another process may have replaced it since with a finished file of its own, which must stay.
    """
    if written is None or file_id(path) != written:
        return False
    Path(path).unlink(missing_ok=True)
    return True


def _open_lock(path: Path) -> int | None:
    """An open descriptor of the lock file path, locked by this process; None when another process holds it.

    Raises OSError when the lock file cannot be created or the file system has no locks (the file is then
    removed again).
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            _drop_unlockable(path, fd)
            raise
        # The holder before us removes the file as it lets go: a lock on a removed file locks nothing.
        if file_id(path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            return fd
        os.close(fd)


def _drop_unlockable(path: Path, fd: int) -> None:
    """Close a lock file that cannot be locked, removing it when it is still the file at path."""
    try:
        if file_id(path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            path.unlink(missing_ok=True)
    except OSError:
        pass  # it stays, and a later run reuses it
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[bool]:
    """Hold the advisory lock file path for the block: yields True, or False at once when another process holds it.

    The lock file is removed when the block ends. Where locks cannot be taken (no fcntl, a read-only folder,
    a file system without locks) the block runs unlocked (yields True) and leaves no lock file: the writes
    that follow report their own errors. A killed holder's lock is released by the kernel; its file is reused.
    """
    path = Path(path)
    fd = None
    unlocked = fcntl is None
    if not unlocked:
        try:
            fd = _open_lock(path)
        except OSError:
            unlocked = True  # the block runs outside this handler, so its errors do not chain to this one
        if fd is None and not unlocked:
            yield False
            return
    try:
        yield True
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # while still holding it; see _open_lock
            os.close(fd)
