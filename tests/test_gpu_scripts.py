"""models/training/gpu/, run on the CPU at a tiny size: pack a fold's fine-stage grids, train the fine stage from the
pack for a fixed time, give the weights a run folder that --init-from reads, and compare PyTorch with the ONNX file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from conftest import REPO_ROOT, TINY_TRAIN_ARGS  # noqa: E402
from heartseg.export.cli import app as export_app  # noqa: E402
from heartseg.train.checkpoint import read_model_checkpoint  # noqa: E402
from heartseg.train.cli import app  # noqa: E402
from synthetic_dataset import make_msd_dataset  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

SCRIPTS = REPO_ROOT / "models" / "training" / "gpu"
VAL = ["a_004", "a_005", "b_004", "b_005"]
TRAIN = [f"{p}_{i:03d}" for p in "ab" for i in range(4)]


def _script(name: str, *args) -> str:
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{name}: {result.stdout}\n{result.stderr}"
    return result.stdout


def _train(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


@pytest.mark.slow
def test_packed_training_comes_back_as_a_stage_and_matches_its_onnx_file(tmp_path):
    data = [make_msd_dataset(tmp_path / "seqA", n_cases=6, prefix="a", duplicate=False),
            make_msd_dataset(tmp_path / "seqB", n_cases=6, prefix="b", duplicate=False, seed=100,
                             radius=(0.22, 0.28), atrium=55.0, background=120.0)]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"seed": 0, "folds": [{"fold": 0, "train": TRAIN, "val": VAL}]}))
    base = tmp_path / "base"
    _train(*data, "-o", base, "--splits", splits, *TINY_TRAIN_ARGS)

    pack = tmp_path / "pack.npz.xz"
    assert f"{len(TRAIN)} cases" in _script("pack.py", "--run-config", base / "config.json", "--out", pack)
    _script("train_packed.py", "--pack", pack, "--out", tmp_path / "A", "--seconds", "1", "--init-from",
            base / "model.pt", "--batch-size", "2", "--workers", "0", "--probe-steps", "4", "--device", "cpu")
    record = json.loads((tmp_path / "A" / "run.json").read_text())
    assert record["steps"] >= 100 and sorted(record["train_cases"]) == sorted(TRAIN) and record["device"] == "cpu"

    _script("as_run.py", "--weights", tmp_path / "A" / "fine.pt", "--record", tmp_path / "A" / "run.json",
            "--run-config", base / "config.json", "--init-from", base / "model.pt", "-o", tmp_path / "gpu-run")
    joined = tmp_path / "joined"
    _train(*data, "-o", joined, "--splits", splits, "--init-from", tmp_path / "gpu-run" / "fold_0" / "fine" / "best.pt",
           "--init-from", base / "fold_0" / "coarse" / "best.pt", "--steps", "0", "--coarse-steps", "0",
           *TINY_TRAIN_ARGS[TINY_TRAIN_ARGS.index("--val-every"):])
    trained = torch.load(tmp_path / "A" / "fine.pt", map_location="cpu", weights_only=True)["model"]
    kept = read_model_checkpoint(joined / "model.pt").networks["fine"][0].state_dict
    assert all(torch.equal(kept[k], v) for k, v in trained.items())

    onnx_path = tmp_path / "joined.onnx"
    result = CliRunner().invoke(export_app, [str(joined / "model.pt"), "-o", str(onnx_path)])
    assert result.exit_code == 0, result.output
    scan = data[1] / "imagesTr" / "b_004.nii.gz"
    _script("cuda_parity.py", "--model", joined / "model.pt", "--onnx", onnx_path, "--scan", scan,
            "--out", tmp_path / "parity.json", "--device", "cpu")
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert isinstance(parity["fp32"], list) and all(row["ok"] for row in parity["fp32"])
    assert parity["b_004.nii.gz"]["fp32"]["mask_dice_vs_onnx"] > 0.99
