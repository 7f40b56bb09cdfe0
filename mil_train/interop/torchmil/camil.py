"""CAMIL <-> torchmil.models.CAMIL (torchmil 1.0.2 `models/camil.py`).

Where torchmil differs, and how `reference_outputs` reaches a path comparable with milkit's:

- Its defaults crash. `CAMIL(in_shape=...)` has n_landmarks=None and hands it to
  NystromTransformerLayer -> NystromAttention, whose forward computes `seq_len % self.n_landmarks`:
  TypeError (unsupported operand 'int' % 'NoneType') on the first call, whatever the bag. milkit
  keeps the argument and its default None and reads None as 256, NystromTransformerLayer's own
  default; `build_reference` passes that 256 to torchmil explicitly, so torchmil runs at all. Parity
  runs (tests, benchmarks) therefore state n_landmarks=256 for torchmil.
- It builds the dense N x N matrix: CAMILSelfAttention turns the sparse adjacency dense and forms
  q k^T * adj * mask, all (batch, bag, bag) float32 (about 2.3 GB at 10,000 instances; out of memory at
  100,000, asking ~40 GB). milkit computes the same scores on the edges only (mil_train.nn.
  neighbour_attention). torchmil parity is therefore checked at <= 2,500 instances (DESIGN section 7).
- It is not padding invariant: the Nystrom layer gets no mask (padded rows act as zero tokens of the
  sequence and shift the landmark means), and the neighbour attention's softmax over the bag is not
  masked (padded instances score 0 and take a share). milkit treats each bag as torchmil treats it
  alone and unmasked; parity is for single unpadded bags, where the two agree.
- The Nystrom pseudo-inverse's starting scale is taken over the whole batch tensor in torchmil, per
  bag in milkit; for a batch of one bag they are the same (see mil_train.nn.nystrom_attention).
- `predict` and `forward(..., return_att=True)` return the pool's scores before the softmax;
  `reference_outputs` applies milkit's masked softmax to them. Eval mode is deterministic (dropout
  only), so no other path is needed.
- The graph: torchmil takes a sparse COO (batch, bag, bag) `adj`; `reference_outputs` builds it from
  milkit's edge list (`torchmil_adjacency`). Given coords but no edges, it builds milkit's rule
  (grid8, D^-1/2 A D^-1/2, a self loop only on a one-instance bag: torchmil's dataset graph) first; given neither, an
  empty adjacency, as milkit uses no edges then.
- Heads are binary (one logit): parity is for n_classes=1.
"""

from __future__ import annotations

import torch

from mil_train.interop.torchmil import (
    TorchmilAdapter,
    masked_normalise,
    register_adapter,
    strip_lazy,
    torchmil_adjacency,
)
from mil_train.nn.nystrom_attention import convert_torchmil_layer_state_dict

RENAMES = {
    "fc1.": "fc1.",
    "camil_self_attention.qk_nn.": "neighbour_attention.qk.",
    "camil_self_attention.v_nn.": "neighbour_attention.v.",
    "camil_att_pool.fc1.": "pool.V.0.",
    "camil_att_pool.fc_gated.": "pool.U.0.",
    "camil_att_pool.fc2.": "pool.w.",
    "classifier.": "classifier.",
}
TRANSFORMER = "nystrom_transformer_layer."


def torchmil_landmarks(config) -> int:
    """The n_landmarks torchmil must be given: milkit's None means 256 (torchmil's None crashes)."""
    from mil_train.models.camil import DEFAULT_LANDMARKS

    value = config.get("n_landmarks", None)
    return DEFAULT_LANDMARKS if value is None else int(value)


@register_adapter
class CAMILAdapter(TorchmilAdapter):
    name = "CAMIL"

    def build_reference(self, config):
        from torchmil.models import CAMIL

        return CAMIL(
            in_shape=(config["in_dim"],),
            nystrom_att_dim=config.get("nystrom_att_dim", 512),
            pool_att_dim=config.get("pool_att_dim", 128),
            gated_pool=config.get("gated_pool", False),
            n_heads=config.get("n_heads", 4),
            n_landmarks=torchmil_landmarks(config),
            pinv_iterations=config.get("pinv_iterations", 6),
            dropout=config.get("dropout", 0.0),
            use_mlp=config.get("use_mlp", False),
        )

    def convert_state_dict(self, state, config):
        state = strip_lazy(state)
        out = convert_torchmil_layer_state_dict(state, TRANSFORMER, "transformer.")
        for key, value in state.items():
            if key.startswith(TRANSFORMER):
                continue
            old = next((prefix for prefix in RENAMES if key.startswith(prefix)), None)
            if old is None:
                raise KeyError(f"unexpected torchmil CAMIL key {key}")
            out[RENAMES[old] + key[len(old):]] = value
        return out

    def reference_outputs(self, reference, X, mask, *, edge_index=None, edge_weight=None, coords=None):
        batch, bag = X.shape[0], X.shape[1]
        if edge_index is None and coords is not None:
            from mil_train.data.graphs import batch_graph
            from mil_train.data.graphs import TORCHMIL_GRAPH_RULE as GRAPH_RULE

            edge_index, edge_weight = batch_graph(coords, mask, GRAPH_RULE["rule"], **GRAPH_RULE["params"])
        if edge_index is None:
            edge_index, edge_weight = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0)
        adj = torchmil_adjacency(edge_index, edge_weight, batch, bag)  # sparse (batch, bag, bag)
        logits, scores = reference(X, adj, mask, return_att=True)  # (batch,), (batch, bag) before softmax
        return logits.unsqueeze(-1), masked_normalise(scores, mask)
