"""heartseg-rebuild: run a model's recipe (models/recipe.json: the shipped model's chain of runs), stage after stage,
by the same commands as heartseg-train and heartseg-export, skipping stages whose output exists."""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from heartseg.runtime.cli_common import new_app, version_option
from heartseg.runtime.errors import HeartsegError

KINDS = ("train", "average", "export")
# Options a step's output and starting weights set; a recipe names them in its own fields instead.
_RESERVED = ("-o", "--output", "--resume", "--init-from", "--average-weights", "--ensemble-of")
# Options that keep a train step's weights untrained when given 0.
_ZERO_STEP_OPTIONS = ("--steps", "--coarse-steps")


@dataclass(frozen=True)
class Step:
    """One stage of a recipe: a training run, an average of weights, or an export."""

    name: str
    kind: str
    args: tuple[str, ...] = ()
    # "STAGE/PATH" inside an earlier stage's folder: --init-from (train), --average-weights (average), the
    # model.pt to export (export).
    sources: tuple[str, ...] = ()
    file: str = ""  # an export's file name in its folder
    notes: str = ""


@dataclass(frozen=True)
class Recipe:
    """A recipe file read and checked: its dataset folders and its steps in order (the export last)."""

    path: Path
    data: tuple[str, ...]
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class TinyOptions:
    """What --tiny changes so that the whole chain runs in about a minute on a small synthetic dataset."""

    steps: int = 60
    coarse_steps: int = 40
    val_every: int = 30
    threads: int = 1
    train_extra: tuple[str, ...] = ("--folds", "3", "--width", "4", "--patch", "16,16,16", "--coarse-spacing", "4",
                                    "--margin-mm", "6", "--cache", "none")
    average_extra: tuple[str, ...] = ("--threads", "1", "--cache", "none")
    # Export options that read real scans or measure variants on the datasets.
    export_dropped: tuple[str, ...] = ("--scan", "--data")
    export_dropped_flags: tuple[str, ...] = ("--fp16", "--int8")


@dataclass(frozen=True)
class Roots:
    """What a recipe's {data}, {out} and {recipe} stand for."""

    data: Path
    out: Path
    recipe: Path
    tiny: Optional[TinyOptions] = None
    first_train: str = ""  # the first training's name: --tiny's fixed split is the one it made


class StageFailed(HeartsegError):
    """A stage's command failed (exit 1: the stages before it are kept, and running again continues from it)."""

    exit_code = 1


def _fail(path: Path, text: str) -> HeartsegError:
    return HeartsegError(f"recipe {path}: {text}")


def _step(path: Path, entry: object, earlier: dict[str, Step]) -> Step:
    """One checked step; earlier maps the names of the steps before it."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
        raise _fail(path, f"every stage needs a name, got {str(entry)[:80]!r}")
    name, kind = entry["name"], entry.get("kind")
    if "/" in name or name in earlier:
        raise _fail(path, f"stage {name!r}: a name must be unique and hold no '/'")
    if kind not in KINDS:
        raise _fail(path, f"stage {name!r}: kind {kind!r}: choose one of {', '.join(KINDS)}")
    args = entry.get("args", "")
    if not isinstance(args, str):
        raise _fail(path, f"stage {name!r}: args must be one string of command-line options")
    try:
        args = tuple(shlex.split(args))
    except ValueError as exc:
        raise _fail(path, f"stage {name!r}: args: {exc}") from None
    reserved = sorted(set(args) & set(_RESERVED))
    if reserved:
        raise _fail(path, f"stage {name!r}: {reserved[0]} is set by the recipe's fields, not by args")
    field_name = {"train": "init_from", "average": "members", "export": "source"}[kind]
    sources = entry.get(field_name, [])
    sources = [sources] if isinstance(sources, str) else sources
    if not isinstance(sources, list) or not all(isinstance(x, str) for x in sources):
        raise _fail(path, f"stage {name!r}: {field_name} must name STAGE/FILE paths")
    sources = tuple(sources)
    _check_sources(path, name, sources, earlier)
    _check_counts(path, name, kind, args, sources)
    file = entry.get("file", "")
    if kind == "export" and (not isinstance(file, str) or not file.endswith(".onnx") or "/" in file):
        raise _fail(path, f"stage {name!r}: an export needs a file name ending in .onnx")
    return Step(name, kind, args, sources, file, str(entry.get("notes", "")))


def _check_sources(path: Path, name: str, sources: tuple[str, ...], earlier: dict[str, Step]) -> None:
    """Refuse a source that is not in an earlier stage's folder, or not the file an export stage makes."""
    for source in sources:
        origin = source.split("/", 1)[0]
        if origin not in earlier:
            raise _fail(path, f"stage {name!r} starts from {source!r}: no earlier stage is named {origin!r}")
        if earlier[origin].kind == "export" and source != f"{origin}/{earlier[origin].file}":
            raise _fail(path, f"stage {name!r} starts from {source!r}: stage {origin!r} makes only "
                              f"{origin}/{earlier[origin].file}")


def _check_counts(path: Path, name: str, kind: str, args: tuple[str, ...], sources: tuple) -> None:
    """Refuse a step whose sources cannot make it: an average of fewer than two models, an export of none, a
    training that keeps a stage untrained (0 steps) with no weights to keep."""
    if kind == "average" and len(sources) < 2:
        raise _fail(path, f"stage {name!r}: an average needs at least two members")
    if kind == "export" and len(sources) != 1:
        raise _fail(path, f"stage {name!r}: an export needs one source")
    if kind == "train" and not sources:
        zero = [o for o in _ZERO_STEP_OPTIONS if _value(args, o) == "0"]
        if zero:
            raise _fail(path, f"stage {name!r}: {zero[0]} 0 keeps weights untrained, but it has no init_from")


def load_recipe(path: Path) -> Recipe:
    """Read and check a recipe file; HeartsegError naming the file and the stage at fault."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _fail(path, f"not a readable JSON file ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise _fail(path, "needs a list of stages")
    data = raw.get("data")
    if not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data):
        raise _fail(path, "needs 'data', a list of dataset folders")
    if not isinstance(raw.get("export"), dict):
        raise _fail(path, "needs an 'export' step")
    steps: dict[str, Step] = {}
    for entry in [*raw["stages"], {"kind": "export", **raw["export"]}]:
        step = _step(Path(path), entry, steps)
        steps[step.name] = step
    return Recipe(Path(path), tuple(data), tuple(steps.values()))


def _value(args: tuple[str, ...] | list[str], option: str) -> str | None:
    """The value given to option in args (None without it)."""
    return args[args.index(option) + 1] if option in args and args.index(option) + 1 < len(args) else None


def _expand(text: str, roots: Roots) -> str:
    return text.replace("{data}", str(roots.data)).replace("{out}", str(roots.out)).replace("{recipe}",
                                                                                          str(roots.recipe))


def _tiny_train(args: list[str], roots: Roots) -> list[str]:
    """A training's options scaled down; a fixed split becomes the first stage's own (the recipe's names real
    cases)."""
    tiny, out = roots.tiny, list(args)
    caps = {"--steps": tiny.steps, "--coarse-steps": tiny.coarse_steps}
    for option, cap in caps.items():
        if _value(out, option) is not None:
            index = out.index(option) + 1
            out[index] = str(min(int(out[index]), cap))
    for option, value in (("--val-every", tiny.val_every), ("--threads", tiny.threads),
                          ("--splits", roots.out / roots.first_train / "splits.json")):
        if _value(out, option) is not None:
            out[out.index(option) + 1] = str(value)
    return out + list(tiny.train_extra)


def _tiny_export(args: list[str], tiny: TinyOptions) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in tiny.export_dropped:
            skip = True
        elif arg not in tiny.export_dropped_flags:
            out.append(arg)
    return out


def output_of(step: Step, out: Path) -> Path:
    """The file whose presence means the step is done."""
    return out / step.name / (step.file if step.kind == "export" else "model.pt")


def command(step: Step, recipe: Recipe, roots: Roots) -> list[str]:
    """The step's command line: program name, then arguments."""
    args = [_expand(a, roots) for a in step.args]
    sources = [str(roots.out / s) for s in step.sources]
    folder = str(roots.out / step.name)
    if step.kind == "export":
        args = _tiny_export(args, roots.tiny) if roots.tiny else args
        return ["heartseg-export", sources[0], "-o", str(output_of(step, roots.out)), *args]
    data = [_expand(d, roots) for d in recipe.data]
    if step.kind == "average":
        args = args + list(roots.tiny.average_extra) if roots.tiny else args
        return ["heartseg-train", *data, "-o", folder, *[x for s in sources for x in ("--average-weights", s)], *args]
    args = _tiny_train(args, roots) if roots.tiny else args
    return ["heartseg-train", *data, "-o", folder, *[x for s in sources for x in ("--init-from", s)], *args]


def make_roots(recipe: Recipe, data: Path, out: Path, tiny: bool) -> Roots:
    """The roots a recipe's paths are written against."""
    first = next((s.name for s in recipe.steps if s.kind == "train"), "")
    return Roots(data.resolve(), out.resolve(), recipe.path.resolve().parent, TinyOptions() if tiny else None, first)


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    """sys.argv as the step's own command, which heartseg-train records in config.json and model.pt."""
    saved = sys.argv
    sys.argv = list(argv)
    try:
        yield
    finally:
        sys.argv = saved


def invoke(argv: list[str]) -> int:
    """Run heartseg-train or heartseg-export in this process; their exit code."""
    from typer.main import get_command

    if argv[0] == "heartseg-export":
        from heartseg.export.cli import app
    else:
        from heartseg.train.cli import app
    with _argv(argv):
        result = get_command(app).main(argv[1:], prog_name=argv[0], standalone_mode=False)
    return result if isinstance(result, int) else 0


def _pending(step: Step, argv: list[str], out: Path) -> list[str]:
    """The command that finishes a step that is not done: an interrupted training resumes; an interrupted
    average is started again in an emptied folder."""
    folder = out / step.name
    if step.kind == "train" and (folder / "config.json").is_file():
        return ["heartseg-train", "--resume", str(folder)]
    if step.kind == "average" and folder.is_dir():
        shutil.rmtree(folder)
    return argv


def rebuild(recipe: Recipe, roots: Roots, dry_run: bool = False, say=print) -> list[str]:
    """Run (or, dry, print) every step not yet done, in order; returns the names of the steps run."""
    if not dry_run:
        for folder in (Path(_expand(d, roots)) for d in recipe.data):
            if not folder.is_dir():
                raise HeartsegError(f"{folder}: no such dataset folder (give --data, the folder that holds it)")
        if roots.out.exists() and not roots.out.is_dir():
            raise HeartsegError(f"{roots.out}: exists and is not a folder")
    ran = []
    for index, step in enumerate(recipe.steps, 1):
        head = f"[{index}/{len(recipe.steps)}] {step.name}"
        argv = command(step, recipe, roots)
        if output_of(step, roots.out).is_file():
            say(f"{head}: done ({output_of(step, roots.out)}), skipped")
            continue
        if dry_run:
            say(f"{head}: {shlex.join(argv)}")
            continue
        argv = _pending(step, argv, roots.out)
        say(f"{head}: {shlex.join(argv)}")
        started = time.monotonic()
        code = invoke(argv)
        if code != 0:
            raise StageFailed(f"stage {step.name!r} failed (exit {code}); the same command continues from it")
        if not output_of(step, roots.out).is_file():
            raise StageFailed(f"stage {step.name!r} wrote no {output_of(step, roots.out)}")
        say(f"{head}: done in {_duration(time.monotonic() - started)}")
        ran.append(step.name)
    return ran


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def default_recipe() -> Path:
    """The shipped model's recipe (models/recipe.json)."""
    import heartseg.models

    return Path(heartseg.models.__file__).parent / "recipe.json"


app = new_app(help="Rebuild a model from its recipe: every stage in order, skipping those already done.")


@app.command()
def main_command(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe file (default: the shipped model's, models/recipe.json)."),
    data: Path = typer.Option(..., "--data", help="Folder holding the recipe's datasets (e.g. ../shared/data, with Task02_Heart/ and LA2018/)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for every stage's run (OUT/STAGE); run again to continue."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each stage's command, run nothing."),
    tiny: bool = typer.Option(False, "--tiny", help="Few steps, a small network and grid: the whole chain in about a minute on a small dataset (a check of the recipe, not a model)."),
    version: bool = version_option(),
) -> None:
    """Run the recipe's stages (heartseg-train, --average-weights, heartseg-export) in order.

    Exit codes: 0 done, 1 a stage failed, 2 bad input (an unreadable or inconsistent recipe, missing data).
    """
    from rich.console import Console

    console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
    try:
        chosen = load_recipe(recipe or default_recipe())
        roots = make_roots(chosen, data, output, tiny)
        rebuild(chosen, roots, dry_run=dry_run, say=lambda text: print(text, flush=True))
    except HeartsegError as exc:
        console.print(f"error: {exc}")
        raise typer.Exit(exc.exit_code)


def main() -> None:
    """Console entry point."""
    app(prog_name="heartseg-rebuild")


if __name__ == "__main__":
    main()
