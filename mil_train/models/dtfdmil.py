"""DTFD-MIL: double-tier feature distillation MIL (Zhang et al., CVPR 2022, arXiv 2203.12081)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn.attention_pool import AttentionPool
from mil_train.nn.pseudo_bags import PseudoBagDistiller, pseudo_bag_membership

TIER1_LOSS = "tier1"


@register_model
class DTFDMIL(MILModel):
    """Pseudo-bags -> tier 1 (attention pool + classifier + distillation) -> tier 2 (attention pool + classifier).

    Eval splits a bag into the fixed strided partition of `mil_train.nn.pseudo_bags` (the k-th real
    instance joins pseudo-bag k % n_groups); training draws a random balanced partition each call.
    `attention` is each instance's tier-1 weight within its pseudo-bag times the tier-2 weight that
    pseudo-bag's distilled rows receive (sum 1 over real instances, 0 on padding).

    Args:
        in_dim: instance feature dimension D.
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        att_dim: hidden width of both tiers' attention networks (torchmil default 128).
        n_groups: number of pseudo-bags per bag (torchmil default 8).
        distill_mode: tier-2 input per pseudo-bag: "maxmin" (highest and lowest CAM instance),
            "max" (highest CAM instance) or "afs" (the pseudo-bag's pooled feature).
    """

    name = "DTFDMIL"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 128,
        n_groups: int = 8,
        distill_mode: str = "maxmin",
    ) -> None:
        super().__init__(
            n_classes=n_classes, in_dim=in_dim, att_dim=att_dim, n_groups=n_groups, distill_mode=distill_mode
        )
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        self.n_groups = n_groups
        self.tier1 = PseudoBagDistiller(in_dim, n_classes, att_dim, distill_mode)
        self.tier2_pool = AttentionPool(in_dim, att_dim)
        self.tier2_classifier = nn.Linear(in_dim, n_classes)

    def tiers(
        self, X: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bag logits (B, C), pooled pseudo-bags (B, G, dim), non-empty groups (B, G), attention (B, bag))."""
        if mask is None:
            mask = torch.ones(X.shape[:2], dtype=torch.bool, device=X.device)  # (batch, bag)
        X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, dim): padding can hold anything
        membership = pseudo_bag_membership(mask, self.n_groups, shuffle=self.training)  # (batch, G, bag)
        pseudo_bags, weights, distilled, distilled_mask = self.tier1(X, membership)
        pooled, distilled_weights = self.tier2_pool(distilled, distilled_mask)  # (batch, dim), (batch, G * k)
        logits = self.tier2_classifier(pooled)  # (batch, n_classes)
        group_weights = distilled_weights.unflatten(1, (self.n_groups, -1)).sum(dim=-1)  # (batch, G)
        attention = torch.bmm(group_weights.unsqueeze(1), weights).squeeze(1)  # (batch, bag)
        return logits, pseudo_bags, membership.any(dim=-1), attention

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        logits, _, _, attention = self.tiers(X, mask)
        return MILOutput(logits=logits, attention=attention)

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """"cls" on the tier-2 bag logits; "tier1": each non-empty pseudo-bag against its bag's label.

        tier1 is averaged over a bag's non-empty pseudo-bags, then over the batch; weight 1 (torchmil).
        """
        logits, pseudo_bags, nonempty, _ = self.tiers(batch["X"], batch.get("mask", None))
        pseudo_logits = self.tier1.classifier(pseudo_bags)  # (batch, G, n_classes)
        terms = {
            "cls": self.classification_loss(logits, batch["Y"]),
            TIER1_LOSS: self.tier1_loss(pseudo_logits, nonempty, batch["Y"]),
        }
        return logits, terms

    def tier1_loss(self, pseudo_logits: torch.Tensor, nonempty: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Mean over bags of the mean pseudo-bag loss over that bag's non-empty pseudo-bags."""
        batch, groups = nonempty.shape
        flat_logits = pseudo_logits.reshape(batch * groups, -1)  # (batch * G, n_classes)
        if not self.is_classifier:  # regression/survival: the task's loss over the non-empty pseudo-bags
            labels = Y.reshape(batch, 1, -1).expand(-1, groups, -1).reshape(batch * groups, -1)  # (batch * G, C)
            keep = nonempty.reshape(-1) > 0  # (batch * G,)
            return self.task.loss(flat_logits[keep], labels[keep])
        labels = Y.reshape(batch, 1).expand(-1, groups).reshape(-1)  # (batch * G,): each pseudo-bag gets Y
        if self.n_classes == 1:
            losses = nn.functional.binary_cross_entropy_with_logits(
                flat_logits.reshape(-1), labels.float(), reduction="none"
            )
        else:
            losses = nn.functional.cross_entropy(flat_logits, labels.long(), reduction="none")
        losses = losses.reshape(batch, groups) * nonempty  # (batch, G)
        return (losses.sum(dim=1) / nonempty.sum(dim=1)).mean()
