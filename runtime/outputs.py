"""The rule for every file a command writes: never one of its inputs, never another output of the same
run, never a folder. Commands check their planned outputs with it before any work starts."""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

Output = tuple[str, "Path | None"]


@dataclass(frozen=True)
class Collision:
    """An output that would replace an input (input set) or another output of the run (earlier set).

    owner and earlier are what the caller named each output by: an option, a scan.
    """

    owner: Hashable
    path: Path
    input: Path | None = None
    earlier: Hashable | None = None


def _identity(path: Path) -> tuple:
    """What makes two paths the same file: device and inode when it exists (links included), else the real path."""
    try:
        stat = os.stat(path)
    except OSError:
        return ("path", str(Path(os.path.realpath(path))))
    return ("inode", stat.st_dev, stat.st_ino)


def find_collision(inputs: Iterable[Path | None], outputs: Iterable[tuple[Hashable, Path]]) -> Collision | None:
    """The first output that is one of the inputs or an earlier output (by inode, else by real path); None if none.

    inputs are the files the command reads (None entries are ignored); outputs are (owner, path) pairs in order.
    """
    read: dict[tuple, Path] = {}
    for path in inputs:
        if path is not None:
            read.setdefault(_identity(Path(path)), Path(path))
    written: dict[tuple, Hashable] = {}
    for owner, path in outputs:
        key = _identity(Path(path))
        if key in read:
            return Collision(owner, Path(path), input=read[key])
        if key in written:
            return Collision(owner, Path(path), earlier=written[key])
        written[key] = owner
    return None


def _named_files(outputs: Iterable[Output]) -> Iterator[tuple[str, Path]]:
    """Each output that names a file, as ('what path', path); a folder is refused as it comes."""
    for what, path in outputs:
        if path is None or str(path) == "-":  # '-' is standard output
            continue
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{what} {path}: is a folder, give a file name")
        yield f"{what} {path}", path


def check_outputs(inputs: Iterable[Path | None], outputs: Iterable[Output]) -> None:
    """Refuse (InputError) an output that is an input, is a folder, or is also another output of the run.

    inputs are the files the command reads (None entries are ignored); outputs are (what, path) pairs,
    what naming the output in the message (an option such as '--json', or 'mask').
    """
    collision = find_collision(inputs, _named_files(outputs))
    if collision is None:
        return
    if collision.input is not None:
        raise InputError(f"{collision.owner}: would overwrite the input {collision.input}; choose another file")
    raise InputError(f"{collision.owner}: is also where {collision.earlier} goes; give each output its own file")
