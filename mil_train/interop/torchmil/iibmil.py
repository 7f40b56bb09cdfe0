"""IIBMIL <-> torchmil.models.IIBMIL.

torchmil's eval forward returns the bag logit from the class token and, with return_inst_pred, the
instance logits; milkit's `attention` is those logits after its masked softmax. torchmil's
`feat_proj` (a Linear built when in_dim != att_dim that forward never calls) has no milkit
counterpart and is dropped, as are the unused `norm2` of MLP-less decoder layers. The
`prototypes` buffer is reordered:
torchmil's update_prototypes feeds row 0 with the highest-scoring instances, which in milkit is the
positive class's row 1 (see docs/models/IIBMIL.md, torchmil bugs).
"""

from __future__ import annotations

import torch

from mil_train.interop.torchmil import TorchmilAdapter, masked_normalise, register_adapter
from mil_train.nn.transformer import convert_torchmil_state_dict

RENAMES = {
    "cls_token": "class_token",
    "inst_classifier.weight": "instance_classifier.weight",
    "inst_classifier.bias": "instance_classifier.bias",
    "bag_classifier.weight": "bag_classifier.weight",
    "bag_classifier.bias": "bag_classifier.bias",
}
UNUSED = ("feat_proj.",)


@register_adapter
class IIBMILAdapter(TorchmilAdapter):
    name = "IIBMIL"

    def build_reference(self, config):
        from torchmil.models import IIBMIL

        return IIBMIL(
            in_shape=(config["in_dim"],),
            att_dim=config.get("att_dim", 256),
            n_layers_encoder=config.get("n_layers_encoder", 1),
            n_layers_decoder=config.get("n_layers_decoder", 1),
            use_mlp_encoder=config.get("use_mlp_encoder", True),
            use_mlp_decoder=config.get("use_mlp_decoder", False),
            n_heads=config.get("n_heads", 4),
        )

    def convert_state_dict(self, state, config):
        out = convert_torchmil_state_dict(state, "encoder.", "encoder.")
        out.update(convert_torchmil_state_dict(state, "decoder.", "decoder."))
        for key, value in state.items():
            if key.startswith(("encoder.", "decoder.", *UNUSED)):
                continue
            if key == "prototypes":
                out["prototypes.vectors"] = torch.flip(value, dims=[0])  # torchmil row 0 = positive
            elif key in RENAMES:
                out[RENAMES[key]] = value
            else:
                raise KeyError(f"unexpected torchmil IIBMIL key {key}")
        return out

    def reference_outputs(self, reference, X, mask):
        logits, instance_logits = reference(X, mask, return_inst_pred=True)  # (batch,), (batch, bag)
        return logits.unsqueeze(-1), masked_normalise(instance_logits, mask)
