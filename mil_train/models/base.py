"""`MILModel`: the interface every model implements, and `MILOutput`, what `forward` returns."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mil_train.feat_ext.attach import DEFAULT_INSTANCE_CHUNK, attach_feat_ext, with_features
from mil_train.nn.masking import masked_softmax  # noqa: F401  (re-exported: models import it from here)
from mil_train.tasks import ClassificationTask, Task, make_task


@dataclass
class MILOutput:
    """What a MIL model returns.

    logits:             (batch, n_classes)
    attention:          (batch, bag) per-instance pooling weights, sum 1 over real instances, 0 on padding
    attention_by_class: (batch, n_classes, bag) per-class weights of multi-branch models (CLAM_MB), each
                        row normalised like `attention`; None for single-branch models. Models that set
                        it declare `class_attention = True`, and the exporter adds it as an ONNX output.
    instance_probabilities: (batch, bag, n_classes) each instance's probability of class-k evidence, read
                        off the model's own instance classifier (binary: (batch, bag, 1), the positive
                        class); exactly 0 on padding; None for models without an instance classifier.
                        Models that set it declare `instance_outputs = True`, and the exporter adds
                        it as an ONNX output.
    """

    logits: torch.Tensor
    attention: torch.Tensor
    attention_by_class: torch.Tensor | None = None
    instance_probabilities: torch.Tensor | None = None


def has_instance_classifier(model: nn.Module) -> bool:
    """The model declares `instance_outputs` (forward fills MILOutput.instance_probabilities)."""
    return bool(getattr(model, "instance_outputs", False))


class MILModel(nn.Module):
    """Base class of every registered model.

    Subclasses implement `forward(X, mask=None, *, edge_index=None, edge_weight=None, coords=None)`
    and may extend `compute_loss` with auxiliary losses. `config` holds the constructor kwargs so a
    checkpoint or an exported file can rebuild the model by name.

    Class attributes describe which optional inputs the model consumes; the exporter reads them:
      uses_graph  -> edge_index / edge_weight are inputs (graph rule in `graph_rule`)
      uses_coords -> coords is an input
      class_attention -> forward fills `attention_by_class`, exported as an extra output
      instance_outputs -> forward fills `instance_probabilities` (from the model's instance
                      classifier), exported as an extra output

    Two more describe how far the model is checked:
      max_bag_size -> None for models linear in N; for full self-attention models the largest bag
                      whose N x N attention fits 4 GB, which tests and `mil-export validate` stop at
      attention_localises -> attention is meant to rank the instances that drive the label first
                      (tested on planted positives)

    And one how it trains over processes:
      ddp_find_unused_parameters -> some training steps leave parameters out of `compute_loss`'s
                      graph (e.g. a branch run only for some labels), so DDP must search for them
                      each step (mil_train.distributed); False for models whose every parameter
                      enters every step's loss (tests/train/test_ddp.py checks each registered model)
    """

    name: str = ""
    uses_graph: bool = False
    uses_coords: bool = False
    class_attention: bool = False
    instance_outputs: bool = False
    max_bag_size: int | None = None
    attention_localises: bool = True
    ddp_find_unused_parameters: bool = False

    def __init__(self, n_classes: int = 1, **config: Any) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes = n_classes
        self.config: dict[str, Any] = {"n_classes": n_classes, **config}
        # set by _with_task around the subclass's constructor; classification otherwise
        task = self.__dict__.pop("_pending_task", None)
        self.task: Task = task if task is not None else ClassificationTask(n_classes)
        if task is not None:
            self.config["task"] = task.to_config()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass constructor takes `task=` (see `_with_task`) and `feat_ext=` / `instance_chunk=`
        (see `_with_feat_ext`) without naming them itself, and every `compute_loss` sees the extracted
        features of image bags (mil_train.feat_ext), whatever it reads besides forward."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _with_feat_ext(_with_task(cls.__dict__["__init__"]))
        if "compute_loss" in cls.__dict__:
            cls.compute_loss = _on_features(cls.__dict__["compute_loss"])

    @property
    def is_classifier(self) -> bool:
        """The model classifies bags (the default task); False for regression and survival heads."""
        return self.task.type == "classification"

    # Graph models set this to their named rule, e.g. mil_train.data.graphs.TORCHMIL_GRAPH_RULE.
    default_graph_rule: dict[str, Any] | None = None
    # What a graph model loses when it gets neither edges nor coords (said in the warning).
    without_graph: str = "no instance has neighbours"

    @property
    def graph_rule(self) -> dict[str, Any] | None:
        """The named graph rule ({"rule": ..., "params": ...}) for graph models, else None (a copy)."""
        rule = self.default_graph_rule
        return None if rule is None else {"rule": rule["rule"], "params": dict(rule.get("params") or {})}

    def resolve_graph(
        self,
        edge_index: torch.Tensor | None,
        edge_weight: torch.Tensor | None,
        coords: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The edges a graph model runs on: as given; else `graph_rule` over coords (eager only: the
        exported graph always receives its edges); else none, with a warning."""
        if edge_index is not None:
            return edge_index, edge_weight
        if coords is not None:
            from mil_train.data.graphs import batch_graph

            rule = self.graph_rule
            edge_index, edge_weight = batch_graph(
                coords.cpu(), None if mask is None else mask.cpu(), rule["rule"], **rule["params"]
            )
            return edge_index.to(coords.device), edge_weight.to(coords.device)
        warnings.warn(
            f"{self.name} got neither edge_index nor coords, so {self.without_graph}; give the bags coords "
            "or a graph (e.g. MILDataset(bags, graph_rule=model.graph_rule))",
            stacklevel=3,
        )
        return None, None

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        raise NotImplementedError

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid for binary (n_classes=1), softmax otherwise."""
        return torch.sigmoid(logits) if self.n_classes == 1 else torch.softmax(logits, dim=-1)

    def classification_loss(self, logits: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """The main ("cls") loss term: the classification loss, or the task's loss for regression and
        survival heads (every model's compute_loss calls this for its main term)."""
        if not self.is_classifier:
            return self.task.loss(logits, Y)
        if self.n_classes == 1:
            return nn.functional.binary_cross_entropy_with_logits(logits.reshape(-1), Y.reshape(-1).float())
        return nn.functional.cross_entropy(logits, Y.reshape(-1).long())

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and named loss terms for a collated batch; "cls" is the classification loss.

        Models with auxiliary losses override this and add terms under stable names; the Trainer
        weighs each term by name.
        """
        batch = with_features(self, batch)  # subclasses' compute_loss get this from __init_subclass__
        out = self(
            batch["X"],
            batch.get("mask", None),
            edge_index=batch.get("edge_index", None),
            edge_weight=batch.get("edge_weight", None),
            coords=batch.get("coords", None),
        )
        return out.logits, {"cls": self.classification_loss(out.logits, batch["Y"])}


def _with_feat_ext(init):
    """Wrap a model constructor so it takes `feat_ext=` (a FeatureExtractor or a registered spec
    {"name": ..., **config}) and `instance_chunk=`: the extractor is attached once the model is built
    (mil_train.feat_ext.attach_feat_ext), and recorded in its config when it is registered."""

    @functools.wraps(init)
    def constructor(self, *args: Any, feat_ext: Any = None, instance_chunk: int | None = None, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if feat_ext is not None:
            attach_feat_ext(self, feat_ext, instance_chunk or DEFAULT_INSTANCE_CHUNK)
        elif instance_chunk is not None:
            raise ValueError("instance_chunk is for models with a feature extractor (feat_ext=)")

    return constructor


def _on_features(compute_loss):
    """compute_loss on the features of image bags: models whose loss reads X besides forward (instance
    losses, pseudo-bags) see features there too, and the extractor runs once per step."""

    @functools.wraps(compute_loss)
    def on_features(self, batch: Any):
        return compute_loss(self, with_features(self, batch))

    return on_features


def _with_task(init):
    """Wrap a model constructor so it takes `task=` (name, config dict or Task; mil_train.tasks).

    A regression or survival task sets the architecture's output width: the constructor runs with
    n_classes = task.head_dim, and the model's `task` and config["task"] record it, so a checkpoint
    rebuilds the same model by name. Without `task`, or with a plain classification task, the
    constructor runs exactly as before (classification stays byte-identical, config included).
    """

    @functools.wraps(init)
    def constructor(self, *args: Any, task: Any = None, **kwargs: Any) -> None:
        if task is None or "_pending_task" in self.__dict__:  # no task, or an inner super().__init__
            return init(self, *args, **kwargs)
        spec = make_task(task, n_classes=kwargs.get("n_classes", 1))
        if spec.type == "classification":
            kwargs.setdefault("n_classes", spec.head_dim)
            return init(self, *args, **kwargs)
        if kwargs.get("n_classes", spec.head_dim) != spec.head_dim:
            raise ValueError(
                f"n_classes={kwargs['n_classes']} does not fit the {spec.type} task, whose head has {spec.head_dim} "
                f"outputs ({spec.to_config()}); leave n_classes out"
            )
        kwargs["n_classes"] = spec.head_dim
        object.__setattr__(self, "_pending_task", spec)  # read (and removed) by MILModel.__init__
        try:
            init(self, *args, **kwargs)
        finally:
            self.__dict__.pop("_pending_task", None)

    return constructor
