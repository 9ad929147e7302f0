"""Inference serving: warm runners (``runner_pool``), input checks (``validation``), wire formats
(``codecs``).

:func:`register` creates the service's one :class:`RunnerPool` at start-up and puts it in
``services.extras["runner_pool"]``, where the inference and report routers find it; the pool is closed
with the other extras at shutdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.services import Services
    from service.serving.runner_pool import RunnerPool

RUNNER_POOL = "runner_pool"


def register(services: Services) -> RunnerPool:
    """The services' runner pool, created on first call (idempotent), sized by ``runner_cache_bytes``."""
    from service.serving.runner_pool import RunnerPool

    existing = services.extras.get(RUNNER_POOL)
    if isinstance(existing, RunnerPool):
        return existing
    pool = RunnerPool(services.engines, budget_bytes=services.settings.runner_cache_bytes)
    services.extras[RUNNER_POOL] = pool
    services.engines.add_drop_listener(pool.discard)  # a deleted or evicted engine is never served warm
    services.metrics.set_loaded_runners_source(lambda: float(len(pool.stats().runners)))
    return pool
