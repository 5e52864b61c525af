"""Writing a model file: the full ONNX check, and the model digest the runtime verifies when it opens the file.

Needs the onnx package only to check the model; the digest itself is the runtime's (heartseg.runtime.model_digest).
"""

from __future__ import annotations

from pathlib import Path

from heartseg.runtime.contract import CONTRACT_KEY
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.model_digest import DIGEST_KEY, DigestError, scan_model


def set_metadata(proto, key: str, value: str) -> None:
    """Set one metadata_props entry of a ModelProto, replacing any entries of that key (never a duplicate)."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != key]
    del proto.metadata_props[:]
    for k, v in [*kept, (key, value)]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def _digest(data: bytes, contract: str | None) -> str:
    """The model digest of serialised bytes; HeartsegError for weights stored as external data."""
    try:
        model = scan_model(data)
    except DigestError as exc:
        raise HeartsegError(f"the serialised model cannot be digested ({exc})") from None
    if model.external_tensors:
        raise HeartsegError(f"the model keeps {len(model.external_tensors)} tensor(s) in external data files (e.g. "
                            f"{model.external_tensors[0]!r}), which no digest of the model file covers: load them "
                            "into the model (onnx.load reads them) and write one self-contained file")
    return model.digest(contract)


def stamp_digest(proto) -> bytes:
    """Record the model digest in the ModelProto's metadata; the serialised file, checked to match."""
    contract = {p.key: p.value for p in proto.metadata_props}.get(CONTRACT_KEY)
    set_metadata(proto, DIGEST_KEY, _digest(proto.SerializeToString(), contract))
    data = proto.SerializeToString()
    written = {p.key: p.value for p in proto.metadata_props}[DIGEST_KEY]
    if _digest(data, contract) != written:
        raise HeartsegError("the model serialises differently each time: its digest cannot be recorded")
    return data


def save_stamped(proto, path: str | Path) -> Path:
    """Record the model digest and write the file, without the full check: for a checked model whose metadata
    alone changed since."""
    path = Path(path)
    path.write_bytes(stamp_digest(proto))
    return path


def write_model(proto, path: str | Path) -> Path:
    """Fully check the ModelProto (onnx.checker, full_check), record its model digest, and write it to path."""
    import onnx

    data = stamp_digest(proto)  # first: it refuses weights in external data, which the checker would look for
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise HeartsegError(f"the model fails ONNX's full check: {str(exc).splitlines()[0]}") from None
    path = Path(path)
    path.write_bytes(data)
    return path
