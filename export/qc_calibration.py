"""The QC score calibration to export with a model, read from a run's files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from heartseg.runtime.confidence import ScoreCalibration
from heartseg.runtime.errors import HeartsegError


def read_score_calibration(path: str | Path) -> ScoreCalibration:
    """A calibration from a run's summary.json or fold metrics.json (key score_calibration), or its own JSON."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HeartsegError(f"{path}: not a readable JSON file ({exc})") from None
    if isinstance(data, Mapping) and isinstance(data.get("score_calibration"), Mapping):
        data = data["score_calibration"]
    try:
        return ScoreCalibration.from_dict(dict(data))
    except (TypeError, ValueError) as exc:
        raise HeartsegError(f"{path}: no QC score calibration in it ({exc})") from None
