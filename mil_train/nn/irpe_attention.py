"""Multi-head self-attention with image relative position encoding on the keys, and the pre-norm
encoder SETMIL stacks from it (torchmil 1.0.2's `iRPEMultiheadSelfAttention`, `iRPETransformerLayer`
and `iRPETransformerEncoder`, in the configuration SETMIL's defaults reach).

Tokens are one class token followed by the S x S cells of a grid, row-major (L = 1 + S^2), with a
(batch, L) mask of the tokens that exist (the class token and the cells inside each bag's own
square, `mil_train.nn.spatial_grid.cell_mask`). Per head, with q scaled by 1 / sqrt(head_dim):

    score_ij = q_i . k_j + q_i . w[:, bucket(i, j)]        (`mil_train.nn.relative_position`)
    out_i    = sum_j softmax_j(score_ij over existing keys) v_j

Supported: rpe_method "product", rpe_mode "contextual", rpe_on "k", rpe_skip 1, shared or per-head
tables (SETMIL's defaults, shared). Other iRPE modes raise NotImplementedError.

Cost: the bias depends on the query (contextual) and on the pair's relative offset through a step
function of dy and dx, which has no low-rank split into query and key columns, so it cannot ride in
extra Q/K columns of a fused MultiHeadAttention node the way the key mask does in
`mil_train.nn.self_attention`; a layer where every token attends materialises its
(batch, heads, L, L) scores (about four such float32 tensors live at once: scores, bias, their sum,
the softmax). But the class token's own row of the bias is one bucket for every key, a per-head
constant that the softmax cancels, so a layer whose only needed output is the class token
(`class_token`: the last layer of SETMIL's encoder) is exact with (batch, heads, 1, L) scores, O(L).

Differences from torchmil, visible only in its bugs:
- torchmil splits heads with `reshape(batch, heads, L, head_dim)` of the (batch, L, att_dim)
  projections, without the transpose, so each "head" reads a quarter of the sequence's rows cut
  into head-width slices, then merges heads with the transpose. Here heads are split the standard
  way (view as (batch, L, heads, head_dim), transpose), the inverse of its merge.
- torchmil has no key mask (its tokens are exactly one bag's square); here non-existing tokens
  are masked keys, and their rows are 0 on output.

State dict (ours <- torchmil), per layer i: `layers.{i}.attention_norm.*` <- `norm1.*`,
`attention.qkv.weight` <- `att_module.qkv_nn.weight`, `attention.rpe_k_weight` <-
`att_module.rpe_k.lookup_table_weight` (heads or 1, head_dim, n^2 + 1), `mlp_norm.*` <- `norm2.*`,
`mlp.*` <- `mlp_module.*`, `skip_proj.*` <- `att_proj.*` and `out_proj.*` <- `out_proj.*` where
widths differ; `final_norm.*` <- `norm.*`.
"""

from __future__ import annotations

import torch
from torch import nn

from mil_train.nn.relative_position import ProductBuckets, contextual_key_bias
from mil_train.nn.transformer import PreNormLayer

SUPPORTED = {"rpe_method": "product", "rpe_mode": "contextual", "rpe_on": "k", "rpe_skip": 1}


def check_supported(**options) -> None:
    for key, value in options.items():
        if value != SUPPORTED[key]:
            raise NotImplementedError(
                f"iRPE {key}={value!r} is not implemented; milkit's SETMIL supports "
                + ", ".join(f"{k}={v!r}" for k, v in SUPPORTED.items())
                + " (torchmil's defaults)"
            )


class IRPEMultiheadSelfAttention(nn.Module):
    """Masked multi-head self-attention over [class, S x S grid] tokens with contextual iRPE on keys.

    Args:
        in_dim: token width.
        out_dim: output width; None means in_dim. A Linear(att_dim, out_dim) follows when different.
        att_dim: total width of Q, K, V (divisible by n_heads).
        n_heads: heads.
        dropout: on the attention weights, training only.
        rpe_ratio: iRPE ratio (alpha, beta, gamma = 1, 2, 8 x ratio).
        rpe_shared_head: one bucket table for all heads.
        rpe_method, rpe_mode, rpe_skip, rpe_on: only SETMIL's defaults (see module docstring).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        n_heads: int = 4,
        dropout: float = 0.0,
        rpe_ratio: float = 1.9,
        rpe_method: str = "product",
        rpe_mode: str = "contextual",
        rpe_shared_head: bool = True,
        rpe_skip: int = 1,
        rpe_on: str = "k",
    ) -> None:
        super().__init__()
        check_supported(rpe_method=rpe_method, rpe_mode=rpe_mode, rpe_on=rpe_on, rpe_skip=rpe_skip)
        if att_dim % n_heads != 0:
            raise ValueError(f"att_dim ({att_dim}) must be divisible by n_heads ({n_heads})")
        out_dim = in_dim if out_dim is None else out_dim
        self.att_dim = att_dim
        self.n_heads = n_heads
        self.head_dim = att_dim // n_heads
        self.dropout = dropout
        self.buckets = ProductBuckets(rpe_ratio)
        self.qkv = nn.Linear(in_dim, 3 * att_dim, bias=False)
        table_heads = 1 if rpe_shared_head else n_heads
        self.rpe_k_weight = nn.Parameter(torch.zeros(table_heads, self.head_dim, self.buckets.num_buckets(rpe_skip)))
        self.out_proj = nn.Linear(att_dim, out_dim) if out_dim != att_dim else nn.Identity()

    def _split_heads(self, T: torch.Tensor) -> torch.Tensor:
        batch, tokens = T.shape[0], T.shape[1]
        return T.reshape(batch, tokens, self.n_heads, self.head_dim).transpose(1, 2)  # (batch, heads, L, head_dim)

    def scores(self, query: torch.Tensor, key: torch.Tensor, side: int) -> torch.Tensor:
        """(batch, heads, L, L) scores q.k + iRPE bias for split, scaled queries (batch, heads, L, head_dim)."""
        lookup = torch.matmul(query, self.rpe_k_weight[None])  # (batch, heads, L, buckets)
        content = query @ key.transpose(-1, -2)  # (batch, heads, L, L)
        buckets = self.buckets
        row_onehot = buckets.axis_onehot(side, query.device, query.dtype)  # (S, S, n)
        grid_bias = contextual_key_bias(
            lookup[:, :, 1:, : buckets.grid_buckets], row_onehot, row_onehot, side
        )  # (batch, heads, S * S, S * S)
        class_bucket = lookup[..., buckets.class_bucket : buckets.class_bucket + 1]  # (batch, heads, L, 1)
        grid_rows = torch.cat([class_bucket[:, :, 1:], grid_bias], dim=-1)  # (batch, heads, S * S, L)
        class_row = class_bucket[:, :, :1].expand(-1, -1, 1, content.shape[-1])  # (batch, heads, 1, L)
        return content + torch.cat([class_row, grid_rows], dim=-2)  # (batch, heads, L, L)

    def _project(self, X: torch.Tensor, token_mask: torch.Tensor):
        """Split, scaled queries and keys/values (batch, heads, L, head_dim) of the existing tokens."""
        X = torch.where(token_mask[..., None], X, torch.zeros_like(X))  # (batch, L, in_dim)
        query, key, value = self.qkv(X).chunk(3, dim=-1)  # 3 x (batch, L, att_dim)
        query = self._split_heads(query) * self.head_dim**-0.5  # (batch, heads, L, head_dim)
        return query, self._split_heads(key), self._split_heads(value)

    def _weights(self, scores: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        scores = scores.masked_fill(~token_mask[:, None, None, :], float("-inf"))  # (batch, heads, q, L)
        return torch.softmax(scores, dim=-1)  # (batch, heads, q, L); the class key is never masked

    def _merge(self, weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            weights = nn.functional.dropout(weights, p=self.dropout)
        Y = weights @ value  # (batch, heads, q, head_dim)
        return Y.transpose(1, 2).reshape(Y.shape[0], Y.shape[2], self.att_dim)  # (batch, q, att_dim)

    def forward(
        self, X: torch.Tensor, token_mask: torch.Tensor, side: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token attends. X: (batch, 1 + S * S, in_dim); token_mask: (batch, 1 + S * S) bool; side: S.

        Returns (Y (batch, L, out_dim) with 0 on masked tokens, the class token's attention weights
        over the tokens averaged over heads (batch, L), 0 on masked tokens). Materialises the
        (batch, heads, L, L) scores.
        """
        query, key, value = self._project(X, token_mask)  # 3 x (batch, heads, L, head_dim)
        weights = self._weights(self.scores(query, key, side), token_mask)  # (batch, heads, L, L)
        class_weights = weights[:, :, 0].mean(dim=1)  # (batch, L)
        Y = self._merge(weights, value)  # (batch, L, att_dim)
        Y = torch.where(token_mask[..., None], Y, torch.zeros_like(Y))  # (batch, L, att_dim)
        return self.out_proj(Y), class_weights  # (batch, L, out_dim), (batch, L)

    def class_token(self, X: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the class token (token 0) attends: (Y (batch, 1, out_dim), its weights (batch, L)).

        Exactly the class row of `forward`: its iRPE bias is one bucket for every key (the skip
        bucket), a constant per head that the softmax removes; it is added anyway, as torchmil does.
        O(L) memory: (batch, heads, 1, L) scores.
        """
        query, key, value = self._project(X, token_mask)  # 3 x (batch, heads, L, head_dim)
        query = query[:, :, :1]  # (batch, heads, 1, head_dim)
        class_bucket = self.buckets.class_bucket
        constant = torch.matmul(query, self.rpe_k_weight[None, :, :, class_bucket : class_bucket + 1])  # (batch, heads, 1, 1)
        weights = self._weights(query @ key.transpose(-1, -2) + constant, token_mask)  # (batch, heads, 1, L)
        class_weights = weights[:, :, 0].mean(dim=1)  # (batch, L)
        return self.out_proj(self._merge(weights, value)), class_weights  # (batch, 1, out_dim), (batch, L)


class IRPETransformerLayer(PreNormLayer):
    """`PreNormLayer` around iRPE self-attention."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        n_heads: int = 4,
        use_mlp: bool = True,
        dropout: float = 0.0,
        **rpe,
    ) -> None:
        attention = IRPEMultiheadSelfAttention(in_dim, att_dim, att_dim, n_heads, dropout, **rpe)
        super().__init__(in_dim, out_dim, att_dim, attention, use_mlp, dropout)

    def forward(self, X: torch.Tensor, token_mask: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token: (batch, L, in_dim) -> (batch, L, out_dim), and the class token's weights (batch, L)."""
        attended, class_weights = self.attention(self.attention_norm(X), token_mask, side)  # (batch, L, att_dim)
        return self.finish(X, attended), class_weights

    def class_token(self, X: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class token only: (batch, L, in_dim) -> (batch, 1, out_dim), its weights (batch, L)."""
        attended, class_weights = self.attention.class_token(self.attention_norm(X), token_mask)  # (batch, 1, att_dim)
        return self.finish(X[:, :1], attended), class_weights


class IRPETransformerEncoder(nn.Module):
    """n_layers of `IRPETransformerLayer` then LayerNorm(out_dim) (torchmil's add_self=False).

    `forward` returns only what SETMIL reads: the encoded class token (batch, out_dim) and the last
    layer's class-token attention weights averaged over heads (batch, L). Nothing downstream of the
    last layer reads another token, so that layer runs for the class query alone (exactly the class
    row of the full layer): with one layer (SETMIL's default) the encoder is O(L) in memory and
    time; each further layer is full iRPE attention, O(L^2).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        n_heads: int = 4,
        n_layers: int = 4,
        use_mlp: bool = True,
        dropout: float = 0.0,
        **rpe,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        out_dim = in_dim if out_dim is None else out_dim
        self.layers = nn.ModuleList(
            IRPETransformerLayer(
                in_dim=in_dim if i == 0 else att_dim,
                out_dim=out_dim if i == n_layers - 1 else att_dim,
                att_dim=att_dim,
                n_heads=n_heads,
                use_mlp=use_mlp,
                dropout=dropout,
                **rpe,
            )
            for i in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(out_dim)

    def forward(self, X: torch.Tensor, token_mask: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """X: (batch, L, in_dim); token_mask: (batch, L) bool. -> (class token (batch, out_dim), weights (batch, L))."""
        Y = torch.where(token_mask[..., None], X, torch.zeros_like(X))  # (batch, L, in_dim)
        for layer in self.layers[:-1]:
            Y, _ = layer(Y, token_mask, side)  # (batch, L, att_dim)
            Y = torch.where(token_mask[..., None], Y, torch.zeros_like(Y))  # (batch, L, att_dim)
        Y, class_weights = self.layers[-1].class_token(Y, token_mask)  # (batch, 1, out_dim), (batch, L)
        return self.final_norm(Y[:, 0]), class_weights  # (batch, out_dim), (batch, L)
