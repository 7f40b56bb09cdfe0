"""DTFDMIL <-> torchmil.models.DTFDMIL.

torchmil splits every bag into pseudo-bags at random, in eval too, and returns no attention, so its
`forward` has no deterministic output to compare with. `reference_outputs` therefore runs torchmil's
own sub-modules (`attention_pool`, `classifier`, `_cam_1d`, `u_attention_pool`, `u_classifier`) on
milkit's fixed strided partition (the k-th real instance joins pseudo-bag k % n_groups), one bag at
a time on its real instances, with one correction: torchmil's "maxmin" and "max" keep every
instance of a pseudo-bag (its top-k takes k = the pseudo-bag's size), where the paper keeps the
single highest (and lowest) CAM instance; the reference keeps one, like milkit.

`strided_split()` patches torchmil's split itself, so that its literal `forward` runs on the same
partition; the tests use it to show that "afs" matches torchmil's forward as is, and to measure
what the top-k bug changes in "maxmin" and "max".
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import torch

from mil_train.interop.torchmil import TorchmilAdapter, rename_prefixes, register_adapter, strip_lazy

RENAMES = {
    "attention_pool.fc1.": "tier1.pool.V.0.",
    "attention_pool.fc2.": "tier1.pool.w.",
    "classifier.": "tier1.classifier.",
    "u_attention_pool.fc1.": "tier2_pool.V.0.",
    "u_attention_pool.fc2.": "tier2_pool.w.",
    "u_classifier.": "tier2_classifier.",
}


def strided_chunks(n: int, n_groups: int) -> list[torch.Tensor]:
    """milkit's eval partition of a bag of n real instances: the non-empty groups [g, g + G, g + 2G, ...]."""
    return [torch.arange(g, n, n_groups) for g in range(min(n_groups, n))]


@contextlib.contextmanager
def strided_split():
    """Within the block, torchmil's DTFDMIL.forward splits bags by milkit's strided partition, not at random.

    torchmil shuffles `np.arange(bag_size)` and `np.array_split`s it into min(bag, n_groups) chunks;
    the patched numpy keeps the order and deals the indices out round-robin instead.
    """
    import torchmil.models.dtfdmil as module

    patched = types.SimpleNamespace(
        arange=np.arange,
        concatenate=np.concatenate,
        random=types.SimpleNamespace(shuffle=lambda indices: None),
        array_split=lambda indices, n: [indices[g::n] for g in range(n)],
    )
    original = module.np
    module.np = patched
    try:
        yield
    finally:
        module.np = original


def _distilled_rows(reference, chunk: torch.Tensor, pooled: torch.Tensor) -> list[torch.Tensor]:
    """The tier-2 rows of one pseudo-bag (1, m, dim), with the paper's single max / min instance."""
    if reference.distill_mode == "afs":
        return [pooled[0]]
    cam = reference._cam_1d(reference.classifier, chunk)[0, 0]  # (m,)
    rows = [chunk[0, cam.argmax()]]
    if reference.distill_mode == "maxmin":
        rows.append(chunk[0, cam.argmin()])
    return rows


def reference_bag(reference, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchmil's sub-modules on one bag (n, dim) under the strided partition: (logit (1,), attention (n,))."""
    chunks = strided_chunks(bag.shape[0], reference.n_groups)
    rows, tier1_weights = [], []
    for index in chunks:
        chunk = bag[index].unsqueeze(0)  # (1, m, dim)
        pooled, scores = reference.attention_pool(chunk, return_att=True)  # (1, dim), (1, m)
        tier1_weights.append(torch.softmax(scores[0], dim=0))  # (m,)
        rows += _distilled_rows(reference, chunk, pooled)
    distilled = torch.stack(rows).unsqueeze(0)  # (1, G * k, dim)
    pooled, scores = reference.u_attention_pool(distilled, return_att=True)  # (1, dim), (1, G * k)
    logit = reference.u_classifier(pooled)[0]  # (1,)
    group_weights = torch.softmax(scores[0], dim=0).reshape(len(chunks), -1).sum(dim=1)  # (G,)
    attention = torch.zeros(bag.shape[0], dtype=bag.dtype)  # (n,)
    for index, weights, group_weight in zip(chunks, tier1_weights, group_weights):
        attention[index] = weights * group_weight
    return logit, attention


@register_adapter
class DTFDMILAdapter(TorchmilAdapter):
    name = "DTFDMIL"

    def build_reference(self, config):
        from torchmil.models import DTFDMIL

        if config.get("n_classes", 1) != 1:
            raise ValueError("torchmil's DTFDMIL is binary only; use n_classes=1")
        return DTFDMIL(
            in_shape=(config["in_dim"],),
            att_dim=config.get("att_dim", 128),
            n_groups=config.get("n_groups", 8),
            distill_mode=config.get("distill_mode", "maxmin"),
        )

    def convert_state_dict(self, state, config):
        return rename_prefixes(strip_lazy(state), RENAMES, "DTFDMIL")

    def reference_outputs(self, reference, X, mask):
        if mask is None:
            mask = torch.ones(X.shape[:2], dtype=torch.bool)  # (batch, bag)
        logits = torch.zeros(X.shape[0], 1, dtype=X.dtype)  # (batch, 1)
        attention = torch.zeros(X.shape[:2], dtype=X.dtype)  # (batch, bag), 0 on padding
        for b in range(X.shape[0]):
            logits[b], attention[b, mask[b]] = reference_bag(reference, X[b, mask[b]])
        return logits, attention
