"""Triton model repositories from real engines: layout, Triton's own config schema, dims, batching.

Engines are built for real (ONNX Runtime several times, TensorRT-RTX once per module) and stored
through the engine cache, so the export reads exactly what a finished build leaves behind. Configs
are parsed with the ModelConfig protobuf schema that tritonclient ships.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from service.backends.base import BuildSpec, BuiltEngine, ShapeRange
from service.backends.registry import get_backend
from service.catalog.engine_keys import BuildConfig, EngineKey
from service.catalog.engines import CorruptEngine, EngineCache, EngineRecord, NewEngine
from service.catalog.models import ModelCatalog, ModelRecord
from service.errors import BadInput, Conflict, NotFound
from service.export.triton import (
    DATA_TYPES,
    TritonExport,
    TritonTensor,
    check_model_name,
    export_for_triton,
    triton_config_for,
)
from service.onnx_graph.inspect import TensorSpec
from service.store.blobs import BlobStore
from service.store.db import Database
from tests.model_factory import resnet_block_classifier

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2",
    reason="tritonclient[grpc] (Triton's config schema) is not installed",
)

BATCH_RANGE = ShapeRange((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))
BATCH_ONE = ShapeRange((1, 3, 16, 16), (1, 3, 16, 16), (1, 3, 16, 16))


@dataclasses.dataclass(frozen=True)
class Store:
    root: Path
    models: ModelCatalog
    engines: EngineCache

    @property
    def workdir(self) -> Path:
        return self.root / "exports"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("triton")
    db = Database(root / "engine_service.db")
    yield Store(
        root,
        ModelCatalog(db, BlobStore(root / "models", suffix=".onnx")),
        EngineCache(db, root / "engines", budget_bytes=1 << 30),
    )
    db.close()


def _add_model(store: Store, model: onnx.ModelProto, name: str) -> ModelRecord:
    record, _ = store.models.add_model(model, name, source="upload")
    return record


def _store_engine(
    store: Store, model: ModelRecord, backend: str, shapes: dict[str, ShapeRange]
) -> tuple[EngineRecord, BuiltEngine]:
    """Build ``model`` with a real backend and put the engine in the cache as a finished build would."""
    implementation = get_backend(backend)
    built = implementation.build(
        store.models.read_bytes(model.id), BuildSpec(precision="fp32", shapes=shapes)
    )
    key = EngineKey(
        model.id, BuildConfig(precision="fp32", shapes=tuple(sorted(shapes.items()))), None, built.info
    )
    record = store.engines.store(
        NewEngine(key=key, built_model_id=model.id, engine_bytes=built.engine_bytes,
                  file_extension=built.file_extension, build_seconds=built.build_seconds, report={})
    )  # fmt: skip
    return record, built


@pytest.fixture(scope="module")
def dynamic_model(store: Store) -> ModelRecord:
    return _add_model(store, resnet_block_classifier(batch="N"), "resnet_block.onnx")


@pytest.fixture(scope="module")
def fixed_model(store: Store) -> ModelRecord:
    return _add_model(store, resnet_block_classifier(batch=1, seed=1), "fixed batch.onnx")


@pytest.fixture(scope="module")
def rtx_engine(store: Store, dynamic_model: ModelRecord) -> EngineRecord:
    """The module's one TensorRT-RTX build: batch 1..8."""
    availability = get_backend("tensorrt-rtx").available()
    if not availability.can_build:
        pytest.skip(f"TensorRT-RTX cannot build here: {availability.reason}")
    record, _ = _store_engine(store, dynamic_model, "tensorrt-rtx", {"input": BATCH_RANGE})
    return record


def _export(store: Store, engine_id: str, name: str | None = None) -> TritonExport:
    return export_for_triton(store.engines, store.models, engine_id, name=name, workdir=store.workdir)


def _unpack(export: TritonExport) -> dict[str, bytes | None]:
    """Archive member -> bytes (None for directories)."""
    members: dict[str, bytes | None] = {}
    with tarfile.open(export.path, "r:gz") as archive:
        for member in archive.getmembers():
            handle = archive.extractfile(member) if member.isfile() else None
            members[member.name] = handle.read() if handle is not None else None
    return members


def _parse(text: str | bytes) -> object:
    """Parse with Triton's own ModelConfig schema (raises on anything Triton would not read)."""
    config = model_config_pb2.ModelConfig()
    text_format.Parse(text.decode() if isinstance(text, bytes) else text, config)
    return config


def _data_type(name: str) -> int:
    return int(model_config_pb2.DataType.Value(name))


def test_an_onnxruntime_engine_exports_a_batching_repository_that_onnxruntime_serves(
    store: Store, dynamic_model: ModelRecord
) -> None:
    engine, built = _store_engine(store, dynamic_model, "onnxruntime", {"input": BATCH_RANGE})
    export = _export(store, engine.id)
    assert export.filename == "resnet_block_fp32_onnxruntime.tar.gz"
    members = _unpack(export)
    root = "resnet_block_fp32_onnxruntime"
    assert set(members) == {root, f"{root}/1", f"{root}/config.pbtxt", f"{root}/1/model.onnx"}
    assert members[f"{root}/1/model.onnx"] == built.engine_bytes == store.engines.read_plan(engine.id)

    config = _parse(members[f"{root}/config.pbtxt"] or b"")
    assert config.name == root and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("input", _data_type("TYPE_FP32"), [3, 16, 16])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("logits", _data_type("TYPE_FP32"), [10])
    ]
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert config.optimization.graph.level == 2  # ORT_DISABLE_ALL in Triton's onnxruntime backend

    # What Triton would do with it: open the exported bytes and run the largest batch the config allows.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        members[f"{root}/1/model.onnx"], options, providers=["CPUExecutionProvider"]
    )
    batch = np.zeros((config.max_batch_size, *config.input[0].dims), np.float32)
    (logits,) = session.run(None, {"input": batch})
    assert logits.shape == (config.max_batch_size, *config.output[0].dims)


def test_a_tensorrt_rtx_engine_exports_a_plan_repository_for_the_gpu(
    store: Store, rtx_engine: EngineRecord
) -> None:
    export = _export(store, rtx_engine.id, name="resnet-rtx")
    assert export.filename == "resnet-rtx.tar.gz"
    members = _unpack(export)
    assert set(members) == {
        "resnet-rtx",
        "resnet-rtx/1",
        "resnet-rtx/config.pbtxt",
        "resnet-rtx/1/model.plan",
    }
    assert members["resnet-rtx/1/model.plan"] == store.engines.read_plan(rtx_engine.id)
    text = (members["resnet-rtx/config.pbtxt"] or b"").decode()
    config = _parse(text)
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [3, 16, 16] and list(config.output[0].dims) == [10]
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert not config.HasField("optimization")
    assert "TensorRT-RTX plan" in text and "stock TensorRT backend" in text  # says where it can run


def test_a_fixed_batch_engine_exports_full_dims_without_batching(
    store: Store, fixed_model: ModelRecord
) -> None:
    engine, _ = _store_engine(store, fixed_model, "onnxruntime", {})
    export = _export(store, engine.id)
    assert export.config.name == "fixed_batch_fp32_onnxruntime"  # the space is not allowed in a name
    config = _parse(_unpack(export)["fixed_batch_fp32_onnxruntime/config.pbtxt"] or b"")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 3, 16, 16]
    assert list(config.output[0].dims) == [1, 10]


def test_an_onnxruntime_engine_without_a_batch_range_keeps_the_dynamic_batch_dim(
    store: Store, dynamic_model: ModelRecord
) -> None:
    engine, _ = _store_engine(store, dynamic_model, "onnxruntime", {})
    config = _parse(_export(store, engine.id).config.to_pbtxt())
    assert config.max_batch_size == 0  # ONNX Runtime takes any batch: nothing bounds max_batch_size
    assert list(config.input[0].dims) == [-1, 3, 16, 16]
    assert list(config.output[0].dims) == [-1, 10]


def test_a_tensorrt_engine_built_without_a_range_is_pinned_to_batch_one(rtx_engine: EngineRecord) -> None:
    # TensorRT builders give a dynamic batch axis without a range the profile 1..1 (service.backends.shapes).
    record = dataclasses.replace(rtx_engine, build_config=BuildConfig(precision="fp32"))
    spec_in = TensorSpec("input", "float32", ("N", 3, 16, 16))
    spec_out = TensorSpec("logits", "float32", ("N", 10))
    config = _parse(triton_config_for(record, [spec_in], [spec_out], "pinned").to_pbtxt())
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [1, 3, 16, 16]
    assert list(config.output[0].dims) == [-1, 10]


def test_a_profile_that_starts_above_batch_one_gets_no_batching(rtx_engine: EngineRecord) -> None:
    shapes = (("input", ShapeRange((2, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))),)
    record = dataclasses.replace(rtx_engine, build_config=BuildConfig(precision="fp32", shapes=shapes))
    config = triton_config_for(
        record,
        [TensorSpec("input", "float32", ("N", 3, 16, 16))],
        [TensorSpec("logits", "float32", ("N", 10))],
        "m",
    )
    assert config.max_batch_size == 0  # Triton would send batches of 1, which the engine refuses
    assert config.inputs[0].dims == (-1, 3, 16, 16)
    assert any("batch >= 2" in note for note in config.notes)


def test_every_supported_element_type_and_scalar_tensors_parse_with_tritons_schema(
    rtx_engine: EngineRecord,
) -> None:
    inputs = [TensorSpec(f"in_{dtype}", dtype, ("N", 4)) for dtype in DATA_TYPES]
    outputs = [TensorSpec("per_sample", "float32", ("N",)), TensorSpec('odd "name" ü', "int64", ("N", 2))]
    shapes = tuple((spec.name, ShapeRange((1, 4), (2, 4), (4, 4))) for spec in inputs)
    record = dataclasses.replace(rtx_engine, build_config=BuildConfig(precision="fp32", shapes=shapes))
    config = _parse(triton_config_for(record, inputs, outputs, "types").to_pbtxt())
    assert config.max_batch_size == 4
    assert [t.data_type for t in config.input] == [_data_type(name) for name in DATA_TYPES.values()]
    per_sample = config.output[0]  # a batch-only tensor keeps dims [1] and reshapes to a scalar
    assert (
        list(per_sample.dims) == [1]
        and per_sample.HasField("reshape")
        and list(per_sample.reshape.shape) == []
    )
    assert config.output[1].name == 'odd "name" ü'

    fixed = dataclasses.replace(rtx_engine, build_config=BuildConfig(precision="fp32"))
    scalar_out = triton_config_for(
        fixed, [TensorSpec("x", "float32", (4,))], [TensorSpec("s", "float32", ())], "s"
    )
    assert scalar_out.outputs == (TritonTensor("s", "TYPE_FP32", (1,), reshape=()),)
    parsed = _parse(scalar_out.to_pbtxt())
    assert parsed.max_batch_size == 0 and list(parsed.output[0].reshape.shape) == []


def test_an_element_type_triton_lacks_is_refused_with_the_types_it_takes(rtx_engine: EngineRecord) -> None:
    record = dataclasses.replace(rtx_engine, build_config=BuildConfig(precision="fp32"))
    with pytest.raises(Conflict, match="'complex64', which Triton has no data type for"):
        triton_config_for(
            record, [TensorSpec("z", "complex64", (4,))], [TensorSpec("y", "float32", (4,))], "m"
        )


@pytest.mark.parametrize("name", ["../escape", "has space", "", ".hidden", "x" * 129, "semi;colon"])
def test_a_model_name_that_is_not_a_safe_directory_is_refused(name: str) -> None:
    with pytest.raises(BadInput, match="not usable as a model directory"):
        check_model_name(name)


def test_exporting_an_unknown_engine_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="No engine with id 'nope'"):
        _export(store, "nope")


def test_a_damaged_plan_is_dropped_and_leaves_no_archive_behind(
    store: Store, dynamic_model: ModelRecord
) -> None:
    engine, _ = _store_engine(store, dynamic_model, "onnxruntime", {"input": BATCH_ONE})
    plan = store.engines.plans.path_for(engine.plan_sha256)
    plan.write_bytes(b"not the engine")
    before = set(store.workdir.glob("*")) if store.workdir.exists() else set()
    with pytest.raises(CorruptEngine, match="damaged"):
        _export(store, engine.id)
    assert set(store.workdir.glob("*")) == before
    with pytest.raises(NotFound):
        store.engines.get(engine.id)


def test_archives_left_by_interrupted_downloads_are_swept(store: Store, dynamic_model: ModelRecord) -> None:
    engine, _ = _store_engine(store, dynamic_model, "onnxruntime", {"input": BATCH_RANGE})
    store.workdir.mkdir(parents=True, exist_ok=True)
    stale = store.workdir / ".triton-stale.tar.gz"
    stale.write_bytes(b"left over")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    export = _export(store, engine.id)
    assert not stale.exists()
    assert export.path.exists() and export.size_bytes == export.path.stat().st_size
    with tarfile.open(fileobj=io.BytesIO(export.path.read_bytes()), mode="r:gz") as archive:
        assert archive.getnames()[0] == export.config.name
