"""The engine cache: keys, verified reads, LRU eviction, reconciliation with the files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.backends.base import BackendInfo, ShapeRange
from service.catalog.engine_keys import BuildConfig, CalibrationOptions, EngineKey
from service.catalog.engines import CorruptEngine, EngineCache, NewEngine
from service.store.db import Database
from service.store.quarantine import quarantined

RTX = BackendInfo(
    name="tensorrt-rtx", version="1.7.1.116", device="ahead-of-time (no GPU)", compute_capability="sm_89"
)


def _key(model: str = "a" * 64, precision: str = "fp32", **kw: object) -> EngineKey:
    return EngineKey(
        model_id=model,
        config=BuildConfig(precision=precision, **kw),
        calibration_set_id=None,  # type: ignore[arg-type]
        backend=RTX,
    )


def _new(key: EngineKey, payload: bytes) -> NewEngine:
    return NewEngine(
        key=key,
        built_model_id=key.model_id,
        engine_bytes=payload,
        file_extension=".plan",
        build_seconds=1.5,
        report={"layer_counts": {"fp32": 3}},
    )


@pytest.fixture
def cache(tmp_path: Path) -> EngineCache:
    return EngineCache(Database(tmp_path / "db.sqlite"), tmp_path / "engines", budget_bytes=10_000)


def test_the_key_is_stable_and_separates_what_can_change_the_engine() -> None:
    base = _key()
    assert base.digest == _key().digest
    shapes = (("x", ShapeRange((1, 3), (4, 3), (8, 3))),)
    variants = [
        _key(model="b" * 64),
        _key(precision="fp16"),
        _key(keep=("conv1",)),
        _key(shapes=shapes),
        _key(precision="int8", calibration=CalibrationOptions(method="max")),
        EngineKey(
            model_id="a" * 64, config=BuildConfig(precision="fp32"), calibration_set_id="c" * 64, backend=RTX
        ),
        EngineKey(
            model_id="a" * 64,
            config=BuildConfig(precision="fp32"),
            calibration_set_id=None,
            backend=BackendInfo(name="tensorrt-rtx", version="1.8", device=RTX.device),
        ),
    ]
    digests = {v.digest for v in variants}
    assert len(digests) == len(variants) and base.digest not in digests
    # keep-lists are canonical: order does not matter
    assert _key(keep=("b", "a")).digest == _key(keep=("a", "b")).digest


def test_a_stored_engine_is_found_by_its_key_and_reads_back(cache: EngineCache) -> None:
    key = _key()
    record = cache.store(_new(key, b"plan-bytes"))
    assert record.id == key.digest
    assert cache.lookup(key.digest) is not None
    assert cache.read_plan(record.id) == b"plan-bytes"
    assert record.build_config == key.config


def test_a_damaged_plan_is_never_read_and_is_removed(cache: EngineCache) -> None:
    key = _key()
    record = cache.store(_new(key, b"plan-bytes"))
    cache.plans.path_for(record.plan_sha256).write_bytes(b"plan-bytez")  # same size, other bytes
    assert cache.lookup(key.digest) is not None  # the cheap check cannot see it...
    with pytest.raises(CorruptEngine, match="build it again"):
        cache.read_plan(record.id)  # ...the full check on read does
    assert cache.lookup(key.digest) is None
    assert cache.list() == []


def test_a_truncated_plan_is_a_cache_miss(cache: EngineCache) -> None:
    key = _key()
    record = cache.store(_new(key, b"plan-bytes"))
    cache.plans.path_for(record.plan_sha256).write_bytes(b"plan")
    assert cache.lookup(key.digest) is None
    assert cache.list() == []


def test_least_recently_used_engines_are_evicted_to_fit_the_budget(cache: EngineCache) -> None:
    first, second, third = _key(model="1" * 64), _key(model="2" * 64), _key(model="3" * 64)
    cache.store(_new(first, b"a" * 4000))
    time.sleep(0.01)
    cache.store(_new(second, b"b" * 4000))
    time.sleep(0.01)
    assert cache.lookup(first.digest) is not None  # first becomes most recently used
    time.sleep(0.01)
    cache.store(_new(third, b"c" * 4000))  # 12 000 > 10 000: the LRU one (second) goes
    ids = {r.id for r in cache.list()}
    assert ids == {first.digest, third.digest}
    assert cache.total_bytes() == 8000


def test_reconcile_drops_rows_without_files_and_quarantines_files_without_rows(cache: EngineCache) -> None:
    kept = cache.store(_new(_key(model="4" * 64), b"kept"))
    lost = cache.store(_new(_key(model="5" * 64), b"lost"))
    cache.plans.path_for(lost.plan_sha256).unlink()
    orphan = cache.plans.put_bytes(b"orphan from a crash between file and row")
    assert cache.reconcile() == {"dropped_rows": 1, "quarantined_files": 1}
    assert [r.id for r in cache.list()] == [kept.id]
    assert not cache.plans.exists(orphan.sha256)
    assert [p.read_bytes() for p in quarantined(cache.plans.root)] == [
        b"orphan from a crash between file and row"
    ]


def test_listeners_hear_every_engine_that_leaves_the_cache(cache: EngineCache) -> None:
    dropped: list[str] = []
    cache.add_drop_listener(dropped.append)
    deleted = cache.store(_new(_key(model="6" * 64), b"d" * 100))
    cache.delete(deleted.id)
    first = cache.store(_new(_key(model="7" * 64), b"e" * 6000))
    time.sleep(0.01)
    cache.store(_new(_key(model="8" * 64), b"f" * 6000))  # over budget: the first is evicted
    assert dropped == [deleted.id, first.id]


def test_a_calibration_cache_two_engines_share_stays_until_the_last_one_goes(cache: EngineCache) -> None:
    def with_cache(key: EngineKey, payload: bytes) -> NewEngine:
        return NewEngine(
            key=key,
            built_model_id=key.model_id,
            engine_bytes=payload,
            file_extension=".plan",
            build_seconds=1.0,
            report={},
            calibration_cache=b"TRT-8601-EntropyCalibration2\ninput: 3c010a14\n",
        )

    first = cache.store(with_cache(_key(model="9" * 64, precision="int8"), b"x" * 100))
    second = cache.store(with_cache(_key(model="a" * 64, precision="int8"), b"y" * 100))
    digest = first.calibration_cache_sha256
    assert digest is not None and digest == second.calibration_cache_sha256
    cache.delete(first.id)
    assert cache.artifacts.exists(digest)  # the other engine still has it
    cache.delete(second.id)
    assert not cache.artifacts.exists(digest)


def test_serving_an_engine_keeps_it_off_the_lru_end_with_few_writes(cache: EngineCache) -> None:
    served = cache.store(_new(_key(model="b" * 64), b"s" * 4000))
    time.sleep(0.01)
    idle = cache.store(_new(_key(model="c" * 64), b"i" * 4000))
    cache._touched.clear()  # as after a restart: the first use is always recorded
    time.sleep(0.01)  # timestamps have millisecond resolution
    cache.note_use(served.id)
    recorded = cache.get(served.id).last_used_at
    assert recorded > idle.last_used_at
    cache.note_use(served.id)  # within the interval: no second write
    assert cache.get(served.id).last_used_at == recorded
    cache.store(_new(_key(model="d" * 64), b"n" * 4000))  # over budget: the idle one goes, not the served one
    assert {r.id for r in cache.list()} >= {served.id} and idle.id not in {r.id for r in cache.list()}
