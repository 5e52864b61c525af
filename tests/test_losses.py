"""Tests for heartseg.train.losses."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the training side needs PyTorch: pip install -e '.[train]'")
import torch
from heartseg.train.losses import DiceBCELoss, soft_dice

torch.set_num_threads(1)


def _target() -> torch.Tensor:
    target = torch.zeros(2, 1, 8, 8, 8)
    target[0, :, 2:6, 2:6, 2:6] = 1.0
    target[1, :, 1:3, 1:3, 1:3] = 1.0
    return target


def test_soft_dice_perfect_and_disjoint() -> None:
    target = _target()
    assert float(soft_dice(target, target)) == pytest.approx(1.0)
    assert float(soft_dice(1.0 - target, target)) < 1e-6
    empty = torch.zeros(1, 1, 4, 4, 4)
    assert float(soft_dice(empty, empty)) == pytest.approx(1.0)


def test_soft_dice_is_batch_dice() -> None:
    target = _target()
    probs = target.clone()
    probs[1] = 0.0  # miss the small object only
    fg = target.sum()
    expected = 2 * target[0].sum() / (target[0].sum() + fg)
    assert float(soft_dice(probs, target)) == pytest.approx(float(expected), rel=1e-5)


def test_soft_dice_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        soft_dice(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 2))


def test_perfect_prediction_near_zero_dice_loss() -> None:
    target = _target()
    logits = (target * 2 - 1) * 50.0
    assert float(DiceBCELoss(dice_weight=1.0, bce_weight=0.0)(logits, target)) < 1e-4
    assert float(DiceBCELoss()(logits, target)) < 1e-4


def test_wrong_prediction_has_larger_loss() -> None:
    target = _target()
    good = (target * 2 - 1) * 5.0
    loss_fn = DiceBCELoss()
    assert float(loss_fn(-good, target)) > float(loss_fn(torch.zeros_like(good), target)) > float(
        loss_fn(good, target)
    )


def test_weights_combine_linearly() -> None:
    target = _target()
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    dice = DiceBCELoss(1.0, 0.0)(logits, target)
    bce = DiceBCELoss(0.0, 1.0)(logits, target)
    combined = DiceBCELoss(dice_weight=0.5, bce_weight=2.0)(logits, target)
    assert float(combined) == pytest.approx(float(0.5 * dice + 2.0 * bce), rel=1e-5)


def test_gradients_flow() -> None:
    target = _target()
    logits = torch.zeros(target.shape, requires_grad=True)
    DiceBCELoss()(logits, target).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    # Descending the gradient must raise foreground logits and lower background ones.
    assert (logits.grad[target.bool()] < 0).all()
    assert (logits.grad[~target.bool()] > 0).all()
