"""The `engine-service` command: run the server (and, via `client`, talk to one)."""

from __future__ import annotations

import typer

app = typer.Typer(help="TensorRT INT8/FP16 engine-building service.", no_args_is_help=True)


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Bind address (default from ENGINE_SERVICE_HOST or 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (default from ENGINE_SERVICE_PORT or 8000)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Start the HTTP server with settings from the environment."""
    import uvicorn

    from service.app import create_app
    from service.config import get_settings

    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    app()
