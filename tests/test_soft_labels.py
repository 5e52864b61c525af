"""Soft training targets (--soft-labels): the label's share of each voxel of a stage's grid, cached beside the
binary label, drawn by the patch sampler and resampled as a share by the spatial augmentation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the training side needs PyTorch: pip install -e '.[train]'")
import torch
from heartseg.runtime.contract import ModelContract, StageContract
from heartseg.train.augment import AugmentConfig, augment
from heartseg.train.cache import SOFT_SCALE, PreparedCase, prepare_case
from heartseg.train.dataset import read_dataset
from heartseg.train.sampler import PatchSampler, SamplerConfig
from conftest import TINY_TRAIN_ARGS, with_options
from synthetic_dataset import make_msd_dataset


def test_the_cached_soft_label_is_the_share_that_the_binary_label_rounds(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "data", n_cases=1, duplicate=False)
    case = read_dataset(root).cases[0]
    # A grid three times coarser than the scan's (2 x 2 x 2.5 mm): most edge voxels are partly atrium.
    stage = StageContract("fine", (6.0, 6.0, 7.5), (8, 8, 8))
    prepared = prepare_case(case, ModelContract(stages=(stage,)), tmp_path / "cache")
    _, binary = prepared.stages["fine"]
    share = np.asarray(prepared.soft_labels["fine"]) / SOFT_SCALE
    assert share.shape == binary.shape and share.min() >= 0.0 and share.max() <= 1.0
    partial = (share > 0) & (share < 1)
    assert partial.sum() > 0.2 * (share > 0).sum(), "the edge voxels should carry partial shares"
    # The binary label is that share rounded at 0.5 (up to the uint8 quantisation around 0.5).
    clear = np.abs(share - 0.5) > 1.0 / SOFT_SCALE
    assert np.array_equal((share >= 0.5)[clear], binary.astype(bool)[clear])
    # Read back from the cache: the same arrays.
    again = prepare_case(case, ModelContract(stages=(stage,)), tmp_path / "cache")
    assert np.array_equal(np.asarray(again.soft_labels["fine"]), np.asarray(prepared.soft_labels["fine"]))
    # A cache written before soft labels existed is prepared again, not read without them.
    (stored,) = (tmp_path / "cache").glob("*/fine_label_soft.npy")
    stored.unlink()
    rebuilt = prepare_case(case, ModelContract(stages=(stage,)), tmp_path / "cache")
    assert stored.is_file()
    assert np.array_equal(np.asarray(rebuilt.soft_labels["fine"]), np.asarray(prepared.soft_labels["fine"]))


def _soft_case() -> PreparedCase:
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.arange(16)] * 3, indexing="ij")
    distance = np.sqrt((zz - 7.5) ** 2 + (yy - 8.2) ** 2 + (xx - 7.1) ** 2)
    share = np.clip(4.5 - distance, 0.0, 1.0)  # a ball whose edge voxels are partly inside
    soft = np.round(share * SOFT_SCALE).astype(np.uint8)
    binary = (soft >= SOFT_SCALE / 2).astype(np.uint8)
    image = (rng.standard_normal(share.shape) + 3 * share).astype(np.float32)
    return PreparedCase("a0", image, binary, (1.0, 1.0, 1.0), {"fine": (image, binary)}, "A", {"fine": soft})


def test_the_sampler_draws_soft_targets_at_the_same_places_as_binary_ones() -> None:
    case = _soft_case()
    stage = StageContract("fine", (1.0, 1.0, 1.0), (8, 8, 8))
    identity = AugmentConfig.identity()
    hard_images, hard = PatchSampler([case], stage, SamplerConfig(batch_size=4), identity, seed=2).sample()
    soft_images, soft = PatchSampler([case], stage, SamplerConfig(batch_size=4, soft_labels=True), identity,
                                     seed=2).sample()
    assert torch.equal(hard_images, soft_images)
    assert ((soft > 0) & (soft < 1)).any() and soft.min() >= 0 and soft.max() <= 1
    assert torch.equal((soft >= 0.5).float(), hard)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}


def test_spatial_augmentation_resamples_a_soft_label_as_a_share() -> None:
    case = _soft_case()
    image = torch.from_numpy(case.image)[None]
    share = torch.from_numpy(case.soft_labels["fine"].astype(np.float32) / SOFT_SCALE)[None]
    binary = torch.from_numpy(case.label.astype(np.float32))[None]
    config = replace(AugmentConfig.identity(), p_spatial=1.0, rotation_deg=30.0, scale_range=(0.8, 0.8))
    hard_image, hard = augment(image, binary, config, torch.Generator().manual_seed(5))
    soft_image, soft = augment(image, share, config, torch.Generator().manual_seed(5), soft_label=True)
    assert torch.equal(hard_image, soft_image)  # the same draws
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert ((soft > 0.05) & (soft < 0.95)).sum() > 0.2 * (soft > 0.05).sum()
    assert soft.min() >= 0 and soft.max() <= 1
    # Both describe the same moved ball: its rounded share and the nearest-neighbour label nearly agree.
    agree = ((soft >= 0.5) == (hard >= 0.5)).float().mean()
    assert agree > 0.97, agree


@pytest.mark.parametrize("flag, soft", [("--soft-labels", True), ("--hard-labels", False)])
def test_a_run_trains_every_stage_on_the_targets_it_was_given(tmp_path: Path, monkeypatch, flag: str,
                                                              soft: bool) -> None:
    from heartseg.train import trainer
    from heartseg.train.cli import app
    from typer.testing import CliRunner

    data = make_msd_dataset(tmp_path / "data", n_cases=4, shape=(24, 24, 16))
    drawn: dict[str, list[torch.Tensor]] = {}

    class Recording(PatchSampler):
        def sample(self):
            images, labels = super().sample()
            drawn.setdefault(self.stage.name, []).append(labels)
            return images, labels

    monkeypatch.setattr(trainer, "PatchSampler", Recording)
    args = with_options(TINY_TRAIN_ARGS, folds="2", steps="2", coarse_steps="2")
    result = CliRunner().invoke(app, [str(data), "-o", str(tmp_path / "run"), *args, flag])
    assert result.exit_code in (0, 1), (result.output, result.exception)  # 2 steps may not calibrate
    assert drawn
    labels = torch.cat([d.flatten() for batches in drawn.values() for d in batches])
    fractional = ((labels > 0) & (labels < 1)).any()
    assert bool(fractional) == soft
    assert set(drawn) == {"coarse", "fine"}
    for stage, batches in drawn.items():
        share = torch.cat([d.flatten() for d in batches])
        assert bool(((share > 0) & (share < 1)).any()) == soft, stage
