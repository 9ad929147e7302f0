"""The quantization job's params contract: round trip, rows written before it, garbled rows."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from service.accuracy.tasks import AccuracyTarget, TaskSpec
from service.api.quantizations import QuantizationCreate
from service.builds.quantization_job import QUANTIZATION_JOB, QuantizationJob
from service.builds.quantization_params import QuantizationJobParams
from service.errors import InvalidJobParams
from service.store.blobs import BlobStore, StagedUpload
from service.store.clock import utc_now
from tests.builds.conftest import Stores
from tests.data_factory import classifier_samples, npz_bytes

MODEL, CALIBRATION = "a" * 64, "b" * 64
FULL = QuantizationJobParams(
    model_id=MODEL,
    calibration_set_id=CALIBRATION,
    eval_set_id="c" * 64,
    method="percentile",
    percentile=99.9,
    skip=("first", "last"),
    sensitivity="auto",
    min_cosine=0.99,
    holdout_fraction=0.0,
    holdout_seed=3,
    max_samples=16,
    target="onnxruntime",
    task=TaskSpec(kind="classification", top_k=3),
    accuracy_targets=(AccuracyTarget(metric="top1_agreement", min=0.98),),
)


def test_params_round_trip_through_their_stored_json() -> None:
    stored = json.loads(json.dumps(FULL.to_json(), sort_keys=True))
    assert QuantizationJobParams.from_json(stored) == FULL


def test_the_stored_form_is_the_one_the_previous_version_wrote_from_the_request() -> None:
    body = QuantizationCreate(
        model_id=MODEL,
        calibration_set_id=CALIBRATION,
        skip=["first"],
        task=TaskSpec(kind="classification"),
        accuracy_target=AccuracyTarget(metric="top1_agreement", min=0.98),
    )
    previous = body.model_dump(exclude={"accuracy_target"})  # what the route stored before
    previous["accuracy_targets"] = [{"metric": "top1_agreement", "min": 0.98}]
    params = QuantizationJobParams.from_json(previous)
    assert params.to_json() == previous
    assert params.skip == ("first",) and params.task == TaskSpec(kind="classification")


def test_a_row_written_before_later_fields_existed_reads_with_their_defaults() -> None:
    params = QuantizationJobParams.from_json({"model_id": MODEL, "calibration_set_id": CALIBRATION})
    assert params == QuantizationJobParams(model_id=MODEL, calibration_set_id=CALIBRATION)
    assert (params.target, params.holdout_seed, params.method) == ("tensorrt", 0, "auto")


GARBLED: list[tuple[object, str]] = [
    ("model", r"not an object but str"),
    ({"calibration_set_id": CALIBRATION}, r"model_id: Field required"),
    ({"model_id": MODEL, "calibration_set_id": CALIBRATION, "skipp": []}, r"unknown fields \['skipp'\]"),
    ({"model_id": MODEL, "calibration_set_id": CALIBRATION, "method": "kl"}, r"method: Input should be"),
    ({"model_id": MODEL, "calibration_set_id": CALIBRATION, "task": {"kind": "?"}}, r"task\.kind"),
]


@pytest.mark.parametrize(("params", "message"), GARBLED)
def test_garbled_params_are_refused_with_what_is_wrong(params: object, message: str) -> None:
    with pytest.raises(InvalidJobParams, match=message):
        QuantizationJobParams.from_json(params)


def _queued_row(stores: Stores, params: dict[str, Any]) -> str:
    """A queued quantization row as the previous version's JobStore.create wrote it."""
    job_id = uuid.uuid4().hex
    stores.jobs.db.execute(
        "INSERT INTO jobs (id, kind, status, params_json, dedupe_key, owner, created_at) "
        "VALUES (?, ?, 'queued', ?, NULL, NULL, ?)",
        (job_id, QUANTIZATION_JOB, json.dumps(params, sort_keys=True), utc_now()),
    )
    return job_id


def test_a_quantization_queued_by_the_previous_version_runs_after_the_upgrade(
    stores: Stores, tmp_path: Path
) -> None:
    staged = StagedUpload(tmp_path / "staging", max_bytes=10**8)
    staged.write(npz_bytes(input=classifier_samples(16, seed=4)))
    calibration, _ = stores.calibration_sets.register_staged(staged, "calib.npz", preprocess=None)
    job = QuantizationJob(stores.models, stores.calibration_sets, BlobStore(tmp_path / "artifacts"))
    stores.runner.register(QUANTIZATION_JOB, job.handle)
    # An early row: no holdout_seed, target, task or accuracy_targets yet.
    job_id = _queued_row(
        stores,
        {"model_id": stores.model.id, "calibration_set_id": calibration.id, "method": "max", "skip": []},
    )
    assert stores.runner.execute(job_id)
    finished = stores.jobs.get(job_id)
    assert finished.status == "succeeded", finished.error
    assert finished.result is not None and stores.models.get(finished.result["qdq_model_id"])


def test_a_quantization_row_with_garbled_params_fails_with_the_reason(stores: Stores, tmp_path: Path) -> None:
    job = QuantizationJob(stores.models, stores.calibration_sets, BlobStore(tmp_path / "artifacts"))
    stores.runner.register(QUANTIZATION_JOB, job.handle)
    job_id = _queued_row(stores, {"model_id": stores.model.id})
    stores.runner.execute(job_id)
    failed = stores.jobs.get(job_id)
    assert failed.status == "failed"
    assert failed.error is not None and "calibration_set_id: Field required" in failed.error
