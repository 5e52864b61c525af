"""The QC score calibrations to export with a model, read from a run's files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from heartseg.runtime.qc.calibration import CALIBRATED_SCORES, ScoreCalibration
from heartseg.runtime.contract import ContractError, check_score_calibration
from heartseg.runtime.errors import HeartsegError


def read_score_calibrations(path: str | Path) -> dict[str, ScoreCalibration]:
    """The contract fields score_calibration (always) and tta_score_calibration (when there) from a run's
    summary.json or fold metrics.json, or score_calibration alone from a calibration's own JSON."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HeartsegError(f"{path}: not a readable JSON file ({exc})") from None
    blocks = {"score_calibration": data}
    if isinstance(data, Mapping) and isinstance(data.get("score_calibration"), Mapping):
        blocks = {key: data[key] for key in CALIBRATED_SCORES if isinstance(data.get(key), Mapping)}
    calibrations = {}
    for key, block in blocks.items():
        # The same schema as the contract's own block, so a file that exports is one the runtime accepts.
        try:
            calibration = check_score_calibration(dict(block) if isinstance(block, Mapping) else block, key)
        except ContractError as exc:
            raise HeartsegError(f"{path}: no QC score calibration in it ({exc})") from None
        if calibration is None:
            raise HeartsegError(f"{path}: no QC score calibration in it (null)")
        calibrations[key] = calibration
    return calibrations
