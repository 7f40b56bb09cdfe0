"""Composed <-> the same composition of torchmil 1.0.2's own blocks.

torchmil has no composed model class: its models are written out by hand from `torchmil.nn` blocks.
The reference here is that hand-written model for a milkit `Composed` config: torchmil's
`TransformerEncoder` or `GCNConv` layers, its `AttentionPool`, `MeanPool`, `MaxPool` or
`dense_mincut_pool` followed by its `AttentionPool` over the clusters, and a linear classifier. So
the parity test checks each milkit block against torchmil's block and the composition against the
obvious composition. Graphs reach torchmil as its adjacency (`torchmil_adjacency`, dense for the
min-cut pool, which takes a dense one).

Attention in torchmil's terms: AttentionPool's scores through milkit's masked softmax; MeanPool and
MaxPool return no attention, so the reference computes milkit's definition from torchmil's pooled
output (1 / n; each instance's share of the features where it equals torchmil's maximum, first row on
ties); min-cut: S a / sum(S a) with S torchmil's softmax assignments and a the cluster attention.
"""

from __future__ import annotations

import torch

from mil_train.interop.torchmil import (
    TorchmilAdapter,
    masked_normalise,
    register_adapter,
    rename_prefixes,
    strip_lazy,
    torchmil_adjacency,
)
from mil_train.nn.transformer import convert_torchmil_state_dict

POOL_RENAMES = {"pool.fc1.": "pool.V.0.", "pool.fc_gated.": "pool.U.0.", "pool.fc2.": "pool.w.",
                "cluster_proj.": "cluster_proj.", "classifier.": "classifier.", "layers.": "layers."}


class ComposedReference(torch.nn.Module):
    """The torchmil-block model of one milkit Composed config (eval-mode reference for the tests)."""

    def __init__(self, config: dict) -> None:
        import torchmil.nn as tm

        super().__init__()
        in_dim, layer, pool = config["in_dim"], config.get("layer"), config.get("pool", "attention")
        layer_args, pool_args = config.get("layer_args") or {}, config.get("pool_args") or {}
        self.layer_kind, self.pool_kind, width = layer, pool, in_dim
        self.layers = torch.nn.ModuleList()
        if layer == "transformer":
            self.layers.append(tm.TransformerEncoder(in_dim, in_dim, **layer_args))
        elif layer == "gcn":
            width = layer_args.get("out_dim") or in_dim
            for i in range(layer_args.get("n_layers", 1)):
                self.layers.append(tm.GCNConv(in_dim if i == 0 else width, width, add_self_loops=True,
                                              learn_weights=True, layer_norm=layer_args.get("layer_norm", False),
                                              dropout=layer_args.get("dropout", 0.0), activation=torch.nn.ReLU()))
        attention_args = {k: pool_args[k] for k in ("att_dim", "act", "gated") if k in pool_args}
        self.pool = {"mean": tm.MeanPool, "max": tm.MaxPool}.get(pool, lambda: tm.AttentionPool(width, **attention_args))()
        self.cluster_proj = torch.nn.Linear(width, pool_args.get("n_clusters", 8)) if pool == "mincut" else None
        self.temp = float(pool_args.get("temp", 1.0))
        self.classifier = torch.nn.Linear(width, config.get("n_classes", 1))

    def forward(self, X, adj, mask):
        H = X
        for layer in self.layers:
            H = layer(H, mask) if self.layer_kind == "transformer" else layer(H, adj)  # (batch, bag, width)
        if self.pool_kind == "mincut":
            from torchmil.nn.gnns.dense_mincut_pool import dense_mincut_pool

            logits = self.cluster_proj(H)  # (batch, bag, K)
            clusters = dense_mincut_pool(H, adj.to_dense(), logits, mask, self.temp)[0]  # (batch, K, width)
            z, scores = self.pool(clusters, return_att=True)  # (batch, width), (batch, K)
            S = torch.softmax(logits / self.temp, dim=-1)  # (batch, bag, K)
            weights = torch.matmul(S, torch.softmax(scores, dim=-1).unsqueeze(-1)).squeeze(-1)  # (batch, bag)
            return self.classifier(z), weights / weights.sum(dim=-1, keepdim=True)
        if self.pool_kind == "attention":
            z, scores = self.pool(H, mask, return_att=True)  # (batch, width), (batch, bag)
            return self.classifier(z), masked_normalise(scores, mask)
        z = self.pool(H, mask)  # (batch, width)
        if self.pool_kind == "mean":
            attention = masked_normalise(torch.zeros(H.shape[:2]), mask)  # (batch, bag) 1 / n
        else:
            first = (H == z.unsqueeze(1)).int().argmax(dim=1)  # (batch, width) first row equal to the max
            rows = torch.arange(H.shape[1])[None, :, None]  # (1, bag, 1)
            attention = (first.unsqueeze(1) == rows).float().mean(dim=-1)  # (batch, bag)
        return self.classifier(z), attention


@register_adapter
class ComposedAdapter(TorchmilAdapter):
    name = "Composed"

    def build_reference(self, config):
        if config.get("feat_ext") is not None:
            raise ValueError("the torchmil reference composes the blocks after the feature extractor only")
        from mil_train.models import create_model

        # the block arguments with milkit's defaults filled in (torchmil's blocks have other defaults)
        return ComposedReference(create_model("Composed", **config).config)

    def convert_state_dict(self, state, config):
        state = strip_lazy(state)
        if config.get("layer") == "transformer":
            encoder = {k: v for k, v in state.items() if k.startswith("layers.0.")}
            rest = {k: v for k, v in state.items() if not k.startswith("layers.0.")}
            return {**convert_torchmil_state_dict(encoder, "layers.0.", "layers.0."),
                    **rename_prefixes(rest, POOL_RENAMES, "Composed")}
        return rename_prefixes(state, POOL_RENAMES, "Composed")

    def reference_outputs(self, reference, X, mask, *, edge_index=None, edge_weight=None, coords=None):
        batch, bag = X.shape[:2]
        if edge_index is None and coords is not None:
            from mil_train.data.graphs import TORCHMIL_GRAPH_RULE as GRAPH_RULE
            from mil_train.data.graphs import batch_graph

            edge_index, edge_weight = batch_graph(coords, mask, GRAPH_RULE["rule"], **GRAPH_RULE["params"])
        if edge_index is None:
            edge_index, edge_weight = torch.zeros((2, 0), dtype=torch.long), torch.zeros((0,))
        adj = torchmil_adjacency(edge_index, edge_weight, batch, bag)  # sparse (batch, bag, bag)
        return reference(X, adj, mask)
