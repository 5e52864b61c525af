"""Atomic file output: write to a temporary file beside the target, rename it over the target on success."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError


def _full_suffix(name: str) -> str:
    # nibabel picks compression from the name, so '.nii.gz' must survive as a whole.
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in path's folder; it replaces path when the block succeeds and is removed otherwise."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + _full_suffix(path.name), dir=folder)
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
