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

    `attention`: the class token's attention row in the last layer (row 0 of A1 pinv(A2) A3, mean over
    heads) at the first copy of each instance, as torchmil's `return_att` gives it, then clamped at 0
    and divided by its sum over the real instances (uniform should every value be <= 0): the Nystrom
    product is not a softmax and can dip below 0. Linear in N: no (tokens, tokens) tensor exists.
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
        batch, bag = X.shape[0], X.shape[1]
        if mask is None:
            mask = torch.ones(batch, bag, dtype=torch.bool, device=X.device)  # (batch, bag)
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

        tokens = self.layers[0](tokens, token_mask)  # (batch, 1 + G^2, att_dim)
        encoded = self.ppeg(tokens[:, 1:], side, canvas)  # (batch, G^2, att_dim)
        tokens = torch.cat([tokens[:, :1], encoded], dim=1)  # (batch, 1 + G^2, att_dim)
        for layer in self.layers[1:-1]:
            tokens = layer(tokens, token_mask)  # (batch, 1 + G^2, att_dim)
        tokens, cls_row = self.layers[-1](tokens, token_mask, return_first_row=True)  # ..., (batch, heads, 1 + G^2)

        logits = self.classifier(self.norm(tokens[:, 0]))  # (batch, n_classes)
        attention = self.instance_attention(cls_row, mask)  # (batch, bag)
        return MILOutput(logits=logits, attention=attention)

    @staticmethod
    def instance_attention(cls_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, heads, 1 + G^2) class-token row -> (batch, bag) `attention`.

        Mean over heads; instance i is token 1 + i (its first copy); clamped at 0 and normalised over
        the real instances (`normalise_attention`).
        """
        bag = mask.shape[1]
        raw = cls_row.mean(dim=1)  # (batch, 1 + G^2)
        raw = raw.index_select(1, torch.arange(1, bag + 1, device=raw.device))  # (batch, bag)
        return normalise_attention(raw, mask)


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
