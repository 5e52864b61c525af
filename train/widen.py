"""Grow a trained U-Net to more channels per level while computing the same function (Net2WiderNet)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from .unet import UNetConfig


def can_widen(theirs: UNetConfig, ours: UNetConfig) -> bool:
    """Whether ``ours`` is ``theirs`` with at least as many channels at every level (and more at one)."""
    same_shape = replace(theirs, base_channels=ours.base_channels, max_channels=ours.max_channels) == ours
    pairs = list(zip(theirs.channels(), ours.channels()))
    return same_shape and all(new >= old for old, new in pairs) and any(new > old for old, new in pairs)


def widen_state_dict(state: dict[str, Tensor], theirs: UNetConfig, ours: UNetConfig,
                     seed: int = 0) -> dict[str, Tensor]:
    """Weights of the network ``theirs`` grown to the wider ``ours``, with outputs equal to ``theirs``' outputs."""
    if not can_widen(theirs, ours):
        raise ValueError(f"cannot grow {theirs.to_dict()} into {ours.to_dict()}: only base or max channels may grow")
    return _Widener(state, theirs, ours, np.random.default_rng(seed)).run()


class _Widener:
    """Each new channel copies an old one of its level. A layer reading copies splits each old input weight
    among them in random shares that sum to one, so the output is unchanged while the copies learn apart."""

    def __init__(self, state: dict[str, Tensor], theirs: UNetConfig, ours: UNetConfig,
                 rng: np.random.Generator) -> None:
        self.old, self.config, self.rng = state, theirs, rng
        self.new: dict[str, Tensor] = {}
        self.maps = [np.concatenate([np.arange(old), rng.integers(0, old, new - old)])
                     for old, new in zip(theirs.channels(), ours.channels())]

    def run(self) -> dict[str, Tensor]:
        depth, maps = self.config.depth, self.maps
        source = np.arange(self.config.in_channels)
        for level in range(depth):
            self._block(f"encoders.{level}", source, maps[level])
            source = maps[level]
        self._block("bottleneck", source, maps[depth])
        for k, level in enumerate(reversed(range(depth))):
            self._conv(f"ups.{k}", maps[level + 1], maps[level], transposed=True)
            skip_offset = self.config.channels()[level]  # the skip follows the upsampled half in the concatenation
            self._block(f"decoders.{k}", np.concatenate([maps[level], maps[level] + skip_offset]), maps[level])
        self._conv("head", maps[0], np.arange(self.config.out_channels))
        missing = set(self.old) - set(self.new)
        if missing:
            raise ValueError(f"weights this network does not have: {sorted(missing)}")
        return self.new

    def _block(self, prefix: str, inputs: np.ndarray, outputs: np.ndarray) -> None:
        self._conv(f"{prefix}.0", inputs, outputs)
        self._norm(f"{prefix}.1", outputs)
        self._conv(f"{prefix}.3", outputs, outputs)
        self._norm(f"{prefix}.4", outputs)

    def _shares(self, n_out: int, inputs: np.ndarray) -> Tensor:
        raw = self.rng.uniform(0.5, 1.5, size=(n_out, len(inputs)))
        totals = np.zeros((n_out, int(inputs.max()) + 1))
        np.add.at(totals.T, inputs, raw.T)
        return torch.from_numpy(raw / totals[:, inputs])

    def _conv(self, name: str, inputs: np.ndarray, outputs: np.ndarray, transposed: bool = False) -> None:
        weight = self.old[f"{name}.weight"]
        if transposed:
            weight = weight.transpose(0, 1)
        grown = weight[torch.from_numpy(outputs)][:, torch.from_numpy(inputs)]
        shares = self._shares(len(outputs), inputs).to(grown.dtype)
        grown = grown * shares.reshape(*shares.shape, *([1] * (grown.dim() - 2)))
        self.new[f"{name}.weight"] = (grown.transpose(0, 1) if transposed else grown).contiguous()
        if f"{name}.bias" in self.old:
            self.new[f"{name}.bias"] = self.old[f"{name}.bias"][torch.from_numpy(outputs)].clone()

    def _norm(self, name: str, outputs: np.ndarray) -> None:
        index = torch.from_numpy(outputs)
        for key in ("weight", "bias", "running_mean", "running_var"):
            if f"{name}.{key}" in self.old:
                self.new[f"{name}.{key}"] = self.old[f"{name}.{key}"][index].clone()
        if f"{name}.num_batches_tracked" in self.old:
            self.new[f"{name}.num_batches_tracked"] = self.old[f"{name}.num_batches_tracked"].clone()
