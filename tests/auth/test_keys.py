"""API keys without HTTP: generation, hashing at rest, bootstrap seeding, the keys file, job limits, CLI."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from service.auth.keys import (
    BOOTSTRAP_KEY_ID,
    MISSING_KEY_MESSAGE,
    REJECTED_KEY_MESSAGE,
    KeyConfigError,
    KeyRing,
    KeyStore,
    generate_token,
    hash_token,
    read_key_file,
)
from service.cli.main import app as cli_app
from service.config import get_settings
from service.errors import BadInput, LimitExceeded, NotFound, Unauthorized
from service.jobs.records import JobStore
from service.jobs.runner import JobContext, JobRunner
from service.store.db import Database
from service.store.owners import LOCAL_OWNER, Ownership, Principal

BOOTSTRAP = "bootstrap-key-for-tests-0123456789"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "keys.db")
    yield database
    database.close()


@pytest.fixture
def store(db: Database) -> KeyStore:
    return KeyStore(db)


def _database_bytes(db: Database) -> bytes:
    """Every byte SQLite wrote for this database: main file, WAL and shared memory."""
    return b"".join(p.read_bytes() for p in db.path.parent.glob(db.path.name + "*") if p.is_file())


def test_created_key_authenticates_and_only_its_hash_is_stored(db: Database, store: KeyStore) -> None:
    issued = store.create("ci", max_upload_bytes=1000, max_concurrent_jobs=2)
    key = KeyRing(store).authenticate(issued.token)
    assert key == issued.key
    assert (key.name, key.max_upload_bytes, key.max_concurrent_jobs, key.revoked) == ("ci", 1000, 2, False)
    row = db.query_one("SELECT key_hash FROM api_keys WHERE id = ?", (key.id,))
    assert row is not None and row["key_hash"] == hash_token(issued.token)
    assert issued.token.encode() not in _database_bytes(db)
    assert issued.token not in repr(issued)


def test_generated_tokens_are_prefixed_long_and_unique() -> None:
    tokens = {generate_token() for _ in range(200)}
    assert len(tokens) == 200
    assert all(t.startswith("esk_") and len(t) >= 40 for t in tokens)


def test_revoked_and_unknown_keys_get_the_same_answer(store: KeyStore) -> None:
    issued = store.create("to-revoke")
    ring = KeyRing(store)
    assert store.revoke(issued.key.id).revoked
    assert store.revoke(issued.key.id).revoked  # idempotent
    with pytest.raises(Unauthorized) as revoked:
        ring.authenticate(issued.token)
    with pytest.raises(Unauthorized) as unknown:
        ring.authenticate(generate_token())
    assert revoked.value.message == unknown.value.message == REJECTED_KEY_MESSAGE


@pytest.mark.parametrize("token", [None, ""])
def test_a_missing_key_is_told_how_to_send_one(store: KeyStore, token: str | None) -> None:
    with pytest.raises(Unauthorized, match="X-API-Key") as error:
        KeyRing(store).authenticate(token)
    assert error.value.message == MISSING_KEY_MESSAGE


def test_an_oversized_key_is_rejected_without_hashing(store: KeyStore) -> None:
    with pytest.raises(Unauthorized, match="not accepted"):
        KeyRing(store).authenticate("x" * 10_000)


@pytest.fixture(scope="module")
def ring_with_one_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KeyRing, str]]:
    database = Database(tmp_path_factory.mktemp("guess") / "keys.db")
    store = KeyStore(database)
    yield KeyRing(store), store.create("target").token
    database.close()


@settings(max_examples=80, deadline=None)
@given(guess=st.text(min_size=1, max_size=80))
def test_no_guess_authenticates_but_the_issued_key(
    ring_with_one_key: tuple[KeyRing, str], guess: str
) -> None:
    ring, token = ring_with_one_key
    assert ring.authenticate(token).name == "target"
    if guess != token:
        with pytest.raises(Unauthorized, match="not accepted"):
            ring.authenticate(guess)


@pytest.mark.parametrize(
    ("name", "limits", "message"),
    [
        ("", {}, "key name must be 1 to 100"),
        ("x" * 101, {}, "key name must be 1 to 100"),
        ("tab\tname", {}, "printable"),
        ("ok", {"max_upload_bytes": 0}, "max_upload_bytes must be a positive"),
        ("ok", {"max_concurrent_jobs": 0}, "max_concurrent_jobs must be at least 1"),
    ],
)
def test_create_rejects_bad_names_and_limits(
    db: Database, store: KeyStore, name: str, limits: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadInput, match=message):
        store.create(name, **limits)
    assert store.list() == []


def test_revoking_an_unknown_id_says_how_to_find_ids(store: KeyStore) -> None:
    with pytest.raises(NotFound, match="keys list"):
        store.revoke("key_does_not_exist")


def test_bootstrap_seeding_is_idempotent(db: Database) -> None:
    first = KeyRing.open(db, bootstrap_token=BOOTSTRAP, key_file=None)
    second = KeyRing.open(db, bootstrap_token=BOOTSTRAP, key_file=None)
    assert [k.id for k in second.store.list()] == [BOOTSTRAP_KEY_ID]
    assert first.authenticate(BOOTSTRAP).id == second.authenticate(BOOTSTRAP).id == BOOTSTRAP_KEY_ID


def test_rotating_the_bootstrap_key_retires_the_old_one(db: Database) -> None:
    KeyRing.open(db, bootstrap_token=BOOTSTRAP, key_file=None)
    ring = KeyRing.open(db, bootstrap_token=BOOTSTRAP + "-rotated", key_file=None)
    assert ring.authenticate(BOOTSTRAP + "-rotated").id == BOOTSTRAP_KEY_ID
    with pytest.raises(Unauthorized):
        ring.authenticate(BOOTSTRAP)
    assert len(ring.store.list()) == 1


def test_a_revoked_bootstrap_key_stays_revoked_after_a_restart(db: Database) -> None:
    ring = KeyRing.open(db, bootstrap_token=BOOTSTRAP, key_file=None)
    ring.store.revoke(BOOTSTRAP_KEY_ID)
    restarted = KeyRing.open(db, bootstrap_token=BOOTSTRAP, key_file=None)
    with pytest.raises(Unauthorized):
        restarted.authenticate(BOOTSTRAP)


@pytest.mark.parametrize("token", ["short", "has a space in the middle 0123456789"])
def test_an_unusable_bootstrap_key_stops_start_up(db: Database, token: str) -> None:
    with pytest.raises(KeyConfigError, match="at least 20 printable characters"):
        KeyRing.open(db, bootstrap_token=token, key_file=None)
    assert KeyStore(db).list() == []


def test_key_file_takes_plain_and_named_lines_and_skips_comments(tmp_path: Path, store: KeyStore) -> None:
    plain, named = generate_token(), generate_token()
    path = tmp_path / "keys.txt"
    path.write_text(f"# operators\n\n{plain}\n  scraper : {named}  \n", encoding="utf-8")
    configured = read_key_file(path)
    assert [(c.name, c.token) for c in configured] == [("keys.txt:3", plain), ("scraper", named)]
    ring = KeyRing(store, configured)
    assert ring.authenticate(named).name == "scraper"
    assert ring.authenticate(plain).source == "file"
    assert ring.usable_count() == 2


def test_file_key_ids_survive_edits_of_the_file(tmp_path: Path, store: KeyStore) -> None:
    token = generate_token()
    path = tmp_path / "keys.txt"
    path.write_text(f"ci:{token}\n", encoding="utf-8")
    before = KeyRing(store, read_key_file(path)).authenticate(token).id
    path.write_text(f"# moved down\nother:{generate_token()}\nci-renamed:{token}\n", encoding="utf-8")
    after = KeyRing(store, read_key_file(path)).authenticate(token).id
    assert before == after == f"file-{hash_token(token)[:12]}"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("tooshort\n", r"keys\.txt:1 must be at least 20"),
        (f"# c\n:{'k' * 30}\n", r"keys\.txt:2: the name before ':' is empty"),
        ("name:short\n", r"keys\.txt:1 must be at least 20"),
    ],
)
def test_key_file_problems_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(KeyConfigError, match=message):
        read_key_file(path)


def test_a_missing_key_file_stops_start_up_with_its_path(tmp_path: Path, db: Database) -> None:
    with pytest.raises(KeyConfigError, match=r"Cannot read the API keys file .*absent\.txt"):
        KeyRing.open(db, bootstrap_token=None, key_file=tmp_path / "absent.txt")


def test_a_revoked_database_row_wins_over_the_same_key_in_the_file(tmp_path: Path, db: Database) -> None:
    KeyRing.open(db, bootstrap_token=BOOTSTRAP, key_file=None)
    KeyStore(db).revoke(BOOTSTRAP_KEY_ID)
    path = tmp_path / "keys.txt"
    path.write_text(f"again:{BOOTSTRAP}\n", encoding="utf-8")
    ring = KeyRing.open(db, bootstrap_token=None, key_file=path)
    with pytest.raises(Unauthorized):
        ring.authenticate(BOOTSTRAP)


def test_job_limit_comes_from_the_key_row(store: KeyStore) -> None:
    limited = store.create("limited", max_concurrent_jobs=3)
    default = store.create("default")
    ring = KeyRing(store)
    assert ring.job_limit(limited.key.id) == 3
    assert ring.job_limit(default.key.id) is None
    assert ring.job_limit("file-0123456789ab") is None
    assert ring.job_limit("key_gone") is None


def test_runner_holds_each_key_to_its_own_concurrent_job_limit(db: Database, store: KeyStore) -> None:
    release = threading.Event()

    def wait(ctx: JobContext) -> dict[str, Any]:
        while not release.wait(0.02):
            ctx.check_cancelled()
        return {}

    ring = KeyRing(store)
    one = store.create("one job", max_concurrent_jobs=1).key.id
    three = store.create("three jobs", max_concurrent_jobs=3).key.id
    default = store.create("server default").key.id
    runner = JobRunner(JobStore(db), workers=1, max_active_per_owner=2, owner_limit=ring.job_limit)
    runner.register("wait", wait)
    runner.start()
    try:
        runner.submit("wait", {}, owner=one)
        with pytest.raises(LimitExceeded, match=r"already has 1 queued or running jobs \(limit 1\)"):
            runner.submit("wait", {}, owner=one)
        for _ in range(3):
            runner.submit("wait", {}, owner=three)  # above the server-wide 2: the key's own 3 applies
        with pytest.raises(LimitExceeded, match=r"\(limit 3\)"):
            runner.submit("wait", {}, owner=three)
        runner.submit("wait", {}, owner=default)
        runner.submit("wait", {}, owner=default)
        with pytest.raises(LimitExceeded, match=r"\(limit 2\)"):
            runner.submit("wait", {}, owner=default)
        assert runner.store.count_active() == 6
    finally:
        release.set()
        runner.stop(grace_seconds=10)


@pytest.fixture
def cli_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    get_settings.cache_clear()
    yield {"ENGINE_SERVICE_DATABASE_PATH": str(tmp_path / "cli.db")}
    get_settings.cache_clear()


def test_cli_prints_a_new_key_once_and_never_lists_it(cli_env: dict[str, str], tmp_path: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(
        cli_app,
        ["keys", "create", "--name", "ci runner", "--max-upload-bytes", "5000", "--max-concurrent-jobs", "2"],
        env=cli_env,
    )
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert token.startswith("esk_") and "\n" not in token
    assert "shown only this once" in created.stderr

    listed = runner.invoke(cli_app, ["keys", "list", "--json"], env=cli_env)
    assert listed.exit_code == 0, listed.output
    (key,) = json.loads(listed.stdout)
    assert (key["name"], key["max_upload_bytes"], key["max_concurrent_jobs"]) == ("ci runner", 5000, 2)
    assert token not in listed.output

    db = Database(tmp_path / "cli.db")
    try:
        assert KeyRing(KeyStore(db)).authenticate(token).id == key["id"]
        revoked = runner.invoke(cli_app, ["keys", "revoke", key["id"]], env=cli_env)
        assert revoked.exit_code == 0 and key["id"] in revoked.stdout
        with pytest.raises(Unauthorized):
            KeyRing(KeyStore(db)).authenticate(token)
        table = runner.invoke(cli_app, ["keys", "list"], env=cli_env)
        assert "revoked" in table.stdout and "ci runner" in table.stdout
    finally:
        db.close()


def test_cli_creates_admin_keys_and_lists_their_role(cli_env: dict[str, str]) -> None:
    runner = CliRunner()
    created = runner.invoke(cli_app, ["keys", "create", "--name", "ops", "--admin"], env=cli_env)
    assert created.exit_code == 0, created.output
    assert "created admin API key" in created.stderr
    plain = runner.invoke(cli_app, ["keys", "create", "--name", "ci"], env=cli_env)
    assert plain.exit_code == 0, plain.output
    listed = json.loads(runner.invoke(cli_app, ["keys", "list", "--json"], env=cli_env).stdout)
    assert {key["name"]: key["admin"] for key in listed} == {"ops": True, "ci": False}
    table = runner.invoke(cli_app, ["keys", "list"], env=cli_env).stdout
    rows = {line.split()[1]: line.split()[-2] for line in table.splitlines()[1:]}
    assert rows == {"ops": "admin", "ci": "active"}


def test_cli_adopt_local_gives_a_key_what_the_local_owner_holds(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    db = Database(tmp_path / "cli.db")
    try:
        for model_id in ("a" * 64, "b" * 64):
            db.execute(
                "INSERT INTO models (id, name, size_bytes, info_json, created_at) "
                "VALUES (?, 'm', 1, '{}', 't')",
                (model_id,),
            )
            Ownership(db).grant("model", model_id, LOCAL_OWNER, name=f"{model_id[0]}.onnx")
        key = KeyStore(db).create("owner of the old data")
    finally:
        db.close()
    runner = CliRunner()
    adopted = runner.invoke(cli_app, ["keys", "adopt-local", key.key.id], env=cli_env)
    assert adopted.exit_code == 0, adopted.output
    assert "now holds 2 more" in adopted.stdout
    db = Database(tmp_path / "cli.db")
    try:
        owners = Ownership(db)
        assert owners.visible_ids("model", Principal(key.key.id)) == {"a" * 64, "b" * 64}
        assert owners.name_for("model", "a" * 64, Principal(key.key.id)) == "a.onnx"
        assert owners.owners("model", "a" * 64) == [key.key.id, LOCAL_OWNER]  # the local owner keeps its own
    finally:
        db.close()
    again = runner.invoke(cli_app, ["keys", "adopt-local", key.key.id], env=cli_env)
    assert "now holds 0 more" in again.stdout
    missing = runner.invoke(cli_app, ["keys", "adopt-local", "key_missing"], env=cli_env)
    assert missing.exit_code == 1 and "No API key with id 'key_missing'" in missing.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "revoke", "key_missing"], "No API key with id 'key_missing'"),
        (["keys", "create", "--name", "   "], "key name must be 1 to 100"),
    ],
)
def test_cli_failures_exit_1_with_the_reason(cli_env: dict[str, str], args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli_app, args, env=cli_env)
    assert result.exit_code == 1
    assert message in result.stderr
