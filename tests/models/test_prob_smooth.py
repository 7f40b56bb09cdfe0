"""ProbSmoothAttentionPool and ProbSmoothABMIL: mean path, sampling, KL term, torchmil parity of each.

Tolerances follow DESIGN section 7: |a - b| <= 1e-5 + 1e-5 |b| against torchmil.
"""

from __future__ import annotations

import math

import pytest
import torch

from mil_train.data.graphs import batch_graph, build_graph
from mil_train.interop.torchmil import build_reference, from_torchmil, reference_outputs
from mil_train.interop.torchmil.prob_smooth_abmil import mean_path
from mil_train.models import ProbSmoothABMIL
from mil_train.nn import ProbSmoothAttentionPool

D = 12
TOL = 1e-5


def close(actual, expected, tol=TOL):
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{actual.shape} != {expected.shape}"
    excess = (actual - expected).abs() - (tol + tol * expected.abs())
    assert excess.max() <= 0, f"max |a - b| = {(actual - expected).abs().max():.3e}"


def grid_coords(n: int, width: int = 4) -> torch.Tensor:
    index = torch.arange(n)
    return torch.stack([index // width, index % width], dim=1)  # (n, 2)


def dense_adjacency(edge_index, edge_weight, n_bags: int, n: int) -> torch.Tensor:
    """Block (batch, bag, bag) adjacency from a flattened edge list, for torchmil's dense `adj`."""
    flat = torch.zeros(n_bags * n, n_bags * n)
    flat[edge_index[0], edge_index[1]] = edge_weight
    return torch.stack([flat[b * n:(b + 1) * n, b * n:(b + 1) * n] for b in range(n_bags)])


def pair(covar_mode="diag", n_samples_train=40, n_samples_test=60, seed=0):
    """A torchmil ProbSmoothABMIL and the milkit model holding its weights."""
    config = dict(in_dim=D, att_dim=8, covar_mode=covar_mode, n_samples_train=n_samples_train,
                  n_samples_test=n_samples_test)
    torch.manual_seed(seed)
    reference = build_reference("ProbSmoothABMIL", **config)
    return reference, from_torchmil(reference, "ProbSmoothABMIL", **config)


def padded(bags, fill=0.0):
    n_max = max(len(b) for b in bags)
    X = torch.full((len(bags), n_max, D), fill)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, bag in enumerate(bags):
        X[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return X, mask


# -- the pool ------------------------------------------------------------------------------------


def test_mean_path_is_softmax_of_the_mean_logits_by_hand():
    torch.manual_seed(0)
    pool = ProbSmoothAttentionPool(D, att_dim=4)
    X = torch.randn(1, 6, D)
    first, second = pool.in_mlp[0], pool.in_mlp[2]
    gelu = torch.nn.functional.gelu
    hidden = gelu(gelu(X[0] @ first.weight.T + first.bias) @ second.weight.T + second.bias)  # (6, 8)
    mean = hidden @ pool.mean_head.weight[0] + pool.mean_head.bias  # (6,)
    weights = torch.exp(mean - mean.max()) / torch.exp(mean - mean.max()).sum()
    out = pool(X)
    assert out.weights.shape == (1, 1, 6) and out.log_var is None  # mean path: no variance computed
    close(out.weights[0, 0], weights)
    close(out.pooled[0, 0], weights @ X[0])


def test_sampling_is_reparameterised_and_clipped():
    torch.manual_seed(0)
    pool = ProbSmoothAttentionPool(D, att_dim=4)
    mean = torch.tensor([[0.0, 30.0, -1.0]])
    log_var = torch.tensor([[0.0, -50.0, math.log(4.0)]])
    torch.manual_seed(3)
    draws = pool.sample_logits(mean, log_var, 5)  # (1, 5, 3)
    torch.manual_seed(3)
    noise = torch.randn(1, 3, 5).transpose(1, 2)  # torchmil's (batch, bag, samples) draw order
    expected = (mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * noise).clamp(-20, 20)
    close(draws, expected)
    assert torch.all(draws[0, :, 1] == 20.0)  # 30 +- ~0 clipped to torchmil's bound


def test_tiny_variance_sampling_equals_the_mean_path():
    torch.manual_seed(0)
    pool = ProbSmoothAttentionPool(D, att_dim=4)
    with torch.no_grad():
        pool.log_var_head.bias.fill_(-40.0)
    X, mask = padded([torch.randn(7, D), torch.randn(3, D)])
    sampled, mean_path_out = pool(X, mask, n_samples=8), pool(X, mask)
    close(sampled.weights, mean_path_out.weights.expand(-1, 8, -1))


def test_covar_mode_full_is_refused_as_in_torchmil():
    from torchmil.nn import ProbSmoothAttentionPool as TorchmilPool

    with pytest.raises(ValueError, match="covar_mode"):
        ProbSmoothAttentionPool(D, covar_mode="full")
    with pytest.raises(ValueError, match="covar_mode"):
        TorchmilPool(in_dim=D, covar_mode="full")


# -- the KL term ------------------------------------------------------------------------------------


def test_kl_matches_a_dense_hand_computation():
    """kl = (mu^T (I - A) mu + tr((I - A) Sigma) - 1/2 sum log_var) / N on a 3-node chain with a loop."""
    pool = ProbSmoothAttentionPool(D, att_dim=4)
    mean = torch.tensor([[0.5, -1.0, 2.0]])
    log_var = torch.tensor([[0.1, -0.3, 0.7]])
    edge_index = torch.tensor([[0, 1, 1, 2, 2], [1, 0, 2, 1, 2]])
    edge_weight = torch.tensor([0.5, 0.5, 0.25, 0.25, 0.6])
    A = torch.zeros(3, 3)
    A[edge_index[0], edge_index[1]] = edge_weight
    L = torch.eye(3) - A
    Sigma = torch.diag(torch.exp(log_var[0]))
    expected = (mean[0] @ L @ mean[0] + torch.trace(L @ Sigma) - 0.5 * log_var.sum()) / 3
    close(pool.kl_divergence(mean, log_var, None, edge_index, edge_weight), expected.reshape(1))


@pytest.mark.parametrize("covar_mode", ["diag", "zero"])
@pytest.mark.parametrize("self_loops", [False, True])
def test_kl_matches_torchmil(covar_mode, self_loops):
    reference, model = pair(covar_mode)
    n, n_bags = 10, 2
    X = torch.randn(n_bags, n, D)
    coords = grid_coords(n).expand(n_bags, -1, -1)
    edge_index, edge_weight = batch_graph(coords, rule="grid8", self_loops=self_loops)
    adj = dense_adjacency(edge_index, edge_weight, n_bags, n)
    with torch.no_grad():
        _, expected = reference.pool(X, adj, None, return_kl_div=True)
        out = model.pool(X, None, variance=True)
        kl = model.pool.kl_divergence(out.mean, out.log_var, None, edge_index, edge_weight).mean()
    close(kl, expected)


def test_kl_ignores_padding_and_torchmil_does_not():
    """milkit's KL of a padded bag is that bag's KL alone; torchmil's sums padded rows and divides by N_max."""
    reference, model = pair()
    bags = [torch.randn(9, D), torch.randn(4, D)]
    X, mask = padded(bags, fill=0.0)
    coords = torch.stack([grid_coords(9), torch.cat([grid_coords(4), torch.zeros(5, 2, dtype=torch.long)])])
    edge_index, edge_weight = batch_graph(coords, mask, rule="grid8")
    with torch.no_grad():
        out = model.pool(X.masked_fill(~mask.unsqueeze(-1), float("nan")), mask, variance=True)
        per_bag = model.pool.kl_divergence(out.mean, out.log_var, mask, edge_index, edge_weight)
        for b, bag in enumerate(bags):
            alone_edges = build_graph(grid_coords(len(bag)), "grid8")
            alone = model.pool(bag.unsqueeze(0), variance=True)
            close(per_bag[b], model.pool.kl_divergence(alone.mean, alone.log_var, None, *alone_edges)[0])
        _, torchmil_padded = reference.pool(X, dense_adjacency(edge_index, edge_weight, 2, 9), mask, return_kl_div=True)
    assert abs(float(torchmil_padded) - float(per_bag.mean())) > 1e-3  # torchmil's mask-blind KL (model card)


def test_prior_graph_falls_back_to_grid8_over_coords():
    _, model = pair()
    model.eval()
    X, mask = padded([torch.randn(9, D), torch.randn(5, D)])
    coords = torch.stack([grid_coords(9), torch.cat([grid_coords(5), torch.zeros(4, 2, dtype=torch.long)])])
    Y = torch.tensor([1.0, 0.0])
    edge_index, edge_weight = batch_graph(coords, mask, rule="grid8")
    _, from_coords = model.compute_loss({"X": X, "mask": mask, "Y": Y, "coords": coords})
    _, from_edges = model.compute_loss({"X": X, "mask": mask, "Y": Y, "edge_index": edge_index, "edge_weight": edge_weight})
    close(from_coords["kl"], from_edges["kl"])
    with pytest.warns(UserWarning, match="no neighbours"):
        _, no_graph = model.compute_loss({"X": X, "mask": mask, "Y": Y})
    assert not torch.isclose(no_graph["kl"], from_edges["kl"])


# -- the model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("covar_mode", ["diag", "zero"])
def test_eval_matches_torchmil_on_its_mean_path(covar_mode):
    reference, model = pair(covar_mode)
    X, mask = padded([torch.randn(8, D), torch.randn(3, D)])
    logits, attention = reference_outputs("ProbSmoothABMIL", reference, X, mask)
    with torch.no_grad():
        out = model(X, mask)
    close(out.logits, logits)
    close(out.attention, attention)
    assert reference.pool.covar_mode == covar_mode  # the adapter restores torchmil's mode


def test_training_step_reproduces_torchmil_under_the_same_seed():
    """Same seed, same draws: cls (mean BCE over draws), kl and the mean logits equal torchmil's."""
    reference, model = pair(n_samples_train=40)
    reference.train(), model.train()
    n, n_bags = 10, 3
    X = torch.randn(n_bags, n, D)
    Y = torch.tensor([1.0, 0.0, 1.0])
    edge_index, edge_weight = batch_graph(grid_coords(n).expand(n_bags, -1, -1), rule="grid8")
    torch.manual_seed(7)
    ref_logits, ref_terms = reference.compute_loss(Y, X, dense_adjacency(edge_index, edge_weight, n_bags, n))
    torch.manual_seed(7)
    logits, terms = model.compute_loss({"X": X, "Y": Y, "edge_index": edge_index, "edge_weight": edge_weight})
    close(logits[:, 0], ref_logits.detach())
    close(terms["cls"].detach(), ref_terms["BCEWithLogitsLoss"].detach())
    close(terms["kl"].detach(), ref_terms["KLDiv"].detach())


def test_sample_reproduces_torchmil_stochastic_eval():
    """`sample` draws n_samples_test like torchmil's eval forward: same seed, same averaged logits."""
    reference, model = pair(n_samples_test=60)
    reference.eval(), model.eval()
    X = torch.randn(2, 9, D)
    torch.manual_seed(11)
    with torch.no_grad():
        ref_logits = reference(X)
    torch.manual_seed(11)
    logits, weights = model.sample(X)
    assert logits.shape == (2, 60, 1) and weights.shape == (2, 60, 9)
    close(logits.mean(dim=1)[:, 0], ref_logits)


def test_training_forward_samples_and_keeps_the_attention_contract():
    _, model = pair(n_samples_train=25)
    X, mask = padded([torch.randn(6, D), torch.randn(2, D)], fill=1e30)
    model.train()
    torch.manual_seed(0)
    first = model(X, mask)
    second = model(X, mask)
    assert not torch.equal(first.logits, second.logits)  # training samples
    close(first.attention.sum(dim=1), torch.ones(2))
    assert torch.all(first.attention[~mask] == 0)
    model.eval()
    assert torch.equal(model(X, mask).logits, model(X, mask).logits)


def test_covar_mode_zero_does_not_sample_in_training():
    _, model = pair("zero")
    X = torch.randn(1, 5, D)
    with torch.no_grad():
        eval_out = model.eval()(X)
        train_out = model.train()(X)
    close(train_out.logits, eval_out.logits)


def test_torchmil_predict_ignores_the_mask():
    """torchmil's ProbSmoothABMIL.predict(X, mask) passes mask into `adj`, so padding gets attention."""
    reference, model = pair()
    bag = torch.randn(4, D)
    X, mask = padded([bag, torch.randn(9, D)])
    with torch.no_grad(), mean_path(reference.pool):
        predicted, _ = reference.predict(X, mask)
        alone, _ = reference.predict(bag.unsqueeze(0), None)
        ours_padded, ours_alone = model.eval()(X, mask), model(bag.unsqueeze(0))
    assert abs(float(predicted[0]) - float(alone[0])) > 1e-4
    close(ours_padded.logits[0], ours_alone.logits[0])


@pytest.mark.parametrize("bad", [{"n_samples_train": 0}, {"n_samples_test": 0}])
def test_sample_counts_must_be_positive(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        ProbSmoothABMIL(in_dim=D, **bad)


# -- TransformerProbSmoothABMIL ----------------------------------------------------------------------


def transformer_pair(covar_mode="diag", n_samples_train=30, seed=0, **encoder):
    config = dict(in_dim=D, pool_att_dim=8, covar_mode=covar_mode, n_samples_train=n_samples_train,
                  transf_att_dim=16, transf_n_heads=4, **encoder)
    torch.manual_seed(seed)
    reference = build_reference("TransformerProbSmoothABMIL", **config)
    return reference, from_torchmil(reference, "TransformerProbSmoothABMIL", **config)


@pytest.mark.parametrize("covar_mode", ["diag", "zero"])
@pytest.mark.parametrize("encoder", [{}, {"transf_n_layers": 2, "transf_add_self": False, "transf_use_mlp": False}])
def test_transformer_eval_matches_torchmil_on_its_mean_path(covar_mode, encoder):
    reference, model = transformer_pair(covar_mode, **encoder)
    X, mask = padded([torch.randn(8, D), torch.randn(3, D)])
    logits, attention = reference_outputs("TransformerProbSmoothABMIL", reference, X, mask)
    with torch.no_grad():
        out = model(X, mask)
    close(out.logits, logits)
    close(out.attention, attention)
    assert attention[0, :8].std() > 1e-3  # the weights are not uniform: the comparison can fail


def test_transformer_training_step_reproduces_torchmil_under_the_same_seed():
    reference, model = transformer_pair(n_samples_train=30)
    reference.train(), model.train()
    n, n_bags = 10, 2
    X = torch.randn(n_bags, n, D)
    Y = torch.tensor([0.0, 1.0])
    edge_index, edge_weight = batch_graph(grid_coords(n).expand(n_bags, -1, -1), rule="grid8")
    torch.manual_seed(4)
    ref_logits, ref_terms = reference.compute_loss(Y, X, dense_adjacency(edge_index, edge_weight, n_bags, n))
    torch.manual_seed(4)
    logits, terms = model.compute_loss({"X": X, "Y": Y, "edge_index": edge_index, "edge_weight": edge_weight})
    close(logits[:, 0], ref_logits.detach())
    close(terms["cls"].detach(), ref_terms["BCEWithLogitsLoss"].detach())
    close(terms["kl"].detach(), ref_terms["KLDiv"].detach())


def test_transformer_declares_the_bag_its_attention_scores_fit():
    from mil_train.models import TransformerProbSmoothABMIL

    assert TransformerProbSmoothABMIL.max_bag_size == 11585  # isqrt(4 GiB / (4 bytes * 8 heads))
    assert 8 * 11585**2 * 4 <= 4 * 2**30 < 8 * 11586**2 * 4
    assert TransformerProbSmoothABMIL(in_dim=D, transf_att_dim=16, transf_n_heads=4).max_bag_size == 16384
