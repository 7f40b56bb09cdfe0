"""Edge-list min-cut pooling against torchmil 1.0.2's `dense_mincut_pool` with the dense adjacency.

Small random graphs (directed and symmetric, weighted, with self loops), batches with padding, and
temperatures other than 1: pooled features, pooled adjacency and both losses must agree within
1e-5 + 1e-5 |b|. torchmil returns the losses' batch means; ours are per bag.
"""

from __future__ import annotations

import pytest
import torch

from mil_train.nn.mincut_pool import cluster_assignments, mincut_pool, propagate

TOL = 1e-5


def random_graph(lengths, bag, generator, symmetric: bool, p: float = 0.3):
    """(edge_index (2, E) over flattened nodes, edge_weight (E,), dense adjacency (batch, bag, bag))."""
    dense = torch.zeros(len(lengths), bag, bag)
    for b, n in enumerate(lengths):
        keep = torch.rand(n, n, generator=generator) < p
        weights = torch.rand(n, n, generator=generator) * keep
        if symmetric:
            weights = torch.triu(weights) + torch.triu(weights, 1).T
        weights.fill_diagonal_(1.0)  # self loops: the pool must handle them (GCN graphs often have them)
        dense[b, :n, :n] = weights
    b, s, t = dense.nonzero(as_tuple=True)
    edge_index = torch.stack([b * bag + s, b * bag + t])  # (2, E)
    return edge_index, dense[b, s, t], dense


def assert_close(actual, expected, what):
    excess = (actual - expected).abs() - (TOL + TOL * expected.abs())
    assert excess.max() <= 0, f"{what}: max |a - b| {(actual - expected).abs().max():.3e}"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("temp", [1.0, 0.5])
@pytest.mark.parametrize("lengths", [(1,), (7,), (12, 5, 9)])
def test_matches_torchmil_dense_mincut_pool(lengths, temp, symmetric):
    from torchmil.nn.gnns.dense_mincut_pool import dense_mincut_pool

    generator = torch.Generator().manual_seed(sum(lengths) + int(10 * temp) + symmetric)
    bag, k, dim = max(lengths), 4, 6
    mask = torch.arange(bag)[None, :] < torch.tensor(lengths)[:, None]  # (batch, bag)
    X = torch.randn(len(lengths), bag, dim, generator=generator)
    logits = torch.randn(len(lengths), bag, k, generator=generator)
    edge_index, edge_weight, dense = random_graph(lengths, bag, generator, symmetric)
    ref_x, ref_adj, ref_mincut, ref_ortho = dense_mincut_pool(X, dense, logits, mask, temp)

    # our padded rows hold huge values: they must not reach anything
    huge = torch.where(mask[..., None], X, torch.tensor(1e30))
    huge_logits = torch.where(mask[..., None], logits, torch.tensor(1e30))
    out = mincut_pool(huge, huge_logits, mask, edge_index, edge_weight, temp)
    assert_close(out.pooled, ref_x, "pooled features")
    assert_close(out.adjacency, ref_adj, "pooled adjacency")
    assert_close(out.mincut_loss.mean(), ref_mincut, "min-cut loss")
    assert_close(out.ortho_loss.mean(), ref_ortho, "orthogonality loss")
    assert (out.assignments[~mask] == 0).all()


def test_per_bag_losses_equal_each_bag_alone():
    generator = torch.Generator().manual_seed(3)
    lengths, k, dim = (8, 3, 6), 5, 4
    bag = max(lengths)
    mask = torch.arange(bag)[None, :] < torch.tensor(lengths)[:, None]
    X = torch.randn(3, bag, dim, generator=generator)
    logits = torch.randn(3, bag, k, generator=generator)
    edge_index, edge_weight, dense = random_graph(lengths, bag, generator, symmetric=True)
    batched = mincut_pool(X, logits, mask, edge_index, edge_weight)
    for b, n in enumerate(lengths):
        mine = edge_index[0] // bag == b
        local = edge_index[:, mine] - b * bag
        alone = mincut_pool(X[b:b + 1, :n], logits[b:b + 1, :n], None, local, edge_weight[mine])
        assert_close(batched.mincut_loss[b], alone.mincut_loss[0], "min-cut per bag")
        assert_close(batched.ortho_loss[b], alone.ortho_loss[0], "ortho per bag")
        assert_close(batched.pooled[b], alone.pooled[0], "pooled per bag")


def test_hand_computed_two_node_case():
    """Two nodes joined by weight-1 edges plus self loops of weight 1, two clusters, hard assignments.

    A = [[1, 1], [1, 1]], S = I (node i in cluster i): S^T A S = A, tr = 2; D = diag(2, 2),
    tr(S^T D S) = 4, so min-cut = -0.5. S^T S = I, so orthogonality = 0. The pooled adjacency
    is A with a zero diagonal, [[0, 1], [1, 0]], over sqrt(1) * sqrt(1).
    """
    logits = torch.tensor([[[30.0, -30.0], [-30.0, 30.0]]])  # (1, 2, 2), softmax ~ one-hot
    X = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    edge_index = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])
    out = mincut_pool(X, logits, None, edge_index, torch.ones(4))
    torch.testing.assert_close(out.mincut_loss, torch.tensor([-0.5]))
    torch.testing.assert_close(out.ortho_loss, torch.tensor([0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.adjacency, torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]))
    torch.testing.assert_close(out.pooled, X)


def test_propagate_is_the_dense_product():
    generator = torch.Generator().manual_seed(4)
    lengths = (6, 4)
    edge_index, edge_weight, dense = random_graph(lengths, 6, generator, symmetric=False)
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    S = cluster_assignments(torch.randn(2, 6, 3, generator=generator), mask)
    AS, degree = propagate(S, edge_index, edge_weight)
    torch.testing.assert_close(AS, dense @ S)
    torch.testing.assert_close(degree, dense.sum(-1))


def test_bag_without_edges_has_zero_mincut_loss_and_finite_gradients():
    """torchmil gives 0 / 0 = NaN here; milkit a loss of 0 whose gradient is finite."""
    logits = torch.randn(2, 5, 3, requires_grad=True)
    X = torch.randn(2, 5, 4)
    edge_index = torch.tensor([[0, 1, 1], [1, 0, 1]])  # edges in bag 0 only
    out = mincut_pool(X, logits, None, edge_index, torch.ones(3))
    assert out.mincut_loss[1] == 0 and torch.isfinite(out.mincut_loss[0]) and out.mincut_loss[0] < 0
    (out.mincut_loss.sum() + out.ortho_loss.sum()).backward()
    assert torch.isfinite(logits.grad).all()


# -- GTP, the model built on the pool: variants of torchmil's GTP with its weights -----------------


@pytest.mark.parametrize(
    "config",
    [
        {"att_dim": 16, "n_heads": 4, "n_clusters": 5},  # in_dim != att_dim: skip and out projections
        {"att_dim": 12, "n_heads": 3, "n_clusters": 4, "use_mlp": False},
        {"att_dim": 16, "n_heads": 2, "n_clusters": 6, "n_layers": 3},
        {"att_dim": 12, "n_heads": 4, "n_clusters": 1},
    ],
)
def test_gtp_variants_match_torchmil_in_a_padded_batch(config):
    from mil_export.onnx_export import grid_coords
    from mil_train.data.graphs import batch_graph
    from mil_train.interop.torchmil import build_reference, from_torchmil, reference_outputs

    config = {"in_dim": 12, "n_classes": 1, **config}
    torch.manual_seed(0)
    reference = build_reference("GTP", **config)
    for parameter in reference.parameters():  # away from the zero class token / default init
        torch.nn.init.normal_(parameter, std=0.3)
    model = from_torchmil(reference, "GTP", **config)
    lengths = (17, 4, 9)
    bag = max(lengths)
    mask = torch.arange(bag)[None, :] < torch.tensor(lengths)[:, None]
    coords = torch.zeros(len(lengths), bag, 2, dtype=torch.int64)
    for b, n in enumerate(lengths):
        coords[b, :n] = grid_coords(n)
    edge_index, edge_weight = batch_graph(coords, mask, "grid8", lone_self_loop=True)
    X = torch.randn(len(lengths), bag, 12, generator=torch.Generator().manual_seed(1)) * mask[..., None]
    ref_logits, ref_attention = reference_outputs("GTP", reference, X, mask, edge_index=edge_index, edge_weight=edge_weight)
    with torch.no_grad():
        out = model(torch.where(mask[..., None], X, torch.tensor(1e30)), mask, edge_index=edge_index, edge_weight=edge_weight)
    assert_close(out.logits, ref_logits, "logits")
    assert_close(out.attention, ref_attention, "attention")
    with torch.no_grad():
        from_coords = model(X, mask, coords=coords)  # the graph built from coords by the model's rule
    torch.testing.assert_close(from_coords.logits, out.logits, atol=0, rtol=0)


def test_gtp_attention_with_one_layer_is_the_class_token_attention_through_S():
    """One layer: rollout row 0 over the clusters is half the head-mean attention, so after the
    bag normalisation attention_i = sum_k S_ik a_k / sum_j sum_k S_jk a_k, a = mean_h W[h, 0, 1:]."""
    from mil_train.models import create_model

    torch.manual_seed(2)
    model = create_model("GTP", in_dim=8, att_dim=8, n_heads=2, n_clusters=3).eval()
    X = torch.randn(1, 6, 8)
    edge_index = torch.stack([torch.arange(6), torch.arange(6)])
    caught = {}
    model.cluster_proj.register_forward_hook(lambda module, args, out: caught.update(logits=out))
    model.transformer.layers[0].attention.register_forward_hook(lambda module, args, out: caught.update(w=out[1]))
    with torch.no_grad():
        out = model(X, edge_index=edge_index)
    S = torch.softmax(caught["logits"], dim=-1)[0]  # (6, 3)
    a = caught["w"].mean(dim=1)[0, 0, 1:]  # (3,)
    expected = S @ a / (S @ a).sum()
    torch.testing.assert_close(out.attention[0], expected)
