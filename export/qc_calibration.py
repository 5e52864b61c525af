"""The QC score calibration to export with a model, read from a run's files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from heartseg.runtime.confidence import ScoreCalibration
from heartseg.runtime.contract import ContractError, check_score_calibration
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
    # The same schema as the contract's own block, so a file that exports is one the runtime accepts.
    try:
        calibration = check_score_calibration(dict(data) if isinstance(data, Mapping) else data)
    except ContractError as exc:
        raise HeartsegError(f"{path}: no QC score calibration in it ({exc})") from None
    if calibration is None:
        raise HeartsegError(f"{path}: no QC score calibration in it (null)")
    return calibration
