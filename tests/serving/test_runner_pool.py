"""The runner pool: warm runners loaded once, shared, evicted least-recently-used, closed safely."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from service.backends.base import Availability, BackendInfo, BuildSpec, BuiltEngine, Runner
from service.backends.registry import get_backend
from service.errors import BackendUnavailable, EngineNotRunnableHere, NotFound
from service.serving.runner_pool import MIN_FOOTPRINT_BYTES, RunnerPool, estimate_footprint
from tests.model_factory import model_bytes, resnet_block_classifier, two_input_adder
from tests.serving.engines import Stores, build_engine, open_stores


class SlowLoadingBackend:
    """The real ONNX Runtime backend, with loads counted and slowed so concurrent first requests overlap."""

    def __init__(self, delay_s: float = 0.2) -> None:
        self.inner = get_backend("onnxruntime")
        self.name = self.inner.name
        self.delay_s = delay_s
        self.loads = 0

    def available(self) -> Availability:
        return self.inner.available()

    def describe(self) -> BackendInfo:
        return self.inner.describe()

    def build(self, model: bytes, spec: BuildSpec) -> BuiltEngine:
        return self.inner.build(model, spec)

    def load(self, engine_bytes: bytes) -> Runner:
        self.loads += 1
        time.sleep(self.delay_s)
        return self.inner.load(engine_bytes)


@pytest.fixture
def stores(tmp_path: Path) -> Stores:
    return open_stores(tmp_path)


def _image(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, 16, 16)).astype(np.float32)


def test_a_lease_gives_a_runner_whose_outputs_match_onnx_runtime(stores: Stores) -> None:
    model = resnet_block_classifier(seed=3)
    record = build_engine(stores, model)
    pool = RunnerPool(stores.engines, budget_bytes=1 << 30)
    with pool.lease(record.id) as runner:
        got = runner.infer({"input": _image()})["logits"]
    expected = onnxruntime.InferenceSession(model_bytes(model)).run(["logits"], {"input": _image()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    with pool.lease(record.id):
        pass
    stats = pool.stats()
    assert (stats.loads, stats.hits) == (1, 1)
    assert [r.engine_id for r in stats.runners] == [record.id]
    assert stats.runners[0].leases == 0 and stats.used_bytes == estimate_footprint(
        record.size_bytes, "onnxruntime"
    )


def test_concurrent_first_requests_share_one_load(stores: Stores) -> None:
    record = build_engine(stores, resnet_block_classifier(seed=4))
    backend = SlowLoadingBackend()
    pool = RunnerPool(stores.engines, budget_bytes=1 << 30, backend_for=lambda name: backend)
    start = threading.Barrier(6)

    def infer() -> np.ndarray:
        start.wait()
        with pool.lease(record.id) as runner:
            return runner.infer({"input": _image(1)})["logits"]

    with ThreadPoolExecutor(6) as executor:
        results = list(executor.map(lambda _: infer(), range(6)))
    assert backend.loads == 1
    assert pool.stats().loads == 1 and pool.stats().hits == 5
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_a_failed_load_reaches_every_waiter_and_is_retried_on_the_next_request(stores: Stores) -> None:
    pool = RunnerPool(stores.engines, budget_bytes=1 << 30)
    with pytest.raises(NotFound, match="No engine with id 'nope'"), pool.lease("nope"):
        pass
    assert pool.stats().runners == ()
    record = build_engine(stores, resnet_block_classifier(seed=5))
    with pool.lease(record.id) as runner:
        assert runner.outputs[0].name == "logits"


def test_least_recently_used_idle_runners_are_unloaded_to_fit_the_budget(stores: Stores) -> None:
    first = build_engine(stores, resnet_block_classifier(seed=6))
    second = build_engine(stores, two_input_adder())
    pool = RunnerPool(stores.engines, budget_bytes=MIN_FOOTPRINT_BYTES + 1)  # room for one small runner
    with pool.lease(first.id) as kept:
        pass
    with pool.lease(second.id):
        pass
    stats = pool.stats()
    assert [r.engine_id for r in stats.runners] == [second.id]
    assert stats.evictions == 1
    with pytest.raises(BackendUnavailable, match="closed"):
        kept.infer({"input": _image(1)})


def test_a_runner_in_use_is_never_unloaded_under_it(stores: Stores) -> None:
    first = build_engine(stores, resnet_block_classifier(seed=7))
    second = build_engine(stores, two_input_adder())
    pool = RunnerPool(stores.engines, budget_bytes=MIN_FOOTPRINT_BYTES + 1)
    with pool.lease(first.id) as busy:
        with pool.lease(second.id):
            pass
        assert {r.engine_id for r in pool.stats().runners} == {first.id, second.id}  # over budget while busy
        assert busy.infer({"input": _image(1)})["logits"].shape == (1, 10)
    assert [r.engine_id for r in pool.stats().runners] == [first.id]


def test_discarding_a_leased_runner_closes_it_when_the_lease_ends(stores: Stores) -> None:
    record = build_engine(stores, resnet_block_classifier(seed=8))
    pool = RunnerPool(stores.engines, budget_bytes=1 << 30)
    with pool.lease(record.id) as runner:
        assert pool.discard(record.id) is True
        assert runner.infer({"input": _image(1)})["logits"].shape == (1, 10)
    with pytest.raises(BackendUnavailable, match="closed"):
        runner.infer({"input": _image(1)})
    assert pool.discard(record.id) is False


def test_a_closed_pool_closes_its_runners_and_refuses_leases(stores: Stores) -> None:
    record = build_engine(stores, resnet_block_classifier(seed=9))
    pool = RunnerPool(stores.engines, budget_bytes=1 << 30)
    with pool.lease(record.id) as runner:
        pass
    pool.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        runner.infer({"input": _image(1)})
    with pytest.raises(BackendUnavailable, match="shutting down"), pool.lease(record.id):
        pass


def test_an_engine_that_cannot_run_here_names_the_engine_of_the_same_model_that_can(stores: Stores) -> None:
    if get_backend("tensorrt-rtx").available().can_run:
        pytest.skip("this host can run TensorRT-RTX engines")
    model = resnet_block_classifier(seed=10)
    rtx = build_engine(stores, model, backend="tensorrt-rtx")
    pool = RunnerPool(stores.engines, budget_bytes=1 << 30)
    with (
        pytest.raises(EngineNotRunnableHere, match="No engine of this model runs here yet") as none_yet,
        pool.lease(rtx.id),
    ):
        pass
    assert none_yet.value.details["suggested_build"] == {
        "model_id": rtx.model_id,
        "backend": "onnxruntime",
        "precision": "fp32",
    }
    portable = build_engine(stores, model)
    with (
        pytest.raises(
            EngineNotRunnableHere, match=f"Engine {portable.id} \\(fp32, onnxruntime\\) of the same model"
        ),
        pool.lease(rtx.id),
    ):
        pass
    assert pool.stats().runners == ()


def test_footprints_scale_with_engine_size_per_backend_with_a_floor() -> None:
    assert estimate_footprint(100 << 20, "onnxruntime") == 300 << 20
    assert estimate_footprint(100 << 20, "tensorrt") == 200 << 20
    assert estimate_footprint(100 << 20, "something-new") == 300 << 20
    assert estimate_footprint(1000, "tensorrt-rtx") == MIN_FOOTPRINT_BYTES


def test_threads_sharing_one_runner_get_consistent_results(stores: Stores) -> None:
    record = build_engine(stores, resnet_block_classifier(seed=11))
    pool = RunnerPool(stores.engines, budget_bytes=1 << 30)
    inputs = [_image(1) + i for i in range(8)]
    with pool.lease(record.id) as runner:
        serial = [runner.infer({"input": x})["logits"] for x in inputs]
        with ThreadPoolExecutor(4) as executor:
            parallel = list(executor.map(lambda x: runner.infer({"input": x})["logits"], inputs))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


class RuntimeCachingBackend(SlowLoadingBackend):
    """ONNX Runtime standing in for TensorRT-RTX: records where the pool asks it to keep a runtime cache."""

    def __init__(self) -> None:
        super().__init__(delay_s=0.0)
        self.cache_files: list[Path] = []

    def load_with_runtime_cache(self, engine_bytes: bytes, cache_file: Path) -> Runner:
        self.cache_files.append(cache_file)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_bytes(b"compiled kernels")  # what the TensorRT-RTX runner writes after a call
        return self.inner.load(engine_bytes)


def test_a_runtime_cache_backend_keeps_one_cache_per_engine_in_the_engine_cache(stores: Stores) -> None:
    record = build_engine(stores, resnet_block_classifier(seed=8))
    backend = RuntimeCachingBackend()
    pool = RunnerPool(stores.engines, budget_bytes=1 << 30, backend_for=lambda name: backend)
    with pool.lease(record.id):
        pass
    expected = stores.engines.runtime_cache_file(record.id)
    assert backend.cache_files == [expected] and backend.loads == 0
    assert expected.parent.parent == stores.engines.plans.root.parent  # under the engines dir
    assert expected.exists()
    pool.close()
    stores.engines.delete(record.id)
    assert not expected.exists()  # the cache leaves with its engine
