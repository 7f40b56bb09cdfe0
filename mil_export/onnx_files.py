"""Writing an ONNX graph to disk atomically, as one file or, above a size, as NAME.onnx + NAME.onnx.data.

A protobuf message cannot exceed 2 GiB, so a ViT-g (1.1 B parameters: 4.5 GB in fp32, 2.3 GB in fp16) cannot
be one .onnx file. Above `threshold` bytes of tensor data every initializer goes to ONE data file beside the
graph, `<name>.data` (ONNX's external data; onnxruntime loads it from the graph's folder). Both files are
written under temporary names in the destination folder, checked by `onnx.checker` on the path (the only way
it checks a graph over 2 GiB), then renamed into place, data file first: a reader never sees a half-written
file. The data file's name is stored inside the graph, so the graph may be renamed but the data file not.

Memory: the graph is written one initializer at a time, never as one serialized message. Protobuf merges
repeated occurrences of a message field, so the file is the model without its initializers followed by, per
initializer, a `graph` field that holds just that initializer; a reader parses it as the whole model. A
1 GB graph therefore costs its largest tensor on top of the weights the exporter already holds, not two
more copies of every weight (ModelProto + its serialized string).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

from mil_runtime.errors import OutputError

EXTERNAL_DATA_BYTES = (1 << 31) - (1 << 26)  # 2 GiB less 64 MiB of headroom for the graph itself
INLINE_BYTES = 1024  # tensors under 1 kB (shape constants) stay inline: the checker's shape inference reads them
_GRAPH_FIELD = 7  # ModelProto.graph
_INITIALIZER_FIELD = 5  # GraphProto.initializer


def tensor_bytes(graph: Any, lifted: Mapping[str, Any] | None = None) -> int:
    """Bytes of tensor data the graph holds (initializers and Constant nodes); a ModelProto or an onnx_ir Model.
    `lifted`: onnx_ir tensors of the initializers the graph holds as placeholders (see save_graph)."""
    lifted = lifted or {}
    if not hasattr(graph, "graph") or not hasattr(graph.graph, "initializer"):  # onnx_ir
        return _ir_tensor_bytes(graph)
    total = sum(t.nbytes for t in lifted.values())
    total += sum(_nbytes(t) for t in graph.graph.initializer if t.name not in lifted)
    for node in graph.graph.node:
        total += sum(_nbytes(a.t) for a in node.attribute if a.HasField("t"))
    return total


def _ir_tensor_bytes(model: Any) -> int:
    import onnx_ir as ir

    total = sum(value.const_value.nbytes for value in model.graph.initializers.values()
                if value.const_value is not None)
    for node in model.graph.all_nodes():
        total += sum(attr.value.nbytes for attr in node.attributes.values() if attr.type == ir.AttributeType.TENSOR)
    return total


def _nbytes(tensor: Any) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    import onnx

    return onnx.numpy_helper.to_array(tensor).nbytes if tensor.dims else 0


def data_file_name(path: Path) -> str:
    return f"{path.name}.data"


def needs_external_data(graph: Any, threshold: int = EXTERNAL_DATA_BYTES) -> bool:
    return tensor_bytes(graph) > threshold


def save_graph(graph: Any, path: Path, *, external: bool, edit: Callable[[Any], None] | None = None,
               lifted: Mapping[str, Any] | None = None) -> list[str]:
    """Check and write `graph` (a ModelProto or an onnx_ir Model, consumed: its initializers are taken out)
    to `path` atomically; `edit` may change the ModelProto of everything but the initializers (metadata,
    dim names) first. `lifted`: onnx_ir tensors, by name, of initializers a ModelProto holds as empty
    placeholders (vit_fusion.light_proto); they are written in their place. Returns the external data
    files written (names)."""
    import onnx

    path = Path(path)
    data_name = data_file_name(path)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = work / path.name
        with open(staged, "wb") as out:
            if external:
                with open(work / data_name, "wb") as data:
                    _write(graph, lifted or {}, out, edit, lambda tensor: _to_external(tensor, data, data_name))
            else:
                _write(graph, lifted or {}, out, edit, lambda tensor: tensor)
        del graph
        onnx.checker.check_model(str(staged), full_check=True)
        if external:
            os.replace(work / data_name, path.parent / data_name)
        os.replace(staged, path)
        if not external:  # a data file left by an earlier, larger export of this name belongs to nothing now
            (path.parent / data_name).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [data_name] if external else []


def _write(graph: Any, lifted: Mapping[str, Any], out: BinaryIO, edit: Callable[[Any], None] | None,
           place: Callable[[Any], Any]) -> None:
    """The model without initializers, then one `graph { initializer }` record per initializer."""
    tensors, head = _split(graph, lifted)
    if edit is not None:
        edit(head)
    out.write(head.SerializeToString())
    del head
    for tensor in tensors:
        payload = place(tensor).SerializeToString()
        inner = _tag(_INITIALIZER_FIELD) + _varint(len(payload))
        out.write(_tag(_GRAPH_FIELD) + _varint(len(inner) + len(payload)) + inner)
        out.write(payload)


def _split(graph: Any, lifted: Mapping[str, Any]) -> tuple[Iterator[Any], Any]:
    """(initializers as TensorProtos, made one at a time; the ModelProto without them)."""
    import onnx_ir as ir

    if hasattr(graph, "graph") and hasattr(graph.graph, "initializer"):  # ModelProto
        tensors = list(graph.graph.initializer)  # references: the data is not copied
        del graph.graph.initializer[:]
        return (_named(ir.serde.serialize_tensor(lifted[t.name]), t.name) if t.name in lifted else t
                for t in tensors), graph

    values = list(graph.graph.initializers.values())
    graph.graph.initializers.clear()
    head = ir.to_proto(graph)
    return (_named(ir.serde.serialize_tensor(value.const_value), value.name) for value in values), head


def _named(tensor: Any, name: str) -> Any:
    tensor.name = name  # the value's name: an IR tensor's own name may be unset
    return tensor


def _to_external(tensor: Any, data: BinaryIO, location: str) -> Any:
    """`tensor` with its data appended to `data` (tensors of at least INLINE_BYTES); smaller ones unchanged."""
    import onnx

    if not tensor.HasField("raw_data"):
        tensor = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name)
    if len(tensor.raw_data) < INLINE_BYTES:
        return tensor
    offset = data.tell()
    data.write(tensor.raw_data)
    stub = onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type,
                            data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(tensor.raw_data)))):
        stub.external_data.add(key=key, value=value)
    return stub


def _tag(number: int) -> bytes:
    """The key of length-delimited protobuf field `number` (wire type 2); its varint length follows."""
    return _varint(number << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
