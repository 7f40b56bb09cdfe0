"""SmTransformerABMIL <-> torchmil.models.SmTransformerABMIL.

Weights: the encoder as `mil_train.nn.sm_transformer.convert_torchmil_sm_state_dict` maps it
(`transformer_encoder.*` -> `encoder.*`, each layer's Sm coefficient included), the pool and
classifier as the SmABMIL adapter. The graph reaches torchmil as in `sm_abmil.py`.

Where torchmil differs, beyond SmABMIL's (docs/models/SmTransformerABMIL.md):
- eval-mode dropout: torchmil hands transf_dropout to scaled_dot_product_attention in eval mode
  too, so with dropout > 0 its eval output is random; milkit drops out in training only. Parity is
  for dropout 0 (the default).
- padding: torchmil masks (query, key) pairs, so a padded query row is all masked and its SDPA row
  is NaN; Sm's sparse product never reads it (padded nodes have no edges) and real rows are
  unaffected. milkit masks padded keys and zeroes padded rows.
"""

from __future__ import annotations

from mil_train.interop.torchmil import TorchmilAdapter, masked_normalise, register_adapter
from mil_train.interop.torchmil.sm_abmil import TOP_RENAMES, reference_adjacency, rename, sm_modes
from mil_train.nn.sm_transformer import convert_torchmil_sm_state_dict


@register_adapter
class SmTransformerABMILAdapter(TorchmilAdapter):
    name = "SmTransformerABMIL"

    def build_reference(self, config):
        from torchmil.models import SmTransformerABMIL

        return SmTransformerABMIL(
            in_shape=(config["in_dim"],),
            pool_att_dim=config.get("pool_att_dim", 128),
            pool_act=config.get("pool_act", "tanh"),
            pool_sm_mode=config.get("pool_sm_mode", "approx"),
            pool_sm_alpha=config.get("pool_sm_alpha", "trainable"),
            pool_sm_steps=config.get("pool_sm_steps", 10),
            pool_sm_where=config.get("pool_sm_where", "early"),
            pool_spectral_norm=config.get("pool_spectral_norm", False),
            transf_att_dim=config.get("transf_att_dim", 512),
            transf_n_layers=config.get("transf_n_layers", 1),
            transf_n_heads=config.get("transf_n_heads", 4),
            transf_use_mlp=config.get("transf_use_mlp", True),
            transf_add_self=config.get("transf_add_self", True),
            transf_dropout=config.get("transf_dropout", 0.0),
            transf_sm_alpha=config.get("transf_sm_alpha", "trainable"),
            transf_sm_mode=config.get("transf_sm_mode", "approx"),
            transf_sm_steps=config.get("transf_sm_steps", 10),
        )

    def convert_state_dict(self, state, config):
        out = convert_torchmil_sm_state_dict(state, "transformer_encoder.", "encoder.")
        out.update(rename(state, TOP_RENAMES, "SmTransformerABMIL", skip="transformer_encoder."))
        return out

    def reference_outputs(self, reference, X, mask, *, edge_index=None, edge_weight=None, coords=None):
        from mil_train.data.graphs import TORCHMIL_GRAPH_RULE as SM_GRAPH_RULE

        adj = reference_adjacency(SM_GRAPH_RULE, X, mask, edge_index, edge_weight, coords, "exact" in sm_modes(reference))
        logits, scores = reference(X, adj, mask, return_att=True)  # (batch,), (batch, bag) before softmax
        return logits.unsqueeze(-1), masked_normalise(scores, mask)
