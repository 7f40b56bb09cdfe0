"""mil_train.nn.nystrom_attention against torchmil 1.0.2's NystromAttention / NystromTransformerLayer
(same weights, one bag per call, unmasked as TransMIL and CAMIL call it), a dense pseudo-inverse,
and its own invariants: a bag alone equals the bag padded in a batch, real tokens need not be a
prefix, and no exported tensor has two token axes."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch

from mil_train.nn.nystrom_attention import (
    NystromAttention,
    NystromTransformerLayer,
    convert_torchmil_layer_state_dict,
    landmark_groups,
    newton_schulz_pinv,
)

TOL = 1e-5
HUGE = 1e30

LAYER_CONFIGS = [
    dict(in_dim=16, att_dim=16, n_heads=4, n_landmarks=8),
    dict(in_dim=12, att_dim=16, out_dim=8, n_heads=2, n_landmarks=5, use_mlp=True),
    dict(in_dim=16, att_dim=8, n_heads=4, n_landmarks=4, learn_weights=False),
    dict(in_dim=32, n_heads=8, n_landmarks=16),  # torchmil's defaults apart from the widths
]
# fewer tokens than landmarks, exact multiples (no front padding), one past a multiple, several runs
SIZES = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 40, 129)


def close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=TOL, rtol=TOL, msg=what)


def pair(config: dict, seed: int = 0):
    from torchmil.nn import NystromTransformerLayer as TorchmilLayer

    torch.manual_seed(seed)
    reference = TorchmilLayer(**config).eval()
    ours = NystromTransformerLayer(**config).eval()
    ours.load_state_dict(convert_torchmil_layer_state_dict(reference.state_dict()))
    return reference, ours


@pytest.mark.parametrize("config", LAYER_CONFIGS)
def test_layer_and_attention_match_torchmil(config):
    reference, ours = pair(config)
    for n in SIZES:
        X = torch.randn(1, n, config["in_dim"], generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            expected, expected_att = reference(X, return_att=True)  # (1, n, out), (1, heads, n, n)
            actual, first_row = ours(X, return_first_row=True)
            att = ours.attention.attention_matrix(ours.attention_norm(X))
        close(actual, expected, f"layer output at {n}")
        close(att, expected_att, f"attention matrix at {n}")
        close(first_row, expected_att[:, :, 0], f"first attention row at {n}")


def test_torchmil_masked_path_is_not_what_we_follow():
    """torchmil with an all-True mask excludes its front padding from the landmarks; its unmasked call
    (the one TransMIL and CAMIL make) does not. Ours with a mask follows the unmasked call."""
    reference, ours = pair(LAYER_CONFIGS[0])
    X = torch.randn(1, 13, 16)
    with torch.no_grad():
        unmasked = reference(X)
        masked = reference(X, mask=torch.ones(1, 13, dtype=torch.bool))
        actual = ours(X, torch.ones(1, 13, dtype=torch.bool))
    close(actual, unmasked, "ours vs torchmil unmasked")
    assert (masked - unmasked).abs().max() > 1e-4


@pytest.mark.parametrize("config", LAYER_CONFIGS[:2])
def test_bag_alone_equals_bag_padded_with_huge_values(config):
    _, ours = pair(config)
    sizes = (6, 1, 17, 9)
    bags = [torch.randn(n, config["in_dim"], generator=torch.Generator().manual_seed(n)) for n in sizes]
    X = torch.full((len(bags), 20, config["in_dim"]), HUGE)
    mask = torch.zeros(len(bags), 20, dtype=torch.bool)
    for i, bag in enumerate(bags):
        X[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    with torch.no_grad():
        batched, rows = ours(X, mask, return_first_row=True)
        for i, bag in enumerate(bags):
            alone, row = ours(bag[None], return_first_row=True)
            n = len(bag)
            close(batched[i, :n], alone[0], f"bag {i} padded vs alone")
            close(rows[i, :, :n], row[0], f"bag {i} first row padded vs alone")
            assert (batched[i, n:] == 0).all() and (rows[i, :, n:] == 0).all()


def test_real_tokens_need_not_be_a_prefix():
    _, ours = pair(LAYER_CONFIGS[0])
    bag = torch.randn(11, 16)
    where = torch.tensor([0, 2, 3, 5, 8, 9, 10, 13, 14, 17, 19])
    X = torch.full((1, 20, 16), HUGE)
    X[0, where] = bag
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, where] = True
    with torch.no_grad():
        scattered = ours(X, mask)
        alone = ours(bag[None])
    close(scattered[0, where], alone[0], "scattered tokens vs compact bag")


def test_landmark_groups_follow_torchmil_front_padding():
    """n = 13, m = 4: P = 3 zero rows in front, runs of lm = 4; real token t sits at t + 3."""
    mask = torch.ones(1, 13, dtype=torch.bool)
    groups, run, front = landmark_groups(mask, 4)
    assert run.item() == 4 and front.item() == 3
    expected = torch.tensor([(t + 3) // 4 for t in range(13)])
    assert torch.equal(groups[0].argmax(dim=1), expected) and torch.equal(groups[0].sum(dim=1), torch.ones(13))
    groups, run, front = landmark_groups(torch.ones(1, 3, dtype=torch.bool), 8)  # fewer tokens than landmarks
    assert run.item() == 1 and front.item() == 5
    assert torch.equal(groups[0].argmax(dim=1), torch.tensor([5, 6, 7]))


def test_newton_schulz_converges_to_the_pseudo_inverse():
    torch.manual_seed(0)
    A = torch.softmax(torch.randn(2, 3, 6, 6), dim=-1).double()
    Z = newton_schulz_pinv(A, iterations=40)
    torch.testing.assert_close(Z, torch.linalg.pinv(A), atol=1e-8, rtol=1e-6)


def test_pinv_start_is_per_bag():
    """torchmil scales the start by maxima over the whole batch; ours per bag, so a bag's result does not
    depend on its batch-mates, and for a batch of one both are torchmil's."""
    from torchmil.nn.attention.nystrom_attention import moore_penrose_iter_pinv

    torch.manual_seed(1)
    A = torch.softmax(torch.randn(2, 4, 5, 5) * torch.tensor([1.0, 6.0])[:, None, None, None], dim=-1)
    for b in range(2):
        close(newton_schulz_pinv(A)[b], moore_penrose_iter_pinv(A[b : b + 1])[0], f"bag {b}")
        close(newton_schulz_pinv(A)[b], newton_schulz_pinv(A[b : b + 1])[0], f"bag {b} in batch")


def test_exported_layer_has_no_tensor_with_two_token_axes(tmp_path):
    """A1 is (batch, heads, tokens, m) and A3 (batch, heads, m, tokens): linear in the bag."""

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = NystromTransformerLayer(in_dim=16, att_dim=16, n_heads=4, n_landmarks=8, use_mlp=True)

        def forward(self, X, mask):
            return self.layer(X, mask, return_first_row=True)

    model = Wrapper().eval()
    X, mask = torch.randn(3, 12, 16), torch.ones(3, 12, dtype=torch.bool)
    mask[1, 9:] = False
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    program = torch.export.export(
        model, (X, mask), dynamic_shapes={"X": {0: batch, 1: tokens}, "mask": {0: batch, 1: tokens}}, strict=False
    )
    proto = torch.onnx.export(program, (X, mask), dynamo=True, optimize=False).model_proto
    token_symbol = proto.graph.input[0].type.tensor_type.shape.dim[1].dim_param
    assert token_symbol
    inferred = onnx.shape_inference.infer_shapes(proto)
    counts = collections.Counter()
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_param for d in value.type.tensor_type.shape.dim]
        counts[sum(1 for d in dims if token_symbol in d)] += 1
    assert counts[1] > 20, f"shape inference found too few token-axis tensors: {dict(counts)}"
    assert max(counts) == 1, f"tensors with two token axes: {dict(counts)}"

    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 8, 33):
        X, mask = torch.randn(2, n, 16), torch.ones(2, n, dtype=torch.bool)
        mask[0, n // 2 + 1 :] = False
        Y, row = session.run(None, {"x": X.numpy(), "mask": mask.numpy()})
        with torch.no_grad():
            eager_Y, eager_row = model(X, mask)
        torch.testing.assert_close(torch.from_numpy(Y), eager_Y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(row), eager_row, atol=1e-4, rtol=1e-4)


def test_attention_module_defaults_follow_torchmil():
    attention = NystromAttention(in_dim=32)
    assert attention.att_dim == 512 and attention.n_heads == 4 and attention.n_landmarks == 256
    assert attention.pinv_iterations == 6 and isinstance(attention.out_proj, torch.nn.Linear)
    layer = NystromTransformerLayer(in_dim=512)
    assert layer.mlp is None and isinstance(layer.skip_proj, torch.nn.Identity)
