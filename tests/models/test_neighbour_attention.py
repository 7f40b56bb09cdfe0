"""NeighbourAttention (CAMIL's neighbour-constrained self-attention over edges) against a dense
hand-written formula, a hand-computed tiny case and torchmil's CAMILSelfAttention with the same weights.

Tolerance: |a - b| <= 1e-5 + 1e-5 |b| (DESIGN section 7).
"""

from __future__ import annotations

import math

import pytest
import torch

from mil_train.data.graphs import batch_graph
from mil_train.nn.neighbour_attention import NeighbourAttention

TOL = 1e-5


def close(actual, expected, tol=TOL):
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{actual.shape} != {expected.shape}"
    excess = (actual - expected).abs() - (tol + tol * expected.abs())
    assert excess.max() <= 0, f"max |a - b| = {(actual - expected).abs().max():.3e}"


def dense_adjacency(edge_index, edge_weight, n_bags: int, n: int) -> torch.Tensor:
    """(batch, bag, bag) adjacency from a flattened edge list; duplicate edges add up."""
    flat = torch.zeros(n_bags * n * n_bags * n, dtype=torch.float64)
    flat.scatter_add_(0, edge_index[0] * (n_bags * n) + edge_index[1], edge_weight.double())
    flat = flat.reshape(n_bags * n, n_bags * n)
    return torch.stack([flat[b * n:(b + 1) * n, b * n:(b + 1) * n] for b in range(n_bags)])


def dense_reference(layer: NeighbourAttention, X, adj, mask):
    """The formula written out densely in float64: s = (q k^T * adj * mask_i mask_j).sum(-1) / sqrt(d),
    alpha = softmax of s over the real instances, L = alpha * v."""
    W = layer.qk.weight.double()
    d = layer.att_dim
    X = X.double().masked_fill(~mask[..., None], 0.0)
    q, k = X @ W[:d].T, X @ W[d:].T  # (batch, bag, d)
    v = X @ layer.v.weight.double().T  # (batch, bag, in_dim)
    pair = (mask[:, :, None] & mask[:, None, :]).double()  # (batch, bag, bag)
    s = ((q @ k.transpose(1, 2)) * adj * pair).sum(-1) / math.sqrt(d)  # (batch, bag)
    s = s.masked_fill(~mask, float("-inf"))
    alpha = torch.softmax(s, dim=1)
    return alpha[..., None] * v, alpha


def random_graph(lengths, n_max, n_edges_per_node, generator):
    """Random directed edges (duplicates and self loops allowed) inside each bag, flattened node space."""
    src, dst = [], []
    for b, n in enumerate(lengths):
        m = n * n_edges_per_node
        src.append(torch.randint(0, n, (m,), generator=generator) + b * n_max)
        dst.append(torch.randint(0, n, (m,), generator=generator) + b * n_max)
    edge_index = torch.stack([torch.cat(src), torch.cat(dst)])
    edge_weight = torch.rand(edge_index.shape[1], generator=generator) + 0.1
    return edge_index, edge_weight


def padded(bags, fill=0.0):
    n_max = max(len(b) for b in bags)
    X = torch.full((len(bags), n_max, bags[0].shape[1]), fill)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, bag in enumerate(bags):
        X[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return X, mask


@pytest.mark.parametrize("lengths", [(1,), (5,), (9, 3, 1), (17, 30)])
def test_matches_the_dense_formula_on_random_graphs(lengths):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(sum(lengths))
    layer = NeighbourAttention(in_dim=6, att_dim=4)
    X, mask = padded([torch.randn(n, 6, generator=generator) for n in lengths])
    edge_index, edge_weight = random_graph(lengths, X.shape[1], 3, generator)
    adj = dense_adjacency(edge_index, edge_weight, len(lengths), X.shape[1])
    with torch.no_grad():
        L, alpha = layer(X, edge_index, edge_weight, mask)
    L_ref, alpha_ref = dense_reference(layer, X, adj, mask)
    close(alpha, alpha_ref)
    close(L, L_ref)
    assert (alpha[~mask] == 0).all() and (L[~mask] == 0).all()
    close(alpha.sum(dim=1), torch.ones(len(lengths)))


def test_grid_graph_matches_the_dense_formula():
    torch.manual_seed(1)
    layer = NeighbourAttention(in_dim=8, att_dim=8)
    index = torch.arange(20)
    coords = torch.stack([index // 5, index % 5], dim=1)[None]  # (1, 20, 2)
    edge_index, edge_weight = batch_graph(coords, None, "grid8", lone_self_loop=True)
    X = torch.randn(1, 20, 8)
    mask = torch.ones(1, 20, dtype=torch.bool)
    with torch.no_grad():
        L, alpha = layer(X, edge_index, edge_weight, mask)
    L_ref, alpha_ref = dense_reference(layer, X, dense_adjacency(edge_index, edge_weight, 1, 20), mask)
    close(L, L_ref)
    close(alpha, alpha_ref)


def test_hand_computed_two_node_case():
    """Two instances, one edge 0 -> 1 of weight 2, identity-like projections: worked out by hand."""
    layer = NeighbourAttention(in_dim=2, att_dim=2)
    with torch.no_grad():
        layer.qk.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))  # q = k = x
        layer.v.weight.copy_(torch.eye(2))
    X = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    edge_index = torch.tensor([[0], [1]])
    edge_weight = torch.tensor([2.0])
    with torch.no_grad():
        L, alpha = layer(X, edge_index, edge_weight)
    s0 = 2.0 * (1 * 3 + 2 * 4) / math.sqrt(2)  # node 0 sees node 1; node 1 has no edge: s1 = 0
    a0 = math.exp(s0) / (math.exp(s0) + 1.0)
    close(alpha, torch.tensor([[a0, 1 - a0]]))
    close(L, torch.tensor([[[a0 * 1, a0 * 2], [(1 - a0) * 3, (1 - a0) * 4]]]))


def test_no_edges_gives_uniform_weights():
    layer = NeighbourAttention(in_dim=4, att_dim=4)
    X = torch.randn(1, 6, 4)
    with torch.no_grad():
        _, alpha = layer(X, torch.zeros(2, 0, dtype=torch.long), torch.zeros(0))
    close(alpha, torch.full((1, 6), 1 / 6))


def test_padding_with_huge_values_and_edges_to_padding_do_not_reach_real_instances():
    torch.manual_seed(2)
    generator = torch.Generator().manual_seed(3)
    layer = NeighbourAttention(in_dim=5, att_dim=4)
    bags = [torch.randn(n, 5, generator=generator) for n in (7, 3)]
    X, mask = padded(bags, fill=1e30)
    edge_index, edge_weight = random_graph((7, 3), 7, 3, generator)
    # an edge from a real node of bag 1 into its padding, which torchmil's adj * mask drops
    edge_index = torch.cat([edge_index, torch.tensor([[7], [12]])], dim=1)
    edge_weight = torch.cat([edge_weight, torch.tensor([5.0])])
    with torch.no_grad():
        L, alpha = layer(X, edge_index, edge_weight, mask)
        for b, bag in enumerate(bags):
            n = len(bag)
            keep = (edge_index[0] // 7 == b) & (edge_index[1] % 7 < n) & (edge_index[0] % 7 < n)
            own = edge_index[:, keep] - b * 7
            L_alone, alpha_alone = layer(bag[None], own, edge_weight[keep])
            close(alpha[b, :n], alpha_alone[0])
            close(L[b, :n], L_alone[0])
    assert torch.isfinite(L).all() and (alpha[~mask] == 0).all()


def torchmil_layer(layer: NeighbourAttention):
    from torchmil.models.camil import CAMILSelfAttention

    reference = CAMILSelfAttention(in_dim=layer.v.in_features, att_dim=layer.att_dim)
    reference.qk_nn.weight.data.copy_(layer.qk.weight.data)
    reference.v_nn.weight.data.copy_(layer.v.weight.data)
    return reference.eval()


@pytest.mark.parametrize("n", [1, 7, 60])
def test_matches_torchmils_camil_self_attention(n):
    """One unpadded bag, torchmil's own layer with the same weights and its sparse COO adjacency."""
    torch.manual_seed(4)
    generator = torch.Generator().manual_seed(n)
    layer = NeighbourAttention(in_dim=16, att_dim=8)
    index = torch.arange(n)
    coords = torch.stack([index // 8, index % 8], dim=1)[None]  # (1, n, 2)
    edge_index, edge_weight = batch_graph(coords, None, "grid8", lone_self_loop=True)
    X = torch.randn(1, n, 16, generator=generator)
    adj = dense_adjacency(edge_index, edge_weight, 1, n).float().to_sparse()  # (1, bag, bag) sparse COO
    with torch.no_grad():
        expected = torchmil_layer(layer)(X, adj, None)
        L, _ = layer(X, edge_index, edge_weight)
    close(L, expected)


def test_matches_torchmils_camil_self_attention_in_float64():
    """The same in float64 with a tight tolerance: L = alpha v shrinks like 1 / N (the softmax runs over
    the bag), so the float32 rule alone would let a wrong graph pass at large bags."""
    torch.manual_seed(5)
    n = 200
    layer = NeighbourAttention(in_dim=16, att_dim=8).double()
    index = torch.arange(n)
    coords = torch.stack([index // 15, index % 15], dim=1)[None]  # (1, n, 2)
    edge_index, edge_weight = batch_graph(coords, None, "grid8", lone_self_loop=True)
    X = torch.randn(1, n, 16, dtype=torch.float64)
    adj = dense_adjacency(edge_index, edge_weight, 1, n).to_sparse()  # (1, bag, bag) float64
    with torch.no_grad():
        expected = torchmil_layer(layer.float()).double()(X, adj, None)
        L, _ = layer.double()(X, edge_index, edge_weight.double())
    close(L, expected, tol=1e-12)


@pytest.mark.parametrize("n", [7, 300])
def test_camil_matches_torchmil_in_float64_and_its_graph_matters(n):
    """The whole model against torchmil's CAMIL in float64 on a grid bag, and the same model without
    edges differs by far more than the tolerance, so this parity does see the neighbour branch (in
    float32 at 2,500 instances the graph moves the logit by ~4e-7, under the 1e-5 rule)."""
    from mil_train.interop.torchmil import build_reference, from_torchmil, reference_outputs

    config = dict(in_dim=12, n_classes=1, nystrom_att_dim=16, pool_att_dim=8, n_landmarks=8, gated_pool=True)
    torch.manual_seed(6)
    reference = build_reference("CAMIL", **config).double()
    model = from_torchmil(reference, "CAMIL", **config).double()
    index = torch.arange(n)
    coords = torch.stack([index // 17, index % 17], dim=1)[None]  # (1, n, 2)
    edge_index, edge_weight = batch_graph(coords, None, "grid8", lone_self_loop=True)
    edge_weight = edge_weight.double()
    X = torch.randn(1, n, 12, dtype=torch.float64)
    ref_logits, ref_attention = reference_outputs("CAMIL", reference, X, None, edge_index=edge_index,
                                                  edge_weight=edge_weight)
    with torch.no_grad():
        out = model(X, edge_index=edge_index, edge_weight=edge_weight)
        without = model(X, edge_index=edge_index[:, :0], edge_weight=edge_weight[:0])
    close(out.logits, ref_logits, tol=1e-10)
    close(out.attention, ref_attention, tol=1e-10)
    assert (out.logits - without.logits).abs().max() > 1e-7
