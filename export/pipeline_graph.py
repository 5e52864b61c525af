"""One ONNX graph from scan to mask: the stage networks of a model file wrapped in the whole inference pipeline.

Inputs: `image` float32 [X, Y, Z], the scan's voxels in RAS+ order, and `spacing` float32 [3] in mm. The
initialiser `max_voxels` (int64 [], no limit) is the most voxels one call of the final stage's network may take: a
session that overrides it (ONNX Runtime's SessionOptions.add_initializer) runs larger boxes in tiles.
Outputs: `mask` uint8 [X, Y, Z], `probability` float32 [X, Y, Z], `score` float32 [] (the soft Dice of the
probabilities against the mask, which the runtime's QC calibrates) and `box` float32 [2, 3] (where the final
stage looked, in voxels of the input grid; all zero when it saw the whole scan).

What runs inside, in the order runtime/inference.py (the Python reference) runs it: each stage's grid by
trilinear resampling (voxel centres aligned, edges clamped) and z-scoring; the localiser on its whole grid, its
mask's largest component and box, grown by the final stage's margin and divisor (the whole grid for a scan no
larger than the final stage's view of the largest plausible atrium); the final stage on that box, padded with the
grid's minimum, in one call or in Gaussian-blended tiles above max_voxels; the box moved out and the stage run
again where the mask reaches a face, at most MAX_BOX_GROWTH times; the probabilities resampled to the scan's grid
on the box's footprint; threshold; largest component.

Two rules differ from the Python reference (tests/test_pipeline_graph.py and benchmarks/pipeline_parity.py
measure the difference):
- The largest component is labelled on the final stage's grid (within the mask's bounding box, by MaxPool and
  pointer jumping inside a Loop), not on the scan's: on the scan's grid the mask keeps the voxels whose
  interpolation reads that component. Whether the box must grow is judged at half that resolution.
- The final stage's box is at most the largest plausible atrium plus its margins (models with learned ranges): a
  localiser that fails on a huge region cannot exhaust memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from heartseg.runtime.contract import MAX_VOXELS, ModelContract, StageContract
from heartseg.runtime.inference import GROW_FACE_SHARE, MAX_BOX_GROWTH
from onnx import TensorProto, helper, numpy_helper

IMAGE, SPACING = "image", "spacing"
MASK, PROBABILITY, SCORE, BOX = "mask", "probability", "score", "box"
# Rounds of label propagation per Loop iteration before the loop checks whether the labels still change.
PROPAGATION_STEPS = 2
# Whether a box must grow is judged on the final stage's mask downsampled by this factor.
COMPONENT_FACTOR = 2
# Labels are voxel indices in float32, exact up to 2**24 voxels; a larger region is labelled in float64.
FLOAT32_EXACT = 1 << 24
SPATIAL = [2, 3, 4]


class Graph:
    """Nodes of one ONNX graph or Loop body; constants go to the outermost graph's initialisers."""

    def __init__(self, constants: list | None = None, prefix: str = "p") -> None:
        self.nodes: list = []
        self.constants: list = [] if constants is None else constants
        self.prefix = prefix
        self._count = [0]

    def body(self, prefix: str) -> "Graph":
        """A Loop body sharing this graph's constants and name counter."""
        sub = Graph(self.constants, prefix)
        sub._count = self._count
        return sub

    def fresh(self, hint: str) -> str:
        """A new tensor name."""
        self._count[0] += 1
        return f"{self.prefix}/{hint}_{self._count[0]}"

    def op(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, **attrs) -> str | list[str]:
        """Add a node; returns its output name (or names when it has several)."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=np.float32) -> str:
        """An initialiser holding value."""
        name = f"const/{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, *values: int) -> str:
        """An int64 vector constant."""
        return self.const(list(values), np.int64)


@dataclass(frozen=True)
class Network:
    """One stage's network: its nodes, reading `input` (N, 1, X, Y, Z) and writing `output`, its probabilities."""

    stage: str
    nodes: list
    input: str
    output: str


def stage_network(model: onnx.ModelProto, stage: StageContract) -> Network:
    """The nodes that compute a stage's probabilities from its input, their tensors renamed under the stage."""
    producers = {out: node for node in model.graph.node for out in node.output}
    needed, stack = set(), [stage.prob_name]
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(node.input)
    initialisers = {init.name for init in model.graph.initializer}

    def rename(name: str) -> str:
        return name if not name or name in initialisers else f"{stage.name}/{name}"

    nodes = []
    for node in (n for n in model.graph.node if id(n) in needed):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [rename(n) for n in node.input]
        copy.output[:] = [rename(n) for n in node.output]
        nodes.append(copy)
    return Network(stage.name, nodes, rename(stage.input_name), rename(stage.prob_name))


def run_network(g: Graph, network: Network, image5: str) -> str:
    """The network's nodes on image5 (a fresh copy of its tensor names, so it may run in several graphs).

    Its nodes are named '<stage>@<copy>#<index>#<original name>' and its tensors '<copy>/<name>': networks_model
    finds them again.
    """
    tag = g.fresh("net")
    mapping = {network.input: image5}
    internal = {out for node in network.nodes for out in node.output}
    for index, node in enumerate(network.nodes):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{network.stage}@{tag}#{index}#{node.name}"
        copy.input[:] = [mapping.get(n, f"{tag}/{n}" if n in internal else n) for n in node.input]
        outs = []
        for n in node.output:
            mapping[n] = f"{tag}/{n}"
            outs.append(mapping[n])
        copy.output[:] = outs
        g.nodes.append(copy)
    return mapping[network.output]


def _inputs_of(node: onnx.NodeProto):
    """Every tensor name a node reads, in its subgraphs too."""
    yield from node.input
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            for inner in attribute.g.node:
                yield from _inputs_of(inner)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)


def networks_model(pipeline: onnx.ModelProto, contract: ModelContract) -> onnx.ModelProto:
    """The stages' networks side by side, taken back out of a pipeline graph: one input (N, 1, X, Y, Z) and a
    probability and mask output per stage, under the contract's names (what per-stage checks and imports run)."""
    initialisers = {init.name: init for init in pipeline.graph.initializer}
    nodes, inputs, outputs, used = [], [], [], set()
    every = list(_all_nodes(pipeline.graph))
    for stage in contract.stages:
        mine = [n for n in every if n.name.startswith(f"{stage.name}@")]
        if not mine:
            raise ValueError(f"the pipeline graph holds no network of stage {stage.name!r}")
        tag = mine[0].name[len(stage.name) + 1:].split("#", 1)[0]
        copies = [n for n in mine if n.name.startswith(f"{stage.name}@{tag}#")]
        prefix = f"{tag}/"
        made = {out for n in copies for out in n.output}
        prob = f"{stage.name}/{stage.prob_name}"
        for node in copies:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = node.name.split("#", 2)[2]
            names = []
            for n in node.input:
                if n in made:
                    names.append(n[len(prefix):])
                elif n in initialisers or not n:
                    names.append(n)
                    used.add(n)
                else:
                    names.append(stage.input_name)
            copy.input[:] = names
            copy.output[:] = [n[len(prefix):] for n in node.output]
            nodes.append(copy)
        nodes.append(helper.make_node("Identity", [prob], [stage.prob_name]))
        # A name of its own: the networks' initialisers keep theirs, whatever their types.
        threshold = f"{stage.name}/mask_threshold"
        initialisers[threshold] = numpy_helper.from_array(np.asarray(stage.threshold, np.float32), threshold)
        used.add(threshold)
        above_ = f"{stage.name}/above"
        nodes.append(helper.make_node("Greater", [stage.prob_name, threshold], [above_]))
        nodes.append(helper.make_node("Cast", [above_], [stage.mask_name], to=TensorProto.UINT8))
        dims = ["N", 1, f"{stage.name}_x", f"{stage.name}_y", f"{stage.name}_z"]
        inputs.append(helper.make_tensor_value_info(stage.input_name, TensorProto.FLOAT, dims))
        outputs += [helper.make_tensor_value_info(stage.prob_name, TensorProto.FLOAT, dims),
                    helper.make_tensor_value_info(stage.mask_name, TensorProto.UINT8, dims)]
    graph = helper.make_graph(nodes, "heartseg_networks", inputs, outputs,
                              initializer=[initialisers[n] for n in sorted(used)])
    out = helper.make_model(graph, opset_imports=list(pipeline.opset_import), producer_name="heartseg-export")
    out.ir_version = pipeline.ir_version
    return out


# --- shapes and grids ------------------------------------------------------------------------------------

def spatial_shape(g: Graph, tensor5: str) -> str:
    """int64 [3]: the spatial sizes of an (N, C, X, Y, Z) tensor."""
    return g.op("Shape", [tensor5], start=2)


def stage_size(g: Graph, shape: str, spacing: str, stage_spacing: Sequence[float]) -> str:
    """int64 [3]: max(1, round(n * s / t)) per axis (preprocess.target_shape; Round is half to even, as Python's)."""
    extent = g.op("Mul", [g.op("Cast", [shape], to=TensorProto.DOUBLE), g.op("Cast", [spacing], to=TensorProto.DOUBLE)])
    size = g.op("Cast", [g.op("Round", [g.op("Div", [extent, g.const(stage_spacing, np.float64)])])],
                to=TensorProto.INT64)
    return g.op("Max", [size, g.ints(1, 1, 1)])


def resize(g: Graph, tensor5: str, size: str, mode: str = "linear") -> str:
    """tensor5 resampled to spatial size (half-pixel centres: the same extent; linear is trilinear, edges clamped)."""
    sizes = g.op("Concat", [g.ints(1, 1), size], axis=0)
    return g.op("Resize", [tensor5, "", "", sizes], mode=mode, coordinate_transformation_mode="half_pixel",
                nearest_mode="round_prefer_floor")


def zscore_stats(g: Graph, tensor5: str) -> tuple[str, str]:
    """Mean and standard deviation over the whole tensor (the runtime refuses a constant scan before it gets here)."""
    mean = g.op("ReduceMean", [tensor5], keepdims=1)
    centred = g.op("Sub", [tensor5, mean])
    std = g.op("Sqrt", [g.op("ReduceMean", [g.op("Mul", [centred, centred])], keepdims=1)])
    return mean, g.op("Max", [std, g.const(1e-12)])


def normalize(g: Graph, tensor5: str, stats: tuple[str, str]) -> str:
    """(x - mean) / std with a grid's statistics."""
    return g.op("Div", [g.op("Sub", [tensor5, stats[0]]), stats[1]])


def zscore(g: Graph, tensor5: str) -> str:
    """preprocess.zscore."""
    return normalize(g, tensor5, zscore_stats(g, tensor5))


def scalar(g: Graph, vector: str, index: int) -> str:
    """Element index of a vector, as a scalar."""
    return g.op("Gather", [vector, g.const(index, np.int64)], axis=0)


def resize_region(g: Graph, source3: str, offset: str, source_size: str, target_size: str, lo: str, hi: str) -> str:
    """Voxels [lo, hi) of a grid of target_size, linearly interpolated (half-pixel centres, edges clamped, as
    preprocess.resample_to_shape) from a grid of source_size of which source3 holds the voxels from offset on
    (and zero around them): one axis at a time, two Gathers and a blend each."""
    out = source3
    for axis in range(3):
        n, m = as_double(g, scalar(g, source_size, axis)), as_double(g, scalar(g, target_size, axis))
        index = as_double(g, g.op("Range", [scalar(g, lo, axis), scalar(g, hi, axis), g.const(1, np.int64)]))
        x = g.op("Sub", [g.op("Div", [g.op("Mul", [g.op("Add", [index, g.const(0.5, np.float64)]), n]), m]),
                         g.const(0.5, np.float64)])
        last = g.op("Sub", [n, g.const(1.0, np.float64)])
        x = g.op("Min", [g.op("Max", [x, g.const(0.0, np.float64)]), last])
        floor = g.op("Floor", [x])
        weight = g.op("Cast", [g.op("Sub", [x, floor])], to=TensorProto.FLOAT)
        first = g.op("Cast", [floor], to=TensorProto.INT64)
        second = g.op("Cast", [g.op("Min", [g.op("Add", [floor, g.const(1.0, np.float64)]), last])], to=TensorProto.INT64)
        held = g.op("Sub", [g.op("Gather", [g.op("Shape", [out]), g.const(axis, np.int64)], axis=0), g.const(1, np.int64)])
        start = scalar(g, offset, axis)
        local = [g.op("Min", [g.op("Max", [g.op("Sub", [i, start]), g.const(0, np.int64)]), held]) for i in (first, second)]
        a, b = (g.op("Gather", [out, i], axis=axis) for i in local)
        view = [1, 1, 1]
        view[axis] = -1
        w = g.op("Reshape", [weight, g.ints(*view)])
        out = g.op("Add", [a, g.op("Mul", [g.op("Sub", [b, a]), w])])
    return out


def round_up(g: Graph, n: str, divisor: int) -> str:
    """Smallest multiple of divisor >= n (int64)."""
    d = g.ints(divisor)
    return g.op("Mul", [g.op("Div", [g.op("Add", [n, g.ints(divisor - 1)]), d]), d])


def pad_end(g: Graph, tensor5: str, size: str, value: str) -> str:
    """tensor5 padded at the end of each spatial axis up to size with value."""
    extra = g.op("Sub", [size, spatial_shape(g, tensor5)])
    pads = g.op("Concat", [g.ints(0, 0, 0, 0, 0, 0, 0), extra], axis=0)
    return g.op("Pad", [tensor5, pads, value], mode="constant")


def padded_shape(g: Graph, size: str, stage: StageContract) -> str:
    """sliding_window.padded_shape: a multiple of the divisor and at least the training patch."""
    return g.op("Max", [round_up(g, size, stage.divisor), g.const(list(stage.patch_size), np.int64)])


def predict(g: Graph, network: Network, grid5: str, stage: StageContract) -> str:
    """sliding_window.predict_whole: the network on grid5 padded (with its minimum) to padded_shape."""
    size = spatial_shape(g, grid5)
    padded = pad_end(g, grid5, padded_shape(g, size, stage), g.op("ReduceMin", [grid5], keepdims=0))
    prob = run_network(g, network, padded)
    return g.op("Slice", [prob, g.ints(0, 0, 0), size, g.ints(*SPATIAL)])


def predict_volume(g: Graph, network: Network, grid5: str, stage: StageContract, max_voxels: str) -> str:
    """sliding_window.predict_volume: the network on grid5 padded to padded_shape in one call when that holds at
    most max_voxels voxels, else in tiles of the stage's patch (half overlapping, Gaussian-weighted, as
    predict_tiled)."""
    size = spatial_shape(g, grid5)
    shape = padded_shape(g, size, stage)
    padded = pad_end(g, grid5, shape, g.op("ReduceMin", [grid5], keepdims=0))
    whole = g.op("LessOrEqual", [g.op("ReduceProd", [shape], keepdims=0), max_voxels])
    tile = g.op("Where", [whole, shape, g.op("Min", [g.const(list(stage.patch_size), np.int64), shape])])
    # Tiles per axis: ceil((n - t) / (t / 2)) + 1 where the axis is longer than a tile, else 1.
    longer = g.op("Sub", [shape, tile])
    half = g.op("Div", [as_double(g, tile), g.const(2.0, np.float64)])
    counts = g.op("Add", [g.op("Cast", [g.op("Ceil", [g.op("Div", [as_double(g, longer), half])])],
                                to=TensorProto.INT64), g.ints(1, 1, 1)])
    total = g.op("ReduceProd", [counts], keepdims=0)
    single = g.op("Equal", [total, g.const(1, np.int64)])
    weights = g.op("Where", [single, g.const(1.0), gaussian(g, tile)])
    body = g.body(g.fresh("tiles"))
    index, cond, acc_in, norm_in = (body.fresh(n) for n in ("k", "cond", "acc", "norm"))
    origin = tile_origin(body, index, counts, longer)
    patch = body.op("Slice", [padded, origin, body.op("Add", [origin, tile]), body.ints(*SPATIAL)])
    prob = run_network(body, network, patch)
    after = body.op("Sub", [shape, body.op("Add", [origin, tile])])
    pads = body.op("Concat", [body.ints(0, 0), origin, body.ints(0, 0), after], axis=0)
    acc = body.op("Add", [acc_in, body.op("Pad", [body.op("Mul", [prob, weights]), pads, body.const(0.0)])])
    norm = body.op("Add", [norm_in, body.op("Pad", [weights, pads, body.const(0.0)])])
    keep = body.op("Identity", [cond])
    floats = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    graph = helper.make_graph(
        body.nodes, body.prefix,
        [helper.make_tensor_value_info(index, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond, TensorProto.BOOL, []), floats(acc_in), floats(norm_in)],
        [helper.make_tensor_value_info(keep, TensorProto.BOOL, []), floats(acc), floats(norm)])
    zeros = g.op("ConstantOfShape", [g.op("Concat", [g.ints(1, 1), shape], axis=0)],
                 value=numpy_helper.from_array(np.zeros(1, np.float32)))
    acc, norm = g.op("Loop", [total, g.const(True, np.bool_), zeros, zeros], outputs=2, body=graph)
    return g.op("Slice", [g.op("Div", [acc, norm]), g.ints(0, 0, 0), size, g.ints(*SPATIAL)])


def tile_origin(g: Graph, index: str, counts: str, longer: str) -> str:
    """sliding_window.tile_starts: the origin of tile number index (row-major over counts), starts spread evenly
    over [0, longer]."""
    origin = []
    stride = [None, scalar(g, counts, 2), g.op("Mul", [scalar(g, counts, 1), scalar(g, counts, 2)])]
    for axis in range(3):
        position = index if axis == 2 else g.op("Div", [index, stride[2 - axis] if axis == 0 else stride[1]])
        position = g.op("Mod", [position, scalar(g, counts, axis)])
        steps = g.op("Max", [g.op("Sub", [scalar(g, counts, axis), g.const(1, np.int64)]), g.const(1, np.int64)])
        start = g.op("Div", [g.op("Mul", [as_double(g, position), as_double(g, scalar(g, longer, axis))]),
                             as_double(g, steps)])
        origin.append(g.op("Unsqueeze", [g.op("Cast", [g.op("Round", [start])], to=TensorProto.INT64), g.ints(0)]))
    return g.op("Concat", origin, axis=0)


def gaussian(g: Graph, tile: str, sigma_scale: float = 0.125) -> str:
    """sliding_window.gaussian_weights for a tile of the given size: (1, 1, X, Y, Z), never below 1e-3 of its peak."""
    weights = None
    for axis in range(3):
        n = as_double(g, scalar(g, tile, axis))
        x = as_double(g, g.op("Range", [g.const(0, np.int64), scalar(g, tile, axis), g.const(1, np.int64)]))
        sigma = g.op("Max", [g.op("Mul", [n, g.const(sigma_scale, np.float64)]), g.const(1e-3, np.float64)])
        z = g.op("Div", [g.op("Sub", [x, g.op("Div", [g.op("Sub", [n, g.const(1.0, np.float64)]),
                                                    g.const(2.0, np.float64)])]), sigma])
        line = g.op("Exp", [g.op("Mul", [g.op("Mul", [z, z]), g.const(-0.5, np.float64)])])
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = -1
        line = g.op("Reshape", [g.op("Cast", [line], to=TensorProto.FLOAT), g.ints(*view)])
        weights = line if weights is None else g.op("Mul", [weights, line])
    weights = g.op("Div", [weights, g.op("ReduceMax", [weights], keepdims=1)])
    return g.op("Max", [weights, g.const(1e-3)])


def crop_padded(g: Graph, grid5: str, lo: str, hi: str, fill: str) -> str:
    """preprocess.crop_padded: [lo, hi) of grid5, padded with fill where the box leaves it."""
    shape = spatial_shape(g, grid5)
    src_lo = g.op("Max", [lo, g.ints(0, 0, 0)])
    src_hi = g.op("Min", [hi, shape])
    crop = g.op("Slice", [grid5, src_lo, src_hi, g.ints(*SPATIAL)])
    before, after = g.op("Sub", [src_lo, lo]), g.op("Sub", [hi, src_hi])
    pads = g.op("Concat", [g.ints(0, 0), before, g.ints(0, 0), after], axis=0)
    return g.op("Pad", [crop, pads, fill], mode="constant")


def paste(g: Graph, crop5: str, lo: str, shape: str) -> str:
    """A grid of shape, zero but for crop5 placed at lo (>= 0), clipped to the grid."""
    size = spatial_shape(g, crop5)
    inner = g.op("Sub", [g.op("Min", [g.op("Add", [lo, size]), shape]), lo])
    kept = g.op("Slice", [crop5, g.ints(0, 0, 0), inner, g.ints(*SPATIAL)])
    after = g.op("Sub", [shape, g.op("Add", [lo, inner])])
    pads = g.op("Concat", [g.ints(0, 0), lo, g.ints(0, 0), after], axis=0)
    return g.op("Pad", [kept, pads, g.const(0.0)], mode="constant")


# --- masks, components and boxes -------------------------------------------------------------------------

def above(g: Graph, prob5: str, threshold: float) -> str:
    """float 0/1: prob5 > threshold."""
    return g.op("Cast", [g.op("Greater", [prob5, g.const(threshold)])], to=TensorProto.FLOAT)


def largest_component(g: Graph, fg5: str, weights5: str | None = None) -> str:
    """float 0/1: the largest 26-connected component of fg5 (float 0/1), sizes counted in weights5 when given;
    labelled within the foreground's bounding box (as postprocess.largest_component)."""
    lo, hi, _ = mask_box(g, fg5)
    region = lambda tensor: g.op("Slice", [tensor, lo, hi, g.ints(*SPATIAL)])  # noqa: E731
    fg, weights = region(fg5), region(weights5) if weights5 is not None else None
    branches = []
    for wide in (True, False):
        body = g.body(g.fresh("wide" if wide else "narrow"))
        kept = body.op("Identity", [label_largest(body, fg, weights, wide)])
        branches.append(helper.make_graph(body.nodes, body.prefix, [],
                                          [helper.make_tensor_value_info(kept, TensorProto.FLOAT, None)]))
    large = g.op("Greater", [g.op("Size", [fg]), g.const(FLOAT32_EXACT, np.int64)])
    kept = g.op("If", [large], then_branch=branches[0], else_branch=branches[1])
    pads = g.op("Concat", [g.ints(0, 0), lo, g.ints(0, 0), g.op("Sub", [spatial_shape(g, fg5), hi])], axis=0)
    return g.op("Pad", [kept, pads, g.const(0.0)], mode="constant")


def label_largest(g: Graph, fg5: str, weights5: str | None = None, wide: bool = False) -> str:
    """largest_component on the whole of fg5 (labels in float64 when wide, else float32).

    Every foreground voxel starts with its own label (its index + 1). Each round takes the largest label among its
    neighbours (MaxPool), then the label of the voxel its label names (a Gather: pointer jumping, which doubles how
    far a label travels per round); a voxel's label is always that of a voxel of its own component, at least its own
    index + 1, so the rounds end with every component holding its largest index. A scatter-add counts each label's
    voxels.
    """
    kind, dtype = (TensorProto.DOUBLE, np.float64) if wide else (TensorProto.FLOAT, np.float32)
    fg = g.op("Cast", [fg5], to=kind)
    count = g.op("Size", [fg])
    start = g.op("Range", [g.const(1.0, dtype), g.op("Add", [g.op("Cast", [count], to=kind), g.const(1.0, dtype)]),
                           g.const(1.0, dtype)])
    shape = g.op("Shape", [fg])
    labels = g.op("Mul", [g.op("Reshape", [start, shape]), fg])
    body = g.body(g.fresh("propagate"))
    iteration, cond_in, current = body.fresh("i"), body.fresh("cond"), body.fresh("labels")
    spread = current
    for _ in range(PROPAGATION_STEPS):
        pooled = body.op("Mul", [body.op("MaxPool", [spread], kernel_shape=[3, 3, 3], pads=[1] * 6,
                                         strides=[1, 1, 1]), fg])
        flat = body.op("Reshape", [pooled, body.ints(-1)])
        # Label k names voxel k - 1; the background (label 0) reads voxel 0 and is zeroed again.
        named = body.op("Max", [body.op("Sub", [body.op("Cast", [flat], to=TensorProto.INT64), body.const(1, np.int64)]),
                                body.const(0, np.int64)])
        spread = body.op("Mul", [body.op("Reshape", [body.op("Gather", [flat, named], axis=0), shape]), fg])
    changed = body.op("Greater", [body.op("ReduceMax", [body.op("Sub", [spread, current])], keepdims=0),
                                  body.const(0.0, dtype)])
    graph = helper.make_graph(
        body.nodes, body.prefix,
        [helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
         helper.make_tensor_value_info(current, kind, None)],
        [helper.make_tensor_value_info(changed, TensorProto.BOOL, []),
         helper.make_tensor_value_info(spread, kind, None)])
    # The rounds never outnumber the voxels; the loop ends as soon as no label changes.
    final = g.op("Loop", [g.op("Cast", [count], to=TensorProto.INT64), g.const(True, np.bool_), labels], body=graph)
    flat = g.op("Reshape", [final, g.ints(-1)])
    index = g.op("Cast", [flat], to=TensorProto.INT64)
    updates = g.op("Reshape", [weights5 if weights5 is not None else fg5, g.ints(-1)])
    zeros = g.op("ConstantOfShape", [g.op("Reshape", [g.op("Add", [count, g.const(1, np.int64)]), g.ints(1)])],
                 value=numpy_helper.from_array(np.zeros(1, np.float32)))
    sizes = g.op("ScatterElements", [zeros, index, updates], axis=0, reduction="add")
    counted = g.op("Slice", [sizes, g.ints(1), g.ints(np.iinfo(np.int64).max), g.ints(0)])
    best = g.op("Add", [g.op("ArgMax", [counted], axis=0, keepdims=0), g.const(1, np.int64)])
    return g.op("Cast", [g.op("Equal", [final, g.op("Cast", [best], to=kind)])], to=TensorProto.FLOAT)


def coarse_component(g: Graph, fg5: str) -> str:
    """largest_component on fg5 downsampled by COMPONENT_FACTOR (a coarse voxel is foreground where any of its
    voxels is; sizes count fine voxels); returns the component on the coarse grid."""
    f = COMPONENT_FACTOR
    # ceil_mode: a grid of odd size (a box cut by the grid's edge) keeps its last voxels.
    coarse = g.op("MaxPool", [fg5], kernel_shape=[f] * 3, strides=[f] * 3, ceil_mode=1)
    weights = g.op("Mul", [g.op("AveragePool", [fg5], kernel_shape=[f] * 3, strides=[f] * 3, ceil_mode=1),
                           g.const(float(f ** 3))])
    return largest_component(g, coarse, weights)


def upsample(g: Graph, coarse5: str, size: str) -> str:
    """A coarse 0/1 grid repeated COMPONENT_FACTOR times along each axis, cut to size."""
    f = float(COMPONENT_FACTOR)
    up = g.op("Resize", [coarse5, "", g.const([1.0, 1.0, f, f, f])], mode="nearest",
              coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return g.op("Slice", [up, g.ints(0, 0, 0), size, g.ints(*SPATIAL)])


def mask_box(g: Graph, fg5: str) -> tuple[str, str, str]:
    """preprocess.mask_box: int64 [3] lo and hi of the foreground of fg5, and whether there is any."""
    los, his = [], []
    for axis in SPATIAL:
        others = [a for a in range(5) if a != axis]
        profile = g.op("ReduceMax", [fg5], axes=others, keepdims=0)
        first = g.op("ArgMax", [profile], axis=0, keepdims=1)
        reverse = g.op("Slice", [profile, g.ints(-1), g.ints(np.iinfo(np.int64).min), g.ints(0), g.ints(-1)])
        last = g.op("ArgMax", [reverse], axis=0, keepdims=1)
        los.append(first)
        his.append(g.op("Sub", [g.op("Shape", [profile]), last]))
    found = g.op("Greater", [g.op("ReduceMax", [fg5], keepdims=0), g.const(0.0)])
    return g.op("Concat", los, axis=0), g.op("Concat", his, axis=0), found


def centred_box(g: Graph, centre: str, size: str, shape: str) -> tuple[str, str]:
    """preprocess.centred_box: the box of size about centre (float), shifted inwards where it leaves shape."""
    half = g.op("Div", [g.op("Cast", [size], to=TensorProto.DOUBLE), g.const(2.0, np.float64)])
    lo = g.op("Cast", [g.op("Floor", [g.op("Sub", [centre, half])])], to=TensorProto.INT64)
    room = g.op("Max", [g.op("Sub", [shape, size]), g.ints(0, 0, 0)])
    lo = g.op("Min", [g.op("Max", [lo, g.ints(0, 0, 0)]), room])
    return lo, g.op("Add", [lo, size])


def box_with_divisor(g: Graph, lo: str, hi: str, shape: str, divisor: int,
                     cap: Sequence[int] | None) -> tuple[str, str]:
    """preprocess.box_with_divisor on double lo, hi (at most cap voxels per axis, about the same centre)."""
    lo = g.op("Max", [g.op("Cast", [g.op("Floor", [lo])], to=TensorProto.INT64), g.ints(0, 0, 0)])
    hi = g.op("Min", [g.op("Cast", [g.op("Ceil", [hi])], to=TensorProto.INT64), shape])
    size = round_up(g, g.op("Max", [g.op("Sub", [hi, lo]), g.ints(divisor, divisor, divisor)]), divisor)
    size = g.op("Min", [size, round_up(g, shape, divisor)])
    if cap is not None:
        size = g.op("Min", [size, g.const(list(cap), np.int64)])
    centre = g.op("Div", [g.op("Cast", [g.op("Add", [lo, hi])], to=TensorProto.DOUBLE), g.const(2.0, np.float64)])
    return centred_box(g, centre, size, shape)


def context_box(g: Graph, lo: str, hi: str, shape: str, stage: StageContract) -> tuple[str, str]:
    """inference.context_box: the box widened about its centre to at least the stage's patch where the grid
    reaches, so that what fills the patch is scan rather than padding."""
    size = g.op("Max", [g.op("Sub", [hi, lo]), g.op("Min", [g.const(list(stage.patch_size), np.int64), shape])])
    centre = g.op("Div", [g.op("Cast", [g.op("Add", [lo, hi])], to=TensorProto.DOUBLE), g.const(2.0, np.float64)])
    return centred_box(g, centre, size, shape)


def as_double(g: Graph, tensor: str) -> str:
    """tensor cast to float64."""
    return g.op("Cast", [tensor], to=TensorProto.DOUBLE)


def any_true(g: Graph, flags: str) -> str:
    """bool []: whether any element of a bool vector is true."""
    return g.op("Cast", [g.op("ReduceMax", [g.op("Cast", [flags], to=TensorProto.INT64)], keepdims=0)],
                to=TensorProto.BOOL)


def grown_box(g: Graph, prob_crop5: str, lo: str, hi: str, shape: str, stage: StageContract,
              cap: Sequence[int] | None) -> tuple[str, str, str]:
    """inference.grown_box: each face the mask (above one half, largest component) reaches moves out by the
    stage's margin; returns the new lo, hi and whether any face moved."""
    inner = g.op("Sub", [g.op("Min", [hi, shape]), lo])
    crop = g.op("Slice", [prob_crop5, g.ints(0, 0, 0), inner, g.ints(*SPATIAL)])
    fg = above(g, crop, 0.5)
    # Only the faces it reaches matter here: the component at half resolution is enough, at a fraction of the cost.
    component = upsample(g, coarse_component(g, fg), inner)
    mask = g.op("Mul", [fg, component])
    step = np.maximum(np.ceil(stage.crop_margin_mm / np.asarray(stage.spacing, float)), stage.divisor).astype(np.int64)
    first, last = [], []
    for axis in SPATIAL:
        others = [a for a in range(5) if a != axis]
        profile = g.op("ReduceSum", [mask, g.ints(*others)], keepdims=0)
        limit = g.op("Mul", [g.op("ReduceMax", [profile], keepdims=1), g.const([GROW_FACE_SHARE])])
        first.append(g.op("GreaterOrEqual", [g.op("Slice", [profile, g.ints(0), g.ints(1)]), limit]))
        last.append(g.op("GreaterOrEqual", [g.op("Slice", [profile, g.ints(-1), g.ints(np.iinfo(np.int64).max)]),
                                            limit]))
    any_fg = g.op("Greater", [g.op("ReduceMax", [mask], keepdims=0), g.const(0.0)])
    move_lo = g.op("And", [g.op("Concat", first, axis=0), g.op("Greater", [lo, g.ints(0, 0, 0)])])
    move_hi = g.op("And", [g.op("Concat", last, axis=0), g.op("Less", [hi, shape])])
    move_lo = g.op("And", [move_lo, any_fg])
    move_hi = g.op("And", [move_hi, any_fg])
    new_lo = g.op("Where", [move_lo, g.op("Max", [g.op("Sub", [lo, g.const(step, np.int64)]), g.ints(0, 0, 0)]), lo])
    new_hi = g.op("Where", [move_hi, g.op("Min", [g.op("Add", [hi, g.const(step, np.int64)]), shape]), hi])
    moved = any_true(g, g.op("Concat", [move_lo, move_hi], axis=0))
    grown_lo, grown_hi = box_with_divisor(g, as_double(g, new_lo), as_double(g, new_hi), shape, stage.divisor, cap)
    return g.op("Where", [moved, grown_lo, lo]), g.op("Where", [moved, grown_hi, hi]), moved


def fits_final_stage(g: Graph, shape: str, contract: ModelContract) -> str:
    """inference.fits_final_stage: bool [], whether the whole scan is no larger than the final stage's view of the
    largest plausible atrium (axes sorted)."""
    assert contract.plausibility is not None
    fov = g.op("Mul", [g.op("Cast", [shape], to=TensorProto.DOUBLE), g.op("Cast", [SPACING], to=TensorProto.DOUBLE)])
    ascending = g.op("TopK", [fov, g.ints(3)], outputs=2, largest=0, sorted=1)[0]
    largest = np.asarray([hi for _, hi in contract.plausibility.extent_mm], float) + 2 * contract.final_stage.crop_margin_mm
    inside = g.op("LessOrEqual", [ascending, g.const(largest, np.float64)])
    return g.op("Not", [any_true(g, g.op("Not", [inside]))])


def refine(g: Graph, network: Network, grid5: str, stats: tuple[str, str, str], lo: str, hi: str, shape: str,
           grow: str, stage: StageContract, cap: Sequence[int] | None, max_voxels: str) -> tuple[str, str, str]:
    """The final stage on [lo, hi) of its grid (stats: the grid's mean, standard deviation and minimum), its box
    grown and the stage run again while the mask reaches a face (inference.infer_canonical); returns the
    probabilities on the last box and that box."""
    body = g.body(g.fresh("refine"))
    iteration, cond, box_lo, box_hi = (body.fresh(n) for n in ("i", "cond", "lo", "hi"))
    previous, previous_lo, previous_hi = (body.fresh(n) for n in ("prob", "ran_lo", "ran_hi"))
    # Only the box is normalised (with the whole grid's statistics), and padded with the grid's minimum.
    seen_lo, seen_hi = (box_lo, box_hi) if stage.context == "pad" else context_box(body, box_lo, box_hi, shape, stage)
    crop = normalize(body, crop_padded(body, grid5, seen_lo, seen_hi, stats[2]), stats[:2])
    prob = predict_volume(body, network, crop, stage, max_voxels)
    if stage.context != "pad":
        # Only the box's own voxels are kept: the context around it is seen, not segmented.
        inner = body.op("Sub", [box_lo, seen_lo])
        prob = body.op("Slice", [prob, inner, body.op("Add", [inner, body.op("Sub", [box_hi, box_lo])]),
                                 body.ints(*SPATIAL)])
    new_lo, new_hi, moved = grown_box(body, prob, box_lo, box_hi, shape, stage, cap)
    again = body.op("And", [moved, grow])
    # The outputs of the last iteration are the probabilities of the box it ran on (box_lo, box_hi passed through).
    ran_lo = body.op("Identity", [box_lo])
    ran_hi = body.op("Identity", [box_hi])
    int3 = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, [3])  # noqa: E731
    graph = helper.make_graph(
        body.nodes, body.prefix,
        [helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond, TensorProto.BOOL, []), int3(box_lo), int3(box_hi),
         helper.make_tensor_value_info(previous, TensorProto.FLOAT, None), int3(previous_lo), int3(previous_hi)],
        [helper.make_tensor_value_info(again, TensorProto.BOOL, []), int3(new_lo), int3(new_hi),
         helper.make_tensor_value_info(prob, TensorProto.FLOAT, None), int3(ran_lo), int3(ran_hi)])
    start = g.const(np.zeros((1, 1, 1, 1, 1), np.float32))
    outputs = g.op("Loop", [g.const(1 + MAX_BOX_GROWTH, np.int64), g.const(True, np.bool_), lo, hi, start, lo, hi],
                   outputs=5, body=graph)
    return outputs[2], outputs[3], outputs[4]


def localise(g: Graph, model: onnx.ModelProto, contract: ModelContract, image5: str, shape: str, size: str,
             cap: Sequence[int] | None, whole_lo: str, whole_hi: str) -> tuple[str, str, str, str]:
    """inference.locate and native_box_to_stage: the final stage's box from the localiser's largest component
    (the whole grid, without running the localiser, for a scan that fits the final stage); returns lo, hi, whether
    anything was found, and whether the box was localised."""
    if contract.plausibility is None:
        return (*_located_box(g, model, contract, image5, shape, size, cap), g.const(True, np.bool_))
    fits = fits_final_stage(g, shape, contract)
    branches = []
    for seen_whole in (True, False):
        body = g.body(g.fresh("whole" if seen_whole else "localise"))
        if seen_whole:
            found = (body.op("Identity", [whole_lo]), body.op("Identity", [whole_hi]), body.const(True, np.bool_))
        else:
            found = _located_box(body, model, contract, image5, shape, size, cap)
        outputs = [body.op("Identity", [name]) for name in found]
        types = (TensorProto.INT64, TensorProto.INT64, TensorProto.BOOL)
        branches.append(helper.make_graph(body.nodes, body.prefix, [], [
            helper.make_tensor_value_info(o, t, None) for o, t in zip(outputs, types)]))
    lo, hi, found = g.op("If", [fits], outputs=3, then_branch=branches[0], else_branch=branches[1])
    return lo, hi, found, g.op("Not", [fits])


def _located_box(g: Graph, model: onnx.ModelProto, contract: ModelContract, image5: str, shape: str, size: str,
                 cap: Sequence[int] | None) -> tuple[str, str, str]:
    """The localiser on its whole grid, its mask's largest component, and that box on the final stage's grid."""
    final, localiser = contract.final_stage, contract.localiser
    coarse_size = stage_size(g, shape, SPACING, localiser.spacing)
    coarse = predict(g, stage_network(model, localiser), zscore(g, resize(g, image5, coarse_size)), localiser)
    coarse_lo, coarse_hi, found = mask_box(g, largest_component(g, above(g, coarse, float(localiser.threshold))))
    native = as_double(g, shape)
    to_native = g.op("Div", [native, as_double(g, coarse_size)])
    to_stage = g.op("Div", [as_double(g, size), native])
    margin = g.const(final.crop_margin_mm / np.asarray(final.spacing, float), np.float64)
    box = []
    for edge, sign in ((coarse_lo, "Sub"), (coarse_hi, "Add")):
        on_stage = g.op("Mul", [g.op("Mul", [as_double(g, edge), to_native]), to_stage])
        box.append(g.op(sign, [on_stage, margin]))
    lo, hi = box_with_divisor(g, box[0], box[1], size, final.divisor, cap)
    return lo, hi, found


def to_native(g: Graph, crops: list[str], lo: str, size: str, shape: str, region_lo: str, region_hi: str) -> list[str]:
    """Each (1, 1, ...) crop of the stage grid placed at lo (zero elsewhere), linearly resampled to the scan's grid
    on [region_lo, region_hi) only (3-D): by ONNX Resize on the whole grid when the region covers most of it (a
    scan seen whole), else axis by axis on the region alone."""
    region = g.op("ReduceProd", [g.op("Sub", [region_hi, region_lo])], keepdims=0)
    most = g.op("Greater", [g.op("Mul", [region, g.const(2, np.int64)]), g.op("ReduceProd", [shape], keepdims=0)])
    branches = []
    for whole in (True, False):
        body = g.body(g.fresh("whole" if whole else "region"))
        outputs = []
        for crop in crops:
            if whole:
                full = resize(body, paste(body, crop, lo, size), shape)
                out = body.op("Slice", [body.op("Squeeze", [full, body.ints(0, 1)]), region_lo, region_hi,
                                        body.ints(0, 1, 2)])
            else:
                ring = body.op("Pad", [body.op("Squeeze", [crop, body.ints(0, 1)]), body.ints(1, 1, 1, 1, 1, 1),
                                       body.const(0.0)], mode="constant")
                offset = body.op("Sub", [lo, body.ints(1, 1, 1)])
                out = resize_region(body, ring, offset, size, shape, region_lo, region_hi)
            outputs.append(body.op("Identity", [out]))
        branches.append(helper.make_graph(body.nodes, body.prefix, [],
                                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]))
    result = g.op("If", [most], outputs=len(crops), then_branch=branches[0], else_branch=branches[1])
    return [result] if len(crops) == 1 else result


def footprint(g: Graph, lo: str, hi: str, stage_size_: str, native: str) -> tuple[str, str]:
    """inference.stage_box_footprint: the native voxels whose interpolation from the stage grid reads [lo, hi)."""
    scale = g.op("Div", [as_double(g, native), as_double(g, stage_size_)])
    half = g.const(0.5, np.float64)
    first = g.op("Sub", [g.op("Mul", [g.op("Sub", [as_double(g, lo), half]), scale]), half])
    last = g.op("Sub", [g.op("Mul", [g.op("Add", [as_double(g, hi), half]), scale]), half])
    first = g.op("Cast", [g.op("Floor", [first])], to=TensorProto.INT64)
    last = g.op("Add", [g.op("Cast", [g.op("Ceil", [last])], to=TensorProto.INT64), g.const(1, np.int64)])
    clip = lambda v: g.op("Min", [g.op("Max", [v, g.ints(0, 0, 0)]), native])  # noqa: E731
    return clip(first), clip(last)


def build_pipeline(model: onnx.ModelProto, contract: ModelContract) -> onnx.ModelProto:
    """The end-to-end graph around the stage networks of a heartseg model file (its metadata is copied)."""
    g = Graph()
    image5 = g.op("Unsqueeze", [IMAGE, g.ints(0, 1)])
    shape = g.op("Shape", [IMAGE])
    final = contract.final_stage
    size = stage_size(g, shape, SPACING, final.spacing)
    grid = resize(g, image5, size)
    # The grid's mean, standard deviation and minimum (what pads a box that leaves it), once for every box tried.
    stats = (*zscore_stats(g, grid), g.op("ReduceMin", [grid], keepdims=0))
    cap = contract.final_box_cap
    whole_lo, whole_hi = g.ints(0, 0, 0), padded_shape(g, size, final)
    located = g.const(False, np.bool_)
    found = g.const(True, np.bool_)
    lo, hi = whole_lo, whole_hi
    if contract.is_cascade:
        lo, hi, found, located = localise(g, model, contract, image5, shape, size, cap, whole_lo, whole_hi)
    grow = g.op("And", [located, found])
    prob, ran_lo, ran_hi = refine(g, stage_network(model, final), grid, stats, lo, hi, size, grow, final, cap,
                                  MAX_VOXELS)
    inner = g.op("Sub", [g.op("Min", [ran_hi, size]), ran_lo])
    # Outside the box the probabilities are zero: only the box's footprint on the scan's grid is resampled.
    region_lo, region_hi = footprint(g, ran_lo, g.op("Add", [ran_lo, inner]), size, shape)
    crops = [g.op("Slice", [prob, g.ints(0, 0, 0), inner, g.ints(*SPATIAL)])]
    if contract.largest_component:
        # The component on the stage's grid; on the scan's grid, the voxels whose interpolation reads it.
        crops.append(largest_component(g, above(g, crops[0], float(final.threshold))))
    native = to_native(g, crops, ran_lo, size, shape, region_lo, region_hi)
    native_prob = g.op("Mul", [native[0], g.op("Cast", [found], to=TensorProto.FLOAT)])
    mask = above(g, native_prob, float(final.threshold))
    if contract.largest_component:
        mask = g.op("Mul", [mask, above(g, native[1], 0.0)])
    count = g.op("ReduceSum", [mask], keepdims=0)
    overlap = g.op("ReduceSum", [g.op("Mul", [native_prob, mask])], keepdims=0)
    denominator = g.op("Add", [g.op("ReduceSum", [native_prob], keepdims=0), count])
    soft_dice = g.op("Div", [g.op("Mul", [overlap, g.const(2.0)]), g.op("Max", [denominator, g.const(1e-12)])])
    g.op("Where", [g.op("Greater", [count, g.const(0.0)]), soft_dice, g.const(0.0)], [SCORE])
    pads = g.op("Concat", [region_lo, g.op("Sub", [shape, region_hi])], axis=0)
    g.op("Pad", [g.op("Cast", [mask], to=TensorProto.UINT8), pads, g.const(0, np.uint8)], [MASK], mode="constant")
    g.op("Pad", [native_prob, pads, g.const(0.0)], [PROBABILITY], mode="constant")
    # An empty box (all zeros) says the final stage saw the whole scan, or that the localiser found nothing.
    scale = g.op("Div", [g.op("Cast", [shape], to=TensorProto.FLOAT), g.op("Cast", [size], to=TensorProto.FLOAT)])
    corners = [g.op("Mul", [g.op("Cast", [edge], to=TensorProto.FLOAT), scale]) for edge in (ran_lo, ran_hi)]
    box = g.op("Reshape", [g.op("Concat", corners, axis=0), g.ints(2, 3)])
    seen = g.op("Cast", [g.op("And", [located, found])], to=TensorProto.FLOAT)
    g.op("Mul", [box, seen], [BOX])

    unlimited = numpy_helper.from_array(np.asarray(np.iinfo(np.int64).max, np.int64), MAX_VOXELS)
    used = {name for node in g.nodes for name in _inputs_of(node)}
    initialisers = [t for t in [*model.graph.initializer, *g.constants, unlimited] if t.name in used]
    graph = helper.make_graph(
        g.nodes, "heartseg_pipeline",
        [helper.make_tensor_value_info(IMAGE, TensorProto.FLOAT, ["x", "y", "z"]),
         helper.make_tensor_value_info(SPACING, TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info(MASK, TensorProto.UINT8, ["x", "y", "z"]),
         helper.make_tensor_value_info(PROBABILITY, TensorProto.FLOAT, ["x", "y", "z"]),
         helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, []),
         helper.make_tensor_value_info(BOX, TensorProto.FLOAT, [2, 3])],
        initializer=initialisers)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="heartseg-export")
    out.ir_version = model.ir_version
    for entry in model.metadata_props:
        out.metadata_props.add().CopyFrom(entry)
    return out
