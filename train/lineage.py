"""Which cases a checkpoint's weights were trained on, through the --init-from weights they started from:
what held-out metrics must not be measured on."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from heartseg.runtime.errors import HeartsegError

from .checkpoint import read_model_checkpoint


@dataclass
class Lineage:
    """Cases trained on by a checkpoint and its ancestors, and the ancestors that could not be read."""

    trained: set[str] = field(default_factory=set)
    untraced: list[str] = field(default_factory=list)


def _sources(text: str) -> list[str]:
    return [part.strip() for part in text.split(" + ") if part.strip()]


def trained_cases(path: str | Path, lineage: Lineage | None = None, _seen: set[str] | None = None) -> Lineage:
    """The training cases of a model.pt (its contract's info) or of a RUN/fold_K/STAGE/best.pt (its run's
    splits.json), and of every --init-from source before it, as far as those files can still be read."""
    lineage = lineage if lineage is not None else Lineage()
    seen = _seen if _seen is not None else set()
    path = Path(path)
    key = str(path.resolve())
    if key in seen:
        return lineage
    seen.add(key)
    try:
        if path.name == "best.pt":
            run, fold = path.resolve().parents[2], path.resolve().parents[1].name
            index = int(fold.removeprefix("fold_"))
            splits = json.loads((run / "splits.json").read_text())["folds"]
            lineage.trained.update(next(f["train"] for f in splits if f["fold"] == index))
            parents = json.loads((run / "config.json").read_text()).get("init_from") or []
            parents = [parents] if isinstance(parents, str) else parents
        else:
            info = read_model_checkpoint(path).contract.info
            lineage.trained.update(c for c in info.get("train_cases", "").split(",") if c)
            parents = _sources(info.get("init_from", ""))
    except (HeartsegError, OSError, ValueError, KeyError, TypeError, IndexError, StopIteration):
        lineage.untraced.append(str(path))
        return lineage
    for parent in parents:
        trained_cases(parent, lineage, seen)
    return lineage
