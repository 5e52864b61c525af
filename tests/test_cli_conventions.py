"""The everyday cases that used to trip a new user, one test each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_bench import app as bench_app
from heartseg.runtime.cli_eval import app as eval_app
from heartseg.runtime.cli_infer import app as infer_app
from onnx_models import make_scan


def test_no_output_option_writes_beside_the_scan(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "scans" / "scan.nii.gz")
    result = run_cli(infer_app, scan, "--model", single_model, "--threads", 1)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "scans" / "scan_mask.nii.gz").is_file()


def test_output_file_name_for_one_scan(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "scan.nii.gz")
    result = run_cli(infer_app, scan, "-o", tmp_path / "res" / "out.nii.gz", "--model", single_model, "--save-prob")
    assert result.exit_code == 0, result.output
    written = tmp_path / "res" / "out.nii.gz"
    assert written.is_file() and not written.is_dir()
    assert nib.load(str(written)).shape == nib.load(str(scan)).shape
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["out.nii.gz", "out_prob.nii.gz"]


def test_json_dash_is_stdout(tmp_path: Path, single_model: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    scan, _ = make_scan(tmp_path / "in" / "scan.nii.gz")
    result = run_cli(infer_app, scan, "-o", tmp_path / "out", "--model", single_model, "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout holds the report only; the table went to stderr
    assert report["scans"][0]["status"] == "ok"
    assert "heartseg-infer" in result.stderr
    assert not (tmp_path / "-").exists()


def test_csv_dash_is_a_cohort_table(tmp_path: Path, single_model: Path, run_cli) -> None:
    pytest.importorskip("skimage", reason="scikit-image is not installed (pip install 'heartseg[mesh]')")
    for i, name in enumerate(("a", "b")):
        make_scan(tmp_path / "in" / f"{name}.nii.gz", seed=i)
    result = run_cli(infer_app, tmp_path / "in", "-o", tmp_path / "out", "--model", single_model, "--csv", "-")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("name,scan,series,status,mask,qc,volume_ml,surface_area_cm2,sphericity")
    assert [line.split(",")[0] for line in lines[1:]] == ["a", "b"]


def test_ensemble_is_the_shipped_ensemble_and_refuses_another_model(tmp_path: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "scan.nii.gz")
    result = run_cli(infer_app, scan, "-o", tmp_path / "ens", "--ensemble", "--threads", 1, "--json", "-")
    assert result.exit_code in (0, 3), result.output
    report = json.loads(result.stdout)
    assert Path(report["model"]).name == "heartseg-la.ensemble.onnx"
    result = run_cli(infer_app, scan, "-o", tmp_path / "out", "--ensemble", "--model", "fp32")
    assert result.exit_code == 2 and "without --model" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", ["int8", "fp16", "fp32", "ensemble"])
def test_model_variant_by_name(tmp_path: Path, run_cli, variant: str) -> None:
    scan, _ = make_scan(tmp_path / "in" / "scan.nii.gz")
    result = run_cli(infer_app, scan, "-o", tmp_path / "out", "--model", variant, "--threads", 1, "--json", "-")
    assert result.exit_code in (0, 3), result.output  # a synthetic blob may be flagged by the real model's QC
    expected = {"fp32": "heartseg-la.onnx", "fp16": "heartseg-la.fp16.onnx", "int8": "heartseg-la.int8.onnx",
                "ensemble": "heartseg-la.ensemble.onnx"}
    assert Path(json.loads(result.stdout)["model"]).name == expected[variant]


def test_device_gpu_is_cuda(tmp_path: Path, single_model: Path, run_cli) -> None:
    import onnxruntime as ort

    scan, _ = make_scan(tmp_path / "in" / "scan.nii.gz")
    result = run_cli(infer_app, scan, "-o", tmp_path / "out", "--model", single_model, "--device", "gpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert result.exit_code == 0 and "cuda" in result.stdout
    else:  # the same one-line refusal as --device cuda, not an unknown choice
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "no CUDA provider" in lines[0], result.output


def _apps():
    from heartseg.export.cli import app as export_app
    from heartseg.train.cli import app as train_app

    return {"heartseg-infer": infer_app, "heartseg-eval": eval_app, "heartseg-bench": bench_app,
            "heartseg-train": train_app, "heartseg-export": export_app}


@pytest.mark.parametrize("tool", ["heartseg-infer", "heartseg-eval", "heartseg-bench", "heartseg-train",
                                  "heartseg-export"])
def test_short_help_and_version_everywhere(run_cli, tool: str) -> None:
    from heartseg.runtime import __version__

    app = _apps()[tool]
    short, long = run_cli(app, "-h"), run_cli(app, "--help")
    assert short.exit_code == 0 and short.stdout == long.stdout and "Usage" in short.stdout
    version = run_cli(app, "--version")
    assert version.exit_code == 0 and version.stdout.strip() == f"heartseg {__version__}"


def test_install_hint_keeps_its_brackets(tmp_path: Path) -> None:
    """Without PyTorch, heartseg-train says pip install 'heartseg[train]' (not 'heartseg')."""
    code = ("import sys; sys.modules['torch'] = None; from typer.testing import CliRunner; "
            "from heartseg.train.cli import app; "
            f"r = CliRunner().invoke(app, [{str(tmp_path)!r}, '-o', {str(tmp_path / 'run')!r}]); "
            "print(r.exit_code); print(r.output)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[0] == "2", proc.stdout + proc.stderr
    assert "heartseg[train]" in proc.stdout, proc.stdout


def test_brackets_in_file_names_stay_in_the_table(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "case[1].nii.gz")
    result = run_cli(infer_app, scan, "-o", tmp_path / "out", "--model", single_model)
    assert result.exit_code == 0, result.output
    assert "case[1]" in result.stdout
    assert (tmp_path / "out" / "case[1]_mask.nii.gz").is_file()


def test_nnunet_channel_names_pair_with_labels(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, label = make_scan(tmp_path / "imagesTs" / "case_0000.nii.gz")
    labels = tmp_path / "labelsTs"
    labels.mkdir()
    label.rename(labels / "case.nii.gz")
    result = run_cli(infer_app, tmp_path / "imagesTs", "-o", tmp_path / "pred", "--model", single_model,
                     "--labels", labels, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["scans"][0]["metrics"]["dice"] > 0.85
    evaluated = run_cli(eval_app, tmp_path / "pred", labels, "--json", tmp_path / "e.json")
    assert evaluated.exit_code == 0, evaluated.output
    cases = json.loads((tmp_path / "e.json").read_text())["cases"]
    assert [c["case"] for c in cases] == ["case"]


def test_dataset_of_symlinks_is_accepted(tmp_path: Path) -> None:
    from heartseg.train.dataset import read_dataset
    from synthetic_dataset import make_msd_dataset

    store = make_msd_dataset(tmp_path / "store", n_cases=3, shape=(16, 16, 16))
    root = tmp_path / "linked"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for path in sorted((store / sub).iterdir()):
            (root / sub / path.name).symlink_to(path)
    (root / "dataset.json").write_text((store / "dataset.json").read_text())
    info = read_dataset(root)
    assert [c.case_id for c in info.cases] == [c.case_id for c in read_dataset(store).cases]
    assert all(np.array_equal(np.asarray(nib.load(str(c.image)).dataobj),
                              np.asarray(nib.load(str(store / "imagesTr" / c.image.name)).dataobj))
               for c in info.cases)
