"""Composed: every composition of layer x pool against the same composition of torchmil 1.0.2's blocks,
padding, the config and its refusals, export of the compositions the registry tests do not reach (slow), and
torchmil's "swap attention pooling for graph pooling" experiment on planted positives (slow).

The registry tests (test_registry_models.py) run the full contract on the small config in model_cases.py
(max pooling, no graph: the registry reads `uses_graph` off the class, which describes the default)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bag_helpers import pad
from mil_train.models import create_model, get_model_class

IN_DIM = 16
HUGE = 1e30
LAYERS = (None, "transformer", "gcn")
POOLS = ("attention", "mean", "max", "mincut")
COMPOSITIONS = list(itertools.product(LAYERS, POOLS))


def assert_rule(actual, expected, tol: float, what) -> None:
    """The project's parity rule: |a - b| <= tol + tol |b| everywhere."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    assert np.all(np.abs(actual - expected) <= tol + tol * np.abs(expected)), (what, np.max(np.abs(actual - expected)))


def config(layer, pool, n_classes: int = 1) -> dict:
    """Small widths; every block on."""
    out = {"in_dim": IN_DIM, "n_classes": n_classes, "layer": layer, "pool": pool}
    if layer == "transformer":
        out["layer_args"] = {"att_dim": IN_DIM, "n_heads": 4}
    if layer == "gcn":
        out["layer_args"] = {"out_dim": 12, "n_layers": 2, "layer_norm": True}
    if pool in ("attention", "mincut"):
        out["pool_args"] = {"att_dim": 8, "gated": True, **({"n_clusters": 5} if pool == "mincut" else {})}
    return out


def graph_inputs(model, sizes) -> dict:
    """Grid coords and the model's own graph over them, for the compositions that read a graph."""
    from mil_export.onnx_export import example_inputs
    from mil_runtime import contract

    if not model.uses_graph:
        return {}
    inputs = example_inputs(model, list(sizes), torch.zeros(len(sizes), max(sizes), IN_DIM))
    return {k: v for k, v in inputs.items() if k in contract.MIL_OPTIONAL_INPUTS}


@pytest.mark.parametrize(("layer", "pool"), COMPOSITIONS)
def test_equals_the_same_composition_of_torchmil_blocks(layer, pool):
    pytest.importorskip("torchmil")
    from mil_train.interop.torchmil import build_reference, from_torchmil, reference_outputs

    torch.manual_seed(0)
    reference = build_reference("Composed", **config(layer, pool))
    model = from_torchmil(reference, "Composed", **config(layer, pool))
    for n in (1, 11):
        X = torch.randn(1, n, IN_DIM, generator=torch.Generator().manual_seed(n))  # (1, bag, D)
        spatial = graph_inputs(model, (n,))
        logits, attention = reference_outputs("Composed", reference, X, None, **spatial)
        with torch.no_grad():
            out = model(X, **spatial)
        assert_rule(out.logits, logits, 1e-5, (layer, pool, n))
        assert_rule(out.attention, attention, 1e-5, (layer, pool, n))


@pytest.mark.parametrize(("layer", "pool"), COMPOSITIONS)
def test_a_bag_alone_equals_the_bag_padded_with_huge_values(layer, pool):
    torch.manual_seed(1)
    model = create_model("Composed", **config(layer, pool, n_classes=3)).eval()
    generator = torch.Generator().manual_seed(2)
    bags = [torch.randn(n, IN_DIM, generator=generator) for n in (9, 4, 12)]
    X, mask = pad(bags, HUGE)
    with torch.no_grad():
        batch = model(X, mask, **graph_inputs(model, (9, 4, 12)))
        alone = model(bags[1][None], **graph_inputs(model, (4,)))
    assert torch.allclose(batch.logits[1], alone.logits[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(batch.attention[1, :4], alone.attention[0], atol=1e-6)
    assert bool((batch.attention[1, 4:] == 0).all())
    assert torch.allclose(batch.attention.sum(dim=1), torch.ones(3), atol=1e-6)


def test_the_blocks_decide_graph_bag_limit_and_losses():
    assert get_model_class("Composed").uses_graph is False  # the default composition reads no graph
    default = create_model("Composed", in_dim=IN_DIM)
    assert (default.uses_graph, default.graph_rule, default.max_bag_size) == (False, None, None)
    graph = create_model("Composed", **config("gcn", "attention"))
    assert graph.uses_graph and graph.graph_rule["rule"] == "grid8"
    assert create_model("Composed", **config(None, "mincut")).uses_graph
    # 4 heads x N x N float32 scores in 4 GiB: N = sqrt(2^32 / 16) = 16,384 (DESIGN section 7)
    assert create_model("Composed", **config("transformer", "mean")).max_bag_size == 16_384
    model = create_model("Composed", **config("gcn", "mincut"))
    X = torch.randn(2, 6, IN_DIM)
    batch = {"X": X, "mask": torch.ones(2, 6, dtype=torch.bool), "Y": torch.tensor([0.0, 1.0]), **graph_inputs(model, (6, 6))}
    _, losses = model.compute_loss(batch)
    assert set(losses) == {"cls", "mincut", "ortho"} and all(bool(torch.isfinite(v)) for v in losses.values())
    assert set(create_model("Composed", in_dim=IN_DIM).compute_loss(batch)[1]) == {"cls"}


def test_config_rebuilds_the_model_and_bad_blocks_are_refused():
    model = create_model("Composed", **config("gcn", "mincut"))
    rebuilt = create_model("Composed", **model.config)
    assert rebuilt.config == model.config
    assert model.config["layer_args"]["dropout"] == 0.0  # defaults are recorded, not implied
    with pytest.raises(ValueError, match="pool must be one of"):
        create_model("Composed", in_dim=IN_DIM, pool="sum")
    with pytest.raises(ValueError, match="layer must be one of"):
        create_model("Composed", in_dim=IN_DIM, layer="lstm")
    with pytest.raises(ValueError, match=r"takes .*got \['heads'\]"):
        create_model("Composed", in_dim=IN_DIM, layer="transformer", layer_args={"heads": 4})
    with pytest.raises(ValueError, match="no arguments"):
        create_model("Composed", in_dim=IN_DIM, pool="mean", pool_args={"att_dim": 8})


def test_a_feature_extractor_runs_before_the_blocks():
    """The slot every model has (create_model(feat_ext=)): images in, the same output as the blocks on the
    extractor's features; the checkpoint config names the extractor."""
    torch.manual_seed(0)
    model = create_model("Composed", **config("gcn", "mincut"), feat_ext={"name": "small_cnn", "out_dim": IN_DIM}).eval()
    images = torch.rand(2, 5, 3, 8, 8, generator=torch.Generator().manual_seed(4))  # (batch, bag, 3, H, W)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    spatial = graph_inputs(model, (5, 3))
    with torch.no_grad():
        features = model.feat_ext(images.flatten(0, 1)).reshape(2, 5, IN_DIM)  # (batch, bag, D)
        from_images = model(images, mask, **spatial)
        from_features = model(features, mask, **spatial)
    assert torch.allclose(from_images.logits, from_features.logits, atol=1e-6)
    assert torch.allclose(from_images.attention, from_features.attention, atol=1e-6)
    assert model.config["feat_ext"]["name"] == "small_cnn"
    assert create_model("Composed", **model.config).config == model.config


# the swap experiment's graph composition in the quick loop, the others (and the registry's max pool) slow
EXPORT_CASES = [pytest.param(layer, pool, marks=[] if (layer, pool) == ("gcn", "mincut") else [pytest.mark.slow])
                for layer, pool in COMPOSITIONS if (layer, pool) != (None, "max")]


@pytest.mark.parametrize(("layer", "pool"), EXPORT_CASES)
def test_every_composition_exports_and_matches_eager(tmp_path, layer, pool):
    """Each composition through mil_export and onnxruntime, three bags padded with huge values."""
    from mil_export import export_onnx
    from mil_runtime import contract
    from mil_runtime.session import open_session

    torch.manual_seed(0)
    model = create_model("Composed", **config(layer, pool, n_classes=3)).eval()
    path = export_onnx(model, tmp_path / "m.onnx", tiling={"tile_px": 224, "mpp": 0.5, "overlap": 0.0})
    session = open_session(path, device="cpu")
    sizes = (7, 30, 1)
    generator = torch.Generator().manual_seed(3)
    X, mask = pad([torch.randn(n, IN_DIM, generator=generator) for n in sizes], HUGE)
    spatial = graph_inputs(model, sizes)
    feeds = {contract.FEATURES: X.numpy(), contract.MASK: mask.numpy(), **{k: v.numpy() for k, v in spatial.items()}}
    out = session.run(feeds)
    with torch.no_grad():
        eager = model(X, mask, **spatial)
    assert_rule(out[contract.LOGITS], eager.logits, 1e-4, "logits")
    assert_rule(out[contract.ATTENTION], eager.attention, 1e-4, "attention")


# -- torchmil's experiment: the same GCN, attention pooling swapped for graph (min-cut) pooling ----------


def swap_experiment(pool: str, seed: int = 0) -> tuple[float, float]:
    """Train GCN + `pool` on planted positives (tiles on a grid, witnesses clustered); held-out AUROC of the
    bags and, in positive bags, of the attention against the witnesses."""
    from sklearn.metrics import roc_auc_score

    from mil_train.data import MILDataset, synthetic_bags
    from mil_train.trainer import Trainer, make_loader

    torch.manual_seed(seed)
    widths = {"pool_args": {"att_dim": 32}} if pool in ("attention", "mincut") else {}
    model = create_model("Composed", in_dim=32, layer="gcn", pool=pool, **widths)
    train, val, test = (MILDataset(synthetic_bags(n, 32, (20, 60), seed=s, with_coords=True), graph_rule=model.graph_rule)
                        for n, s in ((120, 10), (30, 11), (60, 12)))
    trainer = Trainer(model, lr=5e-4, epochs=30, patience=8, monitor="val_auroc", seed=seed, progress=False)
    trainer.fit(make_loader(train, batch_size=4, shuffle=True), make_loader(val, batch_size=8))
    predicted = trainer.predict(make_loader(test, batch_size=8))
    labels = [float(test[i]["Y"]) for i in range(len(test))]
    bag_auroc = roc_auc_score(labels, predicted["probabilities"][:, 0].numpy())
    instance = [roc_auc_score(test[i]["y_inst"].numpy(), predicted["attention"][i].numpy())
                for i in range(len(test)) if labels[i] == 1 and 0 < int(test[i]["y_inst"].sum()) < len(test[i]["y_inst"])]
    return bag_auroc, float(np.mean(instance))


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["attention", "mincut"])
def test_attention_pooling_swapped_for_graph_pooling_learns_planted_positives(pool):
    bag_auroc, instance_auroc = swap_experiment(pool)
    assert bag_auroc >= 0.95, f"GCN + {pool}: held-out bag AUROC {bag_auroc:.3f}"
    assert instance_auroc >= 0.8, f"GCN + {pool}: instance AUROC of attention {instance_auroc:.3f}"
