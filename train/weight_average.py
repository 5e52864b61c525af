"""Models fine-tuned from one model on one fold, averaged weight by weight into one network per stage (a "model
soup"): as fast as one of them, calibrated and scored on the fold's held-out cases as a training run is."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from heartseg.runtime.errors import HeartsegError

from .cache import cache_root, prepare_case
from .checkpoint import ModelCheckpoint, StageWeights, model_checkpoint
from .dataset import dataset_info
from .ensemble import members_cases, read_members, same_weights, write_model_folder
from .evaluate import calibrate_and_evaluate, stage_network
from .lineage import info_cases, members_lineage, stage_origins
from .pipeline import versions


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of each floating-point tensor (computed in float64, stored in its own type); other tensors
    (e.g. BatchNorm's step counter) are taken from the first."""
    return {name: (sum(s[name].double() for s in states) / len(states)).to(t.dtype) if t.is_floating_point() else t
            for name, t in states[0].items()}


# BatchNorm's running statistics: their mean is not the statistics of the averaged network.
_RUNNING_STATS = ("running_mean", "running_var")


def _averaged(stage: str, members: list[StageWeights], checkpoints: list[ModelCheckpoint]) -> StageWeights:
    """One stage's averaged network; a network every member shares (e.g. one localiser kept by all) unchanged.
    Refused when the members' networks of the stage did not start from one network, or differ in BatchNorm
    statistics."""
    if all(same_weights(members[0], m) for m in members[1:]):
        return members[0]
    shared = set.intersection(*(stage_origins(c, stage) for c in checkpoints))
    if not shared:
        raise HeartsegError(f"the members' {stage!r} networks do not start from one network (--init-from): "
                            "the weights of networks trained apart do not average into a working network (use "
                            "--ensemble-of to average their probabilities)")
    states = [m.state_dict for m in members]
    moved = sorted(n for n in states[0] if n.endswith(_RUNNING_STATS)
                   and any(not torch.equal(states[0][n], s[n]) for s in states[1:]))
    if moved:
        raise HeartsegError(f"the members' {stage!r} networks differ in BatchNorm statistics ({moved[0]}, ...): "
                            "their mean is not the averaged network's; keep that stage the same in every member "
                            "(e.g. --coarse-steps 0) or combine them with --ensemble-of")
    return StageWeights(members[0].unet, average_state_dicts(states))


def _fold_cases(checkpoint: ModelCheckpoint) -> tuple[tuple[str, ...], tuple[str, ...]]:
    info = checkpoint.contract.info
    return tuple(sorted(info_cases(info, "train_cases"))), tuple(sorted(info_cases(info, "val_cases")))


def build_weight_average(data: list[Path], members: list[Path], output: Path, cache: str | None = None,
                         device: str = "cpu", log: Callable[[str], None] = print, command: str = "") -> dict:
    """Write output/model.pt whose every stage averages the members' weights (members fine-tuned from one model
    on the same fold), with thresholds and QC calibrations fitted on that fold's held-out cases; returns the metrics
    also written to output/metrics.json."""
    checkpoints = read_members(members, "an average of weights")
    folds = {_fold_cases(c) for c in checkpoints}
    if len(folds) != 1:
        raise HeartsegError("the members were trained or validated on different cases: weights are averaged over "
                            "models trained on one fold (use --ensemble-of to combine fold models)")
    train, val = (list(cases) for cases in folds.pop())
    if not val:
        raise HeartsegError(f"{checkpoints[0].path}: names no held-out cases to calibrate on")
    lineage = members_lineage(checkpoints, log)
    overlap = sorted(lineage.trained & set(val))
    if overlap:
        log(f"warning: the members or the weights they started from were trained on {len(overlap)} of the held-out "
            f"cases ({', '.join(overlap[:5])}{', ...' if len(overlap) > 5 else ''}): the metrics overstate the model")
    datasets, cases = members_cases(data, train + val)
    base = checkpoints[0].contract
    weights = {stage.name: _averaged(stage.name, [c.networks[stage.name][0] for c in checkpoints], checkpoints)
               for stage in base.stages}
    if weights[base.final_stage.name] is checkpoints[0].networks[base.final_stage.name][0]:
        raise HeartsegError("the members' final-stage networks are identical: nothing to average")
    log(f"average of {len(members)} models' weights: calibrating on their fold's {len(val)} held-out cases")
    root = cache_root(cache)
    val_cases = [prepare_case(cases[c], base, root) for c in val]
    # Every member learned its plausibility from the same training cases: it is kept, not learned again.
    contract = replace(base, info={})
    networks = {name: stage_network([(w.unet, w.state_dict)]) for name, w in weights.items()}
    evaluation = calibrate_and_evaluate(contract, networks, torch.device(device), val_cases, base.plausibility)
    fold = base.info.get("fold", "")
    metrics = {
        "fold": int(fold) if fold.isdigit() else fold, "members": [str(Path(p).resolve()) for p in members],
        "train_cases": train, "val_cases": val,
        "split": "held-out validation cases of the members' fold" + (
            f", {len(overlap)} of them trained on by the members or their starting weights" if overlap else
            " (never trained on)"),
        "init_trained_on_held_out": overlap, "init_untraced": lineage.untraced,
        **evaluation.metrics(),
    }
    contract = replace(evaluation.contract, info={
        **dataset_info(datasets), "fold": fold, "train_cases": ",".join(train), "val_cases": ",".join(val),
        "init_from": " + ".join(str(Path(p).resolve()) for p in members)})
    write_model_folder(output, metrics, model_checkpoint(
        contract, {n: [(w.unet.to_dict(), w.state_dict)] for n, w in weights.items()}, kind=checkpoints[0].kind,
        metrics=json.loads(json.dumps(metrics)), versions=versions(), command=command), evaluation.calibrations)
    log(f"average of weights: {evaluation.summary_line()} on fold {fold}'s {len(val)} held-out cases; "
        f"wrote {output / 'model.pt'}")
    return metrics
