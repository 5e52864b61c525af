"""Validation of training options, shared by the config dataclasses (which hold the one set of defaults)
and the command line (which names the offending option)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from heartseg.runtime.errors import HeartsegError


# Config fields whose command-line option has another name.
OPTION_NAMES = {"crop_margin_mm": "margin-mm", "n_folds": "folds", "fine_patch": "patch", "kind": "stage"}


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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_every", "checkpoint_every"):
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
