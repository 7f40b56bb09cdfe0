"""DTFD-MIL tier 1 (Zhang et al., CVPR 2022): split a bag into pseudo-bags, classify and distil each one.

Partition. Real instances are ranked 0..n-1 (padding gets no rank) and rank r joins pseudo-bag
r % n_groups: in eval the rank is the instance's position among the real instances (a fixed,
strided partition), in training a random permutation of them (balanced random pseudo-bags, like
the paper's random split). Group sizes differ by at most one; a bag of fewer than n_groups
instances leaves groups empty, which carry no weight anywhere and are masked out of tier 2.
Everything is tensor arithmetic over a (batch, n_groups, bag) membership mask, so one exported
graph serves every bag size (n_groups is a constructor constant).

Tier 1, per pseudo-bag g: attention pooling over its members, a linear classifier on the pooled
feature, and a class activation map (CAM: classifier weight . x_i, no bias) that ranks its members.
The distilled features handed to tier 2:
  "afs"    the pooled feature of each pseudo-bag            (n_groups rows)
  "max"    its member with the highest CAM                    (n_groups rows)
  "maxmin" its members with the highest and the lowest CAM  (2 * n_groups rows: max_g, min_g, ...)
"""

from __future__ import annotations

import torch
from torch import nn

from mil_train.nn.attention_pool import AttentionPool

DISTILL_MODES = ("maxmin", "max", "afs")


def pseudo_bag_membership(mask: torch.Tensor, n_groups: int, shuffle: bool = False) -> torch.Tensor:
    """(batch, n_groups, bag) bool: instance i is a real member of pseudo-bag g.

    mask: (batch, bag) bool, True = real. shuffle=False: the k-th real instance joins group
    k % n_groups; shuffle=True: the same on a random order of the real instances (torch's RNG).
    """
    if shuffle:
        keys = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, 2.0)  # (batch, bag), padding last
        order = torch.argsort(keys, dim=1)  # (batch, bag)
        rank = torch.argsort(order, dim=1)  # (batch, bag): position of each instance in the random order
    else:
        rank = torch.cumsum(mask.long(), dim=1) - 1  # (batch, bag): index among the real instances
    group = torch.remainder(rank, n_groups)  # (batch, bag)
    groups = torch.arange(n_groups, device=mask.device)  # (n_groups,)
    return (group.unsqueeze(1) == groups[None, :, None]) & mask.unsqueeze(1)  # (batch, n_groups, bag)


def grouped_softmax(scores: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """Softmax of per-instance scores within each group: (batch, bag), (batch, G, bag) -> (batch, G, bag).

    Exactly 0 off the group; an empty group gets all zeros (not NaN).
    """
    nonempty = membership.any(dim=-1, keepdim=True)  # (batch, G, 1)
    grouped = scores.unsqueeze(1).masked_fill(~membership, float("-inf"))  # (batch, G, bag)
    # An all -inf row would softmax to NaN: give empty groups finite scores, then clear them.
    grouped = grouped.masked_fill(~nonempty, 0.0)  # (batch, G, bag)
    return torch.softmax(grouped, dim=-1) * membership  # (batch, G, bag)


class PseudoBagDistiller(nn.Module):
    """Tier 1 of DTFD-MIL: per-pseudo-bag attention pooling, classification and feature distillation.

    forward(X, membership) -> (pooled, weights, distilled, distilled_mask):
      pooled         (batch, G, dim)        each pseudo-bag's attention-pooled feature
      weights        (batch, G, bag)        tier-1 attention within each pseudo-bag (0 off it)
      distilled      (batch, G * k, dim)    k = 2 for "maxmin", else 1; rows of group g at g*k .. g*k+k-1
      distilled_mask (batch, G * k)         False for the rows of empty groups
    `classifier(pooled)` gives the pseudo-bags' tier-1 logits (batch, G, n_classes); forward computes
    them only where the distillation needs them, so an exported binary model holds no unused weight.
    X must already hold zeros on padding. With n_classes >= 2 the CAM of the class that the tier-1
    classifier predicts for the pseudo-bag ranks its members.
    """

    def __init__(self, in_dim: int, n_classes: int = 1, att_dim: int = 128, distill_mode: str = "maxmin") -> None:
        super().__init__()
        if distill_mode not in DISTILL_MODES:
            raise ValueError(f"distill_mode must be one of {list(DISTILL_MODES)}, got {distill_mode!r}")
        self.distill_mode = distill_mode
        self.pool = AttentionPool(in_dim, att_dim)
        self.classifier = nn.Linear(in_dim, n_classes)

    def forward(
        self, X: torch.Tensor, membership: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = grouped_softmax(self.pool.raw_scores(X).squeeze(-1), membership)  # (batch, G, bag)
        pooled = torch.bmm(weights, X)  # (batch, G, dim)
        nonempty = membership.any(dim=-1)  # (batch, G)
        if self.distill_mode == "afs":
            return pooled, weights, pooled, nonempty
        cam = self._member_cam(X, pooled)  # (batch, G, bag)
        rows = [self._gather(X, cam.masked_fill(~membership, float("-inf")).argmax(dim=-1))]  # [(batch, G, dim)]
        if self.distill_mode == "maxmin":
            rows.append(self._gather(X, cam.masked_fill(~membership, float("inf")).argmin(dim=-1)))
        distilled = torch.stack(rows, dim=2).flatten(1, 2)  # (batch, G * k, dim)
        distilled_mask = nonempty.unsqueeze(-1).expand(-1, -1, len(rows)).flatten(1)  # (batch, G * k)
        return pooled, weights, distilled, distilled_mask

    def _member_cam(self, X: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """CAM of every instance for its pseudo-bag's class: (batch, G, bag)."""
        cam = torch.matmul(X, self.classifier.weight.t()).transpose(1, 2)  # (batch, n_classes, bag)
        if self.classifier.out_features == 1:  # binary: one logit, one map
            return cam.expand(-1, pooled.shape[1], -1)  # (batch, G, bag)
        predicted = self.classifier(pooled).argmax(dim=-1)  # (batch, G)
        index = predicted.unsqueeze(-1).expand(-1, -1, cam.shape[-1])  # (batch, G, bag)
        return torch.gather(cam, 1, index)  # (batch, G, bag)

    @staticmethod
    def _gather(X: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows X[b, index[b, g]]: (batch, bag, dim), (batch, G) -> (batch, G, dim)."""
        return torch.gather(X, 1, index.unsqueeze(-1).expand(-1, -1, X.shape[-1]))
