"""Training and export options are validated in one place: a value no run can use is exit 2 with one line
naming the option, before anything is written; a run that fails before its first checkpoint leaves no
run folder behind; checkpoints are validated whole before they are used."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from heartseg.export.cli import app as export_app  # noqa: E402
from heartseg.runtime.contract import ModelContract, StageContract  # noqa: E402
from heartseg.train.checkpoint import model_checkpoint, save_atomic  # noqa: E402
from heartseg.train.cli import app as train_app  # noqa: E402
from heartseg.train.options import TrainConfig  # noqa: E402
from heartseg.train.pipeline import RunConfig  # noqa: E402
from heartseg.train.plan import PlanOptions  # noqa: E402
from heartseg.train.unet import UNetConfig, build_unet  # noqa: E402
from synthetic_dataset import make_msd_dataset  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

TINY = ["--folds", "2", "--width", "4", "--patch", "16,16,16", "--coarse-spacing", "4", "--margin-mm", "6",
        "--cache", "none", "--threads", "1", "--steps", "2", "--coarse-steps", "2"]


def one_line_error(result, *fragments: str, logged: bool = False) -> str:
    """Exit 2 and one 'error:' line naming fragments (after the run's log lines when logged)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    if logged:
        lines = [line for line in lines if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return make_msd_dataset(tmp_path_factory.mktemp("opts") / "data", n_cases=4, shape=(24, 24, 16))


BAD_OPTIONS = [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--val-every", "0"], "--val-every 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0"),
    (["--threads", "-1"], "--threads -1"),
    (["--steps", "-1"], "--steps -1"),
    (["--coarse-steps", "-1"], "--coarse-steps -1"),
    (["--coarse-steps", "0"], "--init-from"),
    (["--width", "0"], "base_channels"),
    (["--margin-mm", "-1"], "--margin-mm -1.0"),
    (["--foreground-fraction", "2"], "--foreground-fraction 2.0"),
    (["--folds", "1"], "--folds 1"),
    (["--device", "tpu"], "--device"),
    (["--flip-prob", "1.5"], "--flip-prob 1.5"),
    (["--permute-prob", "-0.1"], "--permute-prob -0.1"),
    (["--invert-prob", "2"], "--invert-prob 2.0"),
    (["--dark-pool-prob", "-1"], "--dark-pool-prob -1.0"),
    (["--fov-cut-prob", "1.5"], "--fov-cut-prob 1.5"),
    (["--thick-slice-prob", "1.5"], "--thick-slice-prob 1.5"),
    (["--thick-slice-mm", "3"], "--thick-slice-mm '3'"),
    (["--thick-slice-mm", "3,2"], "--thick-slice-mm"),
    (["--crop-context", "mirror"], "--crop-context 'mirror': choose pad or scan"),
    (["--workers", "-1"], "--workers -1"),
    (["--dataset-weight", "data=0"], "--dataset-weight 'data=0.0'"),
    (["--dataset-weight", "data"], "--dataset-weight 'data'"),
    (["--dataset-weight", "LGE=2"], "--dataset-weight LGE: no such dataset"),
]


@pytest.mark.parametrize("args,named", BAD_OPTIONS, ids=[a[0][0] for a in BAD_OPTIONS])
def test_bad_option_is_refused_before_any_run_folder(small_data: Path, tmp_path: Path, args, named: str) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(train_app, [str(small_data), "-o", str(run), *TINY, *args])
    one_line_error(result, named)
    assert not run.exists()


def test_cli_defaults_are_the_dataclasses(tmp_path: Path) -> None:
    import inspect

    from heartseg.train.cli import train

    defaults = {name: p.default.default for name, p in inspect.signature(train).parameters.items()
                if hasattr(p.default, "default")}
    config = TrainConfig()
    assert defaults["steps"] == config.steps and defaults["lr"] == config.lr
    assert defaults["batch_size"] == config.batch_size and defaults["val_every"] == config.val_every
    assert defaults["foreground_fraction"] == config.foreground_fraction
    assert defaults["margin_mm"] == PlanOptions().crop_margin_mm
    assert defaults["crop_context"] == PlanOptions().crop_context
    run = RunConfig(data=["d"], output="o")
    assert defaults["coarse_steps"] == run.coarse.steps and defaults["folds"] == run.n_folds
    assert defaults["flip_prob"] == run.augment.p_flip and defaults["permute_prob"] == run.augment.p_permute
    assert defaults["invert_prob"] == run.augment.p_invert and defaults["workers"] == config.workers
    assert defaults["dark_pool_prob"] == run.augment.p_dark_pool
    assert defaults["fov_cut_prob"] == run.augment.p_fov_cut
    assert defaults["thick_slice_prob"] == run.augment.p_thick_slice
    assert defaults["soft_labels"] == config.soft_labels == run.coarse.soft_labels


def test_orientation_augmentation_options_reach_the_run_config(small_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(train_app, [str(small_data), "-o", str(run), *TINY, "--flip-prob", "0.2",
                                            "--permute-prob", "0", "--invert-prob", "0.3", "--workers", "1",
                                            "--dark-pool-prob", "0.25", "--fov-cut-prob", "0.15", "--thick-slice-prob", "0.3",
                                            "--thick-slice-mm", "2,2.8",
                                            "--dataset-weight", f"{small_data.name}=2", "--soft-labels"])
    assert result.exit_code in (0, 1), (result.output, result.exception)  # 2 steps may not calibrate
    config = RunConfig.load(run / "config.json")
    augment = config.augment
    assert augment.p_flip == 0.2 and augment.p_permute == 0.0 and augment.p_invert == 0.3
    assert augment.p_dark_pool == 0.25 and augment.p_fov_cut == 0.15
    assert augment.p_thick_slice == 0.3 and augment.thick_slice_mm == (2.0, 2.8)
    assert config.fine.workers == 1 and config.coarse.workers == 1
    assert config.fine.soft_labels and config.coarse.soft_labels
    assert config.fine.dataset_weights == {small_data.name: 2.0} == config.coarse.dataset_weights
    assert augment.p_bias == RunConfig(data=["d"], output="o").augment.p_bias  # the rest stays default


def test_the_crop_context_reaches_the_fine_stage_of_the_plan(small_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(train_app, [str(small_data), "-o", str(run), *TINY, "--crop-context", "scan"])
    assert result.exit_code in (0, 1), (result.output, result.exception)  # 2 steps may not calibrate
    assert RunConfig.load(run / "config.json").plan.crop_context == "scan"
    stages = {s["name"]: s for s in json.loads((run / "plan.json").read_text())["contract"]["stages"]}
    assert stages["fine"]["context"] == "scan" and stages["coarse"]["context"] == "pad"


def test_dataset_entry_that_is_not_a_path(tmp_path: Path) -> None:
    data = make_msd_dataset(tmp_path / "data", n_cases=3, shape=(16, 16, 8))
    manifest = json.loads((data / "dataset.json").read_text())
    manifest["training"][0] = {"image": 5, "label": "./labelsTr/syn_000.nii.gz"}
    (data / "dataset.json").write_text(json.dumps(manifest))
    one_line_error(CliRunner().invoke(train_app, [str(data), "-o", str(tmp_path / "run"), *TINY]), "dataset.json")
    assert not (tmp_path / "run").exists()


def test_failed_run_leaves_no_folder_and_can_be_rerun(tmp_path: Path) -> None:
    data = make_msd_dataset(tmp_path / "data", n_cases=4, shape=(24, 24, 16))
    import nibabel as nib
    import numpy as np

    label = data / "labelsTr" / "syn_002.nii.gz"
    image = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 3, image.affine), str(label))  # not binary
    run = tmp_path / "run"
    first = CliRunner().invoke(train_app, [str(data), "-o", str(run), *TINY])
    one_line_error(first, "not binary", logged=True)
    assert not run.exists()
    again = CliRunner().invoke(train_app, [str(data), "-o", str(run), *TINY])
    text = one_line_error(again, "not binary", logged=True)
    assert "already exists" not in text


def test_resume_with_a_corrupt_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"data": ["x"], "output": ')
    one_line_error(CliRunner().invoke(train_app, ["--resume", str(run)]), "config.json")
    (run / "config.json").write_text(json.dumps({"data": ["x"], "output": str(run)}))
    one_line_error(CliRunner().invoke(train_app, ["--resume", str(run)]), "config.json")


def test_resume_with_a_last_checkpoint_missing_keys(small_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = RunConfig(data=[str(small_data)], output=str(run), cache="none", threads=1, n_folds=2,
                       fine_unet=UNetConfig(base_channels=4), coarse_unet=UNetConfig(base_channels=4),
                       plan=PlanOptions(coarse_spacing=4.0, fine_patch=(16, 16, 16), crop_margin_mm=6.0))
    run.mkdir()
    config.save(run / "config.json")
    last = run / "fold_0" / "coarse" / "last.pt"
    last.parent.mkdir(parents=True)
    save_atomic({"model": build_unet(UNetConfig(base_channels=4)).state_dict()}, last)
    one_line_error(CliRunner().invoke(train_app, ["--resume", str(run)]), "last.pt", "missing optimizer",
                   logged=True)


def _checkpoint(edit=None) -> dict:
    unet = UNetConfig(base_channels=2, depth=1)
    contract = ModelContract(stages=(StageContract("single", (1.5, 1.5, 1.5), (16, 16, 16), threshold=0.5),))
    data = model_checkpoint(contract, {"single": [(unet.to_dict(), build_unet(unet).state_dict())]}, kind="single",
                            metrics={}, versions={}, command="")
    if edit:
        edit(data)
    return data


BAD_CHECKPOINTS = {
    "no-stages": (lambda d: d["contract"].update(stages=[]), "contract field 'stages'"),
    "threshold-missing": (lambda d: d["contract"]["stages"][0].update(threshold=None), "stages[0].threshold"),
    "networks-list": (lambda d: d.update(networks=[d["networks"]["single"]]), "'networks'"),
    "unet-unknown-key": (lambda d: d["networks"]["single"]["unet"].update(colour="red"), "U-Net configuration"),
    "state-dict-string": (lambda d: d["networks"]["single"].update(state_dict="weights"), "state dict"),
    "orientation": (lambda d: d["contract"].update(orientation="LPS"), "orientation"),
    "ensemble-no-members": (lambda d: d["networks"].update(single={"members": []}), "no member networks"),
    "ensemble-member-incomplete": (lambda d: d["networks"].update(single={"members": [d["networks"]["single"], {}]}),
                                   "missing the weights of stage 'single'"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_export_refuses_a_bad_checkpoint(tmp_path: Path, case: str) -> None:
    edit, named = BAD_CHECKPOINTS[case]
    checkpoint = tmp_path / "model.pt"
    save_atomic(_checkpoint(edit), checkpoint)
    result = CliRunner().invoke(export_app, [str(checkpoint), "-o", str(tmp_path / "m.onnx")])
    one_line_error(result, str(checkpoint), named)
    assert not (tmp_path / "m.onnx").exists()


def test_good_checkpoint_passes_validation(tmp_path: Path) -> None:
    from heartseg.export.model_file import load_trained_model

    checkpoint = tmp_path / "model.pt"
    save_atomic(_checkpoint(), checkpoint)
    model = load_trained_model(checkpoint)
    assert model.contract.final_stage.threshold == 0.5 and set(model.networks) == {"single"}


def test_a_run_config_of_an_earlier_release_names_one_init_from_source_or_none(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    for old, new in (("/m/model.pt", ["/m/model.pt"]), (None, [])):
        data = json.loads(json.dumps(asdict(RunConfig(data=["d"], output="o"))))
        data["init_from"] = old
        path.write_text(json.dumps(data))
        assert RunConfig.load(path).init_from == new


def test_the_voxel_size_range_reaches_the_thickest_slices_training_saw() -> None:
    from dataclasses import replace

    import numpy as np
    from heartseg.runtime.qc import input_reasons
    from heartseg.train.augment import AugmentConfig
    from heartseg.train.cache import PreparedCase
    from heartseg.train.evaluate import learned_plausibility

    grid = np.indices((24, 24, 24)) - 12
    label = ((grid**2).sum(axis=0) < 36).astype(np.uint8)
    image = (100.0 * label + np.random.default_rng(0).normal(0, 5, label.shape)).astype(np.float32)
    cases = [PreparedCase(f"c{i}", image, label, (1.0, 1.0, 1.0), {}, "A") for i in range(2)]
    plain = learned_plausibility(cases)
    thick = learned_plausibility(cases, replace(AugmentConfig(), p_thick_slice=0.25, thick_slice_mm=(2.0, 3.0)))
    assert plain.spacing_mm[2][1] < 2.5 and thick.spacing_mm[2][1] == 3.0
    assert thick.spacing_mm[:2] == plain.spacing_mm[:2] and thick.fov_mm == plain.fov_mm
    assert any("largest voxel size" in r for r in input_reasons((200, 200, 50), (1.0, 1.0, 2.5), plain))
    assert not any("voxel size" in r for r in input_reasons((200, 200, 50), (1.0, 1.0, 2.5), thick))
    # Without the augmentation switched on, its range says nothing of what training saw.
    off = learned_plausibility(cases, replace(AugmentConfig(), p_thick_slice=0.0, thick_slice_mm=(2.0, 3.0)))
    assert off == plain
