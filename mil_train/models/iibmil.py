"""IIB-MIL: integrated instance-level and bag-level MIL with label disambiguation
(Ren, Zhao, He, Wu, Mai, Xu, Huang, He, Huang, Yao, MICCAI 2023), as torchmil 1.0.2's IIBMIL."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mil_train.models.base import MILModel, MILOutput, masked_softmax
from mil_train.models.registry import register_model
from mil_train.nn import TransformerEncoder
from mil_train.nn.prototype_memory import PrototypeMemory
from mil_train.nn.transformer import max_bag_for_attention

DEFAULT_HEADS = 4


@register_model
class IIBMIL(MILModel):
    """Transformer encoder -> (instance classifier | class token + transformer decoder -> bag classifier).

    Bag level: a learned class token is prepended to the encoded instances, a second transformer
    ("decoder", torchmil's name) runs over [token; instances] and the bag classifier reads the token.
    Instance level: an instance classifier on the encoded instances, trained on prototype labels:
    each instance takes the class of its nearest prototype (dot product) among its candidate classes.
    Binary: instances of a negative bag are negative; those of a positive bag are negative or positive,
    decided by the prototypes (the paper's label disambiguation). Multi-class: any class.
    In training, `compute_loss` moves each class prototype towards the mean embedding of the top 10%
    most confident instances of bags of that class (momentum `prototype_momentum`).

    Args:
        in_dim: instance feature dimension D.
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        att_dim: width of the encoder output, decoder and prototypes (divisible by n_heads).
        n_layers_encoder / n_layers_decoder: transformer layers.
        use_mlp_encoder / use_mlp_decoder: feed-forward block in those layers.
        n_heads: attention heads in both.
        prototype_momentum: weight of the old prototype in each training-step update.

    Inference: `logits` = the bag classifier on the class token (what torchmil's eval forward
    returns); `attention` = the instance classifier's score normalised by a masked softmax over the
    bag: the logit for n_classes=1 (torchmil's instance prediction), for n_classes >= 2 the
    log-probability of the bag's predicted class. `instance_probabilities` (batch, bag, n_classes) = the
    instance classifier's probabilities as it is trained: sigmoid for n_classes=1, softmax over the
    classes otherwise; 0 on padding. Loss terms: "cls" and "instance" (weight 1 each).
    Full self-attention, O(N^2) time, no (heads, N, N) tensor allocated. The decoder attends over
    N + 1 tokens: `max_bag_size` is the largest N whose (4, N+1, N+1) float32 attention would fit 4 GiB.
    """

    name = "IIBMIL"
    instance_outputs = True
    max_bag_size = max_bag_for_attention(DEFAULT_HEADS, extra_tokens=1)

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 256,
        n_layers_encoder: int = 1,
        n_layers_decoder: int = 1,
        use_mlp_encoder: bool = True,
        use_mlp_decoder: bool = False,
        n_heads: int = DEFAULT_HEADS,
        prototype_momentum: float = 0.9,
    ) -> None:
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            att_dim=att_dim,
            n_layers_encoder=n_layers_encoder,
            n_layers_decoder=n_layers_decoder,
            use_mlp_encoder=use_mlp_encoder,
            use_mlp_decoder=use_mlp_decoder,
            n_heads=n_heads,
            prototype_momentum=prototype_momentum,
        )
        if not self.is_classifier:  # regression / survival train the bag head alone: the instance classifier idles
            self.ddp_find_unused_parameters = True
        self.encoder = TransformerEncoder(
            in_dim, att_dim, att_dim, n_heads, n_layers_encoder, use_mlp_encoder, add_self=False
        )
        self.decoder = TransformerEncoder(
            att_dim, att_dim, att_dim, n_heads, n_layers_decoder, use_mlp_decoder, add_self=False
        )
        self.class_token = nn.Parameter(torch.zeros(1, 1, att_dim))
        self.instance_classifier = nn.Linear(att_dim, n_classes)
        self.bag_classifier = nn.Linear(att_dim, n_classes)
        self.prototypes = PrototypeMemory(2 if n_classes == 1 else n_classes, att_dim, prototype_momentum)

    def encode(
        self, X: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(instance embeddings (batch, bag, att_dim), instance logits (batch, bag, n_classes), bag logits)."""
        H = self.encoder(X, mask)  # (batch, bag, att_dim), 0 on padding
        instance_logits = self.instance_classifier(H)  # (batch, bag, n_classes)
        token = self.class_token.expand(X.shape[0], -1, -1)  # (batch, 1, att_dim)
        tokens = torch.cat([token, H], dim=1)  # (batch, 1 + bag, att_dim)
        token_mask = None if mask is None else torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # (batch, 1 + bag)
        decoded = self.decoder(tokens, token_mask)  # (batch, 1 + bag, att_dim)
        bag_logits = self.bag_classifier(decoded[:, 0])  # (batch, n_classes)
        return H, instance_logits, bag_logits

    def instance_scores(self, instance_logits: torch.Tensor, bag_logits: torch.Tensor) -> torch.Tensor:
        """(batch, bag) per-instance contribution before normalisation (see the class docstring)."""
        if self.n_classes == 1:
            return instance_logits[..., 0]  # (batch, bag)
        predicted = bag_logits.argmax(dim=-1)  # (batch,)
        index = predicted[:, None, None].expand(-1, instance_logits.shape[1], 1)  # (batch, bag, 1)
        return torch.log_softmax(instance_logits, dim=-1).gather(-1, index)[..., 0]  # (batch, bag)

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        _, instance_logits, bag_logits = self.encode(X, mask)
        attention = masked_softmax(self.instance_scores(instance_logits, bag_logits), mask)  # (batch, bag)
        return MILOutput(logits=bag_logits, attention=attention,
                         instance_probabilities=self.instance_probabilities(instance_logits, mask))

    def instance_probabilities(self, instance_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, bag, n_classes): sigmoid (binary) or softmax over classes of the instance logits, 0 on padding."""
        if self.n_classes == 1:
            probabilities = torch.sigmoid(instance_logits)  # (batch, bag, 1)
        else:
            probabilities = torch.softmax(instance_logits, dim=-1)  # (batch, bag, n_classes)
        if mask is not None:
            probabilities = probabilities.masked_fill(~mask.unsqueeze(-1), 0.0)
        return probabilities

    # -- training --------------------------------------------------------------------------------

    def _bag_classes(self, Y: torch.Tensor) -> torch.Tensor:
        return Y.reshape(-1).long()  # (batch,)

    def _candidates(self, Y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(batch, bag, n_prototypes) bool: the classes each instance may take."""
        n_prototypes = self.prototypes.vectors.shape[0]
        candidates = torch.ones(*shape, n_prototypes, dtype=torch.bool, device=Y.device)
        if self.n_classes == 1:
            negative_bag = self._bag_classes(Y) == 0  # (batch,)
            candidates[..., 1] = ~negative_bag[:, None]  # a negative bag holds no positive instance
        return candidates

    def instance_loss(
        self, H: torch.Tensor, instance_logits: torch.Tensor, mask: torch.Tensor | None, Y: torch.Tensor
    ) -> torch.Tensor:
        """Instance classifier vs prototype labels, averaged over the real instances of the batch."""
        real = torch.ones(H.shape[:2], dtype=torch.bool, device=H.device) if mask is None else mask  # (batch, bag)
        labels = self.prototypes.assign(H, self._candidates(Y, H.shape[:2]))  # (batch, bag)
        logits, labels = instance_logits[real], labels[real]  # (n_real, n_classes), (n_real,)
        if self.n_classes == 1:
            return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
        return nn.functional.cross_entropy(logits, labels)

    @torch.no_grad()
    def _update_prototypes(
        self, H: torch.Tensor, instance_logits: torch.Tensor, mask: torch.Tensor | None, Y: torch.Tensor
    ) -> None:
        if self.n_classes == 1:
            logit = instance_logits[..., 0]  # (batch, bag)
            class_scores = torch.stack([-logit, logit], dim=-1)  # (batch, bag, 2): monotone in p(class)
        else:
            class_scores = torch.log_softmax(instance_logits, dim=-1)  # (batch, bag, n_classes)
        n_prototypes = class_scores.shape[-1]
        of_class = self._bag_classes(Y)[:, None] == torch.arange(n_prototypes, device=H.device)  # (batch, C)
        members = of_class[:, None, :].expand(-1, H.shape[1], -1)  # (batch, bag, C)
        if mask is not None:
            members = members & mask[..., None]  # (batch, bag, C)
        self.prototypes.update(H.reshape(-1, H.shape[-1]), class_scores.reshape(-1, n_prototypes),
                               members.reshape(-1, n_prototypes))

    def update_prototypes(self, X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """One prototype update from a batch, outside `compute_loss` (e.g. a pass over the training set)."""
        with torch.no_grad():
            H, instance_logits, _ = self.encode(X, mask)
        self._update_prototypes(H, instance_logits, mask, Y)

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch.get("mask", None)
        H, instance_logits, bag_logits = self.encode(batch["X"], mask)
        if not self.is_classifier:  # prototypes are per class: regression/survival train "cls" alone
            return bag_logits, {"cls": self.classification_loss(bag_logits, batch["Y"])}
        terms = {
            "cls": self.classification_loss(bag_logits, batch["Y"]),
            "instance": self.instance_loss(H, instance_logits, mask, batch["Y"]),
        }
        if self.training:
            self._update_prototypes(H, instance_logits, mask, batch["Y"])
        return bag_logits, terms
