"""The shipped model's recipe (models/recipe.json) and heartseg-rebuild: the whole chain, scaled down (--tiny), runs on
a synthetic dataset and exports a file the runtime reads; --dry-run prints every stage with what it starts from; a
recipe naming an unknown stage or a missing start is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import REPO_ROOT, unwrapped  # noqa: E402
from heartseg.runtime.segmenter import Segmenter  # noqa: E402
from heartseg.train.checkpoint import read_model_checkpoint  # noqa: E402
from heartseg.train.recipe import app  # noqa: E402
from synthetic_dataset import make_msd_dataset  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

RECIPE = REPO_ROOT / "models" / "recipe.json"


def _steps() -> list[dict]:
    raw = json.loads(RECIPE.read_text())
    return [*raw["stages"], raw["export"]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """DATA/Task02_Heart and DATA/LA2018: two small synthetic 'sequences' under the recipe's dataset names."""
    root = tmp_path_factory.mktemp("rebuild") / "data"
    make_msd_dataset(root / "Task02_Heart", n_cases=6, prefix="a", duplicate=False)
    make_msd_dataset(root / "LA2018", n_cases=6, prefix="b", duplicate=False, seed=100, radius=(0.22, 0.28),
                     atrium=55.0, background=120.0)
    return root


@pytest.fixture(scope="module")
def rebuilt(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rebuild_out") / "out"
    result = CliRunner().invoke(app, [str(RECIPE), "--data", str(data), "-o", str(out), "--tiny"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out, result.output


@pytest.mark.slow
def test_tiny_rebuild_runs_every_stage_and_exports_a_model_the_runtime_reads(data, rebuilt):
    out, output = rebuilt
    for step in _steps():
        assert f"{step['name']}: done in" in output, step["name"]
    model = out / "export" / "heartseg-la.onnx"
    assert model.is_file()
    scan = data / "LA2018" / "imagesTr" / "b_004.nii.gz"
    prediction = Segmenter(model, device="cpu", threads=1).predict(str(scan))
    assert prediction.mask_array.shape == (32, 32, 24) and prediction.mask_array.sum() > 0
    assert prediction.report is not None


@pytest.mark.slow
def test_tiny_rebuild_joins_stages_as_the_recipe_says(rebuilt):
    out, _ = rebuilt
    joined = read_model_checkpoint(out / "stage-6" / "fold_0" / "model.pt")
    fine = read_model_checkpoint(out / "stage-5" / "fold_0" / "model.pt").networks["fine"][0].state_dict
    coarse = torch.load(out / "stage-3" / "fold_0" / "coarse" / "best.pt", map_location="cpu",
                        weights_only=True)["model"]
    assert all(torch.equal(joined.networks["fine"][0].state_dict[k], v) for k, v in fine.items())
    assert all(torch.equal(joined.networks["coarse"][0].state_dict[k], v) for k, v in coarse.items())
    # The shipped model averages two fine stages: its weights are neither member's.
    soup = read_model_checkpoint(out / "stage-11" / "model.pt").networks["fine"][0].state_dict
    members = [read_model_checkpoint(out / s / "fold_0" / "model.pt").networks["fine"][0].state_dict
               for s in ("stage-10-read-back", "stage-11a")]
    name = next(n for n, t in soup.items() if t.is_floating_point() and not torch.equal(members[0][n], members[1][n]))
    assert torch.allclose(soup[name], (members[0][name] + members[1][name]) / 2)
    # Every fine-tuning trained on the first stage's split.
    first = json.loads((out / "stage-1" / "splits.json").read_text())["folds"][0]
    assert json.loads((out / "stage-11a" / "splits.json").read_text())["folds"][0] == first


@pytest.mark.slow
def test_a_second_run_skips_every_stage_done(data, rebuilt):
    out, _ = rebuilt
    before = (out / "export" / "heartseg-la.onnx").stat().st_mtime_ns
    result = CliRunner().invoke(app, [str(RECIPE), "--data", str(data), "-o", str(out), "--tiny"])
    assert result.exit_code == 0, result.output
    assert result.output.count("skipped") == len(_steps()) and "done in" not in result.output
    assert (out / "export" / "heartseg-la.onnx").stat().st_mtime_ns == before


def test_dry_run_prints_every_stage_with_what_it_starts_from(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(RECIPE), "--data", "/data", "-o", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("[")]
    steps = _steps()
    assert len(lines) == len(steps) == 20
    for line, step in zip(lines, steps):
        assert f"] {step['name']}: heartseg-" in line
        option = {"train": "--init-from", "average": "--average-weights"}.get(step["kind"])
        sources = step.get("init_from") or step.get("members") or ([step["source"]] if "source" in step else [])
        for source in sources:
            assert (f"{option} {out}/{source}" if option else f"heartseg-export {out}/{source}") in line, line
    by_name = dict(zip((s["name"] for s in steps), lines))
    assert "--init-from" not in by_name["stage-1"] and "-o " + str(out / "stage-1") in by_name["stage-1"]
    assert (f"--init-from {out}/stage-5/fold_0/model.pt --init-from {out}/stage-3/fold_0/coarse/best.pt"
            in by_name["stage-6"])
    assert f"--init-from {out}/stage-10-export/heartseg-la.onnx" in by_name["stage-10-read-back"]
    assert "/data/Task02_Heart /data/LA2018" in by_name["stage-10"]
    assert f"--splits {RECIPE.parent}/training/splits.json" in by_name["stage-10"]
    assert "--dark-pool-prob 0.25 --seed 2" in by_name["stage-10"]
    assert not out.exists()


def _broken(tmp_path: Path, change) -> Path:
    raw = json.loads(RECIPE.read_text())
    change(raw["stages"])
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    return path


def _unknown_stage(stages: list[dict]) -> None:
    stages[1]["init_from"] = ["stage-0/fold_0/model.pt"]


def _missing_init(stages: list[dict]) -> None:
    del stages[5]["init_from"]  # stage 6: --steps 0 --coarse-steps 0, nothing to keep


def _later_stage(stages: list[dict]) -> None:
    stages[1]["init_from"] = ["stage-3/fold_0/model.pt"]


@pytest.mark.parametrize("change, message", [
    (_unknown_stage, "stage 'stage-2' starts from 'stage-0/fold_0/model.pt': no earlier stage is named 'stage-0'"),
    (_later_stage, "stage 'stage-2' starts from 'stage-3/fold_0/model.pt': no earlier stage is named 'stage-3'"),
    (_missing_init, "stage 'stage-6': --steps 0 keeps weights untrained, but it has no init_from"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_recipe_naming_an_unknown_stage_or_a_missing_start_is_refused(tmp_path, change, message, dry_run):
    path = _broken(tmp_path, change)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(path), "--data", str(tmp_path), "-o", str(out),
                                      *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 2, result.output
    assert unwrapped(result.output) == f"error: recipe {path}: {message}"
    assert "Traceback" not in result.output and not out.exists()


def test_the_recipe_copies_every_stage_record():
    """Each training stage's options are the ones its record's command gave (paths aside)."""
    from heartseg.train.recipe import load_recipe

    records = REPO_ROOT / "models" / "training"
    for step in load_recipe(RECIPE).steps:
        if step.kind != "train":
            continue
        config = json.loads((RECIPE.parent / _record(step.name)).read_text())
        record = config["command"].split()
        given = {o: record[record.index(o) + 1] for o in record if o.startswith("--") and o not in
                 ("--init-from", "--splits")}
        # Stage 1's config.json was edited before it resumed (its notes say how): the steps it ran.
        given["--steps"] = str(config["fine"]["steps"])
        ours = {o: step.args[step.args.index(o) + 1] for o in step.args if o.startswith("--") and o != "--splits"}
        assert ours == given, step.name
        assert ("--splits" in step.args) == ("--splits" in record), step.name
    assert records.is_dir()


def _record(name: str) -> str:
    raw = {s["name"]: s for s in json.loads(RECIPE.read_text())["stages"]}
    return raw[name]["record"]


def test_a_missing_dataset_folder_is_refused_before_any_stage(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(RECIPE), "--data", str(tmp_path / "nowhere"), "-o", str(out)])
    assert result.exit_code == 2 and "no such dataset folder" in unwrapped(result.output), result.output
    assert not out.exists()


@pytest.mark.slow
def test_an_interrupted_training_resumes_and_the_stages_after_it_run(data, rebuilt):
    out, _ = rebuilt
    for path in (out / "stage-11a" / "model.pt", out / "stage-11a" / "fold_0" / "model.pt"):
        path.unlink()
    shutil.rmtree(out / "stage-11")
    shutil.rmtree(out / "export")
    result = CliRunner().invoke(app, [str(RECIPE), "--data", str(data), "-o", str(out), "--tiny"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert f"stage-11a: heartseg-train --resume {out / 'stage-11a'}" in result.output
    assert result.output.count("skipped") == len(_steps()) - 3
    assert (out / "export" / "heartseg-la.onnx").is_file()


@pytest.mark.parametrize("option", ["-h", "--version"])
def test_short_help_and_version(option):
    from heartseg.runtime import __version__

    result = CliRunner().invoke(app, [option])
    assert result.exit_code == 0
    assert ("Usage" in result.output) if option == "-h" else result.output.strip() == f"heartseg {__version__}"
