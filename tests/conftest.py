"""Shared fixtures: the repository root, the dataset folder, and tiny ONNX test models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from onnx_models import TEST_MODEL_BIAS, build_test_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_data_dir() -> Path | None:
    """Task02_Heart from $HEARTSEG_DATA, else ../shared/data/Task02_Heart next to the repository; None if absent."""
    env = os.environ.get("HEARTSEG_DATA")
    candidate = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "Task02_Heart"
    return candidate if (candidate / "imagesTr").is_dir() else None


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The Task02_Heart folder; skips the test when the dataset is not there."""
    found = find_data_dir()
    if found is None:
        where = os.environ.get("HEARTSEG_DATA") or REPO_ROOT.parent / "shared" / "data" / "Task02_Heart"
        pytest.skip(f"Task02_Heart dataset not found at {where} (set $HEARTSEG_DATA to its folder)")
    return found


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide folder of test models."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def single_model(model_dir: Path) -> Path:
    """A one-stage pointwise heartseg model."""
    return build_test_model(model_dir / "single.onnx", bias=TEST_MODEL_BIAS)


@pytest.fixture(scope="session")
def cascade_model(model_dir: Path) -> Path:
    """A two-stage (coarse 5 mm localiser, fine stage) pointwise heartseg model."""
    return build_test_model(model_dir / "cascade.onnx", cascade=True, bias=TEST_MODEL_BIAS)


@pytest.fixture(scope="session")
def single_networks(model_dir: Path) -> Path:
    """single_model's network alone, without the pipeline graph around it (what the Python reference runs)."""
    return build_test_model(model_dir / "single-networks.onnx", bias=TEST_MODEL_BIAS, pipeline=False)


@pytest.fixture(scope="session")
def cascade_networks(model_dir: Path) -> Path:
    """cascade_model's two networks side by side, without the pipeline graph around them."""
    return build_test_model(model_dir / "cascade-networks.onnx", cascade=True, bias=TEST_MODEL_BIAS, pipeline=False)


@pytest.fixture(scope="session")
def no_contract_model(model_dir: Path) -> Path:
    """A valid ONNX file without the heartseg contract in its metadata."""
    return build_test_model(model_dir / "no_contract.onnx", with_contract=False)


@pytest.fixture(params=["single", "cascade"])
def any_model(request: pytest.FixtureRequest, single_model: Path, cascade_model: Path) -> Path:
    """Each test model in turn."""
    return single_model if request.param == "single" else cascade_model


@pytest.fixture
def run_cli():
    """Invoke a typer app in-process: run_cli(app, *args) -> typer.testing.Result (stdout and stderr apart)."""
    from typer.testing import CliRunner

    runner = CliRunner()

    def run(app, *args):
        return runner.invoke(app, [str(a) for a in args])

    return run


# --- Training and export tests (tests/test_train.py, tests/test_export.py) ---

# The tiny cascade: ~7 s on one CPU thread, held-out Dice ~0.96 on the synthetic ellipsoids.
def unwrapped(output: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(output.split())


def with_options(args: list[str], **values: str) -> list[str]:
    """Command-line args with the values of the named options replaced (coarse_steps="0": --coarse-steps 0)."""
    out = list(args)
    for name, value in values.items():
        out[out.index("--" + name.replace("_", "-")) + 1] = value
    return out


TINY_TRAIN_ARGS = ["--folds", "3", "--steps", "60", "--coarse-steps", "40", "--val-every", "30", "--width", "4",
                   "--patch", "16,16,16", "--coarse-spacing", "4", "--margin-mm", "6", "--cache", "none",
                   "--threads", "1"]


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-case synthetic MSD dataset (the last case repeats the first image); treat it as read-only."""
    from synthetic_dataset import make_msd_dataset

    return make_msd_dataset(tmp_path_factory.mktemp("synthetic") / "data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path):
    """The tiny cascade trained once per session (in-process): .data, .run (folder) and .model (run/model.pt)."""
    from types import SimpleNamespace

    from heartseg.train.cli import app
    from typer.testing import CliRunner

    run = tmp_path_factory.mktemp("trained") / "run"
    result = CliRunner().invoke(app, [str(synthetic_data), "-o", str(run), *TINY_TRAIN_ARGS])
    assert result.exit_code == 0, f"training failed ({result.exit_code}):\n{result.output}\n{result.exception!r}"
    return SimpleNamespace(data=synthetic_data, run=run, model=run / "model.pt", output=result.output)
