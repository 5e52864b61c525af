"""Reading and validating a training run's model.pt, and rebuilding its networks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from heartseg.runtime.contract import ModelContract
from heartseg.runtime.errors import HeartsegError
from heartseg.train.checkpoint import CHECKPOINT_FORMAT, load_safe
from heartseg.train.unet import UNetConfig, build_unet
from torch import nn


@dataclass
class TrainedModel:
    """A validated checkpoint: the contract with thresholds, and one network per stage."""

    path: Path
    contract: ModelContract
    networks: dict[str, nn.Module]
    unets: dict[str, UNetConfig]
    metrics: dict
    versions: dict
    command: str


def load_trained_model(path: str | Path) -> TrainedModel:
    """Load model.pt safely and check that it holds everything the runtime needs; names what is missing."""
    path = Path(path)
    data = load_safe(path)
    missing = [k for k in ("format", "contract", "networks") if k not in data]
    if missing:
        raise HeartsegError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    if data["format"] != CHECKPOINT_FORMAT:
        raise HeartsegError(f"{path}: not a heartseg model (format {data['format']!r})")
    try:
        contract = ModelContract.from_dict(data["contract"])
    except Exception as exc:
        raise HeartsegError(f"{path}: incomplete checkpoint, unreadable contract ({exc})") from None
    networks, unets = {}, {}
    for stage in contract.stages:
        if stage.threshold is None:
            raise HeartsegError(f"{path}: incomplete checkpoint, stage {stage.name!r} has no calibrated threshold")
        entry = data["networks"].get(stage.name)
        if not entry or "unet" not in entry or "state_dict" not in entry:
            raise HeartsegError(f"{path}: incomplete checkpoint, missing the weights of stage {stage.name!r}")
        unet = UNetConfig.from_dict(entry["unet"])
        net = build_unet(unet)
        try:
            net.load_state_dict(entry["state_dict"])
        except RuntimeError as exc:
            raise HeartsegError(f"{path}: weights of stage {stage.name!r} do not fit its network ({str(exc)[:200]})") from None
        networks[stage.name] = net.eval()
        unets[stage.name] = unet
    return TrainedModel(path, contract, networks, unets, data.get("metrics", {}), data.get("versions", {}),
                        str(data.get("command", "")))


class StageHead(nn.Module):
    """Network, sigmoid and the calibrated threshold: (mask uint8, probability) for one stage."""

    def __init__(self, network: nn.Module, threshold: float) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("threshold", torch.tensor(float(threshold)), persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and probabilities of the stage."""
        prob = torch.sigmoid(self.network(image))
        return (prob > self.threshold).to(torch.uint8), prob


class ExportGraph(nn.Module):
    """All stages side by side in one graph: one input and two outputs per stage."""

    def __init__(self, model: TrainedModel) -> None:
        super().__init__()
        self.names = [s.name for s in model.contract.stages]
        self.heads = nn.ModuleList(StageHead(model.networks[s.name], float(s.threshold)) for s in model.contract.stages)

    def forward(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(mask, prob) of each stage, in stage order."""
        outputs: list[torch.Tensor] = []
        for head, image in zip(self.heads, images):
            outputs.extend(head(image))
        return tuple(outputs)
