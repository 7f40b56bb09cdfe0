"""CLAM: clustering-constrained attention MIL (Lu et al., Nature Biomedical Engineering 2021, arXiv 2004.09666).

CLAM_SB pools the bag with one attention branch (ABMIL's forward); CLAM_MB has one attention branch and
one bag classifier per class. Both add CLAM's instance-clustering loss ("instance") in compute_loss;
forward never computes it. Both return `instance_probabilities` from forward: per class c, the softmax
probability of "inside" of class c's instance classifier (the one the clustering loss trains), i.e. the
probability that the instance is class-c evidence; binary models give the positive class's classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn import AttentionPool, ClassAttentionPool, InstanceClustering, instance_mlp
from mil_train.nn.instance_classifier import INSIDE


class _CLAM(MILModel):
    """What CLAM_SB and CLAM_MB share: instance embedding, instance clustering, the weighted loss.

    Subclasses build `self.pool` and the bag classifier(s) and implement `_pool_and_classify`.
    """

    instance_outputs = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        att_dim: int,
        att_act: str,
        k_sample: int,
        gated: bool,
        inst_loss_name: str,
        embed_dims: Sequence[int],
        dropout: float,
        subtyping: bool,
        bag_weight: float | None,
    ) -> None:
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            att_dim=att_dim,
            att_act=att_act,
            k_sample=k_sample,
            gated=gated,
            inst_loss_name=inst_loss_name,
            embed_dims=list(embed_dims),
            dropout=dropout,
            subtyping=subtyping,
            bag_weight=bag_weight,
        )
        if not self.is_classifier:  # regression / survival leave the instance clustering out of the loss
            self.ddp_find_unused_parameters = True
        if bag_weight is not None and not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"bag_weight must be in [0, 1] or None, got {bag_weight}")
        self.bag_weight = bag_weight
        self.embed, self.embed_dim = instance_mlp(in_dim, embed_dims, dropout)
        self.instance = InstanceClustering(self.embed_dim, n_classes, k_sample, inst_loss_name, subtyping)

    def _pool_and_classify(self, H: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        raise NotImplementedError

    def _embed(self, X: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            # Zero padded rows first: huge or NaN padding would otherwise overflow inside the MLP.
            X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, in_dim)
        return self.embed(X)  # (batch, bag, dim)

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        H = self._embed(X, mask)  # (batch, bag, dim)
        out = self._pool_and_classify(H, mask)
        out.instance_probabilities = self.instance_probabilities(H, mask)
        return out

    def instance_probabilities(self, H: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, bag, n_classes): softmax(classifier c's (outside, inside) logits)[inside], 0 on padding.

        n_classes >= 2: classifier c for class c. Binary: the clustering has two classifiers, for label 0
        and label 1; the one column is label 1's (the positive class).
        """
        classifiers = list(self.instance.classifiers)
        if self.n_classes == 1:
            classifiers = classifiers[1:]  # label 1: the positive class
        weight = torch.stack([c.weight for c in classifiers])  # (n_classes, 2, dim)
        bias = torch.stack([c.bias for c in classifiers])  # (n_classes, 2)
        logits = torch.einsum("bnd,cod->bnco", H, weight) + bias  # (batch, bag, n_classes, 2)
        probabilities = torch.softmax(logits, dim=-1)[..., INSIDE]  # (batch, bag, n_classes)
        if mask is not None:
            probabilities = probabilities.masked_fill(~mask.unsqueeze(-1), 0.0)
        return probabilities

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """{"cls", "instance"}, each already scaled by CLAM's bag_weight (see the model cards)."""
        mask = batch.get("mask", None)
        H = self._embed(batch["X"], mask)  # (batch, bag, dim)
        out = self._pool_and_classify(H, mask)
        branch_weights = out.attention_by_class if out.attention_by_class is not None else out.attention.unsqueeze(1)
        cls = self.classification_loss(out.logits, batch["Y"])
        if not self.is_classifier:  # instance clustering needs class labels: regression/survival train "cls" alone
            return out.logits, {"cls": cls}
        instance = self.instance(H, branch_weights, batch["Y"], mask).mean()
        if self.bag_weight is None:  # torchmil's weighting: both terms weigh 1
            return out.logits, {"cls": cls, "instance": instance}
        return out.logits, {"cls": self.bag_weight * cls, "instance": (1.0 - self.bag_weight) * instance}


@register_model
class CLAM_SB(_CLAM):
    """CLAM single branch: instance MLP (optional) -> attention pooling -> linear classifier.

    Args:
        in_dim: instance feature dimension D.
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        att_dim: hidden width of the attention network (torchmil default 128).
        att_act: activation of the attention network: "tanh" (default), "relu" or "gelu".
        k_sample: instances per bag that the instance loss labels at each end of the attention ranking.
        gated: gated attention instead of plain.
        inst_loss_name: "SmoothTop1SVM" (default), "CrossEntropyLoss" (CLAM's default) or "BCEWithLogitsLoss".
        embed_dims: widths of the instance-embedding MLP; () pools the raw features (torchmil);
            CLAM's code uses (512,).
        dropout: dropout after each embedding layer (training only).
        subtyping: out-of-class instance terms (CLAM's subtyping mode; torchmil's binary form has them).
        bag_weight: the loss is bag_weight * cls + (1 - bag_weight) * instance (CLAM: 0.7);
            None weighs both 1 (torchmil).
    """

    name = "CLAM_SB"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 128,
        att_act: str = "tanh",
        k_sample: int = 10,
        gated: bool = False,
        inst_loss_name: str = "SmoothTop1SVM",
        embed_dims: Sequence[int] = (),
        dropout: float = 0.0,
        subtyping: bool = True,
        bag_weight: float | None = 0.7,
    ) -> None:
        super().__init__(
            in_dim, n_classes, att_dim, att_act, k_sample, gated, inst_loss_name,
            embed_dims, dropout, subtyping, bag_weight,
        )
        self.pool = AttentionPool(self.embed_dim, att_dim, att_act, gated)
        self.classifier = nn.Linear(self.embed_dim, n_classes)

    def _pool_and_classify(self, H: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        pooled, attention = self.pool(H, mask)  # (batch, dim), (batch, bag)
        logits = self.classifier(pooled)  # (batch, n_classes)
        return MILOutput(logits=logits, attention=attention)


@register_model
class CLAM_MB(_CLAM):
    """CLAM multi branch: a shared attention network with one branch per class, one bag classifier per class.

    Class c's logit is its own linear map of the bag pooled by branch c's attention. `attention_by_class`
    holds every branch's weights; `attention` is the row of the predicted class (argmax of the logits).
    With n_classes=1 there is one branch (its map is `attention`, `attention_by_class` is None), and the
    model equals CLAM_SB. Arguments as CLAM_SB.
    """

    name = "CLAM_MB"
    class_attention = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 128,
        att_act: str = "tanh",
        k_sample: int = 10,
        gated: bool = False,
        inst_loss_name: str = "SmoothTop1SVM",
        embed_dims: Sequence[int] = (),
        dropout: float = 0.0,
        subtyping: bool = True,
        bag_weight: float | None = 0.7,
    ) -> None:
        super().__init__(
            in_dim, n_classes, att_dim, att_act, k_sample, gated, inst_loss_name,
            embed_dims, dropout, subtyping, bag_weight,
        )
        self.pool = ClassAttentionPool(self.embed_dim, att_dim, att_act, gated, n_branches=n_classes)
        self.classifiers = nn.ModuleList(nn.Linear(self.embed_dim, 1) for _ in range(n_classes))

    def _pool_and_classify(self, H: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        pooled, attention_by_class = self.pool(H, mask)  # (batch, classes, dim), (batch, classes, bag)
        logits = torch.cat(
            [classifier(pooled[:, c]) for c, classifier in enumerate(self.classifiers)], dim=-1
        )  # (batch, classes)
        predicted = logits.argmax(dim=-1)  # (batch,)
        index = predicted[:, None, None].expand(-1, 1, attention_by_class.shape[-1])  # (batch, 1, bag)
        attention = attention_by_class.gather(1, index).squeeze(1)  # (batch, bag)
        if self.n_classes == 1:  # one branch: its map is `attention`, and the contract has no per-class output
            return MILOutput(logits=logits, attention=attention)
        return MILOutput(logits=logits, attention=attention, attention_by_class=attention_by_class)
