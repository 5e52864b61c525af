"""The checkpoint formats, in one place for train and export: atomic files loadable with
torch.load(weights_only=True), and validation of what they hold before anything uses it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from heartseg.runtime.atomic import atomic_output
from heartseg.runtime.contract import ContractError, ModelContract
from heartseg.runtime.errors import HeartsegError

from .unet import UNetConfig

CHECKPOINT_FORMAT = "heartseg-model"
CHECKPOINT_VERSION = 1
# An ensemble's model.pt holds several networks per stage, which a version-1 reader cannot load.
ENSEMBLE_VERSION = 2
LAST_KEYS = ("model", "optimizer", "scheduler", "state")
BEST_KEYS = ("model", "step", "dice")


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over path."""
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def load_safe(path: Path) -> dict[str, Any]:
    """Load a checkpoint without running any pickled code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise HeartsegError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HeartsegError(
            f"{path}: refused to load: not a plain weights checkpoint (torch.load with weights_only=True "
            f"failed: {first[:300]})"
        ) from None
    if not isinstance(data, dict):
        raise HeartsegError(f"{path}: not a heartseg checkpoint (top level is {type(data).__name__})")
    return data


def _state_dict(value: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in value.items()):
        raise HeartsegError(f"{path}: {what} is not a state dict of tensors (got {type(value).__name__})")
    return value


def _require(data: dict, keys: tuple[str, ...], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise HeartsegError(f"{path}: incomplete {what}, missing {', '.join(missing)}")


def read_last(path: Path) -> dict[str, Any]:
    """A stage's last.pt (model, optimiser, scheduler and loop state), validated."""
    data = load_safe(path)
    _require(data, LAST_KEYS, path, "training checkpoint")
    _state_dict(data["model"], path, "'model'")
    for key in ("optimizer", "scheduler", "state"):
        if not isinstance(data[key], dict):
            raise HeartsegError(f"{path}: {key!r} is not a dict (got {type(data[key]).__name__})")
    state = data["state"]
    _require(state, ("step", "best_dice", "best_step", "seconds", "loss", "val"), path, "training state")
    if isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0:
        raise HeartsegError(f"{path}: training state step {state['step']!r} is not a step count")
    return data


def read_best(path: Path) -> dict[str, Any]:
    """A stage's best.pt (weights, step, validation Dice), validated."""
    data = load_safe(path)
    _require(data, BEST_KEYS, path, "best checkpoint")
    _state_dict(data["model"], path, "'model'")
    return data


# One stage's training checkpoints in RUN/fold_K/STAGE/, read inside their run folder (which says their network).
STAGE_CHECKPOINTS = ("best.pt", "last.pt")


def is_stage_checkpoint(path: str | Path) -> bool:
    """Whether a path names one stage's training checkpoint (best.pt or last.pt) rather than a model file."""
    return Path(path).name in STAGE_CHECKPOINTS


def read_stage_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a stage's best.pt (its best validation) or last.pt (its latest step), validated."""
    path = Path(path)
    return (read_last if path.name == "last.pt" else read_best)(path)["model"]


@dataclass(frozen=True)
class StageWeights:
    """One stage's network configuration and weights."""

    unet: UNetConfig
    state_dict: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelCheckpoint:
    """A validated model.pt: its contract (thresholds calibrated) and each stage's network, or the member
    networks of an ensemble whose probabilities the stage averages."""

    path: Path
    contract: ModelContract
    networks: dict[str, tuple[StageWeights, ...]]
    kind: str
    metrics: dict
    versions: dict
    command: str


def model_checkpoint(contract: ModelContract, networks: dict[str, list[tuple[dict, dict]]], *, kind: str,
                     metrics: dict, versions: dict, command: str) -> dict[str, Any]:
    """The model.pt dict: networks maps each stage name to its members' (U-Net config dict, state dict), one
    for a single network (stored as earlier releases did), several for an ensemble."""
    def entry(members: list[tuple[dict, dict]]) -> dict:
        if len(members) == 1:
            return {"unet": members[0][0], "state_dict": members[0][1]}
        return {"members": [{"unet": unet, "state_dict": state} for unet, state in members]}

    ensemble = any(len(members) > 1 for members in networks.values())
    return {"format": CHECKPOINT_FORMAT, "version": ENSEMBLE_VERSION if ensemble else CHECKPOINT_VERSION, "kind": kind,
            "contract": contract.to_dict(),
            "networks": {name: entry(members) for name, members in networks.items()},
            "metrics": metrics, "versions": versions, "command": command}


def _stage_weights(entry: Any, path: Path, stage: str) -> StageWeights:
    if not isinstance(entry, dict) or "unet" not in entry or "state_dict" not in entry:
        raise HeartsegError(f"{path}: incomplete checkpoint, missing the weights of stage {stage!r}")
    if not isinstance(entry["unet"], dict):
        raise HeartsegError(f"{path}: the network of stage {stage!r} has no U-Net configuration")
    try:
        unet = UNetConfig.from_dict(entry["unet"])
    except (TypeError, ValueError) as exc:
        raise HeartsegError(f"{path}: the U-Net configuration of stage {stage!r} is invalid ({exc})") from None
    return StageWeights(unet, _state_dict(entry["state_dict"], path, f"the weights of stage {stage!r}"))


def is_exported_file(path: str | Path) -> bool:
    """Whether a model path names an exported model file (.onnx) rather than a model.pt."""
    return Path(path).suffix.lower() == ".onnx"


def read_model_checkpoint(path: str | Path) -> ModelCheckpoint:
    """Load model.pt safely and validate all of it: format, contract schema and thresholds, a network per stage
    (an exported model file: train.model_files.read_model)."""
    path = Path(path)
    data = load_safe(path)
    _require(data, ("format", "contract", "networks"), path, "checkpoint")
    if data["format"] != CHECKPOINT_FORMAT:
        raise HeartsegError(f"{path}: not a heartseg model (format {data['format']!r})")
    version = data.get("version", CHECKPOINT_VERSION)
    if version not in (CHECKPOINT_VERSION, ENSEMBLE_VERSION):
        raise HeartsegError(f"{path}: checkpoint version {version!r}, this heartseg reads versions "
                            f"{CHECKPOINT_VERSION} and {ENSEMBLE_VERSION}")
    try:
        contract = ModelContract.from_dict(data["contract"]).require_thresholds()
    except ContractError as exc:
        raise HeartsegError(f"{path}: {exc}") from None
    networks = data["networks"]
    if not isinstance(networks, dict):
        raise HeartsegError(f"{path}: 'networks' must map stage names to networks, got {type(networks).__name__}")
    weights = {}
    for stage in contract.stages:
        entry = networks.get(stage.name)
        members = entry.get("members") if isinstance(entry, dict) and "members" in entry else [entry]
        if not isinstance(members, list) or not members:
            raise HeartsegError(f"{path}: the ensemble of stage {stage.name!r} has no member networks")
        weights[stage.name] = tuple(_stage_weights(member, path, stage.name) for member in members)
    extra = sorted(set(networks) - set(weights))
    if extra:
        raise HeartsegError(f"{path}: networks {extra} belong to no stage of the contract")
    for key, kind in (("metrics", dict), ("versions", dict)):
        if not isinstance(data.get(key, {}), kind):
            raise HeartsegError(f"{path}: {key!r} must be a dict")
    return ModelCheckpoint(path, contract, weights, str(data.get("kind", "")), data.get("metrics", {}),
                           data.get("versions", {}), str(data.get("command", "")))
