"""The digest of a model file, recorded in its metadata at export and checked when the file opens.

Definition: SHA-256 over the bytes of every top-level field of the serialised ONNX ModelProto except
metadata_props (field 14), each exactly as stored (field header, length and payload) and in file order,
followed by the UTF-8 bytes of the `heartseg.contract` metadata value (none when the file has no contract).
It so covers the graph with its weights, the operator sets, model-local functions and training info,
and the contract that sets thresholds and preprocessing; the rest of the metadata may change (export
records the digest in it, and a site may annotate a file) without invalidating it.

Weights kept in external data files are outside the file and so outside any digest of it: such models are
refused. The metadata is not signed: the digest catches damage and edits that leave it as it was, not a
deliberate edit that rewrites it too.

Checking it needs no onnx package: the protobuf fields are walked with a varint reader, which on the same
pass hashes the whole file (its identity) and looks for tensors whose data_location is EXTERNAL.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from .contract import CONTRACT_KEY
from .errors import HeartsegWarning, ModelError

DIGEST_KEY = "heartseg.model_digest"
METADATA_FIELD, GRAPH_FIELD = 14, 7
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
FIXED_SIZES = {FIXED64: 8, FIXED32: 4}
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
TENSOR_NAME, TENSOR_DATA_LOCATION = 8, 14

# Where tensors can sit in an ONNX model: for each message type, its fields that hold messages to visit.
SCHEMA = {
    "model": {7: "graph", 20: "training_info", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse_tensor", 23: "sparse_tensor"},
    "function": {7: "node", 11: "attribute"},
    "training_info": {1: "graph", 2: "graph"},
    "sparse_tensor": {1: "tensor", 2: "tensor"},
}


class DigestError(ValueError):
    """A file whose protobuf fields cannot be walked, or that holds no graph or several."""


class UnverifiedModelWarning(HeartsegWarning):
    """A model file that records no digest: altered or damaged weights cannot be detected."""


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at pos and the position after it."""
    value = shift = 0
    while True:
        if pos >= end:
            raise DigestError("the file ends inside a field")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise DigestError("a field header is longer than any valid one")


def _fields(data: memoryview, start: int, end: int):
    """Each field of the message in data[start:end]: (number, wire type, its start, its payload's start, its end)."""
    pos = start
    while pos < end:
        begin = pos
        tag, pos = _varint(data, pos, end)
        number, wire = tag >> 3, tag & 7
        payload = pos
        if wire == VARINT:
            _, pos = _varint(data, pos, end)
        elif wire in FIXED_SIZES:
            pos += FIXED_SIZES[wire]
        elif wire == LENGTH_DELIMITED:
            length, payload = _varint(data, pos, end)
            pos = payload + length
        else:
            raise DigestError(f"field {number} has wire type {wire}, which no ONNX file uses")
        if pos > end:
            raise DigestError("the file ends inside a field")
        yield number, wire, begin, payload, pos


def _external_tensors(data: memoryview, start: int, end: int, kind: str) -> list[str]:
    """Names of the tensors stored as external data in the message data[start:end] of the given kind."""
    if kind == "tensor":
        name, external = "", False
        for number, wire, _, payload, stop in _fields(data, start, end):
            if number == TENSOR_NAME and wire == LENGTH_DELIMITED:
                name = bytes(data[payload:stop]).decode("utf-8", "replace")
            elif number == TENSOR_DATA_LOCATION and wire == VARINT:
                external = _varint(data, payload, stop)[0] == EXTERNAL
        return [name or "(unnamed)"] if external else []
    children = SCHEMA[kind]
    return [found for number, wire, _, payload, stop in _fields(data, start, end)
            if number in children and wire == LENGTH_DELIMITED
            for found in _external_tensors(data, payload, stop, children[number])]


@dataclass(frozen=True)
class ModelFile:
    """What one walk over a model file's bytes finds: its SHA-256, its content hash, its external tensors."""

    file_sha256: str
    external_tensors: tuple[str, ...]
    _content: Any = field(repr=False, compare=False)  # SHA-256 state over every top-level field but metadata
    # metadata_props as a parser reads them (a repeated key: the last entry).
    metadata: dict[str, str] = field(default_factory=dict, compare=False)

    def digest(self, contract: str | None) -> str:
        """The model digest (hex) of this file's content with the given contract JSON."""
        state = self._content.copy()
        state.update((contract or "").encode("utf-8"))
        return state.hexdigest()


def scan_model(data: bytes) -> ModelFile:
    """Walk a serialised ONNX ModelProto once: file SHA-256, content hash and external tensors."""
    view = memoryview(data)
    whole, content = hashlib.sha256(), hashlib.sha256()
    graphs, messages = 0, []
    metadata: dict[str, str] = {}
    for number, wire, begin, payload, end in _fields(view, 0, len(view)):
        whole.update(view[begin:end])
        if number != METADATA_FIELD:
            content.update(view[begin:end])
        elif wire == LENGTH_DELIMITED:
            metadata.update([_entry(view, payload, end)])
        if wire == LENGTH_DELIMITED and number in SCHEMA["model"]:
            messages.append((payload, end, SCHEMA["model"][number]))
            graphs += number == GRAPH_FIELD
    if graphs != 1:
        # A parser merges repeated message fields: which weights run would be ambiguous.
        raise DigestError("the file holds no graph" if not graphs else "the file holds more than one graph")
    external = [name for payload, end, kind in messages for name in _external_tensors(view, payload, end, kind)]
    return ModelFile(whole.hexdigest(), tuple(external), content, metadata)


def _entry(data: memoryview, start: int, end: int) -> tuple[str, str]:
    """The key and value of one StringStringEntryProto (fields 1 and 2)."""
    found = {1: "", 2: ""}
    for number, wire, _, payload, stop in _fields(data, start, end):
        if number in found and wire == LENGTH_DELIMITED:
            found[number] = bytes(data[payload:stop]).decode("utf-8", "replace")
    return found[1], found[2]


def verify_model_digest(path: str | os.PathLike, model: ModelFile, metadata: dict[str, str]) -> bool:
    """True when the file matches the digest its metadata records; False when it records none;
    ModelError when it does not match."""
    recorded = metadata.get(DIGEST_KEY)
    if recorded is None:
        return False
    if model.digest(metadata.get(CONTRACT_KEY)) != recorded.strip().lower():
        raise ModelError(f"{path}: the model is altered or damaged: its SHA-256 (of its networks, weights and "
                         "contract) differs from the one recorded at export; use an unaltered copy or export the "
                         "model again")
    return True
