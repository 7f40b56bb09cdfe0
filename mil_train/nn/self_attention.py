"""Masked multi-head self-attention over the instances of a bag (Vaswani et al. 2017).

The math is torchmil 1.0.2's `torchmil.nn.MultiheadSelfAttention` (learned Q/K/V, no bias, scale
1/sqrt(head_dim), optional output projection), with three differences that only show on padding or
dropout:

- Only padding *keys* are masked. torchmil masks the (query, key) pair product, so a padded query row
  has every key masked; here it attends to the real keys like any row and is then set to 0. Real
  rows are identical either way; no row ever sees a fully masked softmax.
- Padded rows of Q/K/V are zeroed before the product, so padding that holds 1e30 or NaN cannot turn
  a masked score (-inf + NaN) or a zero weight times a value (0 * NaN) into NaN.
- Dropout on the attention weights is applied only in training mode (torchmil hands its rate to
  `scaled_dot_product_attention` unconditionally, so with dropout > 0 its eval mode is random).

Eager mode calls `torch.nn.functional.scaled_dot_product_attention` with a boolean key mask, which
runs PyTorch's memory-efficient (tiled) kernels where the device has one. Under `torch.export` the
layer traces an explicit MatMul -> +key bias -> Softmax -> MatMul instead, i.e. one
(batch, heads, bag, bag) float32 score tensor: the reason full self-attention models declare a
`max_bag_size` (see `mil_train.nn.transformer.max_bag_for_attention`).

Why not a fused ONNX attention (measured with onnxruntime 1.32, CPU): com.microsoft
MultiHeadAttention takes its tiled (flash) CPU path only without a key_padding_mask, and the
contract always feeds a mask; the opset-23 Attention that torch.onnx emits for SDPA at opset >= 23
refuses a (batch, 1, 1, bag) key mask (it wants (batch, 1, bag, bag), an extra N x N tensor) and
still materialises the scores. The plain graph here matched Attention-23's time and memory at
10,000 instances.
"""

from __future__ import annotations

import torch
from torch import nn


class MultiheadSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(head_dim)) V per head, heads concatenated, then `out_proj` if out_dim != att_dim.

    Args:
        in_dim: instance feature dimension.
        out_dim: output dimension; None means in_dim (torchmil's default).
        att_dim: total width of Q, K and V; must be divisible by n_heads.
        n_heads: number of heads.
        dropout: dropout rate on the attention weights, training only.

    State dict: `qkv.weight` (3 * att_dim, in_dim) holding [W_Q; W_K; W_V] (torchmil `qkv_nn.weight`),
    and `out_proj.*` when out_dim != att_dim (torchmil `out_proj.*`).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        n_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if att_dim % n_heads != 0:
            raise ValueError(f"att_dim ({att_dim}) must be divisible by n_heads ({n_heads})")
        out_dim = in_dim if out_dim is None else out_dim
        self.att_dim = att_dim
        self.n_heads = n_heads
        self.head_dim = att_dim // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(in_dim, 3 * att_dim, bias=False)
        self.out_proj = nn.Linear(att_dim, out_dim) if out_dim != att_dim else nn.Identity()

    def _split_heads(self, T: torch.Tensor) -> torch.Tensor:
        batch, bag = T.shape[0], T.shape[1]
        return T.reshape(batch, bag, self.n_heads, self.head_dim).transpose(1, 2)  # (batch, heads, bag, head_dim)

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """X: (batch, bag, in_dim); mask: (batch, bag) bool, True = real. Returns (batch, bag, out_dim)."""
        batch, bag = X.shape[0], X.shape[1]
        if mask is not None:
            real = mask.unsqueeze(-1)  # (batch, bag, 1)
            X = X.masked_fill(~real, 0.0)  # (batch, bag, in_dim)
        query, key, value = self.qkv(X).chunk(3, dim=-1)  # 3 x (batch, bag, att_dim)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        if torch.compiler.is_exporting():
            Y = self._explicit_attention(query, key, value, mask)  # (batch, heads, bag, head_dim)
        else:
            key_mask = None if mask is None else mask[:, None, None, :]  # (batch, 1, 1, bag)
            dropout_p = self.dropout if self.training else 0.0
            Y = nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=key_mask, dropout_p=dropout_p
            )  # (batch, heads, bag, head_dim)
        Y = Y.transpose(1, 2).reshape(batch, bag, self.att_dim)  # (batch, bag, att_dim)
        if mask is not None:
            Y = Y.masked_fill(~real, 0.0)  # (batch, bag, att_dim)
        return self.out_proj(Y)  # (batch, bag, out_dim)

    def _explicit_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """MatMul -> add key bias -> Softmax -> MatMul: what the export traces (inference, no dropout).

        The exporter's own lowering of scaled_dot_product_attention adds a Where on the scores and a
        NaN-guarded softmax; on onnxruntime 1.32 (CPU, 2 threads, 10,000 instances, 4 heads) this plain
        form took 3.4-5.3 s instead of 15.9 s, and 4.2 GB peak instead of 7.7 GB. Every row has a real key, so no row is all -inf.
        """
        scores = (query * self.head_dim**-0.5) @ key.transpose(-1, -2)  # (batch, heads, bag, bag)
        if mask is not None:
            key_bias = torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, float("-inf"))  # (batch, bag)
            scores = scores + key_bias[:, None, None, :]  # (batch, heads, bag, bag)
        return torch.softmax(scores, dim=-1) @ value  # (batch, heads, bag, head_dim)

    def attention_weights(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The (batch, heads, bag, bag) softmax weights, 0 on padded keys and padded query rows.

        Materialises the full N x N tensor: for inspection and tests, not for the forward pass.
        """
        if mask is not None:
            X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, in_dim)
        query, key, _ = self.qkv(X).chunk(3, dim=-1)  # 2 x (batch, bag, att_dim)
        query, key = self._split_heads(query), self._split_heads(key)
        scores = query @ key.transpose(-1, -2) / self.head_dim**0.5  # (batch, heads, bag, bag)
        if mask is None:
            return torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # (batch, heads, bag, bag)
        weights = torch.softmax(scores, dim=-1)  # (batch, heads, bag, bag)
        return weights.masked_fill(~mask[:, None, :, None], 0.0)  # (batch, heads, bag, bag)
