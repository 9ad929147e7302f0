"""The one exception tree: stable codes, statuses, exit codes, and the way back from a status."""

from __future__ import annotations

import pytest

from service import errors
from service.errors import (
    ApiError,
    BackendUnavailable,
    BadInput,
    ClientError,
    Conflict,
    DownloadDamaged,
    InvalidRequest,
    JobCancelled,
    LimitExceeded,
    ModelRunFailed,
    NotFound,
    ServerUnreachable,
    ServiceError,
    TooLarge,
    Unauthorized,
    error_class_for_status,
)


def _all_classes() -> list[type[ServiceError]]:
    return [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, ServiceError)
    ]


def test_every_error_class_has_its_own_code() -> None:
    codes = [error.code for error in _all_classes()]
    assert len(codes) == len(set(codes)), sorted(codes)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, BadInput),
        (401, Unauthorized),
        (404, NotFound),
        (409, Conflict),
        (413, TooLarge),
        (422, InvalidRequest),
        (429, LimitExceeded),
        (503, BackendUnavailable),
        (500, ServiceError),
        (502, ServiceError),
    ],
)
def test_an_error_answer_maps_back_to_the_most_general_class_of_its_status(
    status: int, expected: type[ServiceError]
) -> None:
    assert error_class_for_status(status) is expected


def test_the_way_back_never_picks_a_narrower_class_or_a_client_one() -> None:
    # 409 is Conflict, never JobCancelled (a job would be recorded cancelled, not failed); 422 is the
    # schema's BadInput, not a model's run failure.
    assert error_class_for_status(409) is not JobCancelled
    assert issubclass(error_class_for_status(422), BadInput)
    assert error_class_for_status(422) is not ModelRunFailed
    for status in range(400, 600):
        assert not issubclass(error_class_for_status(status), ClientError)


def test_client_errors_carry_the_exit_codes_the_cli_documents() -> None:
    assert ServiceError("x").exit_code == 1
    assert ApiError("x", status=404, code="not_found").exit_code == 1
    assert ServerUnreachable("x").exit_code == 3
    assert DownloadDamaged("x").exit_code == 4
    answered = ApiError("gone", status=404, code="not_found")
    assert (answered.status, answered.code, answered.message) == (404, "not_found", "gone")
