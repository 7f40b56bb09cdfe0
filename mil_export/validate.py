"""Check an exported MIL model: onnxruntime (CPU) against eager PyTorch, bag size by bag size.

Each size is run alone, and padded inside a batch of three bags of different lengths; a row records
the largest absolute difference per output (every output the file lists in `milkit.outputs`,
attention_by_class and instance_probabilities included), and how far the padded bag's result moved from the same
bag run alone. Without a model in hand, the eager model is rebuilt from the file itself: registry
name and config from `milkit.model`, weights from the ONNX initializers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mil_runtime import contract
from mil_runtime.contract import ModelMetadata
from mil_runtime.errors import ContractMismatchError, ModelFormatError
from mil_runtime.session import open_session
from mil_train.models import MILModel, create_model
from mil_export.onnx_export import WRAPPER_PREFIX, example_inputs, export_program

DEFAULT_SIZES = (1, 2, 7, 49, 1000, 50000)
PADDING_EXTRA = (3, 1)  # the other two bags in a padded batch are this much longer than the tested one
PADDING_ERROR = "padded_vs_alone"


@dataclass
class ValidationRow:
    """One bag size: padded or alone, the max |onnxruntime - eager| per output, and `scaled`, the
    max of |a - b| / (1 + |b|) over every output: the project's rule |a - b| <= tol + tol * |b| holds
    exactly when scaled <= tol."""

    bag: int
    padded: bool
    errors: dict[str, float] = field(default_factory=dict)
    scaled: float = 0.0

    @property
    def max_error(self) -> float:
        return max(self.errors.values())

    def passes(self, tolerance: float) -> bool:
        return self.scaled <= tolerance


def split_sizes(model: MILModel, sizes: Sequence[int]) -> tuple[list[int], list[int]]:
    """(sizes to validate, sizes above the model's declared `max_bag_size`, which are skipped)."""
    limit = model.max_bag_size  # an instance may refine its class's value (e.g. from its head count)
    kept = [n for n in sizes if limit is None or n <= limit]
    return kept, [n for n in sizes if n not in kept]


def check_axes(session) -> None:
    """Refuse a file whose features/mask batch and bag axes are not the contract's symbolic names."""
    shapes = {value.name: value.shape for value in session.inference.get_inputs()}
    for name in contract.MIL_REQUIRED_INPUTS:
        if name not in shapes:
            raise ModelFormatError(f"{session.path} has no input {name!r}; re-export it with mil-export")
        if list(shapes[name][:2]) != [contract.BATCH_AXIS, contract.BAG_AXIS]:
            raise ModelFormatError(
                f"{session.path}: input {name} has axes {shapes[name]}, expected symbolic "
                f"[{contract.BATCH_AXIS}, {contract.BAG_AXIS}, ...]; re-export it with mil-export"
            )


def used_state_keys(model: MILModel) -> set[str]:
    """state_dict keys that inference reads: the ONNX exporter drops every other parameter."""
    program, _ = export_program(model)
    signature = program.graph_signature
    consumed = {node.name for node in program.graph.nodes if node.op == "placeholder" and node.users}
    targets = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    return {target.removeprefix(WRAPPER_PREFIX) for name, target in targets.items() if name in consumed}


def rebuild_model(path: str | os.PathLike, metadata: ModelMetadata) -> MILModel:
    """The eager model an exported file came from: built by registry name, weights from initializers."""
    import onnx
    from onnx import numpy_helper

    try:
        model = create_model(metadata.model_name, **metadata.model_config).eval()  # trace the inference path
    except KeyError as exc:
        raise ModelFormatError(f"{path}: {exc.args[0]}; pass the training checkpoint with --checkpoint") from None
    initializers = {tensor.name: tensor for tensor in onnx.load(str(path)).graph.initializer}
    state = model.state_dict()
    absent = []
    for key, reference in state.items():
        stored = initializers.get(WRAPPER_PREFIX + key, initializers.get(key))
        if stored is None:
            absent.append(key)
            continue
        array = numpy_helper.to_array(stored)
        if array.shape != tuple(reference.shape):
            raise ModelFormatError(
                f"{path}: weight {key} has shape {array.shape}, the model expects {tuple(reference.shape)}; "
                "the file and its milkit.model config disagree"
            )
        state[key] = torch.from_numpy(array.copy()).to(reference.dtype)
    missing = sorted(set(absent) & used_state_keys(model)) if absent else []
    if missing:
        raise ModelFormatError(
            f"{path} holds no initializer for {', '.join(missing)}, so the eager model cannot be rebuilt "
            "from it (exported with graph optimisation?); pass the training checkpoint with --checkpoint"
        )
    model.load_state_dict(state)  # unused parameters keep their initial values: inference never reads them
    return model.eval()


def _run_both(session, model: MILModel, features: torch.Tensor, lengths: Sequence[int]):
    """Outputs of onnxruntime and of eager PyTorch for one padded batch, as numpy dicts."""
    inputs = example_inputs(model, lengths, features)
    feeds = {name: inputs[name].numpy() for name in session.metadata.inputs}
    ort_out = session.run(feeds)
    with torch.inference_mode():
        optional = {name: inputs[name] for name in contract.MIL_OPTIONAL_INPUTS if name in inputs}
        out = model(inputs[contract.FEATURES], inputs[contract.MASK], **optional)
        if not model.is_classifier:  # regression / survival: the task's outputs, then attention
            eager = {**model.task.outputs(out.logits), contract.ATTENTION: out.attention}
            return ort_out, {name: value.float().numpy() for name, value in eager.items()}
        eager = {
            contract.LOGITS: out.logits,
            contract.PROBABILITIES: model.probabilities(out.logits),
            contract.ATTENTION: out.attention,
        }
        for name in contract.MIL_OPTIONAL_OUTPUTS:  # each is the MILOutput field of the same name
            if name not in session.metadata.outputs:
                continue
            if getattr(out, name) is None:
                raise ContractMismatchError(
                    f"{session.path} has an {name} output but the eager {model.name} returns none; pass the "
                    "model this file was exported from"
                )
            eager[name] = getattr(out, name)
    eager_out = {name: value.float().numpy() for name, value in eager.items()}
    return ort_out, eager_out


def _max_errors(ort_out: dict, eager_out: dict) -> dict[str, float]:
    return {name: float(np.max(np.abs(ort_out[name] - eager_out[name]))) for name in eager_out}


def _scaled_error(ort_out: dict, eager_out: dict) -> float:
    """max |a - b| / (1 + |b|) over every output (a = onnxruntime, b = eager)."""
    return float(max(np.max(np.abs(ort_out[k] - eager_out[k]) / (1.0 + np.abs(eager_out[k]))) for k in eager_out))


def _padding_drift(padded: dict, alone: dict, n: int) -> float:
    """How far bag 0 of the padded batch is from the same bag alone (attention padding must be 0)."""
    bag_outputs = [name for name in alone if name not in (contract.ATTENTION, *contract.MIL_OPTIONAL_OUTPUTS)]
    drift = [np.abs(padded[name][0] - alone[name][0]).max() for name in bag_outputs]  # logits, risk, values, ...
    drift.append(np.abs(padded[contract.ATTENTION][0, :n] - alone[contract.ATTENTION][0]).max())
    drift.append(np.abs(padded[contract.ATTENTION][0, n:]).max(initial=0.0))
    if contract.ATTENTION_BY_CLASS in alone:  # (batch, n_classes, bag): every class's map, same rule
        by_class_padded, by_class_alone = padded[contract.ATTENTION_BY_CLASS], alone[contract.ATTENTION_BY_CLASS]
        drift.append(np.abs(by_class_padded[0, :, :n] - by_class_alone[0]).max())
        drift.append(np.abs(by_class_padded[0, :, n:]).max(initial=0.0))
    if contract.INSTANCE_PROBABILITIES in alone:  # (batch, bag, n_classes): same rule, bag on axis 1
        instance_padded, instance_alone = padded[contract.INSTANCE_PROBABILITIES], alone[contract.INSTANCE_PROBABILITIES]
        drift.append(np.abs(instance_padded[0, :n] - instance_alone[0]).max())
        drift.append(np.abs(instance_padded[0, n:]).max(initial=0.0))
    return float(max(drift))


def validate_onnx(
    path: str | os.PathLike,
    model: MILModel | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    seed: int = 0,
) -> list[ValidationRow]:
    """Compare onnxruntime (CPU) with eager PyTorch on logits, probabilities and attention
    (and attention_by_class / instance_probabilities, for files that have them).

    Returns two rows per size: the bag alone, and the bag padded in a batch of three. Padded rows
    also carry `padded_vs_alone`, the onnxruntime drift between the two runs of that bag. Sizes above
    the model's declared `max_bag_size` (full self-attention models) are left out: see `split_sizes`.
    """
    session = open_session(path, device="cpu")
    metadata = session.metadata
    if metadata.kind != "mil":
        raise ContractMismatchError(f"{path} is a milkit {metadata.kind}, not a MIL model; validate a MIL model")
    check_axes(session)
    if model is None:
        model = rebuild_model(path, metadata)
    elif model.name != metadata.model_name or dict(model.config) != metadata.model_config:
        raise ContractMismatchError(
            f"{path} holds {metadata.model_name} {metadata.model_config}, the given model is "
            f"{model.name} {dict(model.config)}; pass the checkpoint this file was exported from"
        )
    was_training = model.training
    model.eval()
    rows = []
    try:
        for n in split_sizes(model, sizes)[0]:
            if n < 1:
                raise ValueError(f"bag sizes must be >= 1, got {n}")
            generator = torch.Generator().manual_seed(seed * 1_000_003 + n)
            lengths = (n, *(n + extra for extra in PADDING_EXTRA))
            features = torch.randn(len(lengths), max(lengths), metadata.feature_dim, generator=generator)
            alone_ort, alone_eager = _run_both(session, model, features[:1, :n], lengths[:1])
            rows.append(ValidationRow(n, False, _max_errors(alone_ort, alone_eager), _scaled_error(alone_ort, alone_eager)))
            padded_ort, padded_eager = _run_both(session, model, features, lengths)
            errors = _max_errors(padded_ort, padded_eager)
            errors[PADDING_ERROR] = _padding_drift(padded_ort, alone_ort, n)
            scaled = max(_scaled_error(padded_ort, padded_eager), errors[PADDING_ERROR])
            rows.append(ValidationRow(n, True, errors, scaled))
    finally:
        model.train(was_training)
    return rows


def format_table(rows: Sequence[ValidationRow]) -> str:
    """Rows as an aligned text table, one line per (bag size, padded)."""
    optional = [name for name in contract.MIL_OPTIONAL_OUTPUTS if any(name in row.errors for row in rows)]
    task_columns = [name for name in (rows[0].errors if rows else {}) if name not in (*optional, PADDING_ERROR)]
    columns = [*(task_columns or contract.MIL_OUTPUTS), *optional, PADDING_ERROR]
    widths = {name: max(15, len(name)) for name in columns}
    header = f"{'bag':>7} {'padded':>6} " + " ".join(f"{name:>{widths[name]}}" for name in columns)
    lines = [header]
    for row in rows:
        cells = " ".join(
            f"{row.errors[name]:>{widths[name]}.3e}" if name in row.errors else f"{'-':>{widths[name]}}"
            for name in columns
        )
        lines.append(f"{row.bag:>7} {'yes' if row.padded else 'no':>6} {cells}")
    return "\n".join(lines)
