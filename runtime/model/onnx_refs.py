"""The files an ONNX graph makes its engine read: the `location` of every tensor stored as
external data, read from the protobuf wire format without the onnx package (robot code) and
without reading any weights (the file is memory-mapped; tensor payloads are skipped by length).

ONNX Runtime opens these files itself, relative to the graph's folder, so a bundle must list
and hash each of them: `load_bundle` refuses a graph that names one the manifest does not.
"""

from __future__ import annotations

import mmap
from pathlib import Path

# Field numbers of onnx.proto3 (onnx/onnx.proto): the messages on the way to a TensorProto.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
MAX_DEPTH = 64  # graphs nested in If/Loop attributes; a hostile file may nest forever


class OnnxRefError(ValueError):
    """A graph file that is not a readable protobuf ModelProto."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise OnnxRefError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> list[tuple[int, memoryview]]:
    """(field number, payload) of every length-delimited field; other wire types skipped."""
    out: list[tuple[int, memoryview]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise OnnxRefError("a field runs past the end of its message")
            out.append((field, buf[pos:pos + size]))
            pos += size
        else:
            raise OnnxRefError(f"wire type {wire} (groups) is not protobuf 3")
    if pos > len(buf):
        raise OnnxRefError("truncated message")
    return out


# message kind -> {field number: message kind of that field}
_WALK: dict[str, dict[int, str]] = {
    "model": {_MODEL_GRAPH: "graph", _MODEL_FUNCTIONS: "function"},
    "graph": {_GRAPH_NODE: "node", _GRAPH_INITIALIZER: "tensor", _GRAPH_SPARSE: "sparse"},
    "function": {_FUNCTION_NODE: "node"},
    "node": {_NODE_ATTRIBUTE: "attribute"},
    "attribute": {_ATTR_T: "tensor", _ATTR_G: "graph", _ATTR_TENSORS: "tensor",
                  _ATTR_GRAPHS: "graph", _ATTR_SPARSE: "sparse", _ATTR_SPARSES: "sparse"},
    "sparse": {_SPARSE_VALUES: "tensor", _SPARSE_INDICES: "tensor"},
}


def _walk(buf: memoryview, kind: str, depth: int, found: set[str]) -> None:
    if depth > MAX_DEPTH:
        raise OnnxRefError(f"messages nested deeper than {MAX_DEPTH}")
    if kind == "tensor":
        for field, payload in _fields(buf):
            if field == _TENSOR_EXTERNAL_DATA:
                entry = dict(_fields(payload))
                if bytes(entry.get(_ENTRY_KEY, b"")) == b"location":
                    try:
                        found.add(bytes(entry.get(_ENTRY_VALUE, b"")).decode("utf-8"))
                    except UnicodeDecodeError:
                        raise OnnxRefError("an external data location is not UTF-8") from None
        return
    inner = _WALK[kind]
    for field, payload in _fields(buf):
        if field in inner:
            _walk(payload, inner[field], depth + 1, found)


def external_locations(path: Path) -> set[str]:
    """Every external-data `location` (relative to the graph's folder, as written) that the
    ONNX graph at `path` names, in its initializers, constants and nested graphs."""
    found: set[str] = set()
    error = None
    with path.open("rb") as f:
        if f.seek(0, 2) == 0:
            raise OnnxRefError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                _walk(view, "model", 0, found)
            except OnnxRefError as exc:
                # kept as text: the traceback's frames hold views on the map, which cannot
                # close while they live
                error = str(exc)
            view.release()
    if error is not None:
        raise OnnxRefError(error)
    return found
