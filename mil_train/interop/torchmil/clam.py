"""CLAM_SB <-> torchmil.models.CLAM_SB. CLAM_MB has no torchmil counterpart (torchmil has no CLAM_MB).

torchmil's forward is deterministic and equals ABMIL's, so reference_outputs is its plain eval forward.
Its instance loss differs from milkit's where torchmil is wrong (padding picked, SmoothTop1SVM shapes);
tests/models/test_clam.py compares the two with those bugs patched, and docs/models/CLAM_SB.md
records the differences.
"""

from __future__ import annotations

from mil_train.interop.torchmil import TorchmilAdapter, rename_prefixes, masked_normalise, register_adapter, strip_lazy

TORCHMIL_INSTANCE_LOSSES = ("SmoothTop1SVM", "BCEWithLogitsLoss")


@register_adapter
class CLAM_SBAdapter(TorchmilAdapter):
    name = "CLAM_SB"

    def build_reference(self, config):
        from torchmil.models import CLAM_SB

        if config.get("embed_dims"):
            raise ValueError("torchmil's CLAM_SB has no instance-embedding MLP; use embed_dims=()")
        if config.get("n_classes", 1) != 1:
            raise ValueError("torchmil's CLAM_SB is binary only; use n_classes=1")
        inst_loss_name = config.get("inst_loss_name", "SmoothTop1SVM")
        if inst_loss_name not in TORCHMIL_INSTANCE_LOSSES:
            raise ValueError(
                f"torchmil's CLAM_SB offers inst_loss_name {TORCHMIL_INSTANCE_LOSSES}, not {inst_loss_name!r}"
            )
        return CLAM_SB(
            in_shape=(config["in_dim"],),
            att_dim=config.get("att_dim", 128),
            att_act=config.get("att_act", "tanh"),
            k_sample=config.get("k_sample", 10),
            gated=config.get("gated", False),
            inst_loss_name=inst_loss_name,
        )

    def convert_state_dict(self, state, config):
        state = strip_lazy(state)
        renames = {
            "pool.fc1.": "pool.V.0.",
            "pool.fc_gated.": "pool.U.0.",
            "pool.fc2.": "pool.w.",
            "classifier.": "classifier.",
            "inst_classifiers.": "instance.classifiers.",
        }
        return rename_prefixes(state, renames, "CLAM_SB")

    def reference_outputs(self, reference, X, mask):
        logits, scores = reference(X, mask, return_att=True)  # (batch,), (batch, bag)
        return logits.unsqueeze(-1), masked_normalise(scores, mask)
