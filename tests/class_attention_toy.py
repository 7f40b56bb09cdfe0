"""A test-only multi-branch MIL model, so per-class attention is tested without CLAM_MB.

`ToyClassAttention` has one attention branch per class (like CLAM_MB): class c pools the embedded
instances with its own softmax weights, and its logit reads only that pooled vector. It fills
`MILOutput.attention_by_class` (batch, n_classes, bag), and `attention` is the predicted class's map.

It is not in the model registry. `registered_toy()` registers it under a test-only name for code
that rebuilds a model by name (mil-export validate without a model) and removes it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mil_train.models import MILModel, MILOutput, masked_softmax
from mil_train.models import registry

TOY_NAME = "_TestToyClassAttention"


class ToyClassAttention(MILModel):
    name = TOY_NAME
    class_attention = True

    def __init__(self, in_dim: int, n_classes: int = 3, hidden: int = 8) -> None:
        super().__init__(n_classes=n_classes, in_dim=in_dim, hidden=hidden)
        self.embed = nn.Linear(in_dim, hidden)
        self.branch_scores = nn.Linear(hidden, n_classes)  # one attention score per class and instance
        self.class_weights = nn.Parameter(torch.randn(n_classes, hidden))  # class c reads pooled row c
        self.class_bias = nn.Parameter(torch.zeros(n_classes))

    def forward(self, X, mask=None, *, edge_index=None, edge_weight=None, coords=None) -> MILOutput:
        if mask is None:
            mask = torch.ones(X.shape[:2], dtype=torch.bool, device=X.device)  # (batch, bag)
        X = X.masked_fill(~mask[..., None], 0.0)  # (batch, bag, in_dim): padding content never matters
        hidden = torch.tanh(self.embed(X))  # (batch, bag, hidden)
        scores = self.branch_scores(hidden).transpose(1, 2)  # (batch, n_classes, bag)
        by_class = masked_softmax(scores, mask[:, None, :])  # (batch, n_classes, bag)
        pooled = by_class @ hidden  # (batch, n_classes, hidden)
        logits = (pooled * self.class_weights).sum(-1) + self.class_bias  # (batch, n_classes)
        predicted = nn.functional.one_hot(logits.argmax(-1), self.n_classes).to(by_class.dtype)  # (batch, n_classes)
        attention = (predicted[:, :, None] * by_class).sum(1)  # (batch, bag): the predicted class's map
        return MILOutput(logits=logits, attention=attention, attention_by_class=by_class)


def toy_model(in_dim: int, n_classes: int = 3, seed: int = 0, hidden: int = 8) -> ToyClassAttention:
    torch.manual_seed(seed)
    return ToyClassAttention(in_dim=in_dim, n_classes=n_classes, hidden=hidden).eval()


@contextmanager
def registered_toy() -> Iterator[None]:
    """The toy model in the registry under TOY_NAME for the duration of the block only."""
    registry.register_model(ToyClassAttention)
    try:
        yield
    finally:
        registry._REGISTRY.pop(TOY_NAME, None)
