"""The model catalog: registration is validate-then-store, and start-up sweeps orphan files."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.catalog.models import ModelCatalog
from service.errors import InvalidModel
from service.store.blobs import BlobStore
from service.store.db import Database
from tests.model_factory import model_bytes, resnet_block_classifier


@pytest.fixture
def catalog(tmp_path: Path) -> ModelCatalog:
    return ModelCatalog(Database(tmp_path / "db.sqlite"), BlobStore(tmp_path / "models", suffix=".onnx"))


def test_a_model_file_without_a_row_is_removed_at_reconcile(catalog: ModelCatalog) -> None:
    kept, _ = catalog.add_model(model_bytes(resnet_block_classifier(seed=1)), "kept.onnx", source="upload")
    orphan = catalog.blobs.put_bytes(model_bytes(resnet_block_classifier(seed=2)))  # crash before the insert
    assert catalog.reconcile(min_orphan_age_s=3600) == 0  # too young: another process may be inserting it
    assert catalog.reconcile() == 1
    assert not catalog.blobs.exists(orphan.sha256)
    assert catalog.read_bytes(kept.id) == model_bytes(resnet_block_classifier(seed=1))


def test_an_invalid_model_is_neither_stored_nor_listed(catalog: ModelCatalog) -> None:
    with pytest.raises(InvalidModel):
        catalog.add_model(b"not a model at all", "bad.onnx", source="upload")
    assert catalog.list() == []
    assert list(catalog.blobs.digests()) == []
    assert [p for p in catalog.blobs.root.rglob("*") if p.is_file()] == []
