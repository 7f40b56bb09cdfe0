"""GCNConv and DeepGCNLayer (torchmil's graph layers over an edge list), and PatchGCN's own parts.

Truths: a hand-computed three-node graph; torchmil's own layers with the same weights, fed the graph as
a dense (batch, bag, bag) adjacency (built by torch_geometric's `to_dense_adj`); PyG's MessagePassing
sum aggregation; torchmil's PatchGCN with its concatenation; onnxruntime on an exported PatchGCN
wider than one aggregation slice.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mil_train.models  # noqa: F401  (registers models; mil_train.nn imports mil_train.models.base)
from mil_train.data.graphs import batch_graph
from mil_train.nn.deep_gcn import BLOCKS, DeepGCNLayer
from mil_train.nn.gcn_conv import GCNConv
from mil_train.nn.neighbour_table import AGGREGATION_CHUNK, aggregate, neighbour_table

TOL = 1e-5  # the project's torchmil rule: |a - b| <= 1e-5 + 1e-5 |b|


def assert_rule(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    excess = (actual - expected).abs() - (tol + tol * expected.abs())
    assert excess.max() <= 0, f"max |a - b| = {(actual - expected).abs().max():.3e}"


def torchmil_nn():
    return pytest.importorskip("torchmil.nn")


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-default LayerNorm affine and biases too, so a mis-mapped weight cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def random_graph(batch: int, bag: int, n_edges: int, seed: int = 0):
    """Directed edges with repeats and self loops, inside each bag's node range; weights in (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    b = torch.randint(0, batch, (n_edges,), generator=generator)
    source = torch.randint(0, bag, (n_edges,), generator=generator) + b * bag
    target = torch.randint(0, bag, (n_edges,), generator=generator) + b * bag
    return torch.stack([source, target]), torch.rand(n_edges, generator=generator)


def dense_adjacency(edge_index, edge_weight, batch: int, bag: int) -> torch.Tensor:
    """adj[b, i, j] = sum of the weights of edges (i, j) of bag b, by torch_geometric's to_dense_adj."""
    from torch_geometric.utils import to_dense_adj

    nodes = torch.arange(batch).repeat_interleave(bag)  # (batch * bag,) bag of each node
    return to_dense_adj(edge_index, batch=nodes, edge_attr=edge_weight, max_num_nodes=bag, batch_size=batch)


def torchmil_state(module: torch.nn.Module) -> dict:
    return {key.replace(".module.", "."): value for key, value in module.state_dict().items()}


# -- aggregation ------------------------------------------------------------------------------


def test_hand_computed_path_graph():
    """Path 0 - 1 - 2, weights w01 = w10 = 0.5, w12 = 2, w21 = 0.25; y_i = sum_j w_ij x_j (+ x_i)."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]]])  # (1, 3, 2)
    edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    edge_weight = torch.tensor([0.5, 0.5, 2.0, 0.25])
    expected = torch.tensor([[[0.0, 0.5], [0.5 + 4.0, 6.0], [0.0, 0.25]]])
    torch.testing.assert_close(aggregate(x, edge_index, edge_weight), expected)
    conv = GCNConv(2, add_self_loops=True)
    torch.testing.assert_close(conv(x, edge_index, edge_weight), expected + x)
    # learn_weights: the linear map comes after the aggregation
    conv = GCNConv(2, 1, add_self_loops=True, learn_weights=True)
    with torch.no_grad():
        conv.fc.weight.copy_(torch.tensor([[1.0, -1.0]]))
        conv.fc.bias.fill_(0.5)
    torch.testing.assert_close(conv(x, edge_index, edge_weight), (expected + x) @ torch.tensor([[1.0], [-1.0]]) + 0.5)


def test_no_edges_and_padding_nodes_aggregate_to_zero():
    x = torch.randn(2, 4, 3)
    assert torch.equal(aggregate(x, None), torch.zeros_like(x))
    assert torch.equal(aggregate(x, torch.zeros((2, 0), dtype=torch.long), torch.zeros(0)), torch.zeros_like(x))
    # node 7 (bag 1, slot 3) has no edges: 0, whatever its features
    out = aggregate(x, torch.tensor([[0, 4], [1, 5]]), None)
    assert torch.equal(out[1, 3], torch.zeros(3)) and torch.equal(out[0, 0], x[0, 1])


def test_neighbour_table_layout():
    """Slots per receiving node in edge-list order, K = largest in-degree, unused slots -> zero row."""
    edge_index = torch.tensor([[2, 0, 2, 1, 2], [0, 1, 1, 0, 2]])
    edge_weight = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    table = neighbour_table(edge_index, edge_weight, 4)
    assert torch.equal(table.sender, torch.tensor([[1, 4, 4], [0, 4, 4], [0, 1, 2], [4, 4, 4]]))
    assert torch.equal(table.weight[:, 0], torch.tensor([[2.0, 0, 0], [4.0, 0, 0], [1.0, 3.0, 5.0], [0, 0, 0]]))
    empty = neighbour_table(torch.zeros((2, 0), dtype=torch.long), torch.zeros(0), 3)
    assert empty.sender.shape == (3, 0) and empty.weight.shape == (3, 1, 0)
    x = torch.randn(1, 4, 5)
    assert torch.equal(aggregate(x, table), aggregate(x, edge_index, edge_weight))


def test_edge_order_and_a_high_degree_node_do_not_change_the_sum():
    batch, bag, dim = 2, 30, 7
    x = torch.randn(batch, bag, dim)
    hub = torch.stack([torch.zeros(29, dtype=torch.long), torch.arange(1, 30)])  # node 0 receives from 29
    edge_index = torch.cat([hub, random_graph(batch, bag, 50, seed=2)[0]], dim=1)
    edge_weight = torch.rand(edge_index.shape[1])
    expected = torch.bmm(dense_adjacency(edge_index, edge_weight, batch, bag), x)
    order = torch.randperm(edge_index.shape[1], generator=torch.Generator().manual_seed(0))
    assert_rule(aggregate(x, edge_index, edge_weight), expected)
    assert_rule(aggregate(x, edge_index[:, order], edge_weight[order]), expected)


@pytest.mark.parametrize("dim", [5, AGGREGATION_CHUNK, 2 * AGGREGATION_CHUNK + 7])
def test_aggregation_matches_the_dense_product_and_pyg_message_passing(dim):
    from torch_geometric.nn import MessagePassing

    class SumNeighbours(MessagePassing):
        """PyG sum aggregation at edge_index[0] (flow target_to_source), as A x with A[row0, row1]."""

        def __init__(self):
            super().__init__(aggr="add", flow="target_to_source")

        def forward(self, x, edge_index, edge_weight):
            return self.propagate(edge_index, x=x, edge_weight=edge_weight)

        def message(self, x_j, edge_weight):
            return edge_weight.unsqueeze(-1) * x_j

    batch, bag = 3, 11
    x = torch.randn(batch, bag, dim)
    edge_index, edge_weight = random_graph(batch, bag, 90, seed=dim)
    out = aggregate(x, edge_index, edge_weight)
    assert_rule(out, torch.bmm(dense_adjacency(edge_index, edge_weight, batch, bag), x))
    pyg = SumNeighbours()(x.reshape(batch * bag, dim), edge_index, edge_weight).reshape(batch, bag, dim)
    assert_rule(out, pyg)


# -- GCNConv against torchmil -----------------------------------------------------------------

CONV_CASES = [
    {},
    {"add_self_loops": True},
    {"add_self_loops": True, "learn_weights": True},  # PatchGCN's layer
    {"out_dim": 40, "learn_weights": True, "layer_norm": True, "normalize": True, "activation": "relu"},
    {"out_dim": 9, "learn_weights": True, "bias": False, "activation": "gelu"},
    {"out_dim": 9},  # out_dim ignored without learn_weights, as in torchmil
]


def conv_kwargs(case: dict) -> dict:
    acts = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU}
    return {k: (acts[v]() if k == "activation" else v) for k, v in case.items()}


@pytest.mark.parametrize("dim", [6, 150])
@pytest.mark.parametrize("case", CONV_CASES)
def test_gcn_conv_matches_torchmil_with_a_dense_adjacency(case, dim):
    tm = torchmil_nn()
    reference = tm.GCNConv(dim, **conv_kwargs(case)).eval()
    randomise(reference, seed=dim)
    conv = GCNConv(dim, **conv_kwargs(case)).eval()
    conv.load_state_dict(torchmil_state(reference))
    batch, bag = 2, 13
    x = torch.randn(batch, bag, dim)
    edge_index, edge_weight = random_graph(batch, bag, 60, seed=1)
    with torch.no_grad():
        expected = reference(x, dense_adjacency(edge_index, edge_weight, batch, bag))
        assert_rule(conv(x, edge_index, edge_weight), expected)
    assert conv.out_dim == expected.shape[-1]


def test_gcn_conv_matches_torchmil_on_its_own_grid_graph():
    """torchmil's dataset graph (grid8, D^-1/2 A D^-1/2 + I) as its sparse adjacency, vs our edge list."""
    tm = torchmil_nn()
    from mil_train.interop.torchmil import torchmil_adjacency

    reference = tm.GCNConv(70, 70, add_self_loops=True, learn_weights=True).eval()
    randomise(reference, seed=3)
    conv = GCNConv(70, 70, add_self_loops=True, learn_weights=True).eval()
    conv.load_state_dict(torchmil_state(reference))
    coords = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(5), indexing="ij"), -1).reshape(1, 30, 2)
    mask = torch.ones(1, 30, dtype=torch.bool)
    mask[0, [4, 17]] = False  # holes in the tissue
    edge_index, edge_weight = batch_graph(coords, mask, "grid8", lone_self_loop=True)
    x = torch.randn(1, 30, 70)
    with torch.no_grad():
        expected = reference(x, torchmil_adjacency(edge_index, edge_weight, 1, 30))
        assert_rule(conv(x, edge_index, edge_weight), expected)


def test_gcn_conv_is_differentiable_through_the_edge_weights():
    conv = GCNConv(4, 3, learn_weights=True)
    x = torch.randn(1, 5, 4)
    edge_index, edge_weight = random_graph(1, 5, 12)
    edge_weight.requires_grad_(True)
    conv(x, edge_index, edge_weight).sum().backward()
    assert edge_weight.grad is not None and torch.isfinite(edge_weight.grad).all()


# -- DeepGCNLayer -------------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS)
def test_deep_gcn_layer_matches_torchmil(block):
    tm = torchmil_nn()
    dim = 12

    def parts(module):
        conv = module.GCNConv(dim, dim, add_self_loops=True, learn_weights=True)
        return conv, torch.nn.LayerNorm(dim), torch.nn.ReLU()

    reference = tm.DeepGCNLayer(*parts(tm), block=block).eval()
    randomise(reference, seed=4)
    conv, norm, act = parts(tm)
    layer = DeepGCNLayer(GCNConv(dim, dim, add_self_loops=True, learn_weights=True), norm, act, block=block).eval()
    layer.load_state_dict(torchmil_state(reference))
    batch, bag = 2, 9
    x = torch.randn(batch, bag, dim)
    edge_index, edge_weight = random_graph(batch, bag, 40, seed=5)
    with torch.no_grad():
        expected = reference(x, dense_adjacency(edge_index, edge_weight, batch, bag))
        assert_rule(layer(x, edge_index, edge_weight), expected)


def test_deep_gcn_layer_defaults_and_refusals():
    x = torch.randn(1, 4, 3)
    assert torch.equal(DeepGCNLayer()(x, None), x)  # no conv, norm or act: the identity, graph ignored
    assert DeepGCNLayer(block="dense")(x, None).shape == (1, 4, 6)
    with pytest.raises(ValueError, match="block"):
        DeepGCNLayer(block="residual")


# -- PatchGCN ---------------------------------------------------------------------------------


def grid_bag(n: int, width: int) -> torch.Tensor:
    index = torch.arange(n)
    return torch.stack([index // width, index % width], dim=1)  # (n, 2)


@pytest.mark.parametrize("config", [
    {"in_dim": 150, "hidden_dim": 70, "att_dim": 16, "n_gcn_layers": 3, "mlp_depth": 2},
    {"in_dim": 20, "att_dim": 8, "n_gcn_layers": 0},
])
def test_patch_gcn_matches_torchmil_beyond_one_aggregation_slice(config):
    """Widths over AGGREGATION_CHUNK and hidden != in_dim (torchmil's concatenation vs our blocks)."""
    pytest.importorskip("torchmil")
    from mil_train.interop.torchmil import build_reference, from_torchmil, reference_outputs

    torch.manual_seed(0)
    reference = build_reference("PatchGCN", **config)
    randomise(reference, seed=6)
    model = from_torchmil(reference, "PatchGCN", **config)
    coords = torch.zeros(2, 40, 2, dtype=torch.long)
    coords[0], coords[1, :23] = grid_bag(40, 7), grid_bag(23, 5)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0], mask[1, :23] = True, True
    X = torch.randn(2, 40, config["in_dim"])
    logits, attention = reference_outputs("PatchGCN", reference, X, mask, coords=coords)
    with torch.no_grad():
        out = model(X, mask, coords=coords)
    assert_rule(out.logits, logits)
    assert_rule(out.attention, attention)


def test_patch_gcn_padding_cannot_leak_through_edges_that_touch_it():
    """Padded rows hold 1e30 and an edge joins a real node to padding: the real nodes do not change."""
    from mil_train.models import create_model

    torch.manual_seed(0)
    model = create_model("PatchGCN", in_dim=8, att_dim=8, hidden_dim=6, n_gcn_layers=2).eval()
    X = torch.randn(1, 5, 8)
    mask = torch.tensor([[True, True, True, False, False]])
    edge_index = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])
    edge_weight = torch.full((6,), 0.5)
    with torch.no_grad():
        clean = model(X[:, :3], edge_index=edge_index[:, :4], edge_weight=edge_weight[:4])
        X[0, 3:] = 1e30
        leaky = model(X, mask, edge_index=edge_index, edge_weight=edge_weight)
    assert torch.isfinite(leaky.logits).all()
    assert_rule(leaky.logits, clean.logits)
    assert_rule(leaky.attention[:, :3], clean.attention)
    assert (leaky.attention[:, 3:] == 0).all()


def test_torchmil_turns_huge_padding_into_nan_logits_and_we_do_not():
    """torchmil's self loop carries a 1e30 padded row into its LayerNorm (variance overflows: NaN), and
    its pool's 0 weight times NaN reaches the logits; padding here is cleared before the first layer."""
    pytest.importorskip("torchmil")
    from mil_train.interop.torchmil import build_reference, from_torchmil, reference_outputs

    torch.manual_seed(0)
    reference = build_reference("PatchGCN", in_dim=16, att_dim=8)
    model = from_torchmil(reference, "PatchGCN", in_dim=16, att_dim=8)
    X = torch.randn(1, 6, 16)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    coords = torch.tensor([[[0, 0], [0, 1], [1, 0], [1, 1], [0, 0], [0, 0]]])
    clean_logits, _ = reference_outputs("PatchGCN", reference, X, mask, coords=coords)
    X[0, 4:] = 1e30
    huge_logits, _ = reference_outputs("PatchGCN", reference, X, mask, coords=coords)
    with torch.no_grad():
        ours = model(X, mask, coords=coords)
    assert torch.isnan(huge_logits).all()
    assert_rule(ours.logits, clean_logits)


def test_patch_gcn_builds_its_graph_from_coords_and_warns_without_one():
    from mil_train.models import create_model

    model = create_model("PatchGCN", in_dim=8, att_dim=8).eval()
    assert model.graph_rule == {"rule": "grid8", "params": {"lone_self_loop": True}}
    coords = grid_bag(12, 4)[None]
    X = torch.randn(1, 12, 8)
    edge_index, edge_weight = batch_graph(coords, None, "grid8", lone_self_loop=True)
    with torch.no_grad():
        given = model(X, edge_index=edge_index, edge_weight=edge_weight)
        built = model(X, coords=coords)
        with pytest.warns(UserWarning, match="neither edge_index nor coords"):
            alone = model(X)
    assert torch.equal(given.logits, built.logits) and torch.equal(given.attention, built.attention)
    assert not torch.allclose(alone.logits, given.logits)


def test_patch_gcn_refuses_torchmils_crashing_arguments():
    from mil_train.models import create_model

    with pytest.raises(ValueError, match="mlp_depth"):
        create_model("PatchGCN", in_dim=8, mlp_depth=0)
    with pytest.raises(ValueError, match="n_gcn_layers"):
        create_model("PatchGCN", in_dim=8, n_gcn_layers=-1)


def test_patch_gcn_exports_wide_layers_in_slices(tmp_path):
    """in_dim and hidden over one slice: onnxruntime matches eager on a grid graph; tensors on the edges
    axis are scalars per edge, and the neighbour tensors (nodes, K, chunk) are at most
    AGGREGATION_CHUNK wide (no (E, dim) messages, no (nodes, K, dim) gather)."""
    import onnx

    from mil_export import export_onnx
    from mil_export.onnx_export import example_inputs
    from mil_runtime.session import open_session
    from mil_train.models import create_model

    torch.manual_seed(0)
    model = create_model("PatchGCN", in_dim=150, hidden_dim=140, att_dim=16, n_gcn_layers=2).eval()
    path = export_onnx(model, tmp_path / "patch_gcn.onnx", tiling={"tile_px": 224, "mpp": 0.5, "overlap": 0.0})
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    neighbour_widths = []
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        static = int(np.prod([d for d in dims if isinstance(d, int)]))
        if any(isinstance(d, str) and "edges" in d for d in dims):
            assert static <= 1, f"{value.name} {dims}: more than one value per edge"
        if "batch*bag" in dims and len(dims) == 3:  # the per-node neighbour slots
            neighbour_widths.append(static)
    assert neighbour_widths and max(neighbour_widths) <= AGGREGATION_CHUNK, neighbour_widths
    session = open_session(path, device="cpu")
    lengths = (61, 30)
    features = torch.randn(2, 61, 150)
    feeds = {k: v.numpy() for k, v in example_inputs(model, lengths, features).items()}
    got = session.run(feeds)
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        out = model(tensors["features"], tensors["mask"], edge_index=tensors["edge_index"],
                    edge_weight=tensors["edge_weight"])
    for key, expected in (("logits", out.logits), ("attention", out.attention)):
        actual = torch.from_numpy(np.asarray(got[key]))
        assert_rule(actual, expected, tol=1e-4)
    # the slot count K is data-dependent in the file too: shuffled edges plus a node with 40 neighbours
    hub = torch.stack([torch.full((40,), 3), torch.arange(10, 50)])
    edge_index = torch.cat([tensors["edge_index"], hub], dim=1)
    edge_weight = torch.cat([tensors["edge_weight"], torch.full((40,), 0.1)])
    order = torch.randperm(edge_index.shape[1], generator=torch.Generator().manual_seed(0))
    feeds["edge_index"], feeds["edge_weight"] = edge_index[:, order].numpy(), edge_weight[order].numpy()
    got = session.run(feeds)
    with torch.no_grad():
        out = model(tensors["features"], tensors["mask"], edge_index=edge_index, edge_weight=edge_weight)
    assert_rule(torch.from_numpy(np.asarray(got["logits"])), out.logits, tol=1e-4)
    assert_rule(torch.from_numpy(np.asarray(got["attention"])), out.attention, tol=1e-4)
