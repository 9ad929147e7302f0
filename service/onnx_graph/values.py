"""Values stored in a graph: initializers and ``Constant`` nodes, read into numpy with clear errors."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from service.errors import InvalidModel


def tensor_value(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's value, or InvalidModel when its data does not fit its dims or type.

    The ONNX checker does not compare an initializer's data with its declared shape, so a damaged
    model reaches here; numpy's reshape error would otherwise surface as a crash.
    """
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, KeyError, TypeError) as exc:
        dims = list(tensor.dims)
        raise InvalidModel(
            f"Tensor '{tensor.name}' holds data that does not fit its type and dims {dims} ({exc})."
        ) from exc


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value a ``Constant`` node holds, for its numeric forms; None for sparse and string constants.

    ``value_float(s)`` are float32 and ``value_int(s)`` int64, as the operator's schema types them.
    """
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return tensor_value(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None
