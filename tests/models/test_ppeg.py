"""mil_train.nn.ppeg against torchmil 1.0.2's PPEG (same weights, one bag per call), a hand-computed
grid, and its own invariants (each bag of a batch on its own grid, exact integer sides); then the
squared sequence TransMIL builds around it: every layer's class-token row against torchmil's."""

from __future__ import annotations

import math

import pytest
import torch

from mil_train.nn.ppeg import PPEG, canvas_side, grid_side

TOL = 1e-5


def close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=TOL, rtol=TOL, msg=what)


def pair(dim: int, seed: int = 0):
    from torchmil.models.transmil import PPEG as TorchmilPPEG

    torch.manual_seed(seed)
    reference = TorchmilPPEG(dim).eval()
    ours = PPEG(dim).eval()
    ours.load_state_dict(reference.state_dict())  # same keys: proj, proj1, proj2
    return reference, ours


def on_canvas(tokens: list[torch.Tensor], canvas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of side_b^2 tokens -> (batch, canvas^2, dim) padded with garbage, and the sides."""
    dim = tokens[0].shape[1]
    X = torch.full((len(tokens), canvas * canvas, dim), 7.0)
    for b, t in enumerate(tokens):
        X[b, : len(t)] = t
    side = torch.tensor([math.isqrt(len(t)) for t in tokens])
    return X, side


@pytest.mark.parametrize("side", [1, 2, 3, 4, 7, 10])
def test_matches_torchmil_on_one_bag(side):
    reference, ours = pair(8)
    tokens = torch.randn(1, side * side, 8, generator=torch.Generator().manual_seed(side))
    cls = torch.randn(1, 1, 8)
    with torch.no_grad():
        expected = reference(torch.cat([cls, tokens], dim=1), side, side)[:, 1:]  # torchmil keeps the class token
        for canvas in (side, side + 3):  # the bag's own grid, and inside a larger canvas
            X, sides = on_canvas([tokens[0]], canvas)
            actual = ours(X, sides, canvas)
            close(actual[:, : side * side], expected, f"side {side} on canvas {canvas}")
            assert (actual[:, side * side :] == 0).all()


def test_the_merged_kernel_gives_torchmils_gradients_to_each_of_the_three_kernels():
    reference, ours = pair(8, seed=3)
    side = 5
    tokens = torch.randn(1, side * side, 8, requires_grad=True)
    cls = torch.zeros(1, 1, 8)
    expected = reference(torch.cat([cls, tokens], dim=1), side, side)[:, 1:]
    got = ours(tokens, torch.tensor([side]), side)
    weights = torch.randn_like(expected)
    grads_ref = torch.autograd.grad((expected * weights).sum(), [tokens, *reference.parameters()])
    grads_ours = torch.autograd.grad((got * weights).sum(), [tokens, *ours.parameters()])
    for ref_grad, our_grad in zip(grads_ref, grads_ours):
        close(our_grad, ref_grad, "gradient")


def test_under_cpu_bf16_autocast_the_convolution_runs_in_float32():
    reference, ours = pair(8, seed=4)
    side = 6
    tokens = torch.randn(1, side * side, 8)
    expected = ours(tokens, torch.tensor([side]), side)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(tokens.bfloat16(), torch.tensor([side]), side)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)  # only the bf16 rounding of the tokens


def test_each_bag_of_a_batch_is_on_its_own_grid():
    _, ours = pair(6)
    sides = (5, 1, 3, 8)
    tokens = [torch.randn(s * s, 6, generator=torch.Generator().manual_seed(s)) for s in sides]
    X, side = on_canvas(tokens, 9)
    with torch.no_grad():
        batched = ours(X, side, 9)
        for b, t in enumerate(tokens):
            alone = ours(*on_canvas([t], sides[b]), sides[b])
            close(batched[b, : len(t)], alone[0], f"bag {b}")


def test_hand_computed_grid():
    """dim 1, proj = a 7 x 7 kernel of ones, the others 0, no bias: on a 2 x 2 grid every cell gets
    itself plus the sum of the grid; on 3 x 3 the window covers the whole grid too."""
    ours = PPEG(1)
    with torch.no_grad():
        for conv in (ours.proj, ours.proj1, ours.proj2):
            conv.weight.zero_()
            conv.bias.zero_()
        ours.proj.weight.fill_(1.0)
        x = torch.tensor([1.0, 2.0, 3.0, 4.0])
        y = ours(x[None, :, None], torch.tensor([2]), 2)[0, :, 0]
        assert torch.equal(y, x + 10.0)
        ours.proj.weight.zero_()
        ours.proj2.weight[0, 0, 1, 1] = 2.0  # centre tap of the 3 x 3: y = x + 2 x
        ours.proj2.weight[0, 0, 0, 1] = 1.0  # the cell above: y(r, c) += x(r - 1, c), 0 on row 0
        x = torch.arange(9.0)
        y = ours(x[None, :, None], torch.tensor([3]), 3)[0, :, 0]
        above = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
        assert torch.equal(y, 3 * x + above)


def test_grid_side_is_exact():
    n = torch.arange(0, 20_001)
    expected = torch.tensor([math.isqrt(k - 1) + 1 if k > 0 else 0 for k in range(20_001)])
    assert torch.equal(grid_side(n), expected)
    for root in (46_340, 3_037_000_499 // 4, 2**26):
        big = torch.tensor([root * root - 1, root * root, root * root + 1])
        assert grid_side(big).tolist() == [root, root, root + 1]


def test_canvas_side_holds_the_bag_axis():
    for bag in (1, 2, 4, 5, 49, 50, 20_000):
        G = canvas_side(torch.ones(2, bag, dtype=torch.bool))
        assert G * G >= bag and (G - 1) ** 2 < bag


# -- the squared sequence TransMIL builds around PPEG ---------------------------------------------


CONFIGS = [
    dict(in_dim=32, att_dim=32, n_heads=4, n_landmarks=10),
    dict(in_dim=24, att_dim=16, n_heads=2, n_landmarks=5, n_layers=3, use_mlp=True),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_transmil_rows_and_logits_match_torchmil(config):
    """Every layer's class-token row against torchmil's own layers; the last is torchmil's return_att."""
    from mil_train.interop.torchmil import build_reference, from_torchmil
    from mil_train.interop.torchmil.transmil import first_layer_row

    torch.manual_seed(0)
    reference = build_reference("TransMIL", **config)
    model = from_torchmil(reference, "TransMIL", **config)
    for n in (1, 2, 4, 5, 8, 9, 10, 17, 40, 49, 50, 101):
        X = torch.randn(1, n, config["in_dim"], generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            logits, last_row = reference(X, return_att=True)  # (1,), (1, n)
            rows = model.class_token_rows(X)
            out = model(X)
            first_row = first_layer_row(reference, X)
        close(out.logits[:, 0], logits, f"logits at {n}")
        close(rows[-1], last_row, f"last layer's class row (torchmil return_att) at {n}")
        close(rows[0], first_row, f"first layer's class row at {n}")
        assert len(rows) == config.get("n_layers", 2)


def test_transmil_rows_are_padding_invariant():
    from mil_train.models import create_model

    torch.manual_seed(0)
    model = create_model("TransMIL", **CONFIGS[1]).eval()
    sizes = (5, 1, 26, 17)
    bags = [torch.randn(n, 24, generator=torch.Generator().manual_seed(n)) for n in sizes]
    X = torch.full((4, 30, 24), 1e30)
    mask = torch.zeros(4, 30, dtype=torch.bool)
    for b, bag in enumerate(bags):
        X[b, : len(bag)] = bag
        mask[b, : len(bag)] = True
    with torch.no_grad():
        batched = model.class_token_rows(X, mask)
        for b, bag in enumerate(bags):
            alone = model.class_token_rows(bag[None])
            for layer, (row_b, row_alone) in enumerate(zip(batched, alone)):
                close(row_b[b, : len(bag)], row_alone[0], f"bag {b} layer {layer}")
                assert (row_b[b, len(bag):] == 0).all()


def test_transmil_needs_two_layers():
    from mil_train.models import create_model

    with pytest.raises(ValueError, match="n_layers >= 2"):
        create_model("TransMIL", in_dim=8, n_layers=1)
