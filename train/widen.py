"""Grow a trained U-Net to more channels per level while computing the same function (Net2WiderNet)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from .unet import UNetConfig, build_unet


def can_widen(theirs: UNetConfig, ours: UNetConfig) -> bool:
    """Whether ``ours`` is ``theirs`` with at least as many channels at every level (and more at one)."""
    same_shape = replace(theirs, base_channels=ours.base_channels, max_channels=ours.max_channels) == ours
    pairs = list(zip(theirs.channels(), ours.channels()))
    return same_shape and all(new >= old for old, new in pairs) and any(new > old for old, new in pairs)


def widen_state_dict(state: dict[str, Tensor], theirs: UNetConfig, ours: UNetConfig) -> dict[str, Tensor]:
    """Weights of the network ``theirs`` grown to the wider ``ours``, with outputs equal to ``theirs``' outputs."""
    if not can_widen(theirs, ours):
        raise ValueError(f"cannot grow {theirs.to_dict()} into {ours.to_dict()}: only base or max channels may grow")
    try:
        build_unet(theirs).load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"these weights are not those of {theirs.to_dict()}: {exc}") from None
    return _Widener(state, theirs, ours).run()


def _shares(rows: int, inputs: np.ndarray) -> Tensor:
    """Per output row, each old input channel's weight split among its copies in unequal shares summing to one.
    A fixed pattern, not random draws: every run grown from one source starts from the same network, so
    their weights can be averaged."""
    pattern = np.arange(rows)[:, None] * 0.6180339887 + np.arange(len(inputs))[None, :] * 0.4142135624
    raw = 1.0 + 0.5 * np.mod(pattern, 1.0)
    totals = np.zeros((rows, int(inputs.max()) + 1))
    np.add.at(totals.T, inputs, raw.T)
    return torch.from_numpy(raw / totals[:, inputs])


class _Widener:
    """New channel k of a level copies old channel k mod (old width); a layer reading copies splits each old
    input weight among them (see _shares), so the output is unchanged while the copies learn apart."""

    def __init__(self, state: dict[str, Tensor], theirs: UNetConfig, ours: UNetConfig) -> None:
        self.old, self.theirs = state, theirs
        self.new: dict[str, Tensor] = {}
        self.maps = [np.arange(new) % old for old, new in zip(theirs.channels(), ours.channels())]

    def run(self) -> dict[str, Tensor]:
        """Every layer's grown weights, in the order the network uses them."""
        depth, maps = self.theirs.depth, self.maps
        source = np.arange(self.theirs.in_channels)
        for level in range(depth):
            self._block(f"encoders.{level}", source, maps[level])
            source = maps[level]
        self._block("bottleneck", source, maps[depth])
        for k, level in enumerate(reversed(range(depth))):
            self._conv(f"ups.{k}", maps[level + 1], maps[level], transposed=True)
            skip_offset = self.theirs.channels()[level]  # the skip follows the upsampled half in the concatenation
            self._block(f"decoders.{k}", np.concatenate([maps[level], maps[level] + skip_offset]), maps[level])
        self._conv("head", maps[0], np.arange(self.theirs.out_channels))
        return self.new

    def _block(self, prefix: str, inputs: np.ndarray, outputs: np.ndarray) -> None:
        self._conv(f"{prefix}.0", inputs, outputs)
        self._norm(f"{prefix}.1", outputs)
        self._conv(f"{prefix}.3", outputs, outputs)
        self._norm(f"{prefix}.4", outputs)

    def _conv(self, name: str, inputs: np.ndarray, outputs: np.ndarray, transposed: bool = False) -> None:
        weight = self.old[f"{name}.weight"]
        if transposed:
            weight = weight.transpose(0, 1)
        grown = weight[torch.from_numpy(outputs)][:, torch.from_numpy(inputs)]
        shares = _shares(len(outputs), inputs).to(grown.dtype)
        grown = grown * shares.reshape(*shares.shape, *([1] * (grown.dim() - 2)))
        self.new[f"{name}.weight"] = (grown.transpose(0, 1) if transposed else grown).contiguous()
        if f"{name}.bias" in self.old:  # the upsampling and the head; a convolution only without normalisation
            self.new[f"{name}.bias"] = self.old[f"{name}.bias"][torch.from_numpy(outputs)].clone()

    def _norm(self, name: str, outputs: np.ndarray) -> None:
        for key, value in self.old.items():
            if key.startswith(f"{name}."):  # affine weights and running statistics per channel, or a counter
                self.new[key] = value[torch.from_numpy(outputs)].clone() if value.dim() == 1 else value.clone()
