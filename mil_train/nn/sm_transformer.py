"""Pre-norm transformer encoder with the Sm operator after each self-attention (torchmil 1.0.2's
`torchmil.nn.SmTransformerEncoder`, Castro-Macias et al., NeurIPS 2024, arXiv 2410.03276).

One layer (torchmil `SmTransformerLayer`), as `mil_train.nn.transformer`'s layer with Sm on the
attention output:
    Z = skip_proj(X) + Sm(SelfAttention(LayerNorm(X)))     Sm over the bag graph (`mil_train.nn.sm`)
    Z = Z + MLP(LayerNorm(Z))                              when use_mlp
    Y = out_proj(Z)
then, over the layers, the input added after each when add_self, and a final LayerNorm. Each layer
has its own Sm (its own trainable coefficient). torchmil builds Sm in every layer whatever alpha and
steps are (no identity shortcut, unlike its pool): so does milkit.

Self-attention is `mil_train.nn.self_attention.MultiheadSelfAttention`: eager SDPA with the key
mask, and one com.microsoft MultiHeadAttention node per layer in the exported graph, so no
(batch, heads, bag, bag) tensor exists on either path; the cost is O(N^2) time (full attention).
Sm acts on att_dim channels: O(E att_dim) per step.

Defaults follow torchmil's SmTransformerABMIL encoder (n_heads=4, n_layers=1, add_self=True); the
bare torchmil SmTransformerEncoder defaults to n_layers=4, add_self=False.

State-dict keys: those of `mil_train.nn.transformer` (its `convert_torchmil_state_dict` table), plus
    layers.{i}.sm.coef  <- layers.{i}.att_module.sm.sm.coef   (trainable alpha only)
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mil_train.nn.sm import Sm
from mil_train.nn.transformer import TransformerEncoder, TransformerEncoderLayer, convert_torchmil_state_dict

_TORCHMIL_SM_KEY = re.compile(r"^layers\.(\d+)\.att_module\.sm\.sm\.(.+)$")


class SmTransformerEncoderLayer(TransformerEncoderLayer):
    """`TransformerEncoderLayer` with Sm applied to the self-attention output."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        n_heads: int = 4,
        use_mlp: bool = True,
        dropout: float = 0.0,
        sm_alpha: float | str = "trainable",
        sm_mode: str = "approx",
        sm_steps: int = 10,
    ) -> None:
        super().__init__(in_dim, out_dim, att_dim, n_heads, use_mlp, dropout)
        self.sm = Sm(sm_alpha, sm_steps, sm_mode)

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """X: (batch, bag, in_dim), 0 on padding; returns (batch, bag, out_dim)."""
        attended = self.attention(self.attention_norm(X), mask)  # (batch, bag, att_dim), 0 on padding
        return self.finish(X, self.sm(attended, edge_index, edge_weight))  # (batch, bag, out_dim)


class SmTransformerEncoder(TransformerEncoder):
    """n_layers of `SmTransformerEncoderLayer`, optional input skip after each, final LayerNorm.

    Args: those of `mil_train.nn.transformer.TransformerEncoder`, plus sm_alpha, sm_mode, sm_steps
    (each layer's Sm operator).
    """

    layer_class = SmTransformerEncoderLayer

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        n_heads: int = 4,
        n_layers: int = 1,
        use_mlp: bool = True,
        add_self: bool = True,
        dropout: float = 0.0,
        sm_alpha: float | str = "trainable",
        sm_mode: str = "approx",
        sm_steps: int = 10,
    ) -> None:
        super().__init__(in_dim, out_dim, att_dim, n_heads, n_layers, use_mlp, add_self, dropout,
                         sm_alpha=sm_alpha, sm_mode=sm_mode, sm_steps=sm_steps)

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """X: (batch, bag, in_dim); mask: (batch, bag) bool. Returns (batch, bag, out_dim), 0 on padding."""
        if mask is not None:
            X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, in_dim)
        Y = X
        for layer in self.layers:
            Y = layer(Y, mask, edge_index, edge_weight)  # (batch, bag, att_dim or out_dim)
            if mask is not None:
                Y = Y.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, .): biases never reach Sm's padding
            if self.add_self:
                Y = Y + X  # (batch, bag, out_dim)
        Y = self.final_norm(Y)  # (batch, bag, out_dim)
        if mask is not None:
            Y = Y.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, out_dim)
        return Y


def convert_torchmil_sm_state_dict(
    state: dict[str, torch.Tensor], source_prefix: str = "", target_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """torchmil SmTransformerEncoder keys under `source_prefix` -> ours under `target_prefix`."""
    rest, out = {}, {}
    for key, value in state.items():
        if not key.startswith(source_prefix):
            continue
        match = _TORCHMIL_SM_KEY.match(key[len(source_prefix):])
        if match:
            out[f"{target_prefix}layers.{match.group(1)}.sm.{match.group(2)}"] = value
        else:
            rest[key] = value
    out.update(convert_torchmil_state_dict(rest, source_prefix, target_prefix))
    return out
