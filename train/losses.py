"""Segmentation losses on logits: batch soft Dice plus binary cross-entropy."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SMOOTH = 1e-5


def soft_dice(probs: Tensor, target: Tensor, smooth: float = SMOOTH) -> Tensor:
    """Batch soft Dice of (N, C, ...) probabilities vs targets: sums over batch and space, mean over C."""
    if probs.shape != target.shape:
        raise ValueError(f"probs shape {tuple(probs.shape)} != target shape {tuple(target.shape)}")
    if probs.dim() < 2:
        raise ValueError(f"expected (N, C, ...) tensors, got shape {tuple(probs.shape)}")
    target = target.to(probs.dtype)
    # Pooling the batch into one Dice (nnU-Net "batch Dice") keeps nearly empty patches from
    # dominating the loss.
    axes = [0] + list(range(2, probs.dim()))
    intersection = (probs * target).sum(dim=axes)
    denominator = probs.sum(dim=axes) + target.sum(dim=axes)
    return ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


class DiceBCELoss(nn.Module):
    """``dice_weight * (1 - batch soft Dice) + bce_weight * BCEWithLogits`` on logits."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = SMOOTH) -> None:
        super().__init__()
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.smooth = float(smooth)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Return the scalar loss for (N, C, ...) logits and binary targets of the same shape."""
        # Compute in float32 so the loss is stable under autocast.
        logits32 = logits.float()
        target32 = target.float()
        loss = logits32.new_zeros(())
        if self.dice_weight:
            dice = soft_dice(torch.sigmoid(logits32), target32, self.smooth)
            loss = loss + self.dice_weight * (1.0 - dice)
        if self.bce_weight:
            loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(logits32, target32)
        return loss
