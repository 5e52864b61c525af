"""Models fine-tuned from one model on one fold, averaged weight by weight (heartseg-train --average-weights): one
network per stage, calibrated on the fold's held-out cases, refused for members that do not share a start or a fold."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_TRAIN_ARGS, unwrapped, with_options  # noqa: E402
from heartseg.export.cli import app as export_app  # noqa: E402
from heartseg.runtime.segmenter import Segmenter  # noqa: E402
from heartseg.train.checkpoint import read_model_checkpoint  # noqa: E402
from heartseg.train.cli import app  # noqa: E402
from heartseg.train.lineage import trained_cases  # noqa: E402
from heartseg.train.weight_average import average_state_dicts  # noqa: E402
from synthetic_dataset import make_msd_dataset  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

VAL = ["a_004", "a_005", "b_004", "b_005"]
TRAIN = [f"{p}_{i:03d}" for p in "ab" for i in range(4)]


# Fine-tunings keep their start's localiser, as the shipped model's members did.
TUNE_ARGS = with_options(TINY_TRAIN_ARGS, coarse_steps="0")


def _train(data, out, splits, *extra: str, args: list[str] = TINY_TRAIN_ARGS) -> None:
    result = CliRunner().invoke(app, [*map(str, data), "-o", str(out), "--splits", str(splits), *args, *extra])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base model and two fine-tunings of it on the same fold (other seeds, the base's localiser kept)."""
    root = tmp_path_factory.mktemp("avg")
    data = [make_msd_dataset(root / "seqA", n_cases=6, prefix="a", duplicate=False),
            make_msd_dataset(root / "seqB", n_cases=6, prefix="b", duplicate=False, seed=100,
                             radius=(0.22, 0.28), atrium=55.0, background=120.0)]
    splits = root / "splits.json"
    splits.write_text(json.dumps({"seed": 0, "folds": [{"fold": 0, "train": TRAIN, "val": VAL}]}))
    _train(data, root / "base", splits)
    for seed in (1, 2):
        _train(data, root / f"tuned{seed}", splits, "--init-from", str(root / "base" / "fold_0" / "model.pt"),
               "--seed", str(seed), args=TUNE_ARGS)
    return root, data, [root / f"tuned{seed}" / "fold_0" / "model.pt" for seed in (1, 2)]


@pytest.fixture(scope="module")
def averaged(runs, tmp_path_factory):
    _, data, members = runs
    out = tmp_path_factory.mktemp("avg_out") / "soup"
    result = CliRunner().invoke(app, [*map(str, data), "-o", str(out), "--average-weights", str(members[0]),
                                      "--average-weights", str(members[1]), "--threads", "1", "--cache", "none"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out, result.output


def test_average_state_dicts_means_floats_and_keeps_counters():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float32), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0], dtype=torch.float32), "n": torch.tensor(9)}
    got = average_state_dicts([a, b])
    assert torch.equal(got["w"], torch.tensor([2.0, 3.5])) and got["w"].dtype == torch.float32
    assert int(got["n"]) == 5


def test_average_is_one_network_per_stage_holding_the_members_mean(runs, averaged):
    _, _, members = runs
    out, _ = averaged
    soup = read_model_checkpoint(out / "model.pt")
    parts = [read_model_checkpoint(p) for p in members]
    assert all(len(soup.networks[s]) == 1 for s in ("coarse", "fine"))
    fine = [p.networks["fine"][0].state_dict for p in parts]
    name = next(n for n, t in fine[0].items() if t.is_floating_point() and not torch.equal(t, fine[1][n]))
    assert torch.allclose(soup.networks["fine"][0].state_dict[name], (fine[0][name] + fine[1][name]) / 2)
    # The localiser both kept from the base is kept as it was.
    coarse = soup.networks["coarse"][0].state_dict
    assert all(torch.equal(coarse[n], parts[0].networks["coarse"][0].state_dict[n]) for n in coarse)


def test_average_is_calibrated_and_scored_on_the_members_fold(runs, averaged):
    root, _, members = runs
    out, output = averaged
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["val_cases"]) == sorted(VAL) and sorted(metrics["per_case"]) == sorted(VAL)
    assert sorted(metrics["train_cases"]) == sorted(TRAIN) and metrics["init_trained_on_held_out"] == []
    assert set(metrics["per_dataset"]) == {"seqA", "seqB"} and "never trained on" in metrics["split"]
    assert metrics["mean"]["dice"] == pytest.approx(np.mean([m["dice"] for m in metrics["per_case"].values()]))
    info = read_model_checkpoint(out / "model.pt").contract.info
    assert info["fold"] == "0" and info["val_cases"] == ",".join(VAL)
    # Its lineage runs through both members to the base.
    assert info["init_from"] == " + ".join(str(p.resolve()) for p in members)
    assert "average of 2 models' weights: calibrating on" in unwrapped(output) and "fold 0's 4 held-out" in unwrapped(output)


def test_average_exports_to_a_file_the_runtime_reads(runs, averaged, tmp_path):
    _, data, _ = runs
    out, _ = averaged
    scan = data[1] / "imagesTr" / "b_004.nii.gz"
    onnx_path = tmp_path / "soup.onnx"
    result = CliRunner().invoke(export_app, [str(out / "model.pt"), "-o", str(onnx_path), "--scan", str(scan)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    prediction = Segmenter(onnx_path, device="cpu", threads=1).predict(str(scan))
    assert prediction.mask.shape == (32, 32, 24) and prediction.report is not None


def test_members_started_from_a_copy_given_by_relative_paths_in_another_case_order_are_averaged(
        runs, tmp_path, monkeypatch):
    root, data, members = runs
    # RUN/model.pt is the run's copy of RUN/fold_0/model.pt: the same weights under another path.
    _train(data, tmp_path / "from_copy", root / "splits.json", "--init-from", str(root / "base" / "model.pt"),
           "--seed", "3", args=TUNE_ARGS)
    reordered = torch.load(members[1], map_location="cpu", weights_only=True)
    info = reordered["contract"]["info"]
    info["val_cases"] = ",".join(reversed(info["val_cases"].split(",")))
    info["train_cases"] = ",".join(reversed(info["train_cases"].split(",")))
    (tmp_path / "reordered").mkdir()
    torch.save(reordered, tmp_path / "reordered" / "model.pt")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*map(str, data), "-o", "soup", "--average-weights", str(members[0]),
                                      "--average-weights", "from_copy/fold_0/model.pt", "--average-weights",
                                      "reordered/model.pt", "--threads", "1", "--cache", "none"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    # The lineage runs through the members (named by absolute paths) to the base they started from.
    lineage = trained_cases(tmp_path / "soup" / "model.pt")
    assert str((tmp_path / "from_copy" / "fold_0" / "model.pt").resolve()) in lineage.visited
    assert str((root / "base" / "model.pt").resolve()) in lineage.visited and lineage.untraced == []
    assert json.loads((tmp_path / "soup" / "metrics.json").read_text())["fold"] == 0


def test_a_stage_trained_apart_or_with_other_batchnorm_statistics_is_refused(runs, tmp_path):
    root, data, members = runs
    splits = root / "splits.json"
    # Only the localiser is shared (its best.pt, kept as it is); the fine stage is trained from scratch.
    _train(data, tmp_path / "fine_apart", splits, "--init-from", str(root / "base" / "fold_0" / "coarse" / "best.pt"),
           "--seed", "5", args=TUNE_ARGS)
    apart = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "x"), "--average-weights",
                                     str(root / "base" / "fold_0" / "model.pt"), "--average-weights",
                                     str(tmp_path / "fine_apart" / "fold_0" / "model.pt"), "--cache", "none"])
    assert apart.exit_code == 2 and "'fine' networks do not start from one network" in unwrapped(apart.output), \
        apart.output
    # The localiser (BatchNorm) trained on from the base: one start, but its statistics moved.
    _train(data, tmp_path / "coarse_tuned", splits, "--init-from", str(root / "base" / "fold_0" / "model.pt"))
    stats = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "x"), "--average-weights", str(members[0]),
                                     "--average-weights", str(tmp_path / "coarse_tuned" / "fold_0" / "model.pt"),
                                     "--cache", "none"])
    assert stats.exit_code == 2 and "'coarse' networks differ in BatchNorm statistics" in unwrapped(stats.output), \
        stats.output
    assert "Traceback" not in apart.output + stats.output and not (tmp_path / "x").exists()


def test_a_failed_write_leaves_no_output_folder(monkeypatch, tmp_path):
    from heartseg.train import ensemble

    def fail(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(ensemble, "save_atomic", fail)
    monkeypatch.setattr(ensemble, "save_calibration", lambda path, calibrations: path.write_bytes(b"png"))
    with pytest.raises(OSError):
        ensemble.write_model_folder(tmp_path / "out", {"mean": {}}, {}, {})
    assert not (tmp_path / "out").exists()


def test_members_trained_apart_or_on_other_folds_are_refused(runs, tmp_path):
    root, data, members = runs
    splits = root / "splits.json"
    # Trained from scratch (no shared start) with the base: a different network to average.
    _train(data, tmp_path / "apart", splits, "--seed", "3")
    apart = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "x"), "--average-weights",
                                     str(root / "base" / "fold_0" / "model.pt"), "--average-weights",
                                     str(tmp_path / "apart" / "fold_0" / "model.pt"), "--cache", "none"])
    assert apart.exit_code == 2 and "do not start from one network" in unwrapped(apart.output), apart.output
    other = tmp_path / "other_splits.json"
    other.write_text(json.dumps({"seed": 0, "folds": [{"fold": 0, "train": TRAIN[1:] + VAL[:1],
                                                       "val": TRAIN[:1] + VAL[1:]}]}))
    _train(data, tmp_path / "other", other, "--init-from", str(root / "base" / "fold_0" / "model.pt"),
           args=TUNE_ARGS)
    fold = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "x"), "--average-weights", str(members[0]),
                                    "--average-weights", str(tmp_path / "other" / "fold_0" / "model.pt")])
    assert fold.exit_code == 2 and "different cases" in unwrapped(fold.output), fold.output
    both = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "x"), "--average-weights", str(members[0]),
                                    "--average-weights", str(members[1]), "--ensemble-of", str(members[0])])
    assert both.exit_code == 2 and "choose one" in unwrapped(both.output), both.output
    steps = CliRunner().invoke(app, [*map(str, data), "-o", str(tmp_path / "x"), "--average-weights", str(members[0]),
                                     "--average-weights", str(members[1]), "--steps", "5"])
    assert steps.exit_code == 2 and "--steps does not apply" in unwrapped(steps.output), steps.output
    assert "Traceback" not in apart.output + fold.output + both.output + steps.output
    assert not (tmp_path / "x").exists()
