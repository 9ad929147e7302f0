"""A build job's params: the typed contract between submit, the job row and whoever runs the job.

Stored form (:meth:`BuildJobParams.to_json`, written once by :mod:`service.builds.submit`)::

    {"key": <EngineKey.canonical()>, "eval_set_id": <id or None>,
     "auto": {"fallback_key": <EngineKey.canonical()>, "int8_evidence": <Int8Evidence or None>}}

(``auto`` only for precision "auto"). The model and calibration set live once, in the key; the engine
id is the key's digest. Rows written before this contract also carried ``engine_id``, ``model_id`` and
``calibration_set_id``: :meth:`BuildJobParams.from_json` reads them too, checks they agree with the key
and drops them, so a job queued before an upgrade runs after it. :meth:`BuildJobParams.to_public`
is the form the API has always shown (the stored form plus those derived ids).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from service.builds.auto_precision import Int8Evidence
from service.catalog.engine_keys import EngineKey
from service.errors import InvalidJobParams

# Written by the previous version next to the key; derived from it now (read, checked, dropped).
_DERIVED_FIELDS = ("engine_id", "model_id", "calibration_set_id")
_FIELDS = frozenset({"key", "eval_set_id", "auto", *_DERIVED_FIELDS})


@dataclass(frozen=True)
class AutoChoiceParams:
    """Precision "auto": the float engine to build when INT8 is not the answer, and the INT8 engine's
    evidence when it was already in the cache at submit time (None: the job builds INT8 first)."""

    fallback_key: EngineKey
    int8_evidence: Int8Evidence | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "fallback_key": self.fallback_key.canonical(),
            "int8_evidence": asdict(self.int8_evidence) if self.int8_evidence is not None else None,
        }

    @classmethod
    def from_json(cls, data: object) -> AutoChoiceParams:
        if not isinstance(data, Mapping) or "fallback_key" not in data:
            raise InvalidJobParams("A precision 'auto' build job's 'auto' params carry no 'fallback_key'.")
        evidence = data.get("int8_evidence")
        if evidence is not None and not isinstance(evidence, Mapping):
            raise InvalidJobParams("'auto.int8_evidence' of a build job is not an object.")
        try:
            return cls(
                fallback_key=_key_from(data["fallback_key"], "auto.fallback_key"),
                int8_evidence=Int8Evidence(**evidence) if evidence is not None else None,
            )
        except TypeError as exc:
            raise InvalidJobParams(f"'auto.int8_evidence' of a build job is not readable: {exc}") from exc


@dataclass(frozen=True)
class BuildJobParams:
    """What a build job builds: ``key`` (for precision "auto", the INT8 candidate's key) and the
    held-out set the request named. Where that set shapes the engine (INT8 calibrated here) the key
    carries it as well, and the two must agree."""

    key: EngineKey
    eval_set_id: str | None = None
    auto: AutoChoiceParams | None = None

    def __post_init__(self) -> None:
        in_key = self.key.config.eval_set_id
        if in_key is not None and in_key != self.eval_set_id:
            raise InvalidJobParams(
                f"A build job's eval_set_id {self.eval_set_id!r} differs from its engine key's {in_key!r}."
            )

    @property
    def model_id(self) -> str:
        return self.key.model_id

    @property
    def calibration_set_id(self) -> str | None:
        return self.key.calibration_set_id

    @property
    def engine_id(self) -> str | None:
        """The engine the job stores, known up front unless precision "auto" has yet to choose."""
        return self.key.digest if self.auto is None else None

    def keys(self) -> dict[str, EngineKey]:
        """Every engine key the job may store, by digest: its own, and an auto build's fallback."""
        keys = [self.key] + ([self.auto.fallback_key] if self.auto is not None else [])
        return {key.digest: key for key in keys}

    def to_json(self) -> dict[str, Any]:
        """The stored form (see the module docstring)."""
        data: dict[str, Any] = {"key": self.key.canonical(), "eval_set_id": self.eval_set_id}
        if self.auto is not None:
            data["auto"] = self.auto.to_json()
        return data

    def to_public(self) -> dict[str, Any]:
        """The params as the API shows them: the stored form plus the ids derived from the key."""
        return {
            **self.to_json(),
            "engine_id": self.engine_id,
            "model_id": self.model_id,
            "calibration_set_id": self.calibration_set_id,
        }

    @classmethod
    def from_json(cls, data: object) -> BuildJobParams:
        """Read the stored form, or the previous version's (InvalidJobParams when it is neither)."""
        if not isinstance(data, Mapping):
            raise InvalidJobParams(f"A build job's params are not an object but {type(data).__name__}.")
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise InvalidJobParams(
                f"A build job's params hold unknown fields {unknown}; known: {sorted(_FIELDS)}."
            )
        if "key" not in data:
            raise InvalidJobParams("A build job's params carry no engine key ('key').")
        eval_set_id = data.get("eval_set_id")
        if eval_set_id is not None and not isinstance(eval_set_id, str):
            raise InvalidJobParams("A build job's eval_set_id is not a string.")
        auto = data.get("auto")
        params = cls(
            key=_key_from(data["key"], "key"),
            eval_set_id=eval_set_id,
            auto=AutoChoiceParams.from_json(auto) if auto else None,
        )
        derived = params.to_public()
        for name in _DERIVED_FIELDS:
            if name in data and data[name] != derived[name]:
                raise InvalidJobParams(
                    f"A build job's {name} {data[name]!r} disagrees with its engine key ({derived[name]!r})."
                )
        return params


def _key_from(canonical: object, where: str) -> EngineKey:
    if not isinstance(canonical, Mapping):
        raise InvalidJobParams(f"A build job's '{where}' is not an engine key object.")
    try:
        return EngineKey.from_canonical(dict(canonical))
    except KeyError as exc:
        raise InvalidJobParams(f"A build job's '{where}' lacks the engine key field {exc}.") from exc
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidJobParams(f"A build job's '{where}' is not a readable engine key: {exc}.") from exc
