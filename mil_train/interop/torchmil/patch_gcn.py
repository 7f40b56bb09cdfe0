"""PatchGCN <-> torchmil.models.PatchGCN.

torchmil's PatchGCN is deterministic in eval mode; `reference_outputs` calls its forward with the
graph milkit's model sees, as torchmil's sparse COO adjacency (`torchmil_adjacency`): the given
edge_index / edge_weight, else the model's graph rule (grid8, D^-1/2 A D^-1/2, a self loop only
on a one-instance bag: torchmil's own dataset graph) over coords, else an empty adjacency. mask goes by keyword.

Where torchmil 1.0.2 differs from milkit's model:
- it needs an adjacency for every call (a sparse (batch, bag, bag) tensor, which does not export);
  milkit takes an edge list and builds it from coords when the edges are missing;
- it concatenates [X, H_1, ..., H_L] into one (batch, bag, D + L * hidden) tensor before its first MLP
  layer; milkit applies that layer's column blocks one by one (the same weights, float32 sums in a
  different order);
- mlp_depth=0 crashes in torchmil (its pool reads hidden_dim features, the concatenation is wider);
  milkit refuses it in the constructor;
- DeepGCNLayer treats an unknown `block` as "plain"; milkit refuses it (PatchGCN always uses "plain");
- neighbour sums: torchmil multiplies its sparse adjacency; milkit gathers each node's neighbours into
  slots and sums them in float32 in edge-list order (differences ~1e-8 on the logits);
- padded rows (torchmil bug): torchmil's self loop carries whatever a padded row holds into its
  LayerNorm, whose variance overflows for 1e30 rows, and its pool's 0 weight times that NaN makes the
  logits NaN (tested in tests/models/test_gcn_conv.py); torchmil also propagates padding along any
  edge that touches it. milkit clears padded rows before every convolution;
- it returns the attention scores before the softmax; milkit's adapter normalises them by the masked
  softmax.
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

RENAMES = {
    "gcn_layers.": "gcn_layers.",
    "mlp.": "mlp.",
    "pool.fc1.": "pool.V.0.",
    "pool.fc2.": "pool.w.",
    "classifier.": "classifier.",
}


@register_adapter
class PatchGCNAdapter(TorchmilAdapter):
    name = "PatchGCN"

    def build_reference(self, config):
        from torchmil.models import PatchGCN

        return PatchGCN(
            in_shape=(config["in_dim"],),
            n_gcn_layers=config.get("n_gcn_layers", 4),
            mlp_depth=config.get("mlp_depth", 1),
            hidden_dim=config.get("hidden_dim", None),
            att_dim=config.get("att_dim", 128),
            dropout=config.get("dropout", 0.0),
        )

    def convert_state_dict(self, state, config):
        return rename_prefixes(strip_lazy(state), RENAMES, "PatchGCN")

    def reference_outputs(self, reference, X, mask, *, edge_index=None, edge_weight=None, coords=None):
        batch, bag = X.shape[:2]
        if edge_index is None and coords is not None:
            from mil_train.data.graphs import TORCHMIL_GRAPH_RULE as GRAPH_RULE
            from mil_train.data.graphs import batch_graph

            edge_index, edge_weight = batch_graph(coords, mask, GRAPH_RULE["rule"], **GRAPH_RULE["params"])
        if edge_index is None:
            edge_index = torch.zeros((2, 0), dtype=torch.long)
            edge_weight = torch.zeros((0,))
        adj = torchmil_adjacency(edge_index, edge_weight, batch, bag)  # sparse (batch, bag, bag)
        logits, scores = reference(X, adj, mask=mask, return_att=True)  # (batch,), (batch, bag) before softmax
        return logits.unsqueeze(-1), masked_normalise(scores, mask)
