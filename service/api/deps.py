"""FastAPI dependencies: reach the running services from a request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def current_owner(request: Request) -> str | None:
    """The authenticated API key id (set by the auth layer), used as the owner of jobs."""
    owner = getattr(request.state, "api_key_id", None)
    return str(owner) if owner is not None else None
