"""The command blocks of README.md and docs/*.md run as they say.

Every fenced block in sh, bash, shell, console or python is preceded by a marker (an HTML comment, so
it does not show on the rendered page) that says what running it gives:

    <!-- test: exit 0 -->                      every command of the block exits 0
    <!-- test: exit 2 -->                      every command exits 2 (a documented refusal)
    <!-- test: exit 0; needs jq -->            as above; skipped when a program it pipes into is missing
    <!-- test: not run: needs the datasets --> never run, with the reason

A document's blocks run in order in one fresh folder that holds the files they name: examples/ (the
bundled example scan and label), scan.nii.gz and label.nii.gz (copies of them), scans/ and labels/ (a
folder of one scan and its label), scan.nrrd and scan.mha (the example in NRRD and MetaImage),
series/ (the example as a DICOM series), series.zip (that series zipped) and study/ (two series,
numbers 3 and 4). Each shell command (a line, with its backslash continuations) runs in bash with
pipefail and the test interpreter's bin folder first on PATH, under a timeout; a python block runs as
one script.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SCAN = REPO_ROOT / "examples" / "la_029_crop.nii.gz"
EXAMPLE_LABEL = REPO_ROOT / "examples" / "la_029_crop_label.nii.gz"
COMMAND_LANGUAGES = {"sh", "bash", "shell", "console", "python"}
COMMAND_TIMEOUT_S = 300

FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*test:\s*(?P<spec>.*?)\s*-->\s*$")
RUN_SPEC = re.compile(r"^exit (?P<code>\d+)(?:;\s*needs (?P<needs>[\w.+-]+(?:\s*,\s*[\w.+-]+)*))?$")
NOT_RUN_SPEC = re.compile(r"^not run:\s*(?P<reason>\S.*)$")


def documents() -> list[Path]:
    """README.md and every page under docs/."""
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, its text, the line its fence opens on, and its marker's text."""

    language: str
    body: str
    line: int
    marker: str | None


@dataclass(frozen=True)
class Expectation:
    """What a marker says: run (each command exits exit_code; needs: programs it pipes into) or not, and why."""

    run: bool
    exit_code: int = 0
    needs: tuple[str, ...] = ()
    reason: str = ""


def parse_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, each with the marker on the last non-blank line before it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        previous = next((lines[k].strip() for k in range(index - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(previous)
        end = index + 1
        while end < len(lines) and lines[end].strip() != opening.group(1):
            end += 1
        blocks.append(Block(opening.group(2).lower(), "\n".join(lines[index + 1:end]), index + 1,
                            marker.group("spec") if marker else None))
        index = end + 1
    return blocks


def parse_marker(spec: str) -> Expectation:
    """The expectation a marker's text states; ValueError when it states none."""
    run = RUN_SPEC.match(spec)
    if run:
        needs = tuple(name.strip() for name in (run.group("needs") or "").split(",") if name.strip())
        return Expectation(True, int(run.group("code")), needs)
    not_run = NOT_RUN_SPEC.match(spec)
    if not_run:
        return Expectation(False, reason=not_run.group("reason"))
    raise ValueError(f"marker '{spec}' is neither 'exit N[; needs PROGRAM]' nor 'not run: REASON'")


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: one a line, backslash continuations joined, comment lines dropped."""
    commands, current = [], ""
    for line in body.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        commands.append(current.strip())
        current = ""
    if current:
        commands.append(current.strip())
    return commands


def command_environment() -> dict[str, str]:
    """The environment commands run in: this interpreter's bin folder (the venv's CLIs) first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), "COLUMNS": "120",
            "MPLBACKEND": "Agg"}


def run_command(argv: list[str], workdir: Path, stdin: str | None = None) -> tuple[int | None, str]:
    """Run one command in workdir: (exit code, or None on timeout; the tail of its output)."""
    try:
        done = subprocess.run(argv, cwd=workdir, env=command_environment(), input=stdin, capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT_S,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {COMMAND_TIMEOUT_S} s"
    return done.returncode, (done.stdout + done.stderr)[-1500:]


def block_problems(doc: Path, block: Block, workdir: Path | None) -> list[str]:
    """What is wrong with one block: no marker, a bad marker or, when workdir is given, a command that
    exits otherwise than its marker says."""
    where = f"{doc.name}:{block.line}"
    if block.marker is None:
        return [f"{where}: {block.language} block without a '<!-- test: ... -->' marker"]
    try:
        expectation = parse_marker(block.marker)
    except ValueError as error:
        return [f"{where}: {error}"]
    missing = [name for name in expectation.needs if shutil.which(name) is None]
    if workdir is None or not expectation.run or missing:
        return []
    if block.language == "python":
        runs = [("python block", [sys.executable, "-"], block.body)]
    else:
        runs = [(command, ["bash", "-o", "pipefail", "-c", command], None) for command in shell_commands(block.body)]
    problems = []
    for shown, argv, stdin in runs:
        code, output = run_command(argv, workdir, stdin)
        if code != expectation.exit_code:
            problems.append(f"{where}: `{shown}` exited {code}, the document says {expectation.exit_code}\n{output}")
    return problems


def document_problems(doc: Path, workdir: Path | None = None) -> list[str]:
    """Every block of a document that is unmarked, badly marked, or (with workdir) runs otherwise than marked."""
    problems = []
    for block in parse_blocks(doc.read_text()):
        if block.language in COMMAND_LANGUAGES:
            problems += block_problems(doc, block, workdir)
    return problems


@pytest.fixture(scope="session")
def workdir_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the documents' commands name, written once (see the module docstring)."""
    from scan_formats import write_dicom_series, write_mha, write_nrrd, zip_folder

    root = tmp_path_factory.mktemp("docs-workdir")
    (root / "examples").mkdir()
    for source in (EXAMPLE_SCAN, EXAMPLE_LABEL):
        shutil.copy(source, root / "examples" / source.name)
    shutil.copy(EXAMPLE_SCAN, root / "scan.nii.gz")
    shutil.copy(EXAMPLE_LABEL, root / "label.nii.gz")
    for folder, source in (("scans", EXAMPLE_SCAN), ("labels", EXAMPLE_LABEL)):
        (root / folder).mkdir()
        shutil.copy(source, root / folder / "la_029_crop.nii.gz")
    image = nib.load(str(EXAMPLE_SCAN))
    data, affine = np.asarray(image.dataobj), image.affine
    write_nrrd(data, affine, root / "scan.nrrd")
    write_mha(data, affine, root / "scan.mha")
    write_dicom_series(data, affine, root / "series")
    zip_folder(root / "series", root / "series.zip")
    for series_number in (3, 4):
        write_dicom_series(data, affine, root / "study" / f"s{series_number}", series_number=series_number,
                           study_uid="1.2.826.0.1.3680043.8.498.1", seed=series_number)
    return root


@pytest.mark.parametrize("doc", documents(), ids=lambda path: path.name)
def test_every_command_block_is_marked(doc: Path) -> None:
    blocks = [block for block in parse_blocks(doc.read_text()) if block.language in COMMAND_LANGUAGES]
    assert blocks or doc.name != "README.md", "README.md shows no command"
    problems = document_problems(doc)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("doc", documents(), ids=lambda path: path.name)
def test_documented_commands_exit_as_documented(doc: Path, workdir_template: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    shutil.copytree(workdir_template, workdir)
    problems = document_problems(doc, workdir)
    assert not problems, "\n\n".join(problems)


def test_docs_pages_are_linked_and_links_resolve() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for page in documents()[1:]:
        assert f"](docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    for doc in documents():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not target.startswith("mailto:"):
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def write_doc(path: Path, blocks: list[tuple[str, str, str]]) -> Path:
    """A Markdown file of (marker text or '', language, body) blocks."""
    parts = []
    for spec, language, body in blocks:
        if spec:
            parts.append(f"<!-- test: {spec} -->")
        parts.append(f"```{language}\n{body}\n```\n")
    path.write_text("Some text.\n\n" + "\n".join(parts))
    return path


def test_a_wrong_exit_code_fails(tmp_path: Path) -> None:
    """The check can fail: a command whose documented exit code is not the one it gives is reported."""
    doc = write_doc(tmp_path / "page.md", [
        ("exit 0", "sh", "heartseg-infer --version"),
        ("exit 0", "sh", "heartseg-infer missing.nii.gz -o out/   # a scan that is not there: exit 2"),
        ("exit 2", "sh", "heartseg-eval --version"),
        ("exit 1", "python", "import sys\nsys.exit(1)"),
        ("not run: needs a cluster", "sh", "false"),
    ])
    problems = document_problems(doc, tmp_path)
    assert len(problems) == 2, "\n".join(problems)
    assert "page.md:9: `heartseg-infer missing.nii.gz -o out/" in problems[0] and "exited 2" in problems[0]
    assert "says 0" in problems[0]
    assert "heartseg-eval --version` exited 0, the document says 2" in problems[1]


def test_unmarked_and_badly_marked_blocks_fail(tmp_path: Path) -> None:
    doc = write_doc(tmp_path / "page.md", [
        ("", "sh", "heartseg-infer --version"),
        ("not run:", "console", "true"),
        ("exit zero", "python", "pass"),
        ("", "text", "not a command block"),
    ])
    problems = document_problems(doc)
    assert len(problems) == 3, "\n".join(problems)
    assert "without a '<!-- test: ... -->' marker" in problems[0]
    assert all("neither" in problem for problem in problems[1:])


def test_shell_commands_join_continuations_and_skip_comments() -> None:
    body = "# a comment\nheartseg-infer a.nii.gz \\\n    --overlay   # inline\n\nheartseg-eval p/ g/"
    assert shell_commands(body) == ["heartseg-infer a.nii.gz      --overlay   # inline", "heartseg-eval p/ g/"]


def test_needs_skips_a_block_whose_program_is_missing(tmp_path: Path) -> None:
    doc = write_doc(tmp_path / "page.md", [("exit 0; needs no-such-program-here", "sh", "no-such-program-here")])
    assert document_problems(doc, tmp_path) == []


def test_the_readme_qc_table_names_every_rule() -> None:
    """Each of QC's rules has a row in the README's QC table, and the table names no rule that does not exist."""
    from heartseg.runtime.qc import RULES

    text = (REPO_ROOT / "README.md").read_text()
    table = text[text.index("## QC: which masks to look at"):]
    table = table[:table.index("\n## ")]
    named = set(re.findall(r"`([a-z_]+)`", table))
    rules = {rule.__name__ for rule in RULES}
    assert rules <= named, sorted(rules - named)
    assert {n for n in named if n.startswith(("untrained_", "implausible_", "cut_by_", "low_"))} <= rules
