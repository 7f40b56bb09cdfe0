"""Small inputs for the cohort tests: the demo model (64-d features, 128 px tiles at 1 um/px), 64-d
feature files of a few instances, small synthetic slides, and a second model that differs from the
demo model only in its bytes (so its sha256 differs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "models" / "demo" / "abmil_demo.onnx"
FEATURE_DIM = 64


def make_h5(path: Path, seed: int, n: int = 6) -> Path:
    from mil_runtime.features_io import write_feature_file

    path.parent.mkdir(parents=True, exist_ok=True)
    features = np.random.default_rng(seed).standard_normal((n, FEATURE_DIM)).astype(np.float32)
    coords = np.stack([np.arange(n) * 128, np.zeros(n)], axis=1).astype(np.int64)
    return write_feature_file(path, features, coords, 128, mpp=1.0)


def make_slide(path: Path, seed: int, size: int = 512) -> Path:
    from mil_runtime.demo import write_synthetic_slide

    path.parent.mkdir(parents=True, exist_ok=True)
    write_synthetic_slide(path, height=size, width=size, seed=seed)
    return path


def other_model(folder: Path) -> Path:
    """The demo model with another doc string: the same network, another file (another sha256)."""
    import onnx

    model = onnx.load(str(DEMO_MODEL))
    model.doc_string = (model.doc_string or "") + " (a copy for the cohort tests)"
    path = folder / "abmil_other.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    # the encoder is found next to the model
    encoder = DEMO_MODEL.parent / "tiny_cnn.onnx"
    (folder / encoder.name).write_bytes(encoder.read_bytes())
    return path


def statuses(summary) -> dict[str, str]:
    return {str(result.item.input): result.status for result in summary.results}


def run(inputs, out: Path, model: Path = DEMO_MODEL, **options):
    from mil_runtime.cohort import run_cohort

    return run_cohort(inputs, model, out, progress=False, **options)


def env(**extra) -> dict[str, str]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith(("MILKIT_FAULT", "SLURM_"))}
    variables.update({"OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}})
    return variables


def mil_infer(*args, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mil_runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env(**extra_env))
