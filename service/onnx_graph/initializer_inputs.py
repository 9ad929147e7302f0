"""Models from before ONNX IR version 4 list every initializer as a graph input as well.

Their real inputs are the graph inputs without an initializer (what
:func:`~service.onnx_graph.inspect.model_inputs` reports), but a runtime that reads the graph inputs
as given would ask a client to feed every weight. ONNX Runtime's optimizer makes it worse: it folds
weights away and keeps their graph inputs, which then have neither an initializer nor a consumer,
and a session on the optimized model demands them all. :func:`without_initializer_inputs` rewrites
such a model to its real inputs and IR version 4, where initializers need not be inputs; the graph
computes exactly what it did.
"""

from __future__ import annotations

import onnx

from service.onnx_graph.loading import model_from_bytes
from service.onnx_graph.subgraphs import names_read

# The IR version from which initializers need not be listed among the graph inputs.
IR_WITHOUT_INITIALIZER_INPUTS = 4


def without_initializer_inputs(data: bytes) -> bytes:
    """``data`` unchanged for IR 4 and later; else the model with only its real inputs (see above).

    A real input of an IR < 4 model is a graph input with no initializer that some node (or a graph
    output) reads; the others are weights, listed or left behind by an optimizer.
    """
    model = model_from_bytes(data, check=False)
    if model.ir_version >= IR_WITHOUT_INITIALIZER_INPUTS:
        return data
    initializers = {tensor.name for tensor in model.graph.initializer}
    graph = model.graph
    read = names_read(graph)
    real = []
    for value in model.graph.input:
        if value.name not in initializers and value.name in read:
            kept = onnx.ValueInfoProto()
            kept.CopyFrom(value)
            real.append(kept)
    del model.graph.input[:]
    model.graph.input.extend(real)
    model.ir_version = max(model.ir_version, IR_WITHOUT_INITIALIZER_INPUTS)
    return model.SerializeToString()
