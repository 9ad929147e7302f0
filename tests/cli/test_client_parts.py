"""The client's parts without a service: log tails, shape ranges, input files, job documents, downloads."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from service.cli.client_api import ApiClient, JobState, filename_from_disposition
from service.cli.client_flows import parse_shape_ranges
from service.cli.client_inputs import InputFile, InputSpec, default_preprocess, load_inputs, parse_preprocess
from service.cli.render import new_log_lines
from service.errors import BadInput, DownloadDamaged

PAYLOAD = b"engine bytes " * 1000


@pytest.mark.parametrize(
    ("seen", "tail", "new"),
    [
        ((), ("a", "b"), ["a", "b"]),
        (("a", "b"), ("a", "b", "c"), ["c"]),
        (("a", "b", "c"), ("b", "c", "d", "e"), ["d", "e"]),  # the window slid by one
        (("a", "b"), ("a", "b"), []),
        (("x", "y"), ("p", "q"), ["p", "q"]),  # slid past everything seen
        (("a", "a"), ("a", "a", "a"), ["a"]),  # repeated lines still count once each
    ],
)
def test_new_log_lines_are_what_follows_the_overlap_with_the_last_tail(
    seen: tuple[str, ...], tail: tuple[str, ...], new: list[str]
) -> None:
    assert new_log_lines(seen, tail) == new


def test_shape_ranges_parse_min_opt_max_dims() -> None:
    ranges = parse_shape_ranges(["input=1x3x32x32:4x3x32x32:8x3x64x64"])

    assert ranges == {"input": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 64, 64]}}


@pytest.mark.parametrize("value", ["input", "input=1x3:2x3", "=1:2:3", "input=1xa:2:3"])
def test_malformed_shape_ranges_say_how_to_write_them(value: str) -> None:
    with pytest.raises(BadInput, match=r"--shape '.*': (write NAME=MIN:OPT:MAX|dims must be whole numbers)"):
        parse_shape_ranges([value])


def test_an_input_argument_may_name_its_input_unless_the_path_itself_has_an_equals_sign(
    tmp_path: Path,
) -> None:
    odd = tmp_path / "a=b.npy"
    odd.write_bytes(b"")

    assert InputFile.parse("x.npy") == InputFile(Path("x.npy"))
    assert InputFile.parse("image=x.npy") == InputFile(Path("x.npy"), "image")
    assert InputFile.parse(str(odd)) == InputFile(odd)


def test_preprocess_comes_inline_or_from_a_file_and_bad_specs_are_explained(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text('{"size": [8, 8], "layout": "NHWC"}')

    from_file = parse_preprocess(f"@{tmp_path / 'spec.json'}")

    assert from_file is not None and from_file.size == (8, 8) and from_file.layout == "NHWC"
    with pytest.raises(BadInput, match="not valid JSON"):
        parse_preprocess("{size: 8}")
    with pytest.raises(BadInput, match=r"--preprocess is invalid: .*resize"):
        parse_preprocess('{"resize": "letterbox"}')
    with pytest.raises(BadInput, match="Cannot read the preprocessing spec file"):
        parse_preprocess(f"@{tmp_path / 'missing.json'}")


def test_the_default_image_preprocessing_follows_the_input_shape() -> None:
    nchw = default_preprocess(InputSpec("x", "float32", ("N", 3, 24, 32)))
    nhwc = default_preprocess(InputSpec("x", "uint8", (1, 24, 32, 1)))

    assert (nchw.size, nchw.layout, nchw.channels, nchw.dtype) == ((24, 32), "NCHW", 3, "float32")
    assert (nhwc.size, nhwc.layout, nhwc.channels, nhwc.dtype) == ((24, 32), "NHWC", 1, "uint8")
    with pytest.raises(BadInput, match=r"pass --preprocess"):
        default_preprocess(InputSpec("x", "float32", ("N", 3, "H", "W")))


def test_inputs_from_an_npz_are_fitted_to_the_declared_inputs(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", image=np.ones((3, 4, 4)), mask=np.zeros((2, 1, 4, 4), np.float32))
    specs = [InputSpec("image", "float32", ("N", 3, 4, 4)), InputSpec("mask", "float16", ("N", 1, 4, 4))]

    arrays = load_inputs([InputFile(tmp_path / "x.npz")], specs, None)

    assert arrays["image"].shape == (1, 3, 4, 4) and arrays["image"].dtype == np.float32
    assert arrays["mask"].shape == (2, 1, 4, 4) and arrays["mask"].dtype == np.float16


def test_an_unnamed_npy_needs_a_name_when_the_model_has_several_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 4, 4), np.float32))
    specs = [InputSpec("image", "float32", ("N", 3, 4, 4)), InputSpec("mask", "float32", ("N", 1, 4, 4))]

    with pytest.raises(BadInput, match=r"the engine has inputs \['image', 'mask'\]; say which one"):
        load_inputs([InputFile(tmp_path / "x.npy")], specs, None)
    with pytest.raises(BadInput, match="is given twice"):
        load_inputs([InputFile(tmp_path / "x.npy", "image")] * 2, specs, None)
    with pytest.raises(BadInput, match=r"use a \.npy, \.npz, \.png or \.jpg file"):
        load_inputs([InputFile(tmp_path / "x.txt")], specs, None)


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)

    with pytest.raises(BadInput, match="without pickles"):
        load_inputs([InputFile(tmp_path / "objects.npy")], [InputSpec("x", "float32", ("N", 1))], None)


def test_a_finished_report_document_is_its_own_result() -> None:
    running = JobState.from_document(
        {
            "id": "r1",
            "kind": "benchmark",
            "status": "running",
            "progress": 0.5,
            "phase": "batch 1",
            "log_tail": ["x"],
            "result": None,
            "error": None,
        },
        kind="report",
    )
    done = JobState.from_document(
        {"id": "r1", "status": "succeeded", "kind": "benchmark", "results": []}, kind="report"
    )

    assert (running.finished, running.result, running.progress) == (False, None, 0.5)
    assert done.finished and done.result is not None and done.result["results"] == [] and done.progress == 1.0


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ('attachment; filename="abc-int8-tensorrt-rtx.plan"', "abc-int8-tensorrt-rtx.plan"),
        ("attachment; filename*=utf-8''caf%C3%A9.onnx", "café.onnx"),
        ('attachment; filename="../../etc/passwd"', "passwd"),
        ('attachment; filename=".."', None),
        (None, None),
    ],
)
def test_download_names_from_content_disposition_never_leave_the_target_directory(
    header: str | None, name: str | None
) -> None:
    assert filename_from_disposition(header) == name


class _FileHandler(BaseHTTPRequestHandler):
    """Serves PAYLOAD with the checksum header the path asks for: /good or /bad."""

    def do_GET(self) -> None:
        digest = hashlib.sha256(PAYLOAD).hexdigest() if self.path == "/good" else "0" * 64
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.send_header("X-Content-SHA256", digest)
        self.send_header("Content-Disposition", 'attachment; filename="served.plan"')
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


@pytest.fixture
def file_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_whose_checksum_matches_is_renamed_into_place(file_server: str, tmp_path: Path) -> None:
    with ApiClient.connect(file_server, None) as api:
        saved = api.download("/good", tmp_path, default_name="fallback.plan")

    assert saved.path == tmp_path / "served.plan" and saved.verified
    assert saved.path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served.plan"]


def test_a_download_whose_checksum_differs_leaves_no_file_behind(file_server: str, tmp_path: Path) -> None:
    with (
        ApiClient.connect(file_server, None) as api,
        pytest.raises(DownloadDamaged, match="is corrupt: its sha256"),
    ):
        api.download("/bad", tmp_path / "engine.plan", default_name="x")

    assert list(tmp_path.iterdir()) == []


def test_images_of_different_sizes_need_a_target_size(tmp_path: Path) -> None:
    from PIL import Image

    from tests.data_factory import photo

    for name, size in (("a.png", (20, 16)), ("b.png", (16, 16))):
        Image.fromarray(photo("coffee")).resize(size).save(tmp_path / name)
    spec = parse_preprocess('{"layout": "NCHW"}')
    files = [InputFile(tmp_path / "a.png"), InputFile(tmp_path / "b.png")]

    with pytest.raises(BadInput, match=r"decode to different shapes .*--preprocess"):
        load_inputs(files, [InputSpec("x", "float32", ("N", 3, "H", "W"))], spec)
