"""A thin session over ONNX Runtime: provider choice, threads, and the model's contract."""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .contract import CONTRACT_KEY, MAX_VOXELS, PIPELINE_INPUTS, PIPELINE_OUTPUTS, ContractError, ModelContract
from .errors import HeartsegError, ModelError
from .model_digest import DIGEST_KEY, DigestError, ModelFile, UnverifiedModelWarning, scan_model, verify_model_digest

DEVICES = ("auto", "cpu", "cuda")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise HeartsegError(
            "ONNX Runtime is not installed: pip install onnxruntime (onnxruntime-gpu for CUDA), or "
            "pip install -e '.[cpu]' ('.[gpu]' for CUDA) in heartseg's source folder"
        ) from None
    return onnxruntime


def choose_providers(device: str, available: list[str]) -> list[str]:
    """Execution providers for --device auto|cpu|cuda, given what ONNX Runtime offers."""
    if device not in DEVICES:
        raise HeartsegError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise HeartsegError(
            "--device cuda: ONNX Runtime offers no CUDA provider here "
            f"(available: {', '.join(available)}); on a machine with an NVIDIA GPU install onnxruntime-gpu "
            "(pip install -e '.[gpu]' in heartseg's source folder)"
        )
    if device in ("cuda", "auto") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def read_contract(path: str | os.PathLike) -> tuple[ModelContract, dict[str, str]]:
    """The heartseg contract and all metadata of an ONNX file, without starting a session."""
    ort = _ort()
    path = Path(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session, _ = open_model(path, options, ["CPUExecutionProvider"])
    return _contract_of(path, session)


def open_model(path: Path, options, providers: list[str]) -> tuple[object, ModelFile]:
    """An ONNX Runtime session of the file and what walking its bytes found, the file read once: ONNX Runtime
    parses the very bytes that were hashed."""
    ort = _ort()
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model file ({exc.strerror or exc})") from None
    try:
        model, damage = scan_model(data), None
    except DigestError as exc:
        model, damage = None, exc
    if model is not None and model.external_tensors:
        # Checked before ONNX Runtime parses the bytes: it would look for those files in the working folder.
        raise ModelError(f"{path}: the model keeps {len(model.external_tensors)} tensor(s) in external data files "
                         f"(e.g. {model.external_tensors[0]!r}), which its digest cannot cover; heartseg runs "
                         "self-contained model files only (export the model again)")
    if model is not None:
        # Before ONNX Runtime parses the file: an edit that also makes the graph unloadable is still named as one.
        verify_model_digest(path, model, model.metadata)
    try:
        session = ort.InferenceSession(data, options, providers=providers)
    except Exception as exc:
        raise ModelError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
    if damage is not None:
        raise ModelError(f"{path}: the model file is altered or damaged ({damage})")
    return session, model


def _contract_of(path: Path, session) -> tuple[ModelContract, dict[str, str]]:
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if CONTRACT_KEY not in meta:
        raise ModelError(f"{path}: an ONNX file without heartseg metadata ({CONTRACT_KEY!r} is missing); "
                         "export models with heartseg-export")
    try:
        contract = ModelContract.from_json(meta[CONTRACT_KEY]).require_thresholds()
        check_graph(contract, session.get_inputs(), session.get_outputs())
    except ContractError as exc:
        raise ModelError(f"{path}: {exc}") from None
    check_weights(path, meta)
    return contract, meta


def check_weights(path: Path, meta: dict[str, str]) -> None:
    """A warning when the file records no digest (open_model checked the one it records before the file was
    parsed)."""
    if DIGEST_KEY not in meta:
        # Files exported before the digest was recorded still run: the metadata is not signed, so a refusal
        # would stop only them, not a deliberate edit that rewrites the digest too.
        warnings.warn(f"{path}: the file records no weights digest (exported by an older heartseg), so altered or "
                      "damaged weights cannot be detected; export it again to have them checked",
                      UnverifiedModelWarning, stacklevel=2)


def check_graph(contract: ModelContract, inputs, outputs) -> None:
    """The contract's input and output names against the graph's (ONNX Runtime NodeArg lists)."""
    graph_inputs = {i.name: i for i in inputs}
    graph_outputs = {o.name for o in outputs}
    if contract.pipeline:
        if set(graph_inputs) != set(PIPELINE_INPUTS):
            raise ContractError("pipeline", f"a pipeline graph takes the inputs {', '.join(PIPELINE_INPUTS)}, "
                                f"this one {', '.join(sorted(graph_inputs))}")
        missing = [name for name in PIPELINE_OUTPUTS if name not in graph_outputs]
        if missing:
            raise ContractError("pipeline", f"a pipeline graph has the outputs {', '.join(PIPELINE_OUTPUTS)}; "
                                f"{', '.join(missing)} missing")
        return
    for index, stage in enumerate(contract.stages):
        where = f"stages[{index}]"
        if stage.input_name not in graph_inputs:
            raise ContractError(f"{where}.input_name", f"{stage.input_name!r} is not an input of the graph "
                                f"(inputs: {', '.join(sorted(graph_inputs))})")
        shape = graph_inputs[stage.input_name].shape
        if shape is not None and len(shape) != 5:
            raise ContractError(f"{where}.input_name", f"input {stage.input_name!r} has rank {len(shape)}, "
                                "expected (N, 1, X, Y, Z)")
        for key in ("prob_name", "mask_name"):
            name = getattr(stage, key)
            if name not in graph_outputs:
                raise ContractError(f"{where}.{key}", f"{name!r} is not an output of the graph "
                                    f"(outputs: {', '.join(sorted(graph_outputs))})")
    extra = set(graph_inputs) - {s.input_name for s in contract.stages}
    if extra:
        raise ContractError("stages", f"graph inputs {sorted(extra)} belong to no stage")


@dataclass
class PipelineOutput:
    """What a pipeline graph returns for one scan: all on the scan's canonical grid."""

    mask: np.ndarray
    prob: np.ndarray
    score: float
    box: tuple[np.ndarray, np.ndarray] | None


class OnnxSession:
    """An ONNX Runtime session for a heartseg model file."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 max_voxels: int | None = None) -> None:
        """max_voxels (pipeline files): the most voxels one call of the final stage's network may take, larger boxes
        running in tiles (None: the file's own value, no limit)."""
        ort = _ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: model file not found")
        providers = choose_providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if max_voxels is not None:
            # Overrides the graph's initialiser; ONNX Runtime reads it from this value, which must outlive the session.
            self._max_voxels = ort.OrtValue.ortvalue_from_numpy(np.asarray(int(max_voxels), np.int64))
            options.add_initializer(MAX_VOXELS, self._max_voxels)
        self.max_voxels = max_voxels
        self._session, model = open_model(self.path, options, providers)
        self.contract, self.metadata = _contract_of(self.path, self._session)
        # The identity of the file as run (its every byte, metadata included), for records of what made a mask.
        self.file_sha256 = model.file_sha256
        used = self._session.get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in used else "cpu"
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        # A networks file's per-stage calls feed the other stages a tiny input; a pipeline file has none of those.
        self._dummy = {} if self.contract.pipeline else {
            name: np.zeros((1, 1) + (self.contract.stages[0].divisor,) * 3, np.float32) for name in self._inputs
        }

    def segment(self, image: np.ndarray, spacing: tuple[float, float, float]) -> PipelineOutput:
        """A pipeline file's graph on a scan's voxels in the model's orientation (RAS+) and their voxel size."""
        if not self.contract.pipeline:
            raise HeartsegError(f"{self.path}: the stages' networks only; OnnxSession.predict runs them one stage at "
                                "a time")
        feeds = {PIPELINE_INPUTS[0]: np.ascontiguousarray(image, dtype=np.float32),
                 PIPELINE_INPUTS[1]: np.asarray(spacing, dtype=np.float32)}
        mask, prob, score, box = self._session.run(list(PIPELINE_OUTPUTS), feeds)
        lo, hi = np.asarray(box[0], float), np.asarray(box[1], float)
        # An empty box says the final stage saw the whole scan.
        return PipelineOutput(mask, prob, float(score), (lo, hi) if np.any(hi > lo) else None)

    def _run(self, stage_name: str, batch: np.ndarray, output: str) -> np.ndarray:
        if self.contract.pipeline:
            raise HeartsegError(f"{self.path}: a pipeline file runs whole scans (OnnxSession.segment), not one stage")
        stage = self.contract.stage(stage_name)
        if batch.ndim != 5 or any(int(s) % stage.divisor for s in batch.shape[2:]):
            raise HeartsegError(f"stage {stage_name!r} accepts (N, 1, X, Y, Z) inputs whose spatial sizes are "
                                f"multiples of {stage.divisor}, got {tuple(batch.shape)}")
        feeds = dict(self._dummy)
        feeds[stage.input_name] = np.ascontiguousarray(batch, dtype=np.float32)
        # The other stage's input gets a tiny dummy; only this stage's output is fetched.
        name = stage.prob_name if output == "prob" else stage.mask_name
        (result,) = self._session.run([name], {k: v for k, v in feeds.items() if k in self._inputs})
        return result

    def predict(self, stage_name: str, batch: np.ndarray) -> np.ndarray:
        """Probabilities of one stage for a (N, 1, X, Y, Z) float32 batch."""
        return self._run(stage_name, batch, "prob")

    def mask(self, stage_name: str, batch: np.ndarray) -> np.ndarray:
        """The graph's own binary mask output (its baked-in threshold) for one stage."""
        return self._run(stage_name, batch, "mask")


def identity(file_sha256: str, tta: bool = False) -> dict[str, Any]:
    """What made a mask, wherever the model file lies: the model file's SHA-256, and test-time flips."""
    return {"sha256": file_sha256, "tta": bool(tta)}


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's bytes (cached per path, size and time: a model is digested once per process)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model: str | os.PathLike, tta: bool = False) -> dict[str, Any]:
    """The identity of a model file that no session of this process has opened (a Ray driver, a merge).

    A Segmenter takes its identity from its own session (OnnxSession.file_sha256): what its records name is
    the file as it opened it.
    """
    path = Path(model).resolve()
    try:
        stat = path.stat()
        return identity(_file_sha256(str(path), stat.st_size, stat.st_mtime_ns), tta)
    except OSError as exc:
        raise ModelError(f"{model}: cannot read the model file ({exc.strerror or exc})") from None
