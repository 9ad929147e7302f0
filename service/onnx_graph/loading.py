"""Loading and validating uploaded ONNX models.

``model_from_bytes`` is the only door through which client bytes become an ``onnx.ModelProto``: it
rejects empty, non-ONNX, truncated and checker-invalid files and models whose tensors live in
external data files (the service stores one self-contained file per model; a path inside the model
could point anywhere on the server).
"""

from __future__ import annotations

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from service.errors import InvalidModel

# Protobuf refuses to serialize messages over 2 GiB, so larger ONNX files always use external data.
PROTOBUF_LIMIT = 2**31 - 1


def model_from_bytes(data: bytes, *, check: bool = True) -> onnx.ModelProto:
    """Parse and validate an ONNX model; raise InvalidModel with an actionable message."""
    if not data:
        raise InvalidModel("The upload is empty: send the bytes of an .onnx file.")
    if len(data) > PROTOBUF_LIMIT:
        raise InvalidModel(
            "The file is larger than 2 GiB, which a single ONNX protobuf cannot be; "
            "models that large need external data, which this service does not accept."
        )
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as exc:
        raise InvalidModel(
            "The upload is not an ONNX model (protobuf decoding failed; the file may be truncated "
            f"or of another format): {exc}"
        ) from exc
    # Protobuf parses many random byte strings "successfully" into a mostly empty message, so an
    # ONNX model is recognised by its required fields, not by the absence of a decode error.
    if model.ir_version <= 0 or not model.opset_import or not model.HasField("graph"):
        raise InvalidModel(
            "The upload is not an ONNX model: it has no IR version, opset imports or graph. "
            "Export the model with torch.onnx.export, tf2onnx or onnx.save and upload the .onnx file."
        )
    if not model.graph.node:
        raise InvalidModel("The ONNX graph has no nodes; the file may be truncated.")
    _reject_external_data(model)
    if check:  # stored models (check=False) passed this at upload; the walk costs tens of ms on big graphs
        _reject_invalid_utf8(model)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise InvalidModel(f"The ONNX model is invalid (onnx checker): {_first_line(str(exc))}") from exc
    return model


def _reject_external_data(model: onnx.ModelProto) -> None:
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            location = next((kv.value for kv in tensor.external_data if kv.key == "location"), "?")
            raise InvalidModel(
                f"Tensor '{tensor.name}' stores its data in an external file ('{location}'). "
                "Upload a self-contained model: onnx.save(onnx.load(path), out, save_as_external_data=False)."
            )


def _reject_invalid_utf8(model: onnx.ModelProto) -> None:
    """ONNX strings are UTF-8; protobuf (proto2) does not check, and hands invalid ones back as bytes.

    Such a name would break the checker's error message and every JSON summary of the model, so
    the whole message tree is walked once (cheap: tensors' data are bytes or numbers, not strings).
    """
    stack: list[Message] = [model]
    while stack:
        message = stack.pop()
        for field, value in message.ListFields():
            if field.type == FieldDescriptor.TYPE_STRING:
                for text in (value,) if isinstance(value, str | bytes) else value:
                    if isinstance(text, bytes):
                        raise InvalidModel(
                            f"The model's {message.DESCRIPTOR.name}.{field.name} holds {text[:40]!r}, which "
                            "is not valid UTF-8 text; ONNX names and strings must be UTF-8. The file may be "
                            "damaged."
                        )
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                stack.extend((value,) if isinstance(value, Message) else value)


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                tensors.extend(attr.tensors)
                if attr.HasField("g"):
                    graphs.append(attr.g)
                    tensors.extend(attr.g.initializer)
                for sub in attr.graphs:
                    graphs.append(sub)
                    tensors.extend(sub.initializer)
    return tensors


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text
