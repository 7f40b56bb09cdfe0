"""Run an exported MIL model on bags of features: `load_model(path).predict(features)`.

    runner = load_model("abmil.onnx", device="auto")
    prediction = runner.predict(features, coords=grid_yx)   # (N, D) float32, (N, 2) int64 (y, x)
    prediction.predicted_name, prediction.class_probabilities, prediction.attention
    prediction.attention_by_class    # {class name: (N,)} for multi-branch models, else None
    prediction.instance_probabilities  # {class name: (N,)} for models with an instance classifier, else None
    prediction.risk, prediction.survival  # survival models (prediction.task == "survival")
    prediction.values                     # regression models: {target name: value}

Inputs are validated before onnxruntime sees them (feature dim, NaN/Inf, empty bag, coords for
graph and spatial models), so every refusal is a milkit error with a message that says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mil_runtime import contract
from mil_runtime.contract import ModelMetadata, default_class_names
from mil_runtime.errors import ContractMismatchError, InvalidInputError, MilkitError, ModelFormatError
from mil_runtime.session import Session, SessionRunner, open_session


@dataclass
class Prediction:
    """One bag's result.

    logits, probabilities: (n_classes,) as the model outputs them (n_classes=1 for binary).
    class_probabilities:   (len(class_names),): binary models report [1 - p, p].
    attention:             (N,) per-instance weights, summing to 1: the model's `attention` output
                           (for multi-branch models, the predicted class's map).
    attention_by_class:    {class name: (N,) weights summing to 1}, in class order, for models with
                           one attention branch per class (the `attention_by_class` output); None for
                           every other model, binary ones included, which have one map only.
    instance_probabilities: {class name: (N,) float32 in [0, 1]}: each instance's probability of being
                           that class's evidence, from the model's instance classifier (the
                           `instance_probabilities` output), in class order; binary models give one
                           key, the positive class (class_names[1]). None for models without one.

    Regression and survival models (`task` "regression" / "survival") have no classes: logits,
    probabilities and class_probabilities are empty, class_names is [], predicted_index -1,
    predicted_name None and probability NaN. Instead:
    risk:                  survival: the bag's risk (higher = earlier event; Cox: log relative hazard).
    hazards, survival:     survival with a discrete-time hazard head: (n_bins,) hazard of each time bin
                           and probability of being event-free at its end (None for Cox models).
    values:                regression: {target name: predicted value}, in the targets' units.
    """

    logits: np.ndarray
    probabilities: np.ndarray
    class_probabilities: np.ndarray
    class_names: list[str]
    predicted_index: int
    attention: np.ndarray
    attention_by_class: dict[str, np.ndarray] | None = None
    instance_probabilities: dict[str, np.ndarray] | None = None
    task: str = contract.CLASSIFICATION
    risk: float | None = None
    hazards: np.ndarray | None = None
    survival: np.ndarray | None = None
    values: dict[str, float] | None = None

    @property
    def predicted_name(self) -> str | None:
        return self.class_names[self.predicted_index] if self.predicted_index >= 0 else None

    @property
    def probability(self) -> float:
        """Probability of the predicted class (NaN for regression and survival models)."""
        return float(self.class_probabilities[self.predicted_index]) if self.predicted_index >= 0 else float("nan")

    def task_outputs(self) -> dict[str, object]:
        """JSON-ready outputs of a regression or survival model ({} for classifiers):
        {"risk", "hazards", "survival"} (the last two for discrete-time hazard heads) or {"values"}."""
        if self.task == contract.REGRESSION:
            return {contract.VALUES: dict(self.values or {})}
        if self.task != contract.SURVIVAL_TASK:
            return {}
        outputs: dict[str, object] = {contract.RISK: self.risk}
        for name, curve in ((contract.HAZARDS, self.hazards), (contract.SURVIVAL, self.survival)):
            if curve is not None:
                outputs[name] = [float(v) for v in curve]
        return outputs

    def probabilities_by_name(self) -> dict[str, float]:
        return {name: float(p) for name, p in zip(self.class_names, self.class_probabilities)}


def _count_rows(rows: np.ndarray) -> str:
    return f"{int(rows.sum())} row" + ("" if rows.sum() == 1 else "s")


class MILRunner(SessionRunner):
    """An exported MIL model ready to predict. Build it with `load_model`."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.task = self.metadata.task_type
        self.class_names = (self.metadata.class_names or default_class_names(self.metadata.n_classes)
                            if self.metadata.is_classifier else [])
        self._check_graph_signature()

    @property
    def needs_coords(self) -> bool:
        """Graph and spatial models need each instance's grid position."""
        return contract.COORDS in self.metadata.inputs or self.metadata.graph is not None

    @property
    def has_class_attention(self) -> bool:
        """Predictions carry `attention_by_class` (one map per class: multi-branch models)."""
        return self.metadata.has_class_attention

    @property
    def has_instance_probabilities(self) -> bool:
        """Predictions carry `instance_probabilities` (models with an instance classifier)."""
        return self.metadata.has_instance_probabilities

    def _check_graph_signature(self) -> None:
        """The ONNX graph's inputs and outputs must be the ones its metadata promises.

        Files older than `milkit.outputs` read as listing the standard outputs (contract).
        """
        graph_inputs = {i.name for i in self.session.inference.get_inputs()}
        graph_outputs = {o.name: o for o in self.session.inference.get_outputs()}
        source = str(self.path)
        if graph_inputs != set(self.metadata.inputs):
            raise ModelFormatError(
                f"{source}: graph inputs {sorted(graph_inputs)} differ from milkit.inputs "
                f"{sorted(self.metadata.inputs)}; re-export the model with mil-export"
            )
        if set(graph_outputs) != set(self.metadata.outputs):
            raise ModelFormatError(
                f"{source}: graph outputs {sorted(graph_outputs)} differ from milkit.outputs "
                f"{sorted(self.metadata.outputs)}; re-export the model with mil-export"
            )
        if not self.metadata.is_classifier:
            return self._check_task_widths(graph_outputs, source)
        n_classes = self.metadata.n_classes
        width = graph_outputs[contract.LOGITS].shape[-1]
        if isinstance(width, int) and width != n_classes:
            raise ModelFormatError(
                f"{source}: logits have {width} columns but milkit.task says n_classes={n_classes}; re-export the model"
            )
        if self.has_class_attention:
            shape = graph_outputs[contract.ATTENTION_BY_CLASS].shape
            if len(shape) != 3 or (isinstance(shape[1], int) and shape[1] != n_classes):
                raise ModelFormatError(
                    f"{source}: {contract.ATTENTION_BY_CLASS} has shape {shape}, expected "
                    f"[batch, {n_classes}, bag]; re-export the model"
                )
        if self.has_instance_probabilities:
            shape = graph_outputs[contract.INSTANCE_PROBABILITIES].shape
            if len(shape) != 3 or (isinstance(shape[2], int) and shape[2] != n_classes):
                raise ModelFormatError(
                    f"{source}: {contract.INSTANCE_PROBABILITIES} has shape {shape}, expected "
                    f"[batch, bag, {n_classes}]; re-export the model"
                )

    def _check_task_widths(self, graph_outputs: dict, source: str) -> None:
        """Regression values have n_targets columns; survival curves n_bins; risk is one number per bag."""
        options = self.metadata.task_options
        widths = {contract.VALUES: options.get("n_targets", 1), contract.HAZARDS: options.get("n_bins"),
                  contract.SURVIVAL: options.get("n_bins")}
        for name, width in widths.items():
            shape = graph_outputs[name].shape if name in graph_outputs else None
            if shape is not None and (len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != width)):
                raise ModelFormatError(f"{source}: {name} has shape {shape}, expected [batch, {width}]; re-export the model")
        if contract.RISK in graph_outputs and len(graph_outputs[contract.RISK].shape) != 1:
            raise ModelFormatError(f"{source}: risk has shape {graph_outputs[contract.RISK].shape}, expected [batch]; "
                                   "re-export the model")

    # -- validation ----------------------------------------------------------------------------
    def _check_features(self, features: np.ndarray, source: str) -> np.ndarray:
        features = np.asarray(features)
        if features.ndim != 2:
            raise InvalidInputError(f"{source}: features have shape {features.shape}, expected (N, D)")
        if features.shape[0] == 0:
            raise InvalidInputError(
                f"{source}: the bag is empty (0 instances); re-extract features from a slide region with tissue"
            )
        self.metadata.check_feature_dim(features.shape[1], source)
        if not np.issubdtype(features.dtype, np.number):
            raise InvalidInputError(f"{source}: features have dtype {features.dtype}, expected floats")
        features = np.ascontiguousarray(features, dtype=np.float32)  # (N, D)
        # One float32 reduction: NaN or Inf anywhere makes the sum non-finite. Huge finite values can
        # overflow it too; the row scan below then finds nothing and the bag passes.
        with np.errstate(invalid="ignore", over="ignore"):
            clean = bool(np.isfinite(features.sum()))
        if clean:
            return features
        nan_rows = np.isnan(features).any(axis=1)  # (N,) located only when the reduction tripped
        inf_rows = np.isinf(features).any(axis=1)  # (N,)
        if nan_rows.any() or inf_rows.any():
            found = [f"NaN in {_count_rows(nan_rows)}"] if nan_rows.any() else []
            found += [f"Inf in {_count_rows(inf_rows)}"] if inf_rows.any() else []
            raise InvalidInputError(
                f"{source}: features contain {' and '.join(found)} of {features.shape[0]}; "
                "re-encode the slide or drop those tiles"
            )
        return features

    def _check_coords(self, coords: np.ndarray | None, n: int, source: str) -> np.ndarray | None:
        if coords is None:
            if self.needs_coords:
                raise ContractMismatchError(
                    f"{source}: model {self.metadata.model_name} needs tile coordinates "
                    "(a `coords` dataset in the feature file); re-extract features with coords"
                )
            return None
        coords = np.asarray(coords)
        if coords.shape != (n, 2):
            raise InvalidInputError(f"{source}: coords have shape {coords.shape}, expected ({n}, 2) grid (y, x)")
        if not np.issubdtype(coords.dtype, np.integer):
            raise InvalidInputError(f"{source}: coords must be integer grid positions, got {coords.dtype}")
        return coords.astype(np.int64)  # (N, 2) (y, x)

    # -- running -------------------------------------------------------------------------------
    def _feeds(self, features: np.ndarray, mask: np.ndarray, coords: list[np.ndarray | None]) -> dict:
        """ONNX inputs for a padded batch: features (B, N, D), mask (B, N), coords of each bag."""
        feeds = {contract.FEATURES: features, contract.MASK: mask}
        if not self.needs_coords:
            return feeds
        padded = np.zeros((*mask.shape, 2), dtype=np.int64)  # (B, N, 2)
        for b, bag_coords in enumerate(coords):
            padded[b, : len(bag_coords)] = bag_coords
        if contract.COORDS in self.metadata.inputs:
            feeds[contract.COORDS] = padded
        if contract.EDGE_INDEX in self.metadata.inputs:
            from mil_runtime.graphs import batch_graph  # only graph models pay for it

            rule = self.metadata.graph or {}
            edge_index, edge_weight = batch_graph(padded, mask, rule["rule"], **(rule.get("params") or {}))
            feeds[contract.EDGE_INDEX] = edge_index  # (2, E) into the flattened (B * N) node space
            feeds[contract.EDGE_WEIGHT] = edge_weight.astype(np.float32)  # (E,)
        return feeds

    def _run(self, feeds: dict) -> dict:
        try:
            return self.session.run(feeds)
        except MilkitError:
            raise
        except Exception as exc:  # onnxruntime's own failure types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MilkitError(f"{self.path}: onnxruntime failed ({first[:200]})") from exc

    def _prediction(self, logits: np.ndarray, probabilities: np.ndarray, attention: np.ndarray,
                    attention_by_class: np.ndarray | None = None,
                    instance_probabilities: np.ndarray | None = None) -> Prediction:
        """One bag's Prediction; attention_by_class: (n_classes, N) rows in class order, or None;
        instance_probabilities: (N, n_classes) columns in class order (binary: the positive class), or None."""
        logits = logits.astype(np.float32)  # (C,)
        probabilities = probabilities.astype(np.float32)  # (C,)
        if self.metadata.n_classes == 1:
            positive = float(probabilities[0])
            class_probabilities = np.array([1.0 - positive, positive], dtype=np.float32)  # (2,)
            predicted = int(positive >= 0.5)
        else:
            class_probabilities = probabilities
            predicted = int(np.argmax(probabilities))
        return Prediction(
            logits=logits,
            probabilities=probabilities,
            class_probabilities=class_probabilities,
            class_names=list(self.class_names),
            predicted_index=predicted,
            attention=attention.astype(np.float32),
            attention_by_class=None if attention_by_class is None else {
                name: row.astype(np.float32) for name, row in zip(self.class_names, attention_by_class)
            },
            instance_probabilities=None if instance_probabilities is None else self._by_class_columns(
                instance_probabilities
            ),
        )

    def _by_class_columns(self, columns: np.ndarray) -> dict[str, np.ndarray]:
        """(N, n_classes) -> {class name: (N,) float32}; a binary model's one column is the positive class."""
        names = self.class_names[1:] if self.metadata.n_classes == 1 else self.class_names
        return {name: np.ascontiguousarray(columns[:, k], dtype=np.float32) for k, name in enumerate(names)}

    def predict(
        self, features: np.ndarray, coords: np.ndarray | None = None, *, source: str = "features"
    ) -> Prediction:
        """Predict one bag: features (N, D); coords (N, 2) int grid (y, x), needed by graph/spatial models.

        `source` names the input in error messages.
        """
        return self.predict_batch([(features, coords)], sources=[source])[0]

    def predict_batch(
        self,
        bags: Sequence[np.ndarray | tuple[np.ndarray, np.ndarray | None]],
        *,
        sources: Sequence[str] | None = None,
    ) -> list[Prediction]:
        """Predict several bags in one run, padded to the largest with a mask.

        Each bag is a features array (N_i, D) or a (features, coords) pair.
        """
        if len(bags) == 0:
            return []
        sources = list(sources) if sources is not None else [f"bag {i}" for i in range(len(bags))]
        checked_features, checked_coords = [], []
        for bag, source in zip(bags, sources):
            bag_features, bag_coords = bag if isinstance(bag, tuple) else (bag, None)
            bag_features = self._check_features(bag_features, source)
            checked_features.append(bag_features)
            checked_coords.append(self._check_coords(bag_coords, len(bag_features), source))

        sizes = [len(f) for f in checked_features]
        features, mask = _padded(checked_features, sizes)
        outputs = self._run(self._feeds(features, mask, checked_coords))
        if not self.metadata.is_classifier:
            return [self._task_prediction(outputs, b, sizes[b]) for b in range(len(bags))]
        by_class = outputs.get(contract.ATTENTION_BY_CLASS)  # (B, C, N) or None
        instance = outputs.get(contract.INSTANCE_PROBABILITIES)  # (B, N, C) or None
        return [
            self._prediction(
                outputs[contract.LOGITS][b],  # (C,)
                outputs[contract.PROBABILITIES][b],  # (C,)
                outputs[contract.ATTENTION][b, : sizes[b]],  # (N_b,)
                None if by_class is None else by_class[b, :, : sizes[b]],  # (C, N_b)
                None if instance is None else instance[b, : sizes[b]],  # (N_b, C)
            )
            for b in range(len(bags))
        ]


    def _task_prediction(self, outputs: dict, b: int, size: int) -> Prediction:
        """Bag b's Prediction from a regression or survival graph's outputs."""
        empty = np.zeros(0, dtype=np.float32)
        fields: dict = {}
        if self.task == contract.REGRESSION:
            row = outputs[contract.VALUES][b]  # (n_targets,)
            fields["values"] = {name: float(v) for name, v in zip(self.metadata.target_names, row)}
        else:
            fields["risk"] = float(outputs[contract.RISK][b])
            for name in (contract.HAZARDS, contract.SURVIVAL):
                if name in outputs:
                    fields[name] = outputs[name][b].astype(np.float32)  # (n_bins,)
        return Prediction(logits=empty, probabilities=empty, class_probabilities=empty, class_names=[],
                          predicted_index=-1, attention=outputs[contract.ATTENTION][b, :size].astype(np.float32),
                          task=self.task, **fields)


def _padded(bags: list[np.ndarray], sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(B, N, D) features padded with zeros and their (B, N) mask; one bag is a view, never a copy."""
    if len(bags) == 1:
        return bags[0][None], np.ones((1, sizes[0]), dtype=bool)  # (1, N, D), (1, N)
    features = np.zeros((len(bags), max(sizes), bags[0].shape[1]), dtype=np.float32)  # (B, N, D)
    mask = np.zeros((len(bags), max(sizes)), dtype=bool)  # (B, N)
    for b, bag_features in enumerate(bags):
        features[b, : sizes[b]] = bag_features
        mask[b, : sizes[b]] = True
    return features, mask


def load_model(path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> MILRunner:
    """Open an exported milkit MIL model.

    Raises InputNotFoundError, ModelFormatError (unreadable, not milkit, or an encoder) or DeviceError.
    """
    session = open_session(path, device=device, threads=threads)
    if session.metadata.kind != "mil":
        raise ModelFormatError(
            f"{path} is a milkit {session.metadata.kind} ({session.metadata.model_name}), not a MIL model; "
            "pass it with --encoder and give --model the MIL model"
        )
    return MILRunner(session)
