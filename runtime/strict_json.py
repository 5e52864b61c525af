"""Strict JSON for reports and records: NaN and infinities become null."""

from __future__ import annotations

import math
from typing import Any


def json_ready(value: Any) -> Any:
    """Replace NaN / infinities by None, recursively, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
