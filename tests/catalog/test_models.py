"""The model catalog: registration is validate-then-store, and start-up sweeps orphan files."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.catalog.models import ModelCatalog
from service.errors import InvalidModel
from service.store.blobs import BlobStore
from service.store.db import Database
from service.store.quarantine import quarantined
from tests.model_factory import model_bytes, resnet_block_classifier


@pytest.fixture
def catalog(tmp_path: Path) -> ModelCatalog:
    return ModelCatalog(Database(tmp_path / "db.sqlite"), BlobStore(tmp_path / "models", suffix=".onnx"))


def test_a_model_file_without_a_row_is_registered_again_at_reconcile(catalog: ModelCatalog) -> None:
    kept, _ = catalog.add_model(model_bytes(resnet_block_classifier(seed=1)), "kept.onnx", source="upload")
    orphan = catalog.blobs.put_bytes(model_bytes(resnet_block_classifier(seed=2)))  # its row was lost
    assert catalog.reconcile(min_orphan_age_s=3600) == {"recovered": 0, "quarantined": 0}  # too young
    assert catalog.reconcile() == {"recovered": 1, "quarantined": 0}
    recovered = catalog.get(orphan.sha256)
    assert (recovered.source, recovered.name) == ("recovered", f"recovered-{orphan.sha256[:12]}.onnx")
    assert recovered.info.inputs == kept.info.inputs  # analysed from its bytes like an upload
    assert catalog.read_bytes(orphan.sha256) == model_bytes(resnet_block_classifier(seed=2))
    assert catalog.read_bytes(kept.id) == model_bytes(resnet_block_classifier(seed=1))
    assert catalog.reconcile() == {"recovered": 0, "quarantined": 0}  # idempotent


def test_a_model_file_that_no_longer_parses_is_quarantined_not_deleted(catalog: ModelCatalog) -> None:
    damaged = catalog.blobs.put_bytes(b"not an onnx model")
    assert catalog.reconcile() == {"recovered": 0, "quarantined": 1}
    assert not catalog.blobs.exists(damaged.sha256)
    assert [p.read_bytes() for p in quarantined(catalog.blobs.root)] == [b"not an onnx model"]
    assert catalog.list() == []


def test_an_invalid_model_is_neither_stored_nor_listed(catalog: ModelCatalog) -> None:
    with pytest.raises(InvalidModel):
        catalog.add_model(b"not a model at all", "bad.onnx", source="upload")
    assert catalog.list() == []
    assert list(catalog.blobs.digests()) == []
    assert [p for p in catalog.blobs.root.rglob("*") if p.is_file()] == []
