"""Atomic file output: write to a temporary file beside the target, rename it over the target on success."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError


def _full_suffix(name: str) -> str:
    # nibabel picks compression from the name, so '.nii.gz' must survive as a whole.
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


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
    removes what a killed writer (SIGKILL, power loss) left behind.
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
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to path through a temporary file in the same folder and a rename."""
    path = Path(path)
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    return path
