"""How scans pair with their labels by name."""

from __future__ import annotations

from typing import TypeVar

# An nnU-Net input's channel suffix: case_0000.nii.gz is channel 0 of case, whose label is case.nii.gz.
CHANNEL_DIGITS = 4
T = TypeVar("T")


def label_key(name: str) -> str:
    """The case name of a scan name: nnU-Net's case_0000 gives case; any other name is its own case."""
    head, _, tail = name.rpartition("_")
    return head if head and len(tail) == CHANNEL_DIGITS and tail.isdigit() else name


def find_label(index: dict[str, T], name: str) -> T | None:
    """The label named like the scan (X with X), else like its nnU-Net case (X_0000 with X)."""
    found = index.get(name)
    return found if found is not None else index.get(label_key(name))
