"""DSMIL <-> torchmil.models.DSMIL.

torchmil's bag logit at eval is `DSMIL.predict`: 0.5 * (bag-stream logit + max instance logit), the
same mean milkit's `logits` hold (its `forward` alone returns the bag stream). torchmil takes the
critical instance and the max instance logit over the whole padded row, padding included, so
`reference_outputs` runs torchmil on each bag's real instances alone and pads the results: that is
torchmil's output for the bag itself, which milkit must reproduce alone and padded.
"""

from __future__ import annotations

import torch

from mil_train.interop.torchmil import TorchmilAdapter, rename_prefixes, register_adapter

# torchmil key prefix -> milkit key prefix; the query and value maps keep their inner layout
RENAMES = {
    "inst_classifier.": "streams.instance_classifier.",
    "q_nn.": "streams.query.",
    "v_nn.": "streams.value.",
    "bag_classifier.": "bag_classifier.",
}


@register_adapter
class DSMILAdapter(TorchmilAdapter):
    name = "DSMIL"

    def build_reference(self, config):
        from torchmil.models import DSMIL

        if config.get("n_classes", 1) != 1:
            raise ValueError("torchmil's DSMIL is binary only; use n_classes=1")
        return DSMIL(
            in_shape=(config["in_dim"],),
            att_dim=config.get("att_dim", 128),
            nonlinear_q=config.get("nonlinear_q", False),
            nonlinear_v=config.get("nonlinear_v", False),
            dropout=config.get("dropout", 0.0),
        )

    def convert_state_dict(self, state, config):
        return rename_prefixes(state, RENAMES, "DSMIL")

    def reference_outputs(self, reference, X, mask):
        if mask is None:
            mask = torch.ones(X.shape[:2], dtype=torch.bool)  # (batch, bag)
        logits = torch.zeros(X.shape[0], 1, dtype=X.dtype)  # (batch, 1)
        attention = torch.zeros(X.shape[:2], dtype=X.dtype)  # (batch, bag), 0 on padding
        for b in range(X.shape[0]):
            bag = X[b : b + 1, mask[b]]  # (1, n, dim): the bag's real instances alone
            logits[b, 0] = reference.predict(bag)[0]
            _, weights = reference(bag, return_att=True)  # (1, n, 1), torchmil returns them softmaxed
            attention[b, mask[b]] = weights[0, :, 0]
        return logits, attention
