"""DSMIL: dual-stream MIL (Li, Li, Eliceiri, CVPR 2021, arXiv 2011.08939)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn.max_instance import MaxInstanceAttention

MAX_INSTANCE_LOSS = "max_instance"


@register_model
class DSMIL(MILModel):
    """Max-instance stream + critical-instance attention stream; the bag logit is their mean.

    logits = 0.5 * (bag-stream logit + critical instance's logit), the prediction torchmil's
    `DSMIL.predict` and the paper's code make. With n_classes >= 2 each class has its own critical
    instance and bag embedding, and the bag classifier reads all class embeddings (the paper's
    Conv1d over classes, as one linear map); `attention` is then the mean of the per-class weights.
    `instance_probabilities` (batch, bag, n_classes) = sigmoid of the max-instance stream's instance
    classifier, per class: monotone in its score, so the most probable instance of class k is class k's
    critical instance, and its probability is the sigmoid of the max-instance logit.

    Args:
        in_dim: instance feature dimension D.
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        att_dim: width of the queries (torchmil default 128).
        nonlinear_q: queries through Linear -> ReLU -> Linear -> Tanh instead of one linear map.
        nonlinear_v: values through Dropout -> Linear -> ReLU instead of the features themselves.
        dropout: dropout before the value map (only with nonlinear_v; training only).
    """

    name = "DSMIL"
    instance_outputs = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 128,
        nonlinear_q: bool = False,
        nonlinear_v: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            att_dim=att_dim,
            nonlinear_q=nonlinear_q,
            nonlinear_v=nonlinear_v,
            dropout=dropout,
        )
        self.streams = MaxInstanceAttention(in_dim, n_classes, att_dim, nonlinear_q, nonlinear_v, dropout)
        self.bag_classifier = nn.Linear(n_classes * in_dim, n_classes)

    def stream_logits(
        self, X: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bag-stream logits, max-instance logits, attention): (batch, C), (batch, C), (batch, bag)."""
        max_logits, weights, embeddings = self.streams(X, mask)  # (B, C), (B, bag, C), (B, C, dim)
        bag_logits = self.bag_classifier(embeddings.flatten(1))  # (batch, n_classes)
        attention = weights.mean(dim=-1)  # (batch, bag)
        return bag_logits, max_logits, attention

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        bag_logits, max_logits, attention = self.stream_logits(X, mask)
        return MILOutput(logits=0.5 * (bag_logits + max_logits), attention=attention,
                         instance_probabilities=self.instance_probabilities(X, mask))

    def instance_probabilities(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, bag, n_classes) sigmoid of the instance classifier's scores, 0 on padding."""
        if mask is not None:
            X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, dim): NaN padding stays out
        probabilities = torch.sigmoid(self.streams.instance_classifier(X))  # (batch, bag, n_classes)
        if mask is not None:
            probabilities = probabilities.masked_fill(~mask.unsqueeze(-1), 0.0)
        return probabilities

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """"cls" on the bag stream, "max_instance" on the critical instance's score, weight 1 each."""
        bag_logits, max_logits, _ = self.stream_logits(batch["X"], batch.get("mask", None))
        Y = batch["Y"]
        terms = {
            "cls": self.classification_loss(bag_logits, Y),
            MAX_INSTANCE_LOSS: self.classification_loss(max_logits, Y),
        }
        return 0.5 * (bag_logits + max_logits), terms
