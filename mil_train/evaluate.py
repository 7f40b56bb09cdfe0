"""`mil-eval MODEL DATA`: score a checkpoint or an exported model on labelled bags, with bootstrap CIs.

    mil-eval abmil.pt ../shared/data/mil/musk1.csv                  # a training checkpoint (.pt)
    mil-eval abmil.onnx slides_h5/ --labels labels.csv --json eval.json   # an exported file, by onnxruntime

MODEL is a checkpoint written by mil-train (read with `torch.load(weights_only=True)`) or a milkit ONNX
file (run as exported, by onnxruntime: what mil-infer would score). DATA is any of mil-train's inputs.
Each bag is scored alone. A classifier reports AUROC, balanced accuracy, accuracy and F1 (from its
logits in float64); a survival model the concordance index of its risk; a regression model MAE, RMSE
and R². Every metric comes with a percentile
bootstrap confidence interval: `--n-bootstrap` resamples of the bags with replacement (seeded by
`--seed`, so the interval repeats), the metric recomputed on each; resamples on which it is undefined
(one class only, no comparable pair) are left out and counted. Errors print one line and exit with
the code of mil_runtime.errors.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from mil_runtime.errors import InputNotFoundError, InvalidInputError, MilkitError, ModelFormatError, OutputError

CLASSIFICATION_METRICS = ("auroc", "balanced_accuracy", "accuracy", "f1")


def bootstrap_intervals(
    metrics: Callable[..., dict[str, float]], arrays: Sequence[np.ndarray], *, n_resamples: int = 1000,
    confidence: float = 0.95, seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Each metric on the arrays (aligned on axis 0) and its percentile bootstrap interval.

    `metrics` maps the arrays to {name: value}. Returns {name: {"value", "low", "high", "n_resamples"}}:
    n_resamples counts the resamples on which that metric was defined (finite); low and high are NaN
    when none was. The same seed draws the same resamples.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    point = metrics(*arrays)
    drawn: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(n_resamples):
        rows = rng.integers(0, n, size=n)  # (n,) bags drawn with replacement
        for name, value in metrics(*(a[rows] for a in arrays)).items():
            if math.isfinite(value):
                drawn[name].append(value)
    tail = (1 - confidence) / 2 * 100
    intervals = {}
    for name, values in drawn.items():
        low, high = np.percentile(values, [tail, 100 - tail]) if values else (math.nan, math.nan)
        intervals[name] = {"value": float(point[name]), "low": float(low), "high": float(high),
                           "n_resamples": len(values)}
    return intervals


def classification_intervals(labels, probabilities, n_classes: int, **bootstrap: Any) -> dict[str, dict[str, float]]:
    """AUROC, balanced accuracy, accuracy and F1, each with its bootstrap interval.

    The values on the whole set are mil_train.metrics' (the Trainer's numbers); the resamples use
    `resample_metrics`, the same definitions in plain numpy, some thirty times faster than sklearn's.
    """
    from mil_train.metrics import classification_metrics

    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    intervals = bootstrap_intervals(lambda y, p: resample_metrics(y, p, n_classes), [labels, probabilities],
                                    **bootstrap)
    point = classification_metrics(labels, probabilities, n_classes)
    for name in CLASSIFICATION_METRICS:
        intervals[name]["value"] = float(point[name])
    return intervals


def resample_metrics(y: np.ndarray, p: np.ndarray, n_classes: int) -> dict[str, float]:
    """mil_train.metrics.classification_metrics in numpy: the same AUROC (NaN when a class is absent;
    macro one-vs-rest for several classes), accuracy, balanced accuracy (mean recall over the classes
    present) and F1 (positive class; macro over all classes, 0 where undefined)."""
    from scipy.stats import rankdata

    kinds = 2 if n_classes == 1 else n_classes
    scores = p.reshape(-1, 1) if n_classes == 1 else p / p.sum(axis=1, keepdims=True)  # (n, 1) or (n, C)
    predicted = (scores[:, 0] >= 0.5).astype(np.int64) if n_classes == 1 else scores.argmax(axis=1)  # (n,)
    counts = np.bincount(y, minlength=kinds)  # (kinds,)
    if np.any(counts == 0):
        area = math.nan
    else:
        columns = [(1, scores[:, 0])] if n_classes == 1 else list(enumerate(scores.T))
        areas = []
        for c, column in columns:
            ranks = rankdata(column)  # (n,) average ranks over ties, as the Mann-Whitney statistic needs
            n_pos = counts[c]
            areas.append((ranks[y == c].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos)))
        area = float(np.mean(areas))
    hits = np.bincount(y[predicted == y], minlength=kinds)  # (kinds,) true positives per class
    guessed = np.bincount(predicted, minlength=kinds)  # (kinds,)
    present = counts > 0
    recall = hits[present] / counts[present]
    f1_of = lambda c: 2 * hits[c] / (counts[c] + guessed[c]) if counts[c] + guessed[c] else 0.0  # noqa: E731
    f1 = f1_of(1) if n_classes == 1 else float(np.mean([f1_of(c) for c in range(kinds)]))
    return {"auroc": area, "balanced_accuracy": float(recall.mean()), "accuracy": float(np.mean(predicted == y)),
            "f1": float(f1)}


def survival_intervals(times, events, risk, **bootstrap: Any) -> dict[str, dict[str, float]]:
    """The concordance index of `risk` (higher = earlier event) with its bootstrap interval."""
    from mil_train.metrics import concordance_index

    return bootstrap_intervals(lambda t, e, r: {"c_index": concordance_index(t, e, r)}, [times, events, risk],
                               **bootstrap)


def regression_intervals(targets, values, **bootstrap: Any) -> dict[str, dict[str, float]]:
    """MAE, RMSE and R² (mil_train.metrics.regression_metrics) with their bootstrap intervals."""
    from mil_train.metrics import regression_metrics

    return bootstrap_intervals(regression_metrics, [targets, values], **bootstrap)


# -- scoring the bags -----------------------------------------------------------------------------


def score_checkpoint(path: Path, bags: list, data: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per-bag outputs of a checkpoint's model in eager PyTorch, and what the evaluation needs to know."""
    from mil_train.checkpoint import load_checkpoint
    from mil_train.cli import with_spatial_inputs
    from mil_train.trainer import Trainer, make_loader

    try:
        model, payload = load_checkpoint(path)
    except Exception as exc:  # not a checkpoint, torn, or a pickle weights_only refuses
        raise ModelFormatError(f"cannot read {path} as a milkit checkpoint ({str(exc).splitlines()[0][:200]})") from None
    bags = with_spatial_inputs(model, bags, data)
    predicted = Trainer(model, progress=False).predict(make_loader(bags, batch_size=1))
    outputs = {name: value.float().numpy() for name, value in predicted.items() if hasattr(value, "numpy")}
    task = getattr(getattr(model, "task", None), "type", "classification")
    return outputs, {"task": task, "n_classes": model.n_classes, "class_names": payload.get("class_names"),
                     "feature_dim": int(model.config.get("in_dim", 0)) or None, "model_name": model.name}


def score_onnx(path: Path, bags: list) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per-bag outputs of an exported file, run by onnxruntime one bag at a time."""
    import onnxruntime as ort

    from mil_runtime import contract
    from mil_train.data import with_graph

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own types for bad protobufs
        raise ModelFormatError(f"{path} is not a readable ONNX model ({str(exc).strip()[:200]})") from None
    metadata = contract.ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, source=str(path))
    if metadata.kind != "mil":
        raise InvalidInputError(f"{path} is an encoder; mil-eval scores MIL models")
    metadata.check_feature_dim(int(bags[0]["X"].shape[-1]), source=str(path))
    rows: dict[str, list[np.ndarray]] = {name: [] for name in metadata.outputs if name != contract.ATTENTION}
    for bag in bags:
        if metadata.graph is not None:
            bag = with_graph(bag, metadata.graph)
        feeds = _feeds(bag, metadata.inputs, contract)
        for name, value in zip(rows, session.run(list(rows), feeds)):
            rows[name].append(value[0])
    outputs = {name: np.stack(values) for name, values in rows.items()}
    task = getattr(metadata, "task_type", None) or "classification"
    return outputs, {"task": task, "n_classes": metadata.n_classes, "class_names": metadata.class_names,
                     "feature_dim": metadata.feature_dim, "model_name": metadata.model_name}


def _feeds(bag, inputs: Sequence[str], contract) -> dict[str, np.ndarray]:
    X = bag["X"].float().numpy()  # (bag, dim)
    available = {
        contract.FEATURES: X[None],  # (1, bag, dim)
        contract.MASK: np.ones((1, X.shape[0]), dtype=bool),  # (1, bag)
    }
    if "coords" in bag.keys():
        available[contract.COORDS] = bag["coords"].long().numpy()[None]  # (1, bag, 2)
    if "edge_index" in bag.keys():
        available[contract.EDGE_INDEX] = bag["edge_index"].long().numpy()  # (2, edges)
        available[contract.EDGE_WEIGHT] = bag["edge_weight"].float().numpy()  # (edges,)
    missing = [name for name in inputs if name not in available]
    if missing:
        raise InvalidInputError(f"the model reads {', '.join(missing)}, which these bags lack; give bags with coords")
    return {name: available[name] for name in inputs}


# -- the evaluation -------------------------------------------------------------------------------


def evaluate(
    model_path: Path, data: Path, *, labels_csv: Path | None = None, n_bootstrap: int = 1000,
    confidence: float = 0.95, seed: int = 0,
) -> dict[str, Any]:
    """What `mil-eval` does: {"model", "data", "n_bags", "task", "confidence", "metrics": {name: interval}}."""
    from mil_train.cli import check_finite, load_bags

    if not model_path.exists():
        raise InputNotFoundError(f"{model_path} does not exist; give a mil-train checkpoint (.pt) or an exported .onnx")
    bags, names_from_data = load_bags(data, labels_csv)
    check_finite(bags)
    if model_path.suffix.lower() == ".onnx":
        outputs, about = score_onnx(model_path, bags)
    else:
        outputs, about = score_checkpoint(model_path, bags, data)
    bootstrap = {"n_resamples": n_bootstrap, "confidence": confidence, "seed": seed}
    if about["task"] == "survival":
        times, events = _survival_targets(bags)
        metrics = survival_intervals(times, events, outputs["risk"].reshape(-1), **bootstrap)
    elif about["task"] == "classification":
        labels = _class_labels(bags, names_from_data, about["class_names"])
        probabilities = probabilities_from_logits(outputs["logits"], about["n_classes"])
        metrics = classification_intervals(labels, probabilities, about["n_classes"], **bootstrap)
    elif about["task"] == "regression":
        targets = np.stack([bag["Y"].reshape(-1).double().numpy() for bag in bags])  # (n_bags, n_targets)
        metrics = regression_intervals(targets, outputs["values"].reshape(targets.shape), **bootstrap)
    else:
        raise InvalidInputError(f"mil-eval scores classification, survival and regression models; this one's task "
                                f"is {about['task']}")
    return {"model": str(model_path), "model_name": about["model_name"], "data": str(data), "n_bags": len(bags),
            "task": about["task"], "confidence": confidence, "n_bootstrap": n_bootstrap, "seed": seed,
            "metrics": metrics}


def probabilities_from_logits(logits: np.ndarray, n_classes: int) -> np.ndarray:
    """Sigmoid or softmax in float64. A float32 probability saturates at 1 for logits past ~17, and
    onnxruntime and PyTorch saturate at slightly different logits: the ties they make would rank
    bags differently and move the AUROC. From float64 logits both rank as the logits do."""
    logits = np.asarray(logits, dtype=np.float64)  # (n_bags, n_classes)
    if n_classes == 1:
        return 1.0 / (1.0 + np.exp(-logits.reshape(-1)))  # (n_bags,)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))  # (n_bags, n_classes)
    return shifted / shifted.sum(axis=1, keepdims=True)


def _class_labels(bags: list, names_from_data: list[str] | None, model_names: list[str] | None) -> np.ndarray:
    """Class indices in the model's order: text labels are matched to the model's class names by name."""
    from mil_train.cli import bag_labels

    labels = np.asarray(bag_labels(bags))
    if names_from_data is None or not model_names:
        return labels
    unknown = sorted(set(names_from_data) - set(model_names))
    if unknown:
        raise InvalidInputError(f"the labels name {', '.join(unknown)}, which the model does not know "
                                f"(its classes: {', '.join(model_names)})")
    to_model = np.array([model_names.index(name) for name in names_from_data])
    return to_model[labels]


def _survival_targets(bags: list) -> tuple[np.ndarray, np.ndarray]:
    """(time, event) per bag, from Y = (time, event) as survival bags carry them."""
    Y = np.stack([bag["Y"].reshape(-1).double().numpy() for bag in bags])
    if Y.shape[1] != 2:
        raise InvalidInputError("a survival model needs bags labelled with (time, event); these have one label each")
    return Y[:, 0], Y[:, 1]


def format_report(report: dict[str, Any]) -> str:
    """The metrics as a small table: name, value, interval, resamples used."""
    percent = f"{report['confidence'] * 100:g}% CI"
    lines = [f"{report['model_name']} on {report['n_bags']} bags ({report['data']}):",
             f"  {'metric':<18} {'value':>7}  {percent:<18} resamples"]
    for name, interval in report["metrics"].items():
        ci = f"[{interval['low']:.4f}, {interval['high']:.4f}]"
        lines.append(f"  {name:<18} {interval['value']:>7.4f}  {ci:<18} {interval['n_resamples']}")
    return "\n".join(lines)


class OneLineUsageError(click.UsageError):
    def show(self, file=None) -> None:
        click.echo(f"mil-eval: error: {' '.join(self.format_message().split())} (see mil-eval --help)", err=True)


class OneLineCommand(click.Command):
    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise OneLineUsageError(exc.format_message(), exc.ctx) from None


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--labels", "labels_csv", type=click.Path(path_type=Path), help="slide_id,label table for a .h5 folder")
@click.option("--n-bootstrap", default=1000, show_default=True, type=click.IntRange(min=1), help="bootstrap resamples")
@click.option("--confidence", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--seed", default=0, show_default=True, type=int, help="seeds the resampling")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the report as JSON")
def main(model, data, labels_csv, n_bootstrap, confidence, seed, json_path) -> None:
    """Score MODEL (a .pt checkpoint or an exported .onnx) on the labelled bags in DATA, with bootstrap CIs."""
    try:
        report = evaluate(model, data, labels_csv=labels_csv, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
        if json_path is not None:
            _write_json(json_path, report)
    except MilkitError as exc:
        click.echo(f"mil-eval: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    click.echo(format_report(report))


def _write_json(path: Path, report: dict[str, Any]) -> None:
    if not path.parent.is_dir():
        raise OutputError(f"the folder of {path} does not exist; create it first")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
