"""benchmarks/qclib.py: the QC benchmark's figures on constructed rows with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import qclib  # noqa: E402


def row(dice: float, verdict: str, corruption: str = "clean", score: float = 0.5) -> qclib.QCRow:
    return qclib.QCRow(f"case{dice}{verdict}{corruption}", corruption, dice, verdict, score, score)


def test_false_alarms_count_flags_on_good_clean_scans_apart() -> None:
    rows = [row(0.92, "ok"), row(0.90, "review"), row(0.78, "review"), row(0.60, "fail"),
            row(0.40, "ok", "blur"), row(0.95, "review", "noise")]
    figures = qclib.qc_figures(rows)
    assert figures["clean"] == 4 and figures["clean_good"] == 2
    assert figures["false_alarm_rate_clean"] == pytest.approx(3 / 4)
    assert figures["false_alarm_rate_clean_good"] == pytest.approx(1 / 2)
    assert figures["silent_failures"] == 1  # the blurred scan at 0.40 passed as ok
    assert figures["verdicts"] == {"ok": 2, "review": 3, "fail": 1}


def test_no_good_clean_scan_gives_no_rate() -> None:
    figures = qclib.qc_figures([row(0.5, "review"), row(0.7, "ok")])
    assert figures["clean_good"] == 0 and figures["false_alarm_rate_clean_good"] is None
    assert figures["false_alarm_rate_clean"] == pytest.approx(0.5)
    assert figures["silent_failures"] == 1  # 0.7 with verdict ok; 0.5 was flagged
