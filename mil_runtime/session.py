"""onnxruntime sessions: provider choice (`--device auto|cpu|cuda|cuda:N`), threads, and metadata reading.

`cuda:N` runs on GPU N (onnxruntime's CUDA provider option `device_id`, counted among the GPUs
CUDA_VISIBLE_DEVICES leaves visible); `cuda` is GPU 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mil_runtime.contract import PREFIX, ModelMetadata
from mil_runtime.errors import DeviceError, InputNotFoundError, MilkitError, ModelFormatError

DEVICES = ("auto", "cpu", "cuda")  # plus "cuda:N" (parse_device)
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
_CHUNK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so large encoders never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: str | os.PathLike, data_files: list[str] | tuple[str, ...] | None = None) -> str:
    """The identity of an exported graph: sha256 of the file, or, when its weights live in external data
    files beside it (NAME.onnx + NAME.onnx.data, graphs over 2 GB), sha256 over the graph's sha256 and each
    data file's name and sha256, so that other weights under the same .onnx give another identity.

    `data_files` None: read from the file's milkit metadata (model config "external_data"). A single-file
    graph keeps the plain file sha256, so identities recorded before external data existed stay valid.
    """
    if data_files is None:
        data_files = external_data_files(path)
    if not data_files:
        return sha256_file(path)
    folder = Path(path).parent
    digest = hashlib.sha256(b"milkit external-data identity v1\n")
    digest.update(f"graph {sha256_file(path)}\n".encode())
    for name in sorted(data_files):
        data = folder / name
        if not data.is_file():
            raise InputNotFoundError(f"{path} keeps its weights in {data}, which is missing; copy it beside the graph")
        digest.update(f"data {name} {sha256_file(data)}\n".encode())
    return digest.hexdigest()


def external_data_files(path: str | os.PathLike) -> list[str]:
    """Names of the external data files a milkit graph records (model config "external_data"); [] if none."""
    try:
        model = json.loads(read_metadata_props(path).get(f"{PREFIX}model", "{}"))
    except (OSError, ValueError):
        return []  # not a readable milkit file: opening it reports that properly
    files = (model.get("config") or {}).get("external_data") if isinstance(model, dict) else None
    return [str(f) for f in files] if isinstance(files, list) else []


# ModelProto fields, from onnx.proto: metadata_props = 14 (StringStringEntryProto: key = 1, value = 2)
_METADATA_PROPS_FIELD = 14
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def read_metadata_props(path: str | os.PathLike) -> dict[str, str]:
    """An ONNX file's metadata_props, read from the protobuf wire format without the onnx package.

    Only the top-level fields are walked; the graph (and its weights) is skipped by seeking, so this reads
    a few KB even of a 2 GB file.
    """
    props: dict[str, str] = {}
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        while handle.tell() < size:
            field_number, wire_type = divmod(_varint(handle), 8)
            if wire_type == _LENGTH:
                length = _varint(handle)
                if field_number == _METADATA_PROPS_FIELD:
                    entry = _string_fields(handle.read(length))
                    props[entry.get(1, "")] = entry.get(2, "")
                else:
                    handle.seek(length, os.SEEK_CUR)
            elif wire_type == _VARINT:
                _varint(handle)
            elif wire_type in (_FIXED64, _FIXED32):
                handle.seek(8 if wire_type == _FIXED64 else 4, os.SEEK_CUR)
            else:
                raise ValueError(f"{path}: not a protobuf message (wire type {wire_type})")
    return props


def _varint(handle) -> int:
    value, shift = 0, 0
    while True:
        byte = handle.read(1)
        if not byte:
            raise ValueError("truncated protobuf varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("protobuf varint too long")


def _string_fields(message: bytes) -> dict[int, str]:
    """The length-delimited fields of a small message, decoded as UTF-8 (StringStringEntryProto)."""
    handle, fields = io.BytesIO(message), {}
    while handle.tell() < len(message):
        field_number, wire_type = divmod(_varint(handle), 8)
        if wire_type != _LENGTH:
            raise ValueError("unexpected field in a metadata entry")
        fields[field_number] = handle.read(_varint(handle)).decode("utf-8")
    return fields


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MilkitError(
            "onnxruntime is not installed; install milkit[cpu] (or milkit[gpu] for CUDA, never both)"
        ) from None
    return onnxruntime


@dataclass
class Session:
    """An onnxruntime session with the milkit metadata of its file and the device that runs it."""

    inference: "object"  # onnxruntime.InferenceSession
    metadata: ModelMetadata
    path: Path
    device: str  # "cuda" or "cpu": what actually runs, not what was asked for
    _sha256: str | None = field(default=None, repr=False)

    @property
    def data_files(self) -> list[str]:
        """External data files the graph's weights live in (names beside it); [] for a single file."""
        return list(self.metadata.model_config.get("external_data") or [])

    @property
    def sha256(self) -> str:
        """The file's identity (`file_identity`: graph + external data), computed on first use (identity in
        results, encoder checks)."""
        if self._sha256 is None:
            self._sha256 = file_identity(self.path, self.data_files)
        return self._sha256

    def run(self, feeds: dict) -> dict:
        names = [o.name for o in self.inference.get_outputs()]
        return dict(zip(names, self.inference.run(names, feeds)))


class SessionRunner:
    """Base of the runtime's runners (MIL model, tile encoder): the file's identity, from its Session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @property
    def metadata(self) -> ModelMetadata:
        return self.session.metadata

    @property
    def device(self) -> str:
        """"cuda" or "cpu": what runs, not what was asked for."""
        return self.session.device

    @property
    def path(self) -> Path:
        return self.session.path

    @property
    def sha256(self) -> str:
        return self.session.sha256


def parse_device(device: str) -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda", GPU index or None) of a --device value; DeviceError when it is none."""
    text = str(device).strip().lower()
    if text in DEVICES:
        return text, None
    kind, _, index = text.partition(":")
    if kind == "cuda" and index.isdigit():
        return "cuda", int(index)
    raise DeviceError(f"unknown device {device!r}; use one of {', '.join(DEVICES)} or cuda:N (N: the GPU's index)")


def _providers(device: str, available: list[str]) -> list:
    kind, index = parse_device(device)
    if kind == "cpu":
        return [CPU_PROVIDER]
    if CUDA_PROVIDER in available:
        cuda = CUDA_PROVIDER if index is None else (CUDA_PROVIDER, {"device_id": index})
        return [cuda, CPU_PROVIDER]
    if kind == "cuda":
        raise DeviceError(
            f"--device {device}: onnxruntime has no CUDA provider here (install milkit[gpu] on a machine with "
            "CUDA and cuDNN, without the plain onnxruntime package), or use --device cpu / auto"
        )
    return [CPU_PROVIDER]


def open_session(path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> Session:
    """Load an exported milkit file: check it exists, parse and validate its metadata, pick providers.

    Raises InputNotFoundError, ModelFormatError (not ONNX, truncated, not milkit) or DeviceError.
    """
    ort = _onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"model file not found: {path}")
    providers = _providers(device, ort.get_available_providers())
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: the CLI reports problems itself
    try:
        inference = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for bad protobufs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFormatError(f"{path} is not a readable ONNX model ({first[:200]})") from None
    props = inference.get_modelmeta().custom_metadata_map
    metadata = ModelMetadata.from_props(props, source=str(path))
    ran = CUDA_PROVIDER if CUDA_PROVIDER in inference.get_providers() else CPU_PROVIDER
    kind, index = parse_device(device)
    if kind == "cuda" and ran != CUDA_PROVIDER:
        raise DeviceError(
            f"--device {device}: the CUDA provider failed to start (CUDA 13 / cuDNN 9 libraries missing?); "
            "use --device cpu or auto"
        )
    ran_on = "cpu" if ran != CUDA_PROVIDER else ("cuda" if index is None else f"cuda:{index}")
    return Session(inference, metadata, path, ran_on)
