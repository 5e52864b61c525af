"""The rule for every file a command writes: never one of its inputs, never another output of the same
run, never a folder. Commands check their planned outputs with it before any work starts."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError

Output = tuple[str, "Path | None"]


def _identity(path: Path) -> tuple:
    """What makes two paths the same file: device and inode when it exists (links included), else the real path."""
    try:
        stat = os.stat(path)
    except OSError:
        return ("path", str(Path(os.path.realpath(path))))
    return ("inode", stat.st_dev, stat.st_ino)


def check_outputs(inputs: Iterable[Path | None], outputs: Iterable[Output]) -> None:
    """Refuse (InputError) an output that is an input, is a folder, or is also another output of the run.

    inputs are the files the command reads (None entries are ignored); outputs are (what, path) pairs,
    what naming the output in the message (an option such as '--json', or 'mask').
    """
    read: dict[tuple, Path] = {}
    for path in inputs:
        if path is not None:
            read.setdefault(_identity(Path(path)), Path(path))
    written: dict[tuple, str] = {}
    for what, path in outputs:
        if path is None or str(path) == "-":  # '-' is standard output
            continue
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{what} {path}: is a folder, give a file name")
        key = _identity(path)
        if key in read:
            raise InputError(f"{what} {path}: would overwrite the input {read[key]}; choose another file")
        if key in written:
            raise InputError(f"{what} {path}: is also where {written[key]} goes; give each output its own file")
        written[key] = f"{what} {path}"
