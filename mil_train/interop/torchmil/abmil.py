"""ABMIL <-> torchmil.models.ABMIL."""

from __future__ import annotations

from mil_train.interop.torchmil import TorchmilAdapter, rename_prefixes, masked_normalise, register_adapter, strip_lazy


@register_adapter
class ABMILAdapter(TorchmilAdapter):
    name = "ABMIL"

    def build_reference(self, config):
        from torchmil.models import ABMIL

        if config.get("embed_dims"):
            raise ValueError("torchmil's ABMIL has no instance-embedding MLP; use embed_dims=()")
        return ABMIL(
            in_shape=(config["in_dim"],),
            att_dim=config.get("att_dim", 128),
            att_act=config.get("att_act", "tanh"),
            gated=config.get("gated", False),
        )

    def convert_state_dict(self, state, config):
        state = strip_lazy(state)
        renames = {
            "pool.fc1.": "pool.V.0.",
            "pool.fc_gated.": "pool.U.0.",
            "pool.fc2.": "pool.w.",
            "classifier.": "classifier.",
        }
        return rename_prefixes(state, renames, "ABMIL")

    def reference_outputs(self, reference, X, mask):
        logits, scores = reference(X, mask, return_att=True)  # (batch,), (batch, bag)
        return logits.unsqueeze(-1), masked_normalise(scores, mask)
