"""API keys: random tokens, hashed at rest, looked up by hash.

Contract:

- :func:`generate_token` makes a 256-bit URL-safe token with the ``esk_`` prefix (so secret scanners can
  spot a leaked one). The plaintext is returned once, by :meth:`KeyStore.create`, and never stored.
- :func:`hash_token` is the only thing kept: the SHA-256 of the token. Keys are high-entropy random
  tokens, not passwords a person chose, so a slow salted hash (bcrypt, argon2) buys nothing: brute-forcing
  2**256 candidates is out of reach at any speed, while a slow hash would cost tens of milliseconds on
  every request and, being salted, could not be looked up by an index. Keys an operator writes into the
  keys file or the bootstrap setting must be at least :data:`MIN_CONFIGURED_KEY_CHARS` long for the same
  reason.
- :class:`KeyRing` answers "which key is this?" for the HTTP layer: it hashes the presented token and
  looks the digest up (database first, then the keys file). Comparing digests rather than tokens means
  whatever timing the lookup leaks is about the digest, which does not help anyone forge a token; the
  final equality check uses :func:`hmac.compare_digest` anyway.
- Unknown and revoked keys get the same :class:`~service.errors.Unauthorized` message, so a client can
  never learn whether a key exists.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from service.errors import BadInput, NotFound, Unauthorized
from service.store.clock import utc_now
from service.store.db import Database

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "esk_"
MIN_CONFIGURED_KEY_CHARS = 20
# Longer than any key we issue or accept from configuration; longer headers are rejected unhashed.
MAX_PRESENTED_KEY_CHARS = 512
MAX_NAME_CHARS = 100
BOOTSTRAP_KEY_ID = "bootstrap"

MISSING_KEY_MESSAGE = (
    "This endpoint needs an API key: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'."
)
REJECTED_KEY_MESSAGE = (
    "The API key was not accepted. Check that it was copied whole, or ask the operator for a valid key."
)

KeySource = Literal["database", "file"]


class KeyConfigError(ValueError):
    """The keys file or the bootstrap key in the settings cannot be used; the server refuses to start."""


@dataclass(frozen=True)
class ApiKey:
    """A key's identity and limits; never its token."""

    id: str
    name: str
    source: KeySource
    max_upload_bytes: int | None = None
    max_concurrent_jobs: int | None = None
    revoked: bool = False
    created_at: str | None = None
    # An admin key sees and manages every key's models, sets, engines, jobs and reports.
    admin: bool = False

    def upload_limit(self, default: int) -> int:
        """The key's own upload limit when it has one (higher or lower than ``default``), else ``default``."""
        return self.max_upload_bytes if self.max_upload_bytes is not None else default

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "max_upload_bytes": self.max_upload_bytes,
            "max_concurrent_jobs": self.max_concurrent_jobs,
            "revoked": self.revoked,
            "created_at": self.created_at,
            "admin": self.admin,
        }


@dataclass(frozen=True)
class IssuedKey:
    """A newly created key with its plaintext token: the only time the token exists outside the client."""

    key: ApiKey
    token: str = field(repr=False)


@dataclass(frozen=True)
class ConfiguredKey:
    """One key from the keys file or the bootstrap setting."""

    name: str
    token: str = field(repr=False)


def generate_token() -> str:
    """A new random API key (256 bits from the OS CSPRNG)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The digest stored and looked up in place of the token (see the module docstring for why SHA-256)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _row_to_key(row: Any) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        source="database",
        max_upload_bytes=row["max_upload_bytes"],
        max_concurrent_jobs=row["max_concurrent_jobs"],
        revoked=bool(row["revoked"]),
        created_at=row["created_at"],
        admin=bool(row["admin"]),
    )


def _check_limits(max_upload_bytes: int | None, max_concurrent_jobs: int | None) -> None:
    if max_upload_bytes is not None and max_upload_bytes <= 0:
        raise BadInput(f"max_upload_bytes must be a positive number of bytes, not {max_upload_bytes}.")
    if max_concurrent_jobs is not None and max_concurrent_jobs < 1:
        raise BadInput(f"max_concurrent_jobs must be at least 1, not {max_concurrent_jobs}.")


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise BadInput(f"A key name must be 1 to {MAX_NAME_CHARS} printable characters, got {name!r}.")
    return name


def _check_configured_token(token: str, where: str) -> None:
    if len(token) < MIN_CONFIGURED_KEY_CHARS or any(ch.isspace() for ch in token) or not token.isprintable():
        raise KeyConfigError(
            f"The API key in {where} must be at least {MIN_CONFIGURED_KEY_CHARS} printable characters "
            "without spaces; generate one with `engine-service keys create` or "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
        )


class KeyStore:
    """API key rows in the database (keys created with the CLI, and the seeded bootstrap key)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        name: str,
        *,
        max_upload_bytes: int | None = None,
        max_concurrent_jobs: int | None = None,
        admin: bool = False,
    ) -> IssuedKey:
        """Store a new key and return it with its token (shown once; only the hash is kept).

        An ``admin`` key sees every key's resources; any other key sees only what it made or uploaded.
        """
        name = _check_name(name)
        _check_limits(max_upload_bytes, max_concurrent_jobs)
        token = generate_token()
        key_id = "key_" + secrets.token_hex(8)
        self.db.execute(
            "INSERT INTO api_keys (id, name, key_hash, max_upload_bytes, max_concurrent_jobs, revoked, "
            "created_at, admin) VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
            (key_id, name, hash_token(token), max_upload_bytes, max_concurrent_jobs, utc_now(), int(admin)),
        )
        return IssuedKey(key=self.get(key_id), token=token)

    def get(self, key_id: str) -> ApiKey:
        row = self.db.query_one("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        if row is None:
            raise NotFound(f"No API key with id '{key_id}'; `engine-service keys list` shows the ids.")
        return _row_to_key(row)

    def list(self, *, include_revoked: bool = True) -> list[ApiKey]:
        sql = "SELECT * FROM api_keys" + ("" if include_revoked else " WHERE revoked = 0")
        return [_row_to_key(row) for row in self.db.query(sql + " ORDER BY created_at, id")]

    def revoke(self, key_id: str) -> ApiKey:
        """Mark a key revoked (idempotent); requests with it are rejected from the next request on."""
        if self.db.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?", (key_id,)) == 0:
            self.get(key_id)  # raises NotFound with the helpful message
        return self.get(key_id)

    def find_by_hash(self, key_hash: str) -> ApiKey | None:
        row = self.db.query_one("SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,))
        if row is None or not hmac.compare_digest(str(row["key_hash"]), key_hash):
            return None
        return _row_to_key(row)

    def count_usable(self) -> int:
        row = self.db.query_one("SELECT COUNT(*) FROM api_keys WHERE revoked = 0")
        return int(row[0]) if row else 0

    def seed_bootstrap(self, token: str) -> ApiKey:
        """Make the configured bootstrap key usable (idempotent across restarts).

        Same token as last start: the row is left alone, so a bootstrap key revoked with the CLI stays
        revoked. A different token: the ``bootstrap`` row takes the new hash and is active again, so
        rotating the setting retires the old key. A token that is already another key's: left to that key.
        """
        _check_configured_token(token, "ENGINE_SERVICE_BOOTSTRAP_API_KEY")
        digest = hash_token(token)
        with self.db.transaction() as conn:
            owner = conn.execute("SELECT * FROM api_keys WHERE key_hash = ?", (digest,)).fetchone()
            if owner is not None:
                if owner["id"] != BOOTSTRAP_KEY_ID:
                    logger.warning(
                        "the bootstrap key is already stored as key %s; left as it is", owner["id"]
                    )
                return _row_to_key(owner)
            existing = conn.execute("SELECT id FROM api_keys WHERE id = ?", (BOOTSTRAP_KEY_ID,)).fetchone()
            if existing is not None:
                conn.execute(
                    "UPDATE api_keys SET key_hash = ?, revoked = 0 WHERE id = ?", (digest, BOOTSTRAP_KEY_ID)
                )
                logger.info("the bootstrap API key changed; the previous one no longer works")
            else:
                conn.execute(
                    "INSERT INTO api_keys (id, name, key_hash, revoked, created_at) VALUES (?, ?, ?, 0, ?)",
                    (BOOTSTRAP_KEY_ID, "bootstrap", digest, utc_now()),
                )
            row = conn.execute("SELECT * FROM api_keys WHERE id = ?", (BOOTSTRAP_KEY_ID,)).fetchone()
        return _row_to_key(row)


def read_key_file(path: Path) -> list[ConfiguredKey]:
    """Parse a keys file: one key per line, or ``name:key``; blank lines and ``#`` comments are skipped.

    A line is split at its first colon, so a key that itself contains a colon must be written with a name.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyConfigError(f"Cannot read the API keys file {path}: {exc.strerror or exc}.") from exc
    keys: list[ConfiguredKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        name, token = (name.strip(), token.strip()) if sep else (f"{path.name}:{number}", name)
        if not name:
            raise KeyConfigError(
                f"{path}:{number}: the name before ':' is empty; write 'name:key' or the key."
            )
        _check_configured_token(token, f"{path}:{number}")
        keys.append(ConfiguredKey(name=name, token=token))
    return keys


class KeyRing:
    """Every key the server accepts: database rows first, then the keys read from the keys file.

    The database is consulted on every request (one indexed lookup), so keys created or revoked by the
    CLI in another process take effect at once. Keys from the file live in memory; their id is derived
    from their hash so it stays the same across restarts and edits of the file (it is the owner of their
    jobs). A file key whose token is also a revoked database row is rejected: revocation wins.
    """

    def __init__(self, store: KeyStore, file_keys: Sequence[ConfiguredKey] = ()) -> None:
        self.store = store
        self._file_keys: dict[str, ApiKey] = {}
        for configured in file_keys:
            digest = hash_token(configured.token)
            if digest in self._file_keys:
                logger.warning(
                    "API key '%s' repeats an earlier key of the keys file; ignored", configured.name
                )
                continue
            self._file_keys[digest] = ApiKey(id=f"file-{digest[:12]}", name=configured.name, source="file")

    @classmethod
    def open(cls, db: Database, *, bootstrap_token: str | None, key_file: Path | None) -> KeyRing:
        """Seed the bootstrap key and read the keys file; raises KeyConfigError when either is unusable."""
        store = KeyStore(db)
        if bootstrap_token is not None:
            store.seed_bootstrap(bootstrap_token)
        ring = cls(store, read_key_file(key_file) if key_file is not None else ())
        if ring.usable_count() == 0:
            logger.warning(
                "authentication is enabled but no API key exists: every request will get 401. "
                "Create one with `engine-service keys create --name NAME`."
            )
        return ring

    def usable_count(self) -> int:
        return self.store.count_usable() + len(self._file_keys)

    def file_keys(self) -> list[ApiKey]:
        return list(self._file_keys.values())

    def authenticate(self, token: str | None) -> ApiKey:
        """The key a request presented; raises Unauthorized (same message for unknown and revoked)."""
        if not token:
            raise Unauthorized(MISSING_KEY_MESSAGE)
        if len(token) > MAX_PRESENTED_KEY_CHARS:
            raise Unauthorized(REJECTED_KEY_MESSAGE)
        digest = hash_token(token)
        key = self.store.find_by_hash(digest) or self._file_keys.get(digest)
        if key is None or key.revoked:
            raise Unauthorized(REJECTED_KEY_MESSAGE)
        return key

    def job_limit(self, key_id: str) -> int | None:
        """The key's own concurrent-job limit, or None to use the server-wide one."""
        if key_id.startswith("file-"):
            return None
        try:
            return self.store.get(key_id).max_concurrent_jobs
        except NotFound:
            return None
