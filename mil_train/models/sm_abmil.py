"""SmABMIL: ABMIL with the Sm smoothing operator in its attention (Castro-Macias, Morales-Alvarez, Wu,
Molina, Katsaggelos, "Sm: enhanced localization in Multiple Instance Learning for medical imaging
classification", NeurIPS 2024, arXiv 2410.03276); torchmil 1.0.2's `torchmil.models.SmABMIL`.

`SmGraphModel` holds what SmABMIL and SmTransformerABMIL share: the graph rule and where the graph
comes from when a batch has none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mil_train.data.graphs import TORCHMIL_GRAPH_RULE
from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn.sm_attention_pool import SmAttentionPool



class SmGraphModel(MILModel):
    """A model that smooths over the bag graph: edge_index / edge_weight inputs, rule `TORCHMIL_GRAPH_RULE`."""

    uses_graph = True
    default_graph_rule = TORCHMIL_GRAPH_RULE  # torchmil's dataset graph (mil_train.data.graphs)
    without_graph = "Sm has no neighbours and only rescales (approx: (1 - a) f per step; exact: f / (1 + c))"


@register_model
class SmABMIL(SmGraphModel):
    """Sm attention pooling over the raw instance features -> linear classifier.

    Args:
        in_dim: instance feature dimension D.
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        att_dim: width of the attention network.
        att_act: attention activation, "tanh", "relu" or "gelu".
        sm_mode: "approx" (torchmil's default; exports exactly) or "exact" (dense solve in PyTorch,
            conjugate gradients in the exported graph: `mil_train.nn.sm`).
        sm_alpha: float in [0, 1) or "trainable".
        sm_steps: steps of the approx mode.
        sm_where: "early", "mid", "late" or "none".
        spectral_norm: spectral normalisation of the linear layers after Sm.

    `attention` is the softmax weights of the pool. Linear in N (approx mode): no (bag, bag) tensor.
    """

    name = "SmABMIL"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 128,
        att_act: str = "tanh",
        sm_mode: str = "approx",
        sm_alpha: float | str = "trainable",
        sm_steps: int = 10,
        sm_where: str = "early",
        spectral_norm: bool = False,
    ) -> None:
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            att_dim=att_dim,
            att_act=att_act,
            sm_mode=sm_mode,
            sm_alpha=sm_alpha,
            sm_steps=sm_steps,
            sm_where=sm_where,
            spectral_norm=spectral_norm,
        )
        self.pool = SmAttentionPool(in_dim, att_dim, att_act, sm_mode, sm_alpha, sm_steps, sm_where, spectral_norm)
        self.classifier = nn.Linear(in_dim, n_classes)

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        edge_index, edge_weight = self.resolve_graph(edge_index, edge_weight, coords, mask)
        pooled, attention = self.pool(X, mask, edge_index, edge_weight)  # (batch, D), (batch, bag)
        return MILOutput(logits=self.classifier(pooled), attention=attention)  # (batch, n_classes)
