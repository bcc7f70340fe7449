"""Coupled channel groups of an exported detector, read from the ONNX graph itself, and narrower copies of it.

Torch-free (onnx and numpy), so a device profiles the model it will run. Every output channel of a convolution is one
element; the graph is walked in order and each tensor's channel axis is a list of elements:

- a Conv creates fresh elements for its outputs; a depthwise Conv passes its input's elements on (its input and output
  channels are one set);
- channel-wise operators (activations, Mul, Add, MaxPool, Resize, Q/DQ...) join the elements of their inputs position
  by position: that is how a residual Add couples its two branches;
- Concat on the channel axis concatenates the lists, Split and Slice on it cut them (at their offsets);
- anything else (Reshape, MatMul, Softmax, the graph's outputs...) fixes the channels it reads, and what it produces is
  opaque: fixed too. That keeps the Detect head's final box and class convolutions and the attention's inner widths
  whole. A convolution that reads an opaque tensor (attention's projection) keeps its outputs as well, as yoloslim's
  pruning keeps attention's projection and, with it, the residual stream through the block.

A group is the set of convolutions whose outputs are joined, directly or through others; its channels are the joined
sets of elements. A group with any fixed channel stays whole, as torch-pruning's group does (graph.py). A group whose
channels a Split cuts into equal sections (C2f's, C3k2's and C2PSA's first conv) keeps the same count in each section,
as the torch prune does; its width is counted per section.

Narrower copies keep the first channels of each group (of each section): for timing, which channels stay is
irrelevant. Conv weights and biases, per-channel constants, Split sizes and Slice bounds are rewritten; nothing else
changes, so the copy runs in ONNX Runtime and builds in TensorRT as the original does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from yoloslim.utils.errors import YoloslimError

# Operators whose output channels are their inputs' channels, position by position.
CHANNELWISE = {
    "Sigmoid",
    "Relu",
    "LeakyRelu",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Clip",
    "Identity",
    "Cast",
    "Add",
    "Mul",
    "Sub",
    "Div",
    "MaxPool",
    "AveragePool",
    "Resize",
    "Upsample",
    "QuantizeLinear",
    "DequantizeLinear",
    "BatchNormalization",
}


@dataclass
class Conv:
    """One Conv node: its weight, what it reads and writes, and its spatial work per output channel."""

    node: int  # index in graph.node
    weight: str  # the name of its weight initializer (the export keeps torch's parameter names)
    input: str
    output: str
    kernel: int  # kernel height times width
    depthwise: bool
    out_hw: int  # output height times width


@dataclass
class Group:
    """One set of coupled output channels of the ONNX graph."""

    convs: List[str]  # weights of the convolutions whose outputs it holds, in graph order
    channels: List[int]  # its channels (element roots), in the order kept channels are taken
    sections: int = 1  # equal sections a Split cuts it into
    fixed: bool = False

    @property
    def root(self) -> str:
        return self.convs[0]

    @property
    def size(self) -> int:
        """Channels per section: the unit that min_keep and rounding apply to."""
        return len(self.channels) // self.sections


@dataclass
class ChannelGraph:
    """The groups of an ONNX model and what is needed to slice and cost it."""

    model: object  # onnx.ModelProto
    convs: List[Conv]
    groups: List[Group]  # prunable ones first, in graph order, then the fixed ones
    tensors: Dict[str, np.ndarray]  # tensor -> its channels' element roots
    hw: Dict[str, int]  # tensor -> height times width
    splits: Dict[int, List[str]] = field(default_factory=dict)  # Split node -> its outputs

    @property
    def prunable(self) -> List[Group]:
        return [g for g in self.groups if not g.fixed]

    def group_of(self) -> Dict[int, int]:
        """Element root -> index of its group in `groups`."""
        return {c: i for i, g in enumerate(self.groups) for c in g.channels}

    def full_widths(self) -> Dict[str, int]:
        return {g.root: g.size for g in self.prunable}


class _Elements:
    """Union-find over channel elements, with a fixed flag per set."""

    def __init__(self):
        self.parent: List[int] = []
        self.fixed: List[bool] = []

    def new(self, count: int, fixed: bool = False) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        self.fixed.extend([fixed] * count)
        return np.arange(start, start + count)

    def find(self, e: int) -> int:
        root = e
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[e] != root:
            self.parent[e], e = root, self.parent[e]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx
                self.fixed[rx] = self.fixed[rx] or self.fixed[ry]

    def fix(self, elements: np.ndarray) -> None:
        for e in elements.tolist():
            self.fixed[self.find(e)] = True

    def roots(self, elements: np.ndarray) -> np.ndarray:
        return np.array([self.find(e) for e in elements.tolist()], dtype=np.int64)


def _attr(node, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _shapes(model) -> Dict[str, List[int]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes = {}
    for info in [*graph.value_info, *graph.input, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    return shapes


def _constant(inits: dict, name: str) -> Optional[np.ndarray]:
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name]) if name in inits else None


class _Walk:
    """One pass over the nodes, building each tensor's elements."""

    def __init__(self, model):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.shapes = _shapes(model)
        self.elements = _Elements()
        self.chan: Dict[str, np.ndarray] = {}
        self.opaque: set = set()
        self.convs: List[Conv] = []
        self.conv_outputs: Dict[str, np.ndarray] = {}  # weight -> its output elements
        self.splits: Dict[int, List[str]] = {}
        self.split_inputs: Dict[int, str] = {}
        self.producers = {out: node for node in model.graph.node for out in node.output}
        for tensor in model.graph.input:
            if tensor.name not in self.inits:
                self.chan[tensor.name] = self.elements.new(self._channels(tensor.name), fixed=True)

    def _channels(self, name: str) -> int:
        shape = self.shapes.get(name, [])
        return shape[1] if len(shape) == 4 and shape[1] > 0 else 0

    def hw(self, name: str) -> int:
        shape = self.shapes.get(name, [])
        return int(np.prod(shape[2:])) if len(shape) == 4 else 0

    def _opaque(self, name: str) -> None:
        count = self._channels(name)
        if count:
            self.chan[name] = self.elements.new(count, fixed=True)
            self.opaque.add(name)

    def _fix_inputs(self, node) -> None:
        for name in node.input:
            if name in self.chan:
                self.elements.fix(self.chan[name])

    def _weight(self, name: str) -> str:
        """The initializer a Conv's weight input comes from, through a DequantizeLinear or Cast (Q/DQ and FP16)."""
        producer = self.producers.get(name)
        while producer is not None and name not in self.inits:
            name = producer.input[0]
            producer = self.producers.get(name)
        return name

    def run(self):
        for index, node in enumerate(self.model.graph.node):
            handler = getattr(self, f"_{node.op_type.lower()}", None)
            if node.op_type in CHANNELWISE:
                self._channelwise(node)
            elif handler is not None:
                handler(index, node)
            else:
                self._other(node)
        for out in self.model.graph.output:
            if out.name in self.chan:
                self.elements.fix(self.chan[out.name])

    def _other(self, node) -> None:
        self._fix_inputs(node)
        for out in node.output:
            self._opaque(out)

    def _channelwise(self, node) -> None:
        mapped = [self.chan[n] for n in node.input if n in self.chan]
        if not mapped or any(len(m) != len(mapped[0]) for m in mapped):
            return self._other(node)
        for other in mapped[1:]:
            self.elements.union(mapped[0], other)
        self.chan[node.output[0]] = mapped[0]
        if all(n in self.opaque for n in node.input if n in self.chan):
            self.opaque.add(node.output[0])

    def _conv(self, index: int, node) -> None:
        x, out = node.input[0], node.output[0]
        weight = self._weight(node.input[1])
        if x not in self.chan or weight not in self.inits:
            return self._other(node)
        shape = tuple(self.inits[weight].dims)
        groups = _attr(node, "group", 1)
        depthwise = groups > 1 and groups == shape[0] == len(self.chan[x])
        if groups > 1 and not depthwise:  # a grouped conv keeps its groups whole
            return self._other(node)
        if depthwise:
            self.chan[out] = self.chan[x]
            if x in self.opaque:
                self.opaque.add(out)
        else:
            self.chan[out] = self.elements.new(shape[0], fixed=x in self.opaque)
        self.conv_outputs[weight] = self.chan[out]
        kernel = int(np.prod(shape[2:]))
        self.convs.append(Conv(index, weight, x, out, kernel, depthwise, self.hw(out)))

    def _concat(self, index: int, node) -> None:
        axis = _attr(node, "axis")
        rank = len(self.shapes.get(node.output[0], []))
        if rank == 4 and axis % 4 == 1 and all(n in self.chan for n in node.input):
            self.chan[node.output[0]] = np.concatenate([self.chan[n] for n in node.input])
        else:
            self._other(node)

    def _split(self, index: int, node) -> None:
        x = node.input[0]
        if x not in self.chan or _attr(node, "axis", 0) % 4 != 1:
            return self._other(node)
        sizes = _constant(self.inits, node.input[1]) if len(node.input) > 1 and node.input[1] else None
        sizes = _attr(node, "split") if sizes is None else sizes.tolist()
        if sizes is None:
            sizes = [len(self.chan[x]) // len(node.output)] * len(node.output)
        offsets = np.cumsum([0, *sizes])
        for out, start, end in zip(node.output, offsets[:-1], offsets[1:]):
            self.chan[out] = self.chan[x][start:end]
        self.splits[index] = list(node.output)
        self.split_inputs[index] = x

    def _slice(self, index: int, node) -> None:
        x = node.input[0]
        bounds = [_constant(self.inits, n) if n else None for n in node.input[1:5]]
        if x not in self.chan or any(b is None for b in bounds[:2]):
            return self._other(node)
        starts, ends = bounds[0], bounds[1]
        axes = bounds[2] if len(bounds) > 2 and bounds[2] is not None else np.arange(len(starts))
        steps = bounds[3] if len(bounds) > 3 and bounds[3] is not None else np.ones(len(starts), dtype=np.int64)
        channel = [i for i, a in enumerate(axes.tolist()) if a % 4 == 1]
        if not channel:  # a spatial slice keeps the channels
            self.chan[node.output[0]] = self.chan[x]
            return
        i = channel[0]
        if steps[i] != 1:
            return self._other(node)
        self.chan[node.output[0]] = self.chan[x][slice(int(starts[i]), int(min(ends[i], len(self.chan[x]))))]


def read_groups(model) -> ChannelGraph:
    """The channel groups of an ONNX detector (onnx.ModelProto with static shapes)."""
    walk = _Walk(model)
    walk.run()
    elements = walk.elements
    roots = {w: elements.roots(e) for w, e in walk.conv_outputs.items()}
    conv_group: Dict[str, int] = {}
    by_root: Dict[int, int] = {}
    groups: List[Group] = []
    for conv in walk.convs:  # graph order: a group's first conv is its root
        members = roots[conv.weight]
        found = sorted({by_root[r] for r in members.tolist() if r in by_root})
        if found:
            target = found[0]
            for other in found[1:]:  # two groups joined by this conv's channels
                _merge(groups, target, other, by_root)
        else:
            target = len(groups)
            groups.append(Group(convs=[], channels=[]))
        group = groups[target]
        group.convs.append(conv.weight)
        for r in members.tolist():
            if r not in by_root:
                by_root[r] = target
                group.channels.append(r)
        conv_group[conv.weight] = target
    live = [g for g in groups if g.convs]
    for g in live:
        g.fixed = any(elements.fixed[c] for c in g.channels)
    tensors = {name: elements.roots(e) for name, e in walk.chan.items()}
    for g in live:
        _order_in_sections(g, walk, tensors)
    ordered = [g for g in live if not g.fixed] + [g for g in live if g.fixed]
    hw = {name: walk.hw(name) for name in walk.chan}
    return ChannelGraph(model, walk.convs, ordered, tensors, hw, walk.splits)


def _merge(groups: List[Group], target: int, other: int, by_root: Dict[int, int]) -> None:
    keep, gone = groups[target], groups[other]
    keep.convs.extend(gone.convs)
    keep.channels.extend(gone.channels)
    for r in gone.channels:
        by_root[r] = target
    gone.convs, gone.channels = [], []


def _order_in_sections(group: Group, walk: _Walk, tensors: Dict[str, np.ndarray]) -> None:
    """Order a split group's channels as its Split's input holds them, with its equal sections recorded."""
    mine = set(group.channels)
    for index, outputs in walk.splits.items():
        source = tensors[walk.split_inputs[index]].tolist()
        if set(source) != mine or len(source) != len(mine):
            continue
        sizes = [len(tensors[o]) for o in outputs]
        if len(set(sizes)) != 1:
            raise YoloslimError(
                f"the Split of {group.root} cuts it into unequal sections {sizes}, which yoloslim cannot prune; "
                "export the model with yoloslim export"
            )
        group.channels, group.sections = source, len(outputs)
        return


def removed_channels(graph: ChannelGraph, widths: Dict[str, int]) -> set:
    """The element roots a plan removes: all but the first `width` channels of each section of each group named."""
    removed = set()
    for group in graph.prunable:
        width = widths.get(group.root, group.size)
        if not 1 <= width <= group.size:
            raise YoloslimError(f"width {width} of group {group.root} is outside 1..{group.size}")
        for s in range(group.sections):
            removed.update(group.channels[s * group.size + width : (s + 1) * group.size])
    return removed


def slice_model(graph: ChannelGraph, widths: Dict[str, int]):
    """A copy of the ONNX model with each group narrowed to its width in `widths` (root conv weight -> channels per
    section; groups not named stay whole)."""
    import copy

    from onnx import numpy_helper

    model = copy.deepcopy(graph.model)
    removed = removed_channels(graph, widths)
    index = {
        name: np.array([i for i, r in enumerate(roots.tolist()) if r not in removed], dtype=np.int64)
        for name, roots in graph.tensors.items()
    }
    inits = {t.name: t for t in model.graph.initializer}
    nodes = model.graph.node

    def rewrite(name: str, array: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(inits[name]).dtype), name))

    def take(name: str, axis: int, idx: np.ndarray) -> None:
        if name in inits:
            rewrite(name, np.take(numpy_helper.to_array(inits[name]), idx, axis=axis))

    producers = {out: node for node in nodes for out in node.output}
    for conv in graph.convs:
        node = nodes[conv.node]
        out_idx, in_idx = index[conv.output], index[conv.input]
        weight_chain = _weight_chain(node.input[1], producers, inits)
        for name, axis_of in weight_chain:
            take(name, axis_of, out_idx)
        if not conv.depthwise:
            take(conv.weight, 1, in_idx)
        else:
            for a in node.attribute:
                if a.name == "group":
                    a.i = len(out_idx)
        if len(node.input) > 2:
            take(node.input[2], 0, out_idx)
    _rewrite_channel_constants(model, graph, index, inits, rewrite)
    _drop_unused_initializers(model)
    del model.graph.value_info[:]
    return model


def _drop_unused_initializers(model) -> None:
    """Initializers that the rewritten Split and Slice nodes no longer read."""
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _weight_chain(name: str, producers: dict, inits: dict) -> list:
    """(initializer, axis of output channels) of a conv weight and of its per-channel Q/DQ scale and zero point."""
    chain = []
    while name not in inits and name in producers:
        node = producers[name]
        if node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            chain.extend((n, 0) for n in node.input[1:3] if n in inits and _is_vector(inits[n]))
        name = node.input[0]
    return [(name, 0), *chain]


def _is_vector(tensor) -> bool:
    return len(tensor.dims) == 1 and tensor.dims[0] > 1


def _rewrite_channel_constants(model, graph: ChannelGraph, index: dict, inits: dict, rewrite) -> None:
    """Split sizes, Slice bounds on the channel axis, and per-channel constants of channel-wise operators."""
    from onnx import numpy_helper

    nodes = model.graph.node
    for i, node in enumerate(nodes):
        if i in graph.splits:
            sizes = np.array([len(index[o]) for o in node.output], dtype=np.int64)
            if len(node.input) > 1 and node.input[1]:
                _own_initializer(model, inits, node, 1, sizes)
            else:
                for a in node.attribute:
                    if a.name == "split":
                        a.ints[:] = sizes.tolist()
        elif node.op_type == "Slice" and node.input[0] in index and node.output[0] in index:
            full = graph.tensors[node.input[0]]
            if len(full) != len(graph.tensors[node.output[0]]):
                _rewrite_slice(model, inits, node, graph, index)
        elif node.op_type in CHANNELWISE and node.output[0] in index:
            width = len(graph.tensors[node.output[0]])
            for k, name in enumerate(node.input):
                axis = _channel_axis(node.op_type, numpy_helper.to_array(inits[name]), width) if name in inits else None
                if axis is not None:
                    array = numpy_helper.to_array(inits[name])
                    _own_initializer(model, inits, node, k, np.take(array, index[node.output[0]], axis=axis))


def _channel_axis(op_type: str, array: np.ndarray, width: int) -> Optional[int]:
    """The axis of an operator's constant that runs over the channels of its `width`-channel NCHW data, if any:
    a broadcast [C, 1, 1] or [1, C, 1, 1] operand, or the per-channel vectors of BatchNormalization and Q/DQ."""
    if width <= 1:
        return None
    if op_type in ("BatchNormalization", "QuantizeLinear", "DequantizeLinear"):
        return 0 if array.ndim == 1 and array.shape[0] == width else None
    if op_type in ("Add", "Mul", "Sub", "Div") and array.ndim >= 3 and array.shape[-3] == width:
        return array.ndim - 3
    return None


def _own_initializer(model, inits: dict, node, k: int, array: np.ndarray) -> None:
    """Give node input k a new initializer of its own (the original may be shared with unchanged nodes)."""
    from onnx import numpy_helper

    name = f"{node.input[k]}/sliced/{len(inits)}"
    tensor = numpy_helper.from_array(array.astype(numpy_helper.to_array(inits[node.input[k]]).dtype), name)
    model.graph.initializer.append(tensor)
    inits[name] = model.graph.initializer[-1]
    node.input[k] = name


def _rewrite_slice(model, inits: dict, node, graph: ChannelGraph, index: dict) -> None:
    """Map a channel-axis Slice's bounds onto the kept channels: a range stays a range once channels are removed."""
    from onnx import numpy_helper

    full = graph.tensors[node.input[0]].tolist()
    kept_in = set(index[node.input[0]].tolist())
    starts = numpy_helper.to_array(inits[node.input[1]]).copy()
    ends = numpy_helper.to_array(inits[node.input[2]]).copy()
    axes = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else range(len(starts))
    for i, a in enumerate(list(axes)):
        if a % 4 == 1:
            lo, hi = int(starts[i]), int(min(ends[i], len(full)))
            starts[i] = sum(1 for j in range(lo) if j in kept_in)
            ends[i] = starts[i] + sum(1 for j in range(lo, hi) if j in kept_in)
    _own_initializer(model, inits, node, 1, starts)
    _own_initializer(model, inits, node, 2, ends)
