"""Settings: the one typed home for every option.

Values come from the environment (prefix ``ENGINE_SERVICE_``) or a ``.env`` file; defaults give the
embedded quick-start setup: SQLite and local folders under the current directory, CPU backends.
Build settings with :func:`get_settings` (cached) and inject them; nothing reads the environment at import.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# CPU integer classes (see service/backends/cpu_isa.py); defined here, the leaf, so both can import it.
IsaClass = Literal["amx", "avx512-vnni", "avx-vnni", "avx512", "avx2", "arm64", "other"]
GIB = 1024**3
MIB = 1024**2
MIN_WORKER_TOKEN_CHARS = 20


class Settings(BaseSettings):
    """Service configuration. Every field can be set as ``ENGINE_SERVICE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="ENGINE_SERVICE_", env_file=".env", extra="ignore")

    # Data roots. Engines and calibration sets are volumes in compose; models and the DB sit beside them.
    engines_dir: Path = Path("engines")
    calibration_dir: Path = Path("calibration_data")
    models_dir: Path = Path("models")
    database_path: Path = Path("engine_service.db")

    # Database and data files 0600, data directories 0700 (umask 077, and existing files at start).
    # Turn off only where another user must read the volumes (e.g. a sidecar reading engines).
    private_data: bool = True

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    # Uploads and archives. Archive limits count bytes actually inflated, not bytes uploaded:
    # the whole set, one member, and a compressed member's expansion over its compressed size.
    max_upload_bytes: int = Field(default=1 * GIB, gt=0)
    max_archive_members: int = Field(default=100_000, gt=0)
    max_archive_uncompressed_bytes: int = Field(default=8 * GIB, gt=0)
    max_archive_member_bytes: int = Field(default=2 * GIB, gt=0)
    max_archive_expansion_ratio: float = Field(default=200.0, ge=1.0)
    # What image preprocessing may produce (samples x H x W x C x dtype), checked before decoding.
    max_preprocessed_bytes: int = Field(default=4 * GIB, gt=0)
    max_preprocessed_sample_bytes: int = Field(default=256 * MIB, gt=0)
    # Tensors a request may make the server allocate: one input (at /infer and in benchmarks), and
    # all synthetic inputs of one benchmark call.
    max_input_tensor_bytes: int = Field(default=256 * MIB, gt=0)
    max_benchmark_input_bytes: int = Field(default=1 * GIB, gt=0)
    # A JSON /infer body grows about tenfold once parsed into Python numbers; binary bodies do not.
    max_json_infer_bytes: int = Field(default=16 * MIB, gt=0)
    # The JSON body of any other route (builds, benchmarks...): read and capped before it is parsed.
    max_json_body_bytes: int = Field(default=4 * MIB, gt=0)
    # All request bodies held in memory at once (/infer and JSON bodies, times their decoding cost:
    # JSON x10, binary x2); a request that does not fit waits up to inflight_body_wait_s for room,
    # then is answered 429 with Retry-After. Uploads stream to disk and do not count.
    max_inflight_body_bytes: int = Field(default=1 * GIB, gt=0)
    inflight_body_wait_s: float = Field(default=5.0, ge=0.0, le=300.0)

    # What analysing an uploaded model may cost: nodes of its main graph and the graph's bytes without
    # its initializers (parsing and checking cost about 40x those bytes; initializers stay raw).
    max_model_nodes: int = Field(default=100_000, gt=0)
    max_model_graph_bytes: int = Field(default=128 * MIB, gt=0)
    # Names given to models and calibration sets (shown in listings and download headers).
    max_name_chars: int = Field(default=200, ge=1, le=10_000)

    # Engine cache and warm runners.
    engine_cache_bytes: int = Field(default=20 * GIB, gt=0)
    runner_cache_bytes: int = Field(default=2 * GIB, gt=0)
    default_backend: str = "auto"

    # Jobs.
    # Two workers by default so a long benchmark or calibration does not hold every build back.
    job_workers: int = Field(default=2, ge=1, le=64)
    queue_backend: Literal["embedded", "redis"] = "embedded"
    redis_url: str = "redis://127.0.0.1:6379/0"

    # Authentication: off by default for the local quick start, on in the Docker images.
    auth_enabled: bool = False
    api_keys_file: Path | None = None
    bootstrap_api_key: SecretStr | None = None
    # Queued or running jobs one owner may have: each API key with auth on (or the key's own limit),
    # the one local owner with auth off. Over it: 429 with Retry-After.
    max_concurrent_jobs_per_key: int = Field(default=4, ge=1)
    max_queued_jobs_per_owner: int = Field(default=16, ge=1)

    # Remote build workers (other hosts). On the API server, the worker token turns on the internal
    # worker API (/v1/worker/...); a remote worker presents it and reports to ``api_url``.
    worker_token: SecretStr | None = None
    max_worker_upload_bytes: int = Field(default=8 * GIB, gt=0)
    api_url: str | None = None
    worker_cache_dir: Path = Path("worker_cache")
    worker_cache_bytes: int = Field(default=20 * GIB, gt=0)
    # A remote worker beats every 20 s; after this long without a beat its job is failed as lost.
    remote_job_lease_s: float = Field(default=180.0, ge=1.0)
    remote_lease_sweep_s: float = Field(default=30.0, gt=0.0)

    # The CPU integer class ONNX Runtime engines are built for (see service/backends/cpu_isa.py); unset:
    # this host's. Set it to build for a fleet of another class, or to test the 7-bit-weight path.
    cpu_isa: IsaClass | None = None

    # glibc malloc arenas of a serve or worker process (0: glibc's default of 8 per core). Two keep a
    # long-running server's memory flat under mixed load (see service/observability/allocator.py).
    malloc_arena_max: int = Field(default=2, ge=0, le=1024)

    log_level: str = "INFO"
    log_json: bool = False
    # Append the service's log lines to this file instead of stderr (tests keep pytest's output readable).
    log_file: Path | None = None

    @field_validator("worker_token", "api_url", "cpu_isa", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose passes unset variables as empty strings (``${VAR:-}``); empty means "not configured".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    def worker_token_value(self) -> str | None:
        """The worker token, or None when remote workers are off; ValueError when it is too short.

        Checked here rather than in a field validator, whose error message would echo the secret.
        """
        if self.worker_token is None:
            return None
        token = self.worker_token.get_secret_value()
        if len(token) < MIN_WORKER_TOKEN_CHARS:
            raise ValueError(
                f"ENGINE_SERVICE_WORKER_TOKEN must be at least {MIN_WORKER_TOKEN_CHARS} characters "
                "(generate one with `openssl rand -hex 32`)"
            )
        return token

    def ensure_dirs(self) -> None:
        """Create the data roots (idempotent)."""
        for directory in (self.engines_dir, self.calibration_dir, self.models_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.database_path.parent.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
