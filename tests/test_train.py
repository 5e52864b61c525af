"""heartseg-train: learning, artefacts, splits, resume after a kill, clear dataset errors, calibration, DDP.

The tiny cascade is trained once per session by the `trained_run` fixture (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("torch", reason="the training side needs PyTorch: pip install -e '.[train]'")
import torch
from conftest import unwrapped, with_options
from heartseg.runtime.errors import InputError
from heartseg.runtime.metrics import degenerate_reason
from heartseg.train.calibrate import (
    DEFAULT_THRESHOLDS,
    CalibrationError,
    calibrate_threshold,
)
from heartseg.train.cli import app
from heartseg.train.dataset import image_hash, read_dataset
from heartseg.train.splits import make_folds
from typer.testing import CliRunner

# Shared by the short runs below (the steps differ per test).
SMALL = ["--folds", "3", "--width", "4", "--patch", "16,16,16", "--coarse-spacing", "4", "--margin-mm", "6",
         "--cache", "none", "--threads", "1"]
CASES = [f"syn_{i:03d}" for i in range(6)]
DUPLICATE = ("syn_000", "syn_005")  # make_msd_dataset(duplicate=True): the last case repeats the first image


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------------------
# It learned, and left everything behind


def test_tiny_cascade_learns_on_held_out_cases(trained_run):
    metrics = json.loads((trained_run.run / "fold_0" / "metrics.json").read_text())
    assert set(metrics["val_cases"]).isdisjoint(metrics["train_cases"])
    assert set(metrics["per_case"]) == set(metrics["val_cases"])
    # Chance (a random mask of the atrium's size) scores about 0.05.
    assert metrics["mean"]["dice"] > 0.8, metrics["mean"]
    assert all(m["dice"] > 0.6 for m in metrics["per_case"].values()), metrics["per_case"]
    summary = json.loads((trained_run.run / "summary.json").read_text())
    assert summary["folds"] == [0] and summary["cases"] == len(metrics["val_cases"])
    assert summary["mean"]["dice"] == pytest.approx(metrics["mean"]["dice"])


def test_qc_score_is_calibrated_on_the_held_out_cases(trained_run):
    from heartseg.runtime.qc import ScoreCalibration, fit_score_calibration
    from heartseg.runtime.contract import ModelContract

    metrics = json.loads((trained_run.run / "fold_0" / "metrics.json").read_text())
    scores = [m["qc_score"] for m in metrics["per_case"].values()]
    dices = [m["dice"] for m in metrics["per_case"].values()]
    assert all(0.0 < s <= 1.0 for s in scores)
    stored = ScoreCalibration.from_dict(metrics["score_calibration"])
    assert stored == fit_score_calibration(scores, dices) and stored.cases == len(metrics["val_cases"])
    contract = ModelContract.from_dict(_load(trained_run.model)["contract"])
    assert contract.score_calibration == stored
    # --tta gets its own calibration, fitted on the same cases inferred with test-time flips.
    tta = ScoreCalibration.from_dict(metrics["tta_score_calibration"])
    assert tta == fit_score_calibration([m["qc_score_tta"] for m in metrics["per_case"].values()],
                                        [m["dice_tta"] for m in metrics["per_case"].values()])
    assert contract.tta_score_calibration == tta and tta != stored
    assert metrics["mean"]["dice_tta"] > 0.8, metrics["mean"]
    # Plausibility records the training scans' geometry too.
    assert contract.plausibility.spacing_mm is not None and contract.plausibility.fov_mm is not None


def test_summary_of_folds_calibrated_by_different_releases() -> None:
    from heartseg.train.pipeline import summarize_dicts

    new = {"dice": 0.9, "qc_score": 0.95, "dice_tta": 0.88, "qc_score_tta": 0.93, "dataset": "A"}
    old = {"dice": 0.7, "qc_score": 0.85, "dataset": "A"}
    for per_case in ({"n": new, "o": old}, {"o": old, "n": new}):  # whichever fold comes first
        mean = summarize_dicts(per_case)
        assert mean["dice"] == pytest.approx(0.8) and mean["dice_tta"] == pytest.approx(0.88)
        assert "dataset" not in mean


def test_model_pt_is_plain_weights_with_calibrated_thresholds(trained_run):
    ckpt = _load(trained_run.model)
    assert ckpt["format"] == "heartseg-model"
    stages = ckpt["contract"]["stages"]
    assert [s["name"] for s in stages] == ["coarse", "fine"]
    assert set(ckpt["networks"]) == {"coarse", "fine"}
    calibration = ckpt["metrics"]["calibration"]
    assert set(calibration) == {"coarse", "fine"}
    for stage in stages:
        threshold = stage["threshold"]
        assert isinstance(threshold, float) and 0.0 < threshold < 1.0, stage
        sweep = calibration[stage["name"]]
        assert sweep["threshold"] == threshold
        assert len(sweep["thresholds"]) == len(sweep["mean_dice"]) == len(sweep["degenerate"]) > 1
        usable = [d for d, bad in zip(sweep["mean_dice"], sweep["degenerate"]) if not bad]
        assert sweep["dice"] == pytest.approx(max(usable))
        assert threshold in sweep["thresholds"]
    # The run's model.pt is fold 0's, and the plan (without thresholds) matches the contract's geometry.
    assert (trained_run.run / "fold_0" / "model.pt").read_bytes() == trained_run.model.read_bytes()
    plan = json.loads((trained_run.run / "plan.json").read_text())
    assert [s["threshold"] for s in plan["contract"]["stages"]] == [None, None]
    for planned, stage in zip(plan["contract"]["stages"], stages):
        assert planned["spacing"] == stage["spacing"] and planned["patch_size"] == stage["patch_size"]
    assert stages[1]["patch_size"] == [16, 16, 16] and stages[0]["spacing"] == [4.0, 4.0, 4.0]


def test_run_folder_has_plan_splits_summary_and_pictures(trained_run):
    run, fold = trained_run.run, trained_run.run / "fold_0"
    for name in ("plan.json", "splits.json", "summary.json", "config.json"):
        json.loads((run / name).read_text())
    metrics = json.loads((fold / "metrics.json").read_text())
    pictures = [fold / "curves.png", fold / "calibration.png"] + [fold / f"overlay_{c}.png" for c in metrics["val_cases"]]
    for path in pictures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        assert path.stat().st_size > 1000, path
    for stage in ("coarse", "fine"):
        done = json.loads((fold / stage / "done.json").read_text())
        assert done["steps"] == {"coarse": 40, "fine": 60}[stage]
        assert (fold / stage / "best.pt").is_file()


# ----------------------------------------------------------------------------------------------------------
# Splits


def test_run_splits_keep_identical_images_together(trained_run):
    folds = json.loads((trained_run.run / "splits.json").read_text())["folds"]
    vals = [set(f["val"]) for f in folds]
    assert len(vals) == 3
    assert set().union(*vals) == set(CASES)
    assert sum(len(v) for v in vals) == len(CASES)  # disjoint
    for f in folds:
        assert set(f["train"]) == set(CASES) - set(f["val"])
    assert sum(set(DUPLICATE) <= v for v in vals) == 1, folds
    # The split is a function of the data and the seed: recomputing it gives splits.json again.
    dataset = read_dataset(trained_run.data)
    hashes = {c.case_id: image_hash(c.image) for c in dataset.cases}
    assert hashes[DUPLICATE[0]] == hashes[DUPLICATE[1]]
    again = make_folds([c.case_id for c in dataset.cases], hashes, 3, 0)
    assert [(f.train, f.val) for f in again] == [(f["train"], f["val"]) for f in folds]


def test_make_folds_groups_duplicates_and_is_seeded():
    ids = [f"c{i}" for i in range(11)]
    hashes = {c: f"h{c}" for c in ids}
    hashes["c10"] = hashes["c0"]
    hashes["c7"] = hashes["c3"] = hashes["c5"]
    splits = {}
    for seed in range(8):
        folds = make_folds(ids, hashes, 4, seed)
        assert [f.index for f in folds] == [0, 1, 2, 3]
        vals = [set(f.val) for f in folds]
        assert set().union(*vals) == set(ids) and sum(map(len, vals)) == len(ids)
        for f in folds:
            assert set(f.train) == set(ids) - set(f.val) and f.val
        assert sum({"c0", "c10"} <= v for v in vals) == 1
        assert sum({"c3", "c5", "c7"} <= v for v in vals) == 1
        again = make_folds(list(reversed(ids)), hashes, 4, seed)
        assert [(f.train, f.val) for f in again] == [(f.train, f.val) for f in folds]
        splits[seed] = tuple(tuple(f.val) for f in folds)
    assert len(set(splits.values())) > 1, "the seed does not change the split"


def test_make_folds_refuses_impossible_splits():
    ids = ["a", "b", "c"]
    with pytest.raises(InputError, match="distinct images"):
        make_folds(ids, {"a": "x", "b": "x", "c": "y"}, 3)
    with pytest.raises(InputError, match="at least 2 folds"):
        make_folds(ids, {"a": "1", "b": "2", "c": "3"}, 1)


# ----------------------------------------------------------------------------------------------------------
# Resume after kill -9


def _train_until_killed(data: Path, run: Path, log: Path, min_step: int = 10, timeout: float = 180.0) -> None:
    """Start a 40-step run and SIGKILL it as soon as fine/last.pt records step >= min_step."""
    args = [sys.executable, "-m", "heartseg.train.cli", str(data), "-o", str(run), "--steps", "40",
            "--coarse-steps", "20", "--val-every", "20", "--checkpoint-every", "10", *SMALL]
    last = run / "fold_0" / "fine" / "last.pt"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=_env())
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    pytest.fail(f"training ended (rc {proc.returncode}) before it could be killed:\n"
                                f"{log.read_text(errors='replace')[-3000:]}")
                if last.exists():
                    try:
                        step = _load(last)["state"]["step"]
                    except Exception:  # replaced while we read it
                        step = -1
                    if step >= min_step:
                        proc.kill()
                        break
                time.sleep(0.005)
            else:
                pytest.fail("no fine-stage checkpoint appeared in time")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -9


def test_resume_after_kill_continues_from_the_saved_step(synthetic_data, tmp_path):
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        _train_until_killed(synthetic_data, run, tmp_path / f"killed{attempt}.log")
        saved = _load(run / "fold_0" / "fine" / "last.pt")
        if saved["state"]["step"] < 40:
            break
    else:
        pytest.skip("the run finished its 40 steps before the kill landed three times")
    state = saved["state"]
    saved_step = state["step"]
    assert saved_step % 10 == 0 and 10 <= saved_step < 40
    assert len(state["loss"]) == saved_step
    assert not (run / "model.pt").exists() and not (run / "fold_0" / "fine" / "done.json").exists()
    # Mark the saved history (losses are >= 0): a resumed run keeps these entries, a restarted one cannot.
    marks = [-float(i + 1) for i in range(saved_step)]
    state["loss"] = list(marks)
    torch.save(saved, run / "fold_0" / "fine" / "last.pt")
    coarse_last = (run / "fold_0" / "coarse" / "last.pt").read_bytes()

    result = subprocess.run([sys.executable, "-m", "heartseg.train.cli", "--resume", str(run)],
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming" in result.stderr

    done = json.loads((run / "fold_0" / "fine" / "done.json").read_text())
    assert done["steps"] == 40
    final = _load(run / "fold_0" / "fine" / "last.pt")["state"]
    assert final["step"] == 40
    assert len(final["loss"]) == 40
    assert final["loss"][:saved_step] == marks, "the resumed run did not continue the saved history"
    assert all(np.isfinite(v) and v >= 0 for v in final["loss"][saved_step:])
    # The finished localiser was not trained again.
    assert (run / "fold_0" / "coarse" / "last.pt").read_bytes() == coarse_last
    model = _load(run / "model.pt")
    assert all(s["threshold"] is not None for s in model["contract"]["stages"])


# ----------------------------------------------------------------------------------------------------------
# Dataset errors: exit code 2, a message, no traceback


def _small_dataset(root: Path) -> Path:
    from synthetic_dataset import make_msd_dataset

    return make_msd_dataset(root, n_cases=4, shape=(16, 16, 16))


def _manifest_edit(root: Path, index: int, key: str, value: str) -> None:
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["training"][index][key] = value
    (root / "dataset.json").write_text(json.dumps(manifest))


def _break_parent_path(root: Path) -> list[str]:
    shutil.copy(root / "imagesTr" / "syn_001.nii.gz", root.parent / "outside.nii.gz")
    _manifest_edit(root, 1, "image", "./imagesTr/../../outside.nii.gz")
    return ["outside.nii.gz", "leaves the dataset folder"]


def _break_absolute_path(root: Path) -> list[str]:
    _manifest_edit(root, 2, "label", str((root / "labelsTr" / "syn_002.nii.gz").resolve()))
    return ["absolute"]


def _break_missing_file(root: Path) -> list[str]:
    (root / "imagesTr" / "syn_001.nii.gz").unlink()
    return ["syn_001.nii.gz", "does not exist"]


def _break_label_values(root: Path) -> list[str]:
    path = root / "labelsTr" / "syn_002.nii.gz"
    label = nib.load(path)
    data = np.asarray(label.dataobj).astype(np.uint8) * 2
    nib.save(nib.Nifti1Image(data, label.affine), path)
    return ["syn_002", "not binary"]


def _break_label_shape(root: Path) -> list[str]:
    path = root / "labelsTr" / "syn_001.nii.gz"
    label = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:, :, :8], label.affine), path)
    return ["syn_001", "differ in shape"]


def _break_manifest(root: Path) -> list[str]:
    (root / "dataset.json").unlink()
    return ["no dataset.json"]


@pytest.mark.parametrize("breaker", [_break_parent_path, _break_absolute_path, _break_missing_file,
                                     _break_label_values, _break_label_shape, _break_manifest],
                         ids=["parent-path", "absolute-path", "missing-file", "non-binary-label", "shape-mismatch",
                              "no-dataset-json"])
def test_dataset_errors_are_clear(tmp_path, breaker):
    data = _small_dataset(tmp_path / "data")
    needles = breaker(data)
    result = CliRunner().invoke(app, [str(data), "-o", str(tmp_path / "run"), "--steps", "2", "--coarse-steps", "2",
                                      *SMALL])
    _assert_clear_error(result, needles)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_fold_out_of_range_is_clear(synthetic_data, tmp_path):
    result = CliRunner().invoke(app, [str(synthetic_data), "-o", str(tmp_path / "run"), "--fold", "7",
                                      "--steps", "2", "--coarse-steps", "2", *SMALL])
    _assert_clear_error(result, ["--fold 7", "3 folds"])


def _assert_clear_error(result, needles: list[str]) -> None:
    text = unwrapped(result.output)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert text.startswith("error:") or " error: " in f" {text}", text
    for needle in needles:
        assert needle in text, (needle, text)


# ----------------------------------------------------------------------------------------------------------
# Threshold calibration


def _threshold_mask(prob: np.ndarray, threshold: float) -> np.ndarray:
    return prob > threshold


def _fraction_flag(max_fraction: float):
    return lambda index, mask: degenerate_reason(mask, max_fraction)


@pytest.mark.parametrize("value", [0.99, 0.001])
def test_calibration_refuses_when_every_threshold_is_degenerate(value):
    label = np.zeros((16, 16, 16), np.uint8)
    label[6:10, 6:10, 6:10] = 1
    pairs = [(np.full(label.shape, value, np.float32), label) for _ in range(2)]
    with pytest.raises(CalibrationError, match="calibration failed") as info:
        calibrate_threshold(pairs, _threshold_mask, _fraction_flag(0.5))
    assert info.value.exit_code == 1


def _soft_cases(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Balls with noisy, biased probabilities: the best threshold is not simply 0.5."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(24)] * 3, indexing="ij"), -1).astype(float)
    pairs = []
    for _ in range(3):
        centre, radius = rng.uniform(9, 15, 3), rng.uniform(3.5, 6)
        distance = np.linalg.norm(grid - centre, axis=-1) - radius
        prob = 1 / (1 + np.exp(distance / 1.5 - 1.2 + rng.normal(0, 0.8, distance.shape)))
        pairs.append((prob.astype(np.float32), (distance <= 0).astype(np.uint8)))
    return pairs


def _too_large_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Low thresholds give the exact label (Dice 1) but more than max_fraction of the scan; higher ones a core."""
    label = np.zeros((20, 20, 20), np.uint8)
    label[:, :, :2] = 1                       # 10 % of the scan
    prob = np.full(label.shape, 0.01, np.float32)
    prob[label == 1] = 0.28
    prob[:10, :, :2] = 0.78                   # half of the label, 5 % of the scan
    return [(prob, label)]


def _brute_force(pairs, max_fraction: float):
    means, degenerate = [], []
    for t in DEFAULT_THRESHOLDS:
        scores, bad = [], False
        for prob, ref in pairs:
            mask = prob > t
            total = mask.sum() + ref.sum()
            scores.append(1.0 if total == 0 else 2 * np.logical_and(mask, ref).sum() / total)
            bad |= mask.sum() == 0 or mask.mean() > max_fraction
        means.append(float(np.mean(scores)))
        degenerate.append(bool(bad))
    return means, degenerate


@pytest.mark.parametrize("pairs, max_fraction", [(_soft_cases(0), 0.2), (_soft_cases(1), 0.2), (_too_large_cases(), 0.06)],
                         ids=["soft-0", "soft-1", "best-is-too-large"])
def test_calibration_picks_the_usable_threshold_with_the_best_mean_dice(pairs, max_fraction):
    cal = calibrate_threshold(pairs, _threshold_mask, _fraction_flag(max_fraction))
    means, degenerate = _brute_force(pairs, max_fraction)
    assert cal.thresholds == list(DEFAULT_THRESHOLDS)
    assert cal.mean_dice == pytest.approx(means)
    assert cal.degenerate == degenerate
    best = max(m for m, bad in zip(means, degenerate) if not bad)
    chosen = cal.thresholds.index(cal.threshold)
    assert not degenerate[chosen]
    assert means[chosen] == pytest.approx(best) and cal.dice == pytest.approx(best)
    assert cal.cases == len(pairs)
    if max_fraction == 0.06:
        assert max(means) == pytest.approx(1.0) and best < 0.9  # the degenerate optimum was passed over
        assert 0.3 <= cal.threshold < 0.8


# ----------------------------------------------------------------------------------------------------------
# Distributed data parallel (gloo on CPU)


def test_ddp_two_processes_on_cpu(synthetic_data, tmp_path):
    run = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "heartseg.train.cli", str(synthetic_data), "-o", str(run), "--steps", "40", "--coarse-steps", "30",
            "--val-every", "20", *SMALL]
    env = {k: v for k, v in _env().items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even where a GPU exists
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "Traceback" not in output
    model = _load(run / "model.pt")
    assert all(isinstance(s["threshold"], float) for s in model["contract"]["stages"])
    assert json.loads((run / "fold_0" / "fine" / "done.json").read_text())["steps"] == 40
    assert json.loads((run / "summary.json").read_text())["folds"] == [0]
    # Only rank 0 writes: one tensorboard log, no leftover temporary files.
    assert len(list((run / "fold_0" / "tb").iterdir())) == 1
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_recalibrate_redoes_calibration_and_metrics_without_training(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run, run)
    before = _load(run / "fold_0" / "model.pt")
    metrics = json.loads((run / "fold_0" / "metrics.json").read_text())
    # Spoil what recalibration must rebuild: the stored threshold and the held-out metrics.
    spoiled = dict(before)
    spoiled["contract"] = json.loads(json.dumps(before["contract"]))
    spoiled["contract"]["stages"][-1]["threshold"] = 0.99
    torch.save(spoiled, run / "fold_0" / "model.pt")
    (run / "fold_0" / "metrics.json").write_text(json.dumps({**metrics, "mean": {"dice": -1.0}}))
    result = CliRunner().invoke(app, ["--resume", str(run), "--recalibrate"])
    assert result.exit_code == 0, result.output
    after = _load(run / "fold_0" / "model.pt")
    redone = json.loads((run / "fold_0" / "metrics.json").read_text())
    assert after["contract"]["stages"][-1]["threshold"] == before["contract"]["stages"][-1]["threshold"]
    assert redone["mean"]["dice"] == pytest.approx(metrics["mean"]["dice"], abs=1e-6)
    for name, network in before["networks"].items():  # the same trained weights: nothing was trained
        for key, value in network["state_dict"].items():
            assert torch.equal(after["networks"][name]["state_dict"][key], value), (name, key)
    assert json.loads((run / "fold_0" / "fine" / "done.json").read_text())["steps"] == 60
    refused = CliRunner().invoke(app, ["--recalibrate"])
    assert refused.exit_code == 2 and "--resume" in unwrapped(refused.output)


def test_a_case_flagged_at_every_threshold_does_not_block_calibration():
    """One held-out case the model fails at every threshold is the model's failure: the threshold is
    chosen on the others and the failure is recorded; when most cases fail, calibration refuses."""
    good = _soft_cases(0)
    failed = (np.zeros((24, 24, 24), np.float32), good[0][1])  # an empty mask at every threshold
    cal = calibrate_threshold(good + [failed], _threshold_mask, _fraction_flag(0.2))
    means, degenerate = _brute_force(good, 0.2)
    best = max(m for m, bad in zip(means, degenerate) if not bad)
    chosen = cal.thresholds.index(cal.threshold)
    assert not degenerate[chosen] and means[chosen] == pytest.approx(best)
    assert all("case 3: empty" in text for text in cal.flags.values()) and len(cal.flags) == len(cal.thresholds)
    with pytest.raises(CalibrationError, match="2 or more of 4"):
        calibrate_threshold(good[:2] + [failed, failed], _threshold_mask, _fraction_flag(0.2))


def test_calibration_failure_names_the_cases_and_the_best_threshold_tried():
    """The message shows the threshold that came closest and why each case's mask was refused there, by name."""
    label = np.zeros((16, 16, 16), np.uint8)
    label[5:11, 5:11, 5:11] = 1
    learned = np.where(label == 1, 0.99, 0.3).astype(np.float32)  # all foreground below 0.3, the label above
    lost = np.full(label.shape, 0.001, np.float32)  # empty at every threshold
    pairs = [(learned, label), (lost, label)]
    with pytest.raises(CalibrationError) as info:
        calibrate_threshold(pairs, _threshold_mask, _fraction_flag(0.5), names=["la_a", "la_b"])
    message = str(info.value)
    assert "best threshold tried, 0.3 " in message, message
    assert "la_b (empty)" in message and "la_a" not in message, message
    assert "case " not in message, message


def test_a_short_run_that_fails_calibration_keeps_its_networks_and_says_how_to_go_on(synthetic_data, tmp_path):
    run = tmp_path / "short"
    args = [str(synthetic_data), "--steps", "1", "--coarse-steps", "1", "--val-every", "1", *SMALL]
    result = CliRunner().invoke(app, [*args[:1], "-o", str(run), *args[1:]])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    message = unwrapped(result.output[result.output.index("error:"):])
    held_out = json.loads((run / "splits.json").read_text())["folds"][0]["val"]
    assert all(case in message for case in held_out), message
    assert "best threshold tried" in message and "--coarse-steps" in message, message
    kept = [run / "fold_0" / stage / "best.pt" for stage in ("coarse", "fine")]
    assert all(f"--init-from {path}" in message for path in kept), message
    assert all(path.is_file() for path in kept) and not (run / "model.pt").exists()
    # Following the advice: the same command, a new folder, more steps, from the kept networks.
    longer = with_options(args, steps="60", coarse_steps="40", val_every="30")
    go_on = [*longer[:1], "-o", str(tmp_path / "longer"), *longer[1:],
             *[part for path in kept for part in ("--init-from", str(path))]]
    result = CliRunner().invoke(app, go_on)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "longer" / "model.pt").is_file()


def test_a_calibration_error_survives_pickling_with_its_advice_once():
    """Errors cross process boundaries (distributed training, worker pools) pickled: they must come back the same."""
    import pickle

    error = CalibrationError("threshold calibration of stage 'fine' failed", "fine").with_advice("train longer")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is CalibrationError and str(copy) == str(error)
    assert str(copy).count("train longer") == 1 and "the model was not written" not in str(copy)
    assert (copy.diagnosis, copy.stage, copy.exit_code) == (error.diagnosis, "fine", 1)


def test_calibration_advice_names_the_validated_networks_and_that_the_latest_ones_serve_too(tmp_path):
    from heartseg.runtime.contract import ModelContract, StageContract
    from heartseg.train.pipeline import _calibration_advice

    contract = ModelContract(stages=[
        StageContract(name, spacing, (16, 16, 16), input_name=f"{name}_image", prob_name=f"{name}_prob",
                      mask_name=f"{name}_mask", role=role)
        for name, spacing, role in (("coarse", (4.0,) * 3, "localiser"), ("fine", (1.25,) * 3, "segmenter"))])
    advice = _calibration_advice(contract, tmp_path / "fold_0", "coarse")
    assert "--coarse-steps" in advice, advice
    for stage in ("coarse", "fine"):
        assert f"--init-from {tmp_path / 'fold_0' / stage / 'best.pt'}" in advice, advice
    assert "last.pt" in advice, advice
