"""Class prototypes for label disambiguation (IIB-MIL, Ren et al., MICCAI 2023).

Each class c keeps a prototype p_c, a moving average of the embeddings of the instances the model is
most confident belong to c. An instance's prototype label is the class, among its candidate classes,
whose prototype has the largest dot product with its embedding. The prototypes are buffers updated
without gradients; they never enter inference.
"""

from __future__ import annotations

import torch
from torch import nn

TOP_FRACTION = 0.1  # the paper's and torchmil's k: a tenth of the eligible instances


class PrototypeMemory(nn.Module):
    """(n_prototypes, dim) prototype vectors with momentum updates from each class's top instances.

    Args:
        n_prototypes: number of classes with a prototype (2 for a binary task).
        dim: embedding dimension.
        momentum: weight of the old prototype in one update (p <- m p + (1 - m) mean of the top-k).
    """

    def __init__(self, n_prototypes: int, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"prototype momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("vectors", torch.zeros(n_prototypes, dim))

    def assign(self, embeddings: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Prototype labels: argmax_c <x, p_c> over the candidate classes.

        embeddings: (..., dim); candidates: (..., n_prototypes) bool, at least one True per row.
        Returns (...) int64. Ties (all prototypes still zero) go to the lowest candidate class.
        """
        similarity = embeddings.detach() @ self.vectors.t()  # (..., n_prototypes)
        if candidates is not None:
            similarity = similarity.masked_fill(~candidates, float("-inf"))  # (..., n_prototypes)
        return similarity.argmax(dim=-1)  # (...)

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor, class_scores: torch.Tensor, members: torch.Tensor) -> None:
        """Move each p_c towards the mean embedding of its top-k instances by `class_scores[:, c]`.

        embeddings: (n, dim); class_scores: (n, n_prototypes), higher = more confidently class c;
        members: (n, n_prototypes) bool, which instances may feed p_c (real instances of bags of
        class c). k = floor(TOP_FRACTION * members of c); a class with k = 0 keeps its prototype.
        """
        embeddings = embeddings.detach()
        for c in range(self.vectors.shape[0]):
            eligible = members[:, c]  # (n,)
            k = int(eligible.sum().item() * TOP_FRACTION)
            if k == 0:
                continue
            scores = class_scores[:, c].detach().masked_fill(~eligible, float("-inf"))  # (n,)
            top = scores.topk(k).indices  # (k,)
            target = embeddings[top].mean(dim=0)  # (dim,)
            self.vectors[c] = self.momentum * self.vectors[c] + (1.0 - self.momentum) * target
