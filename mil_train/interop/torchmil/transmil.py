"""TransMIL <-> torchmil.models.TransMIL.

Where torchmil 1.0.2 differs from milkit, and how `reference_outputs` reaches a comparable path:
- torchmil's TransMIL takes no mask: a padded batch would square, attend and classify the padding as
  instances. `reference_outputs` therefore runs torchmil on each bag alone (its real rows only, batch
  of one) and pads the attention with 0; unpadded input of one bag goes through unchanged.
- The Newton-Schulz pseudo-inverse starts from A2^T / (max row-sum * max column-sum) with the maxima
  over the whole (batch, heads, m, m) tensor, so a bag's output depends on its batch-mates; milkit
  takes them per bag. With one bag per call (above) the two are the same.
- torchmil's `return_att` is the class token's row of the LAST layer's A1 pinv(A2) A3, mean over
  heads, at instances 1..N (the first copy of each; the side^2 - N repeated instances are left out).
  milkit's `attention` is the same row of the FIRST layer (before PPEG; the last one does not
  localise, see `mil_train.models.transmil.ATTENTION_LAYER`). torchmil's forward has no way to return
  it, so `first_layer_row` runs torchmil's own fc1 and layers[0] on the sequence torchmil's forward
  builds (the same three lines: squaring by repeating the first side^2 - N rows, class token in
  front) and takes row 0 of that layer's `return_att`; the logits come from torchmil's forward.
  The row is not a softmax and can be negative: milkit's `normalise_attention` (clamp at 0, divide by
  the sum over the bag) is applied to it, so both sides are compared after the same map. The last
  layer's row is checked against `return_att` in tests/models/test_ppeg.py. torchmil has no
  randomness in eval mode (no dropout in its Nystrom attention; MLP dropout is off in eval).
- n_classes: torchmil's head is one logit; parity is for n_classes=1.

State dict: fc1.*, cls_token, norm.*, classifier.* keep their names; pos_layer.* -> ppeg.*; each
layers.{i}.* through `mil_train.nn.nystrom_attention.convert_torchmil_layer_state_dict`.
"""

from __future__ import annotations

import math

import torch

from mil_train.interop.torchmil import TorchmilAdapter, register_adapter
from mil_train.models.transmil import normalise_attention
from mil_train.nn.nystrom_attention import convert_torchmil_layer_state_dict

PLAIN_RENAMES = {"fc1.": "fc1.", "pos_layer.": "ppeg.", "cls_token": "cls_token", "norm.": "norm.", "classifier.": "classifier."}


@register_adapter
class TransMILAdapter(TorchmilAdapter):
    name = "TransMIL"

    def build_reference(self, config):
        from torchmil.models import TransMIL

        return TransMIL(
            in_shape=(config["in_dim"],),
            att_dim=config.get("att_dim", 512),
            n_layers=config.get("n_layers", 2),
            n_heads=config.get("n_heads", 4),
            n_landmarks=config.get("n_landmarks", None),
            pinv_iterations=config.get("pinv_iterations", 6),
            dropout=config.get("dropout", 0.0),
            use_mlp=config.get("use_mlp", False),
        )

    def convert_state_dict(self, state, config):
        out: dict[str, torch.Tensor] = {}
        n_layers = config.get("n_layers", 2)
        for i in range(n_layers):
            out.update(convert_torchmil_layer_state_dict(state, f"layers.{i}.", f"layers.{i}."))
        for key, value in state.items():
            if key.startswith("layers."):
                if int(key.split(".")[1]) >= n_layers:
                    raise KeyError(f"unexpected torchmil TransMIL key {key}")
                continue
            old = next((prefix for prefix in PLAIN_RENAMES if key.startswith(prefix)), None)
            if old is None:
                raise KeyError(f"unexpected torchmil TransMIL key {key}")
            out[PLAIN_RENAMES[old] + key[len(old):]] = value
        return out

    def reference_outputs(self, reference, X, mask, *, edge_index=None, edge_weight=None, coords=None):
        batch, bag = X.shape[0], X.shape[1]
        if mask is None:
            mask = torch.ones(batch, bag, dtype=torch.bool)
        logits = torch.zeros(batch, 1)
        attention = torch.zeros(batch, bag)
        for b in range(batch):  # one bag per call: torchmil takes no mask
            n = int(mask[b].sum())
            bag_alone = X[b : b + 1, mask[b]]  # (1, n, D)
            logits[b, 0] = reference(bag_alone)[0]
            attention[b, :n] = normalise_attention(first_layer_row(reference, bag_alone), None)[0]
        return logits, attention


def first_layer_row(reference, X: torch.Tensor) -> torch.Tensor:
    """(1, n) torchmil's class-token attention row in its first layer, at instances 1..n (mean over
    heads): the opening of torchmil's TransMIL.forward, then layers[0] with return_att."""
    n = X.shape[1]
    H = reference.fc1(reference.feat_ext(X))  # (1, n, att_dim)
    side = math.ceil(math.sqrt(n))
    H = torch.cat([H, H[:, : side * side - n]], dim=1)  # (1, side^2, att_dim)
    H = torch.cat([reference.cls_token.expand(1, -1, -1), H], dim=1)  # (1, 1 + side^2, att_dim)
    _, att = reference.layers[0](H, return_att=True)  # (1, heads, 1 + side^2, 1 + side^2)
    return att.mean(dim=1)[:, 0, 1 : n + 1]  # (1, n)
