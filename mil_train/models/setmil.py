"""SETMIL: spatial encoding transformer-based MIL (Zhao et al., "SETMIL: Spatial Encoding
Transformer-Based Multiple Instance Learning for Pathological Image Analysis", MICCAI 2022), as
torchmil 1.0.2's `torchmil.models.SETMIL`."""

from __future__ import annotations

import torch
from torch import nn

from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn.irpe_attention import IRPETransformerEncoder
from mil_train.nn.spatial_grid import (
    bag_sides,
    cell_mask,
    default_coords,
    grid_side,
    grid_to_seq,
    seq_to_grid,
    sinusoidal_encoding,
    sinusoidal_inverse_frequencies,
    token_positions,
)
from mil_train.nn.t2t import PyramidMultiScaleFusion
from mil_train.nn.transformer import max_bag_for_attention

# (heads, L, L) float32 tensors' worth of memory an iRPE layer where every token attends (all SET
# layers but the last) holds at its peak: content scores, the bias, their sum, the softmax, plus
# onnxruntime's temporaries. Measured: 1.19 GB peak RSS at L = 4,097, 4 heads (4.2 such tensors of
# 268 MB, plus 70 MB), so 5 keeps the declared size within the 4 GiB budget.
LIVE_SCORE_TENSORS = 5


def max_bag_for_set(set_n_layers: int, set_n_heads: int) -> int | None:
    """None (linear in N) for one SET layer; else the bag whose LIVE_SCORE_TENSORS x heads x L x L fit 4 GiB.

    L counts the class token and the cells of the bag's square, about N on a filled near-square grid.
    """
    if set_n_layers <= 1:
        return None
    return max_bag_for_attention(set_n_heads * LIVE_SCORE_TENSORS, extra_tokens=1)


@register_model
class SETMIL(MILModel):
    """Instances on their coordinate grid -> (PMF) -> class token + positions -> iRPE transformer -> linear.

    Args:
        in_dim: instance feature dimension D (projected to att_dim when different).
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        att_dim: width of the PMF and SET modules.
        use_pmf: run the pyramid multi-scale fusion (T2T layers with kernels 3, 5, 7) on the grid first.
        pmf_n_heads, pmf_use_mlp, pmf_dropout: the PMF's transformer layers.
        pmf_kernel_list, pmf_stride_list, pmf_padding_list, pmf_dilation_list: the PMF's unfolds, one per
            T2T layer; only grid-preserving ones (stride 1, padding dilation (k - 1) / 2).
        set_n_layers, set_n_heads, set_use_mlp, set_dropout: the spatial encoding transformer (SET).
        rpe_ratio, rpe_method, rpe_mode, rpe_shared_head, rpe_skip, rpe_on: its image relative position
            encoding; only method "product", mode "contextual", on "k", skip 1 (torchmil's defaults).

    coords (batch, bag, 2) int64 (y, x) place the instances; without coords each bag lies on the
    near-square row-major grid of `mil_export.onnx_export.grid_coords`. `attention` is the class
    token's attention (last SET layer, mean over heads) at each instance's cell, renormalised over
    the real instances. The tokens are every cell of each bag's bounding square (empty cells
    included). With one SET layer (the default) only the class token attends in it, O(cells) memory;
    each further layer is full iRPE attention, O(cells^2), and the instance declares `max_bag_size`
    (docs/models/SETMIL.md).
    """

    name = "SETMIL"
    uses_coords = True
    max_bag_size = None  # the default (one SET layer) is linear in N; an instance with more layers sets its own

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 512,
        use_pmf: bool = False,
        pmf_n_heads: int = 4,
        pmf_use_mlp: bool = True,
        pmf_dropout: float = 0.0,
        pmf_kernel_list: list = ((3, 3), (5, 5), (7, 7)),
        pmf_stride_list: list = ((1, 1), (1, 1), (1, 1)),
        pmf_padding_list: list = ((1, 1), (2, 2), (3, 3)),
        pmf_dilation_list: list = ((1, 1), (1, 1), (1, 1)),
        set_n_layers: int = 1,
        set_n_heads: int = 4,
        set_use_mlp: bool = True,
        set_dropout: float = 0.0,
        rpe_ratio: float = 1.9,
        rpe_method: str = "product",
        rpe_mode: str = "contextual",
        rpe_shared_head: bool = True,
        rpe_skip: int = 1,
        rpe_on: str = "k",
    ) -> None:
        as_lists = lambda pairs: [list(p) for p in pairs]  # noqa: E731  (JSON-able config)
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            att_dim=att_dim,
            use_pmf=use_pmf,
            pmf_n_heads=pmf_n_heads,
            pmf_use_mlp=pmf_use_mlp,
            pmf_dropout=pmf_dropout,
            pmf_kernel_list=as_lists(pmf_kernel_list),
            pmf_stride_list=as_lists(pmf_stride_list),
            pmf_padding_list=as_lists(pmf_padding_list),
            pmf_dilation_list=as_lists(pmf_dilation_list),
            set_n_layers=set_n_layers,
            set_n_heads=set_n_heads,
            set_use_mlp=set_use_mlp,
            set_dropout=set_dropout,
            rpe_ratio=rpe_ratio,
            rpe_method=rpe_method,
            rpe_mode=rpe_mode,
            rpe_shared_head=rpe_shared_head,
            rpe_skip=rpe_skip,
            rpe_on=rpe_on,
        )
        self.att_dim = att_dim
        self.max_bag_size = max_bag_for_set(set_n_layers, set_n_heads)
        self.proj = nn.Linear(in_dim, att_dim) if in_dim != att_dim else nn.Identity()
        self.register_buffer("inv_freq", sinusoidal_inverse_frequencies(att_dim), persistent=False)
        self.pmf = (
            PyramidMultiScaleFusion(
                in_dim=att_dim,
                out_dim=att_dim,
                att_dim=att_dim,
                kernel_list=pmf_kernel_list,
                stride_list=pmf_stride_list,
                padding_list=pmf_padding_list,
                dilation_list=pmf_dilation_list,
                n_heads=pmf_n_heads,
                use_mlp=pmf_use_mlp,
                dropout=pmf_dropout,
            )
            if use_pmf
            else None
        )
        self.encoder = IRPETransformerEncoder(
            in_dim=att_dim,
            att_dim=att_dim,
            n_layers=set_n_layers,
            n_heads=set_n_heads,
            use_mlp=set_use_mlp,
            dropout=set_dropout,
            rpe_ratio=rpe_ratio,
            rpe_method=rpe_method,
            rpe_mode=rpe_mode,
            rpe_shared_head=rpe_shared_head,
            rpe_skip=rpe_skip,
            rpe_on=rpe_on,
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, att_dim))
        self.classifier = nn.Linear(att_dim, n_classes)

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        batch = X.shape[0]
        if mask is None:
            mask = torch.ones(X.shape[:2], dtype=torch.bool, device=X.device)  # (batch, bag)
        if coords is None:
            coords = default_coords(mask)  # (batch, bag, 2)
        coords = coords.to(torch.int64)
        X = torch.where(mask[..., None], X, torch.zeros_like(X))  # (batch, bag, in_dim)
        H = self.proj(X)  # (batch, bag, att_dim)

        sides = bag_sides(coords, mask)  # (batch,) each bag's square side
        side = grid_side(sides)  # S, the batch grid's side
        cells = cell_mask(sides, side)  # (batch, S * S)
        grid = seq_to_grid(H, coords, mask, side)  # (batch, S * S, att_dim)
        if self.pmf is not None:
            grid = self.pmf(grid, cells, side)  # (batch, S * S, att_dim)

        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), grid], dim=1)  # (batch, 1 + S * S, att_dim)
        positions = token_positions(sides, side)  # (batch, 1 + S * S)
        tokens = tokens + sinusoidal_encoding(positions, self.inv_freq, self.att_dim)  # (batch, 1 + S * S, att_dim)
        token_mask = torch.cat([torch.ones_like(cells[:, :1]), cells], dim=1)  # (batch, 1 + S * S)

        encoded, class_weights = self.encoder(tokens, token_mask, side)  # (batch, att_dim), (batch, L)
        logits = self.classifier(encoded)  # (batch, n_classes)

        per_instance = grid_to_seq(class_weights[:, 1:, None], coords, mask, side)[..., 0]  # (batch, bag)
        attention = per_instance / per_instance.sum(dim=1, keepdim=True).clamp(min=torch.finfo(X.dtype).tiny)
        return MILOutput(logits=logits, attention=attention)  # (batch, n_classes), (batch, bag)
