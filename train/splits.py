"""Seeded k-fold cross-validation in which cases with identical images share a fold."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from heartseg.runtime.atomic import write_text_atomic
from heartseg.runtime.errors import InputError


@dataclass
class Fold:
    """The case ids a fold trains and validates on."""

    index: int
    train: list[str]
    val: list[str]


def make_folds(case_ids: list[str], hashes: dict[str, str], n_folds: int = 5, seed: int = 0,
               strata: dict[str, str] | None = None) -> list[Fold]:
    """Split cases into n_folds groups; cases whose image hashes are equal always land together.

    With strata (case id -> dataset), each dataset is split on its own and fold k joins the k-th part
    of every dataset, so each fold holds out the same share of each dataset.
    """
    if strata and len(set(strata.values())) > 1:
        per_stratum = [_make_folds([c for c in case_ids if strata[c] == name], hashes, n_folds, seed)
                       for name in sorted(set(strata.values()))]
        folds = []
        for index in range(n_folds):
            val = sorted(c for parts in per_stratum for c in parts[index].val)
            folds.append(Fold(index, sorted(c for c in case_ids if c not in set(val)), val))
        return folds
    return _make_folds(case_ids, hashes, n_folds, seed)


def _make_folds(case_ids: list[str], hashes: dict[str, str], n_folds: int, seed: int) -> list[Fold]:
    if n_folds < 2:
        raise InputError("cross-validation needs at least 2 folds")
    groups: dict[str, list[str]] = defaultdict(list)
    for case_id in sorted(case_ids):
        groups[hashes[case_id]].append(case_id)
    if len(groups) < n_folds:
        raise InputError(f"{len(groups)} distinct images cannot make {n_folds} folds")
    ordered = sorted(groups.values())
    random.Random(seed).shuffle(ordered)
    # Largest groups first, each into the currently smallest fold: balanced sizes.
    ordered.sort(key=len, reverse=True)
    buckets: list[list[str]] = [[] for _ in range(n_folds)]
    for group in ordered:
        min(buckets, key=len).extend(group)
    folds = []
    for index, val in enumerate(buckets):
        train = sorted(c for c in case_ids if c not in set(val))
        folds.append(Fold(index, train, sorted(val)))
    return folds


def write_splits(path: Path, folds: list[Fold], seed: int) -> None:
    """Write splits.json."""
    data = {"seed": seed, "folds": [{"fold": f.index, "train": f.train, "val": f.val} for f in folds]}
    write_text_atomic(path, json.dumps(data, indent=1))


def read_splits(path: Path) -> list[Fold]:
    """Read splits.json."""
    data = json.loads(path.read_text())
    return [Fold(f["fold"], f["train"], f["val"]) for f in data["folds"]]


def given_folds(path: Path, hashes: dict[str, str]) -> list[Fold]:
    """Folds from a splits file (the format of splits.json), checked against the dataset's cases.

    Cases that no fold names are not used; no fold may validate on an image it trains on.
    """
    try:
        folds = read_splits(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--splits {path}: not a splits file ({type(exc).__name__}: {exc})") from None
    if not folds:
        raise InputError(f"--splits {path}: no folds")
    for fold in folds:
        unknown = sorted(set(fold.train + fold.val) - set(hashes))
        if unknown:
            raise InputError(f"--splits {path}: fold {fold.index} names cases that are not in the data: {unknown[:5]}")
        if not fold.train or not fold.val:
            raise InputError(f"--splits {path}: fold {fold.index} needs training and validation cases")
        shared = {hashes[c] for c in fold.train} & {hashes[c] for c in fold.val}
        if shared:
            raise InputError(f"--splits {path}: fold {fold.index} validates on an image it trains on")
    return [Fold(i, sorted(f.train), sorted(f.val)) for i, f in enumerate(folds)]
