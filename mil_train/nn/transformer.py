"""Pre-norm transformer encoder over a bag, the structure of torchmil 1.0.2's `torchmil.nn.TransformerEncoder`.

One layer (torchmil `TransformerLayer`), input width `in_dim`, attention width `att_dim`:
    Z = skip_proj(X) + SelfAttention(LayerNorm(X))        skip_proj: Linear(in_dim, att_dim), or identity
    Z = Z + MLP(LayerNorm(Z))                             when use_mlp; MLP: att_dim -> 4 att_dim -> att_dim, GELU
    Y = out_proj(Z)                                       Linear(att_dim, out_dim), or identity
The encoder stacks n_layers of them (the first maps in_dim -> att_dim, the last att_dim -> out_dim),
adds the encoder's input X after every layer when add_self (so in_dim must equal att_dim and out_dim),
and ends with LayerNorm(out_dim).

Padding: padded rows are zeroed on the way in, attention ignores padded keys, and padded output rows
are 0, so whatever padding holds (1e30, NaN) never reaches a real instance. Eager attention is
`scaled_dot_product_attention` (memory-efficient kernels where available); the ONNX graph runs
onnxruntime's tiled MultiHeadAttention (see `mil_train.nn.self_attention`), so neither holds a
(batch, heads, bag, bag) tensor on CPU. `max_bag_for_attention` is the budget rule the models'
declared `max_bag_size` follows: the size of that tensor, should a path materialise it.

Defaults are those of torchmil's TransformerABMIL encoder (n_heads=8, n_layers=1, add_self=True);
torchmil's bare TransformerEncoder defaults to n_heads=4, n_layers=4, add_self=False — pass them
explicitly when mirroring one.

State-dict keys (ours <- torchmil's TransformerEncoder), per layer i:
    layers.{i}.attention_norm.*      <- layers.{i}.norm1.*
    layers.{i}.attention.qkv.weight  <- layers.{i}.att_module.qkv_nn.weight
    layers.{i}.skip_proj.*           <- layers.{i}.att_proj.*        (only when in_dim != att_dim)
    layers.{i}.mlp_norm.*            <- layers.{i}.norm2.*
    layers.{i}.mlp.0.* / mlp.3.*     <- layers.{i}.mlp_module.0.* / mlp_module.3.*   (when use_mlp)
    layers.{i}.out_proj.*            <- layers.{i}.out_proj.*        (only when out_dim != att_dim)
    final_norm.*                     <- norm.*
torchmil's `in_proj` and the attention's own `out_proj` are identities inside its TransformerLayer and
hold no weights. `TORCHMIL_KEY_RENAMES` and `convert_torchmil_state_dict` apply this table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mil_train.nn.self_attention import MultiheadSelfAttention

# (torchmil key fragment, milkit key fragment), matched after the "layers.{i}." prefix or at the top level
TORCHMIL_KEY_RENAMES: tuple[tuple[str, str], ...] = (
    ("norm1.", "attention_norm."),
    ("att_module.qkv_nn.", "attention.qkv."),
    ("att_proj.", "skip_proj."),
    ("norm2.", "mlp_norm."),
    ("mlp_module.", "mlp."),
    ("out_proj.", "out_proj."),
)


def convert_torchmil_state_dict(
    state: dict[str, torch.Tensor], source_prefix: str = "", target_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """torchmil TransformerEncoder keys under `source_prefix` -> ours under `target_prefix`.

    Keys outside `source_prefix` are left out; an encoder key this table does not know raises KeyError.
    torchmil keeps `norm2` in a layer without MLP, where it is unused; ours has no such norm, so
    it is dropped.
    """
    encoder = {key[len(source_prefix):]: value for key, value in state.items() if key.startswith(source_prefix)}
    out: dict[str, torch.Tensor] = {}
    for key, value in encoder.items():
        if _is_unused_norm(key, encoder):
            continue
        out[target_prefix + _rename_encoder_key(key)] = value
    return out


def _is_unused_norm(key: str, encoder: dict[str, torch.Tensor]) -> bool:
    parts = key.split(".", 2)
    if len(parts) < 3 or parts[0] != "layers" or not parts[2].startswith("norm2."):
        return False
    layer_prefix = f"layers.{parts[1]}.mlp_module."
    return not any(other.startswith(layer_prefix) for other in encoder)


def _rename_encoder_key(key: str) -> str:
    if key.startswith("norm."):
        return "final_norm." + key[len("norm."):]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers":
        for old, new in TORCHMIL_KEY_RENAMES:
            if parts[2].startswith(old):
                return f"layers.{parts[1]}.{new}{parts[2][len(old):]}"
    raise KeyError(f"unexpected torchmil TransformerEncoder key {key!r}")


def max_bag_for_attention(n_heads: int, extra_tokens: int = 0, budget_bytes: int = 4 * 2**30) -> int:
    """Largest bag N whose (n_heads, N + extra_tokens, N + extra_tokens) float32 scores fit `budget_bytes`.

    The rule every full self-attention model's `max_bag_size` follows (one bag, one layer's score
    tensor, 4 GiB; DESIGN section 7); `extra_tokens` counts class tokens appended to the bag. No
    forward path allocates that tensor (SDPA eager, MultiHeadAttention in ONNX): the size bounds the
    checks, whose cost is O(N^2) time and torchmil's own O(N^2) memory.
    """
    tokens = math.isqrt(budget_bytes // (4 * n_heads))
    return tokens - extra_tokens


class PreNormLayer(nn.Module):
    """The pre-norm layer every transformer here shares, around an attention module of its own:

        attended = attention(LayerNorm(X))                  (the subclass calls its attention)
        Z = skip_proj(X) + attended                         Linear(in_dim, att_dim) or identity
        Z = Z + MLP(LayerNorm(Z))                           att_dim -> 4 att_dim -> att_dim, when use_mlp
        Y = out_proj(Z)                                     Linear(att_dim, out_dim) or identity

    Parameter names (attention_norm, attention, skip_proj, mlp_norm, mlp, out_proj) are torchmil's
    layout, which the state-dict converters rely on. `activation` is the MLP's (torchmil: GELU; GTP's
    relprop encoder: ReLU).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None,
        att_dim: int,
        attention: nn.Module,
        use_mlp: bool = True,
        dropout: float = 0.0,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        self.attention_norm = nn.LayerNorm(in_dim)
        self.attention = attention
        self.skip_proj = nn.Linear(in_dim, att_dim) if in_dim != att_dim else nn.Identity()
        self.mlp_norm = nn.LayerNorm(att_dim) if use_mlp else None
        self.mlp = (
            nn.Sequential(
                nn.Linear(att_dim, 4 * att_dim),
                activation(),
                nn.Dropout(dropout),
                nn.Linear(4 * att_dim, att_dim),
                nn.Dropout(dropout),
            )
            if use_mlp
            else None
        )
        self.out_proj = nn.Linear(att_dim, out_dim) if out_dim != att_dim else nn.Identity()

    def finish(self, X: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention: X (batch, q, in_dim), attended (batch, q, att_dim)."""
        Z = self.skip_proj(X) + attended  # (batch, q, att_dim)
        if self.mlp is not None:
            Z = Z + self.mlp(self.mlp_norm(Z))  # (batch, q, att_dim)
        return self.out_proj(Z)  # (batch, q, out_dim)


class TransformerEncoderLayer(PreNormLayer):
    """One pre-norm layer with masked multi-head self-attention (`PreNormLayer`)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        n_heads: int = 8,
        use_mlp: bool = True,
        dropout: float = 0.0,
    ) -> None:
        attention = MultiheadSelfAttention(in_dim, att_dim, att_dim, n_heads, dropout)
        super().__init__(in_dim, out_dim, att_dim, attention, use_mlp, dropout)

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """X: (batch, bag, in_dim) with finite padded rows; returns (batch, bag, out_dim)."""
        return self.finish(X, self.attention(self.attention_norm(X), mask))  # (batch, bag, out_dim)


class TransformerEncoder(nn.Module):
    """n_layers of `TransformerEncoderLayer`, optional input skip after each, final LayerNorm.

    Args:
        in_dim: instance feature dimension.
        out_dim: output dimension; None means in_dim.
        att_dim: attention (and hidden) width; divisible by n_heads.
        n_heads: attention heads.
        n_layers: number of layers.
        use_mlp: feed-forward block in each layer.
        add_self: add the encoder input to every layer's output (needs in_dim == att_dim == out_dim,
            att_dim only mattering when n_layers > 1).
        dropout: dropout in attention weights and MLP, training only.
        **layer_kwargs: further arguments of every layer (subclasses' `layer_class`).
    """

    layer_class: type[nn.Module] = TransformerEncoderLayer

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        n_heads: int = 8,
        n_layers: int = 1,
        use_mlp: bool = True,
        add_self: bool = True,
        dropout: float = 0.0,
        **layer_kwargs,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        out_dim = in_dim if out_dim is None else out_dim
        if add_self and (out_dim != in_dim or (n_layers > 1 and att_dim != in_dim)):
            raise ValueError(
                f"add_self adds the input to every layer's output: needs in_dim ({in_dim}) == out_dim "
                f"({out_dim}){' == att_dim (' + str(att_dim) + ')' if n_layers > 1 else ''}"
            )
        self.add_self = add_self
        self.layers = nn.ModuleList(
            self.layer_class(
                in_dim=in_dim if i == 0 else att_dim,
                out_dim=out_dim if i == n_layers - 1 else att_dim,
                att_dim=att_dim,
                n_heads=n_heads,
                use_mlp=use_mlp,
                dropout=dropout,
                **layer_kwargs,
            )
            for i in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(out_dim)

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """X: (batch, bag, in_dim); mask: (batch, bag) bool, True = real. Returns (batch, bag, out_dim), 0 on padding."""
        if mask is not None:
            X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, in_dim)
        Y = X
        for layer in self.layers:
            Y = layer(Y, mask)  # (batch, bag, att_dim or out_dim)
            if self.add_self:
                Y = Y + X  # (batch, bag, out_dim)
        Y = self.final_norm(Y)  # (batch, bag, out_dim)
        if mask is not None:
            Y = Y.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, out_dim)
        return Y
