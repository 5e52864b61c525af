"""Fold models averaged into one model: calibrated and scored on cases that none of its members trained on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from heartseg.runtime.atomic import write_text_atomic
from heartseg.runtime.contract import FORMAT_VERSION
from heartseg.runtime.errors import HeartsegError

from .cache import cache_root, prepare_case
from .checkpoint import ModelCheckpoint, StageWeights, model_checkpoint, save_atomic
from .model_files import read_model
from .dataset import Case, DatasetInfo, dataset_info, image_hash, read_datasets
from .evaluate import calibrate_and_evaluate, learned_plausibility, stage_network
from .lineage import info_cases, members_lineage
from .pipeline import versions
from .report import save_calibration

# What members may differ in: what each learned and was calibrated on, and the contract format of the run
# that wrote it (a newer format only adds fields whose defaults are the older behaviour), not how scans
# are prepared.
_MEMBER_FIELDS = ("plausibility", "score_calibration", "tta_score_calibration", "info", "format_version")


def _plan_of(checkpoint: ModelCheckpoint) -> dict:
    plan = {k: v for k, v in checkpoint.contract.to_dict().items() if k not in _MEMBER_FIELDS}
    plan["stages"] = [{k: v for k, v in stage.items() if k != "threshold"} for stage in plan["stages"]]
    plan["networks"] = {name: [w.unet.to_dict() for w in ws] for name, ws in checkpoint.networks.items()}
    return plan


def same_weights(a: StageWeights, b: StageWeights) -> bool:
    """Whether two networks are the same network with the same weights."""
    return (a.unet == b.unet and a.state_dict.keys() == b.state_dict.keys()
            and all(torch.equal(a.state_dict[n], b.state_dict[n]) for n in a.state_dict))


def _distinct(members: list[StageWeights]) -> list[StageWeights]:
    """Members whose weights differ: a stage the members share (e.g. one localiser kept by all) runs once."""
    kept: list[StageWeights] = []
    for m in members:
        if not any(same_weights(k, m) for k in kept):
            kept.append(m)
    return kept


def write_model_folder(output: Path, metrics: dict, checkpoint: dict, calibrations: dict) -> None:
    """Write output/metrics.json, model.pt and calibration.png; on failure remove what was written (and the folder
    when it was made here), so that the same command can simply be run again."""
    created = not output.exists()
    written: list[Path] = []
    try:
        output.mkdir(parents=True, exist_ok=True)
        written.append(write_text_atomic(output / "metrics.json", json.dumps(metrics, indent=1)))
        written.append(output / "calibration.png")
        save_calibration(output / "calibration.png", calibrations)
        written.append(output / "model.pt")
        save_atomic(checkpoint, output / "model.pt")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created and output.is_dir() and not any(output.iterdir()):
            output.rmdir()
        raise


def read_members(members: list[Path], what: str) -> list[ModelCheckpoint]:
    """The member models of what is built from them: at least two distinct files, none an ensemble, one plan."""
    if len({str(Path(p).resolve()) for p in members}) != len(members):
        raise HeartsegError("a member model is given twice")
    if len(members) < 2:
        raise HeartsegError(f"{what} needs at least two member models")
    checkpoints = [read_model(p) for p in members]
    for checkpoint in checkpoints:
        if any(len(w) > 1 for w in checkpoint.networks.values()):
            raise HeartsegError(f"{checkpoint.path}: is an ensemble already; give its members")
        if _plan_of(checkpoint) != _plan_of(checkpoints[0]):
            raise HeartsegError(f"{checkpoint.path}: prepares scans otherwise than {checkpoints[0].path}, or its "
                                "networks differ (stages, spacing, patch, normalisation or U-Net): members must come "
                                "from one plan")
    return checkpoints


def members_cases(data: list[Path], needed: Iterable[str]) -> tuple[list[DatasetInfo], dict[str, Case]]:
    """The datasets and their cases by id, refused when the members' cases are not all among them."""
    datasets = read_datasets(data)
    cases = {c.case_id: c for info in datasets for c in info.cases}
    missing = sorted(c for c in needed if c not in cases)
    if missing:
        raise HeartsegError(f"the members name cases that the given datasets lack ({', '.join(missing[:5])}"
                            f"{', ...' if len(missing) > 5 else ''}): give every dataset they trained on")
    return datasets, cases


def build_ensemble(data: list[Path], members: list[Path], output: Path, cache: str | None = None,
                   device: str = "cpu", log: Callable[[str], None] = print, command: str = "") -> dict:
    """Write output/model.pt averaging the members' probabilities per stage, with thresholds and QC calibrations
    fitted on the cases of data that neither the members nor the weights they started from were trained on,
    nor the members validated on (nor any image equal to one of those); returns the metrics also written to
    output/metrics.json."""
    checkpoints = read_members(members, "an ensemble")
    weights = {stage.name: _distinct([w for checkpoint in checkpoints for w in checkpoint.networks[stage.name]])
               for stage in checkpoints[0].contract.stages}
    final = checkpoints[0].contract.final_stage.name
    if len(weights[final]) < 2:
        raise HeartsegError("the members' final-stage networks are identical: nothing to average")
    lineage = members_lineage(checkpoints, log)
    own = {c for checkpoint in checkpoints for c in info_cases(checkpoint.contract.info, "train_cases")}
    validated = {c for checkpoint in checkpoints for c in info_cases(checkpoint.contract.info, "val_cases")}
    datasets, cases = members_cases(data, own)
    used = lineage.trained | validated
    used_images = {image_hash(cases[c].image) for c in used if c in cases}
    unseen = [c for c in cases if c not in used and image_hash(cases[c].image) not in used_images]
    if not unseen:
        raise HeartsegError("every case of the given datasets was trained or validated on by some member: an "
                            "ensemble is calibrated and measured on cases none of its members saw (add a labelled "
                            "test dataset, or ensemble models trained on sub-folds of one fold's training cases)")
    base = checkpoints[0].contract
    root = cache_root(cache)
    trained = sorted(own)
    log(f"ensemble of {len(members)} models: learning plausibility from the {len(trained)} cases they trained on, "
        f"calibrating on the {len(unseen)} none of them saw")
    train_cases = [prepare_case(cases[c], base, root) for c in trained]
    val_cases = [prepare_case(cases[c], base, root) for c in unseen]
    plausibility = learned_plausibility(train_cases)
    contract = replace(base, plausibility=plausibility, info={}, format_version=FORMAT_VERSION)
    networks = {name: stage_network([(w.unet, w.state_dict) for w in ws]) for name, ws in weights.items()}
    evaluation = calibrate_and_evaluate(contract, networks, torch.device(device), val_cases, plausibility)
    metrics = {
        "fold": "ensemble", "members": [str(Path(p).resolve()) for p in members],
        "member_networks": {name: len(ws) for name, ws in weights.items()},
        "train_cases": trained, "val_cases": unseen,
        "split": "cases of the given datasets that no member, nor the weights they started from, trained on "
                 "and no member validated on",
        "init_untraced": lineage.untraced,
        **evaluation.metrics(),
    }
    contract = replace(evaluation.contract, info={
        **dataset_info(datasets), "fold": "ensemble", "members": str(len(weights[final])),
        "train_cases": ",".join(trained), "val_cases": ",".join(unseen), "init_from": ""})
    write_model_folder(output, metrics, model_checkpoint(
        contract, {n: [(w.unet.to_dict(), w.state_dict) for w in ws] for n, ws in weights.items()},
        kind=checkpoints[0].kind, metrics=json.loads(json.dumps(metrics)), versions=versions(), command=command),
        evaluation.calibrations)
    log(f"ensemble: {evaluation.summary_line()} on the {len(unseen)} unseen cases; wrote {output / 'model.pt'}")
    return metrics
