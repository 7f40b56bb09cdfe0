"""SETMIL <-> torchmil.models.SETMIL.

torchmil 1.0.2's SETMIL differs from milkit's (and from the paper) in these places; reference_outputs
runs torchmil's own modules (projection, seq_to_spatial, pad-to-square, PMF, positional encoding,
iRPE transformer encoder with its iRPE tables, classifier) with the first two corrected, one bag at a
time, so that the comparison is between the same model:

1. Bug, tokens: without PMF, SETMIL turns the (batch, att_dim, S, S) grid into tokens with
   `reshape(batch, -1, att_dim)`, without moving the channel axis last, so token t holds the
   flattened values t * att_dim ... (t + 1) * att_dim - 1 of the channel-major grid: slices of one
   or two channels over consecutive cells, not cell t's feature vector. Corrected: token t is cell t.
2. Bug, heads: `iRPEMultiheadSelfAttention` splits Q, K and V into heads with
   `reshape(batch, n_heads, L, head_dim)` of the (batch, L, att_dim) projections (no transpose),
   so head h sees rows h L / n_heads ... of the sequence cut into head-width pieces, while its head
   merge does transpose. Corrected: view (batch, L, n_heads, head_dim), transpose (patched on the
   reference's attention modules, `_patch_heads`).
3. Batches: torchmil has no mask. A padded batch puts every padded row at coords (0, 0) (its
   seq_to_spatial overwrites that cell) and gives every bag the batch's largest square, so a bag's
   output depends on its batch. reference_outputs therefore runs each bag alone on its real rows;
   milkit masks the cells outside each bag's own square instead.
4. Attention: with `use_pmf=True` torchmil returns zeros; its attention without PMF is the last
   layer's class-token softmax weights over the grid (mean over heads) read at each instance's cell.
   milkit returns that map in both cases (PMF keeps the grid), renormalised to sum 1 over the
   instances; reference_outputs renormalises torchmil's the same way.
5. Duplicate coordinates: torchmil keeps whichever row its index_put writes last; milkit averages
   the rows of a cell. (The tests' near-square grids have no duplicates.)
6. Without coords (the parity tests' plain call), both sides place bag row i at
   `mil_export.onnx_export.grid_coords(n)[i]`.

Eval mode is deterministic in torchmil (dropout only through `training`).
"""

from __future__ import annotations

import types

import torch

from mil_train.interop.torchmil import TorchmilAdapter, register_adapter, strip_lazy

LAYER_RENAMES = {
    "norm1.": "attention_norm.",
    "att_module.qkv_nn.": "attention.qkv.",
    "att_module.rpe_k.lookup_table_weight": "attention.rpe_k_weight",
    "att_module.out_proj.": "attention.out_proj.",
    "att_proj.": "skip_proj.",
    "norm2.": "mlp_norm.",
    "mlp_module.": "mlp.",
    "out_proj.": "out_proj.",
}
T2T_RENAMES = {
    "transf_layer.norm1.": "transformer.attention_norm.",
    "transf_layer.att_module.qkv_nn.": "transformer.attention.qkv.",
    "transf_layer.att_proj.": "transformer.skip_proj.",
    "transf_layer.norm2.": "transformer.mlp_norm.",
    "transf_layer.mlp_module.": "transformer.mlp.",
    "transf_layer.out_proj.": "transformer.out_proj.",
    "out_proj.": "out_proj.",
}


def _rename(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"unexpected torchmil SETMIL key fragment {key!r}")


@register_adapter
class SETMILAdapter(TorchmilAdapter):
    name = "SETMIL"

    def build_reference(self, config):
        from torchmil.models import SETMIL

        if config.get("n_classes", 1) != 1:
            raise ValueError("torchmil's SETMIL is binary only; use n_classes=1")
        pairs = lambda key, default: [tuple(p) for p in config.get(key, default)]  # noqa: E731
        return SETMIL(
            in_shape=(config["in_dim"],),
            att_dim=config.get("att_dim", 512),
            use_pmf=config.get("use_pmf", False),
            pmf_n_heads=config.get("pmf_n_heads", 4),
            pmf_use_mlp=config.get("pmf_use_mlp", True),
            pmf_dropout=config.get("pmf_dropout", 0.0),
            pmf_kernel_list=pairs("pmf_kernel_list", [(3, 3), (5, 5), (7, 7)]),
            pmf_stride_list=pairs("pmf_stride_list", [(1, 1), (1, 1), (1, 1)]),
            pmf_padding_list=pairs("pmf_padding_list", [(1, 1), (2, 2), (3, 3)]),
            pmf_dilation_list=pairs("pmf_dilation_list", [(1, 1), (1, 1), (1, 1)]),
            set_n_layers=config.get("set_n_layers", 1),
            set_n_heads=config.get("set_n_heads", 4),
            set_use_mlp=config.get("set_use_mlp", True),
            set_dropout=config.get("set_dropout", 0.0),
            rpe_ratio=config.get("rpe_ratio", 1.9),
            rpe_method=config.get("rpe_method", "product"),
            rpe_mode=config.get("rpe_mode", "contextual"),
            rpe_shared_head=config.get("rpe_shared_head", True),
            rpe_skip=config.get("rpe_skip", 1),
            rpe_on=config.get("rpe_on", "k"),
        )

    def convert_state_dict(self, state, config):
        state = strip_lazy(state)
        out = {}
        for key, value in state.items():
            if key == "pos_embed.inv_freq":  # recomputed (same formula), not a parameter
                continue
            if key in ("cls_token",) or key.startswith(("proj.", "classifier.")):
                out[key] = value
            elif key.startswith("se_transf.norm."):
                out["encoder.final_norm." + key[len("se_transf.norm."):]] = value
            elif key.startswith("se_transf.layers."):
                _, _, index, rest = key.split(".", 3)
                out[f"encoder.layers.{index}.{_rename(rest, LAYER_RENAMES)}"] = value
            elif key.startswith("pmf.layers."):
                _, _, index, rest = key.split(".", 3)
                out[f"pmf.layers.{index}.{_rename(rest, T2T_RENAMES)}"] = value
            elif key.startswith("pmf.out_proj."):
                out[key] = value
            else:
                raise KeyError(f"unexpected torchmil SETMIL key {key}")
        return out

    def reference_outputs(self, reference, X, mask, *, edge_index=None, edge_weight=None, coords=None):
        from mil_export.onnx_export import grid_coords

        _patch_heads(reference)
        batch, bag = X.shape[0], X.shape[1]
        if mask is None:
            mask = torch.ones(batch, bag, dtype=torch.bool)
        logits, attention = torch.zeros(batch, 1), torch.zeros(batch, bag)
        for b in range(batch):
            n = int(mask[b].sum())
            bag_coords = grid_coords(n) if coords is None else coords[b, :n]
            logit, weights = _corrected_forward(reference, X[b : b + 1, :n], bag_coords[None].long())
            logits[b] = logit
            attention[b, :n] = weights / weights.sum()
        return logits, attention


def _patch_heads(reference) -> None:
    """Give every iRPE attention module of `reference` a forward that splits heads the standard way."""
    from torchmil.nn import iRPEMultiheadSelfAttention

    for module in reference.modules():
        if isinstance(module, iRPEMultiheadSelfAttention) and not getattr(module, "_milkit_heads", False):
            module.forward = types.MethodType(_irpe_attention_forward, module)
            module._milkit_heads = True


def _irpe_attention_forward(self, x, mask=None, return_att=False, height=None, width=None):
    """torchmil's iRPEMultiheadSelfAttention.forward for square grids, heads split by view + transpose."""
    batch, tokens, _ = x.shape
    query, key, value = self._qkv(x)  # 3 x (batch, L, att_dim)
    query, key, value = (
        t.reshape(batch, tokens, self.n_heads, -1).transpose(1, 2) for t in (query, key, value)
    )  # 3 x (batch, heads, L, head_dim)
    out = self._scaled_dot_product_attention(query, key, value, mask, height=height, width=width, return_att=return_att)
    y, att = out if return_att else (out, None)
    y = self.out_proj(y.transpose(1, 2).reshape(batch, tokens, self.att_dim))  # (batch, L, att_dim)
    return (y, att) if return_att else y


def _corrected_forward(reference, X, coords):
    """torchmil SETMIL.forward for one bag with the token layout corrected: (logit (1,), weights (n,))."""
    from torchmil.data import seq_to_spatial, spatial_to_seq

    H = reference.proj(reference.feat_ext(X))  # (1, n, att_dim)
    grid = seq_to_spatial(H, coords).permute(0, 3, 1, 2)  # (1, att_dim, rows, cols)
    grid = reference._pad_to_square(grid)  # (1, att_dim, S, S)
    side = grid.shape[-1]
    if reference.use_pmf:
        tokens = reference.pmf(grid)  # (1, S * S, att_dim), the grid kept by SETMIL's default unfolds
    else:
        tokens = grid.flatten(2).transpose(1, 2)  # (1, S * S, att_dim): token t is cell t
    tokens = torch.cat([reference.cls_token, tokens], dim=1)  # (1, 1 + S * S, att_dim)
    tokens = tokens + reference.pos_embed(tokens)
    encoded, att = reference.se_transf(tokens, return_att=True)  # (1, L, att_dim), (layers, 1, heads, L, L)
    logit = reference.classifier(encoded[:, 0]).squeeze(-1)  # (1,)
    cls_row = att[-1].mean(1)[:, 0, 1:].reshape(1, side, side, 1)  # (1, S, S, 1)
    weights = spatial_to_seq(cls_row, coords)[0, :, 0]  # (n,)
    return logit, weights
