"""MultiheadSelfAttention and TransformerEncoder: hand-computed cases, torchmil parity, padding, export path."""

from __future__ import annotations

import math

import pytest
import torch

import mil_train.models  # noqa: F401  (registers models; mil_train.nn imports mil_train.models.base)
from mil_train.nn.self_attention import MultiheadSelfAttention
from mil_train.nn.transformer import TransformerEncoder, convert_torchmil_state_dict, max_bag_for_attention



def torchmil_nn():
    """torchmil is the reference extra: only the parity tests need it."""
    return pytest.importorskip("torchmil.nn")


TOL = 1e-5  # the project's torchmil rule: |a - b| <= 1e-5 + 1e-5 |b|


def assert_rule(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    excess = (actual - expected).abs() - (tol + tol * expected.abs())
    assert excess.max() <= 0, f"max |a - b| = {(actual - expected).abs().max():.3e}"


def padded(n_real: tuple[int, ...], dim: int, fill: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n_max = max(n_real)
    X = torch.randn(len(n_real), n_max, dim, generator=generator)  # (batch, bag, dim)
    mask = torch.arange(n_max)[None, :] < torch.tensor(n_real)[:, None]  # (batch, bag)
    return X.masked_fill(~mask[..., None], fill), mask


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-default LayerNorm affine and biases too, so a mis-mapped weight cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def test_single_head_attention_by_hand():
    """One head, Q = K = V = X (identity projections): Y = softmax(X X^T / sqrt(d)) X on real keys only."""
    attention = MultiheadSelfAttention(in_dim=2, out_dim=2, att_dim=2, n_heads=1)
    with torch.no_grad():
        attention.qkv.weight.copy_(torch.cat([torch.eye(2)] * 3))
    X = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # (1, 3, 2); row 2 is padding
    mask = torch.tensor([[True, True, False]])
    Y = attention(X, mask)
    # row 0: scores [1, 0] / sqrt 2 ; row 1: scores [0, 4] / sqrt 2
    w0 = torch.softmax(torch.tensor([1.0, 0.0]) / math.sqrt(2), 0)
    w1 = torch.softmax(torch.tensor([0.0, 4.0]) / math.sqrt(2), 0)
    real = X[0, :2]
    expected = torch.stack([w0 @ real, w1 @ real, torch.zeros(2)])
    torch.testing.assert_close(Y[0], expected)
    weights = attention.attention_weights(X, mask)[0, 0]  # (3, 3)
    torch.testing.assert_close(weights, torch.stack([torch.cat([w0, torch.zeros(1)]),
                                                     torch.cat([w1, torch.zeros(1)]), torch.zeros(3)]))


@pytest.mark.parametrize("out_dim", [None, 24])
def test_self_attention_matches_torchmil(out_dim):
    reference = torchmil_nn().MultiheadSelfAttention(in_dim=12, out_dim=out_dim, att_dim=16, n_heads=4).eval()
    randomise(reference)
    ours = MultiheadSelfAttention(in_dim=12, out_dim=out_dim, att_dim=16, n_heads=4).eval()
    state = {("qkv.weight" if k == "qkv_nn.weight" else k): v for k, v in reference.state_dict().items()}
    ours.load_state_dict(state)
    X, mask = padded((9, 5), 12, fill=0.0)
    with torch.no_grad():
        assert_rule(ours(X[:1]), reference(X[:1]))
        expected = reference(X, mask)
        got = ours(X, mask)
    assert_rule(got[mask], expected[mask])


ENCODER_CASES = [
    dict(in_dim=16, att_dim=16, n_heads=4, n_layers=1, add_self=True),
    dict(in_dim=16, att_dim=16, n_heads=2, n_layers=3, add_self=True),
    dict(in_dim=12, att_dim=32, out_dim=32, n_heads=4, n_layers=1, add_self=False),
    dict(in_dim=12, att_dim=32, out_dim=32, n_heads=4, n_layers=2, add_self=False, use_mlp=False),
    dict(in_dim=12, att_dim=32, out_dim=8, n_heads=8, n_layers=3, add_self=False),
]


def encoder_pair(case: dict) -> tuple[torch.nn.Module, TransformerEncoder]:
    reference = torchmil_nn().TransformerEncoder(**case).eval()
    randomise(reference)
    ours = TransformerEncoder(**case).eval()
    ours.load_state_dict(convert_torchmil_state_dict(reference.state_dict()))
    return reference, ours


@pytest.mark.parametrize("case", ENCODER_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_encoder_matches_torchmil(case):
    reference, ours = encoder_pair(case)
    X, mask = padded((13, 6, 1), case["in_dim"], fill=0.0, seed=1)
    with torch.no_grad():
        for n in (1, 7, 13):
            assert_rule(ours(X[:1, :n]), reference(X[:1, :n]))
        # padded batch: torchmil's real rows are right when the padding is finite
        assert_rule(ours(X, mask)[mask], reference(X, mask)[mask])


@pytest.mark.parametrize("fill", [1e30, float("nan"), float("inf")])
def test_padding_never_reaches_real_instances(fill):
    _, ours = encoder_pair(ENCODER_CASES[3])
    X, mask = padded((11, 4, 7), 12, fill=fill, seed=2)
    with torch.no_grad():
        batched = ours(X, mask)
        assert torch.isfinite(batched).all()
        assert (batched[~mask] == 0).all()
        for i, n in enumerate((11, 4, 7)):
            alone = ours(X[i : i + 1, :n])
            assert_rule(batched[i, :n], alone[0], tol=1e-6)


def test_torchmil_encoder_turns_nan_padding_into_nan_real_rows():
    """Recorded torchmil behaviour: a 0 attention weight times a NaN padded value is NaN."""
    reference, ours = encoder_pair(ENCODER_CASES[0])
    X, mask = padded((6, 3), 16, fill=float("nan"), seed=3)
    with torch.no_grad():
        assert torch.isnan(reference(X, mask)[1, :3]).any()
        assert torch.isfinite(ours(X, mask)[mask]).all()


def keys_first_padded(batch: int, bag: int, n_real: int) -> torch.Tensor:
    """(batch, bag) mask whose real instances are the last n_real: padding fills the first key blocks."""
    return (torch.arange(bag) >= bag - n_real)[None, :].expand(batch, bag).clone()


@pytest.mark.parametrize("fill", [0.0, 1e30, float("nan")])
def test_fused_form_equals_the_eager_one(fill):
    """The key-bias-column attention that the export emits, stated in eager, gives what SDPA gives."""
    attention = MultiheadSelfAttention(in_dim=12, out_dim=12, att_dim=16, n_heads=4).eval()
    randomise(attention, seed=4)
    features, mask = padded((9, 5, 2), 12, fill=0.0, seed=4)
    for mask_case in (mask, keys_first_padded(3, 9, 4)):
        X = features.masked_fill(~mask_case[..., None], fill)  # (batch, bag, in_dim)
        with torch.no_grad():
            real = X.masked_fill(~mask_case[..., None], 0.0)  # what forward hands the attention
            q, k, v = attention.qkv(real).chunk(3, dim=-1)  # 3 x (batch, bag, att_dim)
            eager = torch.nn.functional.scaled_dot_product_attention(
                *(attention._split_heads(t) for t in (q, k, v)), attn_mask=mask_case[:, None, None, :]
            ).transpose(1, 2).reshape(3, 9, 16)
            fused = attention.fused_reference(q, k, v, mask_case)
        torch.testing.assert_close(fused[mask_case], eager[mask_case], atol=1e-6, rtol=1e-5)


def export_attention_to_onnx(attention: MultiheadSelfAttention, path) -> None:
    """torch.export with dynamic batch/bag, then torch.onnx, as mil_export does."""
    from torch.export import Dim

    batch, bag = Dim("batch"), Dim("bag")
    X, mask = padded((8, 5, 3), attention.qkv.in_features, fill=0.0)
    program = torch.export.export(
        attention, (X, mask), dynamic_shapes={"X": {0: batch, 1: bag}, "mask": {0: batch, 1: bag}}
    )
    torch.onnx.export(program, (X, mask), dynamo=True, optimize=False).save(str(path))


def test_exported_attention_is_one_fused_node_and_matches_eager(tmp_path):
    """onnxruntime's MultiHeadAttention (tiled CPU path, no mask input) = eager SDPA with the key mask.

    Bag sizes 1, 2, 13, 49 and 1,500 (several of the kernel's key blocks at head_dim 64), 1e30 in padded
    rows, and a mask whose first 1,300 keys are padding (whole key blocks with no real key).
    """
    ort = pytest.importorskip("onnxruntime")
    import onnx

    attention = MultiheadSelfAttention(in_dim=16, out_dim=16, att_dim=128, n_heads=2).eval()
    randomise(attention, seed=6)
    path = tmp_path / "attention.onnx"
    export_attention_to_onnx(attention, path)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cases = [padded((n, max(1, n // 3), 1), 16, fill=1e30, seed=n) for n in (1, 2, 13, 49, 1500)]
    X, _ = padded((1500,) * 2, 16, fill=0.0, seed=7)
    cases.append((X, keys_first_padded(2, 1500, 200)))
    names = [i.name for i in session.get_inputs()]
    for X, mask in cases:
        (got,) = session.run(None, dict(zip(names, (X.numpy(), mask.numpy()))))
        with torch.no_grad():
            expected = attention(X, mask)
        assert_rule(torch.from_numpy(got), expected, tol=1e-5)


def test_eval_ignores_dropout_where_torchmil_does_not():
    ours = MultiheadSelfAttention(in_dim=8, out_dim=8, att_dim=8, n_heads=2, dropout=0.5).eval()
    reference = torchmil_nn().MultiheadSelfAttention(in_dim=8, out_dim=8, att_dim=8, n_heads=2, dropout=0.5).eval()
    X = torch.randn(1, 50, 8)
    with torch.no_grad():
        assert torch.equal(ours(X), ours(X))
        # torchmil hands its dropout rate to scaled_dot_product_attention in eval mode too
        assert not torch.equal(reference(X), reference(X))


def test_torchmil_return_att_path_inverts_the_mask():
    """Recorded torchmil bug: with return_att=True its mask removes the real pairs instead of the padding."""
    reference = torchmil_nn().MultiheadSelfAttention(in_dim=8, out_dim=8, att_dim=8, n_heads=2).eval()
    X, mask = padded((6, 3), 8, fill=0.0, seed=5)
    with torch.no_grad():
        plain = reference(X, mask)
        with_att, _ = reference(X, mask, return_att=True)
    assert (plain[1, :3] - with_att[1, :3]).abs().max() > 1e-2
    assert torch.isnan(with_att[0]).all()  # an all-real bag: every pair masked


def test_add_self_needs_matching_widths():
    with pytest.raises(ValueError, match="add_self"):
        TransformerEncoder(in_dim=16, att_dim=32, n_layers=2, add_self=True)
    with pytest.raises(ValueError, match="add_self"):
        TransformerEncoder(in_dim=16, out_dim=8, add_self=True)
    TransformerEncoder(in_dim=16, att_dim=32, n_layers=1, add_self=True)  # one layer: att_dim is free


def test_unknown_torchmil_key_is_refused():
    with pytest.raises(KeyError, match="unexpected"):
        convert_torchmil_state_dict({"layers.0.something.weight": torch.zeros(1)})


def test_max_bag_for_attention_is_the_largest_fitting_bag():
    budget = 4 * 2**30
    for heads, extra in [(8, 0), (4, 1), (4, 0)]:
        n = max_bag_for_attention(heads, extra_tokens=extra)
        assert heads * (n + extra) ** 2 * 4 <= budget < heads * (n + extra + 1) ** 2 * 4
    assert max_bag_for_attention(8) == 11_585
    assert max_bag_for_attention(4, extra_tokens=1) == 16_383
