"""SmABMIL <-> torchmil.models.SmABMIL.

Weights: the pool's proj1 / proj2 keep their names (spectral-norm parametrisations included); the Sm
coefficient moves from torchmil's `pool.sm.sm.coef` (Sm wraps ApproxSm / ExactSm) to `pool.sm.coef`;
`last_layer.*` becomes `classifier.*`.

reference_outputs hands torchmil milkit's graph as its sparse COO adjacency (`torchmil_adjacency`),
dense for the exact mode (torchmil's solve needs a dense matrix); without edge_index but with coords
the graph is built by the model's rule, as milkit does; without either, an empty adjacency (no
neighbours), as milkit. torchmil's eval path is deterministic; its attention (before softmax) is
normalised with milkit's masked softmax.

Where torchmil differs (see docs/models/SmABMIL.md):
- approx mode with a float sm_alpha smooths with weight 1 - alpha per step, not alpha as its own
  docstring states (coef = 1 / (1 - alpha) - 1 is then inverted by a = 1 / (1 + coef)); reproduced.
- torchmil's dataset gives a one-instance bag a self loop of weight 1; milkit's rule gives it no
  edge (parity runs on the same edge list, so it is unaffected; see the model card).
- the early Sm is computed on att_dim channels (Sm(X W^T) and X^T Sm^T(s)), equal up to rounding.
"""

from __future__ import annotations

import torch

from mil_train.interop.torchmil import TorchmilAdapter, masked_normalise, register_adapter, torchmil_adjacency

TOP_RENAMES = {"pool.sm.sm.": "pool.sm.", "pool.proj1.": "pool.proj1.", "pool.proj2.": "pool.proj2.", "last_layer.": "classifier."}


def rename(state: dict[str, torch.Tensor], renames: dict[str, str], model: str, skip: str | None = None):
    out = {}
    for key, value in state.items():
        if skip is not None and key.startswith(skip):
            continue
        old = next((prefix for prefix in renames if key.startswith(prefix)), None)
        if old is None:
            raise KeyError(f"unexpected torchmil {model} key {key}")
        out[renames[old] + key[len(old):]] = value
    return out


def reference_adjacency(model_rule: dict, X, mask, edge_index, edge_weight, coords, dense: bool):
    """torchmil's (batch, bag, bag) adjacency for milkit's graph inputs (see the module docstring)."""
    batch, bag = X.shape[0], X.shape[1]
    if edge_index is None and coords is not None:
        from mil_train.data.graphs import batch_graph

        edge_index, edge_weight = batch_graph(coords, mask, model_rule["rule"], **model_rule["params"])
    if edge_index is None:
        edge_index, edge_weight = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0)
    adj = torchmil_adjacency(edge_index, edge_weight, batch, bag)
    return adj.to_dense() if dense else adj


def sm_modes(reference) -> set[str]:
    return {module.mode for module in reference.modules() if type(module).__name__ == "Sm"}


@register_adapter
class SmABMILAdapter(TorchmilAdapter):
    name = "SmABMIL"

    def build_reference(self, config):
        from torchmil.models import SmABMIL

        return SmABMIL(
            in_shape=(config["in_dim"],),
            att_dim=config.get("att_dim", 128),
            att_act=config.get("att_act", "tanh"),
            sm_mode=config.get("sm_mode", "approx"),
            sm_alpha=config.get("sm_alpha", "trainable"),
            sm_steps=config.get("sm_steps", 10),
            sm_where=config.get("sm_where", "early"),
            spectral_norm=config.get("spectral_norm", False),
        )

    def convert_state_dict(self, state, config):
        return rename(state, TOP_RENAMES, "SmABMIL")

    def reference_outputs(self, reference, X, mask, *, edge_index=None, edge_weight=None, coords=None):
        from mil_train.data.graphs import TORCHMIL_GRAPH_RULE as SM_GRAPH_RULE

        adj = reference_adjacency(SM_GRAPH_RULE, X, mask, edge_index, edge_weight, coords, "exact" in sm_modes(reference))
        logits, scores = reference(X, adj, mask, return_att=True)  # (batch,), (batch, bag) before softmax
        return logits.unsqueeze(-1), masked_normalise(scores, mask)
