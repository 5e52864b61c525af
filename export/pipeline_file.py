"""Pipeline files: a networks file (the stages' networks side by side) wrapped in the graph from scan to mask,
the networks taken back out of one, and --upgrade of files exported before format 7."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import onnx
from heartseg.runtime.contract import CONTRACT_KEY, FORMAT_VERSION, ContractError, ModelContract
from heartseg.runtime.errors import ModelError
from heartseg.runtime.session import read_contract

from .pipeline_graph import build_pipeline, networks_model
from .stamp import set_metadata, stamp_digest, write_model

FORMAT_KEY = "heartseg.format_version"


def contract_of(proto: onnx.ModelProto, source: str | Path = "model") -> ModelContract:
    """The heartseg contract in a ModelProto's metadata (ModelError when it has none or it is invalid)."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if CONTRACT_KEY not in meta:
        raise ModelError(f"{source}: an ONNX file without heartseg metadata ({CONTRACT_KEY!r} is missing)")
    try:
        return ModelContract.from_json(meta[CONTRACT_KEY]).require_thresholds()
    except ContractError as exc:
        raise ModelError(f"{source}: {exc}") from None


def _with_contract(proto: onnx.ModelProto, contract: ModelContract) -> onnx.ModelProto:
    set_metadata(proto, CONTRACT_KEY, contract.to_json())
    set_metadata(proto, FORMAT_KEY, str(contract.format_version))
    return proto


def wrap(networks: onnx.ModelProto, source: str | Path = "model") -> onnx.ModelProto:
    """The pipeline graph around a networks model: its metadata kept, its contract marked as a pipeline of this
    format (not yet checked nor stamped: write_model does both)."""
    contract = contract_of(networks, source)
    if contract.pipeline:
        raise ModelError(f"{source}: already a pipeline file (one graph from scan to mask): nothing to upgrade")
    pipeline = build_pipeline(networks, contract)
    return _with_contract(pipeline, replace(contract, pipeline=True, format_version=FORMAT_VERSION))


def write_pipeline(networks: onnx.ModelProto, path: str | Path, source: str | Path = "model") -> Path:
    """Wrap a networks model and write it to path: fully checked, its digest stamped (path is written as is: give
    atomic_output's temporary file)."""
    return write_model(wrap(networks, source), path)


def unwrap(pipeline: onnx.ModelProto, source: str | Path = "model") -> onnx.ModelProto:
    """The stages' networks of a pipeline model as a networks model: its metadata kept, the contract no pipeline,
    the digest stamped. A networks model is returned as it is."""
    contract = contract_of(pipeline, source)
    if not contract.pipeline:
        return pipeline
    try:
        networks = networks_model(pipeline, contract)
    except ValueError as exc:
        raise ModelError(f"{source}: {exc}") from None
    for entry in pipeline.metadata_props:
        networks.metadata_props.add().CopyFrom(entry)
    _with_contract(networks, replace(contract, pipeline=False))
    stamp_digest(networks)
    return networks


@contextmanager
def temporary_model(proto: onnx.ModelProto, name: str = "model.onnx") -> Iterator[Path]:
    """A ModelProto in a temporary file (for an OnnxSession) that lives as long as the context."""
    with tempfile.TemporaryDirectory(prefix="heartseg-model-") as folder:
        path = Path(folder) / name
        path.write_bytes(proto.SerializeToString())
        yield path


@contextmanager
def networks_file(path: str | Path) -> Iterator[Path]:
    """A model file's networks as a file the runtime's per-stage calls run (OnnxSession.predict): a networks file
    itself, a pipeline file's networks in a temporary file that lives as long as the context."""
    path = Path(path)
    proto = onnx.load(str(path))
    if not contract_of(proto, path).pipeline:
        yield path
        return
    with temporary_model(unwrap(proto, path), path.name) as networks:
        yield networks


def upgraded(old: str | Path) -> onnx.ModelProto:
    """A networks file written by an older heartseg-export (any format the runtime reads) wrapped as a pipeline, not
    yet written (write_model checks and stamps it); ModelError for a file that already is a pipeline."""
    old = Path(old)
    # The runtime's checks first: heartseg metadata, a valid contract, and weights matching the recorded digest (a
    # file without one is upgraded with the runtime's warning: the new digest covers the weights as they were read).
    contract, _ = read_contract(old)
    if contract.pipeline:
        raise ModelError(f"{old}: already a pipeline file (one graph from scan to mask): nothing to upgrade")
    try:
        proto = onnx.load(str(old))
    except Exception as exc:
        raise ModelError(f"{old}: not a readable ONNX file ({str(exc).splitlines()[0][:200]})") from None
    return wrap(proto, old)
