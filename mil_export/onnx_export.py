"""Export a registered MIL model to ONNX with symbolic batch/bag/edges axes and milkit metadata.

One path for every model: a wrapper maps the contract's input names to `model.forward` and returns
(logits, probabilities, attention), plus attention_by_class for multi-branch models and
instance_probabilities for models with an instance classifier (`output_names`);
`torch.export.export` traces it with dynamic shapes, and
`torch.onnx.export` translates that program. Exporting the module directly can silently freeze a
dynamic axis into a constant, which is why the program is exported instead.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from mil_runtime import contract
from mil_runtime._version import __version__
from mil_runtime.contract import EncoderRef, ModelMetadata, Tiling
from mil_runtime.errors import (
    ContractMismatchError,
    InputNotFoundError,
    InvalidInputError,
    MilkitError,
    ModelFormatError,
    OutputError,
)
from mil_runtime.session import file_identity
from mil_train.models import MILModel
from mil_train.models.base import has_instance_classifier

WRAPPER_PREFIX = "model."  # the wrapper holds the model as `.model`, so ONNX initializers are "model.<key>"
EXAMPLE_BATCH = 3  # > 1: a batch of 1 in the example would let the exporter specialise the axis


class ContractWrapper(nn.Module):
    """Contract inputs in, contract outputs out:
    (logits, probabilities, attention[, attention_by_class][, instance_probabilities]).

    Optional inputs arrive as keyword arguments so one signature serves every model; the exporter
    names the ONNX inputs after these parameters, and the outputs after `output_names(model)`.
    """

    def __init__(self, model: MILModel) -> None:
        super().__init__()
        self.model = model
        # the optional outputs this model exports (Python constants of the model, not of a tensor); each is
        # the MILOutput field of the same name
        self.optional = [name for name in output_names(model) if name in contract.MIL_OPTIONAL_OUTPUTS]

    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        out = self.model(features, mask, edge_index=edge_index, edge_weight=edge_weight, coords=coords)
        if not self.model.is_classifier:  # regression: values; survival: risk (+ hazards, survival)
            return (*self.model.task.outputs(out.logits).values(), out.attention)
        probabilities = self.model.probabilities(out.logits)  # (batch, n_classes)
        outputs = [out.logits, probabilities, out.attention]
        for name in self.optional:  # attention_by_class (batch, n_classes, bag), instance_probabilities (batch, bag, n_classes)
            value = getattr(out, name)
            if value is None:
                raise MilkitError(
                    f"{self.model.name} declares {OPTIONAL_OUTPUT_FLAGS[name]} but its forward left MILOutput.{name} "
                    f"empty; fill it with the {OPTIONAL_OUTPUT_SHAPES[name]} values"
                )
            outputs.append(value)
        return tuple(outputs)


OPTIONAL_OUTPUT_FLAGS = {contract.ATTENTION_BY_CLASS: "class_attention = True",
                         contract.INSTANCE_PROBABILITIES: "instance_outputs = True"}
OPTIONAL_OUTPUT_SHAPES = {contract.ATTENTION_BY_CLASS: "(batch, n_classes, bag)",
                          contract.INSTANCE_PROBABILITIES: "(batch, bag, n_classes)"}


def exports_class_attention(model: MILModel) -> bool:
    """Multi-branch models with n_classes >= 2 export `attention_by_class`.

    A binary model (n_classes=1) has one branch, whose map is `attention`: no per-class output.
    """
    return bool(getattr(model, "class_attention", False)) and model.n_classes >= 2


def output_names(model: MILModel) -> list[str]:
    """The contract outputs `model`'s graph has, in order: its task's (contract.task_outputs), then
    for classifiers the optional per-class outputs."""
    if not model.is_classifier:
        return contract.task_outputs(model.task.type, model.task.to_config())
    names = list(contract.MIL_OUTPUTS)
    if exports_class_attention(model):
        names.append(contract.ATTENTION_BY_CLASS)
    if has_instance_classifier(model):
        names.append(contract.INSTANCE_PROBABILITIES)
    return names


def input_names(model: MILModel) -> list[str]:
    """The contract inputs `model` consumes, in contract order."""
    names = [contract.FEATURES, contract.MASK]
    if model.uses_graph:
        names += [contract.EDGE_INDEX, contract.EDGE_WEIGHT]
    if model.uses_coords:
        names.append(contract.COORDS)
    return names


def grid_coords(n: int) -> torch.Tensor:
    """(n, 2) int64 (y, x) positions filling a near-square grid row by row."""
    width = max(1, math.isqrt(n - 1) + 1) if n > 0 else 1
    index = torch.arange(n)  # (n,)
    return torch.stack([index // width, index % width], dim=1)  # (n, 2)


def chain_edges(lengths: Sequence[int], bag: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid edge list for a padded batch: self loops plus both directions along each bag's chain.

    Node ids live in the flattened (batch * bag) space, as the contract says. Only used to give the
    exporter and the validator well-formed graph inputs; the runtime builds the real graph by rule.
    """
    sources, targets = [], []
    for b, n in enumerate(lengths):
        nodes = torch.arange(n) + b * bag  # (n,)
        sources += [nodes, nodes[:-1], nodes[1:]]
        targets += [nodes, nodes[1:], nodes[:-1]]
    edge_index = torch.stack([torch.cat(sources), torch.cat(targets)])  # (2, edges)
    edge_weight = torch.full((edge_index.shape[1],), 1.0 / 3.0)  # (edges,)
    return edge_index, edge_weight


def example_inputs(model: MILModel, lengths: Sequence[int], features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Contract inputs for a padded batch of bags with the given real lengths.

    features: (batch, bag, D) already padded; padding rows are zeroed and masked out. Each bag lies on
    the near-square grid of `grid_coords(n)`, which depends on its own length only, so a bag gets the
    same coords and graph alone and padded; a graph model's edges are built from those coords by its
    own `graph_rule`, as the runtime builds them.
    """
    batch, bag = features.shape[:2]
    mask = torch.arange(bag)[None, :] < torch.tensor(list(lengths))[:, None]  # (batch, bag)
    inputs = {contract.FEATURES: features * mask[..., None], contract.MASK: mask}
    if not (model.uses_graph or model.uses_coords):
        return inputs
    coords = torch.zeros(batch, bag, 2, dtype=torch.int64)  # (batch, bag, 2), 0 on padding
    for b, n in enumerate(lengths):
        coords[b, :n] = grid_coords(n)
    if model.uses_graph:
        inputs[contract.EDGE_INDEX], inputs[contract.EDGE_WEIGHT] = example_graph(model, lengths, coords, mask)
    if model.uses_coords:
        inputs[contract.COORDS] = coords
    return inputs


def example_graph(model: MILModel, lengths: Sequence[int], coords: torch.Tensor, mask: torch.Tensor):
    """(edge_index (2, E), edge_weight (E,)) of the model's graph rule over `coords`; a chain without a rule."""
    rule = model.graph_rule
    if rule is None:
        return chain_edges(lengths, coords.shape[1])
    from mil_train.data.graphs import batch_graph

    return batch_graph(coords, mask, rule["rule"], **(rule.get("params") or {}))


def _dynamic_shapes(names: Sequence[str]) -> dict[str, dict[int, Any]]:
    batch, bag, edges = Dim(contract.BATCH_AXIS), Dim(contract.BAG_AXIS), Dim(contract.EDGES_AXIS)
    per_input = {
        contract.FEATURES: {0: batch, 1: bag},
        contract.MASK: {0: batch, 1: bag},
        contract.EDGE_INDEX: {1: edges},
        contract.EDGE_WEIGHT: {0: edges},
        contract.COORDS: {0: batch, 1: bag},
    }
    return {name: per_input[name] for name in names}


def export_program(model: MILModel, example_bag: int = 8) -> tuple[torch.export.ExportedProgram, dict]:
    """`torch.export` the contract wrapper with dynamic axes; returns (program, example inputs).

    The example batch has bags of different lengths (so padding is exercised) and no axis of size
    0 or 1, which the tracer would otherwise treat as a constant.
    """
    if example_bag < 4:
        raise ValueError(f"example_bag must be >= 4 so no axis is traced at size 0 or 1, got {example_bag}")
    in_dim = int(model.config["in_dim"])
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(EXAMPLE_BATCH, example_bag, in_dim, generator=generator)  # (batch, bag, D)
    lengths = [example_bag - b for b in range(EXAMPLE_BATCH)]
    inputs = example_inputs(model, lengths, features)
    names = list(inputs)
    args = (inputs[contract.FEATURES], inputs[contract.MASK])
    kwargs = {name: inputs[name] for name in names if name not in contract.MIL_REQUIRED_INPUTS}
    program = torch.export.export(
        ContractWrapper(model), args, kwargs=kwargs, dynamic_shapes=_dynamic_shapes(names), strict=False
    )
    return program, inputs


def _to_onnx(program: torch.export.ExportedProgram, inputs: dict, outputs: Sequence[str], opset: int | None,
             verbose: bool):
    """Translate the program; keep every parameter as an initializer named after its state_dict key.

    optimize=False because the optimizer folds small weights into anonymous transposed constants,
    and then the file no longer holds the state_dict that `validate` rebuilds the eager model from;
    onnxruntime folds those transposes itself when it loads the session.
    """
    args = (inputs[contract.FEATURES], inputs[contract.MASK])
    kwargs = {name: value for name, value in inputs.items() if name not in contract.MIL_REQUIRED_INPUTS}
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        onnx_program = torch.onnx.export(
            program,
            args,
            kwargs=kwargs,
            output_names=list(outputs),
            opset_version=opset,
            dynamo=True,
            optimize=False,
            verbose=verbose,
        )
    return onnx_program.model_proto


def _symbol_names(graph, names: Sequence[str]) -> dict[str, str]:
    """Map the exporter's symbols (e.g. 's31') to the contract's axis names, read off the inputs."""
    axes = {contract.FEATURES: {0: contract.BATCH_AXIS, 1: contract.BAG_AXIS}}
    if contract.EDGE_WEIGHT in names:
        axes[contract.EDGE_WEIGHT] = {0: contract.EDGES_AXIS}
    by_name = {value.name: value for value in graph.input}
    renames: dict[str, str] = {}
    for input_name, dims in axes.items():
        shape = by_name[input_name].type.tensor_type.shape.dim
        for axis, wanted in dims.items():
            symbol = shape[axis].dim_param
            if not symbol:
                raise MilkitError(
                    f"export made axis {axis} ({wanted}) of {input_name} a constant ({shape[axis].dim_value}); "
                    "the model uses a Python branch or integer computed from a tensor size"
                )
            renames[symbol] = wanted
    return renames


def name_symbolic_axes(model_proto, names: Sequence[str]) -> None:
    """Rename symbolic dims to 'batch'/'bag'/'edges' in inputs, outputs and value_info, consistently.

    Derived dims such as 's31*s64' are renamed token by token.
    """
    renames = _symbol_names(model_proto.graph, names)
    token = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    graph = model_proto.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = token.sub(lambda m: renames[m.group(1)], dim.dim_param)


def _check_inputs(model_proto, names: Sequence[str]) -> None:
    found = [value.name for value in model_proto.graph.input]
    if found != list(names):
        raise MilkitError(f"exported inputs are {found}, the contract expects {list(names)}")


def _check_outputs(model_proto, names: Sequence[str]) -> None:
    found = [value.name for value in model_proto.graph.output]
    if found != list(names):
        raise MilkitError(f"exported outputs are {found}, the contract expects {list(names)}")


def _coerce(value: Any, cls: type, what: str):
    if value is None or isinstance(value, cls):
        return value
    try:
        return cls(**value)
    except TypeError as exc:
        raise InvalidInputError(f"{what} {value!r} is not valid ({exc}); see mil_runtime.contract.{cls.__name__}")


def build_metadata(
    model: MILModel,
    *,
    class_names: Sequence[str] | None = None,
    encoder: dict | EncoderRef | None = None,
    tiling: dict | Tiling | None = None,
    provenance: dict | None = None,
    feature_stats: dict | None = None,
) -> ModelMetadata:
    """The milkit metadata for `model`, validated before anything is exported.

    Regression models take `class_names` as their target names (one per target), when given.
    """
    if not model.is_classifier:
        return _task_metadata(model, target_names=class_names, encoder=encoder, tiling=tiling,
                              provenance=provenance, feature_stats=feature_stats)
    n_classes = model.n_classes
    names = list(class_names) if class_names is not None else contract.default_class_names(n_classes)
    if len(names) != max(n_classes, 2):
        raise InvalidInputError(
            f"{len(names)} class names given for a model with n_classes={n_classes}; give "
            f"{max(n_classes, 2)} (binary models name the negative and the positive class)"
        )
    encoder_ref, in_dim = _encoder_for(model, encoder)
    metadata = ModelMetadata(
        kind="mil",
        model_name=model.name,
        feature_dim=in_dim,
        inputs=input_names(model),
        outputs=output_names(model),
        model_config=dict(model.config),
        n_classes=n_classes,
        class_names=names,
        activation="sigmoid" if n_classes == 1 else "softmax",
        graph=model.graph_rule,
        encoder=encoder_ref,
        tiling=_coerce(tiling, Tiling, "tiling"),
        version=__version__,
        provenance=dict(provenance or {}),
        feature_stats=feature_stats,
    )
    metadata.validate(source=f"{model.name} metadata")
    return metadata


def _encoder_for(model: MILModel, encoder: dict | EncoderRef | None) -> tuple[EncoderRef | None, int]:
    """(the encoder reference, the model's in_dim); ContractMismatchError when their widths differ."""
    encoder_ref = _coerce(encoder, EncoderRef, "encoder")
    in_dim = int(model.config["in_dim"])
    if encoder_ref is not None and int(encoder_ref.output_dim) != in_dim:
        raise ContractMismatchError(
            f"encoder {encoder_ref.name} gives {encoder_ref.output_dim}-d features but the model takes "
            f"{in_dim}-d; export with the encoder the model was trained on"
        )
    return encoder_ref, in_dim


def _task_metadata(model: MILModel, *, target_names, encoder, tiling, provenance, feature_stats) -> ModelMetadata:
    """Metadata of a regression or survival model: milkit.task {"type", **the task's config}."""
    options = {k: v for k, v in model.task.metadata().items() if k != "type"}
    if model.task.type == contract.REGRESSION:
        names = list(target_names) if target_names is not None else options.get("target_names")
        options["target_names"] = list(names) if names else contract.default_target_names(model.task.head_dim)
        if len(options["target_names"]) != model.task.head_dim:
            raise InvalidInputError(
                f"{len(options['target_names'])} target names given for a regression model with "
                f"{model.task.head_dim} targets"
            )
    encoder_ref, in_dim = _encoder_for(model, encoder)
    metadata = ModelMetadata(
        kind="mil", model_name=model.name, feature_dim=in_dim, inputs=input_names(model),
        outputs=output_names(model), model_config=dict(model.config), graph=model.graph_rule, encoder=encoder_ref,
        tiling=_coerce(tiling, Tiling, "tiling"), version=__version__, provenance=dict(provenance or {}),
        feature_stats=feature_stats, task_type=model.task.type, task_options=options,
    )
    metadata.validate(source=f"{model.name} metadata")
    return metadata


def _save_atomically(model_proto, path: Path) -> None:
    import onnx

    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist; create it or choose another -o")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save_model(model_proto, str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc}); check the folder's permissions") from None
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx(
    model: MILModel,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    encoder: dict | EncoderRef | None = None,
    tiling: dict | Tiling | None = None,
    provenance: dict | None = None,
    feature_stats: dict | None = None,
    opset: int | None = None,
    example_bag: int = 8,
    verbose: bool = False,
) -> Path:
    """Export `model` to `path` following the milkit ONNX contract; returns the path.

    Inputs: features, mask (+ edge_index, edge_weight for graph models, + coords for spatial ones);
    outputs: logits, probabilities, attention (+ attention_by_class for multi-branch models with
    n_classes >= 2, + instance_probabilities for models with an instance classifier); axes batch,
    bag, edges symbolic. The file is written atomically and checked with onnx.checker.
    """
    import onnx

    path = Path(path)
    if not path.parent.is_dir():  # checked before the export's seconds are spent
        raise OutputError(f"output folder {path.parent} does not exist; create it or choose another -o")
    metadata = build_metadata(model, class_names=class_names, encoder=encoder, tiling=tiling, provenance=provenance,
                              feature_stats=feature_stats)
    was_training = model.training
    model.eval()  # dropout off, deterministic inference paths on
    try:
        program, inputs = export_program(model, example_bag)
        model_proto = _to_onnx(program, inputs, metadata.outputs, opset, verbose)
    except MilkitError:  # the wrapper's own refusal already says what to do
        raise
    except Exception as exc:  # torch.export / torch.onnx report model code they cannot trace
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise MilkitError(
            f"could not export {model.name} with dynamic batch/bag axes ({type(exc).__name__}: {first}); "
            "see DESIGN.md section 4 for the export rules (no Python branches on tensor sizes)"
        ) from exc
    finally:
        model.train(was_training)
    names = metadata.inputs
    _check_inputs(model_proto, names)
    _check_outputs(model_proto, metadata.outputs)
    name_symbolic_axes(model_proto, names)
    for key, value in metadata.to_props().items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model_proto)
    _save_atomically(model_proto, path)
    return path


def read_metadata(path: str | os.PathLike) -> ModelMetadata:
    """The milkit metadata of an ONNX file, without loading its weights."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"ONNX file not found: {path}")
    try:
        model_proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelFormatError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    props = {entry.key: entry.value for entry in model_proto.metadata_props}
    return ModelMetadata.from_props(props, source=str(path))


def encoder_reference(encoder_onnx: str | os.PathLike, in_dim: int) -> tuple[EncoderRef, Tiling | None]:
    """EncoderRef (name, output dim, sha256) of an exported encoder, checked against the model's in_dim."""
    metadata = read_metadata(encoder_onnx)
    if metadata.kind != "encoder":
        raise ContractMismatchError(
            f"{encoder_onnx} is a milkit {metadata.kind} model, not an encoder; pass the encoder's .onnx to --encoder"
        )
    if metadata.feature_dim != in_dim:
        raise ContractMismatchError(
            f"encoder {metadata.model_name} ({encoder_onnx}) gives {metadata.feature_dim}-d features but the "
            f"model takes {in_dim}-d; pass the encoder the model was trained on"
        )
    reference = EncoderRef(name=metadata.model_name, output_dim=metadata.feature_dim, sha256=file_identity(encoder_onnx),
                           weights_sha256=(metadata.provenance or {}).get("weights_sha256"))
    return reference, metadata.tiling


def load_checkpoint_checked(checkpoint_path: str | os.PathLike):
    """`mil_train.checkpoint.load_checkpoint` with the toolkit's errors for missing or foreign files."""
    from mil_train.checkpoint import load_checkpoint

    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise InputNotFoundError(f"checkpoint not found: {checkpoint_path}")
    try:
        return load_checkpoint(checkpoint_path)
    except (ValueError, KeyError, RuntimeError, EOFError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelFormatError(
            f"{checkpoint_path} is not a loadable milkit checkpoint ({first}); save it with "
            "mil_train.checkpoint.save_checkpoint"
        ) from None
    except Exception as exc:  # torch.load's unpickler raises its own types for foreign files
        raise ModelFormatError(
            f"{checkpoint_path} is not a milkit checkpoint ({type(exc).__name__}); save it with "
            "mil_train.checkpoint.save_checkpoint"
        ) from None


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    encoder_onnx: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    tiling: dict | Tiling | None = None,
    opset: int | None = None,
    verbose: bool = False,
) -> Path:
    """Export a checkpoint saved by `save_checkpoint`, carrying its class names, encoder, tiling, provenance
    and training-feature statistics (`milkit.feature_stats`, for the runtime's out-of-domain check).

    Arguments given here override the checkpoint's. With `encoder_onnx`, the encoder identity
    (name, output dim, sha256) is read from that exported encoder, and its tiling is the fallback.
    """
    from mil_export.pair import export_pair, pair_encoder_path
    from mil_train.feat_ext import feat_ext_of

    model, payload = load_checkpoint_checked(checkpoint_path)
    encoder: Any = payload.get("encoder")
    encoder_tiling = None
    own_encoder = feat_ext_of(model) is not None
    if own_encoder and encoder_onnx is not None:
        raise MilkitError(f"{Path(checkpoint_path).name} carries its own feature extractor, which is exported "
                          f"beside the model as {pair_encoder_path(out_path).name}; drop --encoder")
    if encoder_onnx is not None:
        encoder, encoder_tiling = encoder_reference(encoder_onnx, int(model.config["in_dim"]))
    chosen_tiling = tiling if tiling is not None else payload.get("tiling") or encoder_tiling
    provenance = dict(payload.get("provenance") or {})
    provenance.setdefault("checkpoint", Path(checkpoint_path).name)
    options = dict(
        class_names=class_names if class_names is not None else payload.get("class_names"),
        tiling=asdict(chosen_tiling) if isinstance(chosen_tiling, Tiling) else chosen_tiling,
        provenance=provenance,
        feature_stats=payload.get("feature_stats"),  # absent in older checkpoints: no out-of-domain check
        opset=opset,
        verbose=verbose,
    )
    if own_encoder:  # the encoder file first, then the MIL graph that names its sha256
        return export_pair(model, out_path, pair_encoder_path(out_path), **options)[0]
    return export_onnx(model, out_path, encoder=encoder, **options)
