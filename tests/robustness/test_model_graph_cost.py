"""Model parsing cost (finding 7): a graph past the node or graph-size limit is refused unparsed.

A graph of 400,000 one-input Relu nodes (about 13 MB) costs hundreds of MB to parse, check and
summarise; the server must answer 413 naming ENGINE_SERVICE_MAX_MODEL_NODES with its peak memory
barely moved. A graph whose Constant nodes carry more bytes than ENGINE_SERVICE_MAX_MODEL_GRAPH_BYTES
is refused the same way, while the same tensor as an initializer (raw bytes, cheap) is accepted.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.onnx_graph.graph_limits import graph_size_from_bytes
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.restart.server_process import StoredState
from tests.robustness.conftest import MemoryWatch, StartServer

pytestmark = pytest.mark.timeout(180)

WIDE_NODES = 400_000
CONSTANT_FLOATS = 100_000  # 400 KB of tensor data


def relu_chain(nodes: int) -> bytes:
    """x -> Relu -> Relu -> ... (``nodes`` of them); serialized straight into the graph's node list."""
    graph = helper.make_graph(
        [],
        "chain",
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(f"t{nodes}", TensorProto.FLOAT, [1, 4])],
    )
    graph.node.extend(
        onnx.NodeProto(op_type="Relu", input=[f"t{i}"], output=[f"t{i + 1}"]) for i in range(nodes)
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def add_constant(*, as_node: bool) -> bytes:
    """y = x + c with a 400 KB ``c``, held by a Constant node or by an initializer."""
    value = numpy_helper.from_array(np.linspace(0, 1, CONSTANT_FLOATS, dtype=np.float32), "c")
    nodes = [helper.make_node("Add", ["x", "c"], ["y"])]
    if as_node:
        nodes.insert(0, helper.make_node("Constant", [], ["c"], value=value))
    graph = helper.make_graph(
        nodes,
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [CONSTANT_FLOATS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [CONSTANT_FLOATS])],
        initializer=[] if as_node else [value],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_the_wire_scan_counts_what_the_parser_finds() -> None:
    data = model_bytes(resnet_block_classifier())
    model = onnx.load_from_string(data)
    size = graph_size_from_bytes(data)
    initializer_bytes = sum(t.ByteSize() + 3 for t in model.graph.initializer)  # +key and length varint
    assert size is not None and size.nodes == len(model.graph.node)
    assert (
        0 < size.graph_bytes <= model.graph.ByteSize() - initializer_bytes + 3 * len(model.graph.initializer)
    )
    assert graph_size_from_bytes(b"\x3a\xff\xff\xff\xff\x0f") is None  # a graph field longer than the data


def test_a_graph_past_the_node_limit_is_refused_before_it_is_parsed(server_process: StartServer) -> None:
    chain = relu_chain(WIDE_NODES)
    with server_process(MAX_MODEL_GRAPH_BYTES=str(300_000)) as server:
        watch = MemoryWatch(server)
        response = server.client.post("/v1/models", files={"file": ("chain.onnx", chain)})
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert (
            f"{WIDE_NODES} nodes" in error["message"] and "ENGINE_SERVICE_MAX_MODEL_NODES" in error["message"]
        )
        assert error["details"] == {"limit": "max_model_nodes", "value": WIDE_NODES, "max": 100_000}
        # Parsing and checking it would cost hundreds of MB; refusing holds about the file itself.
        assert watch.growth_mib() < 3 * len(chain) / 2**20 + 24, watch.growth_mib()

        response = server.client.post("/v1/models", files={"file": ("c.onnx", add_constant(as_node=True))})
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert "ENGINE_SERVICE_MAX_MODEL_GRAPH_BYTES" in error["message"]
        assert error["details"]["limit"] == "max_model_graph_bytes"
        state = StoredState.read(server.data)
        assert not state.model_rows and not state.model_files and not state.temporaries

        accepted = server.client.post("/v1/models", files={"file": ("i.onnx", add_constant(as_node=False))})
        assert accepted.status_code == 201, accepted.text  # the same bytes as an initializer are cheap
