"""Nystrom self-attention (Xiong et al. 2021, arXiv:2102.03902) and the pre-norm layer built on it,
the math of torchmil 1.0.2's `torchmil.nn.NystromAttention` and `torchmil.nn.NystromTransformerLayer`
as TransMIL and CAMIL call them (without a mask), computed per bag over a padded batch.

torchmil, for one sequence of n tokens and m landmarks (`n_landmarks`):
  1. pad n to a multiple of m with P = (m - n % m) % m rows of zeros in FRONT of the sequence
     (after the layer's LayerNorm, so those rows have q = k = v = 0); lm = (n + P) / m;
  2. q, k, v = Linear(x) split into heads (q scaled by head_dim^-1/2);
  3. landmark j = mean of the j-th run of lm consecutive rows of the padded q (k): the front zeros
     count in the means;
  4. A1 = softmax(q k_lm^T) (n+P, m), A2 = softmax(q_lm k_lm^T) (m, m), A3 = softmax(q_lm k^T) (m, n+P):
     the P zero keys take part in A3's softmax with score 0 (value 0);
  5. out = A1 pinv(A2) (A3 v), pinv by `pinv_iterations` Newton-Schulz steps started from
     A2^T / (max row-sum * max column-sum); the padded rows are dropped.

Here each bag is treated alone, whatever the batch holds (padding invariance):
- n, P and lm are per bag, from the mask (`n = mask.sum`); a real token's place in the bag is its
  rank among the real tokens (`cumsum(mask) - 1`), so real tokens need not be a prefix of the row.
  The front zeros are virtual: landmark j sums the real rows whose padded position falls in run j
  (one (bag, landmarks) 0/1 matrix times q or k) and divides by lm; A3's softmax adds P * exp(0 - max)
  to its denominator instead of holding P zero columns.
- The Newton-Schulz start divides by the maxima over one bag's heads. torchmil takes them over the
  whole batch tensor, which ties a bag to its batch-mates (it still converges towards the same
  pseudo-inverse, but 6 steps are not converged); for a batch of one bag both are the same.
- Padded rows (which may hold 1e30) are replaced by 0 before anything reads them, padded q/k/v rows
  are zeroed, padded keys get weight exactly 0 in every softmax, and padded output rows are 0.
No tensor has two token axes: A1 is (batch, heads, tokens, m), A3 (batch, heads, m, tokens), so
memory and time are linear in the bag. `attention_matrix` builds the dense (tokens, tokens) product
for tests only.

State-dict keys (ours <- torchmil's NystromTransformerLayer), same names as
`mil_train.nn.transformer.TransformerEncoderLayer`:
    attention_norm.*           <- norm1.*
    attention.qkv.weight       <- att_module.qkv_nn.weight       (learn_weights=True)
    attention.out_proj.*       <- att_module.out_proj.*          (only when it is a Linear)
    skip_proj.*                <- att_proj.*                     (only when in_dim != att_dim)
    mlp_norm.*                 <- norm2.*                        (when use_mlp; unused and dropped otherwise)
    mlp.0.* / mlp.3.*          <- mlp_module.0.* / mlp_module.3.*
    out_proj.*                 <- out_proj.*                     (only when out_dim != att_dim)
`convert_torchmil_layer_state_dict` applies the table.
"""

from __future__ import annotations

import torch
from torch import nn

from mil_train.nn.transformer import PreNormLayer

# What a padded key scores before a softmax: the float32 minimum, so exp(score - max) is exactly 0
# beside any real score and no -inf enters (torchmil masks with -finfo.max too).
MASKED_SCORE = torch.finfo(torch.float32).min


def newton_schulz_pinv(A: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Iterative Moore-Penrose pseudo-inverse of A (batch, heads, m, m), torchmil's update rule
    Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4, started from A^T / (max_i sum_j |A_ij| *
    max_j sum_i |A_ij|) with the maxima taken per bag (over its heads), not over the batch."""
    magnitude = A.abs()  # (batch, heads, m, m)
    row_sums = magnitude.sum(dim=-1).amax(dim=(1, 2))  # (batch,)
    col_sums = magnitude.sum(dim=-2).amax(dim=(1, 2))  # (batch,)
    Z = A.transpose(-1, -2) / (row_sums * col_sums)[:, None, None, None]  # (batch, heads, m, m)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)  # (m, m)
    for _ in range(iterations):
        AZ = A @ Z  # (batch, heads, m, m)
        Z = 0.25 * Z @ (13 * eye - AZ @ (15 * eye - AZ @ (7 * eye - AZ)))  # (batch, heads, m, m)
    return Z


def landmark_groups(mask: torch.Tensor, n_landmarks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bag landmark layout of torchmil's front-padded sequence.

    mask: (batch, tokens) bool, True = real token. Returns
      groups: (batch, tokens, m) float 0/1, token t belongs to landmark j (0 on padded tokens);
      run:    (batch,) float, lm = tokens per landmark run = ceil(n / m) (at least 1);
      front:  (batch,) float, P = (m - n % m) % m virtual zero rows in front of the bag.
    """
    m = n_landmarks
    n = mask.sum(dim=1)  # (batch,) int64
    front = (m - n % m) % m  # (batch,)
    run = ((n + front) // m).clamp(min=1)  # (batch,)
    rank = torch.cumsum(mask.long(), dim=1) - 1  # (batch, tokens) place among the real tokens
    group = (rank + front[:, None]) // run[:, None]  # (batch, tokens) in [0, m) on real tokens
    landmarks = torch.arange(m, device=mask.device)  # (m,)
    groups = (group[:, :, None] == landmarks) & mask[:, :, None]  # (batch, tokens, m)
    return groups.to(torch.float32), run.to(torch.float32), front.to(torch.float32)


class NystromAttention(nn.Module):
    """Nystrom approximation of softmax self-attention with `n_landmarks` segment-mean landmarks.

    Args (torchmil's): in_dim; out_dim (None = in_dim); att_dim (divisible by n_heads);
    n_heads; learn_weights (False: q = k = v = the input, att_dim becomes in_dim);
    n_landmarks; pinv_iterations.
    State dict: `qkv.weight` (3 att_dim, in_dim) = torchmil `qkv_nn.weight` (no bias), and
    `out_proj.*` when out_dim != att_dim.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        n_heads: int = 4,
        learn_weights: bool = True,
        n_landmarks: int = 256,
        pinv_iterations: int = 6,
    ) -> None:
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        # torchmil scales by the given att_dim's head width, even when learn_weights=False
        self.scale = (att_dim // n_heads) ** -0.5
        if not learn_weights:
            att_dim = in_dim
        if att_dim % n_heads != 0:
            raise ValueError(f"attention width ({att_dim}) must be divisible by n_heads ({n_heads})")
        if n_landmarks < 1:
            raise ValueError(f"n_landmarks must be >= 1, got {n_landmarks}")
        self.att_dim = att_dim
        self.n_heads = n_heads
        self.head_dim = att_dim // n_heads
        self.n_landmarks = n_landmarks
        self.pinv_iterations = pinv_iterations
        self.qkv = nn.Linear(in_dim, 3 * att_dim, bias=False) if learn_weights else None
        self.out_proj = nn.Linear(att_dim, out_dim) if out_dim != att_dim else nn.Identity()

    def _split_heads(self, T: torch.Tensor) -> torch.Tensor:
        batch, tokens = T.shape[0], T.shape[1]
        return T.reshape(batch, tokens, self.n_heads, self.head_dim).transpose(1, 2)  # (batch, heads, tokens, d)

    def _factors(
        self, X: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A1 (batch, heads, tokens, m), pinv(A2) (batch, heads, m, m), A3 exp-scores and their
        denominator, and v: A3 = e3 / denom3[..., None] over the real tokens."""
        batch, tokens = X.shape[0], X.shape[1]
        if mask is None:
            mask = torch.ones(batch, tokens, dtype=torch.bool, device=X.device)  # (batch, tokens)
        real = mask[:, :, None]  # (batch, tokens, 1)
        X = torch.where(real, X, torch.zeros_like(X))  # (batch, tokens, in_dim)
        if self.qkv is None:
            query = key = value = X  # (batch, tokens, att_dim)
        else:
            query, key, value = self.qkv(X).chunk(3, dim=-1)  # 3 x (batch, tokens, att_dim)
        query = torch.where(real, query * self.scale, torch.zeros_like(query))  # (batch, tokens, att_dim)
        key = torch.where(real, key, torch.zeros_like(key))  # (batch, tokens, att_dim)
        value = torch.where(real, value, torch.zeros_like(value))  # (batch, tokens, att_dim)

        groups, run, front = landmark_groups(mask, self.n_landmarks)  # (batch, tokens, m), (batch,), (batch,)
        groups = groups.to(X.dtype)
        members = groups.transpose(1, 2)  # (batch, m, tokens)
        query_lm = (members @ query) / run.to(X.dtype)[:, None, None]  # (batch, m, att_dim)
        key_lm = (members @ key) / run.to(X.dtype)[:, None, None]  # (batch, m, att_dim)

        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        query_lm, key_lm = self._split_heads(query_lm), self._split_heads(key_lm)  # 2 x (batch, heads, m, d)

        A1 = torch.softmax(query @ key_lm.transpose(-1, -2), dim=-1)  # (batch, heads, tokens, m)
        A2 = torch.softmax(query_lm @ key_lm.transpose(-1, -2), dim=-1)  # (batch, heads, m, m)
        A2_inv = newton_schulz_pinv(A2, self.pinv_iterations)  # (batch, heads, m, m)

        # padded keys (k = 0, so score 0) get MASKED_SCORE added: one (batch, 1, 1, tokens) bias, no
        # second (m, tokens) tensor; exp(MASKED_SCORE - top) is exactly 0 whenever the bag has a real
        # token (an empty bag has v = 0 everywhere, so its output is 0 all the same)
        key_bias = torch.where(mask, torch.zeros_like(mask, dtype=X.dtype), torch.full_like(mask, MASKED_SCORE, dtype=X.dtype))
        scores3 = query_lm @ key.transpose(-1, -2) + key_bias[:, None, None, :]  # (batch, heads, m, tokens)
        top = scores3.amax(dim=-1, keepdim=True)  # (batch, heads, m, 1)
        has_front = (front > 0)[:, None, None, None]  # (batch, 1, 1, 1)
        top = torch.where(has_front, top.clamp(min=0.0), top)  # the virtual zero keys score 0
        e3 = torch.exp(scores3 - top)  # (batch, heads, m, tokens), 0 on padded keys
        denom3 = e3.sum(dim=-1) + front.to(X.dtype)[:, None, None] * torch.exp(-top[..., 0])  # (batch, heads, m)
        return A1, A2_inv, e3, denom3, value

    def forward(
        self, X: torch.Tensor, mask: torch.Tensor | None = None, return_first_row: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """X: (batch, tokens, in_dim); mask: (batch, tokens) bool, True = real.

        Returns Y (batch, tokens, out_dim), 0 on padded rows when a mask is given; with
        `return_first_row`, also the attention row of token 0 over all tokens (batch, heads, tokens),
        0 on padded tokens: row 0 of A1 pinv(A2) A3, torchmil's `return_att` matrix row, linear memory.
        """
        batch, tokens = X.shape[0], X.shape[1]
        A1, A2_inv, e3, denom3, value = self._factors(X, mask)
        A3v = (e3 @ value) / denom3[..., None]  # (batch, heads, m, d)
        Y = A1 @ (A2_inv @ A3v)  # (batch, heads, tokens, d)
        Y = Y.transpose(1, 2).reshape(batch, tokens, self.att_dim)  # (batch, tokens, att_dim)
        Y = self.out_proj(Y)  # (batch, tokens, out_dim)
        if mask is not None:
            Y = torch.where(mask[:, :, None], Y, torch.zeros_like(Y))  # (batch, tokens, out_dim)
        if not return_first_row:
            return Y
        first = (A1[:, :, :1, :] @ A2_inv) @ (e3 / denom3[..., None])  # (batch, heads, 1, tokens)
        return Y, first[:, :, 0, :]

    def attention_matrix(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (batch, heads, tokens, tokens) A1 pinv(A2) A3 over the real tokens (torchmil's
        `return_att` with its front padding removed), 0 on padded rows and columns. For tests."""
        A1, A2_inv, e3, denom3, _ = self._factors(X, mask)
        att = (A1 @ A2_inv) @ (e3 / denom3[..., None])  # (batch, heads, tokens, tokens)
        if mask is not None:
            att = torch.where(mask[:, None, :, None], att, torch.zeros_like(att))
        return att


class NystromTransformerLayer(PreNormLayer):
    """Pre-norm layer: Z = skip_proj(X) + NystromAttention(LayerNorm(X)); Z += MLP(LayerNorm(Z)) when
    use_mlp; Y = out_proj(Z). torchmil's NystromTransformerLayer, same constructor arguments.

    Args: in_dim; out_dim (None = in_dim); att_dim; n_heads; learn_weights; n_landmarks;
    pinv_iterations; dropout (in the MLP only, training only; torchmil's attention has none);
    use_mlp (MLP att_dim -> 4 att_dim -> att_dim, GELU).
    forward(X, mask=None, return_first_row=False): X (batch, tokens, in_dim) -> (batch, tokens,
    out_dim), 0 on padded rows; each bag computed as torchmil computes it alone, unmasked.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        n_heads: int = 4,
        learn_weights: bool = True,
        n_landmarks: int = 256,
        pinv_iterations: int = 6,
        dropout: float = 0.0,
        use_mlp: bool = False,
    ) -> None:
        attention = NystromAttention(
            in_dim=in_dim,
            out_dim=att_dim,
            att_dim=att_dim,
            n_heads=n_heads,
            learn_weights=learn_weights,
            n_landmarks=n_landmarks,
            pinv_iterations=pinv_iterations,
        )
        super().__init__(in_dim, out_dim, att_dim, attention, use_mlp, dropout)

    def forward(
        self, X: torch.Tensor, mask: torch.Tensor | None = None, return_first_row: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """X: (batch, tokens, in_dim); mask: (batch, tokens) bool, True = real.

        Returns Y (batch, tokens, out_dim), 0 on padded rows when a mask is given; with
        `return_first_row` also token 0's attention row (batch, heads, tokens) (see NystromAttention).
        """
        if mask is not None:
            X = torch.where(mask[:, :, None], X, torch.zeros_like(X))  # (batch, tokens, in_dim)
        attended = self.attention(self.attention_norm(X), mask, return_first_row=return_first_row)
        if return_first_row:
            attended, first_row = attended  # (batch, tokens, att_dim), (batch, heads, tokens)
        Y = self.finish(X, attended)  # (batch, tokens, out_dim)
        if mask is not None:
            Y = torch.where(mask[:, :, None], Y, torch.zeros_like(Y))  # (batch, tokens, out_dim)
        return (Y, first_row) if return_first_row else Y


# (torchmil key prefix inside one NystromTransformerLayer, ours)
TORCHMIL_LAYER_RENAMES: tuple[tuple[str, str], ...] = (
    ("norm1.", "attention_norm."),
    ("att_module.qkv_nn.", "attention.qkv."),
    ("att_module.out_proj.", "attention.out_proj."),
    ("att_proj.", "skip_proj."),
    ("norm2.", "mlp_norm."),
    ("mlp_module.", "mlp."),
    ("out_proj.", "out_proj."),
)


def convert_torchmil_layer_state_dict(
    state: dict[str, torch.Tensor], source_prefix: str = "", target_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """torchmil NystromTransformerLayer keys under `source_prefix` -> ours under `target_prefix`.

    Keys outside `source_prefix` are left out; a layer key the table does not know raises KeyError;
    `norm2` of a layer without MLP (unused in torchmil) is dropped.
    """
    layer = {key[len(source_prefix):]: value for key, value in state.items() if key.startswith(source_prefix)}
    has_mlp = any(key.startswith("mlp_module.") for key in layer)
    out: dict[str, torch.Tensor] = {}
    for key, value in layer.items():
        if key.startswith("norm2.") and not has_mlp:
            continue
        for old, new in TORCHMIL_LAYER_RENAMES:
            if key.startswith(old):
                out[target_prefix + new + key[len(old):]] = value
                break
        else:
            raise KeyError(f"unexpected torchmil NystromTransformerLayer key {source_prefix + key!r}")
    return out
