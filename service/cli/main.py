"""The `engine-service` command: run the server or a worker, manage keys, and talk to a server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from service.cli.client import client_app

if TYPE_CHECKING:  # [auth] the CLI imports its work lazily so `--help` stays fast
    from service.auth.keys import KeyStore
    from service.errors import ServiceError

app = typer.Typer(help="TensorRT INT8/FP16 engine-building service.", no_args_is_help=True)


@app.command()
def serve(
    host: str | None = typer.Option(
        None, help="Bind address (default from ENGINE_SERVICE_HOST or 127.0.0.1)."
    ),
    port: int | None = typer.Option(None, help="Port (default from ENGINE_SERVICE_PORT or 8000)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Start the HTTP server with settings from the environment."""
    import uvicorn

    from service.app import create_app
    from service.config import get_settings
    from service.observability.allocator import limit_malloc_arenas

    settings = get_settings()
    limit_malloc_arenas(settings.malloc_arena_max)  # before the thread pools start allocating
    if settings.private_data:  # this process writes the service's data: every file 0600, folder 0700
        from service.store.file_modes import private_umask

        private_umask()
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=30,
    )


@app.command()
def worker(
    backend: Annotated[
        list[str] | None,
        typer.Option(
            help="Serve only this backend (repeatable); default: every backend that can build here."
        ),
    ] = None,
    generic: bool = typer.Option(
        True, "--generic/--no-generic", help="Also run untargeted jobs (quantization)."
    ),
    burst: bool = typer.Option(False, help="Exit once the queues are empty instead of waiting for jobs."),
    grace_seconds: float = typer.Option(
        240.0, help="On SIGTERM, how long the running job may take to finish."
    ),
    name: str | None = typer.Option(None, help="Worker name shown in Redis and job logs (default: random)."),
    api_url: str | None = typer.Option(
        None,
        help="On another host than the API server: its URL (or ENGINE_SERVICE_API_URL). The worker then "
        "opens no database; it needs ENGINE_SERVICE_WORKER_TOKEN and runs build jobs only.",
    ),
) -> None:
    """Run jobs from Redis for the targets this host can build (needs ENGINE_SERVICE_QUEUE_BACKEND=redis)."""
    try:
        from service.cli.worker import run_worker
    except ImportError as exc:  # rq and redis are the optional 'redis' extra
        typer.echo(
            f"error: the worker needs the 'redis' extra (pip install 'engine-service[redis]'): {exc}",
            err=True,
        )
        raise typer.Exit(code=2) from exc

    from service.config import get_settings
    from service.observability.allocator import limit_malloc_arenas

    limit_malloc_arenas(get_settings().malloc_arena_max)
    code = run_worker(
        backends=backend or [],
        generic=generic,
        burst=burst,
        grace_seconds=grace_seconds,
        name=name,
        api_url=api_url,
    )
    raise typer.Exit(code=code)


# [auth] `engine-service keys ...`: API keys in the service database (the server sees changes at once).
keys_app = typer.Typer(help="Create, list and revoke API keys (stored hashed).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _key_store() -> KeyStore:
    from service.auth.keys import KeyStore
    from service.config import get_settings
    from service.store.db import Database

    return KeyStore(Database(get_settings().database_path))


def _fail(exc: ServiceError) -> typer.Exit:
    typer.echo(f"error: {exc.message}", err=True)
    return typer.Exit(code=1)


@keys_app.command("create")
def create_key(
    name: str = typer.Option(..., help="Who or what the key is for (shown in listings and logs)."),
    max_upload_bytes: int | None = typer.Option(
        None, min=1, help="This key's upload limit in bytes; replaces ENGINE_SERVICE_MAX_UPLOAD_BYTES."
    ),
    max_concurrent_jobs: int | None = typer.Option(
        None, min=1, help="This key's queued+running job limit; replaces the server-wide one."
    ),
    admin: bool = typer.Option(
        False, "--admin", help="An admin key sees and manages every key's models, sets, engines and jobs."
    ),
) -> None:
    """Create a key and print it once on stdout (only its hash is stored: keep it now)."""
    from service.errors import ServiceError

    store = _key_store()
    try:
        issued = store.create(
            name, max_upload_bytes=max_upload_bytes, max_concurrent_jobs=max_concurrent_jobs, admin=admin
        )
    except ServiceError as exc:
        raise _fail(exc) from exc
    finally:
        store.db.close()
    role = "admin " if issued.key.admin else ""
    typer.echo(
        f"created {role}API key {issued.key.id} ({issued.key.name}); it is shown only this once:", err=True
    )
    typer.echo(issued.token)


@keys_app.command("list")
def list_keys(as_json: bool = typer.Option(False, "--json", help="A JSON array instead of a table.")) -> None:
    """List keys (ids, names, limits, revoked); never the keys themselves."""
    import json

    store = _key_store()
    try:
        keys = store.list()
    finally:
        store.db.close()
    if as_json:
        typer.echo(json.dumps([key.to_dict() for key in keys], indent=2))
        return
    typer.echo(f"{'ID':<22} {'NAME':<24} {'UPLOAD LIMIT':>14} {'JOB LIMIT':>9} {'STATE':<8} CREATED")
    for key in keys:
        upload = "-" if key.max_upload_bytes is None else str(key.max_upload_bytes)
        jobs = "-" if key.max_concurrent_jobs is None else str(key.max_concurrent_jobs)
        state = "revoked" if key.revoked else ("admin" if key.admin else "active")
        created = key.created_at or "-"
        typer.echo(f"{key.id:<22} {key.name[:24]:<24} {upload:>14} {jobs:>9} {state:<8} {created}")


@keys_app.command("revoke")
def revoke_key(key_id: str = typer.Argument(..., help="The key id from `engine-service keys list`.")) -> None:
    """Revoke a key: requests with it get 401 from the next request on."""
    from service.errors import ServiceError

    store = _key_store()
    try:
        key = store.revoke(key_id)
    except ServiceError as exc:
        raise _fail(exc) from exc
    finally:
        store.db.close()
    typer.echo(f"revoked API key {key.id} ({key.name})")


@keys_app.command("adopt-local")
def adopt_local(
    key_id: str = typer.Argument(..., help="The key id from `engine-service keys list`."),
) -> None:
    """Give a key everything the local owner holds: the data from before auth was on (or before
    schema 4), which otherwise only admin keys see. The local owner keeps its links too."""
    from service.errors import ServiceError
    from service.store.owners import LOCAL_OWNER, Ownership

    store = _key_store()
    try:
        key = store.get(key_id)
        shared = Ownership(store.db).share_all(LOCAL_OWNER, key.id)
    except ServiceError as exc:
        raise _fail(exc) from exc
    finally:
        store.db.close()
    typer.echo(
        f"API key {key.id} ({key.name}) now holds {shared} more model(s), set(s), engine(s) and job(s)"
    )


# [client] build|infer|benchmark|models|... talk to a server; `local build` runs without one.
app.add_typer(client_app)


if __name__ == "__main__":
    app()
