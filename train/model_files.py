"""Any model a run can start from or export: a training checkpoint (model.pt) or an exported model file (.onnx)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import ModelCheckpoint, is_exported_file, read_model_checkpoint
from .onnx_import import read_onnx_model


def read_model(path: str | Path) -> ModelCheckpoint:
    """A model.pt read and validated, or an exported model file read back into trainable networks."""
    return read_onnx_model(path) if is_exported_file(path) else read_model_checkpoint(path)
