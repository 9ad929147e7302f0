"""Warm runners: each engine loaded once, shared by requests, kept within a memory budget.

``with pool.lease(engine_id) as runner:`` hands out the engine's loaded :class:`Runner`, loading it
on first use. Loading is single-flight: concurrent first requests for one engine wait for one load
and share its result (or its error). A runner is never closed while a lease on it is open; evicting
or discarding a leased runner retires it, and the last lease to end closes it.

Memory budget (``Settings.runner_cache_bytes``) is approximate, because no backend reports what a
loaded engine really holds. A runner's footprint is estimated as the engine's size times a factor
per backend, with a floor for fixed per-runner overhead:

* ``onnxruntime`` x3: the session keeps its own copy of the weights, the CPU provider pre-packs
  Conv/Gemm/MatMul weights into a second layout, and the activation arena comes on top;
* ``tensorrt`` / ``tensorrt-rtx`` x2: the deserialized engine in device memory plus its activation
  memory (an execution context), which for vision models is of the order of the weights;
* unknown backends x3; every runner at least 16 MiB (thread pools, contexts, bindings).

After each load, least-recently-used idle runners are unloaded until the estimate fits the budget.
A runner whose estimate alone exceeds the budget is still loaded (refusing would make its engine
unservable) and stays warm until another engine needs the room; the service logs a warning.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

from service.backends.base import Runner, RuntimeCacheLoader
from service.catalog.engines import EngineCache
from service.errors import BackendUnavailable
from service.serving.runnable import BackendLookup, default_backend_lookup, require_runnable

logger = logging.getLogger(__name__)

FOOTPRINT_FACTORS: dict[str, float] = {"onnxruntime": 3.0, "tensorrt": 2.0, "tensorrt-rtx": 2.0}
DEFAULT_FOOTPRINT_FACTOR = 3.0
MIN_FOOTPRINT_BYTES = 16 * 1024 * 1024


def estimate_footprint(engine_bytes: int, backend: str) -> int:
    """Approximate bytes a loaded runner holds (see the module docstring for the factors)."""
    factor = FOOTPRINT_FACTORS.get(backend, DEFAULT_FOOTPRINT_FACTOR)
    return max(int(engine_bytes * factor), MIN_FOOTPRINT_BYTES)


@dataclass(frozen=True)
class LoadedRunner:
    """One warm runner as the pool sees it."""

    engine_id: str
    backend: str
    footprint_bytes: int
    leases: int
    load_seconds: float
    idle_seconds: float


@dataclass(frozen=True)
class PoolStats:
    budget_bytes: int
    used_bytes: int
    runners: tuple[LoadedRunner, ...]
    loads: int
    hits: int
    evictions: int


class _Entry:
    """Mutable bookkeeping for one loaded runner; only touched under the pool's lock."""

    def __init__(
        self, engine_id: str, backend: str, runner: Runner, footprint: int, load_seconds: float
    ) -> None:
        self.engine_id = engine_id
        self.backend = backend
        self.runner = runner
        self.footprint = footprint
        self.load_seconds = load_seconds
        self.leases = 0
        self.retired = False
        self.last_used = time.monotonic()


class RunnerPool:
    """Engines' runners, loaded on demand from the engine cache and unloaded least-recently-used."""

    def __init__(
        self, engines: EngineCache, *, budget_bytes: int, backend_for: BackendLookup | None = None
    ) -> None:
        self.engines = engines
        self.budget_bytes = budget_bytes
        self.backend_for: BackendLookup = backend_for or default_backend_lookup
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._loading: dict[str, Future[None]] = {}
        self._closed = False
        self._loads = 0
        self._hits = 0
        self._evictions = 0

    @contextmanager
    def lease(self, engine_id: str) -> Iterator[Runner]:
        """The engine's runner, held warm and open until the block ends."""
        if engine_id not in self._entries:  # a short id: load (and key) the runner under the full id
            engine_id = self.engines.get(engine_id).id
        entry = self._acquire(engine_id)
        self.engines.note_use(engine_id)  # an engine served warm is in use: keep it off the LRU end
        try:
            yield entry.runner
        finally:
            self._release(entry)

    def _acquire(self, engine_id: str) -> _Entry:
        while True:
            with self._lock:
                self._check_open()
                entry = self._entries.get(engine_id)
                if entry is not None:
                    entry.leases += 1
                    self._entries.move_to_end(engine_id)
                    self._hits += 1
                    return entry
                pending = self._loading.get(engine_id)
                loader = pending is None
                if pending is None:
                    pending = Future()
                    self._loading[engine_id] = pending
            if not loader:
                pending.result()  # re-raises the loader's error; on success take the entry next turn
                continue
            return self._load_as_owner(engine_id, pending)

    def _load_as_owner(self, engine_id: str, pending: Future[None]) -> _Entry:
        try:
            entry = self._load(engine_id)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(engine_id, None)
            pending.set_exception(exc)
            raise
        with self._lock:
            self._loading.pop(engine_id, None)
            if self._closed:
                closing = [entry.runner]
            else:
                entry.leases = 1
                self._entries[engine_id] = entry
                self._loads += 1
                closing = self._evict_locked(keep=engine_id)
        pending.set_result(None)
        self._close_all(closing)
        self._check_open()
        return entry

    def _load(self, engine_id: str) -> _Entry:
        record = self.engines.get(engine_id)
        require_runnable(record, self.engines, self.backend_for)
        backend = self.backend_for(record.backend)
        started = time.perf_counter()
        plan = self.engines.read_plan(engine_id)
        if isinstance(backend, RuntimeCacheLoader):  # keep compiled kernels with the engine
            runner = backend.load_with_runtime_cache(plan, self.engines.runtime_cache_file(engine_id))
        else:
            runner = backend.load(plan)
        footprint = estimate_footprint(len(plan), record.backend)
        seconds = time.perf_counter() - started
        if footprint > self.budget_bytes:
            logger.warning(
                "engine %s needs about %d MiB as a warm runner, more than the whole runner budget of %d MiB "
                "(ENGINE_SERVICE_RUNNER_CACHE_BYTES); it is loaded alone",
                engine_id,
                footprint >> 20,
                self.budget_bytes >> 20,
            )
        logger.info("loaded %s runner for engine %s in %.2f s", record.backend, engine_id, seconds)
        return _Entry(engine_id, record.backend, runner, footprint, seconds)

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.leases -= 1
            entry.last_used = time.monotonic()
            if entry.retired:
                closing = [entry.runner] if entry.leases == 0 else []
            else:
                closing = self._evict_locked(keep=entry.engine_id)
        self._close_all(closing)

    def _evict_locked(self, *, keep: str | None) -> list[Runner]:
        """Unload idle runners, least recently used first, until the estimate fits; returns them to close."""
        used = sum(entry.footprint for entry in self._entries.values())
        closing: list[Runner] = []
        for engine_id, entry in list(self._entries.items()):
            if used <= self.budget_bytes:
                break
            if engine_id == keep or entry.leases > 0:
                continue
            del self._entries[engine_id]
            used -= entry.footprint
            self._evictions += 1
            closing.append(entry.runner)
            logger.info("unloaded the runner of engine %s (runner budget)", engine_id)
        return closing

    def discard(self, engine_id: str) -> bool:
        """Unload an engine's runner (its engine was deleted or rebuilt); True when one was loaded."""
        with self._lock:
            entry = self._entries.pop(engine_id, None)
            if entry is None:
                return False
            entry.retired = True
            closing = [entry.runner] if entry.leases == 0 else []
        self._close_all(closing)
        return True

    def stats(self) -> PoolStats:
        now = time.monotonic()
        with self._lock:
            runners = tuple(
                LoadedRunner(
                    engine_id=e.engine_id,
                    backend=e.backend,
                    footprint_bytes=e.footprint,
                    leases=e.leases,
                    load_seconds=round(e.load_seconds, 4),
                    idle_seconds=round(0.0 if e.leases else now - e.last_used, 3),
                )
                for e in self._entries.values()
            )
            return PoolStats(
                budget_bytes=self.budget_bytes,
                used_bytes=sum(r.footprint_bytes for r in runners),
                runners=runners,
                loads=self._loads,
                hits=self._hits,
                evictions=self._evictions,
            )

    def close(self) -> None:
        """Refuse new leases and close every runner (leased ones when their lease ends)."""
        with self._lock:
            self._closed = True
            closing: list[Runner] = []
            for entry in self._entries.values():
                entry.retired = True
                if entry.leases == 0:
                    closing.append(entry.runner)
            self._entries.clear()
        self._close_all(closing)

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable(
                "The service is shutting down and no longer runs inference; retry shortly."
            )

    @staticmethod
    def _close_all(runners: list[Runner]) -> None:
        for runner in runners:
            try:
                runner.close()
            except Exception:  # closing must not stop the others from being released
                logger.exception("closing a runner failed")
