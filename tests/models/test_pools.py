"""MeanPool and MaxPool: against torchmil 1.0.2's, hand-computed attention, padding that holds huge values,
empty bags, and onnxruntime against eager through mil_export (as the pools of a Composed model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bag_helpers import pad
from mil_train.nn import MaxPool, MeanPool

HUGE = 1e30
tm = pytest.importorskip("torchmil.nn")


def assert_rule(actual, expected, tol: float) -> None:
    """|a - b| <= tol + tol |b| everywhere."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert np.all(np.abs(actual - expected) <= tol + tol * np.abs(expected)), np.max(np.abs(actual - expected))


def padded_bags(sizes=(5, 1, 9), dim: int = 6, fill: float = HUGE, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, dim, generator=generator) for n in sizes]
    return (*pad(bags, fill), bags)


@pytest.mark.parametrize(("ours", "theirs"), [(MeanPool, "MeanPool"), (MaxPool, "MaxPool")])
def test_pooled_equals_torchmil_and_padding_never_reaches_it(ours, theirs):
    X, mask, bags = padded_bags()
    pooled, attention = ours()(X, mask)
    assert_rule(pooled, getattr(tm, theirs)()(torch.where(mask[..., None], X, 0.0), mask), 1e-5)
    for b, bag in enumerate(bags):
        alone, alone_attention = ours()(bag[None])
        assert_rule(pooled[b], alone[0], 1e-6)
        assert torch.equal(attention[b, : len(bag)], alone_attention[0]) and bool((attention[b, len(bag):] == 0).all())
    assert torch.allclose(attention.sum(dim=1), torch.ones(len(bags)))


def test_mean_attention_is_one_over_n():
    X, mask, bags = padded_bags(fill=float("nan"))
    pooled, attention = MeanPool()(X, mask)
    assert torch.equal(attention[0, :5], torch.full((5,), 1 / 5)) and attention[1, 0] == 1.0
    assert bool(torch.isfinite(pooled).all())


def test_max_attention_is_each_instances_share_of_the_winning_features():
    X = torch.tensor([[[1.0, 5.0, 0.0, 2.0], [3.0, 5.0, -1.0, 2.0], [2.0, 4.0, -2.0, 9.0], [HUGE, HUGE, HUGE, HUGE]]])
    mask = torch.tensor([[True, True, True, False]])
    pooled, attention = MaxPool()(X, mask)
    assert pooled.tolist() == [[3.0, 5.0, 0.0, 9.0]]
    # feature 0 -> row 1, feature 1 -> tie of rows 0 and 1 goes to row 0, feature 2 -> row 0, feature 3 -> row 2
    assert attention.tolist() == [[0.5, 0.25, 0.25, 0.0]]


def test_an_empty_bag_pools_to_zero_and_leaves_its_neighbours_alone():
    X, mask, _ = padded_bags(sizes=(4, 3))
    mask[1] = False
    for pool in (MeanPool(), MaxPool()):
        pooled, attention = pool(X, mask)
        assert bool((pooled[1] == 0).all()) and bool((attention[1] == 0).all())
        assert torch.equal(pooled[0], pool(X[:1, :4])[0][0])  # torchmil's MeanPool zeroes every bag here


def test_max_pool_gradient_reaches_the_winners_only():
    X = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.5, 1.0]]], requires_grad=True)
    MaxPool()(X)[0].sum().backward()
    assert X.grad[0].tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]


@pytest.fixture(scope="module")
def exported_pool_model(tmp_path_factory):
    """exported_pool_model(pool) -> (eager Composed model with that pool, onnxruntime session), each once."""
    from mil_export import export_onnx
    from mil_runtime.session import open_session
    from mil_train.models import create_model

    folder = tmp_path_factory.mktemp("pools")
    cache = {}

    def get(pool: str):
        if pool not in cache:
            torch.manual_seed(0)
            model = create_model("Composed", in_dim=6, n_classes=2, pool=pool).eval()
            path = export_onnx(model, folder / f"{pool}.onnx", tiling={"tile_px": 224, "mpp": 0.5, "overlap": 0.0})
            cache[pool] = (model, open_session(path, device="cpu"))
        return cache[pool]

    return get


# max pooling's export is also in the quick loop through the registry tests (Composed's small config)
@pytest.mark.parametrize("pool", ["mean", pytest.param("max", marks=pytest.mark.slow)])
def test_exported_pool_matches_eager_with_huge_padding(exported_pool_model, pool):
    from mil_runtime import contract

    model, session = exported_pool_model(pool)
    for sizes in [(1,), (13,), (7, 2, 30)]:
        X, mask, _ = padded_bags(sizes, seed=len(sizes))
        out = session.run({contract.FEATURES: X.numpy(), contract.MASK: mask.numpy()})
        with torch.no_grad():
            eager = model(X, mask)
        assert_rule(out[contract.LOGITS], eager.logits, 1e-4)
        assert_rule(out[contract.ATTENTION], eager.attention, 1e-4)
        assert bool(np.all(out[contract.ATTENTION][~mask.numpy()] == 0))
