"""Calibration and evaluation of trained networks on held-out cases: what a fold and an ensemble of fold
models both do once their networks exist."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from heartseg.runtime.contract import ModelContract
from heartseg.runtime.inference import StagePredictFn, infer_canonical, localiser_mask
from heartseg.runtime.postprocess import mask_from_prob
from heartseg.runtime.metrics import compute_metrics, dice_score
from heartseg.runtime.qc import (
    CALIBRATED_SCORES,
    Plausibility,
    fit_score_calibration,
    localiser_flag,
    mask_flag,
    scans_plausibility,
    soft_dice_score,
)
from heartseg.runtime.tta import infer_canonical_tta
from torch import nn

from .cache import PreparedCase
from .calibrate import Calibration, calibrate_threshold
from .options import AugmentConfig
from .trainer import canonical_of, torch_predictor, validation_pairs
from .unet import UNetConfig, build_unet


@dataclass
class Evaluation:
    """A calibrated contract and what it scores on the held-out cases."""

    contract: ModelContract
    calibrations: dict[str, Calibration]
    per_case: dict[str, dict]
    probs: list[np.ndarray]

    def metrics(self) -> dict:
        """What metrics.json records of it: the means (overall and per dataset), each case, the plausibility
        the calibration checked masks against, the threshold sweeps and QC's score calibrations."""
        plausibility = self.contract.plausibility
        return {
            "mean": {k: (None if v != v else v) for k, v in summarize_dicts(self.per_case).items()},
            "per_dataset": summarize_by_dataset(self.per_case),
            "per_case": self.per_case,
            "plausibility": plausibility.to_dict() if plausibility is not None else None,
            "calibration": {n: c.to_dict() for n, c in self.calibrations.items()},
            **{name: getattr(self.contract, name).to_dict() for name in CALIBRATED_SCORES},
        }

    def summary_line(self) -> str:
        """Held-out Dice overall and per dataset, and the threshold, for the log."""
        by_dataset = ", ".join(f"{name} {m['dice']:.4f}" for name, m in summarize_by_dataset(self.per_case).items())
        return (f"held-out Dice {summarize_dicts(self.per_case)['dice']:.4f} ({by_dataset}; threshold "
                f"{self.contract.final_stage.threshold})")


def learned_plausibility(train_cases: list[PreparedCase], augment: AugmentConfig | None = None) -> Plausibility:
    """What a plausible atrium and scan are, from training cases only, and the thickest slices their augmentation
    trained on (augment) as a largest voxel size covered."""
    plausibility = scans_plausibility(((c.image, c.label, c.spacing) for c in train_cases),
                                      families=[c.dataset for c in train_cases])
    if augment is None or augment.p_thick_slice <= 0 or plausibility.spacing_mm is None:
        return plausibility
    # Not widened by the input margin as the scans' own sizes are: the thickest slice is itself the reach of training.
    smallest, middle, (low, high) = plausibility.spacing_mm
    return replace(plausibility, spacing_mm=(smallest, middle, (low, max(high, augment.thick_slice_mm[1]))))


class MeanProbability(nn.Module):
    """Several networks of one stage as one: the logit of their mean probability (an ensemble)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits whose sigmoid is the members' mean probability."""
        logits = torch.stack([m(image) for m in self.members])
        # log(mean p) - log(mean (1 - p)), from log-sigmoids: exact, and finite for any member logits.
        return (torch.logsumexp(nn.functional.logsigmoid(logits), 0)
                - torch.logsumexp(nn.functional.logsigmoid(-logits), 0))


def stage_network(members: list[tuple[dict | UNetConfig, dict]]) -> nn.Module:
    """One stage's network in eval mode from its (U-Net configuration, weights) members: an ensemble when several."""
    nets = []
    for unet, state in members:
        net = build_unet(unet if isinstance(unet, UNetConfig) else UNetConfig.from_dict(unet))
        net.load_state_dict(state)
        nets.append(net.eval())
    return nets[0] if len(nets) == 1 else MeanProbability(nets).eval()


def calibrate_and_evaluate(contract: ModelContract, networks: dict[str, nn.Module], device: torch.device,
                           val_cases: list[PreparedCase], plausibility: Plausibility) -> Evaluation:
    """Calibrate the thresholds and QC's score calibrations on held-out cases, and score them per case."""
    networks = {name: net.to(device).to(memory_format=torch.channels_last_3d).eval() for name, net in networks.items()}
    predict: StagePredictFn = torch_predictor(networks, device, amp=False)
    calibrations: dict[str, Calibration] = {}
    names = [c.case_id for c in val_cases]
    if contract.localiser is not None:
        localiser = contract.localiser
        pairs = validation_pairs(localiser, contract, val_cases, predict)
        calibrations[localiser.name] = calibrate_threshold(pairs, localiser_mask,
                                                           lambda i, mask: localiser_flag(mask),
                                                           names=names, stage=localiser.name)
        contract = contract.with_threshold(localiser.name, calibrations[localiser.name].threshold)
    final = contract.final_stage
    # The final threshold is calibrated on what the whole pipeline produces on held-out cases.
    plain = [infer_canonical(canonical_of(c), contract, predict) for c in val_cases]
    probs = [result.prob for result in plain]
    pairs = [(p, np.asarray(c.label)) for p, c in zip(probs, val_cases)]
    calibrations[final.name] = calibrate_threshold(
        pairs, lambda prob, t: mask_from_prob(prob, contract, t),
        lambda i, mask: mask_flag(mask, val_cases[i].spacing, plausibility), names=names, stage=final.name)
    contract = contract.with_threshold(final.name, calibrations[final.name].threshold)
    per_case = {}
    for case, prob in zip(val_cases, probs):
        mask = mask_from_prob(prob, contract)
        per_case[case.case_id] = {**compute_metrics(mask, np.asarray(case.label), case.spacing).to_dict(),
                                  "qc_score": soft_dice_score(prob, mask), "dataset": case.dataset}
    # QC's confidence score is calibrated into an estimated Dice on the same held-out cases, once as inferred
    # by default and once with test-time flips (--tta): averaged copies score otherwise.
    for case, result in zip(val_cases, plain):
        prob = infer_canonical_tta(canonical_of(case), contract, predict, plain=result).prob
        mask = mask_from_prob(prob, contract)
        per_case[case.case_id].update(dice_tta=dice_score(mask, np.asarray(case.label)),
                                      qc_score_tta=soft_dice_score(prob, mask))
    contract = replace(contract, **{
        name: fit_score_calibration([m[score] for m in per_case.values()], [m[dice] for m in per_case.values()])
        for name, (score, dice) in CALIBRATED_SCORES.items()})
    return Evaluation(contract, calibrations, per_case, probs)


def summarize_by_dataset(per_case: dict[str, dict]) -> dict[str, dict[str, float]]:
    """summarize_dicts per dataset (the 'dataset' entry of each case), with the case count."""
    names = sorted({m.get("dataset", "") for m in per_case.values()})
    return {name: {"cases": sum(m.get("dataset", "") == name for m in per_case.values()),
                   **summarize_dicts({k: m for k, m in per_case.items() if m.get("dataset", "") == name})}
            for name in names}


def summarize_dicts(per_case: dict[str, dict]) -> dict[str, float]:
    """Mean of each numeric metric over cases, ignoring missing values."""
    # Folds calibrated by different releases may record different metrics: every key any case has.
    keys = list(dict.fromkeys(k for v in per_case.values() for k in v if k != "dataset"))
    out = {}
    for key in keys:
        values = [v[key] for v in per_case.values() if v.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out
