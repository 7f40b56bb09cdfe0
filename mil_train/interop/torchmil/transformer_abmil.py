"""TransformerABMIL <-> torchmil.models.TransformerABMIL."""

from __future__ import annotations

from mil_train.interop.torchmil import TorchmilAdapter, masked_normalise, register_adapter, strip_lazy
from mil_train.nn.transformer import convert_torchmil_state_dict

POOL_RENAMES = {"pool.fc1.": "pool.V.0.", "pool.fc_gated.": "pool.U.0.", "pool.fc2.": "pool.w.", "last_layer.": "classifier."}


@register_adapter
class TransformerABMILAdapter(TorchmilAdapter):
    name = "TransformerABMIL"

    def build_reference(self, config):
        from torchmil.models import TransformerABMIL

        return TransformerABMIL(
            in_shape=(config["in_dim"],),
            pool_att_dim=config.get("pool_att_dim", 128),
            pool_act=config.get("pool_act", "tanh"),
            pool_gated=config.get("pool_gated", False),
            transf_att_dim=config.get("transf_att_dim", 512),
            transf_n_layers=config.get("transf_n_layers", 1),
            transf_n_heads=config.get("transf_n_heads", 8),
            transf_use_mlp=config.get("transf_use_mlp", True),
            transf_add_self=config.get("transf_add_self", True),
            transf_dropout=config.get("transf_dropout", 0.0),
        )

    def convert_state_dict(self, state, config):
        state = strip_lazy(state)
        out = convert_torchmil_state_dict(state, "transformer_encoder.", "encoder.")
        for key, value in state.items():
            if key.startswith("transformer_encoder."):
                continue
            for old, new in POOL_RENAMES.items():
                if key.startswith(old):
                    out[new + key[len(old):]] = value
                    break
            else:
                raise KeyError(f"unexpected torchmil TransformerABMIL key {key}")
        return out

    def reference_outputs(self, reference, X, mask):
        logits, scores = reference(X, mask, return_att=True)  # (batch,), (batch, bag) before softmax
        return logits.unsqueeze(-1), masked_normalise(scores, mask)
