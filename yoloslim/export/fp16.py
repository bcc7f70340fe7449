"""FP16 ONNX: the body in half precision, the head's decoding and the model's inputs and outputs in float32.

TensorRT 11 builds strongly typed networks only: the ONNX's own tensor types decide each layer's precision, and the
FP16 builder flag is gone, so an FP16 engine needs an FP16 ONNX. TensorRT 8.5-10 accept the same file (and it halves
the download to the device). onnxconverter-common's float16 converter breaks on Ultralytics' graphs (it mistypes
the Resize it keeps in float32 and then fails while removing its own Cast pairs), so the pass is written here; it is
small because a YOLO graph has only a handful of operator types.

The pass: every node runs in float16 except the head's final convolutions, DFL, box decoding and sigmoid (the same
nodes the INT8 export keeps in float; box coordinates near 640 px have a 0.5 px step in float16). A Cast sits on each
edge where the two precisions meet; float initializers are stored in the precision of their consumers; inputs that
an operator defines as float32 whatever its data type (Resize's roi and scales) stay float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import atomic_path, output_path

# Inputs an operator keeps in float32 whatever its data's type (ONNX operator schemas, opset 17)
_FLOAT32_INPUTS = {"Resize": {1, 2}}
_FP16_MAX = float(np.finfo(np.float16).max)


def convert_fp16(onnx_path: str | Path, out: str | Path | None = None) -> Path:
    """Write an FP16 copy of a float32 Ultralytics detection ONNX; return its path."""
    import onnx

    from yoloslim.export.onnx import set_metadata
    from yoloslim.export.qdq import head_nodes_kept_in_float

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path))
    target = output_path(out, onnx_path.with_name(f"{onnx_path.stem}-fp16.onnx"), onnx_path)
    half = to_float16(model, keep_float32=set(head_nodes_kept_in_float(model)))
    set_metadata(half, {**{p.key: p.value for p in model.metadata_props}, "precision": "fp16"})
    with atomic_path(target) as tmp:
        onnx.save(half, str(tmp))
    return target


def to_float16(model, keep_float32: set[str]):
    """A copy of `model` computing in float16 except the nodes named in `keep_float32`; inputs and outputs stay
    float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    float_values = _float32_value_names(graph)
    producer_is_half = {}  # float tensor name -> is it float16 after the pass
    for value in graph.input:
        producer_is_half[value.name] = False
    initializers = {t.name: t for t in graph.initializer}
    half_copies = {}

    def as_half_initializer(name: str) -> str:
        if name not in half_copies:
            array = numpy_helper.to_array(initializers[name])
            if np.abs(array).max(initial=0) > _FP16_MAX:
                raise YoloslimError(f"initializer {name} exceeds the float16 range; keep this model in FP32")
            half = numpy_helper.from_array(array.astype(np.float16), name=f"{name}_fp16")
            graph.initializer.append(half)
            half_copies[name] = half.name
        return half_copies[name]

    casts = {}
    nodes = []

    def cast(name: str, to_half: bool) -> str:
        key = (name, to_half)
        if key not in casts:
            casts[key] = f"{name}_to_{'fp16' if to_half else 'fp32'}"
            to = TensorProto.FLOAT16 if to_half else TensorProto.FLOAT
            nodes.append(helper.make_node("Cast", [name], [casts[key]], name=f"{casts[key]}_cast", to=to))
        return casts[key]

    for node in graph.node:
        runs_half = node.name not in keep_float32
        float32_slots = _FLOAT32_INPUTS.get(node.op_type, set()) if runs_half else set(range(len(node.input)))
        for i, name in enumerate(node.input):
            if name not in float_values and name not in producer_is_half:
                continue  # integer tensors (shapes, indices) and absent optional inputs
            want_half = i not in float32_slots
            if name in initializers:
                if want_half:
                    node.input[i] = as_half_initializer(name)
            elif producer_is_half[name] != want_half:
                node.input[i] = cast(name, want_half)
        if node.op_type == "Constant" and runs_half:
            _constant_to_half(node)
        for name in node.output:
            if name in float_values:
                producer_is_half[name] = runs_half
        if node.op_type == "Cast" and runs_half:
            _retarget_float_cast(node)
        nodes.append(node)

    for output in graph.output:
        if producer_is_half.get(output.name):
            _rename_output_through_cast(nodes, output.name)
    _drop_unused_initializers(graph, nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def _float32_value_names(graph) -> set[str]:
    from onnx import TensorProto

    values = list(graph.input) + list(graph.value_info) + list(graph.output)
    names = {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    return names | {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}


def _constant_to_half(node) -> None:
    from onnx import TensorProto, numpy_helper

    for attribute in node.attribute:
        if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
            attribute.t.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float16), attribute.t.name)
            )


def _retarget_float_cast(node) -> None:
    from onnx import TensorProto

    for attribute in node.attribute:
        if attribute.name == "to" and attribute.i == TensorProto.FLOAT:
            attribute.i = TensorProto.FLOAT16


def _rename_output_through_cast(nodes: list, output: str) -> None:
    """Let the half-precision producer write `output`_fp16 and a Cast write the float32 graph output."""
    from onnx import TensorProto, helper

    inner = f"{output}_fp16"
    for node in nodes:
        node.input[:] = [inner if name == output else name for name in node.input]
        node.output[:] = [inner if name == output else name for name in node.output]
    nodes.append(helper.make_node("Cast", [inner], [output], name=f"{output}_to_fp32_cast", to=TensorProto.FLOAT))


def _drop_unused_initializers(graph, nodes: list) -> None:
    used = {name for node in nodes for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
