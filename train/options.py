"""Validation of training options, shared by the config dataclasses (which hold the one set of defaults)
and the command line (which names the offending option)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from heartseg.runtime.errors import HeartsegError


# Config fields whose command-line option has another name.
OPTION_NAMES = {"crop_margin_mm": "margin-mm", "n_folds": "folds", "fine_patch": "patch", "kind": "stage",
                "p_flip": "flip-prob", "p_permute": "permute-prob", "p_invert": "invert-prob",
                "p_dark_pool": "dark-pool-prob", "p_fov_cut": "fov-cut-prob",
                "p_thick_slice": "thick-slice-prob",
                "dataset_weights": "dataset-weight"}


class ConfigError(HeartsegError):
    """A training option with a value no run can use; names the config field."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"{field} {value!r}: {rule}")

    def as_option(self, prefix: str = "") -> HeartsegError:
        """The same problem named as a command-line option (--prefix-field-name)."""
        name = OPTION_NAMES.get(self.field, self.field.replace("_", "-"))
        return HeartsegError(f"--{prefix}{name} {self.value!r}: {self.rule}")


def integer_at_least(value: Any, minimum: int, field: str) -> int:
    """value as an int >= minimum, else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(field, value, f"must be an integer of at least {minimum}")
    return value


def number_in(value: Any, lo: float, hi: float, field: str, *, open_lo: bool = False) -> float:
    """value as a finite float in [lo, hi] ((lo, hi] with open_lo), else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, value, "must be a number")
    ok = math.isfinite(value) and (value > lo if open_lo else value >= lo) and value <= hi
    if not ok:
        raise ConfigError(field, value, f"must be in {'(' if open_lo else '['}{lo:g}, {hi:g}]")
    return float(value)


def one_of(value: Any, choices: tuple[str, ...], field: str) -> str:
    """value when it is one of choices, else ConfigError."""
    if value not in choices:
        raise ConfigError(field, value, f"choose one of {', '.join(choices)}")
    return value


DEVICES = ("auto", "cpu", "cuda")
# Run-level defaults (RunConfig's fields and the command line's options).
STAGE_KIND = "cascade"
FOLDS = 5
SEED = 0


@dataclass
class TrainConfig:
    """Optimisation settings of one stage."""

    steps: int = 1000
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 20
    val_every: int = 100
    checkpoint_every: int = 20
    foreground_fraction: float = 0.5
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    # Processes that draw and augment patches; 0: one background thread. Each number draws other patches.
    workers: int = 0
    # How often each dataset is drawn, relative to the others (a dataset not named: 1).
    dataset_weights: dict[str, float] = field(default_factory=dict)
    # Targets on the stage's grid: the share of each voxel the label covers, instead of that share rounded
    # at 0.5 (which moves the edge by up to half a voxel, a loss the mask on the scan's grid keeps).
    soft_labels: bool = False

    def __post_init__(self) -> None:
        # 0 steps: the stage keeps the weights it starts from (--init-from).
        integer_at_least(self.steps, 0, "steps")
        integer_at_least(self.workers, 0, "workers")
        if not isinstance(self.soft_labels, bool):
            raise ConfigError("soft_labels", self.soft_labels, "must be true or false")
        if not isinstance(self.dataset_weights, dict) or not all(isinstance(k, str) for k in self.dataset_weights):
            raise ConfigError("dataset_weights", self.dataset_weights, "give dataset names and weights")
        for name, weight in self.dataset_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1e6:
                raise ConfigError("dataset_weights", f"{name}={weight}", "a weight must be in (0, 1e+06]")
        for name in ("batch_size", "val_every", "checkpoint_every"):
            integer_at_least(getattr(self, name), 1, name)
        integer_at_least(self.warmup_steps, 0, "warmup_steps")
        integer_at_least(self.seed, 0, "seed")
        number_in(self.lr, 0.0, 10.0, "lr", open_lo=True)
        number_in(self.weight_decay, 0.0, 10.0, "weight_decay")
        number_in(self.foreground_fraction, 0.0, 1.0, "foreground_fraction")
        number_in(self.dice_weight, 0.0, 1e6, "dice_weight")
        number_in(self.bce_weight, 0.0, 1e6, "bce_weight")
        if self.dice_weight + self.bce_weight <= 0:
            raise ConfigError("dice_weight", self.dice_weight, "the Dice and BCE weights cannot both be 0")
        one_of(self.device, DEVICES, "device")


# The localiser's defaults where they differ from the full-resolution stage's.
COARSE_TRAIN = dict(steps=300, lr=3e-3)


@dataclass
class AugmentConfig:
    """Augmentation probabilities and ranges; intensities are in normalised (z-scored) units."""

    # Flips of every axis and (in the patch sampler) permutations of the axes: datasets disagree on
    # which array axis is left, anterior or superior, so the networks must not rely on it.
    # Axes are spatial: 0 = D, 1 = H, 2 = W.
    flip_axes: tuple[int, ...] = (0, 1, 2)
    p_flip: float = 0.5
    p_permute: float = 0.25
    # Rotation (degrees) around the depth axis, i.e. in the H-W plane.
    rotation_deg: float = 10.0
    # Smaller rotation (degrees) around the H and W axes.
    off_axis_rotation_deg: float = 3.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    p_spatial: float = 0.3
    # Contrast, gamma, noise and a smooth multiplicative bias field: scans differ in sequence, scanner
    # and storage (uint8, int16, float), and the z-score removes only scale and offset.
    intensity_scale: tuple[float, float] = (0.75, 1.25)
    intensity_shift: float = 0.2
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_gamma: float = 0.3
    noise_std: float = 0.1
    p_noise: float = 0.2
    # Largest log-gain of the bias field across a patch (0.4: up to about 1.5x brighter or darker).
    bias_field: float = 0.4
    p_bias: float = 0.3
    # Negated intensities: a blood pool darker than the atrial wall (some LGE scans) must not hide the atrium.
    p_invert: float = 0.0
    # A blood pool darker than the wall around it, as in LGE scans whose contrast has washed out: the
    # label's interior (from dark_pool_depth voxels inside its edge) is darkened by a share of the patch's
    # standard deviation drawn from dark_pool_sd, its outermost voxels little and the outside not at all.
    p_dark_pool: float = 0.0
    dark_pool_sd: tuple[float, float] = (0.5, 2.0)
    dark_pool_depth: int = 2
    # A field of view that ends inside the atrium (in the patch sampler): beyond a plane through the
    # label, the patch holds what a crop past the scan's edge holds (its padding) and no label, so the
    # networks segment up to a scan edge that cuts the atrium instead of fading out before it.
    p_fov_cut: float = 0.0
    # Slices thicker than the stage's voxels (in the patch sampler): along one random axis, the patch is averaged
    # over slabs of a thickness drawn from thick_slice_mm and interpolated back linearly, as a scan with such
    # slices is once resampled to the stage's grid. Its thickest slice is a voxel size training covered.
    p_thick_slice: float = 0.0
    thick_slice_mm: tuple[float, float] = (2.0, 3.0)

    def __post_init__(self) -> None:
        self.flip_axes = tuple(int(a) for a in self.flip_axes)
        self.scale_range = (float(self.scale_range[0]), float(self.scale_range[1]))
        self.intensity_scale = (float(self.intensity_scale[0]), float(self.intensity_scale[1]))
        self.gamma_range = (float(self.gamma_range[0]), float(self.gamma_range[1]))
        self.dark_pool_sd = (float(self.dark_pool_sd[0]), float(self.dark_pool_sd[1]))
        self.thick_slice_mm = (float(self.thick_slice_mm[0]), float(self.thick_slice_mm[1]))
        integer_at_least(self.dark_pool_depth, 1, "dark_pool_depth")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ValueError(f"flip_axes must be spatial axes in (0, 1, 2), got {self.flip_axes}")
        for name in ("p_flip", "p_permute", "p_spatial", "p_gamma", "p_noise", "p_bias", "p_invert", "p_dark_pool",
                     "p_fov_cut", "p_thick_slice"):
            number_in(getattr(self, name), 0.0, 1.0, name)
        for name in ("scale_range", "intensity_scale", "gamma_range", "dark_pool_sd", "thick_slice_mm"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        for name in ("rotation_deg", "off_axis_rotation_deg", "intensity_shift", "noise_std", "bias_field"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def identity(cls) -> AugmentConfig:
        """A config under which :func:`augment` returns its inputs unchanged."""
        return cls(
            flip_axes=(),
            p_permute=0.0,
            p_spatial=0.0,
            intensity_scale=(1.0, 1.0),
            intensity_shift=0.0,
            p_gamma=0.0,
            p_noise=0.0,
            p_bias=0.0,
        )
