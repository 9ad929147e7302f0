"""Human-readable views of the server's documents: rich tables for models, sets, engines, fusions, layers.

Contract: each function takes a document exactly as the API returns it and gives renderables for
:meth:`service.cli.render.Output.show`; none of them calls the server or prints. Missing optional
fields render as ``-`` so an older or newer server still gets a readable table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from service.cli.client_api import Document

ID_WIDTH = 16  # ids are sha256 hex; tables show a prefix, detail views the whole id


def human_bytes(size: Any) -> str:
    if not isinstance(size, int | float):
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return ", ".join(cell(item) for item in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{key}={cell(item)}" for key, item in value.items()) or "-"
    return str(value)


def _short(identifier: Any) -> str:
    text = cell(identifier)
    return text[:ID_WIDTH] if len(text) > ID_WIDTH else text


def make_table(
    title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None
) -> Table:
    from rich.table import Table

    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(cell(value) for value in row))
    return table


def details(title: str, fields: Mapping[str, Any]) -> Table:
    """A two-column key/value table."""
    return make_table(title, ("field", "value"), fields.items())


def _shape(tensor: Mapping[str, Any]) -> str:
    dims = ", ".join(map(str, tensor.get("shape", [])))
    return f"{tensor.get('name', '?')}: {tensor.get('dtype', '?')}[{dims}]"


# Models and calibration sets ---------------------------------------------------------------------


def models_table(models: Sequence[Document]) -> Table:
    rows = [
        (
            _short(m.get("id")),
            m.get("name"),
            m.get("source"),
            human_bytes(m.get("size_bytes")),
            [_shape(t) for t in m.get("inputs", [])],
            (m.get("quantization") or {}).get("explicit"),
            m.get("created_at"),
        )
        for m in models
    ]
    return make_table("Models", ("id", "name", "source", "size", "inputs", "Q/DQ", "created"), rows)


def model_views(model: Document) -> list[Table]:
    quantization = model.get("quantization") or {}
    fields = {
        "id": model.get("id"),
        "name": model.get("name"),
        "source": model.get("source"),
        "parent": model.get("parent_id"),
        "size": human_bytes(model.get("size_bytes")),
        "opset": model.get("opset"),
        "producer": model.get("producer"),
        "explicit Q/DQ": quantization.get("explicit"),
        "Q/DQ pairs": quantization.get("qdq_pairs"),
        "created": model.get("created_at"),
    }
    io_rows = [("input", *_tensor_row(t)) for t in model.get("inputs", [])]
    io_rows += [("output", *_tensor_row(t)) for t in model.get("outputs", [])]
    ops = sorted((model.get("op_counts") or {}).items(), key=lambda item: (-item[1], item[0]))
    return [
        details("Model", fields),
        make_table("Inputs and outputs", ("role", "name", "dtype", "shape"), io_rows),
        make_table("Operators", ("op", "count"), ops),
    ]


def _tensor_row(tensor: Mapping[str, Any]) -> tuple[Any, Any, str]:
    return tensor.get("name"), tensor.get("dtype"), "[" + ", ".join(map(str, tensor.get("shape", []))) + "]"


def calibration_sets_table(sets: Sequence[Document]) -> Table:
    rows = [
        (
            _short(s.get("id")),
            s.get("name"),
            s.get("format"),
            s.get("samples"),
            human_bytes(s.get("size_bytes")),
            [_shape(t) for t in s.get("inputs", [])],
            s.get("created_at"),
        )
        for s in sets
    ]
    return make_table(
        "Calibration sets", ("id", "name", "format", "samples", "size", "inputs", "created"), rows
    )


def calibration_set_views(item: Document) -> list[Table]:
    fields = {
        "id": item.get("id"),
        "name": item.get("name"),
        "format": item.get("format"),
        "samples": item.get("samples"),
        "size": human_bytes(item.get("size_bytes")),
        "source file": item.get("source_filename"),
        "created": item.get("created_at"),
    }
    rows = []
    for tensor in item.get("inputs", []):
        stats = tensor.get("stats") or {}
        rows.append(
            (*_tensor_row(tensor), _range(stats.get("min"), stats.get("max")), cell(stats.get("mean")))
        )
    return [
        details("Calibration set", fields),
        make_table("Inputs", ("name", "dtype", "sample shape", "range", "mean"), rows),
    ]


def _range(low: Any, high: Any) -> str:
    if isinstance(low, list) and isinstance(high, list) and low and high:
        return f"{min(low):.4g} .. {max(high):.4g}"
    return "-"


# Engines, layers and fusions ---------------------------------------------------------------------


def engines_table(engines: Sequence[Document]) -> Table:
    rows = [
        (
            _short(e.get("id")),
            _short(e.get("model_id")),
            e.get("precision"),
            e.get("backend"),
            e.get("device"),
            human_bytes(e.get("engine_bytes")),
            e.get("created_at"),
        )
        for e in engines
    ]
    return make_table("Engines", ("id", "model", "precision", "backend", "device", "size", "created"), rows)


def engine_views(engine: Document) -> list[Table]:
    fields = {
        "id": engine.get("id"),
        "model": engine.get("model_id"),
        "built model": engine.get("built_model_id"),
        "calibration set": engine.get("calibration_set_id"),
        "precision": engine.get("precision"),
        "backend": f"{cell(engine.get('backend'))} {cell(engine.get('backend_version'))}",
        "built on": engine.get("device"),
        "build time": _seconds(engine.get("build_seconds")),
        "size": human_bytes(engine.get("engine_bytes")),
        "plan sha256": engine.get("plan_sha256"),
        "layers": engine.get("layer_counts"),
        "kept layers": engine.get("kept_layers"),
        "preparation": engine.get("preparation"),
        "created": engine.get("created_at"),
    }
    views = [details("Engine", fields)]
    summary = engine.get("fusion_summary")
    if isinstance(summary, dict):
        views.append(fusion_summary_table(summary))
    accuracy = engine.get("accuracy")
    if isinstance(accuracy, dict):
        views.extend(accuracy_views(accuracy, "Accuracy vs FP32"))
    return views


def accuracy_views(accuracy: Mapping[str, Any], title: str) -> list[Table]:
    """The summary numbers of an accuracy comparison, then one row per compared output."""
    summary = {key: value for key, value in accuracy.items() if not isinstance(value, list | dict)}
    views = [details(title, summary)]
    outputs = accuracy.get("outputs")
    if isinstance(outputs, list) and outputs and all(isinstance(item, dict) for item in outputs):
        columns = list(dict.fromkeys(key for item in outputs for key in item))
        views.append(
            make_table("Accuracy per output", columns, [[item.get(c) for c in columns] for item in outputs])
        )
    return views


def records_table(title: str, key_column: str, records: Mapping[str, Any]) -> Table:
    """One row per record (the mapping's key first), with each record's scalar fields as columns."""
    rows = {key: value for key, value in records.items() if isinstance(value, dict)}
    columns = list(
        dict.fromkeys(
            f for value in rows.values() for f, item in value.items() if not isinstance(item, list | dict)
        )
    )
    return make_table(
        title,
        (key_column, *columns),
        [[key, *(value.get(c) for c in columns)] for key, value in rows.items()],
    )


def _seconds(value: Any) -> str:
    return f"{value:.2f} s" if isinstance(value, int | float) else "-"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


FUSION_COLUMNS = ("fused", "epilogue", "separate", "blocked")


def fusion_summary_table(summary: Mapping[str, Any]) -> Table:
    """Patterns per kind and what became of them, in the one vocabulary of both fusion reports.

    A static report has no ``separate`` (it only predicts); a count the report lacks shows as "-".
    """
    by_kind = summary.get("by_kind") or {}
    rows = [
        (
            kind,
            counts.get("total", counts.get("count")),
            *(counts.get(column, "-") for column in FUSION_COLUMNS),
        )
        for kind, counts in by_kind.items()
    ]
    caption = None
    if "int8_layer_share" in summary:
        caption = (
            f"INT8 share: {_percent(summary.get('int8_layer_share'))} of compute layers, "
            f"{_percent(summary.get('int8_weighted_layer_share'))} of weighted layers"
        )
    return make_table("Fusions by kind", ("kind", "patterns", *FUSION_COLUMNS), rows, caption)


def _percent(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, int | float) else "-"


def static_fusions_table(report: Document) -> list[Table]:
    rows = [
        (p.get("kind"), p.get("nodes"), p.get("activation"), p.get("expected"), p.get("reason"))
        for p in report.get("patterns", [])
    ]
    explicit = (report.get("summary") or {}).get("explicit_quantization", report.get("explicit_quantization"))
    caption = f"model {report.get('model_id')}; explicit Q/DQ: {cell(explicit)}"
    table = make_table(
        "Fusion patterns (static analysis)",
        ("kind", "nodes", "activation", "expected in INT8", "reason"),
        rows,
        caption,
    )
    return [table, fusion_summary_table(report.get("summary") or {})]


def engine_fusions_table(report: Document) -> list[Table]:
    rows = [
        (
            p.get("kind"),
            p.get("nodes"),
            p.get("status"),
            p.get("fused_as"),
            p.get("precision"),
            p.get("expected"),
            p.get("explanation"),
        )
        for p in report.get("patterns", [])
    ]
    caption = (
        f"engine {report.get('engine_id')}; {cell(report.get('backend'))} on {cell(report.get('device'))}"
    )
    table = make_table(
        "Fusions in the engine",
        ("kind", "nodes", "status", "fused as", "precision", "expected", "explanation"),
        rows,
        caption,
    )
    return [table, fusion_summary_table(report.get("summary") or {})]


def layers_table(report: Document) -> Table:
    rows = [
        (
            index,
            layer.get("name"),
            layer.get("type"),
            layer.get("precision"),
            layer.get("input_dtypes"),
            layer.get("output_dtypes"),
            layer.get("onnx_nodes"),
        )
        for index, layer in enumerate(report.get("layers", []))
    ]
    return make_table(
        f"Engine layers ({cell(report.get('source'))})",
        ("#", "name", "type", "precision", "in", "out", "ONNX nodes"),
        rows,
    )
