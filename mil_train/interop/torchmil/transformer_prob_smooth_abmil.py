"""TransformerProbSmoothABMIL <-> torchmil.models.TransformerProbSmoothABMIL.

Like ProbSmoothABMIL's adapter, `reference_outputs` runs torchmil's own forward with its pool switched
to covar_mode="zero" for the call, so the pool uses the mean logits instead of 5,000 random draws
(torchmil's eval is random otherwise). The encoder's keys follow `mil_train.nn.transformer`'s table.
"""

from __future__ import annotations

from mil_train.interop.torchmil import TorchmilAdapter, register_adapter, strip_lazy
from mil_train.interop.torchmil.prob_smooth_abmil import deterministic_outputs, rename_pool_keys
from mil_train.nn.transformer import convert_torchmil_state_dict

KNOWN_PREFIXES = ("transformer_encoder.", "pool.", "classifier.")


@register_adapter
class TransformerProbSmoothABMILAdapter(TorchmilAdapter):
    name = "TransformerProbSmoothABMIL"

    def build_reference(self, config):
        from torchmil.models import TransformerProbSmoothABMIL

        return TransformerProbSmoothABMIL(
            in_shape=(config["in_dim"],),
            pool_att_dim=config.get("pool_att_dim", 128),
            covar_mode=config.get("covar_mode", "diag"),
            n_samples_train=config.get("n_samples_train", 1000),
            n_samples_test=config.get("n_samples_test", 5000),
            transf_att_dim=config.get("transf_att_dim", 512),
            transf_n_layers=config.get("transf_n_layers", 1),
            transf_n_heads=config.get("transf_n_heads", 8),
            transf_use_mlp=config.get("transf_use_mlp", True),
            transf_add_self=config.get("transf_add_self", True),
            transf_dropout=config.get("transf_dropout", 0.0),
        )

    def convert_state_dict(self, state, config):
        state = strip_lazy(state)
        unknown = [key for key in state if not key.startswith(KNOWN_PREFIXES)]
        if unknown:
            raise KeyError(f"unexpected torchmil TransformerProbSmoothABMIL keys {unknown}")
        out = convert_torchmil_state_dict(state, "transformer_encoder.", "encoder.")
        out.update(rename_pool_keys(state))
        out.update({key: value for key, value in state.items() if key.startswith("classifier.")})
        return out

    def reference_outputs(self, reference, X, mask):
        # torchmil's forward(X, adj, mask, ...): adj is only read for the KL term
        return deterministic_outputs(reference, X, mask, None)
