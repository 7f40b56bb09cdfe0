"""The ONNX contract: tensor names, and the `milkit.*` metadata every exported file carries.

This module is the single definition shared by the exporter (which writes it) and the runtime (which
reads and validates it). It depends on nothing but the standard library.

Adding `milkit.outputs` kept schema 1: an older runtime ignores the key and the extra output (it
fetches outputs by name), and this runtime reads older files as having the standard outputs.

Metadata lives in the ONNX file's `metadata_props` as string key/value pairs. Structured values are
JSON. Keys (all prefixed ``milkit.``):

| key              | value                                                                   |
|------------------|-------------------------------------------------------------------------|
| schema_version   | integer, `SCHEMA_VERSION`                                               |
| kind             | "mil" or "encoder"                                                      |
| model            | JSON {"name": registry name, "config": constructor kwargs}              |
| task             | JSON {"n_classes": int, "class_names": [...], "activation": "sigmoid"/"softmax"} |
|                  | for classifiers (no "type" key: every older file is one); regression and |
|                  | survival models: {"type": "regression"/"survival", ...} (`TASK_TYPES`)   |
| feature_dim      | integer: D of `features` (mil) or of the output (encoder)               |
| inputs           | JSON list of input names, e.g. ["features", "mask"]                     |
| outputs          | JSON list of output names, e.g. ["logits", "probabilities", "attention"] |
|                  | (+ "attention_by_class" for multi-branch models, + "instance_probabilities" |
|                  | for models with an instance classifier). Files written before           |
|                  | this key existed lack it: absent means `standard_outputs(kind)`          |
| graph            | JSON {"rule": "grid8", "params": {...}} or null                         |
| encoder          | JSON {"name", "output_dim", "sha256"} or null (mil only)                |
| tiling           | JSON {"tile_px": int, "mpp": float, "overlap": float} or null           |
| version          | the milkit package version that wrote the file                          |
| provenance       | JSON: free-form training provenance (dataset, epochs, metrics, date)    |
| feature_stats    | optional JSON: the training features' statistics for the out-of-domain  |
|                  | check (`check_feature_stats`, mil_runtime.domain); absent: no check   |

Adding the optional `instance_probabilities` output kept schema 1 too: it is listed in `milkit.outputs`,
so a runtime that does not know it refuses the file with "upgrade milkit" rather than misreading it.

Adding the optional `milkit.feature_stats` also kept schema 1: older files lack it and are not checked.

Regression and survival models (added later, schema still 1) declare `"type"` in milkit.task and have
their task's outputs instead of `logits` / `probabilities` (`task_outputs`): regression `values`
[batch, n_targets]; survival `risk` [batch], plus `hazards` and `survival` [batch, n_bins] for the
discrete-time hazard head ("loss": "nll"). `attention` stays. A runtime older than them refuses such a
file (its milkit.task has no n_classes, exit 4) rather than misreading it. A task dict without "type"
is a classifier, so every older file reads unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mil_runtime.errors import ContractMismatchError, ModelFormatError

SCHEMA_VERSION = 1
PREFIX = "milkit."

# MIL model graph
FEATURES = "features"  # float32 [batch, bag, D]
MASK = "mask"  # bool [batch, bag], True = real instance
EDGE_INDEX = "edge_index"  # int64 [2, edges], into the flattened (batch * bag) node space
EDGE_WEIGHT = "edge_weight"  # float32 [edges]
COORDS = "coords"  # int64 [batch, bag, 2], grid units, (y, x)
LOGITS = "logits"  # float32 [batch, n_classes]
PROBABILITIES = "probabilities"  # float32 [batch, n_classes]
ATTENTION = "attention"  # float32 [batch, bag]
# float32 [batch, n_classes, bag]: one attention map per class, each normalised like `attention`;
# only multi-branch models with n_classes >= 2 have it (a binary model's one map is `attention`)
ATTENTION_BY_CLASS = "attention_by_class"
# float32 [batch, bag, n_classes]: each instance's probability of class-k evidence from the model's own
# instance classifier, exactly 0 on padding; binary models (n_classes=1) give [batch, bag, 1], the
# positive class. Only models with an instance classifier (DSMIL, CLAM_SB, CLAM_MB, IIBMIL) have it.
INSTANCE_PROBABILITIES = "instance_probabilities"
# Regression and survival heads (milkit.task "type"): what they output instead of logits / probabilities
VALUES = "values"  # float32 [batch, n_targets]: regression predictions, in the targets' units
RISK = "risk"  # float32 [batch]: survival risk, higher = earlier event (Cox: log relative hazard)
HAZARDS = "hazards"  # float32 [batch, n_bins]: discrete-time hazard of each time bin
SURVIVAL = "survival"  # float32 [batch, n_bins]: probability of being event-free at the end of each bin

CLASSIFICATION, REGRESSION, SURVIVAL_TASK = "classification", "regression", "survival"
TASK_TYPES = (CLASSIFICATION, REGRESSION, SURVIVAL_TASK)
SURVIVAL_METHODS = ("nll", "cox")  # discrete-time hazards (PatchGCN/MCAT NLL) or Cox partial likelihood

MIL_REQUIRED_INPUTS = (FEATURES, MASK)
MIL_OPTIONAL_INPUTS = (EDGE_INDEX, EDGE_WEIGHT, COORDS)
MIL_OUTPUTS = (LOGITS, PROBABILITIES, ATTENTION)  # every MIL graph has these
MIL_OPTIONAL_OUTPUTS = (ATTENTION_BY_CLASS, INSTANCE_PROBABILITIES)  # in this order after MIL_OUTPUTS

# Encoder graph
TILES = "tiles"  # uint8 [batch, H, W, 3] RGB
ENCODER_OUTPUT = "features"  # float32 [batch, D]

# Symbolic axis names
BATCH_AXIS = "batch"
BAG_AXIS = "bag"
EDGES_AXIS = "edges"

KINDS = ("mil", "encoder")


def task_outputs(task_type: str, task: dict[str, Any] | None = None) -> list[str]:
    """The outputs a MIL graph of this task has, in order (optional classification outputs follow)."""
    if task_type == REGRESSION:
        return [VALUES, ATTENTION]
    if task_type == SURVIVAL_TASK:
        method = (task or {}).get("loss", "nll")
        return [RISK, ATTENTION] if method == "cox" else [RISK, HAZARDS, SURVIVAL, ATTENTION]
    return list(MIL_OUTPUTS)


def default_target_names(n_targets: int) -> list[str]:
    """A regression model's value names when it records none: "value", or value_0 ... value_{k-1}."""
    return ["value"] if n_targets == 1 else [f"value_{i}" for i in range(n_targets)]


def standard_outputs(kind: str) -> list[str]:
    """The outputs a file of `kind` has when its metadata lists none (files older than milkit.outputs)."""
    return list(MIL_OUTPUTS) if kind == "mil" else [ENCODER_OUTPUT]


@dataclass
class EncoderRef:
    """The encoder a MIL model was trained on: the runtime checks a found encoder against it."""

    name: str
    output_dim: int
    sha256: str | None = None
    # sha256 of the weights file the encoder was exported from (its provenance): the same weights exported
    # again (another precision, fused or not) keep it, other weights under the same name do not
    weights_sha256: str | None = None


def _encoder_props(encoder: EncoderRef | None) -> dict | None:
    """The encoder entry as stored; weights_sha256 only when known, so files without it read as before."""
    if encoder is None:
        return None
    props = asdict(encoder)
    if props["weights_sha256"] is None:
        del props["weights_sha256"]
    return props


@dataclass
class Tiling:
    tile_px: int
    mpp: float
    overlap: float = 0.0


@dataclass
class ModelMetadata:
    """Everything the runtime needs to know about an exported file, parsed and validated."""

    kind: str
    model_name: str
    feature_dim: int
    inputs: list[str]
    outputs: list[str] | None = None  # None: the standard outputs of `kind` (set in __post_init__)
    model_config: dict[str, Any] = field(default_factory=dict)
    n_classes: int | None = None
    class_names: list[str] | None = None
    activation: str | None = None
    graph: dict[str, Any] | None = None
    encoder: EncoderRef | None = None
    tiling: Tiling | None = None
    version: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    feature_stats: dict[str, Any] | None = None  # FEATURE_STATS_FIELDS; None: no out-of-domain check
    task_type: str = CLASSIFICATION  # TASK_TYPES
    # regression: {"n_targets", "target_names", ...}; survival: {"loss", "n_bins", "bin_edges", ...}; {} otherwise
    task_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.outputs = standard_outputs(self.kind) if self.outputs is None else list(self.outputs)

    @property
    def is_classifier(self) -> bool:
        return self.task_type == CLASSIFICATION

    @property
    def target_names(self) -> list[str]:
        """A regression model's value names (milkit.task target_names, else `default_target_names`)."""
        names = self.task_options.get("target_names")
        return list(names) if names else default_target_names(int(self.task_options.get("n_targets", 1)))

    @property
    def has_class_attention(self) -> bool:
        """The graph has `attention_by_class`: one attention map per class (multi-branch models)."""
        return ATTENTION_BY_CLASS in (self.outputs or ())

    @property
    def has_instance_probabilities(self) -> bool:
        """The graph has `instance_probabilities`: per-instance class probabilities (instance classifiers)."""
        return INSTANCE_PROBABILITIES in (self.outputs or ())

    # -- writing -----------------------------------------------------------------------------
    def to_props(self) -> dict[str, str]:
        """The `metadata_props` key/value strings to store in an ONNX file."""
        task = None
        if self.kind == "mil" and self.is_classifier:  # written as before the other tasks existed
            task = {"n_classes": self.n_classes, "class_names": self.class_names, "activation": self.activation}
        elif self.kind == "mil":
            task = {"type": self.task_type, **self.task_options}
        values = {
            "schema_version": str(self.schema_version),
            "kind": self.kind,
            "model": json.dumps({"name": self.model_name, "config": self.model_config}),
            "task": json.dumps(task),
            "feature_dim": str(self.feature_dim),
            "inputs": json.dumps(list(self.inputs)),
            "outputs": json.dumps(list(self.outputs)),
            "graph": json.dumps(self.graph),
            "encoder": json.dumps(_encoder_props(self.encoder)),
            "tiling": json.dumps(asdict(self.tiling) if self.tiling else None),
            "version": self.version,
            "provenance": json.dumps(self.provenance),
        }
        if self.feature_stats is not None:  # optional: files without it load as before
            values["feature_stats"] = json.dumps(self.feature_stats)
        return {PREFIX + k: v for k, v in values.items()}

    # -- reading -----------------------------------------------------------------------------
    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "ModelMetadata":
        """Parse and validate `metadata_props`; raise ModelFormatError saying what is wrong."""
        if PREFIX + "schema_version" not in props:
            raise ModelFormatError(
                f"{source} is not a milkit model (no milkit.* metadata); export it with `mil-export`"
            )
        try:
            version = int(props[PREFIX + "schema_version"])
        except ValueError:
            raise ModelFormatError(f"{source}: milkit.schema_version is not an integer") from None
        if version > SCHEMA_VERSION:
            raise ModelFormatError(
                f"{source} uses metadata schema {version}, this milkit reads up to {SCHEMA_VERSION}; "
                "upgrade milkit"
            )

        def get(key: str, parse_json: bool = True) -> Any:
            if PREFIX + key not in props:
                raise ModelFormatError(f"{source}: metadata key milkit.{key} is missing; re-export the model")
            raw = props[PREFIX + key]
            if not parse_json:
                return raw
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise ModelFormatError(f"{source}: metadata key milkit.{key} is not valid JSON") from None

        kind = get("kind", parse_json=False)
        if kind not in KINDS:
            raise ModelFormatError(f"{source}: milkit.kind is {kind!r}, expected one of {KINDS}")
        model = get("model")
        task = get("task") or {}
        encoder = get("encoder")
        tiling = get("tiling")
        outputs = get("outputs") if PREFIX + "outputs" in props else None  # absent: standard outputs
        if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
            raise ModelFormatError(f"{source}: milkit.outputs must be a JSON list of output names; re-export the model")
        # wrong JSON types are a malformed file (exit 4), not a crash further down
        def expect(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ModelFormatError(f"{source}: metadata key milkit.{key} must be {what}; re-export the model")

        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        expect(isinstance(model, dict) and isinstance(model.get("name", ""), str)
               and isinstance(model.get("config", {}), dict), "model", 'a JSON object {"name": text, "config": {...}}')
        expect(isinstance(task, dict) and task.get("type", CLASSIFICATION) in TASK_TYPES, "task",
               f'a JSON object whose "type" (when present) is one of {list(TASK_TYPES)}; upgrade milkit')
        task_type = task.get("type", CLASSIFICATION)
        expect(task_type != CLASSIFICATION or task.get("n_classes") is None or whole(task["n_classes"]), "task",
               'a JSON object {"n_classes": integer, ...}')
        expect(isinstance(task, dict) and (task.get("n_classes") is None or whole(task["n_classes"]))
               and (task.get("class_names") is None or (isinstance(task["class_names"], list)
                                                        and all(isinstance(n, str) for n in task["class_names"])))
               and (task.get("activation") is None or isinstance(task["activation"], str)),
               "task", 'a JSON object {"n_classes": integer, "class_names": [text, ...] or null, "activation": text}')
        feature_dim = get("feature_dim")
        expect(whole(feature_dim), "feature_dim", "an integer")
        inputs = get("inputs")
        expect(isinstance(inputs, list) and all(isinstance(name, str) for name in inputs), "inputs",
               "a JSON list of input names")
        graph = get("graph")
        expect(graph is None or isinstance(graph, dict), "graph", "a JSON object or null")
        expect(encoder is None or (isinstance(encoder, dict) and {"name", "output_dim"} <= set(encoder)
                                   and set(encoder) <= {"name", "output_dim", "sha256", "weights_sha256"}
                                   and isinstance(encoder["name"], str) and whole(encoder["output_dim"])
                                   and all(encoder.get(k) is None or isinstance(encoder[k], str)
                                           for k in ("sha256", "weights_sha256"))),
               "encoder", 'null or a JSON object {"name": text, "output_dim": integer, "sha256": text or null, '
                          '"weights_sha256": text or null}')
        expect(tiling is None or (isinstance(tiling, dict) and {"tile_px", "mpp"} <= set(tiling)
                                  and set(tiling) <= {"tile_px", "mpp", "overlap"} and whole(tiling["tile_px"])
                                  and number(tiling["mpp"]) and number(tiling.get("overlap", 0.0))),
               "tiling", 'null or a JSON object {"tile_px": integer, "mpp": number, "overlap": number}')
        provenance = get("provenance")
        expect(provenance is None or isinstance(provenance, dict), "provenance", "a JSON object")
        meta = cls(
            kind=kind,
            model_name=model.get("name", ""),
            model_config=model.get("config", {}),
            feature_dim=feature_dim,
            inputs=list(inputs),
            outputs=outputs,
            n_classes=task.get("n_classes"),
            class_names=task.get("class_names"),
            activation=task.get("activation"),
            graph=graph,
            encoder=EncoderRef(**encoder) if encoder else None,
            tiling=Tiling(**tiling) if tiling else None,
            version=get("version", parse_json=False),
            provenance=provenance or {},
            schema_version=version,
            feature_stats=get("feature_stats") if PREFIX + "feature_stats" in props else None,
            task_type=task_type,
            task_options={k: v for k, v in task.items() if k != "type"} if task_type != CLASSIFICATION else {},
        )
        meta.validate(source)
        return meta

    def validate(self, source: str = "model") -> None:
        if self.feature_dim <= 0:
            raise ModelFormatError(f"{source}: feature_dim must be positive, got {self.feature_dim}")
        if self.kind == "mil":
            missing = [name for name in MIL_REQUIRED_INPUTS if name not in self.inputs]
            if missing:
                raise ModelFormatError(f"{source}: metadata lists no input {missing}; re-export the model")
            unknown = [n for n in self.inputs if n not in MIL_REQUIRED_INPUTS + MIL_OPTIONAL_INPUTS]
            if unknown:
                raise ModelFormatError(f"{source}: unknown inputs {unknown} for schema {self.schema_version}")
            if self.is_classifier:
                self._validate_classes(source)
            else:
                self._validate_task_options(source)
            if (EDGE_INDEX in self.inputs) != (self.graph is not None):
                raise ModelFormatError(f"{source}: graph inputs and milkit.graph disagree")
            if self.is_classifier:
                self._validate_mil_outputs(source)
            else:
                self._validate_task_outputs(source)
            if self.feature_stats is not None:
                check_feature_stats(self.feature_stats, self.feature_dim, source)
        elif self.outputs != [ENCODER_OUTPUT]:
            raise ModelFormatError(
                f"{source}: an encoder has the one output {ENCODER_OUTPUT!r}, milkit.outputs lists {self.outputs}; "
                "re-export the encoder with mil-export"
            )

    def _validate_classes(self, source: str) -> None:
        if not self.n_classes or self.n_classes < 1:
            raise ModelFormatError(f"{source}: task.n_classes must be >= 1")
        if self.activation not in ("sigmoid", "softmax"):
            raise ModelFormatError(f"{source}: task.activation must be sigmoid or softmax")
        if self.class_names is not None and len(self.class_names) != max(self.n_classes, 2):
            raise ModelFormatError(
                f"{source}: {len(self.class_names)} class names for n_classes={self.n_classes}"
            )
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ModelFormatError(
                f"{source}: class names {self.class_names} are not unique; results are keyed by class name, "
                "re-export the model with distinct names"
            )

    def _validate_task_options(self, source: str) -> None:
        """Regression: n_targets >= 1 and unique target names; survival: a known method, bins that fit."""
        options, fix = self.task_options, "; re-export the model"
        if self.task_type == REGRESSION:
            n_targets = options.get("n_targets", 1)
            if not isinstance(n_targets, int) or isinstance(n_targets, bool) or n_targets < 1:
                raise ModelFormatError(f"{source}: milkit.task n_targets must be an integer >= 1{fix}")
            names = options.get("target_names")
            if names is not None and (not isinstance(names, list) or len(names) != n_targets
                                      or len(set(map(str, names))) != n_targets):
                raise ModelFormatError(f"{source}: milkit.task target_names must be {n_targets} distinct names{fix}")
            return
        method = options.get("loss", "nll")
        if method not in SURVIVAL_METHODS:
            raise ModelFormatError(f"{source}: milkit.task loss {method!r} is not one of {list(SURVIVAL_METHODS)}; "
                                   "upgrade milkit")
        if method == "nll":
            n_bins, edges = options.get("n_bins"), options.get("bin_edges")
            if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 2:
                raise ModelFormatError(f"{source}: milkit.task n_bins must be an integer >= 2{fix}")
            if edges is not None and (not isinstance(edges, list) or len(edges) != n_bins - 1):
                raise ModelFormatError(f"{source}: milkit.task bin_edges must be {n_bins - 1} times{fix}")

    def _validate_task_outputs(self, source: str) -> None:
        """A regression or survival graph has exactly its task's outputs (`task_outputs`)."""
        expected = task_outputs(self.task_type, self.task_options)
        if list(self.outputs or ()) != expected:
            raise ModelFormatError(
                f"{source}: a {self.task_type} model has the outputs {expected}, milkit.outputs lists {self.outputs}; "
                "upgrade milkit or re-export the model"
            )

    def _validate_mil_outputs(self, source: str) -> None:
        outputs = list(self.outputs or ())
        missing = [name for name in MIL_OUTPUTS if name not in outputs]
        if missing:
            raise ModelFormatError(f"{source}: milkit.outputs lists no output {missing}; re-export the model")
        unknown = [name for name in outputs if name not in MIL_OUTPUTS + MIL_OPTIONAL_OUTPUTS]
        if unknown:
            raise ModelFormatError(
                f"{source}: unknown outputs {unknown} (this milkit knows {list(MIL_OUTPUTS + MIL_OPTIONAL_OUTPUTS)}); "
                "upgrade milkit or re-export the model"
            )
        if len(set(outputs)) != len(outputs):
            raise ModelFormatError(f"{source}: milkit.outputs {outputs} lists an output twice; re-export the model")
        if ATTENTION_BY_CLASS in outputs and self.n_classes == 1:
            raise ModelFormatError(
                f"{source}: a binary model (n_classes=1) has one attention map, `{ATTENTION}`, but milkit.outputs "
                f"lists {ATTENTION_BY_CLASS}; re-export the model"
            )

    # -- helpers ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Class names for reporting; binary models (n_classes=1) report two: negative, positive."""
        if self.class_names:
            return list(self.class_names)
        n = max(self.n_classes or 1, 2)
        return [f"class_{i}" for i in range(n)]

    def check_feature_dim(self, dim: int, source: str) -> None:
        if dim != self.feature_dim:
            raise ContractMismatchError(
                f"{source} has {dim}-d features but the model expects {self.feature_dim}-d; "
                "encode the slide with the encoder the model was trained on"
                + (f" ({self.encoder.name})" if self.encoder else "")
            )


# milkit.feature_stats: per-feature mean and std of the training tiles, and the out-of-domain threshold on
# the per-tile distance `distance` (mean over features of ((x - mean) / std)^2; std floored, see
# mil_runtime.domain) at quantile `quantile` of the training tiles' distances.
FEATURE_STATS_VERSION = 1
FEATURE_STATS_FIELDS = ("version", "distance", "mean", "std", "threshold", "quantile", "n_tiles", "n_bags")
FEATURE_STATS_DISTANCE = "mean_squared_z"


def check_feature_stats(stats: Any, feature_dim: int, source: str = "model") -> None:
    """Refuse a malformed milkit.feature_stats (ModelFormatError) rather than score slides with it."""
    fix = "; re-export the model (or drop the key)"
    if not isinstance(stats, dict) or any(key not in stats for key in FEATURE_STATS_FIELDS):
        raise ModelFormatError(f"{source}: milkit.feature_stats must be a JSON object with {list(FEATURE_STATS_FIELDS)}{fix}")
    if stats["version"] != FEATURE_STATS_VERSION or stats["distance"] != FEATURE_STATS_DISTANCE:
        raise ModelFormatError(
            f"{source}: milkit.feature_stats is version {stats['version']!r} / distance {stats['distance']!r}, this "
            f"milkit reads version {FEATURE_STATS_VERSION} / {FEATURE_STATS_DISTANCE!r}; upgrade milkit{fix}"
        )
    for key in ("mean", "std"):
        values = stats[key]
        if not (isinstance(values, list) and len(values) == feature_dim
                and all(isinstance(v, (int, float)) and v == v and abs(v) != float("inf") for v in values)):
            raise ModelFormatError(f"{source}: milkit.feature_stats.{key} must be {feature_dim} finite numbers{fix}")
    if any(v < 0 for v in stats["std"]):
        raise ModelFormatError(f"{source}: milkit.feature_stats.std has negative values{fix}")
    threshold = stats["threshold"]
    if not isinstance(threshold, (int, float)) or not threshold > 0 or threshold == float("inf"):
        raise ModelFormatError(f"{source}: milkit.feature_stats.threshold must be a positive number{fix}")


def default_class_names(n_classes: int) -> list[str]:
    """Binary (n_classes=1) gets ["negative", "positive"]; otherwise class_0..class_{n-1}."""
    if n_classes == 1:
        return ["negative", "positive"]
    return [f"class_{i}" for i in range(n_classes)]
