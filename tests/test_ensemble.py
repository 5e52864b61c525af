"""Fold models averaged into one model (heartseg-train --ensemble-of): calibrated on cases none of them saw,
stored with every member, exported to one ONNX file that averages their probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_TRAIN_ARGS, unwrapped, with_options  # noqa: E402
from heartseg.export.cli import app as export_app  # noqa: E402
from heartseg.export.model_file import load_trained_model  # noqa: E402
from heartseg.export.pipeline_file import networks_file  # noqa: E402
from heartseg.runtime.segmenter import Segmenter  # noqa: E402
from heartseg.runtime.session import OnnxSession, read_contract  # noqa: E402
from heartseg.train.checkpoint import read_model_checkpoint  # noqa: E402
from heartseg.train.cli import app  # noqa: E402
from heartseg.train.unet import count_flops_per_voxel  # noqa: E402
from synthetic_dataset import make_msd_dataset  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

TEST_CASES = ["a_004", "a_005", "b_004", "b_005"]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two fold models fine-tuned on sub-folds of the cases outside TEST_CASES from one base model (validated on
    TEST_CASES), each keeping the base's localiser (--coarse-steps 0), as the shipped ensemble's were made."""
    root = tmp_path_factory.mktemp("ens")
    data = [make_msd_dataset(root / "seqA", n_cases=6, prefix="a", duplicate=False),
            make_msd_dataset(root / "seqB", n_cases=6, prefix="b", duplicate=False, seed=100,
                             radius=(0.22, 0.28), atrium=55.0, background=120.0)]
    pool = [f"{p}_{i:03d}" for p in "ab" for i in range(4)]
    base_splits, splits = root / "base_splits.json", root / "splits.json"
    base_splits.write_text(json.dumps({"seed": 0, "folds": [{"fold": 0, "train": pool, "val": TEST_CASES}]}))
    base = root / "base"
    result = CliRunner().invoke(app, [*map(str, data), "-o", str(base), "--splits", str(base_splits),
                                      *TINY_TRAIN_ARGS])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    halves = [[c for c in pool if int(c[-1]) < 2], [c for c in pool if int(c[-1]) >= 2]]
    splits.write_text(json.dumps({"seed": 0, "folds": [
        {"fold": k, "train": halves[1 - k], "val": halves[k]} for k in (0, 1)]}))
    run = root / "run"
    result = CliRunner().invoke(app, [*map(str, data), "-o", str(run), "--splits", str(splits), "--fold", "all",
                                      "--init-from", str(base / "model.pt"),
                                      *with_options(TINY_TRAIN_ARGS, coarse_steps="0")])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return data, [run / "fold_0" / "model.pt", run / "fold_1" / "model.pt"]


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory):
    data, paths = members
    out = tmp_path_factory.mktemp("ens_out") / "ensemble"
    result = CliRunner().invoke(app, [*map(str, data), "-o", str(out), "--ensemble-of", str(paths[0]),
                                      "--ensemble-of", str(paths[1]), "--threads", "1", "--cache", "none"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out, result.output


def test_ensemble_is_calibrated_and_scored_on_the_cases_no_member_trained_on(ensemble):
    out, output = ensemble
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["val_cases"]) == TEST_CASES
    assert sorted(metrics["per_case"]) == TEST_CASES
    assert set(metrics["per_dataset"]) == {"seqA", "seqB"}
    assert metrics["mean"]["dice"] == pytest.approx(np.mean([m["dice"] for m in metrics["per_case"].values()]))
    assert metrics["score_calibration"]["cases"] == 4 and metrics["init_untraced"] == []
    assert "calibrating on the 4 none of them saw" in unwrapped(output)


def test_ensemble_keeps_every_distinct_member_network_once(ensemble):
    out, _ = ensemble
    checkpoint = read_model_checkpoint(out / "model.pt")
    # The members kept the base's localiser: it runs once; their fine stages differ and both run.
    assert [len(checkpoint.networks[s]) for s in ("coarse", "fine")] == [1, 2]
    assert checkpoint.contract.info["members"] == "2" and checkpoint.contract.info["fold"] == "ensemble"
    assert checkpoint.contract.score_calibration is not None and checkpoint.contract.plausibility is not None
    assert torch.load(out / "model.pt", map_location="cpu", weights_only=True)["version"] == 2


def test_ensemble_network_averages_its_members_probabilities(members, ensemble):
    _, paths = members
    out, _ = ensemble
    model = load_trained_model(out / "model.pt")
    singles = [load_trained_model(p) for p in paths]
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, 16, 16, 16)).astype(np.float32))
    with torch.no_grad():
        got = torch.sigmoid(model.networks["fine"](x))
        want = torch.stack([torch.sigmoid(s.networks["fine"](x)) for s in singles]).mean(0)
        # Saturated members (logits of +-40) still average to a finite logit.
        extreme = model.networks["fine"].__class__([_Constant(40.0), _Constant(-40.0)])(x)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.isfinite(extreme).all() and torch.allclose(torch.sigmoid(extreme), torch.tensor(0.5))
    assert model.members == {"coarse": 1, "fine": 2}


def test_ensemble_exports_to_one_onnx_file_the_runtime_reads(members, ensemble, tmp_path):
    import nibabel as nib

    data, paths = members
    out, _ = ensemble
    scan = data[0] / "imagesTr" / "a_004.nii.gz"
    onnx_path = tmp_path / "ensemble.onnx"
    result = CliRunner().invoke(export_app, [str(out / "model.pt"), "-o", str(onnx_path), "--scan", str(scan)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    segmenter = Segmenter(onnx_path, device="cpu", threads=1)
    assert segmenter.contract.info["members"] == "2"
    prediction = segmenter.predict(str(scan))
    assert prediction.mask.shape == nib.load(scan).shape and prediction.report is not None
    # The file's fine stage is the mean of the members' probabilities.
    x = np.random.default_rng(1).normal(size=(1, 1, 16, 16, 16)).astype(np.float32)
    singles = [load_trained_model(p) for p in paths]
    with torch.no_grad():
        want = np.mean([torch.sigmoid(s.networks["fine"](torch.from_numpy(x))).numpy() for s in singles], axis=0)
    # (The file is one pipeline graph: its networks are taken back out of it to run one stage.)
    with networks_file(onnx_path) as networks:
        fine = OnnxSession(networks, device="cpu", threads=1).predict("fine", x)
    assert np.allclose(fine, want, atol=1e-4)
    # Each member network costs its FLOPs: the fine stage's count is twice one network's.
    flops = json.loads(read_contract(onnx_path)[1]["heartseg.flops_per_voxel"])
    assert flops["fine"] == 2 * count_flops_per_voxel(singles[0].unets["fine"])
    assert flops["coarse"] == count_flops_per_voxel(singles[0].unets["coarse"])
    # Its networks cannot start a training: refused with a message, as the ensemble's model.pt is.
    refused = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "tuned"),
                                       *with_options(TINY_TRAIN_ARGS, coarse_steps="0"),
                                       "--init-from", str(onnx_path)])
    text = unwrapped(refused.output)
    assert refused.exit_code == 2 and isinstance(refused.exception, SystemExit), (text, refused.exception)
    assert "stage 'fine' is an ensemble of several networks" in text and "Traceback" not in text, text


def test_an_ensemble_without_the_members_training_data_is_refused(members, tmp_path):
    data, paths = members
    result = CliRunner().invoke(app, [str(data[0]), "-o", str(tmp_path / "x"), "--ensemble-of", str(paths[0]),
                                      "--ensemble-of", str(paths[1]), "--cache", "none"])
    assert result.exit_code == 2, result.output
    assert "the given datasets lack" in unwrapped(result.output) and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_an_ensemble_with_no_case_left_that_its_members_never_saw_is_refused(members, tmp_path):
    _, paths = members
    seen = [make_msd_dataset(tmp_path / "seqA", n_cases=4, prefix="a", duplicate=False),
            make_msd_dataset(tmp_path / "seqB", n_cases=4, prefix="b", duplicate=False, seed=100)]
    result = CliRunner().invoke(app, [*map(str, seen), "-o", str(tmp_path / "x"), "--ensemble-of", str(paths[0]),
                                      "--ensemble-of", str(paths[1]), "--cache", "none"])
    assert result.exit_code == 2, result.output
    assert "none of its members saw" in unwrapped(result.output) and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_an_ensemble_of_one_model_or_an_ensemble_as_a_start_is_refused(members, ensemble, tmp_path):
    data, paths = members
    out, _ = ensemble
    one = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "x"), "--ensemble-of", str(paths[0])])
    assert one.exit_code == 2 and "at least two" in unwrapped(one.output), one.output
    twice = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "x"), "--ensemble-of", str(paths[0]),
                                     "--ensemble-of", str(paths[0])])
    assert twice.exit_code == 2 and "given twice" in unwrapped(twice.output), twice.output
    start = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "y"), "--init-from",
                                     str(out / "model.pt"), *TINY_TRAIN_ARGS])
    assert start.exit_code == 2 and "cannot start a training" in unwrapped(start.output), start.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_members_of_an_older_contract_format_share_the_plan_and_other_spacing_does_not(members):
    from dataclasses import replace

    from heartseg.train.ensemble import _plan_of

    checkpoint = read_model_checkpoint(members[1][0])
    older = replace(checkpoint, contract=replace(checkpoint.contract, format_version=5))
    assert _plan_of(older) == _plan_of(checkpoint)
    stages = list(checkpoint.contract.stages)
    stages[-1] = replace(stages[-1], spacing=tuple(2 * s for s in stages[-1].spacing))
    coarser = replace(checkpoint, contract=replace(checkpoint.contract, stages=tuple(stages)))
    assert _plan_of(coarser) != _plan_of(checkpoint)


def test_training_options_beside_ensemble_of_are_refused(members, tmp_path):
    data, paths = members
    result = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "x"), "--ensemble-of", str(paths[0]),
                                      "--ensemble-of", str(paths[1]), "--steps", "10", "--device", "cpu"])
    assert result.exit_code == 2 and "--steps does not apply" in unwrapped(result.output), result.output
    bad_device = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "x"), "--ensemble-of",
                                          str(paths[0]), "--ensemble-of", str(paths[1]), "--device", "gpu"])
    assert bad_device.exit_code == 2 and "--device 'gpu'" in unwrapped(bad_device.output), bad_device.output
    assert not (tmp_path / "x").exists()


class _Constant(torch.nn.Module):
    """A 'network' answering one logit everywhere."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.full_like(image, self.value)
