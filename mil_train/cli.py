"""`mil-train`: train a registered MIL model on bags from disk and save a checkpoint.

    mil-train ABMIL ../shared/data/mil/musk1.csv -o abmil.pt --model-arg gated=true --epochs 50
    mil-train MODEL bags/ -o model.pt --loss-weight cls=1 --loss-weight NAME=0.3   # weigh named loss terms
    mil-train ProbSmoothABMIL bags/ -o m.pt --loss-weight kl=linear:0:1:10         # anneal a term in
    mil-train ABMIL musk1.csv -o cv/abmil.pt --folds 10 --log-dir runs/abmil       # stratified 10-fold CV
    mil-train ABMIL bags/ -o model.pt --resume                                     # go on after a crash
    mil-train TransMIL h5/ --labels os.csv --task survival -o surv.pt              # columns slide_id,time,event
    mil-train ABMIL h5/ --labels t.csv --task regression --label-columns age -o r.pt --task-arg loss=huber

DATA is one of
  - a classic MIL .csv (label, bag id, features; no header),
  - a torchmil folder (features/ and labels/ with one .npy/.h5 per bag),
  - a folder of CLAM/TRIDENT feature .h5 files, with `--labels table.csv` (columns slide_id,label;
    with --task survival slide_id,time,event (event 1 observed, 0 censored), with --task regression
    slide_id and the target columns, named by --label-columns). Survival trains a discrete-time hazard
    head (PatchGCN's NLL, bins at the quantiles of the observed times; --task-arg n_bins=4) or, with
    --task-arg loss=cox, a Cox head (use --batch-size > 1); regression MSE (--task-arg loss=huber).
    The Trainer then reports the c-index, or MAE, RMSE and R² (monitored as val_c_index / val_mae).
Graph and spatial models (CAMIL, GTP, PatchGCN, SETMIL, SmABMIL, SmTransformerABMIL) need tile coords:
.h5 files with `coords`, or a torchmil folder with coords/; graph models get their graph built once
from the coords by the rule the model records (the rule its exported file carries to mil-infer).
The feature dimension comes from the data; binary 0/1 labels train one sigmoid logit, more classes
a softmax. `--loss-weight NAME=W` weighs the loss term NAME (terms not named weigh 1; "cls" is the
classification loss, a model card names its auxiliary terms); a NAME the model does not return stops
training after the first batch. A weight may follow a schedule over optimizer steps,
`linear:START:END:STEPS` or `cyclical:MIN:MAX:CYCLE[:RISE[:WARMUP]]` (mil_train.schedules).
Errors print one line and exit with the code of mil_runtime.errors.

Imbalance: `--class-weights auto` weighs each training bag's classification loss by n / (K n_c) of its
class; `--balanced-sampler` draws each epoch's bags with replacement, classes about equally often
(mil_train.sampling).

Cross-validation: `--folds K` splits the bags into K stratified folds (the same folds under the same
--seed, for every model: mil_train.folds); fold f trains on the other folds (less --val-fraction of them
for validation and early stopping) and is scored on its own bags with its best weights. It writes
`<stem>.fold<f><suffix>` per fold beside -o, and `<stem>.folds.json`: each fold's bags, best epoch and
test metrics, and their mean and standard deviation.

Resuming: every single-process run also keeps `<stem>.last<suffix>` beside each checkpoint, the state
after the latest epoch; `--resume` with the same command continues from it (skipping finished folds),
and ends where the uninterrupted run would have. Without such a file, --resume starts afresh.

Logs: `--log-dir DIR` writes DIR/metrics.csv and, when the tensorboard package is importable, TensorBoard
event files into DIR (one subfolder per fold under --folds); `--log FILE` writes the CSV alone.

Over processes (mil_train/distributed.py): `mil-train ... --nproc N` starts N processes on this machine
(DDP: gloo on CPU, NCCL with one GPU each on CUDA); under `torchrun --nproc-per-node N -m mil_train.cli ...`
leave --nproc out, and write the log option as --log-csv (torchrun's own parser takes --log for its
--log-dir and refuses it as ambiguous). Each rank trains on a share of the training bags balanced by bag size; logged
metrics are reduced over the ranks; rank 0 alone writes the log and the checkpoint, and prints.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from mil_runtime.errors import InputNotFoundError, InvalidInputError, MilkitError, OutputError


def parse_model_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    """key=value pairs; values read as JSON or Python literals (3, 0.5, true, [256, 128]), else text."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"--model-arg {pair!r} is not key=value; write e.g. --model-arg gated=true")
        kwargs[key.strip()] = _literal(text.strip())
    return kwargs


def set_instance_dim(bags: list, kwargs: dict[str, Any]) -> None:
    """kwargs["in_dim"] from the bags: their feature width, or for image bags (N, 3, H, W) the width of
    the feature extractor kwargs["feat_ext"] names (required then, and taking images of its input size)."""
    X = bags[0]["X"]
    if X.ndim == 2:
        in_dim = int(X.shape[-1])
        if "feat_ext" in kwargs:
            raise InvalidInputError("--feat-ext is for bags of images (N, 3, H, W); these bags hold features")
    else:
        spec = kwargs.get("feat_ext")
        if spec is None:
            raise InvalidInputError(f"the bags hold images {tuple(X.shape)}; give a feature extractor to learn their "
                                    "features, e.g. --feat-ext small_cnn (mil_train.feat_ext)")
        from mil_train.feat_ext import create_feature_extractor

        spec = dict(spec)
        try:
            extractor = create_feature_extractor(spec.pop("name"), **spec)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"--feat-ext: {exc}") from None
        if tuple(X.shape[1:]) != extractor.in_shape:
            raise InvalidInputError(f"the bags hold {tuple(X.shape[1:])} images but the feature extractor takes "
                                    f"{extractor.in_shape}; give it input_px={X.shape[-1]} or resize the images")
        in_dim = extractor.output_dim
    if kwargs.setdefault("in_dim", in_dim) != in_dim:
        raise InvalidInputError(f"--model-arg in_dim={kwargs['in_dim']} but the data has {in_dim} features per instance")


def build_model(model_name: str, kwargs: dict[str, Any], bags: list, data: Path, seed: int) -> tuple[Any, list]:
    """The model built under `seed` (a wrong argument is exit 6), and the bags with the inputs it needs."""
    from mil_train.models import create_model
    from mil_train.trainer import seed_everything

    seed_everything(seed)
    try:
        model = create_model(model_name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"cannot build {model_name} with {kwargs}: {exc}") from None
    return model, with_spatial_inputs(model, bags, data)


def feat_ext_args(feat_ext: str | None, instance_chunk: int | None) -> tuple[str, ...]:
    """--feat-ext NAME or JSON ({"name": ..., **config}) and --instance-chunk as --model-arg pairs."""
    pairs: tuple[str, ...] = ()
    if feat_ext is not None:
        text = feat_ext.strip()
        try:
            spec = json.loads(text) if text.startswith("{") else {"name": text}
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"--feat-ext {feat_ext!r} is neither a name nor a JSON object ({exc.msg})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInputError(f"--feat-ext {feat_ext!r}: a JSON object needs a \"name\"")
        pairs += (f"feat_ext={json.dumps(spec)}",)
    if instance_chunk is not None:
        if feat_ext is None:
            raise InvalidInputError("--instance-chunk is for models with a feature extractor (--feat-ext)")
        pairs += (f"instance_chunk={int(instance_chunk)}",)
    return pairs


def parse_loss_weights(pairs: tuple[str, ...]) -> dict[str, Any]:
    """NAME=W pairs -> {NAME: W}; W a finite number >= 0 or a schedule (mil_train.schedules), each NAME once."""
    weights: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InvalidInputError(f"--loss-weight {pair!r} is not NAME=W; write e.g. --loss-weight cls=1.0")
        if ":" in text:
            if name in weights:
                raise InvalidInputError(f"--loss-weight {name} is given twice; give each term once")
            weights[name] = _schedule(pair, text)
            continue
        try:
            weight = float(text)
        except ValueError:
            raise InvalidInputError(f"--loss-weight {pair!r}: W must be a number, e.g. {name}=0.5") from None
        if not math.isfinite(weight) or weight < 0:
            raise InvalidInputError(f"--loss-weight {pair!r}: W must be a finite number >= 0 (0 switches a term off)")
        if name in weights:
            raise InvalidInputError(f"--loss-weight {name} is given twice; give each term once")
        weights[name] = weight
    return weights


def _schedule(pair: str, text: str) -> Any:
    from mil_train.schedules import parse_schedule

    try:
        return parse_schedule(text)
    except ValueError as exc:
        raise InvalidInputError(f"--loss-weight {pair!r}: {exc}") from None


def recorded_weights(weights: dict[str, Any]) -> dict[str, Any]:
    """The weights as the provenance records them: numbers, and schedules in their command-line form."""
    from mil_train.schedules import LossWeightSchedule

    return {name: w.describe() if isinstance(w, LossWeightSchedule) else w for name, w in weights.items()}


def _literal(text: str) -> Any:
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            continue
    return text


# -- reading the data ---------------------------------------------------------------------------


def _clam_labels(table: Path) -> dict[str, str]:
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"slide_id", "label"} <= set(reader.fieldnames):
            raise InvalidInputError(f"{table} needs the columns slide_id,label (found {reader.fieldnames})")
        labels = {}
        for number, row in enumerate(reader, start=2):  # line 1 is the header
            slide, label = (row.get("slide_id") or "").strip(), (row.get("label") or "").strip()
            if not slide or not label:
                what = f"slide {slide} has an empty label" if slide else "the slide_id cell is empty"
                raise InvalidInputError(f"{table} line {number}: {what}; fill it in or drop the row")
            labels[Path(slide).stem] = label
        return labels


def _load_clam_folder(root: Path, labels_csv: Path | None, task: TaskOptions | None = None) -> tuple[list, list[str] | None]:
    from mil_train.data.readers import read_clam_h5, read_label_table

    if labels_csv is None:
        raise InvalidInputError(f"{root} holds .h5 feature files without labels; pass --labels table.csv (slide_id,label)")
    files = sorted(root.glob("*.h5"))
    if task is not None and task.type != "classification":  # numeric label columns: (time, event) or targets
        numeric = read_label_table(labels_csv, task.columns, survival=task.type == "survival")
        missing = [p.stem for p in files if p.stem not in numeric]
        if missing:
            raise InvalidInputError(f"{labels_csv} has no row for {missing[:3]} ({len(missing)} files); add rows for them")
        return [read_clam_h5(p, label=numeric[p.stem]) for p in files], None
    table = _clam_labels(labels_csv)
    missing = [p.stem for p in files if p.stem not in table]
    if missing:
        raise InvalidInputError(f"{labels_csv} has no label for {missing[:3]} ({len(missing)} files); add rows for them")
    names = sorted(set(table[p.stem] for p in files))
    if all(_is_int(n) for n in names):
        index = {n: int(n) for n in names}
        class_names = None
    else:  # text labels: classes in sorted order
        index = {n: i for i, n in enumerate(names)}
        class_names = names
    return [read_clam_h5(p, label=index[table[p.stem]]) for p in files], class_names


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def load_bags(data: Path, labels_csv: Path | None = None, task: TaskOptions | None = None) -> tuple[list, list[str] | None]:
    """Bags from DATA (see the module docstring) and class names when the data names them; with a
    regression or survival `task`, a .h5 folder's labels come from the task's columns of --labels."""
    from mil_train.data.readers import read_mil_csv
    from mil_train.data.torchmil_folder import TorchmilFolderDataset

    if not data.exists():
        raise InputNotFoundError(f"{data} does not exist; give a MIL .csv, a torchmil folder or a folder of .h5 files")
    try:
        if data.is_file() and data.suffix.lower() == ".csv":
            return read_mil_csv(data), None
        if data.is_dir() and (data / "features").is_dir():
            dataset = TorchmilFolderDataset(data)
            return [dataset[i] for i in range(len(dataset))], None
        if data.is_dir() and any(data.glob("*.h5")):
            return _load_clam_folder(data, labels_csv, task)
    except MilkitError:
        raise
    except FileNotFoundError as exc:
        raise InputNotFoundError(str(exc)) from None
    except (ValueError, OSError) as exc:
        message = str(exc)  # a reader's message that starts with the file's name does not repeat it
        rest = message[len(str(data)):] if message.startswith(str(data)) else f": {message}"
        raise InvalidInputError(f"cannot read {data}{rest}") from None
    raise InvalidInputError(
        f"{data} is neither a MIL .csv, a torchmil folder (features/, labels/) nor a folder of .h5 feature files"
    )


def bag_labels(bags: list) -> list[int]:
    labels = []
    for i, bag in enumerate(bags):
        Y = bag["Y"]
        if Y.ndim != 0 or not bool(Y.isfinite()) or float(Y) != int(Y) or int(Y) < 0:
            raise InvalidInputError(f"bag {i} has label {Y.tolist()}; mil-train needs one class index (0, 1, ...) per bag")
        labels.append(int(Y))
    if not labels:
        raise InvalidInputError("the data holds no bags")
    return labels


def check_finite(bags: list) -> None:
    """Refuse NaN/Inf features (exit 6): one reduction per bag, the bad rows located only when it trips."""
    import torch

    for i, bag in enumerate(bags):
        X = bag["X"]
        if bool(torch.isfinite(X.sum(dtype=torch.float64))):
            continue
        bad = ~torch.isfinite(X.reshape(X.shape[0], -1)).all(dim=1)  # (N,)
        rows = torch.nonzero(bad).flatten().tolist()
        what = " and ".join(name for name, test in (("NaN", torch.isnan), ("Inf", torch.isinf)) if bool(test(X).any()))
        raise InvalidInputError(
            f"bag {i} (of {len(bags)}, in file order) has {what} features in {len(rows)} instance(s), first "
            f"instance {rows[0]}; fix or drop them"
        )


def split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified train/validation indices (plain random when a class is too small to stratify)."""
    from sklearn.model_selection import train_test_split

    indices = list(range(len(labels)))
    if val_fraction <= 0:
        return indices, []
    counts = {c: labels.count(c) for c in set(labels)}
    stratify = labels if min(counts.values()) >= 2 else None
    try:
        train, val = train_test_split(indices, test_size=val_fraction, stratify=stratify, random_state=seed)
    except ValueError as exc:
        raise InvalidInputError(f"cannot split {len(labels)} bags with --val-fraction {val_fraction}: {exc}") from None
    return list(train), list(val)


# -- the command --------------------------------------------------------------------------------


def train(
    model_name: str, data: Path, output: Path, *, model_args: tuple[str, ...] = (), epochs: int = 100,
    lr: float = 1e-4, weight_decay: float = 0.0, batch_size: int = 1, val_fraction: float = 0.2,
    patience: int | None = None, seed: int = 0, log: Path | None = None, class_names: str | None = None,
    labels_csv: Path | None = None, device: str = "cpu", progress: bool = True, loss_weights: tuple[str, ...] = (),
    allow_one_class: bool = False, precision: str = "fp32",
    folds: int | None = None, resume: bool = False, class_weights: str = "none", balanced_sampler: bool = False,
    log_dir: Path | None = None, task: TaskOptions | None = None,
) -> dict[str, Any]:
    """What `mil-train` does; returns the best epoch's logged row (with --folds, the folds' summary).

    Under torchrun (WORLD_SIZE > 1 in the environment) each process joins the process group here,
    trains on its share of the bags and leaves the group at the end.
    """
    from mil_train import distributed

    joined = not distributed.is_initialized() and distributed.env_world_size() > 1
    try:
        device = str(distributed.init_from_env(device))
        return _train(
            model_name, data, output, model_args=model_args, epochs=epochs, lr=lr, weight_decay=weight_decay,
            batch_size=batch_size, val_fraction=val_fraction, patience=patience, seed=seed, log=log,
            class_names=class_names, labels_csv=labels_csv, device=device, progress=progress,
            loss_weights=loss_weights, allow_one_class=allow_one_class, precision=precision,
            options=RunOptions(folds, resume, class_weights, balanced_sampler, log_dir), task=task,
        )
    finally:
        if joined:
            distributed.shutdown()


def _train(
    model_name: str, data: Path, output: Path, *, model_args: tuple[str, ...], epochs: int, lr: float,
    weight_decay: float, batch_size: int, val_fraction: float, patience: int | None, seed: int, log: Path | None,
    class_names: str | None, labels_csv: Path | None, device: str, progress: bool, loss_weights: tuple[str, ...],
    allow_one_class: bool, precision: str = "fp32", options: RunOptions | None = None,
    task: TaskOptions | None = None,
) -> dict[str, Any]:
    from mil_train.models import list_models

    options = options or RunOptions()
    if model_name not in list_models():
        raise InvalidInputError(f"unknown model {model_name!r}; choose one of {', '.join(list_models())}")
    if output.is_dir():
        raise OutputError(f"-o {output} is a directory; give the checkpoint file to write, e.g. {output / 'model.pt'}")
    if not output.parent.is_dir():
        raise OutputError(f"the folder of {output} does not exist; create it first")
    if not 0 <= val_fraction < 1:
        raise InvalidInputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if precision == "fp16" and not device.startswith("cuda"):
        raise InvalidInputError(f"--precision fp16 needs --device cuda (got --device {device}); on the CPU use bf16")
    kwargs = parse_model_args(model_args)
    weights = parse_loss_weights(loss_weights)
    if task is not None and task.type != "classification":
        return _train_task(model_name, data, output, task, model_args=model_args, labels_csv=labels_csv,
                           options=options, val_fraction=val_fraction, log=log, batch_size=batch_size,
                           settings=dict(lr=lr, weight_decay=weight_decay, epochs=epochs, patience=patience, seed=seed,
                                         device=device, progress=progress, class_names=None, loss_weights=weights,
                                         precision=precision))
    bags, names_from_data = load_bags(data, labels_csv)
    labels = bag_labels(bags)
    check_finite(bags)
    if len(set(labels)) < 2 and not allow_one_class:
        raise InvalidInputError(
            f"every bag has label {labels[0]}: the data holds one class only, so there is nothing to tell apart; "
            "check the labels, or pass --allow-one-class to train anyway"
        )
    set_instance_dim(bags, kwargs)
    n_found = max(labels) + 1
    kwargs.setdefault("n_classes", 1 if n_found <= 2 else n_found)
    names = class_names.split(",") if class_names else names_from_data
    n_names = 2 if kwargs["n_classes"] == 1 else kwargs["n_classes"]
    if names is not None and len(names) != n_names:
        if class_names:
            raise InvalidInputError(f"--class-names gives {len(names)} names but the task has {n_names} classes")
        raise InvalidInputError(
            f"the labels in {labels_csv} name {len(names)} classes ({', '.join(names)}) but the task has {n_names} "
            f"(n_classes={kwargs['n_classes']}); fix the labels or --model-arg n_classes"
        )

    model, bags = build_model(model_name, kwargs, bags, data, seed)
    provenance = {
        "data": str(data), "n_bags": len(bags), "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
        "loss_weights": recorded_weights(weights), "precision": precision,
        "command": os.environ.get(COMMAND_ENV) or " ".join(sys.argv),
        **options.recorded(),
    }
    settings = dict(lr=lr, weight_decay=weight_decay, epochs=epochs, patience=patience, seed=seed, device=device,
                    progress=progress, class_names=names, loss_weights=weights, precision=precision)
    run = dict(model=model, model_name=model_name, bags=bags, labels=labels, batch_size=batch_size,
               provenance=provenance, settings=settings, options=options)
    if options.folds:
        return cross_validate(output, val_fraction=val_fraction, log=log, **run)
    train_idx, val_idx = split(labels, val_fraction, seed)
    trainer = fit_split(train_idx, val_idx, output, log=log, log_dir=options.log_dir, **run)
    return trainer.history[trainer.best_epoch - 1]


@dataclass(frozen=True)
class TaskOptions:
    """--task, --label-columns, --task-arg: what the model predicts and from which label columns."""

    type: str = "classification"
    label_columns: str | None = None  # comma-separated; default time,event (survival) or label (regression)
    args: tuple[str, ...] = ()  # KEY=VALUE options of the task (mil_train.tasks), e.g. loss=cox, n_bins=8

    @property
    def columns(self) -> list[str]:
        if self.label_columns:
            return [c.strip() for c in self.label_columns.split(",") if c.strip()]
        return ["time", "event"] if self.type == "survival" else ["label"]


def _train_task(model_name: str, data: Path, output: Path, task: TaskOptions, *, model_args: tuple[str, ...],
                labels_csv: Path | None, options: RunOptions, val_fraction: float, log: Path | None,
                batch_size: int, settings: dict[str, Any]) -> dict[str, Any]:
    """mil-train for a regression or survival head (mil_train.tasks): labels checked, bins or target
    scaling from the bags (mil_train.tasks.labels), split stratified by the event for survival."""
    from mil_train.tasks.labels import prepare_task

    if options.class_weights != "none" or options.balanced_sampler:
        raise InvalidInputError(f"--class-weights and --balanced-sampler balance classes; a {task.type} model has none")
    kwargs = parse_model_args(model_args)
    if "n_classes" in kwargs:
        raise InvalidInputError(f"--model-arg n_classes is for classifiers; a {task.type} head's width follows from "
                                "its --task-arg options (n_targets, n_bins)")
    bags, _ = load_bags(data, labels_csv, task)
    check_finite(bags)
    try:
        kwargs["task"], labels = prepare_task(task.type, parse_model_args(task.args), bags,
                                              target_names=task.columns if task.type == "regression" else None)
    except ValueError as exc:
        raise InvalidInputError(f"{data}: {exc}") from None
    set_instance_dim(bags, kwargs)
    model, bags = build_model(model_name, kwargs, bags, data, settings["seed"])
    provenance = {
        "data": str(data), "n_bags": len(bags), "lr": settings["lr"], "weight_decay": settings["weight_decay"],
        "batch_size": batch_size, "loss_weights": recorded_weights(settings["loss_weights"]),
        "precision": settings["precision"], "task": kwargs["task"],
        "command": os.environ.get(COMMAND_ENV) or " ".join(sys.argv), **options.recorded(),
    }
    run = dict(model=model, model_name=model_name, bags=bags, labels=labels, batch_size=batch_size,
               provenance=provenance, settings=settings, options=options)
    if options.folds:
        return cross_validate(output, val_fraction=val_fraction, log=log, **run)
    train_idx, val_idx = split(labels, val_fraction, settings["seed"])
    trainer = fit_split(train_idx, val_idx, output, log=log, log_dir=options.log_dir, **run)
    return trainer.history[trainer.best_epoch - 1]


@dataclass(frozen=True)
class RunOptions:
    """mil-train's training conveniences: --folds, --resume, --class-weights, --balanced-sampler, --log-dir."""

    folds: int | None = None
    resume: bool = False
    class_weights: str = "none"
    balanced_sampler: bool = False
    log_dir: Path | None = None

    def recorded(self) -> dict[str, Any]:
        """What the checkpoint's provenance records (and a resumed run must match)."""
        return {"class_weights": self.class_weights, "balanced_sampler": self.balanced_sampler,
                **({"folds": self.folds} if self.folds else {})}


# The provenance entries a resumed run must share with the interrupted one (beside model, config and seed).
RESUME_MUST_MATCH = ("data", "n_bags", "n_train", "n_val", "lr", "weight_decay", "batch_size", "loss_weights",
                     "precision", "class_weights", "balanced_sampler", "folds", "fold")


def last_checkpoint_path(output: Path) -> Path:
    """Where a run keeps its state after each epoch: model.pt -> model.last.pt."""
    return output.with_name(f"{output.stem}.last{output.suffix}")


def fit_split(
    train_idx: list[int], val_idx: list[int], output: Path, *, model, model_name: str, bags: list, labels: list[int],
    batch_size: int, provenance: dict[str, Any], settings: dict[str, Any], options: RunOptions, log: Path | None,
    log_dir: Path | None,
):
    """Train one model on bags[train_idx], validating on bags[val_idx]; returns the Trainer (best weights in)."""
    from mil_train import distributed
    from mil_train.feature_stats import compute_feature_stats
    from mil_train.sampling import auto_class_weights, balanced_sampler
    from mil_train.trainer import ResumeError, Trainer, UnknownLossTermError, make_loader

    provenance = {**provenance, "n_train": len(train_idx), "n_val": len(val_idx)}
    rank, world = distributed.rank(), distributed.world_size()
    validate = bool(val_idx)  # decided on the whole split: a rank whose share is empty still joins the gathers
    feature_stats = compute_feature_stats(bags[i]["X"] for i in train_idx)  # of all training bags, on every rank
    weights = None
    if options.class_weights == "auto":
        try:
            weights = auto_class_weights([labels[i] for i in train_idx], model.n_classes)
        except ValueError as exc:
            raise InvalidInputError(f"--class-weights auto: {exc}") from None
        provenance["class_weight_values"] = weights
    if world > 1:
        if options.resume:
            raise InvalidInputError("--resume is for single-process runs; leave it out with --nproc or torchrun")
        if len(train_idx) < world:
            raise InvalidInputError(
                f"{world} processes need at least {world} training bags, and the split leaves {len(train_idx)}; "
                "start fewer processes"
            )
        train_idx = _share(bags, train_idx, rank, world)
        val_idx = _share(bags, val_idx, rank, world)
    last = last_checkpoint_path(output) if world == 1 else None
    if options.resume and last is not None and last.exists():
        _check_resumable(last, provenance)
    seed = settings["seed"]
    if options.balanced_sampler:
        sampler = balanced_sampler([labels[i] for i in train_idx], seed=seed + rank)
        train_loader = make_loader([bags[i] for i in train_idx], batch_size=batch_size, sampler=sampler)
    else:
        train_loader = make_loader([bags[i] for i in train_idx], batch_size=batch_size, shuffle=True, seed=seed)
    loggers = _loggers(log_dir, say_missing=provenance.get("fold", 1) == 1) if rank == 0 else []  # once, not per fold
    trainer = Trainer(
        model, checkpoint_path=output, log_csv=log, provenance=provenance, feature_stats=feature_stats,
        class_weights=weights, logger=loggers, last_checkpoint_path=last, **settings,
    )
    try:
        trainer.fit(train_loader, make_loader([bags[i] for i in val_idx], batch_size=batch_size) if validate else None,
                    resume=options.resume)
    except UnknownLossTermError as exc:
        raise InvalidInputError(
            f"--loss-weight names {', '.join(exc.unknown)}, which {model_name} does not compute; "
            f"its loss terms are {', '.join(exc.terms)}"
        ) from None
    except ResumeError as exc:
        raise InvalidInputError(f"--resume: {exc}") from None
    finally:
        for logger in loggers:
            logger.close()
    return trainer


def _check_resumable(last: Path, provenance: dict[str, Any]) -> None:
    """Refuse to resume a run whose data or settings differ from this one's (its epochs would not continue it)."""
    from mil_train.checkpoint import load_checkpoint_payload

    try:
        saved = load_checkpoint_payload(last)["provenance"]
    except Exception as exc:  # a torn or foreign file: say which one
        raise InvalidInputError(f"--resume: cannot read {last} ({exc}); delete it to start afresh") from None
    differ = [key for key in RESUME_MUST_MATCH if saved.get(key) != provenance.get(key)]
    if differ:
        what = "; ".join(f"{key} was {saved.get(key)!r}, now {provenance.get(key)!r}" for key in differ)
        raise InvalidInputError(f"--resume: {last} is another run ({what}); resume with the same command, "
                                "or delete it to start afresh")


def _loggers(log_dir: Path | None, say_missing: bool = True) -> list:
    """--log-dir: a CSV logger, and a TensorBoard one when tensorboard is importable."""
    from mil_train.loggers import CSVLogger, TensorBoardLogger, tensorboard_available

    if log_dir is None:
        return []
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--log-dir {log_dir}: cannot create it ({exc.strerror})") from None
    loggers: list = [CSVLogger(log_dir / "metrics.csv")]
    if tensorboard_available():
        loggers.append(TensorBoardLogger(log_dir))
    elif say_missing:
        click.echo(f"mil-train: --log-dir {log_dir}: writing metrics.csv only (pip install tensorboard for "
                   "TensorBoard event files)", err=True)
    return loggers


def cross_validate(output: Path, *, model, model_name: str, bags: list, labels: list[int], val_fraction: float,
                   options: RunOptions, settings: dict[str, Any], log: Path | None, **run) -> dict[str, Any]:
    """--folds K: one model per stratified fold, each scored on its held-out bags; writes the summary."""
    import copy

    from mil_train import distributed
    from mil_train.folds import fold_of_each_bag, stratified_folds
    from mil_train.trainer import make_loader

    try:
        folds = stratified_folds(labels, options.folds, seed=settings["seed"])
    except ValueError as exc:
        raise InvalidInputError(f"--folds {options.folds}: {exc}") from None
    initial = copy.deepcopy(model.state_dict())  # every fold starts from the same initial weights
    results = []
    for fold, (rest, test_idx) in enumerate(folds, start=1):
        model.load_state_dict(initial)
        train_idx, val_idx = split([labels[i] for i in rest], val_fraction, settings["seed"])
        train_idx, val_idx = [rest[i] for i in train_idx], [rest[i] for i in val_idx]
        fold_output = output.with_name(f"{output.stem}.fold{fold}{output.suffix}")
        fold_log = log.with_name(f"{log.stem}.fold{fold}{log.suffix}") if log is not None else None
        fold_dir = options.log_dir / f"fold{fold}" if options.log_dir is not None else None
        run["provenance"] = {**run["provenance"], "fold": fold}
        trainer = fit_split(train_idx, val_idx, fold_output, model=model, model_name=model_name, bags=bags,
                            labels=labels, options=options, settings=settings, log=fold_log, log_dir=fold_dir, **run)
        shard = test_idx if distributed.world_size() == 1 else _share(bags, test_idx, distributed.rank(),
                                                                     distributed.world_size())
        test = trainer.evaluate(make_loader([bags[i] for i in shard], batch_size=run["batch_size"]))
        results.append({"fold": fold, "checkpoint": fold_output.name, "n_train": len(train_idx), "n_val": len(val_idx),
                        "n_test": len(test_idx), "best_epoch": trainer.best_epoch,
                        "test": {k: float(v) for k, v in test.items()}, "test_bags": test_idx})
    summary = fold_summary(results, model_name=model_name, k=options.folds, seed=settings["seed"],
                           fold_of_bag=fold_of_each_bag(folds))
    if distributed.is_main():
        _write_json(output.with_name(f"{output.stem}.folds.json"), summary)
    return summary


def fold_summary(results: list[dict[str, Any]], **about: Any) -> dict[str, Any]:
    """The folds' results with the mean and (sample) standard deviation of each test metric (NaNs left out)."""
    import numpy as np

    names = [k for k in results[0]["test"]]
    mean, std = {}, {}
    for name in names:
        values = np.array([r["test"][name] for r in results], dtype=np.float64)
        values = values[np.isfinite(values)]
        mean[name] = float(values.mean()) if values.size else float("nan")
        std[name] = float(values.std(ddof=1)) if values.size > 1 else float("nan")
    return {**about, "folds": results, "mean": mean, "std": std}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)


def _share(bags: list, indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's part of `indices`, balanced over the ranks by bag size (mil_train.distributed)."""
    from mil_train.distributed import bag_size, balanced_shards

    shards = balanced_shards([bag_size(bags[i]) for i in indices], world)
    return [indices[j] for j in shards[rank]]


def with_spatial_inputs(model, bags: list, data: Path) -> list:
    """Graph and spatial models need every bag's tile coords; graph models get their graph built once,
    here, by the model's own rule (the rule the exported file records and the runtime rebuilds)."""
    if not (model.uses_graph or model.uses_coords):
        return bags
    missing = sum(1 for bag in bags if bag.get("coords", None) is None)
    if missing:
        raise InvalidInputError(
            f"{model.name} reads tile positions, but {missing} of {len(bags)} bags in {data} have no coords; "
            "give CLAM/TRIDENT .h5 feature files (with `coords`) or a torchmil folder with coords/"
        )
    if not model.uses_graph or model.graph_rule is None:
        return bags
    from mil_train.data import with_graph

    return [with_graph(bag, model.graph_rule) for bag in bags]


class OneLineUsageError(click.UsageError):
    """A usage error as one line, `mil-train: error: <what> (see mil-train --help)`, exit 2."""

    def show(self, file=None) -> None:
        click.echo(f"mil-train: error: {' '.join(self.format_message().split())} (see mil-train --help)", err=True)


class OneLineCommand(click.Command):
    def make_context(self, info_name, args, parent=None, **extra):
        raw = list(args)  # what --nproc hands on to the processes it starts
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise OneLineUsageError(exc.format_message(), exc.ctx) from None
        ctx.meta[RAW_ARGS] = raw
        return ctx


RAW_ARGS = "mil_train.raw_args"
COMMAND_ENV = "MILKIT_TRAIN_COMMAND"  # the command line --nproc was given, for the checkpoint's provenance


def launch(nproc: int, device: str, raw_args: list[str]) -> int:
    """`--nproc N`: N processes of this same command on this machine (mil_train.distributed.launch_local)."""
    from mil_runtime.errors import DeviceError
    from mil_train import distributed

    if device.startswith("cuda"):
        if ":" in device:
            raise InvalidInputError(
                f"--nproc {nproc} gives each process its own GPU (cuda:0 ... cuda:{nproc - 1}); "
                f"pass --device cuda, not --device {device}"
            )
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < nproc:
            raise DeviceError(f"--nproc {nproc} --device cuda needs {nproc} GPUs, this machine has {count}; "
                              f"pass --nproc {count}" if count else "--device cuda: no CUDA device here; use --device cpu")
    env = {COMMAND_ENV: os.environ.get(COMMAND_ENV) or " ".join(sys.argv)}
    return distributed.launch_local(nproc, [sys.executable, "-m", "mil_train.cli", *raw_args], env=env)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="checkpoint to write (.pt)")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", help="constructor argument; repeatable")
@click.option("--loss-weight", "loss_weights", multiple=True, metavar="NAME=W",
              help="weight of the loss term NAME (cls or a model's auxiliary term; others weigh 1); repeatable")
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-4, show_default=True, type=float)
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--val-fraction", default=0.2, show_default=True, type=float, help="stratified validation share; 0 = none")
@click.option("--patience", default=None, type=click.IntRange(min=1), help="early-stopping patience in epochs")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--log", "--log-csv", "log", type=click.Path(path_type=Path),
              help="CSV log, one row per epoch (under torchrun write --log-csv: torchrun reads --log as its own)")
@click.option("--class-names", help="comma-separated names, in class-index order")
@click.option("--labels", "labels_csv", type=click.Path(path_type=Path), help="slide_id,label table for a .h5 folder")
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="bf16: matrix products in bfloat16 under autocast (CPU or CUDA; fast on CPUs with AVX512_BF16 "
                   "or AMX); fp16: CUDA only, with loss scaling. Parameters and checkpoints stay float32")
@click.option("--allow-one-class", is_flag=True, help="train even when every bag has the same label (refused otherwise)")
@click.option("--folds", default=None, type=click.IntRange(min=2), metavar="K",
              help="stratified K-fold cross-validation: a checkpoint per fold beside -o and <stem>.folds.json")
@click.option("--resume", is_flag=True, help="continue the interrupted run from <stem>.last.pt (same command)")
@click.option("--class-weights", default="none", show_default=True, type=click.Choice(["none", "auto"]),
              help="auto: weigh each bag's classification loss by n / (K n_c) of its class")
@click.option("--balanced-sampler", is_flag=True, help="draw each epoch's bags with replacement, classes equally")
@click.option("--log-dir", type=click.Path(path_type=Path),
              help="metrics.csv, and TensorBoard event files when tensorboard is installed")
@click.option("--task", "task_type", default="classification", show_default=True,
              type=click.Choice(["classification", "regression", "survival"]),
              help="what the model predicts: classes; continuous targets (MSE, --task-arg loss=huber); or survival "
                   "(discrete-time hazards NLL, --task-arg loss=cox for Cox), from --label-columns")
@click.option("--label-columns", metavar="A,B",
              help="--labels columns holding the label: survival time,event (the default names); regression the "
                   "target columns (default label)")
@click.option("--task-arg", "task_args", multiple=True, metavar="KEY=VALUE",
              help="task option (mil_train.tasks), e.g. loss=cox, n_bins=8, alpha=0.15, loss=huber; repeatable")
@click.option("--feat-ext", "feat_ext", default=None, metavar="NAME|JSON",
              help="learn the instance features from images end to end: a registered feature extractor "
                   "(small_cnn, tiny_cnn, resnet50_trunc, torchvision:<m>, timm:<m>) or a JSON object "
                   "'{\"name\": \"small_cnn\", \"out_dim\": 32}'; the bags then hold images (N, 3, H, W)")
@click.option("--instance-chunk", default=None, type=click.IntRange(min=1),
              help="images through the feature extractor at a time (each chunk activation-checkpointed); default 256")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="processes on this machine, data-parallel (gloo on CPU; NCCL and one GPU each with --device cuda); "
                   "under torchrun leave it out")
def main(model, data, output, model_args, loss_weights, epochs, lr, weight_decay, batch_size, val_fraction, patience,
         seed, log, class_names, labels_csv, device, precision, allow_one_class, folds, resume, class_weights,
         balanced_sampler, log_dir, task_type, label_columns, task_args, feat_ext, instance_chunk, nproc) -> None:
    """Train MODEL (a registered name, e.g. ABMIL) on DATA and save the best checkpoint to -o."""
    from mil_runtime.errors import DeviceError
    from mil_train.distributed import env_rank, env_world_size

    launched = env_world_size()
    try:
        if nproc > 1 and launched == 1:
            sys.exit(launch(nproc, device, click.get_current_context().meta[RAW_ARGS]))
        if nproc > 1 and nproc != launched:
            raise InvalidInputError(
                f"--nproc {nproc} inside a launch of {launched} processes (torchrun); leave --nproc out under torchrun"
            )
        model_args = (*model_args, *feat_ext_args(feat_ext, instance_chunk))
        best = train(
            model, data, output, model_args=model_args, epochs=epochs, lr=lr, weight_decay=weight_decay,
            batch_size=batch_size, val_fraction=val_fraction, patience=patience, seed=seed, log=log,
            class_names=class_names, labels_csv=labels_csv, device=device, progress=sys.stderr.isatty(),
            loss_weights=loss_weights, allow_one_class=allow_one_class, precision=precision, folds=folds,
            resume=resume, class_weights=class_weights, balanced_sampler=balanced_sampler, log_dir=log_dir,
            task=TaskOptions(task_type, label_columns, task_args),
        )
    except MilkitError as exc:
        # Every rank meets the same data and settings, so rank 0 speaks for all; a device is each rank's own.
        if env_rank() == 0 or isinstance(exc, DeviceError):
            click.echo(f"mil-train: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    if env_rank() == 0 and folds:
        from mil_train import metrics

        known = {*metrics.METRIC_NAMES, *getattr(metrics, "REGRESSION_METRIC_NAMES", ()),
                 *getattr(metrics, "SURVIVAL_METRIC_NAMES", ())}
        shown = {k: f"{best['mean'][k]:.4f} ± {best['std'][k]:.4f}" for k in best["mean"] if k in known}
        summary = output.with_name(f"{output.stem}.folds.json")
        click.echo(f"mil-train: {folds} folds, test {shown}; saved {len(best['folds'])} checkpoints and {summary}",
                   err=True)
    elif env_rank() == 0:
        shown = {k: round(v, 4) for k, v in best.items() if k.startswith("val_") or k == "train_loss"}
        click.echo(f"mil-train: best epoch {best['epoch']}: {shown}; saved {output}", err=True)


if __name__ == "__main__":
    main()
