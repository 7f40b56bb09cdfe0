"""The Sm blocks: the Sm operator (approx, exact, the exported CG form of exact), the Sm attention pool and
the Sm transformer encoder, against torchmil 1.0.2's own blocks with the same weights, dense formulas and
a hand-computed case; and the exported graphs' shape (MultiHeadAttention nodes, no edges x D tensor)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

import mil_train.models  # noqa: F401  (registers models; mil_train.nn imports mil_train.models.base)
from mil_train.data.graphs import batch_graph
from mil_train.interop.torchmil import torchmil_adjacency
from mil_train.data.graphs import TORCHMIL_GRAPH_RULE as SM_GRAPH_RULE
from mil_train.nn.sm import EXPORT_CG_STEPS, Sm, dense_adjacency
from mil_train.nn.sm_attention_pool import SmAttentionPool
from mil_train.nn.sm_transformer import SmTransformerEncoder, convert_torchmil_sm_state_dict

TOL = 1e-5  # the project's torchmil rule: |a - b| <= 1e-5 + 1e-5 |b|
HUGE = 1e30


def torchmil_nn():
    return pytest.importorskip("torchmil.nn")


def assert_rule(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    excess = (actual - expected).abs() - (tol + tol * expected.abs())
    assert excess.max() <= 0, f"max |a - b| = {(actual - expected).abs().max():.3e}"


def grid_batch(lengths, dim, fill=0.0, seed=0, rule=SM_GRAPH_RULE):
    """Padded bags on near-square grids with the model's graph: X, mask, edge_index, edge_weight."""
    generator = torch.Generator().manual_seed(seed)
    n_max = max(lengths)
    X = torch.randn(len(lengths), n_max, dim, generator=generator)  # (batch, bag, dim)
    mask = torch.arange(n_max)[None, :] < torch.tensor(lengths)[:, None]  # (batch, bag)
    coords = torch.zeros(len(lengths), n_max, 2, dtype=torch.long)
    for b, n in enumerate(lengths):
        width = math.ceil(math.sqrt(n))
        index = torch.arange(n)
        coords[b, :n] = torch.stack([index // width, index % width], dim=1)
    edge_index, edge_weight = batch_graph(coords, mask, rule["rule"], **rule["params"])
    return X.masked_fill(~mask[..., None], fill), mask, edge_index, edge_weight


def set_coef(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("coef"):
                p.fill_(value)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.endswith("coef"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


# -- the operator -------------------------------------------------------------------------------


def test_approx_by_hand_on_two_nodes():
    """Two nodes joined by one edge of weight w, alpha trainable (c = 1, a = 1/2), two steps:
    g1 = f/2 + (w/2) [f1, f0],  g2 = f/2 + (w/2) [g1_1, g1_0]."""
    sm = Sm("trainable", num_steps=2, mode="approx")
    w = 0.8
    edge_index = torch.tensor([[0, 1], [1, 0]])
    edge_weight = torch.tensor([w, w])
    f = torch.tensor([[[1.0], [3.0]]])  # (1, 2, 1)
    g1 = torch.tensor([0.5 + 0.5 * w * 3.0, 1.5 + 0.5 * w * 1.0])
    g2 = torch.tensor([0.5 + 0.5 * w * g1[1], 1.5 + 0.5 * w * g1[0]])
    torch.testing.assert_close(sm(f, edge_index, edge_weight)[0, :, 0], g2)


def test_float_alpha_weighs_the_neighbours_by_one_minus_alpha():
    """torchmil's approx mode with a float alpha: a = 1 / (1 + alpha / (1 - alpha)) = 1 - alpha."""
    sm = Sm(0.9, num_steps=1)
    edge_index, edge_weight = torch.tensor([[0], [1]]), torch.tensor([1.0])
    f = torch.tensor([[[0.0], [5.0]]])
    got = sm(f, edge_index, edge_weight)[0, :, 0]  # node 0 reads node 1
    torch.testing.assert_close(got, torch.tensor([0.1 * 5.0, 0.9 * 5.0]))


@pytest.mark.parametrize("alpha, coef", [("trainable", 0.7), ("trainable", 1.0), (0.3, None), (0.0, None)])
@pytest.mark.parametrize("channels", [1, 5])
def test_approx_matches_torchmil(alpha, coef, channels):
    ours = Sm(alpha, num_steps=7, mode="approx")
    reference = torchmil_nn().Sm(alpha=alpha, num_steps=7, mode="approx")
    if coef is not None:
        set_coef(ours, coef)
        set_coef(reference, coef)
    X, mask, edge_index, edge_weight = grid_batch((17, 6, 1), channels)
    adj = torchmil_adjacency(edge_index, edge_weight, X.shape[0], X.shape[1])
    with torch.no_grad():
        expected = reference(X, adj)
        got = ours(X, edge_index, edge_weight)
    assert_rule(got[mask], expected[mask])
    assert (got[~mask] == 0).all()


@pytest.mark.parametrize("alpha, coef", [("trainable", 1.0), ("trainable", 3.0), (0.5, None)])
def test_exact_matches_torchmil(alpha, coef):
    ours = Sm(alpha, mode="exact")
    reference = torchmil_nn().Sm(alpha=alpha, mode="exact")
    if coef is not None:
        set_coef(ours, coef)
        set_coef(reference, coef)
    X, mask, edge_index, edge_weight = grid_batch((20, 9), 4)
    adj = torchmil_adjacency(edge_index, edge_weight, X.shape[0], X.shape[1]).to_dense()
    with torch.no_grad():
        expected = reference(X, adj)
        got = ours(X, edge_index, edge_weight)
    assert_rule(got[mask], expected[mask])
    M = (1 + ours.coef) * torch.eye(20) - ours.coef * adj[0]  # the definition, bag 0
    assert_rule(M @ got[0], X[0], tol=1e-4)


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_transpose_is_the_transposed_operator(mode):
    """Sm applied to the identity gives its matrix; transpose=True gives that matrix's transpose."""
    sm = Sm(0.4, num_steps=5, mode=mode)
    n = 7
    edge_index = torch.tensor([[0, 1, 2, 3, 5, 6, 4], [1, 2, 0, 4, 6, 5, 4]])  # not symmetric
    edge_weight = torch.rand(edge_index.shape[1], generator=torch.Generator().manual_seed(0))
    eye = torch.eye(n)[None]  # (1, n, n): n signals
    forward = sm(eye, edge_index, edge_weight)[0]  # columns = Sm e_j
    backward = sm(eye, edge_index, edge_weight, transpose=True)[0]
    torch.testing.assert_close(backward, forward.T)


def test_dense_adjacency_matches_torchmil_adjacency():
    X, mask, edge_index, edge_weight = grid_batch((9, 4), 1)
    expected = torchmil_adjacency(edge_index, edge_weight, 2, 9).to_dense()
    torch.testing.assert_close(dense_adjacency(edge_index, edge_weight, 2, 9), expected)
    torch.testing.assert_close(dense_adjacency(edge_index, edge_weight, 2, 9, transpose=True), expected.transpose(1, 2))


def cg_bound(coef: float, steps: int) -> float:
    """The documented relative error bound of the exported exact mode on torchmil's graph: K <= 1 + 2c."""
    kappa = 1.0 + 2.0 * coef
    rate = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    return 2 * math.sqrt(kappa) * rate**steps


@pytest.mark.parametrize("coef", [0.25, 1.0, 4.0])
def test_exported_exact_form_is_within_its_documented_error(coef):
    """The exported exact mode (CG, EXPORT_CG_STEPS steps) vs the dense solve on the model's graph."""
    sm = Sm("trainable", mode="exact")
    set_coef(sm, coef)
    X, mask, edge_index, edge_weight = grid_batch((400, 97, 1), 8, seed=1)
    with torch.no_grad():
        exact = sm.exact_dense(X.double(), edge_index, edge_weight.double())
        for transpose in (False, True):
            cg = sm.conjugate_gradient(X.double(), edge_index, edge_weight.double(), transpose)
            relative = float((cg - exact).norm() / exact.norm())
            assert relative <= cg_bound(coef, EXPORT_CG_STEPS) + 1e-12, relative
        cg32 = sm.conjugate_gradient(X, edge_index, edge_weight)  # float32, as exported
    assert_rule(cg32[mask].double(), exact[mask], tol=1e-5)
    assert (cg32[~mask] == 0).all()
    assert cg_bound(coef, EXPORT_CG_STEPS) < 1e-6


# -- the pool --------------------------------------------------------------------------------------


POOL_CASES = [
    dict(sm_where="early"),
    dict(sm_where="mid", act="relu"),
    dict(sm_where="late", sm_alpha=0.3),
    dict(sm_where="none"),
    dict(sm_where="early", spectral_norm=True),
    dict(sm_where="mid", spectral_norm=True, act="tanh"),
    dict(sm_where="early", sm_mode="exact", sm_alpha=0.5),
    dict(sm_where="early", sm_steps=0),
    dict(sm_where="late", sm_alpha=0.0),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_pool_matches_torchmil(case):
    identity = case.get("sm_steps") == 0 or case.get("sm_alpha") == 0.0
    if identity:
        # torchmil bug: its pool swaps Sm for torch.nn.Identity, then calls it with (X, adj), a
        # TypeError; milkit's Sm is the identity there. The reference is torchmil's "none" pool.
        broken = torchmil_nn().SmAttentionPool(in_dim=12, att_dim=8, **case)
        with pytest.raises(TypeError):
            broken(torch.zeros(1, 2, 12), torch.zeros(1, 2, 2))
    reference_case = {**case, "sm_where": "none"} if identity else case
    reference = torchmil_nn().SmAttentionPool(in_dim=12, att_dim=8, **reference_case).eval()
    randomise(reference)
    set_coef(reference, 0.8)
    ours = SmAttentionPool(in_dim=12, att_dim=8, **case).eval()
    state = {key.replace("sm.sm.", "sm."): value for key, value in reference.state_dict().items()}
    ours.load_state_dict(state)
    X, mask, edge_index, edge_weight = grid_batch((13, 5, 1), 12)
    adj = torchmil_adjacency(edge_index, edge_weight, 3, 13)
    if case.get("sm_mode") == "exact":
        adj = adj.to_dense()
    with torch.no_grad():
        z_ref, f_ref = reference(X, adj, mask, return_att=True)
        padded = X.masked_fill(~mask[..., None], HUGE)
        z, weights = ours(padded, mask, edge_index, edge_weight)
    assert_rule(z, z_ref)
    assert_rule(weights, torch.softmax(f_ref.masked_fill(~mask, float("-inf")), dim=1))
    assert (weights[~mask] == 0).all()


def test_early_pool_equals_pooling_the_smoothed_features():
    """milkit's early form (Sm on att_dim channels, X^T Sm^T(s)) against the definition Sm(X)^T s."""
    pool = SmAttentionPool(in_dim=40, att_dim=6, sm_where="early").eval()
    set_coef(pool, 0.6)
    X, mask, edge_index, edge_weight = grid_batch((30, 11), 40, seed=4)
    with torch.no_grad():
        smoothed = pool.sm(X, edge_index, edge_weight)  # (batch, bag, 40)
        scores = pool.proj2(pool.act(pool.proj1(smoothed)))  # (batch, bag, 1)
        s = torch.softmax(scores.squeeze(-1).masked_fill(~mask, float("-inf")), dim=1)
        expected = torch.bmm(s.unsqueeze(1), smoothed).squeeze(1)
        pooled, weights = pool(X, mask, edge_index, edge_weight)
    assert_rule(weights, s)
    assert_rule(pooled, expected)


# -- the encoder -----------------------------------------------------------------------------------


ENCODER_CASES = [
    dict(in_dim=16, att_dim=16, n_heads=4, n_layers=1, add_self=True),
    dict(in_dim=12, att_dim=16, n_heads=2, n_layers=2, add_self=False, sm_alpha=0.4),
    dict(in_dim=16, att_dim=16, n_heads=4, n_layers=2, add_self=True, use_mlp=False, sm_steps=3),
    dict(in_dim=16, att_dim=16, n_heads=4, n_layers=1, add_self=True, sm_mode="exact", sm_alpha=0.5),
]


@pytest.mark.parametrize("case", ENCODER_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_encoder_matches_torchmil(case):
    reference = torchmil_nn().SmTransformerEncoder(**case).eval()
    randomise(reference)
    set_coef(reference, 1.3)
    ours = SmTransformerEncoder(**case).eval()
    ours.load_state_dict(convert_torchmil_sm_state_dict(reference.state_dict()))
    X, mask, edge_index, edge_weight = grid_batch((10, 4), case["in_dim"])
    adj = torchmil_adjacency(edge_index, edge_weight, 2, 10)
    if case.get("sm_mode") == "exact":
        adj = adj.to_dense()
    with torch.no_grad():
        expected_alone = reference(X[:1], adj[:1] if adj.layout == torch.strided else adj.to_dense()[:1])
        got_alone = ours(X[:1], None, edge_index[:, edge_index[0] < 10], edge_weight[edge_index[0] < 10])
        expected = reference(X, adj, mask)
        got = ours(X.masked_fill(~mask[..., None], HUGE), mask, edge_index, edge_weight)
    assert_rule(got_alone, expected_alone)
    assert_rule(got[mask], expected[mask])
    assert (got[~mask] == 0).all()


def test_every_layer_has_its_own_coefficient():
    encoder = SmTransformerEncoder(in_dim=8, att_dim=8, n_heads=2, n_layers=3)
    names = [name for name, _ in encoder.named_parameters() if name.endswith("coef")]
    assert names == [f"layers.{i}.sm.coef" for i in range(3)]


# -- exported graphs --------------------------------------------------------------------------------


def export(model, tmp_path, name):
    from mil_export import export_onnx
    from mil_runtime.session import open_session

    path = export_onnx(model.eval(), tmp_path / f"{name}.onnx")
    return path, open_session(path, device="cpu")


def feeds_for(model, lengths, seed=0, dim=24):
    from mil_export.onnx_export import example_inputs

    features = torch.randn(len(lengths), max(lengths), dim, generator=torch.Generator().manual_seed(seed))
    return {k: v.numpy() for k, v in example_inputs(model, lengths, features).items()}


def eager(model, feeds):
    from mil_runtime import contract

    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        out = model(t[contract.FEATURES], t[contract.MASK], edge_index=t[contract.EDGE_INDEX],
                    edge_weight=t[contract.EDGE_WEIGHT])
    return out.logits.numpy(), out.attention.numpy()


@pytest.mark.slow  # two CG exports, 10-21 s each on 2 cores
@pytest.mark.parametrize("where", ["early", "mid"])
def test_exported_exact_mode_matches_eager(tmp_path, where):
    """sm_mode="exact": eager solves densely, the ONNX graph runs CG; within the ONNX rule (1e-4)."""
    from mil_runtime import contract
    from mil_train.models import create_model

    torch.manual_seed(0)
    model = create_model("SmABMIL", in_dim=24, n_classes=2, att_dim=16, sm_mode="exact", sm_where=where).eval()
    _, session = export(model, tmp_path, f"exact-{where}")
    for lengths in [(1,), (2,), (50, 13, 7)]:
        feeds = feeds_for(model, lengths, seed=len(lengths))
        ort = session.run(feeds)
        logits, attention = eager(model, feeds)
        np.testing.assert_allclose(ort[contract.LOGITS], logits, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(ort[contract.ATTENTION], attention, atol=1e-4, rtol=1e-4)


def test_sm_abmil_graph_never_smooths_the_feature_width(tmp_path):
    """The early Sm runs on att_dim channels: the gathered neighbours are (nodes, K, att_dim), no
    edge- or slot-sized tensor is D wide, no tensor has two bag axes."""
    from mil_train.models import create_model

    model = create_model("SmABMIL", in_dim=24, n_classes=1, att_dim=6)
    path, _ = export(model, tmp_path, "width")
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info]
    gathered = [dims for dims in shapes if len(dims) == 3 and dims[2] == 6 and isinstance(dims[1], str)
                and isinstance(dims[0], str) and "bag" not in dims[1]]
    assert gathered, "Sm's gathered neighbours (nodes, K, att_dim) on att_dim channels"
    per_node = [dims for dims in shapes if len(dims) >= 2 and isinstance(dims[0], str) and isinstance(dims[1], str)
                and "bag" not in dims[1]]  # (nodes or edges, K or more, ...) tensors
    assert not [dims for dims in per_node if 24 in dims]
    assert not [dims for dims in shapes if sum(1 for d in dims if isinstance(d, str) and "bag" in d) >= 2]


def test_exported_adjacency_layouts_agree_on_any_edge_list():
    """The exported A (neighbour table) equals the scatter form on the rule's graphs, on the same edges
    in shuffled order, and with a node of far more neighbours than the grid gives."""
    from mil_train.nn.sm import EdgeAdjacency

    X, mask, edge_index, edge_weight = grid_batch((50, 13, 1), 6, seed=5)
    shape = tuple(X.shape)
    for transpose in (False, True):
        scatter = EdgeAdjacency(edge_index, edge_weight, shape, transpose, layout="scatter")(X)
        table = EdgeAdjacency(edge_index, edge_weight, shape, transpose, layout="table")(X)
        assert_rule(table, scatter, tol=1e-6)
    shuffled = torch.randperm(edge_index.shape[1], generator=torch.Generator().manual_seed(0))
    table = EdgeAdjacency(edge_index[:, shuffled], edge_weight[shuffled], shape, layout="table")(X)
    assert_rule(table, EdgeAdjacency(edge_index, edge_weight, shape, layout="scatter")(X), tol=1e-6)
    hub = torch.tensor([[25] * 9, list(range(30, 39))])  # node 25 already has 8 neighbours: 17 edges
    crowded, weights = torch.cat([edge_index, hub], dim=1), torch.cat([edge_weight, torch.full((9,), 0.5)])
    table = EdgeAdjacency(crowded, weights, shape, layout="table")(X)
    assert_rule(table, EdgeAdjacency(crowded, weights, shape, layout="scatter")(X), tol=1e-6)


@pytest.mark.slow  # a two-layer export, 12 s on 2 cores
def test_sm_transformer_has_one_fused_attention_node_per_layer(tmp_path):
    from mil_train.models import create_model

    model = create_model("SmTransformerABMIL", in_dim=24, n_classes=1, pool_att_dim=8, transf_att_dim=24,
                         transf_n_heads=4, transf_n_layers=2)
    path, session = export(model, tmp_path, "layers")
    graph = onnx.load(str(path)).graph
    ops = [(node.domain, node.op_type) for node in graph.node]
    assert ops.count(("com.microsoft", "MultiHeadAttention")) == 2
    feeds = feeds_for(model, (30, 9), seed=3)
    from mil_runtime import contract

    logits, attention = eager(model, feeds)
    ort = session.run(feeds)
    np.testing.assert_allclose(ort[contract.LOGITS], logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ort[contract.ATTENTION], attention, atol=1e-4, rtol=1e-4)
