"""Fuzzing the ONNX intake: client bytes become a model the service can describe, or a 4xx error.

Every example runs the real intake path: ``model_from_bytes`` (the only door from bytes to a
ModelProto), then what the service computes from an accepted model (``model_info`` at upload,
``analyze_fusions`` for GET /v1/models/{id}/fusions). The inputs derive from valid generated models:
random bytes, truncations, bit flips, spliced junk, deeply nested subgraphs and structured protobuf
mutations. The property: the only exceptions are ``BadInput`` subclasses (HTTP 400); anything else
would reach a client as a 500. ``pytest-timeout`` turns a hang into a failure.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from service.catalog.models import ModelCatalog
from service.errors import BadInput, InvalidModel
from service.onnx_graph.fusions import analyze_fusions
from service.onnx_graph.inspect import model_info
from service.onnx_graph.loading import model_from_bytes
from service.store.blobs import BlobStore
from service.store.db import Database
from tests.model_factory import model_bytes, resnet_block_classifier, two_input_adder

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = {
    "classifier": model_bytes(resnet_block_classifier()),
    "adder": model_bytes(two_input_adder()),
}
seed_bytes = st.sampled_from(sorted(SEEDS.values(), key=len))


def intake(data: bytes) -> onnx.ModelProto:
    """What the service does with an uploaded model's bytes, up to the fusion report."""
    model = model_from_bytes(data)
    # The API stores and returns both summaries as strict JSON (no NaN or inf), so they must serialize.
    json.dumps(model_info(model).to_dict(), allow_nan=False)
    json.dumps(analyze_fusions(model).to_dict(), allow_nan=False)
    return model


def accepted_or_bad_input(data: bytes) -> str:
    """Run the intake; 'accepted' or 'rejected', and any exception other than BadInput propagates."""
    try:
        intake(data)
    except BadInput as exc:
        assert exc.message.strip(), "a rejection must say what is wrong"
        event(f"rejected: {type(exc).__name__}")  # shown by --hypothesis-show-statistics
        return "rejected"
    event("accepted")
    return "accepted"


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_rejected_as_invalid_models(data: bytes) -> None:
    with pytest.raises(InvalidModel, match=r"ONNX|empty|graph|nodes|invalid"):
        intake(data)


@FUZZ
@given(seed=seed_bytes, cut=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_a_truncated_model_is_rejected_or_still_a_complete_model(seed: bytes, cut: float) -> None:
    truncated = seed[: int(len(seed) * cut)]
    # A cut exactly between top-level fields can leave a parseable model that lacks its tail; the
    # checker or the required-field test then decides. Either way nothing but BadInput escapes.
    outcome = accepted_or_bad_input(truncated)
    if outcome == "accepted":
        assert onnx.ModelProto.FromString(truncated).graph.node


@FUZZ
@given(
    seed=seed_bytes,
    flips=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8
    ),
)
def test_bit_flips_in_a_valid_model_never_escape_as_server_errors(
    seed: bytes, flips: list[tuple[float, int]]
) -> None:
    damaged = bytearray(seed)
    for where, bit in flips:
        damaged[int(where * len(damaged))] ^= 1 << bit
    accepted_or_bad_input(bytes(damaged))


@FUZZ
@given(
    seed=seed_bytes, where=st.floats(0.0, 1.0), junk=st.binary(min_size=1, max_size=64), replace=st.booleans()
)
def test_junk_spliced_into_a_valid_model_never_escapes_as_a_server_error(
    seed: bytes, where: float, junk: bytes, replace: bool
) -> None:
    at = int(where * len(seed))
    spliced = seed[:at] + junk + seed[at + (len(junk) if replace else 0) :]
    accepted_or_bad_input(spliced)


# ir_version 8, then the graph field (7, length-delimited) declaring far more bytes than follow: the
# decoder must stop at the end of the buffer instead of allocating or waiting for the declared length.
@pytest.mark.parametrize("declared", [2**31 - 2, 2**40, 2**63 - 1])
def test_a_length_prefix_larger_than_the_file_is_rejected(declared: int) -> None:
    graph_field = bytes([(7 << 3) | 2]) + _varint(declared) + b"\x0a\x00"
    with pytest.raises(InvalidModel, match="protobuf decoding failed"):
        intake(b"\x08\x08" + graph_field)


def test_subgraphs_nested_past_the_protobuf_recursion_limit_are_rejected() -> None:
    # Python's protobuf cannot even build such a message, so the bytes are encoded by hand: an If
    # node whose then_branch holds an If node whose then_branch... 300 levels deep.
    graph = b""
    for _ in range(300):
        attribute = _field(1, b"then_branch") + _field(6, graph) + bytes([20 << 3]) + _varint(5)  # type GRAPH
        node = _field(1, b"cond") + _field(2, b"y") + _field(4, b"If") + _field(5, attribute)
        graph = _field(1, node)
    # A repeated occurrence of ModelProto.graph (7) merges into the first: this adds the deep node.
    with pytest.raises(InvalidModel, match="protobuf decoding failed"):
        intake(SEEDS["adder"] + _field(7, graph))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# Structured mutations: each takes a parsed valid model and a hypothesis draw function.
Mutation = Callable[[onnx.ModelProto, st.DataObject], None]
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
NAMES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["", "input", "image", "logits", "out", "../../etc/passwd", "/abs", "a\x00b", "stem_conv_out"]
    ),
)
KNOWN_OPS = [
    "Conv",
    "BatchNormalization",
    "Relu",
    "Add",
    "Gemm",
    "QuantizeLinear",
    "DequantizeLinear",
    "Clip",
    "MatMul",
    "If",
    "Loop",
    "Identity",
    "Dropout",
    "Sum",
    "ConvTranspose",
    "Constant",
]
OP_TYPES = st.one_of(st.text(min_size=0, max_size=12), st.sampled_from(KNOWN_OPS))
DOMAINS = st.sampled_from(["", "ai.onnx", "com.microsoft", "custom", "ai.onnx.ml"])


def _pick(seq_len: int, data: st.DataObject) -> int:
    return data.draw(st.integers(0, seq_len - 1))


def _set_ir_version(model: onnx.ModelProto, data: st.DataObject) -> None:
    model.ir_version = data.draw(INT64)


def _set_opset(model: onnx.ModelProto, data: st.DataObject) -> None:
    model.opset_import[0].version = data.draw(st.one_of(st.integers(-3, 40), INT64))


def _add_opset(model: onnx.ModelProto, data: st.DataObject) -> None:
    model.opset_import.append(helper.make_opsetid(data.draw(DOMAINS), data.draw(st.integers(-1, 30))))


def _retype_node(model: onnx.ModelProto, data: st.DataObject) -> None:
    node = model.graph.node[_pick(len(model.graph.node), data)]
    node.op_type = data.draw(OP_TYPES)
    node.domain = data.draw(DOMAINS)


def _rewire_node(model: onnx.ModelProto, data: st.DataObject) -> None:
    node = model.graph.node[_pick(len(model.graph.node), data)]
    known = [v.name for v in model.graph.input] + [o for n in model.graph.node for o in n.output]
    names = st.one_of(NAMES, st.sampled_from(known))
    del node.input[:]
    node.input.extend(data.draw(st.lists(names, max_size=6)))
    if data.draw(st.booleans()):
        del node.output[:]
        node.output.extend(data.draw(st.lists(names, max_size=3)))


def _set_attribute(model: onnx.ModelProto, data: st.DataObject) -> None:
    node = model.graph.node[_pick(len(model.graph.node), data)]
    name = data.draw(
        st.sampled_from(["kernel_shape", "pads", "strides", "axis", "epsilon", "transB", "min", "x"])
    )
    value = data.draw(
        st.one_of(INT64, st.floats(allow_nan=True), st.lists(INT64, max_size=6), st.binary(max_size=8))
    )
    for index, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[index]
            break
    # An empty list has no type to infer, so lists are always INTS.
    kind = onnx.AttributeProto.INTS if isinstance(value, list) else None
    node.attribute.append(helper.make_attribute(name, value, attr_type=kind))


def _add_node(model: onnx.ModelProto, data: st.DataObject) -> None:
    known = [v.name for v in model.graph.input] + [o for n in model.graph.node for o in n.output]
    names = st.one_of(NAMES, st.sampled_from(known))
    node = helper.make_node(
        data.draw(OP_TYPES),
        data.draw(st.lists(names, max_size=4)),
        data.draw(st.lists(names, max_size=2)),
        name=data.draw(NAMES),
        domain=data.draw(DOMAINS),
    )
    model.graph.node.insert(data.draw(st.integers(0, len(model.graph.node))), node)
    if node.domain not in ("", "ai.onnx") and data.draw(st.booleans()):
        model.opset_import.append(helper.make_opsetid(node.domain, 1))


def _add_unchecked_node(model: onnx.ModelProto, data: st.DataObject) -> None:
    """A node the checker cannot verify: a known op type in a registered non-standard domain (as
    com.microsoft contrib ops are), reading any existing tensors, so the model stays acceptable."""
    graph = model.graph
    known = [v.name for v in graph.input] + [i.name for i in graph.initializer]
    known += [o for n in graph.node for o in n.output]
    domain = data.draw(st.sampled_from(["com.microsoft", "custom"]))
    outputs = [f"unchecked_{len(graph.node)}_{i}" for i in range(data.draw(st.integers(0, 2)))]
    node = helper.make_node(
        data.draw(st.sampled_from(KNOWN_OPS)),
        data.draw(st.lists(st.sampled_from(known), max_size=4)),
        outputs,
        name=data.draw(NAMES),
        domain=domain,
    )
    graph.node.append(node)  # after every producer, so the graph stays topologically sorted
    as_graph_output = data.draw(st.booleans())
    if outputs and as_graph_output:
        graph.output.append(helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, ["unknown"]))
    if domain not in {o.domain for o in model.opset_import}:
        model.opset_import.append(helper.make_opsetid(domain, 1))


def _damage_initializer(model: onnx.ModelProto, data: st.DataObject) -> None:
    tensor = model.graph.initializer[_pick(len(model.graph.initializer), data)]
    choice = data.draw(st.sampled_from(["dtype", "dims", "raw", "external", "typed"]))
    if choice == "dtype":
        tensor.data_type = data.draw(st.integers(-2, 40))
    elif choice == "dims":
        del tensor.dims[:]
        tensor.dims.extend(data.draw(st.lists(st.integers(-5, 2**40), max_size=5)))
    elif choice == "raw":
        tensor.raw_data = data.draw(st.binary(max_size=64))
    elif choice == "external":
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", data.draw(NAMES)
    else:
        tensor.ClearField("raw_data")
        tensor.float_data.extend(data.draw(st.lists(st.floats(width=32), max_size=8)))


def _damage_io(model: onnx.ModelProto, data: st.DataObject) -> None:
    values = data.draw(st.sampled_from(["input", "output"]))
    group = model.graph.input if values == "input" else model.graph.output
    if not group:  # an earlier mutation removed them all
        return
    if data.draw(st.booleans()):
        del group[_pick(len(group), data)]
        return
    value = group[_pick(len(group), data)]
    value.type.tensor_type.elem_type = data.draw(st.integers(-2, 40))
    dims = value.type.tensor_type.shape.dim
    if dims:
        dim = dims[_pick(len(dims), data)]
        if data.draw(st.booleans()):
            dim.dim_value = data.draw(INT64)
        else:
            dim.dim_param = data.draw(NAMES)


def _add_subgraph_node(model: onnx.ModelProto, data: st.DataObject) -> None:
    body = helper.make_graph(
        [helper.make_node(data.draw(OP_TYPES), data.draw(st.lists(NAMES, max_size=2)), ["b_out"])],
        data.draw(NAMES),
        [],
        [helper.make_tensor_value_info("b_out", data.draw(st.integers(0, 16)), None)],
    )
    node = helper.make_node("If", [data.draw(NAMES)], ["if_out"], then_branch=body, else_branch=body)
    model.graph.node.append(node)


def _add_function(model: onnx.ModelProto, data: st.DataObject) -> None:
    function = helper.make_function(
        data.draw(DOMAINS),
        data.draw(NAMES),
        data.draw(st.lists(NAMES, max_size=2)),
        ["f_out"],
        [helper.make_node(data.draw(OP_TYPES), data.draw(st.lists(NAMES, max_size=2)), ["f_out"])],
        [helper.make_opsetid("", data.draw(st.integers(1, 21)))],
    )
    model.functions.append(function)


MUTATIONS: dict[str, Mutation] = {
    "ir_version": _set_ir_version,
    "opset": _set_opset,
    "extra_opset": _add_opset,
    "retype_node": _retype_node,
    "rewire_node": _rewire_node,
    "attribute": _set_attribute,
    "add_node": _add_node,
    "unchecked_node": _add_unchecked_node,
    "initializer": _damage_initializer,
    "graph_io": _damage_io,
    "subgraph": _add_subgraph_node,
    "function": _add_function,
}


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=seed_bytes,
    names=st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3),
    data=st.data(),
)
def test_mutated_protobuf_fields_are_accepted_consistently_or_rejected_as_bad_input(
    seed: bytes, names: list[str], data: st.DataObject
) -> None:
    model = onnx.ModelProto.FromString(seed)
    for name in names:
        MUTATIONS[name](model, data)
    accepted_or_bad_input(model_bytes(model))


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=seed_bytes,
    names=st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=2),
    data=st.data(),
)
def test_a_rejected_upload_leaves_no_blob_no_temporary_and_no_row(
    seed: bytes, names: list[str], data: st.DataObject
) -> None:
    model = onnx.ModelProto.FromString(seed)
    for name in names:
        MUTATIONS[name](model, data)
    payload = model_bytes(model)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        db = Database(root / "db.sqlite")
        try:
            catalog = ModelCatalog(db, BlobStore(root / "models", suffix=".onnx"))
            staged = catalog.blobs.stage(max_bytes=len(payload))
            staged.write(payload)
            try:
                record, created = catalog.register_staged(staged, "fuzz.onnx")
            except BadInput:
                assert not any((root / "models").rglob("*")), "a rejected upload left files behind"
                assert db.query("SELECT id FROM models") == []
            else:
                assert created
                stored = sorted(p for p in (root / "models").rglob("*") if p.is_file())
                assert [p.name for p in stored] == [f"{record.id}.onnx"]
                assert [r["id"] for r in db.query("SELECT id FROM models")] == [record.id]
        finally:
            db.close()


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=seed_bytes, count=st.integers(1, 4), data=st.data())
def test_nodes_the_checker_cannot_verify_are_summarized_without_crashing(
    seed: bytes, count: int, data: st.DataObject
) -> None:
    model = onnx.ModelProto.FromString(seed)
    for _ in range(count):
        _add_unchecked_node(model, data)
    accepted_or_bad_input(model_bytes(model))


def test_a_contrib_dequantize_node_without_inputs_is_accepted_and_summarized() -> None:
    model = two_input_adder()
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.graph.node.append(helper.make_node("DequantizeLinear", [], ["dq_out"], domain="com.microsoft"))
    model.graph.node.append(helper.make_node("DequantizeLinear", ["out"], [], domain="com.microsoft"))
    intake(model_bytes(model))
    assert model_info(model_from_bytes(model_bytes(model))).quantization.qdq_pairs == 0


def test_a_name_that_is_not_utf8_is_rejected_with_the_field_it_is_in() -> None:
    model = two_input_adder()
    model.graph.node[0].name = "conv"
    data = model_bytes(model)
    # The node name is the only "conv" preceded by its field tag (NodeProto.name = 3, length 4).
    at = data.index(b"\x1a\x04conv") + 2
    damaged = data[:at] + b"\xf2\x80nv" + data[at + 4 :]
    with pytest.raises(InvalidModel, match=r"NodeProto\.name .* not valid UTF-8"):
        intake(damaged)
