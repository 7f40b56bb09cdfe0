"""Writing an ONNX graph to disk atomically, as one file or, above a size, as NAME.onnx + NAME.onnx.data.

A protobuf message cannot exceed 2 GiB, so a ViT-g (1.1 B parameters: 4.5 GB in fp32, 2.3 GB in fp16) cannot
be one .onnx file. Above `threshold` bytes of tensor data every initializer goes to ONE data file beside the
graph, `<name>.data` (ONNX's external data; onnxruntime loads it from the graph's folder). Both files are
written under temporary names in the destination folder, checked by `onnx.checker` on the path (the only way
it checks a graph over 2 GiB), then renamed into place, data file first: a reader never sees a half-written
file. The data file's name is stored inside the graph, so the graph may be renamed but the data file not.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mil_runtime.errors import OutputError

EXTERNAL_DATA_BYTES = (1 << 31) - (1 << 26)  # 2 GiB less 64 MiB of headroom for the graph itself


def tensor_bytes(proto: Any) -> int:
    """Bytes of tensor data the graph holds inline (initializers and Constant nodes)."""
    total = sum(_nbytes(t) for t in proto.graph.initializer)
    for node in proto.graph.node:
        total += sum(_nbytes(a.t) for a in node.attribute if a.HasField("t"))
    return total


def _nbytes(tensor: Any) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    import onnx

    return onnx.numpy_helper.to_array(tensor).nbytes if tensor.dims else 0


def data_file_name(path: Path) -> str:
    return f"{path.name}.data"


def needs_external_data(proto: Any, threshold: int = EXTERNAL_DATA_BYTES) -> bool:
    return tensor_bytes(proto) > threshold


def save_graph(proto: Any, path: Path, *, external: bool) -> list[str]:
    """Check and write `proto` to `path` atomically; returns the external data files written (names)."""
    import onnx

    path = Path(path)
    data_name = data_file_name(path)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = work / path.name
        if external:  # tensors under 1 kB (shape constants) stay inline: the checker's shape inference reads them
            onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, str(staged))
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
