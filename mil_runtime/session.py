"""onnxruntime sessions: provider choice (`--device auto|cpu|cuda|cuda:N`), threads, and metadata reading.

`cuda:N` runs on GPU N (onnxruntime's CUDA provider option `device_id`, counted among the GPUs
CUDA_VISIBLE_DEVICES leaves visible); `cuda` is GPU 0.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from mil_runtime.contract import ModelMetadata
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
    def sha256(self) -> str:
        """sha256 of the file, computed on first use (identity in results, encoder checks)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
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
