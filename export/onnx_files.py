"""ONNX files with their weights in external data: how the exporter writes, moves and renames
them without holding a second copy of the weights.

A graph over 2 GB cannot be one protobuf; ONNX keeps its tensors in a side file that the graph
names (`location`, `offset`, `length`). In a bundle, `<model>.onnx` keeps its weights in
`<model>.onnx.data`, one file, every tensor at a page-aligned offset so ONNX Runtime can map
it instead of reading it into memory. Graphs that arrive with external data (from the PyTorch
exporter, which writes a file per tensor, or from the user) keep it; graphs whose weights pass
`EXTERNAL_MIN_BYTES` get it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from runtime.model.onnx_refs import external_locations

EXTERNAL_MIN_BYTES = 256 << 20  # above this a bundle's graph keeps its weights beside it
INLINE_MAX_BYTES = 1024  # smaller tensors (shapes, scalars) stay inside the graph
ALIGN = 1 << 16  # offsets a multiple of the largest page size ONNX Runtime maps at
_CHUNK = 8 << 20


def data_name(graph: Path) -> str:
    return graph.name + ".data"


def has_external_data(path: Path) -> bool:
    return bool(external_locations(path))


def all_files(path: Path) -> list[Path]:
    """The graph and every data file it names."""
    return [path, *sorted(path.parent / loc for loc in external_locations(path))]


def _tensors(model: onnx.ModelProto) -> Iterable[TensorProto]:
    return external_data_helper._get_all_tensors(model)


def _info(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def weight_bytes(path: Path) -> int:
    """The bytes of every tensor of the graph (inline or external), its weights not read."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in _tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            info = _info(t)
            total += int(info["length"]) if "length" in info else \
                (path.parent / info["location"]).stat().st_size
        else:
            total += t.ByteSize()
    return total


class _DataWriter:
    """Appends tensors to one data file at aligned offsets and points each tensor at it."""

    def __init__(self, graph: Path) -> None:
        self.location = data_name(graph)
        self.file = (graph.parent / self.location).open("wb")

    def _start(self) -> int:
        pos = self.file.tell()
        pad = -pos % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
        return pos + pad

    def put_bytes(self, tensor: TensorProto, data: bytes | memoryview) -> None:
        offset = self._start()
        self.file.write(data)
        self._point(tensor, offset, len(data))

    def put_file(self, tensor: TensorProto, src: Path, offset: int, length: int | None) -> None:
        start = self._start()
        with src.open("rb") as f:
            f.seek(offset)
            left = length if length is not None else os.fstat(f.fileno()).st_size - offset
            size = left
            while left > 0:
                block = f.read(min(_CHUNK, left))
                if not block:
                    raise ValueError(f"{src}: ends before tensor {tensor.name}'s data")
                self.file.write(block)
                left -= len(block)
        self._point(tensor, start, size)

    def _point(self, tensor: TensorProto, offset: int, length: int) -> None:
        for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                     "uint64_data", "string_data"):
            tensor.ClearField(name)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset),
                           ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)

    def close(self) -> None:
        self.file.close()


def save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write `model` to `path`; with `external`, its tensors go to `<path>.data` one by one,
    each freed from the protobuf as it is written (no second copy of the weights)."""
    if not external:
        onnx.save(model, str(path))
        return
    writer = _DataWriter(path)
    try:
        for t in _tensors(model):
            if t.data_location == TensorProto.EXTERNAL:
                raise ValueError(f"tensor {t.name}: still external; load it first")
            if t.ByteSize() < INLINE_MAX_BYTES:
                continue
            if t.HasField("raw_data"):
                writer.put_bytes(t, t.raw_data)
            else:
                writer.put_bytes(t, np.ascontiguousarray(numpy_helper.to_array(t)).tobytes())
    finally:
        writer.close()
    onnx.save(model, str(path))


def attach_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    """A graph exported without its parameters (`export_params=False`: each one a graph
    input named as in the module) gets them as initializers in `<path>.data`, written
    tensor by tensor from the module's own memory. A parameter feeding a Transpose is stored
    transposed in its place (the fold the PyTorch exporter's constant folding would make in
    memory, one tensor at a time here). So an export holds the model and one tensor, not a
    folded copy of every weight and a serialized one."""
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    params = [i.name for i in g.input if i.name in weights]
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    folded: list[tuple[str, np.ndarray]] = []
    keep = set()
    for name in params:
        for node in users.get(name, []):
            if node.op_type == "Transpose" and node.input[0] == name:
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                folded.append((node.output[0], np.transpose(weights[name], perm)))
                g.node.remove(node)
            else:
                keep.add(name)
    writer = _DataWriter(path)
    try:
        for name, value in [(n, weights[n]) for n in params if n in keep] + folded:
            array = np.ascontiguousarray(value)  # a view of the module's memory, or one tensor
            t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                            dims=array.shape)
            if array.nbytes < INLINE_MAX_BYTES:
                t.raw_data = array.tobytes()
            else:
                writer.put_bytes(t, array.data.cast("B"))
            g.initializer.append(t)
    finally:
        writer.close()
    for i in [i for i in g.input if i.name in weights]:
        g.input.remove(i)
    onnx.save(model, str(path))


def relocate(src: Path, dst: Path, external: bool | None = None) -> None:
    """The graph at `src` (with its data files, wherever it names them) as `dst` + one
    `<dst>.data` (or inline when `external` is False and it fits), streaming tensor by tensor.
    `external` None: as the source (external if it had any, or if its weights are large)."""
    if external is None:
        external = has_external_data(src) or weight_bytes(src) >= EXTERNAL_MIN_BYTES
    if not external:
        if has_external_data(src):
            model = onnx.load(str(src))  # fits in a protobuf: small enough to hold
            onnx.save(model, str(dst))
        else:
            shutil.copyfile(src, dst)
        return
    model = onnx.load(str(src), load_external_data=False)
    writer = _DataWriter(dst)
    try:
        for t in _tensors(model):
            if t.data_location == TensorProto.EXTERNAL:
                info = _info(t)
                where = src.parent / info["location"]
                offset = int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else None
                if (length if length is not None else where.stat().st_size) < INLINE_MAX_BYTES:
                    # shapes and axes inline: shape inference reads their values
                    external_data_helper.load_external_data_for_tensor(t, str(src.parent))
                    t.data_location = TensorProto.DEFAULT
                    del t.external_data[:]
                else:
                    writer.put_file(t, where, offset, length)
            elif t.ByteSize() >= INLINE_MAX_BYTES:
                data = t.raw_data if t.HasField("raw_data") else \
                    np.ascontiguousarray(numpy_helper.to_array(t)).tobytes()
                writer.put_bytes(t, data)
    finally:
        writer.close()
    onnx.save(model, str(dst))
