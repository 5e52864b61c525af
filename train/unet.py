"""Classic 3D U-Net producing logits, its configuration, presets and a FLOP model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

NORMS = ("batch", "instance", "none")


@dataclass
class UNetConfig:
    """Architecture hyper-parameters of :class:`UNet3D` (plain python types only)."""

    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 16
    depth: int = 3
    norm: str = "batch"
    max_channels: int = 256

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        for name in ("in_channels", "out_channels", "base_channels", "max_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.depth) < 0:
            raise ValueError(f"depth must be >= 0, got {self.depth}")

    def channels(self) -> list[int]:
        """Feature channels at each resolution level, from full resolution to the bottleneck."""
        return [min(self.base_channels * 2**level, self.max_channels) for level in range(self.depth + 1)]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (safe inside ``torch.load(weights_only=True)`` checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {sorted(unknown)}")
        return cls(**dict(data))


PRESETS: dict[str, UNetConfig] = {
    # Architecture of the original failed project, kept for comparison.
    "failed-project": UNetConfig(base_channels=32, depth=3, norm="batch"),
    # Instance norm in the fine stage: with batches of two patches, possibly from different
    # datasets (sequences), BatchNorm's running statistics fit neither dataset at inference.
    "fine": UNetConfig(base_channels=16, depth=3, norm="instance"),
    # The localiser keeps BatchNorm: it sees whole scans at inference but mostly-padded patches of
    # small scans in training, and instance statistics differ too much between the two.
    "coarse": UNetConfig(base_channels=8, depth=3, norm="batch"),
}


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two (Conv3d 3x3x3 -> norm -> LeakyReLU) layers."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        layers: list[nn.Module] = []
        for cin in (in_channels, out_channels):
            layers += [
                # The norm's affine shift makes a conv bias redundant.
                nn.Conv3d(cin, out_channels, kernel_size=3, padding=1, bias=norm == "none"),
                _norm_layer(norm, out_channels),
                nn.LeakyReLU(0.01, inplace=True),
            ]
        super().__init__(*layers)


class UNet3D(nn.Module):
    """3D U-Net with max-pool down, transposed-conv up and concatenation skips; outputs logits."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        chans = config.channels()
        self.encoders = nn.ModuleList()
        cin = config.in_channels
        for c in chans[:-1]:
            self.encoders.append(ConvBlock(cin, c, config.norm))
            cin = c
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = ConvBlock(cin, chans[-1], config.norm)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(config.depth)):
            self.ups.append(nn.ConvTranspose3d(chans[level + 1], chans[level], kernel_size=2, stride=2))
            self.decoders.append(ConvBlock(2 * chans[level], chans[level], config.norm))
        self.head = nn.Conv3d(chans[0], config.out_channels, kernel_size=1)

    @property
    def required_divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2**self.config.depth

    def _check_shape(self, x: Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"expected a 5D (N, C, D, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected {self.config.in_channels} input channels, got {x.shape[1]}")
        div = self.required_divisor
        spatial = tuple(int(s) for s in x.shape[2:])
        if any(s % div for s in spatial):
            raise ValueError(
                f"spatial size {spatial} must be a multiple of {div} (2**depth, depth={self.config.depth}); "
                "pad or crop the input"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Map (N, in_channels, D, H, W) to logits (N, out_channels, D, H, W)."""
        # Tracing/exporting must not bake a python-level check into the graph.
        if not (
            torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        ):
            self._check_shape(x)
        skips: list[Tensor] = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def count_flops_per_voxel(config: UNetConfig) -> float:
    """Analytical convolution FLOPs (2 x multiply-accumulates) per input voxel."""
    chans = config.channels()
    macs = 0.0
    cin = config.in_channels
    for level, c in enumerate(chans):
        # Level `level` has 1/8**level as many voxels as the input.
        scale = 8.0**-level
        macs += scale * 27 * (cin * c + c * c)  # encoder block (or bottleneck)
        cin = c
        if level < config.depth:
            # Each transposed-conv output voxel sees exactly one kernel tap per input channel.
            macs += scale * chans[level + 1] * c
            macs += scale * 27 * (2 * c * c + c * c)  # decoder block
    macs += chans[0] * config.out_channels  # 1x1x1 head
    return 2.0 * macs


def build_unet(config: UNetConfig) -> UNet3D:
    """Construct a :class:`UNet3D` from ``config``."""
    return UNet3D(config)
