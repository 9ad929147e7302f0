"""The documented preprocessing: published in OpenAPI, the CLI help and the README, and each example works."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from service.cli.main import app
from service.datasets.preprocess import PreprocessSpec, image_to_array
from service.datasets.preprocess_examples import PREPROCESS_EXAMPLES
from tests.data_factory import photo, photo_zip

README = Path(__file__).resolve().parents[2] / "README.md"
EXPECTED_SHAPES = {
    "imagenet_classifier": [3, 224, 224],
    "yolo_letterbox": [3, 640, 640],
    "ppocr_detector": [3, 736, 736],
}
SPEC_FIELDS = set(PreprocessSpec.model_fields)


def test_there_is_one_worked_example_per_family() -> None:
    assert [example.key for example in PREPROCESS_EXAMPLES] == list(EXPECTED_SHAPES)


@pytest.mark.parametrize("example", PREPROCESS_EXAMPLES, ids=lambda e: e.key)
def test_every_example_is_a_valid_spec(example: Any) -> None:
    PreprocessSpec.model_validate(example.spec)


@pytest.fixture(scope="module")
def openapi(api: httpx.Client) -> dict[str, Any]:
    return dict(api.get("/openapi.json").json())


def test_openapi_publishes_the_spec_schema_with_every_field_documented(openapi: dict[str, Any]) -> None:
    schema = openapi["components"]["schemas"]["PreprocessSpec"]
    assert set(schema["properties"]) == SPEC_FIELDS
    undocumented = [name for name, field in schema["properties"].items() if not field.get("description")]
    assert undocumented == []
    assert schema["properties"]["resize"]["enum"] == ["stretch", "letterbox", "shorter_side_center_crop"]
    assert schema["additionalProperties"] is False
    assert schema["examples"] == [example.spec for example in PREPROCESS_EXAMPLES]


def test_the_upload_form_field_points_at_the_schema_and_its_examples_validate(
    openapi: dict[str, Any],
) -> None:
    form = openapi["paths"]["/v1/calibration-sets"]["post"]["requestBody"]["content"]["multipart/form-data"]
    field = form["schema"]["properties"]["preprocess"]
    assert field["contentMediaType"] == "application/json"
    assert field["contentSchema"] == {"$ref": "#/components/schemas/PreprocessSpec"}
    schema = openapi["components"]["schemas"]["PreprocessSpec"]
    for text, example in zip(field["examples"], PREPROCESS_EXAMPLES, strict=True):
        assert json.loads(text) == example.spec
        jsonschema.validate(json.loads(text), schema)
        assert example.title in field["description"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"resize": "squash"}, schema)


@pytest.mark.parametrize("example", PREPROCESS_EXAMPLES, ids=lambda e: e.key)
def test_each_example_turns_real_photos_into_samples_of_the_documented_shape(
    api: httpx.Client, example: Any
) -> None:
    uploaded = api.post(
        "/v1/calibration-sets",
        files={"file": ("photos.zip", photo_zip(2, max_side=200))},
        data={"preprocess": json.dumps(example.spec), "name": example.key},
    )
    assert uploaded.status_code in (200, 201), uploaded.text
    (summary,) = uploaded.json()["inputs"]
    assert summary["shape"] == EXPECTED_SHAPES[example.key]
    assert uploaded.json()["samples"] == 2
    assert summary["dtype"] == "float32"


def test_the_yolo_example_letterboxes_with_grey_114() -> None:
    (yolo,) = [e for e in PREPROCESS_EXAMPLES if e.key == "yolo_letterbox"]
    encoded = io.BytesIO()
    Image.fromarray(photo("chelsea")).save(encoded, format="PNG")  # 451x300: padded above and below
    sample = image_to_array(encoded.getvalue(), PreprocessSpec.model_validate(yolo.spec))
    assert sample.shape == (3, 640, 640)
    np.testing.assert_allclose(sample[:, 0, :], 114 / 255, rtol=1e-6)
    assert not np.allclose(sample[:, 320, :], 114 / 255)


def test_the_readme_documents_every_field_and_shows_every_example() -> None:
    text = README.read_text()
    section = text.split("## Preprocessing", 1)[1].split("\n## ", 1)[0]
    for field in SPEC_FIELDS:
        assert f"`{field}`" in section, field
    for example in PREPROCESS_EXAMPLES:
        assert json.dumps(example.spec) in section, example.key


@pytest.mark.parametrize(
    "command", [("calib", "upload"), ("infer",), ("local", "build")], ids=lambda c: " ".join(c)
)
def test_cli_help_lists_the_fields_and_the_examples(command: tuple[str, ...]) -> None:
    # Wide enough that rich never cuts a long option value with an ellipsis.
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    flat = " ".join(part.strip("│ ") for part in result.stdout.splitlines())
    for word in ("letterbox", "shorter_side_center_crop", "channel_order", "crop_fraction", "pad_value"):
        assert word in flat, word
    for example in PREPROCESS_EXAMPLES:
        assert example.key in flat, example.key
