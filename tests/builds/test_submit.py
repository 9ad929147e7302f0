"""submit_build and the BuildPipeline steps, on real stores: SQLite catalogs, the engine cache, a job
runner (not started: jobs are run here with ``execute``) and the real ONNX Runtime and TensorRT-RTX
builders. The HTTP route around them is covered by tests/api/test_builds.py."""

from __future__ import annotations

import threading
from pathlib import Path

import onnx
import pytest

from service.backends.base import BackendInfo
from service.backends.registry import get_backend
from service.builds.job_params import BuildJobParams
from service.builds.pipeline import BuildPipeline, PreparedModel
from service.builds.requests import BuildRequest
from service.builds.storage import LocalBuildStorage
from service.builds.submit import BUILD_JOB
from service.catalog.engine_keys import BuildConfig, CalibrationOptions, EngineKey
from service.errors import BadInput, NotFound
from service.jobs.runner import JobContext
from service.store.blobs import StagedUpload
from tests.builds.conftest import Stores
from tests.data_factory import classifier_samples, npz_bytes


def _ctx(stores: Stores, job_id: str, params: dict[str, object]) -> JobContext:
    return JobContext(job_id, BUILD_JOB, dict(params), stores.jobs, threading.Event())


# submit_build ------------------------------------------------------------------------------------


def test_a_new_request_queues_one_build_job_named_by_its_engine_key(stores: Stores) -> None:
    submission = stores.submit(
        BuildRequest(model_id=stores.model.id, precision="fp32", backend="onnxruntime")
    )
    assert submission.engine is None and submission.job is not None and submission.created
    params = BuildJobParams.from_json(submission.job.params)
    key = params.key
    assert "engine_id" not in submission.job.params, "the engine id is stored once, as the key's digest"
    assert params.to_public()["engine_id"] == key.digest and key.model_id == stores.model.id
    assert (key.config.precision, key.backend.name, key.calibration_set_id) == ("fp32", "onnxruntime", None)
    assert [job.id for job in stores.jobs.list(kind=BUILD_JOB)] == [submission.job.id]


def test_the_same_request_again_joins_the_queued_job(stores: Stores) -> None:
    request = BuildRequest(model_id=stores.model.id, precision="fp32", backend="onnxruntime")
    first = stores.submit(request)
    second = stores.submit(
        BuildRequest(model_id=stores.model.id[:16], precision="fp32", backend="onnxruntime")
    )
    assert first.job is not None and second.job is not None
    assert second.job.id == first.job.id and not second.created  # a short id names the same engine
    assert len(stores.jobs.list(kind=BUILD_JOB)) == 1


def test_a_built_engine_answers_the_next_request_from_the_cache(stores: Stores) -> None:
    request = BuildRequest(model_id=stores.model.id, precision="fp32", backend="onnxruntime")
    queued = stores.submit(request)
    assert queued.job is not None
    assert stores.runner.execute(queued.job.id)
    finished = stores.jobs.get(queued.job.id)
    assert finished.status == "succeeded", finished.error
    hit = stores.submit(request)
    assert hit.job is None and hit.engine is not None
    assert finished.result is not None
    assert (
        hit.engine.id == BuildJobParams.from_json(queued.job.params).engine_id == finished.result["engine_id"]
    )
    assert stores.engines.read_plan(hit.engine.id)  # the stored plan reads back verified


@pytest.mark.parametrize(
    ("request_fields", "error", "message"),
    [
        ({"precision": "fp16", "backend": "onnxruntime"}, BadInput, "FP16 brings no speed"),
        ({"precision": "int8", "backend": "onnxruntime"}, BadInput, "needs a calibration_set_id"),
        (
            {"precision": "fp32", "backend": "onnxruntime", "keep": ("no_such_node",)},
            BadInput,
            "no_such_node",
        ),
        (
            {"precision": "fp32", "backend": "onnxruntime", "calibration_set_id": "f" * 64},
            NotFound,
            "f" * 12,
        ),
    ],
)
def test_a_request_that_cannot_build_is_refused_before_any_job_exists(
    stores: Stores, request_fields: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        stores.submit(BuildRequest(model_id=stores.model.id, **request_fields))  # type: ignore[arg-type]
    assert stores.jobs.list() == []


def test_an_unknown_model_is_not_found_and_queues_nothing(stores: Stores) -> None:
    with pytest.raises(NotFound):
        stores.submit(BuildRequest(model_id="0" * 64, precision="fp32", backend="onnxruntime"))
    assert stores.jobs.list() == []


# BuildPipeline steps -----------------------------------------------------------------------------


def _key(stores: Stores, precision: str, backend: BackendInfo) -> EngineKey:
    config = BuildConfig(precision=precision, keep=(), shapes=(), calibration=None)  # type: ignore[arg-type]
    return EngineKey(model_id=stores.model.id, config=config, calibration_set_id=None, backend=backend)


def _prepared(stores: Stores, precision: str, backend: BackendInfo) -> PreparedModel:
    model = stores.models.load(stores.model.id)
    job, _ = stores.runner.submit(BUILD_JOB, {"probe": True})  # a real row for the context to report to
    pipeline = BuildPipeline(LocalBuildStorage(stores.models, stores.calibration_sets, stores.engines))
    return pipeline.prepare(_ctx(stores, job.id, {}), model, _key(stores, precision, backend), backend)


ORT = BackendInfo("onnxruntime", "1", "CPU", strongly_typed=True)
RTX = BackendInfo("tensorrt-rtx", "1", "ahead-of-time (no GPU)", strongly_typed=True)
TRT10 = BackendInfo("tensorrt", "10", "GPU", compute_capability="8.6", strongly_typed=False)


def test_prepare_leaves_an_fp32_model_as_uploaded(stores: Stores) -> None:
    prepared = _prepared(stores, "fp32", ORT)
    assert prepared.steps == () and prepared.quantization is None and prepared.sample is None
    assert prepared.model == stores.models.load(stores.model.id)


def test_prepare_types_fp16_only_for_strongly_typed_tensorrt_builders(stores: Stores) -> None:
    typed = _prepared(stores, "fp16", RTX)
    assert typed.steps == ("layers outside INT8 typed FP16",)
    float16 = onnx.TensorProto.FLOAT16
    assert any(init.data_type == float16 for init in typed.model.graph.initializer)
    implicit = _prepared(stores, "fp16", TRT10)  # TensorRT 10 types FP16 with its builder flag instead
    assert implicit.steps == () and implicit.model == stores.models.load(stores.model.id)


def test_build_spec_carries_the_config_and_what_preparation_kept(stores: Stores) -> None:
    prepared = PreparedModel(
        model=stores.models.load(stores.model.id),
        steps=(),
        keep_layers=("head",),
        quantization=None,
        sample=None,
    )
    config = BuildConfig(precision="fp16", keep=(), shapes=(), calibration=None, workspace_bytes=1 << 20)
    spec = BuildPipeline.build_spec(config, prepared)
    assert (spec.precision, spec.keep_layers, spec.calibration_cache, spec.workspace_bytes) == (
        "fp16",
        ("head",),
        None,
        1 << 20,
    )


def test_engine_keys_survive_the_round_trip_through_job_params(stores: Stores) -> None:
    key = _key(stores, "fp32", RTX)
    again = EngineKey.from_canonical(key.canonical())
    assert again == key and again.digest == key.digest
    assert BuildJobParams.from_json({"key": key.canonical()}).key == key
    # The key names a backend by identity only (name, version, device, capability): how a backend
    # types its network is not part of it, so a TensorRT 10 key reads back with the same digest.
    implicit = _key(stores, "fp32", TRT10)
    assert EngineKey.from_canonical(implicit.canonical()).digest == implicit.digest


def _calibration_set(stores: Stores, tmp_path: Path) -> str:
    staged = StagedUpload(tmp_path / "staging", max_bytes=10**8)
    staged.write(npz_bytes(input=classifier_samples(24, seed=5)))
    record, _ = stores.calibration_sets.register_staged(staged, "calib.npz", preprocess=None)
    return record.id


def test_an_int8_onnx_runtime_build_calibrates_proves_itself_and_times_itself(
    stores: Stores, tmp_path: Path
) -> None:
    """calibrate -> build -> evidence -> speed_check on a real calibration set and real ORT builds."""
    backend = get_backend("onnxruntime")
    info = backend.describe()
    set_id = _calibration_set(stores, tmp_path)
    config = BuildConfig(
        precision="int8", calibration=CalibrationOptions(method="max", holdout_fraction=0.25)
    )
    key = EngineKey(model_id=stores.model.id, config=config, calibration_set_id=set_id, backend=info)
    model = stores.models.load(stores.model.id)
    job, _ = stores.runner.submit(BUILD_JOB, {"probe": True})
    ctx = _ctx(stores, job.id, {})
    pipeline = BuildPipeline(LocalBuildStorage(stores.models, stores.calibration_sets, stores.engines))

    outcome, sample = pipeline.calibrate(ctx, model, key)
    assert outcome.method == "max" and outcome.accuracy is not None
    assert sample["input"].shape == (1, 3, 16, 16)  # one sample: the speed check's batch
    assert any(n.op_type == "QuantizeLinear" for n in outcome.qdq_model.graph.node)

    prepared = pipeline.prepare(ctx, model, key, info)
    built = backend.build(prepared.model.SerializeToString(), pipeline.build_spec(config, prepared))
    report = pipeline.evidence(model, prepared, built)
    assert report.target_met is outcome.target_met and report.backend["name"] == "onnxruntime"
    assert report.accuracy is not None and "this engine's kernels" in report.accuracy["measured_with"]
    assert report.layer_counts["int8"] > 0

    speed = pipeline.speed_check(ctx, backend, model, built, key, prepared)
    assert speed is not None and speed.int8_ms > 0 and speed.fp32_ms > 0 and speed.pairs >= 3
    assert (speed.warning is not None) is (speed.speedup_vs_fp32 <= 1.0)
    fp32_key = _key(stores, "fp32", info)
    assert pipeline.speed_check(ctx, backend, model, built, fp32_key, prepared) is None  # INT8 only
