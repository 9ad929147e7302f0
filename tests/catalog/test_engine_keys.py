"""Engine keys keep their digests across versions: a cached engine is found again after an upgrade.

The digests below were computed by the version before ``BuildConfig.eval_set_id`` was a field of its
own (it was an entry of ``BuildConfig.extra``); the same keys built the new way must hash the same.
"""

from __future__ import annotations

import json

import pytest

from service.backends.base import BackendInfo, ShapeRange
from service.catalog import engine_keys
from service.catalog.engine_keys import BuildConfig, CalibrationOptions, EngineKey

RTX = BackendInfo(name="tensorrt-rtx", version="1.7.1", device="cpu (ahead-of-time)")
ORT = BackendInfo(name="onnxruntime", version="1.31.0", device="cpu")
MODEL, CALIBRATION, EVAL = "a" * 64, "b" * 64, "c" * 64

PINNED = {
    "de13ca1975c9104b96e39a0bc74c60778d6f1d8528f01350d35b9cd3ed4df6d4": EngineKey(
        MODEL, BuildConfig(precision="fp32"), None, ORT
    ),
    "14964862d8d46f6a68490ec3b4595594eb45baf52392aa2d5bd819575b655173": EngineKey(
        MODEL,
        BuildConfig(
            precision="fp16",
            keep=("last",),
            shapes=(("x", ShapeRange((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))),),
        ),
        None,
        RTX,
    ),
    "c60dde119a93ca5a3b41e7dd40b3ee2cbac0c370aeebdcecca5121f8efe17bb6": EngineKey(
        MODEL, BuildConfig(precision="int8", calibration=CalibrationOptions()), CALIBRATION, RTX
    ),
    "3cbcf7c2ed42edc6f734d81bb6872072c4a0fd52fc6b31cd37bde7c1c7a42c0b": EngineKey(
        MODEL,
        BuildConfig(
            precision="int8",
            calibration=CalibrationOptions(method="entropy", holdout_fraction=0.0),
            eval_set_id=EVAL,
        ),
        CALIBRATION,
        ORT,
    ),
}


@pytest.fixture(autouse=True)
def _preparation_version_of_the_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pins were taken at preparation version 4; a later bump rightly changes every digest, and
    # is not what these tests are about.
    monkeypatch.setattr(engine_keys, "PREPARATION_VERSION", 4)


@pytest.mark.parametrize("digest", sorted(PINNED))
def test_keys_hash_as_the_previous_version_hashed_them(digest: str) -> None:
    assert PINNED[digest].digest == digest


def test_the_eval_set_sits_where_the_previous_canonical_form_had_it() -> None:
    with_eval = PINNED["3cbcf7c2ed42edc6f734d81bb6872072c4a0fd52fc6b31cd37bde7c1c7a42c0b"]
    assert with_eval.canonical()["build_config"]["extra"] == {"eval_set_id": EVAL}
    without = PINNED["c60dde119a93ca5a3b41e7dd40b3ee2cbac0c370aeebdcecca5121f8efe17bb6"]
    assert without.canonical()["build_config"]["extra"] == {}


@pytest.mark.parametrize("digest", sorted(PINNED))
def test_a_canonical_string_of_the_previous_version_reads_back_to_the_same_key(digest: str) -> None:
    stored = json.loads(json.dumps(PINNED[digest].canonical()))  # as a job row holds it
    again = EngineKey.from_canonical(stored)
    assert again == PINNED[digest] and again.digest == digest


def test_an_unknown_build_config_entry_is_refused_rather_than_dropped() -> None:
    canonical = PINNED["de13ca1975c9104b96e39a0bc74c60778d6f1d8528f01350d35b9cd3ed4df6d4"].canonical()
    canonical["build_config"]["extra"] = {"eval_set_id": EVAL, "future_option": 1}
    with pytest.raises(ValueError, match=r"unknown build config entries \['future_option'\]"):
        EngineKey.from_canonical(canonical)
