"""Fixtures for the registry-parametrised model tests: small models, exported once per session."""

from __future__ import annotations

import pytest

from model_cases import build_model  # beside this file (pytest puts the test folder on sys.path)

TILING = {"tile_px": 224, "mpp": 0.5, "overlap": 0.0}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name, n_classes) -> (eager model, ONNX path, onnxruntime Session); each exported once."""
    from mil_export import export_onnx
    from mil_runtime.session import open_session

    folder = tmp_path_factory.mktemp("exported_models")
    cache: dict[tuple[str, int], tuple] = {}

    def get(name: str, n_classes: int):
        key = (name, n_classes)
        if key not in cache:
            model = build_model(name, n_classes)
            path = export_onnx(model, folder / f"{name}-{n_classes}.onnx", tiling=TILING)
            cache[key] = (model, path, open_session(path, device="cpu"))
        return cache[key]

    return get
