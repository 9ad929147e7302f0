"""What the soak sends: small models, calibration sets, inference bodies and the hostile bodies of issue 11.

Everything is generated here, deterministically from a seed, so a soak run needs no files and no
network. The hostile bodies are one per finding the issue lists; each must be refused with a 4xx.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

SIZE = 16  # input [N, 3, 16, 16]
CLASSES = 10
MIB = 1024 * 1024


def classifier(seed: int) -> bytes:
    """x -> Conv(3->8, 3x3) -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm(8->10)."""
    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    initializers = [
        init("w", (8, 3, 3, 3)),
        init("b", (8,)),
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        init("beta", (8,), 0.1),
        init("mean", (8,), 0.1),
        numpy_helper.from_array(np.ones(8, np.float32), "var"),
        init("fc_w", (CLASSES, 8)),
        init("fc_b", (CLASSES,)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        f"soak_{seed}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", CLASSES])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def samples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, SIZE, SIZE), dtype=np.float32)


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _npz_declaring(shape: tuple[int, ...]) -> bytes:
    """An npz whose member's .npy header declares ``shape`` over 4 bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("input.npy", header.getvalue() + bytes(4))
    return buffer.getvalue()


def _npz_bomb(values: int = 2**26) -> bytes:
    """A deflated npz of one all-zero float32 sample: ~260 kB holding 256 MiB."""
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1, values)}
    )
    buffer = io.BytesIO()
    zeros = bytes(16 * MIB)
    remaining = values * 4
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("input.npy", "w", force_zip64=True) as member,
    ):
        member.write(header.getvalue())
        while remaining:
            step = min(remaining, len(zeros))
            member.write(zeros[:step])
            remaining -= step
    return buffer.getvalue()


def _png_zip(count: int) -> bytes:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for index in range(count):
            encoded = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(encoded, format="PNG")
            archive.writestr(f"img{index}.png", encoded.getvalue())
    return buffer.getvalue()


def _relu_chain(nodes: int) -> bytes:
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


@dataclass(frozen=True)
class Hostile:
    """One hostile request: where it goes and what it carries (``engine`` is filled in at send time)."""

    name: str
    path: str  # "{engine}" is replaced by a live engine id
    files: dict[str, tuple[str, bytes]] | None = None
    data: dict[str, str] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] | None = None

    def request(self, engine_id: str) -> dict[str, Any]:
        return {
            "url": self.path.replace("{engine}", engine_id),
            "files": self.files,
            "data": self.data,
            "content": self.content,
            "headers": self.headers,
            "params": self.params,
        }


def hostile_requests() -> list[Hostile]:
    """One request per finding of issue 11 that a client can send (each must get a 4xx)."""
    model = classifier(0)
    raw = {"content-type": "application/x-numpy", "x-tensor-dtype": "float32"}
    json_type = {"content-type": "application/json"}
    return [
        Hostile("npz_bomb", "/v1/calibration-sets", files={"file": ("bomb.npz", _npz_bomb())}),
        Hostile(
            "preprocess_amplification",
            "/v1/calibration-sets",
            files={"file": ("small.zip", _png_zip(8))},
            data={"preprocess": json.dumps({"size": [8192, 8192]})},
        ),
        Hostile(
            "preprocess_huge_integer",
            "/v1/calibration-sets",
            files={"file": ("small.zip", _png_zip(2))},
            data={"preprocess": '{"size": [' + "9" * 5000 + ", 16]}"},
        ),
        Hostile(
            "preprocess_deep_nesting",
            "/v1/calibration-sets",
            files={"file": ("small.zip", _png_zip(2))},
            data={"preprocess": "[" * 100_000},
        ),
        Hostile(
            "infer_huge_integer",
            "/v1/engines/{engine}/infer",
            content=b'{"inputs": {"input": ' + b"9" * 5000 + b"}}",
            headers=json_type,
        ),
        Hostile(
            "infer_negative_shape",
            "/v1/engines/{engine}/infer",
            content=_npz_declaring((-1, -1)),
            headers={"content-type": "application/x-npz"},
        ),
        Hostile(
            "infer_100_dims_npz",
            "/v1/engines/{engine}/infer",
            content=_npz_declaring((1,) * 100),
            headers={"content-type": "application/x-npz"},
        ),
        Hostile(
            "infer_100_dims_raw",
            "/v1/engines/{engine}/infer",
            content=bytes(4),
            headers={**raw, "x-tensor-shape": ",".join(["1"] * 100)},
        ),
        Hostile("name_200k", "/v1/models", files={"file": ("m.onnx", model)}, data={"name": "n" * 200_000}),
        Hostile(
            "name_header_break",
            "/v1/models",
            files={"file": ("m.onnx", model)},
            data={"name": "a\r\nX-Evil: 1"},
        ),
        Hostile("model_400k_nodes", "/v1/models", files={"file": ("chain.onnx", _relu_chain(400_000))}),
        Hostile(
            "json_body_8mib",
            "/v1/builds",
            content=b'{"model_id": "' + b"a" * (8 * MIB) + b'"}',
            headers=json_type,
        ),
        Hostile(
            "json_infer_32mib",
            "/v1/engines/{engine}/infer",
            content=b'{"inputs": {"input": [' + b"0.5," * (8 * MIB) + b"0.5]}}",
            headers=json_type,
        ),
        Hostile(
            "unknown_engine",
            "/v1/engines/" + "0" * 64 + "/infer",
            content=npz(input=samples(1, 0)),
            headers={"content-type": "application/x-npz"},
        ),
    ]
