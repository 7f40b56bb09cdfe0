"""Composed: a MIL model put together from blocks of `mil_train.nn`, named in a JSON config.

    instances -> [feature extractor] -> [layer] -> pool -> linear classifier

    create_model("Composed", in_dim=1024, layer="gcn", pool="attention")   # GCN + attention pooling
    create_model("Composed", in_dim=1024, layer="gcn", pool="mincut")      # the same, graph pooling

Each slot is a name and a dict of that block's arguments, so the model is saved, rebuilt and exported
like every registered model (`create_model("Composed", **config)`, weights_only checkpoints, one ONNX):

  feat_ext    what every registered model takes: `create_model("Composed", ..., feat_ext={"name":
              "small_cnn", "out_dim": in_dim})` attaches a registered extractor (mil_train.feat_ext),
              which turns images into in_dim features before the blocks below; none by default
  layer       None; "transformer" (`TransformerEncoder`, in_dim -> in_dim; layer_args: att_dim=512,
              n_heads=8, n_layers=1, use_mlp=True, add_self=True, dropout=0.0, torchmil's defaults);
              "gcn" (n_layers of torchmil's `GCNConv` with a self loop, a learned linear map and
              ReLU; layer_args: out_dim=in_dim, n_layers=1, layer_norm=False, dropout=0.0)
  pool        "attention" (`AttentionPool`; pool_args: att_dim=128, act="tanh", gated=False);
              "mean" (`MeanPool`); "max" (`MaxPool`); "mincut": dense min-cut pooling of the instance
              graph into n_clusters soft clusters (a linear map gives the assignment logits, as in
              GTP), then attention pooling over the clusters (pool_args: n_clusters=8, temp=1.0,
              att_dim=128, act="tanh", gated=False); training adds the "mincut" and "ortho" losses
  classifier  Linear(width, n_classes)

`attention` (batch, bag), summing to 1 over the real instances and 0 on padding, is the pool's own:
the attention weights; 1 / n for mean; for max each instance's share of the features whose maximum
it holds; for min-cut S a / sum(S a), the cluster attention a pushed back through the assignments S.

A graph layer or the min-cut pool make the model a graph model (`uses_graph`): it takes edge_index /
edge_weight, or builds them from coords by torchmil's dataset graph rule, like PatchGCN and GTP.
A transformer layer makes it full self-attention, checked up to `max_bag_size` (DESIGN section 7).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mil_train.data.graphs import TORCHMIL_GRAPH_RULE
from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn import AttentionPool, GCNConv, MaxPool, MeanPool, TransformerEncoder
from mil_train.nn.mincut_pool import cluster_assignments, mincut_losses, pool_features, propagate
from mil_train.nn.neighbour_table import neighbour_table
from mil_train.nn.transformer import max_bag_for_attention

LAYERS = (None, "transformer", "gcn")
POOLS = ("attention", "mean", "max", "mincut")
TRANSFORMER_DEFAULTS = {"att_dim": 512, "n_heads": 8, "n_layers": 1, "use_mlp": True, "add_self": True, "dropout": 0.0}
GCN_DEFAULTS = {"out_dim": None, "n_layers": 1, "layer_norm": False, "dropout": 0.0}
ATTENTION_DEFAULTS = {"att_dim": 128, "act": "tanh", "gated": False}
MINCUT_DEFAULTS = {"n_clusters": 8, "temp": 1.0, **ATTENTION_DEFAULTS}
POOL_DEFAULTS = {"attention": ATTENTION_DEFAULTS, "mean": {}, "max": {}, "mincut": MINCUT_DEFAULTS}


def _arguments(kind: str, given: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """The block's defaults updated by `given`; an argument the block does not take is an error."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{kind} takes {sorted(defaults) or 'no arguments'}, got {unknown}")
    return {**defaults, **given}


def _reads_graph(config: dict[str, Any]) -> bool:
    return config.get("layer") == "gcn" or config.get("pool", "attention") == "mincut"


class _ReadsGraph:
    """`uses_graph` of a Composed model: whether its blocks read a graph. On the class (the registry
    asks the class) it describes the default composition, which reads none."""

    def __get__(self, model: Any, owner: type) -> bool:
        return _reads_graph({} if model is None else model.config)


def _choose(kind: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{kind} must be one of {list(choices)}, got {value!r}")
    return value


@register_model
class Composed(MILModel):
    """Optional transformer or graph layer -> pool -> linear classifier (a feature extractor, when
    `create_model(feat_ext=...)` attaches one, runs before, as for every model).

    Args:
        in_dim: instance feature dimension D.
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        layer: None, "transformer" or "gcn"; layer_args its arguments (module docstring).
        pool: "attention", "mean", "max" or "mincut"; pool_args its arguments.
    compute_loss terms: "cls", plus "mincut" and "ortho" (batch means, weight 1 as GTP) for pool="mincut".
    """

    name = "Composed"
    default_graph_rule = TORCHMIL_GRAPH_RULE  # used only when the layer or the pool reads a graph
    without_graph = "its graph blocks see no neighbours"
    uses_graph = _ReadsGraph()  # type: ignore[assignment]

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        layer: str | None = None,
        layer_args: dict[str, Any] | None = None,
        pool: str = "attention",
        pool_args: dict[str, Any] | None = None,
    ) -> None:
        _choose("layer", layer, LAYERS)
        _choose("pool", pool, POOLS)
        layer_defaults = {"transformer": TRANSFORMER_DEFAULTS, "gcn": GCN_DEFAULTS, None: {}}[layer]
        layer_args = _arguments(f"layer {layer!r}", layer_args, layer_defaults)
        pool_args = _arguments(f"pool {pool!r}", pool_args, POOL_DEFAULTS[pool])
        super().__init__(n_classes=n_classes, in_dim=in_dim, layer=layer, layer_args=layer_args, pool=pool,
                         pool_args=pool_args)
        self.layer_kind, self.pool_kind = layer, pool
        self.layers, width = self._build_layers(layer, layer_args, in_dim)
        self.pool, self.cluster_proj = self._build_pool(pool, pool_args, width)
        self.temp = float(pool_args.get("temp", 1.0))
        self.classifier = nn.Linear(width, n_classes)
        if layer == "transformer":
            self.max_bag_size = max_bag_for_attention(layer_args["n_heads"])
        # mean pooling weighs every instance alike; max pooling's feature shares rank witnesses only
        # loosely (instance AUROC 0.71-0.80 on planted positives, docs/models/Composed.md)
        self.attention_localises = pool in ("attention", "mincut")

    @property
    def graph_rule(self) -> dict[str, Any] | None:
        """torchmil's dataset graph rule when a block reads a graph, else None (the exported file then
        records no graph)."""
        return super().graph_rule if self.uses_graph else None

    @staticmethod
    def _build_layers(layer: str | None, args: dict[str, Any], in_dim: int) -> tuple[nn.ModuleList, int]:
        if layer == "transformer":
            return nn.ModuleList([TransformerEncoder(in_dim=in_dim, out_dim=in_dim, **args)]), in_dim
        if layer == "gcn":
            width = args["out_dim"] or in_dim
            if args["n_layers"] < 1:
                raise ValueError(f"gcn n_layers must be >= 1, got {args['n_layers']}")
            return nn.ModuleList(
                GCNConv(in_dim if i == 0 else width, width, add_self_loops=True, learn_weights=True,
                        layer_norm=args["layer_norm"], dropout=args["dropout"], activation=nn.ReLU())
                for i in range(args["n_layers"])
            ), width
        return nn.ModuleList(), in_dim

    @staticmethod
    def _build_pool(pool: str, args: dict[str, Any], width: int) -> tuple[nn.Module, nn.Linear | None]:
        if pool == "mean":
            return MeanPool(), None
        if pool == "max":
            return MaxPool(), None
        attention = AttentionPool(width, args["att_dim"], args["act"], args["gated"])
        if pool == "mincut":
            if args["n_clusters"] < 1:
                raise ValueError(f"n_clusters must be >= 1, got {args['n_clusters']}")
            return attention, nn.Linear(width, args["n_clusters"])
        return attention, None

    def _encode(self, X, mask, edge_index, edge_weight) -> torch.Tensor:
        """(batch, bag, width) instance features after the layer; 0 on padding."""
        keep = None if mask is None else mask.unsqueeze(-1)  # (batch, bag, 1)
        H = X if keep is None else torch.where(keep, X, 0.0)  # padding may hold anything (1e30): clear it
        if self.layer_kind == "transformer":
            return self.layers[0](H, mask)  # (batch, bag, D), 0 on padding
        if self.layer_kind == "gcn" and edge_index is not None:
            table = neighbour_table(edge_index, edge_weight, H.shape[0] * H.shape[1], H.dtype)  # once per graph
        else:
            table = None
        for layer in self.layers:
            H = layer(H, table)  # (batch, bag, width)
            H = H if keep is None else torch.where(keep, H, 0.0)  # (batch, bag, width)
        return H

    def _run(self, X, mask, edge_index, edge_weight) -> tuple[MILOutput, torch.Tensor | None]:
        """(output, min-cut assignments S (batch, bag, K) or None) for a graph already resolved."""
        H = self._encode(X, mask, edge_index, edge_weight)  # (batch, bag, width)
        S = None
        if self.pool_kind == "mincut":
            S = cluster_assignments(self.cluster_proj(H), mask, self.temp)  # (batch, bag, K), 0 on padding
            clusters = pool_features(H, S)  # (batch, K, width); H is 0 on padding
            pooled, cluster_weights = self.pool(clusters)  # (batch, width), (batch, K)
            scores = torch.matmul(S, cluster_weights.unsqueeze(-1)).squeeze(-1)  # (batch, bag)
            attention = scores / scores.sum(dim=-1, keepdim=True)  # (batch, bag), 0 on padding
        else:
            pooled, attention = self.pool(H, mask)  # (batch, width), (batch, bag)
        return MILOutput(logits=self.classifier(pooled), attention=attention), S

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        if self.uses_graph:
            edge_index, edge_weight = self.resolve_graph(edge_index, edge_weight, coords, mask)
        return self._run(X, mask, edge_index, edge_weight)[0]

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, {"cls"[, "mincut", "ortho"]}): min-cut pooling adds its two losses, batch means."""
        X, mask = batch["X"], batch.get("mask", None)
        edge_index, edge_weight = batch.get("edge_index", None), batch.get("edge_weight", None)
        if self.uses_graph:
            edge_index, edge_weight = self.resolve_graph(edge_index, edge_weight, batch.get("coords", None), mask)
        out, S = self._run(X, mask, edge_index, edge_weight)
        losses = {"cls": self.classification_loss(out.logits, batch["Y"])}
        if S is not None:
            mincut, ortho = mincut_losses(S, *propagate(S, edge_index, edge_weight))  # (batch,), (batch,)
            losses.update(mincut=mincut.mean(), ortho=ortho.mean())
        return out.logits, losses
