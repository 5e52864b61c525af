"""What heartseg-infer and heartseg-eval share: error reporting, scan discovery, name pairing.

Exit codes of both tools (the command-line contract):

* 0: everything ran and every mask passed QC.
* 1: a scan failed for an unexpected reason (the other scans were still processed).
* 2: usage, model or input error: a missing or unreadable model, a model without heartseg
  metadata, an input that is not a usable 3D image or DICOM series, grids that do not match, an
  output folder that cannot be written, no scans found.
* 3: everything ran, but QC gave at least one mask the verdict "review" or "fail" (heartseg-infer),
  or flagged a prediction as degenerate (heartseg-eval); such masks are still written.

When several of these happen in one run, the exit code is the first of 2, 1, 3 that applies.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from .atomic import write_text_atomic
from .errors import EXIT_FAILED, HeartsegError, HeartsegWarning, InputError
from .formats import scan_files, scan_name
from .formats.nifti import is_nifti_path
from .strict_json import json_ready

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FLAGGED = 3

EXIT_CODES_HELP = (
    "Exit codes: 0 all done and every mask passed QC; "
    "1 a scan failed for an unexpected reason (the other scans are still processed); "
    "2 usage, model or input error (missing or unreadable model, model without heartseg metadata, "
    "a scan that is not a usable 3D image or DICOM series, mismatched grids, output folder not writable, "
    "no scans found); "
    "3 at least one mask got the QC verdict review or fail (it is still written). "
    "If several apply, the first of 2, 1, 3 wins."
)


def new_app(help: str | None = None) -> typer.Typer:
    """A typer app with the settings every heartseg tool shares (no tracebacks, -h and --help, no markup)."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None, help=help,
                       context_settings={"help_option_names": ["-h", "--help"]})


class Device(str, Enum):
    """Where ONNX Runtime runs the network (gpu is another name for cuda)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    gpu = "gpu"

    @property
    def provider(self) -> str:
        """The device name the session understands: auto, cpu or cuda."""
        return "cuda" if self is Device.gpu else self.value


DEVICE_HELP = "auto: CUDA when ONNX Runtime offers it, else CPU; cuda (or gpu): fail without it."


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"heartseg {__version__}")
        raise typer.Exit(0)


def version_option() -> Any:
    """A --version option that prints 'heartseg X.Y.Z' and exits 0 (every command has one)."""
    return typer.Option(False, "--version", callback=_print_version, is_eager=True,
                        help="Print heartseg's version and exit.")


def report_target(path: Path | None) -> bool:
    """True when a report option (--json, --csv) names stdout ('-')."""
    return path is not None and str(path) == "-"


def write_report(path: Path, text: str) -> None:
    """Write a report atomically, or to stdout when path is '-'."""
    if report_target(path):
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text_atomic(path, text)


def _console(stderr: bool = False) -> Console:
    """A console on the current stdout / stderr (looked up per call, so swapped streams are honoured).

    Off a terminal (pipes, logs, test runners) lines are not wrapped at 80 columns unless $COLUMNS asks.
    """
    stream = sys.stderr if stderr else sys.stdout
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    width = None if is_tty or os.environ.get("COLUMNS") else 200
    return Console(file=stream, highlight=False, width=width, soft_wrap=stderr)


def out_console() -> Console:
    """The console for tables and results (stdout, or stderr while stdout carries a report)."""
    return _live_console or _console(stderr=_stdout_reserved)


# True while a report goes to stdout ('--json -'): tables and messages then go to stderr.
_stdout_reserved = False


@contextlib.contextmanager
def stdout_for_reports(*paths: Path | None) -> Iterator[None]:
    """While a report option is '-', keep stdout for it: tables and messages go to stderr."""
    global _stdout_reserved
    before = _stdout_reserved
    _stdout_reserved = any(report_target(p) for p in paths)
    try:
        yield
    finally:
        _stdout_reserved = before


# While a progress bar is drawn on a terminal, every message goes through its console, which
# prints above the bar; otherwise the bar and the messages would garble each other.
_live_console: Console | None = None


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool = True) -> Iterator[tuple[Progress, Any]]:
    """A transient progress bar over total items, shown only on a terminal and when enabled."""
    global _live_console
    console = _console(stderr=_stdout_reserved)
    shown = enabled and console.is_terminal
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not shown)
    with progress:
        task = progress.add_task("", total=total)
        _live_console = console if shown else None
        try:
            yield progress, task
        finally:
            _live_console = None


F = TypeVar("F", bound=Callable[..., Any])


def say(message: str) -> None:
    """Print a plain line to stdout (no markup interpretation, never wrapped)."""
    out_console().print(message, markup=False, soft_wrap=True)


def error(message: str) -> None:
    """Print 'error: message' on one line to stderr (no markup interpretation)."""
    (_live_console or _console(stderr=True)).print(f"error: {message}", style="red", markup=False, soft_wrap=True)


def warn(message: str) -> None:
    """Print 'warning: message' on one line to stderr, in bold yellow where colour is on."""
    (_live_console or _console(stderr=True)).print(f"warning: {message}", style="bold yellow", markup=False,
                                                   soft_wrap=True)


_python_showwarning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """heartseg's own warnings as one 'warning:' line; other libraries' as Python shows them."""
    if issubclass(category, HeartsegWarning):
        warn(str(message))
    else:
        _python_showwarning(message, category, *args, **kwargs)


def guarded(func: F) -> F:
    """Wrap a command so a HeartsegError becomes 'error: <message>' and its exit code, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return func(*args, **kwargs)
        except HeartsegError as exc:
            error(str(exc))
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def case_key(path: Path, strip: Sequence[str] = ()) -> str:
    """The name used to pair files: the scan name, minus one of the suffixes in strip."""
    name = scan_name(path)
    for suffix in strip:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files directly inside folder, sorted (hidden and temporary files skipped)."""
    return [path for path in scan_files(folder) if is_nifti_path(path)]


def index_by_key(files: Iterable[Path], strip: Sequence[str] = (), what: str = "file") -> dict[str, Path]:
    """Map each file's pairing key to the file; two files with one key is an error."""
    index: dict[str, Path] = {}
    for path in files:
        key = case_key(path, strip)
        if key in index:
            raise InputError(f"{index[key]} and {path}: two {what}s for case {key!r}")
        index[key] = path
    return index


def ensure_output_folder(folder: Path) -> Path:
    """Create folder if needed and prove it writable by writing a probe file; InputError otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: output folder is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".heartseg-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{folder}: output folder is not writable ({exc.strerror or exc})") from None
    return folder


def check_report_path(path: Path | None, option: str) -> None:
    """Fail early when a report file (--json, --csv) cannot be written where asked ('-': stdout)."""
    if path is None or report_target(path):
        return
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path}: is a folder, give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{option} {path}: folder {folder} is not writable")


def write_json(path: Path, data: Any) -> Path:
    """Write strict JSON (NaN as null) atomically, or to stdout when path is '-'."""
    write_report(path, json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")
    return path


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table cell; NaN / None shows as 'n/a'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def final_exit_code(failed_codes: Iterable[int], flagged: bool) -> int:
    """One exit code for a run: 2 beats 1 beats 3 beats 0."""
    codes = set(failed_codes)
    if EXIT_USAGE in codes:
        return EXIT_USAGE
    if codes:
        return EXIT_FAILED
    return EXIT_FLAGGED if flagged else EXIT_OK
