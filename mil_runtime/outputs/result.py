"""The JSON result of one input, the same schema for a feature file and for a slide.

    {
      "milkit_version": "0.1.0",
      "input": {"path": "...", "type": "features" | "slide"},
      "model": {"name", "file", "sha256", "milkit_version", "n_classes", "class_names"},
      "encoder": {"name", "sha256", "file", "output_dim", "expected": {name, output_dim, sha256} | null},
      "prediction": {"class_name", "class_index", "probability"},
      "probabilities": {class name: probability},
      "logits": [...],
      "n_instances": N,
      "mpp": {"value": float | null, "source": "override" | "openslide" | "tiff-resolution" | "feature-file"},
      "tiling": {...},
      "device": "cpu" | "cuda",
      "timings_s": {stage: seconds},
      "warnings": [...],
      ... slide only: "tissue", "features_reused", "outputs" ...
      "tiles": [{"x", "y", "attention"}]          level-0 px top-left corners; x, y null without coords
    }

Regression and survival models (model "task" "regression" / "survival") have no classes: their
"prediction" holds the task's outputs instead, {"risk", "hazards", "survival"} (the curves for
discrete-time hazard heads only, one number per time bin, with the model's "bin_edges" beside them)
or {"values": {target name: value}}, and the document has no "probabilities" or "logits".

Models with one attention map per class (Prediction.attention_by_class) give every tile one more
field, "attention_by_class": {class name: weight}; "attention" stays the model's `attention` (the
predicted class's map). Other models' tiles have no such field.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from mil_runtime._version import __version__
from mil_runtime.contract import default_class_names


def model_identity(runner: Any) -> dict[str, Any]:
    """Which model file made the prediction (MILRunner)."""
    meta = runner.metadata
    identity = {
        "name": meta.model_name,
        "file": str(runner.path),
        "sha256": runner.sha256,
        "milkit_version": meta.version,
    }
    if not meta.is_classifier:  # the task and what its outputs mean (bins, target names)
        return {**identity, "task": meta.task_type, **_task_description(meta)}
    return {**identity, "n_classes": meta.n_classes,
            "class_names": list(meta.class_names or default_class_names(meta.n_classes))}


def _task_description(meta: Any) -> dict[str, Any]:
    options = meta.task_options
    if meta.task_type == "regression":
        return {"target_names": meta.target_names}
    described: dict[str, Any] = {"survival_method": options.get("loss", "nll")}
    if options.get("loss", "nll") == "nll":
        described.update(n_bins=options.get("n_bins"), bin_edges=options.get("bin_edges"))
    return described


def encoder_identity(runner: Any, name: str | None, sha256: str | None, *, file: Any = None,
                     output_dim: int | None = None) -> dict[str, Any]:
    """The encoder that made the features, next to the one the model expects."""
    expected = runner.metadata.encoder
    return {
        "name": name,
        "sha256": sha256,
        "file": str(file) if file else None,
        "output_dim": output_dim,
        "expected": asdict(expected) if expected else None,
    }


def tiles_field(xy_level0: np.ndarray | None, attention: np.ndarray,
                attention_by_class: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Per-tile level-0 (x, y) top-left corners with attention; x and y are null without coords.

    attention_by_class: {class name: (N,)} adds each tile's {class name: weight} (multi-branch models).
    """
    tiles = [
        {
            "x": int(xy_level0[i, 0]) if xy_level0 is not None else None,
            "y": int(xy_level0[i, 1]) if xy_level0 is not None else None,
            "attention": float(weight),
        }
        for i, weight in enumerate(attention)
    ]
    if attention_by_class:
        columns = {name: np.asarray(weights, dtype=np.float64).tolist() for name, weights in attention_by_class.items()}
        for i, tile in enumerate(tiles):
            tile["attention_by_class"] = {name: column[i] for name, column in columns.items()}
    return tiles


def rounded_timings(timings: dict[str, float]) -> dict[str, float]:
    """Seconds per stage as the result records them."""
    return {k: round(float(v), 4) for k, v in timings.items()}


def result_document(
    *,
    input_path: Any,
    input_type: str,
    runner: Any,
    prediction: Any,
    encoder: dict[str, Any],
    xy_level0: np.ndarray | None,
    mpp: dict[str, Any],
    tiling: dict[str, Any],
    timings: dict[str, float],
    warnings: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One input's result in the schema above (`extra` holds the slide-only fields). A regression or
    survival model's "prediction" is its task's outputs, and it has no classes."""
    if runner.metadata.is_classifier:
        outcome = {
            "prediction": {
                "class_name": prediction.predicted_name,
                "class_index": int(prediction.predicted_index),
                "probability": float(prediction.probability),
            },
            "probabilities": prediction.probabilities_by_name(),
            "logits": [float(v) for v in prediction.logits],
        }
    else:
        outcome = {"prediction": prediction.task_outputs()}
    return {
        "milkit_version": __version__,
        "input": {"path": str(input_path), "type": input_type},
        "model": model_identity(runner),
        "encoder": encoder,
        **outcome,
        "n_instances": int(len(prediction.attention)),
        "mpp": mpp,
        "tiling": tiling,
        "device": runner.device,
        "timings_s": rounded_timings(timings),
        "warnings": list(warnings),
        **(extra or {}),
        "tiles": tiles_field(xy_level0, prediction.attention, prediction.attention_by_class),
    }
