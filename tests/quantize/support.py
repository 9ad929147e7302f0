"""Helpers shared by the quantize tests: real ONNX Runtime runs, amax from real activations, graph walks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(v) for v in session(model).run(None, dict(feeds))]


def amax_by_running(
    model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """max |x| of each tensor over the batches, read by exposing the tensors as extra graph outputs."""
    wanted = list(tensors)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph_inputs = {i.name for i in probe.graph.input}
    inner = [t for t in wanted if t not in graph_inputs]
    outputs = {o.name for o in probe.graph.output}
    for name in inner:
        if name not in outputs:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    runner = session(probe)
    amax = dict.fromkeys(wanted, 0.0)
    for feeds in batches:
        values = runner.run(inner, dict(feeds)) if inner else []
        for name, value in zip(inner, values, strict=True):
            amax[name] = max(amax[name], float(np.max(np.abs(value))))
        for name, value in feeds.items():
            if name in amax:
                amax[name] = max(amax[name], float(np.max(np.abs(value))))
    return amax


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def attr(node_proto: onnx.NodeProto, name: str) -> object:
    for a in node_proto.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def is_quantized_input(model: onnx.ModelProto, tensor: str) -> bool:
    """True when ``tensor`` is the output of DequantizeLinear(QuantizeLinear(x))."""
    made_by = producers(model)
    dq = made_by.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return False
    q = made_by.get(dq.input[0])
    return q is not None and q.op_type == "QuantizeLinear"


def weight_dequantize(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    """The DequantizeLinear producing ``tensor`` from an INT8 initializer, if that is how it is made."""
    dq = producers(model).get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    inits = {t.name: t for t in model.graph.initializer}
    source = inits.get(dq.input[0])
    return dq if source is not None and source.data_type == TensorProto.INT8 else None


def assert_tensorrt_placement(model: onnx.ModelProto, quantized_nodes: Iterable[str]) -> None:
    """The structural rules every Q/DQ model we emit must follow (see service/quantize/placement.py)."""
    made_by = producers(model)
    inits = {t.name: t for t in model.graph.initializer}
    for name in quantized_nodes:
        layer = node(model, name)
        assert is_quantized_input(model, layer.input[0]), f"{name}: data input not behind Q/DQ"
        dq = weight_dequantize(model, layer.input[1])
        assert dq is not None, f"{name}: weight not an INT8 initializer behind DequantizeLinear"
        assert not numpy_helper.to_array(inits[dq.input[2]]).any(), f"{name}: weight zero point not 0"
        if len(layer.input) > 2 and layer.input[2]:
            assert layer.input[2] in inits, f"{name}: bias must stay a float initializer"
            assert inits[layer.input[2]].data_type == TensorProto.FLOAT
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        zero = inits[q.input[2]]
        assert zero.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero).any()
        assert float(numpy_helper.to_array(inits[q.input[1]])) > 0
        source = made_by.get(q.input[0])
        # Never between Conv and BN, never between BN and its activation, never behind a graph output.
        for reader in consumers(model).get(q.input[0], []):
            assert reader.op_type != "BatchNormalization"
        assert (
            source is None
            or source.op_type != "BatchNormalization"
            or not any(
                r.op_type in ("Relu", "Clip", "LeakyRelu") for r in consumers(model).get(q.input[0], [])
            )
        )
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        for reader in consumers(model).get(dq.output[0], []):
            assert reader.op_type not in ("BatchNormalization", "Relu", "Clip", "Sigmoid", "Softmax"), (
                f"{dq.name} feeds {reader.op_type} {reader.name}"
            )
    for out in model.graph.output:
        maker = made_by.get(out.name)
        assert maker is None or maker.op_type not in ("QuantizeLinear", "DequantizeLinear")


def rapidocr_model(name: str) -> Path:
    import rapidocr

    return Path(rapidocr.__file__).parent / "models" / name


def photo_batches(size: tuple[int, int], count: int, *, start: int = 0) -> list[dict[str, np.ndarray]]:
    """skimage photos resized to ``size`` (H, W), ImageNet-normalized NCHW float32, one per batch."""
    import skimage.data
    import skimage.transform

    photos = [
        skimage.data.astronaut,
        skimage.data.coffee,
        skimage.data.chelsea,
        skimage.data.rocket,
        skimage.data.text,
        skimage.data.camera,
    ]
    batches = []
    for load in photos[start : start + count]:
        image = load()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        resized = skimage.transform.resize(image[..., :3], size, anti_aliasing=True)
        normalized = (resized - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        batches.append({"x": normalized.transpose(2, 0, 1)[None].astype(np.float32)})
    return batches
