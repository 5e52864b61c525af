"""Atomic checkpoint files, loadable with torch.load(weights_only=True)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from heartseg.runtime.atomic import atomic_output
from heartseg.runtime.errors import HeartsegError

CHECKPOINT_FORMAT = "heartseg-model"
CHECKPOINT_VERSION = 1


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over path."""
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def load_safe(path: Path) -> dict[str, Any]:
    """Load a checkpoint without running any pickled code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise HeartsegError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HeartsegError(
            f"{path}: refused to load: not a plain weights checkpoint (torch.load with weights_only=True "
            f"failed: {first[:300]})"
        ) from None
    if not isinstance(data, dict):
        raise HeartsegError(f"{path}: not a heartseg checkpoint (top level is {type(data).__name__})")
    return data
