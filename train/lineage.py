"""Which cases a checkpoint's weights were trained on, through the --init-from weights they started from (what
held-out metrics must not be measured on), and which weights each of its stages started from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from heartseg.runtime.contract import ModelContract
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.session import read_contract

from .checkpoint import (
    ModelCheckpoint,
    is_exported_file,
    is_stage_checkpoint,
    read_stage_weights,
)
from .model_files import read_model


@dataclass
class Lineage:
    """Cases trained on by checkpoints and their ancestors, the ancestors that could not be read, and every file
    already traced (an ancestor that several checkpoints share is read once)."""

    trained: set[str] = field(default_factory=set)
    untraced: list[str] = field(default_factory=list)
    visited: set[str] = field(default_factory=set, repr=False)


def _sources(text: str) -> list[str]:
    return [part.strip() for part in text.split(" + ") if part.strip()]


def info_cases(info: dict, key: str) -> list[str]:
    """A contract info's comma-separated case list (train_cases or val_cases), in its order."""
    return [c for c in info.get(key, "").split(",") if c]


def _run_init_from(best: Path) -> list[str]:
    """The --init-from sources of the run that a RUN/fold_K/STAGE/best.pt (or last.pt) belongs to."""
    parents = json.loads((best.resolve().parents[2] / "config.json").read_text()).get("init_from") or []
    return [parents] if isinstance(parents, str) else parents


def trained_cases(source: str | Path | ModelCheckpoint, lineage: Lineage | None = None) -> Lineage:
    """The training cases of a model.pt (its contract's info; a checkpoint already read is not read again) or of a
    RUN/fold_K/STAGE/best.pt or last.pt (its run's splits.json), and of every --init-from source before it, as far
    as those files can still be read."""
    lineage = lineage if lineage is not None else Lineage()
    checkpoint = source if isinstance(source, ModelCheckpoint) else None
    path = Path(checkpoint.path if checkpoint is not None else source)
    key = str(path.resolve())
    if key in lineage.visited:
        return lineage
    lineage.visited.add(key)
    try:
        if is_stage_checkpoint(path):
            run, fold = path.resolve().parents[2], path.resolve().parents[1].name
            index = int(fold.removeprefix("fold_"))
            splits = json.loads((run / "splits.json").read_text())["folds"]
            lineage.trained.update(next(f["train"] for f in splits if f["fold"] == index))
            parents = _run_init_from(path)
        else:
            info = (checkpoint.contract if checkpoint is not None else _contract(path)).info
            lineage.trained.update(info_cases(info, "train_cases"))
            parents = _sources(info.get("init_from", ""))
    except (HeartsegError, OSError, ValueError, KeyError, TypeError, IndexError, StopIteration):
        lineage.untraced.append(str(path))
        return lineage
    for parent in parents:
        trained_cases(parent, lineage)
    return lineage


def _contract(path: Path) -> ModelContract:
    """A model.pt's or an exported file's contract; an exported file's networks are not read back for it."""
    return read_contract(path)[0] if is_exported_file(path) else read_model(path).contract


def members_lineage(checkpoints: list[ModelCheckpoint], log: Callable[[str], None]) -> Lineage:
    """The cases the members and every --init-from source before them trained on; warns of sources it cannot read."""
    lineage = Lineage()
    for checkpoint in checkpoints:
        trained_cases(checkpoint, lineage)
    if lineage.untraced:
        log(f"warning: cannot tell which cases these starting weights were trained on (unreadable): "
            f"{', '.join(lineage.untraced)}")
    return lineage


def weights_fingerprint(state: dict) -> str:
    """SHA-256 of a state dict's names and tensor values: equal for copies of one network's weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _stage_source(parents: list[str], stage: str) -> str | None:
    """The --init-from source a stage started from: the last one holding it (a model.pt holds every stage, a
    RUN/fold_K/STAGE/best.pt or last.pt only its own)."""
    for parent in reversed(parents):
        if not is_stage_checkpoint(parent) or Path(parent).parent.name == stage:
            return parent
    return None


def stage_origins(source: str | Path | ModelCheckpoint, stage: str) -> set[str]:
    """Fingerprints of one stage's weights in a checkpoint and in each --init-from source that stage started from,
    back to the first; a file that cannot be read counts by its resolved path and ends the trace."""
    origins: set[str] = set()
    current: str | Path | ModelCheckpoint | None = source
    seen: set[str] = set()
    while current is not None:
        checkpoint = current if isinstance(current, ModelCheckpoint) else None
        path = Path(checkpoint.path if checkpoint is not None else current)
        key = str(path.resolve())
        if key in seen:
            break
        seen.add(key)
        try:
            if is_stage_checkpoint(path):
                state = read_stage_weights(path)
                parents = _run_init_from(path)
            else:
                checkpoint = checkpoint or read_model(path)
                weights = checkpoint.networks.get(stage)
                if not weights or len(weights) != 1:
                    break
                state = weights[0].state_dict
                parents = _sources(checkpoint.contract.info.get("init_from", ""))
        except (HeartsegError, OSError, ValueError, KeyError, TypeError, IndexError):
            origins.add(key)
            break
        origins.add(weights_fingerprint(state))
        current = _stage_source(parents, stage)
    return origins
