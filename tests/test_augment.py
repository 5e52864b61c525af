"""Tests for heartseg.train.augment."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("torch", reason="the training side needs PyTorch: pip install -e '.[train]'")
import torch
from heartseg.train.augment import AugmentConfig, augment

torch.set_num_threads(1)

# Everything on, with certainty, so each test exercises every branch.
ALL_ON = AugmentConfig(flip_axes=(0, 1, 2), p_flip=0.5, p_spatial=1.0, p_gamma=1.0, p_noise=1.0)


def _sample(shape: tuple[int, int, int] = (12, 16, 20), channels: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    label = torch.zeros(1, *shape)
    label[:, 3:9, 4:12, 5:13] = 1.0
    image = label.repeat(channels, 1, 1, 1) * 2.0 + 0.3 * torch.randn(channels, *shape, generator=gen)
    return image, label


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("seed", range(5))
def test_shapes_dtypes_and_binary_label(seed: int) -> None:
    image, label = _sample()
    out_image, out_label = augment(image, label, ALL_ON, _rng(seed))
    assert out_image.shape == image.shape and out_image.dtype == image.dtype
    assert out_label.shape == label.shape and out_label.dtype == label.dtype
    assert set(out_label.unique().tolist()) <= {0.0, 1.0}
    assert torch.isfinite(out_image).all()


def test_integer_label_keeps_dtype() -> None:
    image, label = _sample()
    _, out_label = augment(image, label.to(torch.uint8), ALL_ON, _rng(0))
    assert out_label.dtype == torch.uint8
    assert set(out_label.unique().tolist()) <= {0, 1}


def test_identity_config_leaves_inputs_unchanged() -> None:
    image, label = _sample()
    image_copy, label_copy = image.clone(), label.clone()
    out_image, out_label = augment(image, label, AugmentConfig.identity(), _rng(0))
    assert torch.equal(out_image, image) and torch.equal(out_label, label)
    # Also with everything on, the inputs themselves must not be modified in place.
    augment(image, label, ALL_ON, _rng(0))
    assert torch.equal(image, image_copy) and torch.equal(label, label_copy)


def test_default_config_flips_and_permutes_every_axis() -> None:
    # Datasets disagree on which array axis is left, anterior or superior.
    config = AugmentConfig()
    assert config.flip_axes == (0, 1, 2) and config.p_flip > 0 and config.p_permute > 0


def test_bias_field_is_smooth_bounded_and_keeps_the_background() -> None:
    from heartseg.train.augment import _bias_field

    image = torch.full((1, 16, 16, 16), 2.0)
    image[0, 0, 0, 0] = 0.0  # the background level the field multiplies away from
    out = _bias_field(image, 0.4, _rng(3))
    gain = out[0] / 2.0
    gain[0, 0, 0] = gain[0, 0, 1]  # the background voxel itself stays 0
    assert float(out[0, 0, 0, 0]) == 0.0
    assert float(gain.max()) <= np.exp(0.4) + 1e-5 and float(gain.min()) >= np.exp(-0.4) - 1e-5
    assert float((gain.max() - gain.min())) > 0.01  # it does change the intensities
    # Smooth: neighbouring voxels differ by a small fraction of the whole range.
    assert float((gain[1:] - gain[:-1]).abs().max()) < 0.1


def test_deterministic_with_same_seed() -> None:
    image, label = _sample()
    a = augment(image, label, ALL_ON, _rng(7))
    b = augment(image, label, ALL_ON, _rng(7))
    c = augment(image, label, ALL_ON, _rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_rotation_changes_image_and_moves_label_with_it() -> None:
    image, label = _sample(channels=1)
    cfg = AugmentConfig(
        rotation_deg=30.0,
        off_axis_rotation_deg=0.0,
        scale_range=(1.0, 1.0),
        p_spatial=1.0,
        intensity_scale=(1.0, 1.0),
        intensity_shift=0.0,
        p_gamma=0.0,
        p_noise=0.0,
    )
    changed = 0
    for seed in range(4):
        out_image, out_label = augment(image, label, cfg, _rng(seed))
        if (out_image - image).abs().max() > 0.5:
            changed += 1
        # Image and label are warped by the same transform: the bright region tracks the label.
        inside = out_image[out_label.bool()].mean()
        outside = out_image[~out_label.bool()].mean()
        assert inside > outside + 1.0
        # An in-plane rotation leaves depth slices' foreground counts roughly intact.
        assert abs(float(out_label.sum() - label.sum())) < 0.25 * float(label.sum())
    assert changed >= 3


def test_flip_only_on_listed_axes() -> None:
    image, label = _sample()
    cfg = AugmentConfig.identity()
    cfg.flip_axes = (2,)
    cfg.p_flip = 1.0
    out_image, out_label = augment(image, label, cfg, _rng(0))
    assert torch.equal(out_image, image.flip(3)) and torch.equal(out_label, label.flip(3))


def test_gamma_keeps_range() -> None:
    image, label = _sample()
    cfg = AugmentConfig.identity()
    cfg.p_gamma = 1.0
    cfg.gamma_range = (0.5, 0.5)
    out_image, _ = augment(image, label, cfg, _rng(0))
    for c in range(image.shape[0]):
        assert float(out_image[c].min()) == pytest.approx(float(image[c].min()), abs=1e-5)
        assert float(out_image[c].max()) == pytest.approx(float(image[c].max()), abs=1e-5)
    assert not torch.allclose(out_image, image)


def test_rejects_bad_inputs() -> None:
    image, label = _sample()
    with pytest.raises(ValueError):
        augment(image[None], label[None], AugmentConfig(), _rng(0))
    with pytest.raises(ValueError):
        augment(image, label[:, :-1], AugmentConfig(), _rng(0))
    with pytest.raises(ValueError):
        AugmentConfig(flip_axes=(3,))


def test_inversion_negates_the_intensities_and_keeps_the_label() -> None:
    image, label = _sample()
    config = replace(AugmentConfig.identity(), p_invert=1.0)
    out_image, out_label = augment(image, label, config, _rng(0))
    assert torch.equal(out_image, -image) and torch.equal(out_label, label)


@pytest.mark.parametrize("option", ["p_invert", "p_dark_pool"])
def test_an_option_off_keeps_the_random_streams_of_earlier_configurations(monkeypatch, option: str) -> None:
    from heartseg.train import augment as module

    image, label = _sample()
    draws: list[float] = []
    real = module._chance
    monkeypatch.setattr(module, "_chance", lambda rng, p: draws.append(p) or real(rng, p))
    augment(image, label, ALL_ON, _rng(4))
    without = len(draws)
    draws.clear()
    augment(image, label, replace(ALL_ON, **{option: 1e-9}), _rng(4))
    # Off, no number is drawn for it (so earlier runs repeat); on, exactly one.
    assert getattr(ALL_ON, option) == 0.0 and len(draws) == without + 1 and 1e-9 in draws


def test_inversion_probability_is_checked() -> None:
    from heartseg.train.options import ConfigError

    with pytest.raises(ConfigError, match="p_invert"):
        AugmentConfig(p_invert=1.5)


def _box_sample(shape: tuple[int, int, int] = (20, 20, 20)) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright cube (the blood pool) on a dark, noisy background."""
    gen = torch.Generator().manual_seed(7)
    label = torch.zeros(1, *shape)
    label[:, 4:16, 4:16, 4:16] = 1.0
    return label * 2.0 + 0.1 * torch.randn(1, *shape, generator=gen), label


def test_dark_pool_darkens_the_interior_spares_the_edge_and_the_outside_keeps_the_label() -> None:
    image, label = _box_sample()
    darkening = 1.5
    config = replace(AugmentConfig.identity(), p_dark_pool=1.0, dark_pool_sd=(darkening, darkening), dark_pool_depth=2)
    out_image, out_label = augment(image, label, config, _rng(0))
    change = (out_image - image)[0]
    spread = float(image.std())
    assert torch.equal(out_label, label)
    # Outside the label nothing changes; its outermost layer (the wall) darkens far less than the pool.
    assert float(change[label[0] == 0].abs().max()) == 0.0
    assert float(change[4, 4:16, 4:16].abs().max()) < 0.25 * darkening * spread
    # Deep inside, the full darkening; in between, less.
    assert float(change[8:12, 8:12, 8:12].min()) == pytest.approx(-darkening * spread, rel=1e-5)
    assert float(change[8:12, 8:12, 8:12].max()) == pytest.approx(-darkening * spread, rel=1e-5)
    assert -darkening * spread < float(change[5, 10, 10]) < 0.0
    # The pool ends up darker than its edge, which stays brighter than the background.
    assert float(out_image[0, 8:12, 8:12, 8:12].mean()) < float(out_image[0, 4, 4:16, 4:16].mean())


def test_dark_pool_options_are_checked() -> None:
    from heartseg.train.options import ConfigError

    with pytest.raises(ConfigError, match="p_dark_pool"):
        AugmentConfig(p_dark_pool=-0.1)
    with pytest.raises(ConfigError, match="dark_pool_depth"):
        AugmentConfig(dark_pool_depth=0)
    with pytest.raises(ValueError, match="dark_pool_sd"):
        AugmentConfig(dark_pool_sd=(2.0, 1.0))


def test_thick_slices_spread_a_step_along_one_axis_only_and_keep_a_ramp() -> None:
    from heartseg.train.augment import thick_slices

    step = np.zeros((8, 9, 40), np.float32)
    step[..., 20:] = 1.0
    thick = thick_slices(step, axis=2, factor=2.4, phase=0.3)
    assert thick.shape == step.shape and thick.dtype == np.float32
    # Every line along the other axes is the same, as it was: nothing leaks across axes.
    assert np.array_equal(thick, np.broadcast_to(thick[:1, :1], thick.shape))
    profile = thick[0, 0]
    # The edge, one voxel wide before, now takes about the slab's width (2.4 voxels) to rise.
    rising = np.count_nonzero((profile > 0.02) & (profile < 0.98))
    assert 2 <= rising <= 5
    assert np.all(np.diff(profile) >= -1e-6) and profile[0] == 0.0 and profile[-1] == 1.0
    # A linear ramp is what slab means and linear interpolation reproduce, away from the ends.
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32), (4, 5, 40)).copy()
    again = thick_slices(ramp, axis=2, factor=2.4, phase=0.3)
    assert np.allclose(again[..., 4:-4], ramp[..., 4:-4], atol=1e-4)
    # Along another axis the same step moves to that axis.
    moved = thick_slices(np.moveaxis(step, 2, 0).copy(), axis=0, factor=2.4, phase=0.3)
    assert np.allclose(np.moveaxis(moved, 0, 2), thick)


def test_thick_slices_no_thicker_than_a_voxel_leave_the_image() -> None:
    from heartseg.train.augment import thick_slices

    image = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    assert np.array_equal(thick_slices(image, axis=1, factor=1.0, phase=0.0), image)
    single = image[:, :1]
    assert np.array_equal(thick_slices(single, axis=1, factor=2.5, phase=0.3), single)


def test_thick_slice_options_are_checked() -> None:
    from heartseg.train.options import ConfigError

    with pytest.raises(ConfigError, match="p_thick_slice"):
        AugmentConfig(p_thick_slice=1.5)
    with pytest.raises((ConfigError, ValueError), match="thick_slice_mm"):
        AugmentConfig(thick_slice_mm=(3.0, 2.0))
