"""A thin session over ONNX Runtime: provider choice, threads, and the model's contract."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .contract import CONTRACT_KEY, ContractError, ModelContract
from .errors import HeartsegError, ModelError

DEVICES = ("auto", "cpu", "cuda")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise HeartsegError(
            "ONNX Runtime is not installed: pip install 'heartseg[cpu]' (or 'heartseg[gpu]' for CUDA)"
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
            f"(available: {', '.join(available)}); install heartseg[gpu] on a machine with an NVIDIA GPU"
        )
    if device in ("cuda", "auto") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def read_contract(path: str | os.PathLike) -> tuple[ModelContract, dict[str, str]]:
    """The heartseg contract and all metadata of an ONNX file, without starting a session."""
    ort = _ort()
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
    return _contract_of(path, session)


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
    return contract, meta


def check_graph(contract: ModelContract, inputs, outputs) -> None:
    """The contract's input and output names against the graph's (ONNX Runtime NodeArg lists)."""
    graph_inputs = {i.name: i for i in inputs}
    graph_outputs = {o.name for o in outputs}
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


class OnnxSession:
    """An ONNX Runtime session for a heartseg model file."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> None:
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
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:
            raise ModelError(f"{self.path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
        self.contract, self.metadata = _contract_of(self.path, self._session)
        used = self._session.get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in used else "cpu"
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self._dummy = {
            name: np.zeros((1, 1) + (self.contract.stages[0].divisor,) * 3, np.float32) for name in self._inputs
        }

    def _run(self, stage_name: str, batch: np.ndarray, output: str) -> np.ndarray:
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
