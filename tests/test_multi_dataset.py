"""heartseg-train on several datasets: stratified folds, balanced sampling, per-dataset reports,
plausibility learned from the training labels, fixed splits and --init-from."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the training side needs PyTorch: pip install -e '.[train]'")
import torch
from conftest import TINY_TRAIN_ARGS, unwrapped, with_options
from heartseg.runtime.formats.nifti import load_volume
from heartseg.runtime.qc import interior_rank, learn_plausibility, mask_measures
from heartseg.train.augment import AugmentConfig
from heartseg.train.cache import PreparedCase
from heartseg.train.cli import app
from heartseg.train.lineage import trained_cases
from heartseg.train.sampler import PatchSampler, SamplerConfig, WorkerBatches, sampler_reach
from heartseg.train.unet import UNetConfig, build_unet
from heartseg.runtime.contract import StageContract
from synthetic_dataset import make_msd_dataset
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def two_sequences(tmp_path_factory) -> tuple[Path, Path]:
    """Two 'sequences': bright small atria on a dark background, and dim large atria on a brighter one."""
    root = tmp_path_factory.mktemp("two")
    seq_a = make_msd_dataset(root / "seqA", n_cases=6, prefix="a", duplicate=False)
    seq_b = make_msd_dataset(root / "seqB", n_cases=6, prefix="b", duplicate=False, seed=100, radius=(0.22, 0.28),
                             atrium=55.0, background=120.0)
    return seq_a, seq_b


@pytest.fixture(scope="module")
def two_run(tmp_path_factory, two_sequences):
    run = tmp_path_factory.mktemp("two_run") / "run"
    result = CliRunner().invoke(app, [*map(str, two_sequences), "-o", str(run), *TINY_TRAIN_ARGS])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return run, result.output


def test_folds_are_stratified_by_dataset(two_run):
    run, _ = two_run
    splits = json.loads((run / "splits.json").read_text())["folds"]
    for fold in splits:
        assert {c[0] for c in fold["val"]} == {"a", "b"}, fold
        assert sum(c.startswith("a") for c in fold["val"]) == 2 and sum(c.startswith("b") for c in fold["val"]) == 2


def test_reports_are_broken_down_per_dataset(two_run):
    run, output = two_run
    metrics = json.loads((run / "fold_0" / "metrics.json").read_text())
    assert set(metrics["per_dataset"]) == {"seqA", "seqB"}
    for name, prefix in (("seqA", "a"), ("seqB", "b")):
        cases = {k: v for k, v in metrics["per_case"].items() if k.startswith(prefix)}
        assert all(v["dataset"] == name for v in cases.values())
        assert metrics["per_dataset"][name]["cases"] == len(cases) == 2
        assert metrics["per_dataset"][name]["dice"] == pytest.approx(np.mean([v["dice"] for v in cases.values()]))
        assert metrics["per_dataset"][name]["dice"] > 0.7, metrics["per_dataset"]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["per_dataset"]) == {"seqA", "seqB"}
    text = unwrapped(output)
    assert "validation Dice" in text and "seqA" in text and "seqB" in text
    plan = json.loads((run / "plan.json").read_text())
    assert set(plan["fingerprint"]) == {"seqA", "seqB"} and "fine_spacing" in plan["why"]


def test_plausibility_is_learned_from_the_training_labels_in_physical_units(two_run, two_sequences):
    run, _ = two_run
    model = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    stored = model["contract"]["plausibility"]
    train_ids = set(model["metrics"]["train_cases"])
    labels, ranks = [], []
    for root in two_sequences:
        for path in sorted((root / "labelsTr").glob("*.nii.gz")):
            if path.name.removesuffix(".nii.gz") in train_ids:
                volume = load_volume(path)
                labels.append((volume.data > 0.5, volume.spacing))
                ranks.append(interior_rank(load_volume(root / "imagesTr" / path.name).data, labels[-1][0],
                                           volume.spacing))
    expected = learn_plausibility(labels, interior_rank=ranks)
    assert stored["volume_ml"] == pytest.approx(list(expected.volume_ml))
    # How bright the atrium's interior is among its surroundings, from the training scans under their labels.
    assert stored["interior_rank"] == pytest.approx(list(expected.interior_rank))
    assert np.allclose(stored["extent_mm"], expected.extent_mm)
    volumes = [mask_measures(m, s)[0] for m, s in labels]
    # Sequence B's atria are several times larger: the range spans both, with the margin around it.
    assert max(volumes) / min(volumes) > 3
    assert stored["volume_ml"][0] == pytest.approx(min(volumes) / 1.5)
    assert stored["volume_ml"][1] == pytest.approx(max(volumes) * 1.5)


def _case(name: str, dataset: str, seed: int) -> PreparedCase:
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((12, 12, 12)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[4:8, 4:8, 4:8] = 1
    return PreparedCase(name, image, label, (1.0, 1.0, 1.0), {"fine": (image, label)}, dataset)


def test_sampling_is_balanced_per_dataset_not_per_case():
    cases = [_case("a0", "A", 0)] + [_case(f"b{i}", "B", i + 1) for i in range(9)]
    stage = StageContract("fine", (1.0, 1.0, 1.0), (8, 8, 8))
    sampler = PatchSampler(cases, stage, SamplerConfig(batch_size=1), AugmentConfig.identity(), seed=3)
    picks = [cases[sampler._case_index()].dataset for _ in range(4000)]
    share_a = picks.count("A") / len(picks)
    # Uniform over cases would give A 10 %.
    assert 0.46 < share_a < 0.54, share_a


def test_permuted_patches_keep_the_patch_shape_and_image_label_alignment():
    case = _case("a0", "A", 0)
    case.stages["fine"] = (case.label.astype(np.float32) * 5, case.label)
    stage = StageContract("fine", (1.0, 1.0, 1.0), (8, 6, 4), divisor=2)
    config = AugmentConfig(flip_axes=(0, 1, 2), p_permute=1.0, p_spatial=0.0, intensity_scale=(1.0, 1.0),
                           intensity_shift=0.0, p_gamma=0.0, p_noise=0.0, p_bias=0.0)
    sampler = PatchSampler([case], stage, SamplerConfig(batch_size=4, foreground_fraction=1.0), config, seed=0)
    for _ in range(5):
        images, labels = sampler.sample()
        assert tuple(images.shape[2:]) == (8, 6, 4) and tuple(labels.shape[2:]) == (8, 6, 4)
        assert torch.equal(images, labels * 5)


def _cut_slab(changed: np.ndarray, padding: np.ndarray) -> int | None:
    """The axis of a slab beyond one plane that holds every changed voxel and only padding, if there is one."""
    for axis in range(3):
        for n in range(1, changed.shape[axis]):
            for beyond in (slice(0, n), slice(n, None)):
                slab = np.zeros_like(changed)
                slab[(slice(None),) * axis + (beyond,)] = True
                if not changed[~slab].any() and padding[slab].all():
                    return axis
    return None


def test_fov_cut_ends_the_patch_at_a_plane_through_the_atrium():
    rng = np.random.default_rng(0)
    label = np.zeros((16, 16, 16), np.uint8)
    label[5:11, 4:12, 6:10] = 1
    image = (rng.uniform(1.0, 2.0, label.shape) + 5 * label).astype(np.float32)
    image[0, 0, 0] = -3.0  # the volume's minimum: what a crop past the scan's edge is padded with
    case = PreparedCase("a0", image, label, (1.0, 1.0, 1.0), {"fine": (image, label)}, "A")
    stage = StageContract("fine", (1.0, 1.0, 1.0), (8, 8, 8))
    sampler_config = SamplerConfig(batch_size=1, foreground_fraction=1.0)
    seen = set()
    for seed in range(40):
        plain_image, plain_label = PatchSampler([case], stage, sampler_config, AugmentConfig.identity(), seed).sample()
        cut = PatchSampler([case], stage, sampler_config, replace(AugmentConfig.identity(), p_fov_cut=1.0), seed)
        cut_image, cut_label = cut.sample()
        changed = (cut_image != plain_image).numpy()[0, 0] | (cut_label != plain_label).numpy()[0, 0]
        if not changed.any():  # a slab of padding already
            continue
        padding = (cut_image.numpy()[0, 0] == -3.0) & (cut_label.numpy()[0, 0] == 0)
        axis = _cut_slab(changed, padding)
        assert axis is not None, "the changed voxels are not padding beyond one plane"
        seen.add(axis)
        # The plane goes through the atrium: some of it is left, some cut away.
        assert 0 < cut_label.sum() < plain_label.sum()
    assert seen == {0, 1, 2}


def test_fov_cut_off_keeps_the_patches_of_earlier_runs():
    case = _case("a0", "A", 0)
    stage = StageContract("fine", (1.0, 1.0, 1.0), (8, 8, 8))
    default = PatchSampler([case], stage, SamplerConfig(batch_size=2), AugmentConfig(), seed=4)
    explicit = PatchSampler([case], stage, SamplerConfig(batch_size=2), replace(AugmentConfig(), p_fov_cut=0.0), 4)
    cutting = PatchSampler([case], stage, SamplerConfig(batch_size=2), replace(AugmentConfig(), p_fov_cut=0.5), 4)
    first = [default.sample()[0] for _ in range(3)]
    assert all(torch.equal(a, explicit.sample()[0]) for a in first)
    assert not all(torch.equal(a, cutting.sample()[0]) for a in first)


def _tiny_args(steps: str) -> list[str]:
    return with_options(TINY_TRAIN_ARGS, steps=steps, coarse_steps=steps)


def _first_conv(state: dict) -> torch.Tensor:
    return next(v for k, v in state.items() if k.endswith(".weight") and v.dim() == 5)


def test_init_from_starts_from_the_given_weights(two_run, two_sequences, tmp_path):
    run, _ = two_run
    start = run / "model.pt"
    # --lr applies to the full-resolution network: at 1e-12 its weights stay where they started.
    tuned, scratch = tmp_path / "tuned", tmp_path / "scratch"
    for folder, extra in ((tuned, ["--init-from", str(start)]), (scratch, [])):
        result = CliRunner().invoke(app, [str(two_sequences[1]), "-o", str(folder), *extra, *_tiny_args("2"),
                                          "--lr", "1e-12"])
        assert result.exit_code in (0, 1), f"{result.output}\n{result.exception!r}"
    before = torch.load(start, map_location="cpu", weights_only=True)["networks"]["fine"]["state_dict"]
    after = torch.load(tuned / "fold_0" / "fine" / "best.pt",
                       map_location="cpu", weights_only=True)["model"]
    fresh = torch.load(scratch / "fold_0" / "fine" / "best.pt", map_location="cpu", weights_only=True)["model"]
    for key, value in before.items():
        if key.endswith(".weight") and value.dim() == 5:  # convolutions; BatchNorm statistics move with the data
            assert torch.allclose(after[key], value, atol=1e-6), key
    assert not torch.allclose(_first_conv(fresh), _first_conv(before), atol=1e-3)


@pytest.mark.parametrize("checkpoint", ["best.pt", "last.pt"])
def test_init_from_one_stages_checkpoint_starts_that_stage_only(two_run, two_sequences, tmp_path, checkpoint):
    run, _ = two_run
    source = run / "fold_0" / "fine" / checkpoint
    tuned = tmp_path / "tuned"
    result = CliRunner().invoke(app, [str(two_sequences[1]), "-o", str(tuned), "--init-from", str(source),
                                      *_tiny_args("2"), "--lr", "1e-12"])
    assert result.exit_code in (0, 1), f"{result.output}\n{result.exception!r}"
    before = torch.load(source, map_location="cpu", weights_only=True)["model"]
    after = torch.load(tuned / "fold_0" / "fine" / "best.pt", map_location="cpu", weights_only=True)["model"]
    for key, value in before.items():
        if key.endswith(".weight") and value.dim() == 5:  # convolutions; BatchNorm statistics move with the data
            assert torch.allclose(after[key], value, atol=1e-6), key
    # The localiser was not in the source: it starts from its own initialisation.
    source_coarse = _stage_weights(run / "model.pt", "coarse")
    coarse = torch.load(tuned / "fold_0" / "coarse" / "best.pt", map_location="cpu", weights_only=True)["model"]
    assert not torch.allclose(_first_conv(coarse), _first_conv(source_coarse), atol=1e-3)
    # Its run's split says which cases trained it.
    lineage = trained_cases(source)
    assert lineage.untraced == []
    assert lineage.trained == set(json.loads((run / "splits.json").read_text())["folds"][0]["train"])


def _stage_weights(path: Path, stage: str) -> dict:
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data["networks"][stage]["state_dict"] if "networks" in data else data["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero_steps_keep_the_stages_of_later_init_from_sources(two_run, two_sequences, tmp_path):
    run, _ = two_run
    other = tmp_path / "other"
    result = CliRunner().invoke(app, [*map(str, two_sequences), "-o", str(other), *TINY_TRAIN_ARGS, "--seed", "5"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert not _same(_stage_weights(run / "model.pt", "coarse"), _stage_weights(other / "model.pt", "coarse"))
    # Every stage from the first run's model, then the localiser replaced by the second run's.
    kept = tmp_path / "kept"
    result = CliRunner().invoke(app, [*map(str, two_sequences), "-o", str(kept), *_tiny_args("0"),
                                      "--init-from", str(run / "model.pt"),
                                      "--init-from", str(other / "fold_0" / "coarse" / "best.pt")])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert _same(_stage_weights(kept / "model.pt", "fine"), _stage_weights(run / "model.pt", "fine"))
    assert _same(_stage_weights(kept / "model.pt", "coarse"), _stage_weights(other / "model.pt", "coarse"))
    assert "kept its --init-from weights" in unwrapped(result.output)
    metrics = json.loads((kept / "fold_0" / "metrics.json").read_text())
    assert metrics["stages"]["fine"]["steps"] == 0 and 0.0 <= metrics["stages"]["fine"]["best_dice"] <= 1.0
    assert not (kept / "fold_0" / "fine" / "last.pt").exists()
    info = torch.load(kept / "model.pt", map_location="cpu", weights_only=True)["contract"]["info"]
    assert info["init_from"] == f"{(run / 'model.pt').resolve()} + {(other / 'fold_0' / 'coarse' / 'best.pt').resolve()}"
    # The second run split the cases by another seed: some of this fold's held-out cases trained its localiser,
    # which the run names (the first run's split is this run's).
    held_out = json.loads((kept / "splits.json").read_text())["folds"][0]["val"]
    other_train = json.loads((other / "splits.json").read_text())["folds"][0]["train"]
    assert metrics["init_trained_on_held_out"] == sorted(set(held_out) & set(other_train))
    assert metrics["init_trained_on_held_out"] and "overstate" in unwrapped(result.output)


def test_zero_steps_for_a_stage_no_source_holds_is_refused(two_run, two_sequences, tmp_path):
    run, _ = two_run
    args = [*map(str, two_sequences), "-o", str(tmp_path / "x"), *_tiny_args("0"),
            "--init-from", str(run / "fold_0" / "fine" / "best.pt")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "--coarse-steps 0 keeps the localiser" in unwrapped(result.output)
    assert not (tmp_path / "x").exists()


def test_zero_steps_without_init_from_is_refused_before_any_run_folder(two_sequences, tmp_path):
    result = CliRunner().invoke(app, [str(two_sequences[0]), "-o", str(tmp_path / "x"), *_tiny_args("0")])
    assert result.exit_code == 2, result.output
    assert "--coarse-steps 0" in unwrapped(result.output) and "--init-from" in unwrapped(result.output)
    assert not (tmp_path / "x").exists()


def test_init_from_a_best_checkpoint_outside_its_run_is_refused(two_run, two_sequences, tmp_path):
    run, _ = two_run
    lone = tmp_path / "lone" / "best.pt"
    lone.parent.mkdir()
    lone.write_bytes((run / "fold_0" / "fine" / "best.pt").read_bytes())
    result = CliRunner().invoke(app, [str(two_sequences[0]), "-o", str(tmp_path / "x"), "--init-from", str(lone),
                                      *TINY_TRAIN_ARGS])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "inside its run folder" in unwrapped(result.output)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("width,extra", [("2", []), ("4", ["--norm", "batch"])])
def test_init_from_a_different_network_is_refused_before_training(two_run, two_sequences, tmp_path, width, extra):
    run, _ = two_run
    args = [str(two_sequences[0]), "-o", str(tmp_path / "x"), "--init-from", str(run / "model.pt"),
            *with_options(TINY_TRAIN_ARGS, width=width), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    output = unwrapped(result.output)
    assert "Traceback" not in result.output and "is not the one this run trains" in output
    assert "only its channels may grow" in output
    assert not (tmp_path / "x" / "fold_0").exists()


def test_init_from_with_a_larger_width_grows_the_network_it_starts_from(two_run, two_sequences, tmp_path):
    run, _ = two_run
    grown, reseeded = tmp_path / "grown", tmp_path / "reseeded"
    for folder, seed in ((grown, "0"), (reseeded, "7")):
        result = CliRunner().invoke(app, [str(two_sequences[1]), "-o", str(folder), "--init-from", str(run / "model.pt"),
                                          *with_options(_tiny_args("2"), width="6"), "--lr", "1e-12", "--seed", seed])
        assert result.exit_code in (0, 1), f"{result.output}\n{result.exception!r}"
        logged = re.sub(r"\s*\w+\.py:\d+\s*", " ", unwrapped(result.output))  # rich's log column out of the way
        assert "grown from [4, 8, 16, 32] to [6, 12, 24, 48] channels" in logged
    # Runs from one source grow it the same way whatever their seed, so their weights can be averaged.
    first, second = (_stage_weights(f / "fold_0" / "fine" / "best.pt", "fine") for f in (grown, reseeded))
    for key, value in first.items():
        if key.endswith(".weight") and value.dim() == 5:
            torch.testing.assert_close(second[key], value, rtol=0, atol=1e-6)
    source = torch.load(run / "model.pt", map_location="cpu", weights_only=True)["networks"]["fine"]
    small, big = UNetConfig.from_dict(source["unet"]), UNetConfig.from_dict({**source["unet"], "base_channels": 6})
    before, after = build_unet(small).eval(), build_unet(big).eval()
    before.load_state_dict(source["state_dict"])
    after.load_state_dict(first)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = before(x)
        torch.testing.assert_close(after(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_given_splits_fix_the_held_out_cases(two_sequences, tmp_path):
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"seed": 0, "folds": [{"fold": 0, "train": ["b_000", "b_001", "b_002"],
                                                         "val": ["a_004", "b_005"]}]}))
    run = tmp_path / "fixed"
    args = [*map(str, two_sequences), "-o", str(run), "--splits", str(splits), *_tiny_args("4")]
    result = CliRunner().invoke(app, args)
    # Four steps may not give a plausible mask: training then stops at calibration, after the split was used.
    assert result.exit_code in (0, 1), result.output
    stored = json.loads((run / "splits.json").read_text())["folds"]
    assert stored == [{"fold": 0, "train": ["b_000", "b_001", "b_002"], "val": ["a_004", "b_005"]}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"seed": 0, "folds": [{"fold": 0, "train": ["a_000"], "val": ["nope"]}]}))
    result = CliRunner().invoke(app, [*map(str, two_sequences), "-o", str(tmp_path / "y"), "--splits", str(bad),
                                      *TINY_TRAIN_ARGS])
    assert result.exit_code == 2 and "nope" in unwrapped(result.output)


def test_worker_processes_draw_batches_of_their_own():
    cases = [_case("a0", "A", 0), _case("b0", "B", 1)]
    stage = StageContract("fine", (1.0, 1.0, 1.0), (8, 8, 8))
    sampler = PatchSampler(cases, stage, SamplerConfig(batch_size=3), AugmentConfig(), seed=5)
    batches = WorkerBatches(sampler, workers=2, seed=5)
    try:
        drawn = [batches.next() for _ in range(6)]
    finally:
        batches.close()
    for images, labels in drawn:
        assert tuple(images.shape) == (3, 1, 8, 8, 8) and tuple(labels.shape) == (3, 1, 8, 8, 8)
        assert set(labels.unique().tolist()) <= {0.0, 1.0}
    # Each worker reseeds its copy of the sampler: no two batches repeat.
    flat = [images.flatten() for images, _ in drawn]
    assert all(not torch.equal(flat[i], flat[j]) for i in range(6) for j in range(i + 1, 6))


def test_reseeded_sampler_is_repeatable_and_leaves_the_original_alone():
    cases = [_case("a0", "A", 0)]
    stage = StageContract("fine", (1.0, 1.0, 1.0), (8, 8, 8))
    sampler = PatchSampler(cases, stage, SamplerConfig(batch_size=2), AugmentConfig(), seed=5)
    reference = PatchSampler(cases, stage, SamplerConfig(batch_size=2), AugmentConfig(), seed=5).sample()[0]
    first, second = sampler.reseeded(9).sample()[0], sampler.reseeded(9).sample()[0]
    assert torch.equal(first, second) and not torch.equal(first, reference)
    assert torch.equal(sampler.sample()[0], reference)


def test_dataset_weights_set_how_often_each_dataset_is_drawn():
    cases = [_case("a0", "A", 0)] + [_case(f"b{i}", "B", i + 1) for i in range(3)]
    stage = StageContract("fine", (1.0, 1.0, 1.0), (8, 8, 8))
    sampler = PatchSampler(cases, stage, SamplerConfig(batch_size=1, dataset_weights={"B": 3.0}),
                           AugmentConfig.identity(), seed=3)
    picks = [cases[sampler._case_index()].dataset for _ in range(4000)]
    share_b = picks.count("B") / len(picks)
    assert 0.72 < share_b < 0.78, share_b


def test_without_dataset_weights_the_draws_are_those_of_earlier_runs():
    cases = [_case("a0", "A", 0), _case("b0", "B", 1)]
    stage = StageContract("fine", (1.0, 1.0, 1.0), (8, 8, 8))
    sampler = PatchSampler(cases, stage, SamplerConfig(batch_size=1), AugmentConfig.identity(), seed=3)
    reference = np.random.default_rng(3)
    for _ in range(50):
        expected = int(reference.integers(2))
        reference.integers(1)  # the case within the dataset
        assert sampler._case_index() == expected


@pytest.mark.parametrize("spacing,patch,box", [(1.25, (16, 16, 16), (3, 3, 3)), (1.25, (16, 16, 16), (10, 12, 14)),
                                               (0.625, (24, 16, 8), (4, 6, 8))])
def test_sampler_reach_bounds_every_patch_drawn(spacing, patch, box):
    stage = StageContract("fine", (spacing,) * 3, patch, crop_margin_mm=6.0)
    shape = (120, 120, 120)
    lo = np.array([50, 45, 40])
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(a, a + b) for a, b in zip(lo, box))] = 1
    case = PreparedCase("a0", label.astype(np.float32), label, (spacing,) * 3, {"fine": (label, label)}, "A")
    sampler = PatchSampler([case], stage, SamplerConfig(batch_size=1), AugmentConfig(p_permute=0.5), seed=0)
    below = above = 0
    for _ in range(3000):
        crop = sampler.patch[np.argsort(sampler._permutation())]
        origin = sampler._origin(0, crop)
        below = max(below, int((lo - origin).max()))
        above = max(above, int((origin + crop - (lo + np.array(box))).max()))
    reach = sampler_reach(stage)
    assert below <= reach.min() and above <= reach.min()
    assert max(below, above) >= reach.max() - 1  # and no wider than needed


def test_thick_slices_blur_the_patch_along_one_axis_and_keep_the_label():
    case = _case("a0", "A", 0)
    stage = StageContract("fine", (1.0, 1.0, 1.0), (8, 8, 8))
    config = SamplerConfig(batch_size=1)  # one patch: the slab's draws come after its place is drawn
    plain = PatchSampler([case], stage, config, AugmentConfig.identity(), seed=3)
    thick = PatchSampler([case], stage, config, replace(AugmentConfig.identity(), p_thick_slice=1.0,
                                                       thick_slice_mm=(2.5, 2.5)), seed=3)
    (plain_image, plain_label), (thick_image, thick_label) = plain.sample(), thick.sample()
    assert torch.equal(plain_label, thick_label)
    assert not torch.equal(plain_image, thick_image)
    # Slab means only average: no value outside the patch's own range.
    assert thick_image.min() >= plain_image.min() - 1e-5 and thick_image.max() <= plain_image.max() + 1e-5


def test_thick_slices_off_keep_the_patches_of_earlier_runs():
    case = _case("a0", "A", 0)
    stage = StageContract("fine", (1.0, 1.0, 1.0), (8, 8, 8))
    default = PatchSampler([case], stage, SamplerConfig(batch_size=2), AugmentConfig(), seed=4)
    thick = PatchSampler([case], stage, SamplerConfig(batch_size=2), replace(AugmentConfig(), p_thick_slice=0.5), 4)
    first = [default.sample()[0] for _ in range(3)]
    assert not all(torch.equal(a, thick.sample()[0]) for a in first)
    again = PatchSampler([case], stage, SamplerConfig(batch_size=2), replace(AugmentConfig(), p_thick_slice=0.0), 4)
    assert all(torch.equal(a, again.sample()[0]) for a in first)
