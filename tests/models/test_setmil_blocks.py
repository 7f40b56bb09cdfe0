"""SETMIL's blocks against independent truths: torchmil 1.0.2's own functions and modules with the
same weights (heads split the standard way where torchmil's split is the bug the adapter documents),
dense hand-written formulas, and hand-computed small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mil_export.onnx_export import grid_coords
from mil_train.models import create_model
from mil_train.nn.irpe_attention import IRPEMultiheadSelfAttention, IRPETransformerEncoder
from mil_train.nn.relative_position import ProductBuckets, contextual_key_bias
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
from mil_train.nn.t2t import PyramidMultiScaleFusion, T2TLayer, unfold_grid

torchmil = pytest.importorskip("torchmil")


def padded_batch(lengths, dim, fill=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = max(lengths)
    X = torch.full((len(lengths), n, dim), fill)
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    coords = torch.zeros(len(lengths), n, 2, dtype=torch.int64)
    for b, length in enumerate(lengths):
        X[b, :length] = torch.randn(length, dim, generator=generator)
        mask[b, :length] = True
        coords[b, :length] = grid_coords(length)
    return X, mask, coords


# -- grid ---------------------------------------------------------------------------------------


def test_default_coords_are_the_exporters_grid():
    lengths = [1, 2, 3, 4, 5, 16, 17, 50, 99, 10_001]
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    coords = default_coords(mask)
    for b, n in enumerate(lengths):
        assert torch.equal(coords[b, :n], grid_coords(n)), n
        assert (coords[b, n:] == 0).all()


def test_seq_to_grid_is_torchmils_square_grid_per_bag():
    from torchmil.data import seq_to_spatial

    X, mask, coords = padded_batch((6, 1, 11), dim=5, fill=1e30)
    sides = bag_sides(coords, mask)
    assert sides.tolist() == [3, 1, 4]
    side = grid_side(sides)
    grid = seq_to_grid(X, coords, mask, side).reshape(3, side, side, 5)
    cells = cell_mask(sides, side).reshape(3, side, side)
    for b, n in enumerate((6, 1, 11)):
        expected = seq_to_spatial(X[b : b + 1, :n], coords[b : b + 1, :n])[0]  # (rows, cols, dim)
        s = int(sides[b])
        square = torch.zeros(s, s, 5)
        square[: expected.shape[0], : expected.shape[1]] = expected
        assert torch.equal(grid[b, :s, :s], square)
        assert (grid[b][~cells[b]] == 0).all() and cells[b, :s, :s].all() and cells[b].sum() == s * s
    back = grid_to_seq(grid.reshape(3, side * side, 5), coords, mask, side)
    assert torch.equal(back[mask], X[mask]) and (back[~mask] == 0).all()


def test_rows_sharing_a_cell_are_averaged_and_padding_reaches_no_cell():
    X = torch.tensor([[[1.0], [3.0], [5.0], [1e30]]])
    mask = torch.tensor([[True, True, True, False]])
    coords = torch.tensor([[[0, 1], [0, 1], [1, 0], [0, 0]]])
    grid = seq_to_grid(X, coords, mask, 2)
    assert grid[0, :, 0].tolist() == [0.0, 2.0, 5.0, 0.0]


def test_token_positions_and_encoding_are_torchmils_for_each_bag():
    from torchmil.nn.utils import SinusoidalPositionalEncodingND

    sides = torch.tensor([3, 5])
    positions = token_positions(sides, 5)  # (2, 26)
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    for b, s in enumerate((3, 5)):
        inside = ((rows < s) & (cols < s)).reshape(-1)
        assert positions[b, 0] == 0
        assert positions[b, 1:][inside].tolist() == list(range(1, s * s + 1))
    for dim in (7, 32):
        encoding = sinusoidal_encoding(torch.arange(26.0)[None], sinusoidal_inverse_frequencies(dim), dim)
        expected = SinusoidalPositionalEncodingND(1, dim)(torch.zeros(1, 26, dim))
        torch.testing.assert_close(encoding, expected, rtol=0, atol=0)


# -- relative positions -------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.9, 1.0, 2.8])
def test_product_buckets_are_torchmils(ratio):
    from torchmil.nn import irpe

    buckets = ProductBuckets(ratio)
    offsets = torch.arange(-40, 41)
    expected = irpe.piecewise_index(
        offsets, alpha=buckets.alpha, beta=buckets.beta, gamma=buckets.gamma, dtype=torch.long
    )
    assert torch.equal(buckets.piecewise(offsets), expected)
    for side in (1, 2, 5, 9):
        ids, count, _ = irpe.get_bucket_ids_2d_without_skip(
            irpe.METHOD.PRODUCT, side, side, buckets.alpha, buckets.beta, buckets.gamma
        )
        assert count == buckets.grid_buckets
        assert torch.equal(buckets.bucket_table(side), ids)


def test_piecewise_index_by_hand_at_ratio_1_9():
    # |d| <= 1.9 exact; round(1.9 + ln(|d| / 1.9) / ln 8 * 1.9) gives 2 at 2 and 3, then 3 (beta = 3.8 clips)
    g = ProductBuckets(1.9).piecewise(torch.arange(-6, 7))
    assert g.tolist() == [-3, -3, -3, -2, -2, -1, 0, 1, 2, 2, 3, 3, 3]


def test_contextual_bias_equals_the_gather_of_its_bucket_table():
    buckets = ProductBuckets(1.9)
    side = 6
    lookup = torch.randn(2, 3, side * side, buckets.grid_buckets)
    onehot = buckets.axis_onehot(side, lookup.device, lookup.dtype)
    bias = contextual_key_bias(lookup, onehot, onehot, side)
    table = buckets.bucket_table(side)  # (L, L)
    expected = torch.gather(lookup, 3, table.expand(2, 3, -1, -1))
    assert torch.equal(bias, expected)


# -- iRPE attention -----------------------------------------------------------------------------


def torchmil_attention(ours: IRPEMultiheadSelfAttention, in_dim: int, shared: bool):
    from torchmil.nn import iRPEMultiheadSelfAttention

    from mil_train.interop.torchmil.setmil import _irpe_attention_forward

    reference = iRPEMultiheadSelfAttention(
        in_dim=in_dim, att_dim=ours.att_dim, n_heads=ours.n_heads, rpe_shared_head=shared
    ).eval()
    reference.qkv_nn.weight.data.copy_(ours.qkv.weight.data)
    reference.rpe_k.lookup_table_weight.data.copy_(ours.rpe_k_weight.data)
    reference.out_proj.load_state_dict(ours.out_proj.state_dict())  # Linear(att_dim, in_dim)
    reference.forward = _irpe_attention_forward.__get__(reference)  # heads split by view + transpose
    return reference


@pytest.mark.parametrize("shared", [True, False])
def test_irpe_attention_equals_torchmils_on_a_full_square(shared):
    torch.manual_seed(0)
    ours = IRPEMultiheadSelfAttention(in_dim=12, att_dim=16, n_heads=4, rpe_shared_head=shared).eval()
    torch.nn.init.normal_(ours.rpe_k_weight)
    reference = torchmil_attention(ours, 12, shared)
    side = 5
    X = torch.randn(2, 1 + side * side, 12)
    token_mask = torch.ones(2, 1 + side * side, dtype=torch.bool)
    with torch.no_grad():
        Y, class_weights = ours(X, token_mask, side)
        expected, att = reference(X, return_att=True)
        class_Y, class_only = ours.class_token(X, token_mask)
    torch.testing.assert_close(Y, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(class_weights, att.mean(1)[:, 0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(class_Y[:, 0], Y[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(class_only, class_weights, rtol=1e-5, atol=1e-7)


def test_irpe_attention_masks_tokens_outside_the_bags_square_as_a_dense_formula():
    torch.manual_seed(1)
    ours = IRPEMultiheadSelfAttention(in_dim=8, att_dim=8, n_heads=2).eval()
    torch.nn.init.normal_(ours.rpe_k_weight)
    side, s = 4, 3  # batch grid 4 x 4, the bag's own square 3 x 3
    token_mask = torch.cat([torch.ones(1, 1, dtype=torch.bool), cell_mask(torch.tensor([s]), side)], dim=1)
    X = torch.randn(1, 1 + side * side, 8)
    with torch.no_grad():
        Y, weights = ours(X, token_mask, side)
    # dense: the bag's own tokens on its own 3 x 3 grid, bucket ids gathered as torchmil does
    keep = token_mask[0]
    Xs = X[:, keep]  # (1, 10, 8)
    q, k, v = ours.qkv(Xs).chunk(3, dim=-1)
    split = lambda t: t.reshape(1, -1, 2, 4).transpose(1, 2)  # noqa: E731
    q, k, v = split(q) / 2.0, split(k), split(v)
    buckets = ProductBuckets(1.9)
    table = torch.full((1 + s * s, 1 + s * s), buckets.class_bucket)
    table[1:, 1:] = buckets.bucket_table(s)
    lookup = q @ ours.rpe_k_weight  # (1, 2, 10, 50)
    scores = q @ k.transpose(-1, -2) + torch.gather(lookup, 3, table.expand(1, 2, -1, -1))
    att = scores.softmax(-1)
    dense = (att @ v).transpose(1, 2).reshape(1, -1, 8)
    with torch.no_grad():
        torch.testing.assert_close(Y[:, keep], dense, rtol=1e-5, atol=1e-6)
    assert (Y[:, ~keep] == 0).all() and (weights[:, ~keep] == 0).all()
    torch.testing.assert_close(weights[:, keep], att.mean(1)[:, 0].detach(), rtol=1e-5, atol=1e-7)


def test_encoder_uses_the_relative_positions_only_from_its_second_layer():
    """The class query's bias is one bucket for all keys: one layer cannot see iRPE, two can."""
    torch.manual_seed(2)
    side = 4
    X = torch.randn(1, 1 + side * side, 16)
    token_mask = torch.ones(1, 1 + side * side, dtype=torch.bool)
    for layers, sees in ((1, False), (2, True)):
        encoder = IRPETransformerEncoder(in_dim=16, att_dim=16, n_layers=layers).eval()
        with torch.no_grad():
            before, _ = encoder(X, token_mask, side)
            for layer in encoder.layers:
                torch.nn.init.normal_(layer.attention.rpe_k_weight)
            after, _ = encoder(X, token_mask, side)
        assert (not torch.allclose(before, after, atol=1e-4)) == sees, layers


def test_unsupported_irpe_modes_say_so():
    for option in ({"rpe_method": "euc"}, {"rpe_mode": "bias"}, {"rpe_on": "qkv"}, {"rpe_skip": 0}):
        with pytest.raises(NotImplementedError, match="not implemented"):
            IRPEMultiheadSelfAttention(in_dim=8, att_dim=8, n_heads=2, **option)


# -- T2T / PMF ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,padding,dilation", [((3, 3), (1, 1), (1, 1)), ((5, 3), (2, 1), (1, 1)), ((3, 3), (2, 2), (2, 2))])
def test_unfold_grid_is_torchs_unfold(kernel, padding, dilation):
    side = 6
    grid = torch.randn(2, side * side, 3)
    image = grid.transpose(1, 2).reshape(2, 3, side, side)
    expected = torch.nn.functional.unfold(image, kernel, dilation=dilation, padding=padding).transpose(1, 2)
    assert torch.equal(unfold_grid(grid, side, kernel, padding, dilation), expected)


def test_pmf_equals_torchmils_with_the_same_weights():
    from torchmil.models.setmil import PMF

    from mil_train.interop.torchmil.setmil import T2T_RENAMES, _rename

    torch.manual_seed(3)
    reference = PMF(in_dim=8, out_dim=8, att_dim=8, n_heads=2).eval()
    ours = PyramidMultiScaleFusion(in_dim=8, out_dim=8, att_dim=8, n_heads=2).eval()
    state = {}
    for key, value in reference.state_dict().items():
        if key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            state[f"layers.{index}.{_rename(rest, T2T_RENAMES)}"] = value
        else:
            state[key] = value
    ours.load_state_dict(state)
    side = 5
    grid = torch.randn(1, side * side, 8)
    cells = torch.ones(1, side * side, dtype=torch.bool)
    with torch.no_grad():
        expected = reference(grid.transpose(1, 2).reshape(1, 8, side, side))
        torch.testing.assert_close(ours(grid, cells, side), expected, rtol=1e-5, atol=1e-6)


def test_grid_changing_unfolds_are_refused():
    with pytest.raises(NotImplementedError, match="changes the grid"):
        T2TLayer(in_dim=4, att_dim=4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
    with pytest.raises(NotImplementedError, match="changes the grid"):
        T2TLayer(in_dim=4, att_dim=4, kernel_size=(3, 3), padding=(2, 2))


# -- the model, beyond the registry's small default config ----------------------------------------

DEEP_PMF = {"in_dim": 12, "att_dim": 16, "use_pmf": True, "set_n_layers": 2, "pmf_kernel_list": [[3, 3], [5, 5]],
            "pmf_stride_list": [[1, 1], [1, 1]], "pmf_padding_list": [[1, 1], [2, 2]],
            "pmf_dilation_list": [[1, 1], [1, 1]]}


def test_torchmil_literal_forward_differs_where_its_bugs_are():
    """The adapter's corrections are real: torchmil's literal forward gives other logits."""
    from mil_train.interop.torchmil import build_reference, reference_outputs

    torch.manual_seed(4)
    reference = build_reference("SETMIL", in_dim=12, att_dim=16, set_n_layers=2)
    X = torch.randn(1, 20, 12)
    coords = grid_coords(20)[None]
    with torch.no_grad():
        literal = reference(X, coords)
    corrected, _ = reference_outputs("SETMIL", reference, X, None, coords=coords)
    assert not torch.allclose(literal, corrected[:, 0], atol=1e-4)


@pytest.mark.parametrize("config", [DEEP_PMF, {"in_dim": 12, "att_dim": 16, "rpe_shared_head": False, "set_n_layers": 3}])
def test_deeper_and_pmf_configs_match_torchmil_and_declare_their_size(config):
    from mil_train.interop.torchmil import build_reference, from_torchmil, reference_outputs

    torch.manual_seed(5)
    reference = build_reference("SETMIL", **config)
    for name, parameter in reference.named_parameters():
        if "lookup_table" in name:
            torch.nn.init.normal_(parameter)
    model = from_torchmil(reference, "SETMIL", **config)
    assert model.max_bag_size is not None and model.max_bag_size >= 1_000
    X, mask, coords = padded_batch((9, 1, 23), dim=12, fill=1e30, seed=6)
    expected_logits, expected_attention = reference_outputs("SETMIL", reference, X, mask, coords=coords)
    with torch.no_grad():
        out = model(X, mask, coords=coords)
    torch.testing.assert_close(out.logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.attention, expected_attention, rtol=1e-5, atol=1e-5)


def test_sparse_coordinates_make_empty_cells_tokens_as_torchmil():
    from mil_train.interop.torchmil import build_reference, from_torchmil, reference_outputs

    torch.manual_seed(7)
    config = {"in_dim": 12, "att_dim": 16, "set_n_layers": 2}
    reference = build_reference("SETMIL", **config)
    model = from_torchmil(reference, "SETMIL", **config)
    coords = torch.tensor([[[0, 0], [4, 1], [2, 6], [6, 6], [5, 0]]])
    X = torch.randn(1, 5, 12)
    expected_logits, expected_attention = reference_outputs("SETMIL", reference, X, None, coords=coords)
    with torch.no_grad():
        out = model(X, coords=coords)
    torch.testing.assert_close(out.logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.attention, expected_attention, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a deep export, 13 s on 2 cores
def test_deep_pmf_config_exports_and_matches_eager(tmp_path):
    from mil_export import export_onnx
    from mil_runtime.session import open_session

    torch.manual_seed(8)
    model = create_model("SETMIL", n_classes=3, **DEEP_PMF).eval()
    for layer in model.encoder.layers:
        torch.nn.init.normal_(layer.attention.rpe_k_weight)
    session = open_session(export_onnx(model, tmp_path / "setmil.onnx"), device="cpu")
    for lengths in ((5,), (7, 30, 2)):
        X, mask, coords = padded_batch(lengths, dim=12, seed=len(lengths))
        outputs = session.run({"features": X.numpy(), "mask": mask.numpy(), "coords": coords.numpy()})
        with torch.no_grad():
            out = model(X, mask, coords=coords)
        np.testing.assert_allclose(outputs["logits"], out.logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(outputs["attention"], out.attention.numpy(), rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(outputs["logits"].sum()))
