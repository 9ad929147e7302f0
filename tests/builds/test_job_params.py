"""The build job's params contract: round trip, rows of the previous version, and garbled rows.

Rows are real SQLite job rows; the previous version's are written the way it wrote them (its dict form,
``json.dumps(params, sort_keys=True)``, with ``engine_id``, ``model_id`` and ``calibration_set_id``
beside the key), then run by the real build pipeline with the real ONNX Runtime builder.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from service.backends.registry import get_backend
from service.builds.auto_precision import Int8Evidence
from service.builds.job_params import AutoChoiceParams, BuildJobParams
from service.builds.submit import BUILD_JOB
from service.catalog.engine_keys import BuildConfig, CalibrationOptions, EngineKey
from service.errors import InvalidJobParams
from service.store.blobs import StagedUpload
from service.store.clock import utc_now
from tests.builds.conftest import Stores
from tests.data_factory import classifier_samples, npz_bytes

ORT = get_backend("onnxruntime").describe()
MODEL, CALIBRATION, EVAL = "a" * 64, "b" * 64, "c" * 64
INT8 = EngineKey(
    MODEL,
    BuildConfig(precision="int8", calibration=CalibrationOptions(method="max"), eval_set_id=EVAL),
    CALIBRATION,
    ORT,
)
FP32 = EngineKey(MODEL, BuildConfig(precision="fp32"), None, ORT)
EVIDENCE = Int8Evidence(engine_id="d" * 64, target_met=False, speedup_vs_fp32=1.4, device="CPU")


def _previous_form(params: BuildJobParams) -> dict[str, Any]:
    """The dict the previous version's submit_build stored for the same job."""
    old: dict[str, Any] = {
        "key": params.key.canonical(),
        "engine_id": params.key.digest if params.auto is None else None,
        "model_id": params.key.model_id,
        "calibration_set_id": params.key.calibration_set_id,
        "eval_set_id": params.eval_set_id,
    }
    if params.auto is not None:
        evidence = params.auto.int8_evidence
        old["auto"] = {
            "fallback_key": params.auto.fallback_key.canonical(),
            "int8_evidence": asdict(evidence) if evidence is not None else None,
        }
    return old


CASES = {
    "fp32": BuildJobParams(key=FP32),
    "int8 with an eval set": BuildJobParams(key=INT8, eval_set_id=EVAL),
    "auto, INT8 to build": BuildJobParams(key=INT8, eval_set_id=EVAL, auto=AutoChoiceParams(FP32)),
    "auto, INT8 cached": BuildJobParams(key=INT8, eval_set_id=EVAL, auto=AutoChoiceParams(FP32, EVIDENCE)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_params_round_trip_through_their_stored_json(name: str) -> None:
    params = CASES[name]
    stored = json.loads(json.dumps(params.to_json(), sort_keys=True))
    assert BuildJobParams.from_json(stored) == params
    assert BuildJobParams.from_json(stored).keys() == params.keys()


def test_the_model_and_calibration_set_are_stored_once_in_the_key_and_derived() -> None:
    params = CASES["int8 with an eval set"]
    stored = params.to_json()
    assert set(stored) == {"key", "eval_set_id"}
    assert (params.model_id, params.calibration_set_id, params.engine_id) == (MODEL, CALIBRATION, INT8.digest)
    assert stored["key"]["model_sha256"] == MODEL and stored["key"]["calibration_set_id"] == CALIBRATION


def test_an_auto_job_names_no_engine_until_it_has_chosen_but_may_store_either_key() -> None:
    params = CASES["auto, INT8 to build"]
    assert params.engine_id is None
    assert params.keys() == {INT8.digest: INT8, FP32.digest: FP32}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_row_of_the_previous_version_reads_back_and_shows_as_it_did(name: str) -> None:
    old = json.loads(json.dumps(_previous_form(CASES[name]), sort_keys=True))
    params = BuildJobParams.from_json(old)
    assert params == CASES[name]
    assert params.to_public() == old  # the API's params document is what it was


def _fallback_key(key: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "auto": {"fallback_key": {"backend": "onnxruntime"}}}


GARBLED: list[tuple[object, str]] = [
    (["key"], r"not an object but list"),
    ({"eval_set_id": EVAL}, r"carry no engine key \('key'\)"),
    ({"key": FP32.canonical(), "precision": "fp32"}, r"unknown fields \['precision'\]"),
    ({"key": "not a key"}, r"'key' is not an engine key object"),
    (
        {"key": {k: v for k, v in FP32.canonical().items() if k != "backend"}},
        r"lacks the engine key field 'backend'",
    ),
    ({"key": {**FP32.canonical(), "build_config": []}}, r"'key' is not a readable engine key"),
    ({"key": FP32.canonical(), "eval_set_id": 7}, r"eval_set_id is not a string"),
    ({"key": INT8.canonical(), "eval_set_id": "e" * 64}, r"eval_set_id 'e+' differs from its engine key's"),
    ({"key": FP32.canonical(), "engine_id": "f" * 64}, r"engine_id 'f+' disagrees with its engine key"),
    ({"key": FP32.canonical(), "model_id": "f" * 64}, r"model_id 'f+' disagrees with its engine key"),
    ({"key": FP32.canonical(), "auto": {"int8_evidence": None}}, r"'auto' params carry no 'fallback_key'"),
    (_fallback_key(FP32.canonical()), r"'auto.fallback_key' lacks the engine key field"),
    (
        {"key": FP32.canonical(), "auto": {"fallback_key": FP32.canonical(), "int8_evidence": {"speed": 2}}},
        r"'auto.int8_evidence' of a build job is not readable",
    ),
]


@pytest.mark.parametrize(("params", "message"), GARBLED)
def test_garbled_params_are_refused_with_what_is_wrong(params: object, message: str) -> None:
    with pytest.raises(InvalidJobParams, match=message):
        BuildJobParams.from_json(params)


# Real rows in SQLite, run by the real pipeline ----------------------------------------------------


def _insert_previous_row(stores: Stores, params: dict[str, Any], dedupe_key: str | None) -> str:
    """A queued build row exactly as the previous version's JobStore.create wrote it."""
    job_id = uuid.uuid4().hex
    stores.jobs.db.execute(
        "INSERT INTO jobs (id, kind, status, params_json, dedupe_key, owner, created_at) "
        "VALUES (?, ?, 'queued', ?, ?, NULL, ?)",
        (job_id, BUILD_JOB, json.dumps(params, sort_keys=True), dedupe_key, utc_now()),
    )
    return job_id


def _set(stores: Stores, tmp_path: Path, samples: int, seed: int) -> str:
    staged = StagedUpload(tmp_path / f"staging-{seed}", max_bytes=10**8)
    staged.write(npz_bytes(input=classifier_samples(samples, seed=seed)))
    record, _ = stores.calibration_sets.register_staged(staged, f"set-{seed}.npz", preprocess=None)
    return record.id


def test_a_build_queued_by_the_previous_version_runs_after_the_upgrade(stores: Stores) -> None:
    key = EngineKey(stores.model.id, BuildConfig(precision="fp32"), None, ORT)
    job_id = _insert_previous_row(stores, _previous_form(BuildJobParams(key=key)), key.digest)
    assert stores.runner.execute(job_id)
    finished = stores.jobs.get(job_id)
    assert finished.status == "succeeded", finished.error
    assert finished.result is not None and finished.result["engine_id"] == key.digest
    assert stores.engines.lookup(key.digest) is not None


def test_an_int8_build_of_the_previous_version_holds_out_its_eval_set(stores: Stores, tmp_path: Path) -> None:
    calibration, held_out = _set(stores, tmp_path, 24, seed=5), _set(stores, tmp_path, 6, seed=9)
    config = BuildConfig(precision="int8", calibration=CalibrationOptions(method="max"), eval_set_id=held_out)
    key = EngineKey(stores.model.id, config, calibration, ORT)
    job_id = _insert_previous_row(
        stores, _previous_form(BuildJobParams(key=key, eval_set_id=held_out)), key.digest
    )
    assert stores.runner.execute(job_id)
    finished = stores.jobs.get(job_id)
    assert finished.status == "succeeded", finished.error
    assert "24 calibration and 6 held-out samples" in finished.log  # the eval set, not a split
    assert stores.engines.lookup(key.digest) is not None


def test_a_build_row_with_garbled_params_fails_with_the_reason(stores: Stores) -> None:
    canonical = {k: v for k, v in FP32.canonical().items() if k != "model_sha256"}
    job_id = _insert_previous_row(stores, {"key": canonical}, None)
    stores.runner.execute(job_id)
    failed = stores.jobs.get(job_id)
    assert failed.status == "failed"
    assert failed.error == "A build job's 'key' lacks the engine key field 'model_sha256'."
