"""Short ids: a unique prefix of at least 8 hex characters names a stored record."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import Conflict
from service.store.db import Database
from service.store.ids import MIN_PREFIX, resolve_id

FIRST = "abcdef0123456789" + "0" * 48
SECOND = "abcdef0199999999" + "1" * 48
OTHER = "1234567890abcdef" + "2" * 48


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "meta.db")
    for model_id in (FIRST, SECOND, OTHER):
        database.execute(
            "INSERT INTO models (id, name, size_bytes, info_json, created_at) VALUES (?, 'm', 1, '{}', 't')",
            (model_id,),
        )
    return database


def test_an_exact_id_is_returned_as_it_is(db: Database) -> None:
    assert resolve_id(db, "models", FIRST, noun="model") == FIRST


@pytest.mark.parametrize("prefix", ["12345678", "1234567890AB", OTHER[:16], "abcdef012"])
def test_a_unique_prefix_of_eight_or_more_characters_names_the_full_id(db: Database, prefix: str) -> None:
    expected = OTHER if prefix.lower().startswith("1234") else FIRST
    assert resolve_id(db, "models", prefix, noun="model") == expected


def test_an_ambiguous_prefix_is_a_conflict_listing_the_matches(db: Database) -> None:
    with pytest.raises(Conflict, match="several model ids") as caught:
        resolve_id(db, "models", "abcdef01", noun="model")
    assert caught.value.status == 409
    assert caught.value.details["matches"] == [FIRST, SECOND]


@pytest.mark.parametrize(
    "token",
    ["1234567", "", "12345678-", "zzzzzzzz", "%%%%%%%%", "1234567_", "ffffffff", OTHER + "0"],
)
def test_short_foreign_or_unknown_tokens_name_nothing(db: Database, token: str) -> None:
    assert resolve_id(db, "models", token, noun="model") is None


def test_the_minimum_prefix_is_eight_characters() -> None:
    assert MIN_PREFIX == 8


def test_only_id_tables_are_accepted(db: Database) -> None:
    with pytest.raises(ValueError, match="not an id table"):
        resolve_id(db, "api_keys", FIRST, noun="key")  # type: ignore[arg-type]
