"""Wire formats: JSON, npz and raw tensor bytes decoded, bounded and encoded back."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from service.errors import BadInput, InvalidInferenceInput, TooLarge
from service.serving import codecs
from service.serving.codecs import (
    DTYPE_HEADER,
    NAME_HEADER,
    SHAPE_HEADER,
    check_output_choice,
    decode_inputs,
    encode_outputs,
    npz_bytes,
    request_format,
    response_format,
)


def test_content_types_pick_the_format_and_unknown_ones_list_the_choices() -> None:
    assert request_format("application/json; charset=utf-8") == "json"
    assert request_format("application/x-npz") == "npz"
    assert request_format("Application/X-Numpy") == "raw"
    with pytest.raises(
        InvalidInferenceInput, match=r"Unsupported Content-Type 'text/plain'.*application/x-npz"
    ):
        request_format("text/plain")


def test_accept_overrides_the_answer_format_only_when_it_names_a_supported_type() -> None:
    assert response_format("*/*", "raw") == "raw"
    assert response_format(None, "npz") == "npz"
    assert response_format("text/html, application/x-npz;q=0.9", "json") == "npz"
    assert response_format("application/json", "raw") == "json"


def test_json_inputs_decode_to_arrays_of_their_natural_dtype() -> None:
    body = json.dumps({"inputs": {"x": [[1.5, 2.0]], "ids": [[1, 2, 3]], "mask": [True, False]}}).encode()
    feeds = decode_inputs("json", body, {}, ["x", "ids", "mask"])
    assert feeds["x"].dtype == np.float64 and feeds["x"].shape == (1, 2)
    assert feeds["ids"].dtype == np.int64
    assert feeds["mask"].dtype == np.bool_


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", r'must be an object \{"inputs"'),
        (b'{"inputs": {"x": [1]}, "outputs": 1}', r"Unknown keys \['outputs'\]"),
        (b'{"inputs": {"x": [[1, 2], [3]]}}', "not a rectangular nested list"),
        (b'{"inputs": {"x": [1, null]}}', "only numbers"),
        (b'{"inputs": {"x": ["a"]}}', "only numbers"),
    ],
)
def test_malformed_json_bodies_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInferenceInput, match=message):
        decode_inputs("json", body, {}, ["x"])


def test_npz_round_trips_arrays_exactly_including_fortran_order() -> None:
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, image=fortran, ids=np.array([[7, 8]], np.int64))
    feeds = decode_inputs("npz", buffer.getvalue(), {}, ["image", "ids"])
    np.testing.assert_array_equal(feeds["image"], fortran)
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].tolist() == [[7, 8]]
    again = decode_inputs("npz", npz_bytes(feeds), {}, ["image", "ids"])
    np.testing.assert_array_equal(again["image"], fortran)


def test_npz_with_pickled_objects_is_refused() -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InvalidInferenceInput, match="dtype object; only numeric and bool arrays"):
        decode_inputs("npz", buffer.getvalue(), {}, ["x"])


def test_npz_whose_header_promises_more_data_than_the_member_holds_is_refused() -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**9,)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(InvalidInferenceInput, match="declares 4000000000 bytes of data"):
        decode_inputs("npz", buffer.getvalue(), {}, ["x"])


def test_npz_that_expands_past_the_request_bound_is_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codecs, "DEFAULT_MAX_INFERENCE_BYTES", 1000)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros(10_000, np.float32))  # compresses to far below 1000 bytes
    assert len(buffer.getvalue()) < 1000
    with pytest.raises(TooLarge, match="expands to"):
        decode_inputs("npz", buffer.getvalue(), {}, ["x"])


@pytest.mark.parametrize(
    ("body", "message"), [(b"PK\x03\x04garbage", "not an npz"), (b"plain", "not an npz")]
)
def test_bodies_that_are_not_npz_archives_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInferenceInput, match=message):
        decode_inputs("npz", body, {}, ["x"])


def test_npz_members_that_are_not_arrays_are_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", b"hello")
    with pytest.raises(InvalidInferenceInput, match=r"'notes\.txt' is not an \.npy array"):
        decode_inputs("npz", buffer.getvalue(), {}, ["x"])


def test_raw_bytes_become_a_zero_copy_view_typed_and_shaped_by_the_headers() -> None:
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    body = data.tobytes()
    headers = {DTYPE_HEADER: "float32", SHAPE_HEADER: "2,3,4"}
    feeds = decode_inputs("raw", body, headers, ["input"])
    np.testing.assert_array_equal(feeds["input"], data)
    assert np.shares_memory(feeds["input"], np.frombuffer(body, np.uint8))
    scalar = decode_inputs("raw", np.float32(3).tobytes(), {DTYPE_HEADER: "f4", SHAPE_HEADER: ""}, ["s"])
    assert scalar["s"].shape == () and scalar["s"] == 3


@pytest.mark.parametrize(
    ("headers", "size", "message"),
    [
        ({SHAPE_HEADER: "1,2"}, 8, "need an X-Tensor-Dtype header"),
        ({DTYPE_HEADER: "float32"}, 8, "need an X-Tensor-Shape header"),
        ({DTYPE_HEADER: "float33", SHAPE_HEADER: "1,2"}, 8, "not a numpy dtype name"),
        ({DTYPE_HEADER: "2)t<", SHAPE_HEADER: "1,2"}, 8, "not a numpy dtype name"),  # numpy: ValueError
        ({DTYPE_HEADER: "f4,(1000000000,)f4", SHAPE_HEADER: "1"}, 8, "not a numpy dtype name"),  # structured
        ({DTYPE_HEADER: "object", SHAPE_HEADER: "1,2"}, 8, "not a numeric or bool dtype"),
        ({DTYPE_HEADER: ">f4", SHAPE_HEADER: "1,2"}, 8, "big-endian"),
        ({DTYPE_HEADER: "float32", SHAPE_HEADER: "1,x"}, 8, "comma-separated whole numbers"),
        ({DTYPE_HEADER: "float32", SHAPE_HEADER: "1,-2"}, 8, "negative dimension"),
        (
            {DTYPE_HEADER: "float32", SHAPE_HEADER: "1,3"},
            8,
            "holds 8 bytes, but float32 with shape \\[1, 3\\] needs 12",
        ),
    ],
)
def test_raw_bodies_with_bad_headers_say_which_header(
    headers: dict[str, str], size: int, message: str
) -> None:
    with pytest.raises(InvalidInferenceInput, match=message):
        decode_inputs("raw", b"\0" * size, headers, ["x"])


def test_raw_bodies_need_a_single_input_engine() -> None:
    with pytest.raises(InvalidInferenceInput, match=r"takes 2 inputs \['a', 'b'\]; send application/x-npz"):
        decode_inputs("raw", b"\0" * 4, {DTYPE_HEADER: "float32", SHAPE_HEADER: "1"}, ["a", "b"])


def test_raw_name_header_renames_the_tensor_so_validation_can_check_it() -> None:
    feeds = decode_inputs(
        "raw", b"\0" * 4, {DTYPE_HEADER: "float32", SHAPE_HEADER: "1", NAME_HEADER: "y"}, ["x"]
    )
    assert list(feeds) == ["y"]


def test_outputs_encode_in_each_format() -> None:
    outputs: dict[str, np.ndarray] = {
        "logits": np.array([[1.0, 2.5]], np.float32),
        "ids": np.array([3], np.int64),
    }
    as_json = encode_outputs(outputs, "json", metadata={"engine_id": "e1"})
    assert as_json.media_type == "application/json"
    assert json.loads(as_json.body) == {"outputs": {"logits": [[1.0, 2.5]], "ids": [3]}, "engine_id": "e1"}
    as_npz = encode_outputs(outputs, "npz")
    with np.load(io.BytesIO(as_npz.body), allow_pickle=False) as loaded:
        np.testing.assert_array_equal(loaded["logits"], outputs["logits"])
        assert loaded["ids"].dtype == np.int64
    as_raw = encode_outputs(outputs, "raw", chosen="logits")
    headers = dict(as_raw.headers)
    assert headers == {DTYPE_HEADER: "float32", SHAPE_HEADER: "1,2", NAME_HEADER: "logits"}
    np.testing.assert_array_equal(np.frombuffer(as_raw.body, np.float32).reshape(1, 2), outputs["logits"])


def test_output_choice_is_checked_before_anything_runs() -> None:
    check_output_choice("raw", ["only"], None)
    check_output_choice("raw", ["a", "b"], "b")
    with pytest.raises(BadInput, match=r"2 outputs \['a', 'b'\]; application/x-numpy carries one"):
        check_output_choice("raw", ["a", "b"], None)
    with pytest.raises(BadInput, match="output 'c' is not an output"):
        check_output_choice("json", ["a", "b"], "c")


def test_json_nested_beyond_reason_is_a_400_not_a_crash() -> None:
    deep = b'{"inputs": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    with pytest.raises(InvalidInferenceInput, match="nested too deeply"):
        decode_inputs("json", deep, {}, ["x"])


def test_encrypted_npz_members_are_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", npz_member_bytes())
    data = bytearray(buffer.getvalue())
    data[6] |= 0x01  # the local header's "encrypted" flag
    central = data.rfind(b"PK\x01\x02")
    data[central + 8] |= 0x01  # and the central directory's
    with pytest.raises(InvalidInferenceInput, match="cannot be read"):
        decode_inputs("npz", bytes(data), {}, ["x"])


def npz_member_bytes() -> bytes:
    member = io.BytesIO()
    np.lib.format.write_array(member, np.zeros(2, np.float32))
    return member.getvalue()
