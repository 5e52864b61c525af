"""An exported model file as training's starting point (heartseg-train --init-from MODEL.onnx): every stage's
weights read back from the file, checked against ONNX Runtime, and a run started from them scoring as the
model.pt it was exported from.

Reuses the tiny cascade trained once per session by `trained_run` (tests/conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the training side needs PyTorch: pip install -e '.[train]'")

from conftest import TINY_TRAIN_ARGS, unwrapped, with_options  # noqa: E402
from heartseg.export.cli import app as export_app  # noqa: E402
from heartseg.runtime.errors import HeartsegError  # noqa: E402
from heartseg.train import onnx_import  # noqa: E402
from heartseg.train.model_files import read_model  # noqa: E402
from heartseg.train.cli import app  # noqa: E402
from heartseg.train.unet import build_unet  # noqa: E402
from typer.testing import CliRunner  # noqa: E402


# A fine-tuning that keeps its start's localiser; and no training at all (both stages scored as they start).
TUNE_ARGS = with_options(TINY_TRAIN_ARGS, coarse_steps="0")
KEEP_ARGS = with_options(TUNE_ARGS, steps="0")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """trained_run's model.pt exported to ONNX: the file's path."""
    out = tmp_path_factory.mktemp("import") / "M.onnx"
    result = CliRunner().invoke(export_app, [str(trained_run.model), "-o", str(out), "--threads", "1"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out


def _train(data, out, *args: str):
    return CliRunner().invoke(app, [str(data), "-o", str(out), *args])


def _from_file(trained_run, exported, out, args: list[str]):
    """A run on trained_run's fold 0, started from the exported file."""
    return _train(trained_run.data, out, *args, "--fold", "0", "--splits", str(trained_run.run / "splits.json"),
                  "--init-from", str(exported))


def test_the_file_reads_back_as_its_checkpoint(trained_run, exported):
    original = read_model(trained_run.model)
    imported = read_model(exported)
    assert imported.path == exported and imported.kind == "exported"
    assert [s.name for s in imported.contract.stages] == [s.name for s in original.contract.stages]
    assert imported.contract.info == original.contract.info
    for stage in original.contract.stages:
        assert imported.contract.stage(stage.name).threshold == stage.threshold
    # Instance-normalised convolutions keep their names in the file: the weights come back exactly.
    (fine,), (ours,) = original.networks["fine"], imported.networks["fine"]
    assert fine.unet == ours.unet and fine.state_dict.keys() == ours.state_dict.keys()
    for key, value in fine.state_dict.items():
        assert torch.equal(value, ours.state_dict[key]), key


def test_a_folded_batchnorm_stage_computes_what_it_computed_before_export(trained_run, exported):
    (original,) = read_model(trained_run.model).networks["coarse"]
    (imported,) = read_model(exported).networks["coarse"]
    assert original.unet.norm == "batch"
    nets = []
    for weights in (original, imported):
        net = build_unet(weights.unet)
        net.load_state_dict(weights.state_dict)
        nets.append(net.eval())
    image = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 1, 24, 16, 32)).astype(np.float32))
    with torch.no_grad():
        before, after = (torch.sigmoid(net(image)) for net in nets)
    assert float((before - after).abs().max()) < 1e-5
    norms = [key.removesuffix(".running_mean") for key in imported.state_dict if key.endswith(".running_mean")]
    assert norms and all(float(imported.state_dict[f"{n}.running_mean"].abs().max()) == 0.0 for n in norms)
    assert all(torch.equal(imported.state_dict[f"{n}.weight"], torch.ones_like(imported.state_dict[f"{n}.weight"]))
               for n in norms)


def test_a_wrong_reading_of_the_weights_is_refused(exported, monkeypatch):
    real = onnx_import._conv_nodes

    def swapped(proto, head):
        nodes = real(proto, head)
        # Two convolutions of one shape (the full-resolution level's second, encoder and decoder): swapped.
        a, b = "encoders.0.3", "decoders.2.3"
        nodes[a], nodes[b] = nodes[b], nodes[a]
        return nodes

    monkeypatch.setattr(onnx_import, "_conv_nodes", swapped)
    with pytest.raises(HeartsegError, match="do not reproduce the file's output"):
        read_model(exported)


def test_a_run_started_from_the_file_scores_as_the_model_it_was_exported_from(trained_run, exported, tmp_path):
    out = tmp_path / "from_onnx"
    result = _from_file(trained_run, exported, out, KEEP_ARGS)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    ours = json.loads((out / "fold_0" / "metrics.json").read_text())
    theirs = json.loads((trained_run.run / "fold_0" / "metrics.json").read_text())
    assert ours["val_cases"] == theirs["val_cases"]
    assert ours["calibration"]["fine"]["threshold"] == theirs["calibration"]["fine"]["threshold"]
    assert ours["mean"]["dice"] == pytest.approx(theirs["mean"]["dice"], abs=1e-3)
    assert read_model(out / "model.pt").contract.info["init_from"] == str(exported.resolve())


def test_fine_tuning_from_the_file_trains_and_warns_before_training_its_folded_batchnorm(trained_run, exported,
                                                                                          tmp_path):
    splits = str(trained_run.run / "splits.json")
    kept = _from_file(trained_run, exported, tmp_path / "kept", TUNE_ARGS)
    assert kept.exit_code == 0, f"{kept.output}\n{kept.exception!r}"
    assert "BatchNorm" not in unwrapped(kept.output)
    before = read_model(exported).networks["fine"][0].state_dict
    after = read_model(tmp_path / "kept" / "model.pt").networks["fine"][0].state_dict
    assert any(not torch.equal(before[key], after[key]) for key in before)

    trained = _from_file(trained_run, exported, tmp_path / "trained", TINY_TRAIN_ARGS)
    assert trained.exit_code == 0, f"{trained.output}\n{trained.exception!r}"
    assert "whose BatchNorm export folded into the convolutions" in unwrapped(trained.output)
    # The weights tell, not the file's name: a model.pt that kept the read-back localiser warns alike.
    again = _from_file(trained_run, tmp_path / "kept" / "model.pt", tmp_path / "again", TINY_TRAIN_ARGS)
    assert again.exit_code == 0, f"{again.output}\n{again.exception!r}"
    assert "whose BatchNorm export folded into the convolutions" in unwrapped(again.output)
    fresh = _train(trained_run.data, tmp_path / "fresh", *TINY_TRAIN_ARGS, "--fold", "0", "--splits", splits,
                   "--init-from", str(trained_run.model))
    assert fresh.exit_code == 0 and "BatchNorm" not in unwrapped(fresh.output), fresh.output


def test_a_rounded_variant_is_refused_with_a_message(trained_run, tmp_path):
    out = tmp_path / "M.onnx"
    result = CliRunner().invoke(export_app, [str(trained_run.model), "-o", str(out), "--threads", "1", "--fp16",
                                             "--int8", "--data", str(trained_run.data)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    for variant in ("fp16", "int8"):
        with pytest.raises(HeartsegError, match=f"a {variant} variant, whose weights are rounded"):
            read_model(tmp_path / f"M.{variant}.onnx")


def test_a_file_without_the_networks_description_is_refused_with_a_message(cascade_model, no_contract_model,
                                                                          trained_run, tmp_path):
    for model, needle in ((cascade_model, "no readable network configuration"),
                          (no_contract_model, "without heartseg metadata")):
        result = _train(trained_run.data, tmp_path / model.stem, *TUNE_ARGS, "--init-from", str(model))
        text = unwrapped(result.output)
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (result.output, result.exception)
        assert needle in text and "Traceback" not in text, text
        assert not (tmp_path / model.stem / "model.pt").exists()


def test_weights_trained_on_another_grid_than_the_plan_are_named_in_a_warning(trained_run, exported, tmp_path):
    same = _from_file(trained_run, exported, tmp_path / "same", KEEP_ARGS)
    assert same.exit_code == 0 and "starts from weights made for" not in unwrapped(same.output), same.output
    other = _from_file(trained_run, exported, tmp_path / "other", with_options(KEEP_ARGS, margin_mm="8"))
    text = unwrapped(other.output)
    assert other.exit_code == 0, text
    assert "stage 'fine' starts from weights made for" in text and "margin 6 mm, pad context" in text, text
    assert "this run plans" in text and "margin 8 mm" in text and "stage 'coarse' starts" not in text, text
    scan = _from_file(trained_run, exported, tmp_path / "scan", [*KEEP_ARGS, "--crop-context", "scan"])
    assert "margin 6 mm, pad context, this run plans" in unwrapped(scan.output), scan.output
    assert "margin 6 mm, scan context" in unwrapped(scan.output), scan.output


def test_a_patch_differing_from_the_starting_weights_is_named_only_for_a_stage_that_trains(trained_run, exported,
                                                                                          tmp_path):
    kept = _from_file(trained_run, exported, tmp_path / "kept", with_options(KEEP_ARGS, patch="24,24,24"))
    assert kept.exit_code == 0 and "starts from weights made for" not in unwrapped(kept.output), kept.output
    tuned = _from_file(trained_run, exported, tmp_path / "tuned", with_options(TUNE_ARGS, patch="24,24,24"))
    text = unwrapped(tuned.output)
    assert tuned.exit_code == 0, text
    assert "stage 'fine' starts from weights made for" in text and "stage 'coarse' starts" not in text, text
    assert "patch 16x16x16, margin 6 mm, pad context, this run plans" in text, text
    assert "patch 24x24x24, margin 6 mm" in text, text


def test_a_single_stage_run_takes_its_stage_from_a_two_stage_file(trained_run, exported, tmp_path):
    result = _from_file(trained_run, exported, tmp_path / "fine", [*TUNE_ARGS, "--stage", "fine"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    tuned = read_model(tmp_path / "fine" / "model.pt")
    assert [s.name for s in tuned.contract.stages] == ["fine"]
