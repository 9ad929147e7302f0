"""The FastAPI application factory and its lifespan.

``create_app(settings)`` builds an app whose lifespan opens storage, reconciles it with what a
previous process left behind, starts the job runner, and closes everything at shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import __version__
from service.api import (
    build_targets,
    builds,
    calibration_sets,
    engines,
    health,
    inference,
    models,
    quantizations,
    reports,
    triton,
    workers,
)
from service.api.auth import install_auth
from service.api.body_limits import install_body_limits
from service.api.docs import install_docs
from service.api.errors import install_error_handlers
from service.api.middleware import install_observability
from service.backends.cuda_device import release_devices
from service.config import Settings, get_settings
from service.observability.logging import configure_logging
from service.services import open_services


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(  # [observability]
            settings.log_level, json_lines=settings.log_json, file=settings.log_file
        )
        services = open_services(settings)
        app.state.services = services
        services.start()
        try:
            yield
        finally:
            services.close()  # closes the warm runners first: their GPU memory needs the context
            release_devices()  # then the CUDA primary contexts retained by this process

    app = FastAPI(
        title="Engine Service",
        version=__version__,
        description="TensorRT INT8/FP16 engine building: calibration, Q/DQ quantization, verified fusions, "
        "engine cache, inference and reports.",
        lifespan=lifespan,
        docs_url=None,  # replaced by install_docs: the same pages with assets served from here
        redoc_url=None,
    )
    install_docs(app)
    install_error_handlers(app)
    for router in (
        health.router,
        models.router,
        calibration_sets.router,
        builds.router,
        build_targets.router,
        engines.router,
        quantizations.router,
        triton.router,
        inference.router,
        reports.router,
        workers.router,
    ):
        app.include_router(router)
    # [auth][observability] the middlewares cover every route, also routers added later; observability
    # is added after auth so that it is the outermost and sees (and logs) the answers auth gives itself.
    # Innermost of the middlewares: only requests auth let through spend the body budget.
    install_body_limits(app, settings)
    install_auth(app, settings)
    install_observability(app)
    return app
