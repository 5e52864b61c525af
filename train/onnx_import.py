"""Reading an exported model file back into trainable networks: the weights of every stage from the ONNX
initializers, checked against ONNX Runtime before anything trains from them. A pipeline file's networks are taken
back out of its graph first (their initialisers keep their names there)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from heartseg.runtime.contract import ModelContract, StageContract
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.session import OnnxSession
from torch import nn

from .checkpoint import ModelCheckpoint, StageWeights
from .unet import UNetConfig, build_unet

# The networks' float32 sums run in another order in ONNX Runtime (as at export, export/parity.py).
MAX_ABS_DIFF = 1e-4
_CONV = (nn.Conv3d, nn.ConvTranspose3d)
# The variance of a BatchNorm read back from a folded one: 1 - eps, so that it divides by exactly 1.
_FOLDED_VAR = 1.0 - nn.BatchNorm3d(1).eps


def _onnx_proto(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise HeartsegError(f"{path}: not a readable ONNX file ({str(exc).splitlines()[0][:200]})") from None


def _conv_nodes(proto, head: int) -> dict[str, list[str]]:
    """Each convolution of one stage's network by its module path (the exporter names a node after the module
    that made it), mapped to its weight and bias inputs."""
    prefix = f"/heads.{head}/network/"
    nodes = {}
    for node in proto.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.name.startswith(prefix):
            nodes[node.name.rsplit("/", 2)[-2]] = list(node.input[1:])
    return nodes


def _forward_order(net: nn.Module, divisor: int) -> list[str]:
    """The network's convolutions by module path, in the order a forward pass calls them: the order of their nodes
    in the graph the exporter traced."""
    order: list[str] = []
    hooks = [module.register_forward_hook(lambda *_, name=name: order.append(name))
             for name, module in net.named_modules() if isinstance(module, _CONV)]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros((1, 1) + (2 * divisor,) * 3))
    finally:
        for hook in hooks:
            hook.remove()
    return order


def _upstream(proto, output: str) -> list:
    """The nodes that compute output, in graph order."""
    producers = {name: node for node in proto.graph.node for name in node.output}
    needed, stack = set(), [output]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    return [node for node in proto.graph.node if id(node) in needed]


def _name_convolutions(proto, head: int, stage: StageContract, net: nn.Module, path: Path) -> None:
    """Name a stage's convolutions in networks taken out of a pipeline graph (which renames its nodes) as the
    exporter named them after their modules, matching the graph's order to the network's call order."""
    convs = [node for node in _upstream(proto, stage.prob_name) if node.op_type in ("Conv", "ConvTranspose")]
    order = _forward_order(net, stage.divisor)
    if len(convs) != len(order):
        raise HeartsegError(f"{path}: stage {stage.name!r} has {len(convs)} convolutions, the network its metadata "
                            f"describes {len(order)} (a file not written by heartseg-export)")
    for node, name in zip(convs, order):
        node.name = f"/heads.{head}/network/{name}/{node.op_type}"


def _stage_state(net: nn.Module, proto, head: int, arrays: dict[str, np.ndarray], path: Path) -> dict:
    """A state dict for net from one stage's initializers. Export folds BatchNorm into the convolution before
    it: such a layer comes back as the folded convolution and a BatchNorm that only adds its bias (unit scale,
    zero mean, variance 1 - eps), which computes the same in evaluation mode."""
    convs = _conv_nodes(proto, head)
    state = {key: value.clone() for key, value in net.state_dict().items()}
    modules = dict(net.named_modules())
    named = f"heads.{head}.network."
    folded_bias: dict[str, np.ndarray] = {}
    for name, module in modules.items():
        if isinstance(module, _CONV):
            if name not in convs:
                raise HeartsegError(f"{path}: no convolution {name!r} in stage {head}'s graph (a file not written "
                                    "by heartseg-export)")
            weight, *bias = convs[name]
            if weight not in arrays or (bias and bias[0] not in arrays):
                raise HeartsegError(f"{path}: the weights of convolution {name!r} of stage {head} are computed in "
                                    "the graph, not stored (a file not written by heartseg-export)")
            state[f"{name}.weight"] = torch.from_numpy(arrays[weight].copy())
            if module.bias is not None:
                state[f"{name}.bias"] = torch.from_numpy(arrays[bias[0]].copy())
            elif bias:
                folded_bias[name] = arrays[bias[0]]
        elif isinstance(module, nn.InstanceNorm3d) and module.affine:
            for key in ("weight", "bias"):
                if f"{named}{name}.{key}" not in arrays:
                    raise HeartsegError(f"{path}: no {name}.{key} in stage {head}'s weights (a file not written by "
                                        "heartseg-export)")
                state[f"{name}.{key}"] = torch.from_numpy(arrays[f"{named}{name}.{key}"].copy())
        elif isinstance(module, nn.BatchNorm3d):
            parent, _, index = name.rpartition(".")
            conv = f"{parent}.{int(index) - 1}"
            if conv not in folded_bias:
                raise HeartsegError(f"{path}: the BatchNorm {name!r} of stage {head} was not folded into {conv!r}")
            bias = torch.from_numpy(folded_bias.pop(conv).copy())
            state[f"{name}.weight"] = torch.ones_like(bias)
            state[f"{name}.bias"] = bias
            state[f"{name}.running_mean"] = torch.zeros_like(bias)
            state[f"{name}.running_var"] = torch.full_like(bias, _FOLDED_VAR)
    if folded_bias:
        raise HeartsegError(f"{path}: stage {head}'s convolutions {sorted(folded_bias)} have a bias its network "
                            "has no place for")
    return state


def _check_parity(path: Path, session: OnnxSession, stage: StageContract, net: nn.Module) -> None:
    """A stage's probabilities from the rebuilt network against ONNX Runtime's on a random input."""
    image = np.random.default_rng(0).standard_normal((1, 1) + (stage.divisor * 4,) * 3).astype(np.float32)
    with torch.no_grad():
        ours = torch.sigmoid(net.eval()(torch.from_numpy(image))).numpy()
    diff = float(np.max(np.abs(ours - session.predict(stage.name, image))))
    if diff > MAX_ABS_DIFF:
        raise HeartsegError(f"{path}: the weights read back from stage {stage.name!r} do not reproduce the "
                            f"file's output (max |difference| {diff:.2e} > {MAX_ABS_DIFF:g})")


def _metadata_json(path: Path, meta: dict[str, str], key: str) -> dict:
    try:
        value = json.loads(meta.get(key, "{}")) or {}
    except ValueError:
        raise HeartsegError(f"{path}: its metadata {key!r} is not JSON") from None
    if not isinstance(value, dict):
        raise HeartsegError(f"{path}: its metadata {key!r} is not an object")
    return value


def read_onnx_model(path: str | Path) -> ModelCheckpoint:
    """An exported heartseg model file as a checkpoint: its contract, metadata and every stage's weights, the
    rebuilt networks checked to reproduce the file's probabilities."""
    path = Path(path)
    if not path.is_file():
        raise HeartsegError(f"{path}: model file not found")
    session = OnnxSession(path, device="cpu", threads=1)
    contract, meta = session.contract, session.metadata
    if "heartseg.variant" in meta:
        raise HeartsegError(f"{path}: a {meta['heartseg.variant']} variant, whose weights are rounded: give the "
                            "float32 file it was made from")
    proto = _onnx_proto(path)
    if not contract.pipeline:
        return _read_networks(path, proto, session, contract, meta, pipeline=False)
    from heartseg.export.pipeline_file import temporary_model, unwrap

    networks = unwrap(proto, path)
    # The per-stage parity check runs the networks inside the graph on their own.
    with temporary_model(networks, path.name) as networks_path:
        session = OnnxSession(networks_path, device="cpu", threads=1)
    # What reads back is the networks: a model.pt made from them exports a pipeline anew.
    return _read_networks(path, networks, session, replace(contract, pipeline=False), meta, pipeline=True)


def _read_networks(path: Path, proto, session: OnnxSession, contract: ModelContract, meta: dict[str, str],
                   pipeline: bool) -> ModelCheckpoint:
    """read_onnx_model on the networks model of the file, which session runs one stage at a time (pipeline: taken
    out of a pipeline graph, its convolutions not yet named)."""
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    try:
        unets = {name: UNetConfig.from_dict(config) for name, config in json.loads(meta["heartseg.network"]).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HeartsegError(f"{path}: no readable network configuration in its metadata ({exc})") from None
    networks = {}
    for head, stage in enumerate(contract.stages):
        if stage.name not in unets:
            raise HeartsegError(f"{path}: its metadata has no network for stage {stage.name!r}")
        if any(name.startswith(f"heads.{head}.network.members.") for name in arrays):
            raise HeartsegError(f"{path}: stage {stage.name!r} is an ensemble of several networks, which are not "
                                "read back from an exported file (give one of its members' model.pt)")
        net = build_unet(unets[stage.name])
        if pipeline:
            _name_convolutions(proto, head, stage, net, path)
        state = _stage_state(net, proto, head, arrays, path)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise HeartsegError(f"{path}: the weights of stage {stage.name!r} do not fit the network its metadata "
                                f"describes ({str(exc)[:200]})") from None
        _check_parity(path, session, stage, net)
        networks[stage.name] = (StageWeights(unets[stage.name], state),)
    return ModelCheckpoint(path, contract, networks, "exported", _metadata_json(path, meta, "heartseg.cv_metrics"),
                           _metadata_json(path, meta, "heartseg.versions"), meta.get("heartseg.training_command", ""))


def folded_batchnorm(state: dict[str, torch.Tensor]) -> bool:
    """Whether a network's BatchNorm layers are the bias-only ones of weights read back from an exported file."""
    norms = [key.removesuffix(".running_mean") for key in state if key.endswith(".running_mean")]

    def folded(n: str) -> bool:
        var = state[f"{n}.running_var"]
        return not state[f"{n}.running_mean"].any() and bool((state[f"{n}.weight"] == 1).all()) \
            and bool((var == torch.tensor(_FOLDED_VAR, dtype=var.dtype)).all())

    return bool(norms) and all(folded(n) for n in norms)
