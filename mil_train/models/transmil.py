"""TransMIL: a class token and Nystrom transformer layers over the bag laid on a square grid, with a
convolutional position encoding between the first two layers (Shao et al., "TransMIL: Transformer based
Correlated Multiple Instance Learning for Whole Slide Image Classification", NeurIPS 2021,
arXiv:2106.00908; torchmil 1.0.2's `torchmil.models.TransMIL`)."""

from __future__ import annotations

import torch
from torch import nn

from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn.nystrom_attention import NystromTransformerLayer
from mil_train.nn.ppeg import PPEG, canvas_side, grid_side

# The layer whose class-token row is `attention`: the first (before PPEG), where the class token reads
# the instances' own features. torchmil's `return_att` is the last layer's row; trained on the planted-
# positives set of the registry test (seed 0), its instance AUROC is 0.44 against 0.98 for the first
# layer's, so the last row does not show which instances drive the label. `class_token_rows` gives all.
ATTENTION_LAYER = 0


@register_model
class TransMIL(MILModel):
    """fc1 -> squared sequence + class token -> Nystrom layer -> PPEG -> Nystrom layers -> LayerNorm of
    the class token -> linear classifier.

    Args (torchmil's, plus in_dim and n_classes):
        in_dim: instance feature dimension D (fc1 maps it to att_dim when they differ).
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        att_dim: token width, divisible by n_heads.
        n_layers: Nystrom transformer layers, >= 2 (PPEG sits after the first).
        n_heads: attention heads.
        n_landmarks: Nystrom landmarks; None means att_dim // 2.
        pinv_iterations: Newton-Schulz steps of the landmark pseudo-inverse.
        dropout: dropout of the layers' MLPs (training only).
        use_mlp: feed-forward block in each layer.

    Bag b of N real instances (a prefix of its row, as `collate` pads) becomes the sequence torchmil
    builds for it alone: side = ceil(sqrt(N)), the instances then the first side^2 - N of them again,
    a class token in front. The batch shares one layout of G^2 + 1 rows (G = ceil(sqrt(bag axis))),
    the rows past a bag's own side^2 + 1 masked.

    `attention`: the class token's attention row in the first layer (row 0 of A1 pinv(A2) A3, mean
    over heads) at the first copy of each instance, clamped at 0 and divided by its sum over the real
    instances (uniform should every value be <= 0): the Nystrom product is not a softmax and can dip
    below 0. torchmil's `return_att` is the same row of the last layer (see ATTENTION_LAYER);
    `class_token_rows` returns every layer's. Linear in N: no (tokens, tokens) tensor exists.
    """

    name = "TransMIL"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 512,
        n_layers: int = 2,
        n_heads: int = 4,
        n_landmarks: int | None = None,
        pinv_iterations: int = 6,
        dropout: float = 0.0,
        use_mlp: bool = False,
    ) -> None:
        if n_layers < 2:
            raise ValueError(f"TransMIL needs n_layers >= 2 (PPEG sits between the first two), got {n_layers}")
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            att_dim=att_dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_landmarks=n_landmarks,
            pinv_iterations=pinv_iterations,
            dropout=dropout,
            use_mlp=use_mlp,
        )
        landmarks = att_dim // 2 if n_landmarks is None else n_landmarks
        self.fc1 = nn.Linear(in_dim, att_dim) if in_dim != att_dim else nn.Identity()
        self.ppeg = PPEG(att_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, att_dim))
        self.layers = nn.ModuleList(
            NystromTransformerLayer(
                in_dim=att_dim,
                att_dim=att_dim,
                out_dim=att_dim,
                n_heads=n_heads,
                n_landmarks=landmarks,
                pinv_iterations=pinv_iterations,
                dropout=dropout,
                use_mlp=use_mlp,
                learn_weights=True,
            )
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(att_dim)
        self.classifier = nn.Linear(att_dim, n_classes)

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        if mask is None:
            mask = torch.ones(X.shape[0], X.shape[1], dtype=torch.bool, device=X.device)  # (batch, bag)
        tokens, rows = self._encode(X, mask)  # (batch, 1 + G^2, att_dim), n_layers x (batch, heads, 1 + G^2)
        logits = self.classifier(self.norm(tokens[:, 0]))  # (batch, n_classes)
        raw = self.instance_row(rows[ATTENTION_LAYER], mask.shape[1])  # (batch, bag)
        return MILOutput(logits=logits, attention=normalise_attention(raw, mask))

    def _encode(self, X: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The token sequence after the last layer, and every layer's class-token attention row."""
        batch, bag = X.shape[0], X.shape[1]
        X = torch.where(mask[:, :, None], X, torch.zeros_like(X))  # (batch, bag, D)
        H = self.fc1(X)  # (batch, bag, att_dim)
        att_dim = H.shape[2]

        n = mask.sum(dim=1)  # (batch,) real instances
        side = grid_side(n)  # (batch,) each bag's grid side
        canvas = canvas_side(mask)  # G, shared
        cells = canvas * canvas
        t = torch.arange(cells, device=X.device)[None, :]  # (1, G^2) place in the squared sequence
        real = t < (side * side)[:, None]  # (batch, G^2)
        source = torch.where(t < n[:, None], t, t - n[:, None]).clamp(min=0, max=bag - 1)  # (batch, G^2)
        offsets = torch.arange(batch, device=X.device)[:, None] * bag  # (batch, 1)
        squared = H.reshape(batch * bag, att_dim).index_select(0, (source + offsets).reshape(-1))
        squared = squared.reshape(batch, cells, att_dim)  # (batch, G^2, att_dim)
        squared = torch.where(real[:, :, None], squared, torch.zeros_like(squared))

        tokens = torch.cat([self.cls_token.expand(batch, 1, att_dim), squared], dim=1)  # (batch, 1 + G^2, att_dim)
        token_mask = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)  # (batch, 1 + G^2)

        rows = []  # the class token's attention row in each layer
        tokens, row = self.layers[0](tokens, token_mask, return_first_row=True)  # (batch, 1 + G^2, att_dim), (batch, heads, 1 + G^2)
        rows.append(row)
        encoded = self.ppeg(tokens[:, 1:], side, canvas)  # (batch, G^2, att_dim)
        tokens = torch.cat([tokens[:, :1], encoded], dim=1)  # (batch, 1 + G^2, att_dim)
        for layer in self.layers[1:]:
            tokens, row = layer(tokens, token_mask, return_first_row=True)  # (batch, 1 + G^2, att_dim), ...
            rows.append(row)
        return tokens, rows

    def class_token_rows(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each layer's class-token attention row at the instances, (batch, bag) raw (mean over heads,
        first copies, not normalised, 0 on padding): rows[-1] is torchmil's `return_att`."""
        if mask is None:
            mask = torch.ones(X.shape[0], X.shape[1], dtype=torch.bool, device=X.device)
        _, rows = self._encode(X, mask)
        return [torch.where(mask, self.instance_row(row, mask.shape[1]), torch.zeros_like(mask, dtype=X.dtype)) for row in rows]

    @staticmethod
    def instance_row(cls_row: torch.Tensor, bag: int) -> torch.Tensor:
        """(batch, heads, 1 + G^2) class-token row -> (batch, bag): mean over heads, instance i at
        token 1 + i (its first copy)."""
        raw = cls_row.mean(dim=1)  # (batch, 1 + G^2)
        return raw.index_select(1, torch.arange(1, bag + 1, device=raw.device))  # (batch, bag)


def normalise_attention(raw: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """max(raw, 0) / its sum over the real instances; 1 / N on every real instance should that sum be 0.

    raw: (batch, bag) class-token attention (torchmil's `return_att`); mask: (batch, bag) or None.
    The adapter applies the same function to torchmil's output.
    """
    if mask is None:
        mask = torch.ones_like(raw, dtype=torch.bool)
    positive = torch.where(mask, raw.clamp(min=0.0), torch.zeros_like(raw))  # (batch, bag)
    total = positive.sum(dim=1, keepdim=True)  # (batch, 1)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(raw.dtype)  # (batch, 1)
    uniform = mask.to(raw.dtype) / count  # (batch, bag)
    scaled = positive / torch.where(total > 0, total, torch.ones_like(total))  # (batch, bag)
    return torch.where(total > 0, scaled, uniform)
