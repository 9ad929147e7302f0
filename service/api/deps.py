"""FastAPI dependencies: reach the running services from a request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import Unauthorized
from service.services import Services
from service.store.owners import LOCAL_PRINCIPAL, Principal


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def current_owner(request: Request) -> str:
    """The owner of what this request creates: the authenticated API key id, or the local owner with
    auth off."""
    return current_principal(request).owner


def current_principal(request: Request) -> Principal:
    """Who asks: the API key (admin or not), or with auth off the one local user, who sees everything.

    Fails closed: with auth on, a request that reached a route without an accepted key is refused.
    """
    key = getattr(request.state, "api_key", None)
    if key is None:
        if request.app.state.services.settings.auth_enabled:
            raise Unauthorized("This endpoint needs an API key.")
        return LOCAL_PRINCIPAL
    return Principal(owner=str(key.id), admin=bool(key.admin))


PrincipalDep = Annotated[Principal, Depends(current_principal)]
