"""Fold models averaged into one model: calibrated and scored on cases that none of its members trained on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from heartseg.runtime.atomic import write_text_atomic
from heartseg.runtime.confidence import CALIBRATED_SCORES
from heartseg.runtime.contract import ModelContract
from heartseg.runtime.errors import HeartsegError

from .cache import default_cache_root, prepare_case
from .checkpoint import ModelCheckpoint, StageWeights, model_checkpoint, read_model_checkpoint, save_atomic
from .dataset import image_hash, read_datasets
from .evaluate import calibrate_and_evaluate, learned_plausibility, stage_network
from .pipeline import summarize_by_dataset, summarize_dicts, versions
from .report import save_calibration

# What members may differ in: what each learned and was calibrated on, not how scans are prepared.
_MEMBER_FIELDS = ("plausibility", "score_calibration", "tta_score_calibration", "info")


def _plan_of(contract: ModelContract) -> dict:
    plan = {k: v for k, v in contract.to_dict().items() if k not in _MEMBER_FIELDS}
    plan["stages"] = [{k: v for k, v in stage.items() if k != "threshold"} for stage in plan["stages"]]
    return plan


def _distinct(members: list[StageWeights]) -> list[StageWeights]:
    """Members whose weights differ: a stage the members share (e.g. one localiser kept by all) runs once."""
    kept: list[StageWeights] = []
    for m in members:
        if not any(k.unet == m.unet and k.state_dict.keys() == m.state_dict.keys()
                   and all(torch.equal(k.state_dict[n], m.state_dict[n]) for n in m.state_dict) for k in kept):
            kept.append(m)
    return kept


def _trained_on(checkpoint: ModelCheckpoint) -> list[str]:
    cases = [c for c in checkpoint.contract.info.get("train_cases", "").split(",") if c]
    if not cases:
        raise HeartsegError(f"{checkpoint.path}: names no training cases, so the cases it never saw are unknown")
    return cases


def build_ensemble(data: list[Path], members: list[Path], output: Path, cache: str | None = None,
                   device: str = "cpu", log: Callable[[str], None] = print, command: str = "") -> dict:
    """Write output/model.pt averaging the members' probabilities per stage, with thresholds and QC calibrations
    fitted on the cases of data that no member trained on (nor any image equal to one they did); returns the
    metrics also written to output/metrics.json."""
    if len(members) < 2:
        raise HeartsegError("an ensemble needs at least two member models")
    checkpoints = [read_model_checkpoint(p) for p in members]
    for checkpoint in checkpoints:
        if any(len(w) > 1 for w in checkpoint.networks.values()):
            raise HeartsegError(f"{checkpoint.path}: is an ensemble already; give its members")
        if _plan_of(checkpoint.contract) != _plan_of(checkpoints[0].contract):
            raise HeartsegError(f"{checkpoint.path}: prepares scans otherwise than {checkpoints[0].path} (stages, "
                                "spacing, patch or normalisation differ): members must come from one plan")
    cases = {c.case_id: c for info in read_datasets(data) for c in info.cases}
    trained = sorted({case for checkpoint in checkpoints for case in _trained_on(checkpoint)})
    missing = [c for c in trained if c not in cases]
    if missing:
        raise HeartsegError(f"the members trained on cases that the given datasets lack ({', '.join(missing[:5])}"
                            f"{', ...' if len(missing) > 5 else ''}): give every dataset they trained on")
    trained_images = {image_hash(cases[c].image) for c in trained}
    unseen = [c for c in cases if c not in trained and image_hash(cases[c].image) not in trained_images]
    if not unseen:
        raise HeartsegError("every case of the given datasets was trained on by some member: an ensemble is "
                            "calibrated and measured on cases none of its members saw (add a labelled test "
                            "dataset, or ensemble models trained on sub-folds of one fold's training cases)")
    base = checkpoints[0].contract
    cache_root = None if cache == "none" else Path(cache) if cache else default_cache_root()
    log(f"ensemble of {len(members)} models: learning plausibility from the {len(trained)} cases they trained on, "
        f"calibrating on the {len(unseen)} none of them saw")
    train_cases = [prepare_case(cases[c], base, cache_root) for c in trained]
    val_cases = [prepare_case(cases[c], base, cache_root) for c in unseen]
    plausibility = learned_plausibility(train_cases)
    contract = replace(base, plausibility=plausibility, info={})
    weights = {stage.name: _distinct([w for checkpoint in checkpoints for w in checkpoint.networks[stage.name]])
               for stage in base.stages}
    networks = {name: stage_network([(w.unet, w.state_dict) for w in ws]) for name, ws in weights.items()}
    evaluation = calibrate_and_evaluate(contract, networks, torch.device(device), val_cases, plausibility)
    contract = evaluation.contract
    metrics = {
        "fold": "ensemble", "members": [str(Path(p).resolve()) for p in members],
        "member_networks": {name: len(ws) for name, ws in weights.items()},
        "train_cases": trained, "val_cases": unseen,
        "split": "cases of the given datasets that none of the members trained on",
        "mean": {k: (None if v != v else v) for k, v in summarize_dicts(evaluation.per_case).items()}, "per_dataset": summarize_by_dataset(evaluation.per_case),
        "per_case": evaluation.per_case, "plausibility": plausibility.to_dict(),
        "calibration": {n: c.to_dict() for n, c in evaluation.calibrations.items()},
        **{name: getattr(contract, name).to_dict() for name in CALIBRATED_SCORES},
    }
    info = dict(base.info)
    info.update(fold="ensemble", members=str(len(members)), train_cases=",".join(trained),
                val_cases=",".join(unseen), init_from="")
    contract = replace(contract, info=info)
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / "metrics.json", json.dumps(metrics, indent=1))
    kind = checkpoints[0].kind
    save_atomic(model_checkpoint(contract, {n: [(w.unet.to_dict(), w.state_dict) for w in ws]
                                            for n, ws in weights.items()},
                                 kind=kind, metrics=json.loads(json.dumps(metrics)), versions=versions(),
                                 command=command), output / "model.pt")
    save_calibration(output / "calibration.png", evaluation.calibrations)
    by_dataset = ", ".join(f"{name} {m['dice']:.4f}" for name, m in metrics["per_dataset"].items())
    log(f"ensemble: Dice {metrics['mean']['dice']:.4f} on the {len(unseen)} unseen cases ({by_dataset}; threshold "
        f"{contract.final_stage.threshold}); wrote {output / 'model.pt'}")
    return metrics
