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
layer emits one onnxruntime com.microsoft MultiHeadAttention node without a mask input, the only
form that takes onnxruntime's tiled (flash) CPU kernel, so no (batch, heads, bag, bag) tensor is
ever allocated. The key mask rides in the scores instead: every head of Q gets an extra column of
1 and every head of K one of 0 (real key) or PADDED_KEY_SCORE (padded key), so
[q, 1] . [k, b] = q . k + b (`with_key_bias`; the node's `scale` stays 1/sqrt(head_dim)). That is
exact, not a bound: real scores are unchanged, and exp(-1e30 / sqrt(head_dim) - max) is 0 in
float32 beside any real key (every row has one), including when whole key tiles are padding. No
-inf enters (no inf - inf). Limits: the file needs onnxruntime (contrib op; CPU kernel checked here;
the CUDA provider has the op too, unchecked with qk head_dim + 1 != v head_dim), and the
ExportedProgram is for ONNX only: run in PyTorch, `torch.onnx.ops.symbolic` returns zeros
(`fused_reference` is the eager statement of the node, for tests).

Measured (onnxruntime 1.32 CPU, torch 2.14, 2-core AMD EPYC, 2 threads, one bag, in_dim 1024; the
machine was shared with other jobs, so each figure is a min/median of interleaved runs):
- The attention core alone, 10,000 x 10,000, 8 heads x 64 (205 GFLOP): onnxruntime
  MultiHeadAttention 1,221 ms (qk head 64), 1,283 ms (65, the key-bias column); torch SDPA 1,302 ms
  without a mask, 1,343 ms with the key mask. Both run at ~160 GFLOP/s: the core is compute-bound
  and the two kernels tie, which caps what any graph can gain over torchmil (same GEMMs elsewhere).
- The block (1024 -> 512, 8 heads) at 10,000, time / working-memory rise: MatMul -> +bias ->
  Softmax -> MatMul (the previous export) 1.7 s warm (6.1 s first call) / +12.9 GB; the same with
  8 or 16 query chunks (Python loop over a constant count, chunk length ceil(N / C) + 1 gathered
  with clamped indices: chunk lengths of 1 make torch.export specialise the bag axis)
  1.64 / 1.60 s, +1.8 / +0.8 GB; key bias as a Q/K column without the Add, unchunked 1.69 s /
  +3.4 GB; opset-23 Attention with the same column (no mask) 3.8 s / +3.4 GB (it materialises the
  scores); MultiHeadAttention as here 1.43 s / +0.2 GB.
- Loading Q/K/V with three MatMuls on weight slices instead of one MatMul + Split: no gain (+-4 %).
- Whole models at default widths (benchmarks/attention_profile.py; the ranges span 2-3 interleaved
  rounds), ms and [peak RSS, MB], torchmil eager / previous export / this export:
      TransformerABMIL   1k: 74-94 [762] / 88-125 [274] / 75-77 [191]
                         5k: 619-667 [905] / 883-947 [3,624] / 609-646 [541]
                        10k: 2,009-2,200 [1,014] / 4,717-5,134 [13,500] / 1,825-2,154 [974]
      TransformerProbSmoothABMIL 10k: 2,133-2,183 [1,005] / 4,274-4,979 [13,500] / 1,974-2,504 [974]
      IIBMIL             1k: 37-47 [733] / 44-55 [174] / 37-40 [111]
                         5k: 439-442 [821] / 624-627 [1,866] / 394-425 [217]
                        10k: 1,580-1,759 [952] / 2,283-2,326 [6,829] / 1,378-1,513 [351]
  At 10,000 the profile gives MultiHeadAttention 59-76 % of node time, the Linear MatMuls 13-30 %,
  the masked_fill Wheres 4-7 %. The 1.5x-over-torchmil goal is out of reach in this form: the
  attention core ties with torch's SDPA (above) and the remaining GEMMs are the same work in both,
  so the floor is about attention + GEMMs ~ 1.8 s for TransformerABMIL at 10,000 (~1.15x).
"""

from __future__ import annotations

import torch
from torch import nn

# The key-bias column's value on padded keys: finite (no inf - inf); scaled, a padded key scores
# about -1.2e29, whose softmax weight is exactly 0 in float32 beside any real score above ~-1e29.
PADDED_KEY_SCORE = -1e30


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
        if torch.compiler.is_exporting():
            Y = self._fused_attention(query, key, value, mask)  # (batch, bag, att_dim)
        else:
            query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
            key_mask = None if mask is None else mask[:, None, None, :]  # (batch, 1, 1, bag)
            dropout_p = self.dropout if self.training else 0.0
            Y = nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=key_mask, dropout_p=dropout_p
            )  # (batch, heads, bag, head_dim)
            Y = Y.transpose(1, 2).reshape(batch, bag, self.att_dim)  # (batch, bag, att_dim)
        if mask is not None:
            Y = Y.masked_fill(~real, 0.0)  # (batch, bag, att_dim)
        return self.out_proj(Y)  # (batch, bag, out_dim)

    def _fused_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """What the export traces: one com.microsoft MultiHeadAttention node, no mask input (inference only).

        query, key, value: (batch, bag, att_dim) with zeroed padded rows. The key mask travels as
        the extra column of `with_key_bias`, so onnxruntime keeps its tiled CPU kernel. In eager
        mode `torch.onnx.ops.symbolic` only returns zeros of the output's shape: `fused_reference`
        is the eager statement of what the node computes.
        """
        batch, bag = query.shape[0], query.shape[1]
        if mask is not None:
            query, key = self.with_key_bias(query, key, mask)  # 2 x (batch, bag, heads * (head_dim + 1))
        return torch.onnx.ops.symbolic(
            "com.microsoft::MultiHeadAttention",
            (query, key, value),
            {"num_heads": self.n_heads, "scale": self.head_dim**-0.5},
            dtype=value.dtype,
            shape=(batch, bag, self.att_dim),
            version=1,
        )  # (batch, bag, att_dim)

    def with_key_bias(
        self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a column to every head of Q (1) and K (0 on real keys, PADDED_KEY_SCORE on padding).

        Per head, [q, 1] . [k, b] = q . k + b: real scores are unchanged and every padded key scores
        about -1e29 after scaling, whose exponential is exactly 0 next to any real key. A real row
        always has a real key, so no row is all padding; no -inf enters, so no inf - inf = NaN.
        """
        batch, bag = mask.shape[0], mask.shape[1]
        key_bias = torch.zeros_like(mask, dtype=key.dtype).masked_fill(~mask, PADDED_KEY_SCORE)  # (batch, bag)
        key_bias = key_bias[:, :, None, None].expand(batch, bag, self.n_heads, 1)  # (batch, bag, heads, 1)
        ones = torch.ones_like(key_bias)  # (batch, bag, heads, 1)
        width = self.n_heads * (self.head_dim + 1)
        query = torch.cat([query.reshape(batch, bag, self.n_heads, self.head_dim), ones], dim=-1)
        key = torch.cat([key.reshape(batch, bag, self.n_heads, self.head_dim), key_bias], dim=-1)
        return query.reshape(batch, bag, width), key.reshape(batch, bag, width)  # 2 x (batch, bag, width)

    def fused_reference(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Eager statement of `_fused_attention`: unmasked softmax(Q' K'^T * head_dim^-0.5) V per head.

        For tests: the same inputs as `_fused_attention`, (batch, bag, att_dim) out.
        """
        batch, bag = query.shape[0], query.shape[1]
        if mask is not None:
            query, key = self.with_key_bias(query, key, mask)
        query, key, value = (T.reshape(batch, bag, self.n_heads, -1).transpose(1, 2) for T in (query, key, value))
        scores = query @ key.transpose(-1, -2) * self.head_dim**-0.5  # (batch, heads, bag, bag)
        Y = torch.softmax(scores, dim=-1) @ value  # (batch, heads, bag, head_dim)
        return Y.transpose(1, 2).reshape(batch, bag, self.att_dim)  # (batch, bag, att_dim)

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
