"""Reading and validating a training run's model.pt, and rebuilding its networks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from heartseg.runtime.contract import ModelContract
from heartseg.runtime.errors import HeartsegError
from heartseg.train.model_files import read_model
from heartseg.train.evaluate import stage_network
from heartseg.train.unet import UNetConfig
from torch import nn


@dataclass
class TrainedModel:
    """A validated checkpoint: the contract with thresholds, and one network per stage (an ensemble's averages
    its members' probabilities)."""

    path: Path
    contract: ModelContract
    networks: dict[str, nn.Module]
    unets: dict[str, UNetConfig]
    metrics: dict
    versions: dict
    command: str
    members: dict[str, int] = field(default_factory=dict)


def load_trained_model(path: str | Path) -> TrainedModel:
    """Load model.pt safely, validate all of it (train.model_files) and rebuild one network per stage."""
    checkpoint = read_model(path)
    networks, unets = {}, {}
    for name, members in checkpoint.networks.items():
        try:
            networks[name] = stage_network([(m.unet, m.state_dict) for m in members])
        except RuntimeError as exc:
            raise HeartsegError(f"{checkpoint.path}: weights of stage {name!r} do not fit its network "
                                f"({str(exc)[:200]})") from None
        unets[name] = members[0].unet
    return TrainedModel(checkpoint.path, checkpoint.contract, networks, unets, checkpoint.metrics,
                        checkpoint.versions, checkpoint.command,
                        {name: len(members) for name, members in checkpoint.networks.items()})


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
