"""Every registered model, one set of checks: registering a model is what puts it under test.

For each name in `mil_train.models.list_models()`:
- eager contract: shapes, attention normalised over real instances and 0 on padding, a bag alone equals
  the bag padded in a batch whose padding holds huge values, deterministic eval, named finite losses;
- torchmil parity (models with a torchmil counterpart): torchmil's weights loaded, eval-mode logits
  and attention within |a - b| <= 1e-5 + 1e-5 |b| at bag sizes 1, 7 and (slow) 10,000;
- ONNX: symbolic axes, onnxruntime within 1e-4 + 1e-4 |b| of eager at 1, 2, a prime, a square and
  (slow) 20,000 or the model's declared `max_bag_size`, alone and padded; deterministic; `validate_onnx`
  rebuilds the eager model from the file; no tensor with two bag axes in models linear in N;
- training (slow): held-out bag AUROC >= 0.95 on planted positives, instance AUROC >= 0.8 where
  attention is meant to localise;
- the CLIs: `mil-train NAME`, `mil-infer` on a feature file, and (slow) on a slide.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from model_cases import IN_DIM, build_model, onnx_sizes, small_config, torchmil_large_bag, training_settings
from mil_runtime import contract
from mil_train.models import create_model, get_model_class, list_models
from bag_helpers import pad

MODELS = list_models()
N_CLASSES = (1, 3)
NO_TORCHMIL = {"CLAM_MB": "CLAM's multi-branch model is not in torchmil"}
TORCHMIL_TOL = 1e-5
ONNX_TOL = 1e-4
HUGE = 1e30  # what padded rows hold in the padding tests: it must not reach any real instance
LARGE_BAG = 20_000


def assert_close(actual, expected, tol: float, what: str) -> None:
    """The project's parity rule: |a - b| <= tol + tol * |b| everywhere."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    excess = np.abs(actual - expected) - (tol + tol * np.abs(expected))
    worst = float(np.max(excess, initial=-np.inf))
    assert worst <= 0, f"{what}: max |a - b| = {np.max(np.abs(actual - expected)):.3e} exceeds the {tol:g} rule"


def bags_of(sizes, seed: int = 0, dim: int = IN_DIM) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=generator) for n in sizes]



def spatial_inputs(model, bags: list[torch.Tensor], n_max: int) -> dict:
    """edge_index / edge_weight / coords for graph or spatial models (none for the attention family)."""
    from mil_export.onnx_export import example_inputs

    if not (model.uses_graph or model.uses_coords):
        return {}
    inputs = example_inputs(model, [len(b) for b in bags], torch.zeros(len(bags), n_max, IN_DIM))
    return {k: v for k, v in inputs.items() if k in contract.MIL_OPTIONAL_INPUTS}


def run(model, bags: list[torch.Tensor], fill: float = 0.0):
    X, mask = pad(bags, fill)
    with torch.no_grad():
        return model(X, mask, **spatial_inputs(model, bags, X.shape[1])), mask


# -- eager contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", N_CLASSES)
@pytest.mark.parametrize("name", MODELS)
def test_outputs_follow_the_contract(name, n_classes):
    model = build_model(name, n_classes)
    out, mask = run(model, bags_of((5, 1, 9)))
    assert out.logits.shape == (3, n_classes) and torch.isfinite(out.logits).all()
    assert out.attention.shape == mask.shape
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert (out.attention[~mask] == 0).all() and (out.attention >= 0).all()
    if model.class_attention and n_classes >= 2:  # one branch per class; a binary model has one map
        assert out.attention_by_class.shape == (3, n_classes, mask.shape[1])
        torch.testing.assert_close(out.attention_by_class.sum(dim=2), torch.ones(3, n_classes), atol=1e-5, rtol=0)
        assert (out.attention_by_class.transpose(1, 2)[~mask] == 0).all()
    else:
        assert out.attention_by_class is None


@pytest.mark.parametrize("n_classes", N_CLASSES)
@pytest.mark.parametrize("name", MODELS)
def test_bag_alone_equals_bag_padded_with_huge_values(name, n_classes):
    model = build_model(name, n_classes)
    bags = bags_of((6, 1, 11), seed=1)
    batched, _ = run(model, bags, fill=HUGE)
    for i, bag in enumerate(bags):
        alone, _ = run(model, [bag])
        n = len(bag)
        assert_close(batched.logits[i], alone.logits[0], 1e-5, f"{name} logits of bag {i}")
        assert_close(batched.attention[i, :n], alone.attention[0], 1e-5, f"{name} attention of bag {i}")
        if batched.attention_by_class is not None:
            assert_close(batched.attention_by_class[i, :, :n], alone.attention_by_class[0], 1e-5, f"{name} by class")


@pytest.mark.parametrize("name", MODELS)
def test_eval_is_deterministic(name):
    model = build_model(name, 3)
    bags = bags_of((40, 17), seed=2)
    first, _ = run(model, bags)
    second, _ = run(model, bags)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.attention, second.attention)


@pytest.mark.parametrize("n_classes", N_CLASSES)
@pytest.mark.parametrize("name", MODELS)
def test_compute_loss_names_finite_terms_that_train(name, n_classes):
    model = build_model(name, n_classes).train()
    X, mask = pad(bags_of((12, 3, 20), seed=3))
    Y = torch.tensor([1.0, 0.0, 1.0]) if n_classes == 1 else torch.tensor([2, 0, 1])
    batch = {"X": X, "mask": mask, "Y": Y, **spatial_inputs(model, [X[0]] * 3, X.shape[1])}
    logits, terms = model.compute_loss(batch)
    assert logits.shape == (3, n_classes)
    assert "cls" in terms and all(name.isidentifier() and name == name.lower() for name in terms)
    for term, value in terms.items():
        assert value.ndim == 0 and torch.isfinite(value), f"{name}: loss term {term} = {value}"
    sum(terms.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_config_is_json_and_rebuilds_the_model(name):
    model = build_model(name, 3)
    config = json.loads(json.dumps(model.config))
    rebuilt = create_model(name, **config)
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_blocks_import_on_their_own():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import mil_train.nn"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_model_declares_its_checks():
    for name in MODELS:
        cls = get_model_class(name)
        assert cls.max_bag_size is None or cls.max_bag_size >= 1_000, name
        assert isinstance(cls.attention_localises, bool), name


# -- torchmil parity ----------------------------------------------------------------------------


def test_every_model_has_a_torchmil_counterpart_or_a_reason():
    from mil_train.interop.torchmil import list_adapters

    assert set(MODELS) - set(NO_TORCHMIL) <= set(list_adapters())
    assert not set(NO_TORCHMIL) & set(list_adapters())


def torchmil_parity(name: str, n: int, seed: int = 0) -> None:
    """Both models get the same bag and, for graph and spatial models, the same grid coords and the same
    graph built from them by the model's rule (torchmil as its sparse adjacency)."""
    from mil_train.interop.torchmil import build_reference, from_torchmil, reference_outputs

    if name in NO_TORCHMIL:
        pytest.skip(NO_TORCHMIL[name])
    config = small_config(name, IN_DIM, 1)
    torch.manual_seed(seed)
    reference = build_reference(name, **config)
    model = from_torchmil(reference, name, **config)
    X = torch.randn(1, n, IN_DIM, generator=torch.Generator().manual_seed(seed + n))  # (1, bag, D)
    spatial = spatial_inputs(model, [X[0]], n)
    ref_logits, ref_attention = reference_outputs(name, reference, X, None, **spatial)
    with torch.no_grad():
        out = model(X, **spatial)
    assert_close(out.logits, ref_logits, TORCHMIL_TOL, f"{name} logits vs torchmil at {n}")
    assert_close(out.attention, ref_attention, TORCHMIL_TOL, f"{name} attention vs torchmil at {n}")


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("name", MODELS)
def test_torchmil_parity(name, n):
    torchmil_parity(name, n)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_torchmil_parity_large_bag(name):
    """10,000 instances; SETMIL and CAMIL at the size torchmil itself fits (DESIGN section 7)."""
    torchmil_parity(name, torchmil_large_bag(name))


# -- ONNX -------------------------------------------------------------------------------------


def eager_outputs(model, feeds: dict) -> dict:
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    optional = {k: v for k, v in tensors.items() if k in contract.MIL_OPTIONAL_INPUTS}
    with torch.no_grad():
        out = model(tensors[contract.FEATURES], tensors[contract.MASK], **optional)
    result = {
        contract.LOGITS: out.logits,
        contract.PROBABILITIES: model.probabilities(out.logits),
        contract.ATTENTION: out.attention,
    }
    if model.class_attention and model.n_classes >= 2:
        result[contract.ATTENTION_BY_CLASS] = out.attention_by_class
    return {k: v.numpy() for k, v in result.items()}


def contract_feeds(model, lengths, seed: int, fill: float = 0.0) -> dict:
    from mil_export.onnx_export import example_inputs

    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), max(lengths), IN_DIM, generator=generator)  # (batch, bag, D)
    inputs = example_inputs(model, lengths, features)
    mask = inputs[contract.MASK]
    inputs[contract.FEATURES] = torch.where(mask[..., None], features, torch.tensor(fill))
    return {k: v.numpy() for k, v in inputs.items()}


def check_onnx_at(exported, name: str, n_classes: int, n: int, padding: int = 3) -> None:
    """onnxruntime vs eager at bag size n, alone and as the middle bag of three (padded by up to `padding`)."""
    model, _, session = exported(name, n_classes)
    alone = contract_feeds(model, (n,), seed=n)
    padded = contract_feeds(model, (n + padding, n, n + 1), seed=n, fill=HUGE)
    padded[contract.FEATURES][1, :n] = alone[contract.FEATURES][0]
    ort_alone, ort_padded = session.run(alone), session.run(padded)
    eager_alone, eager_padded = eager_outputs(model, alone), eager_outputs(model, padded)
    for key, expected in eager_alone.items():
        assert_close(ort_alone[key], expected, ONNX_TOL, f"{name} {key} alone at {n}")
        assert_close(ort_padded[key], eager_padded[key], ONNX_TOL, f"{name} {key} padded at {n}")
    for key in (contract.LOGITS, contract.PROBABILITIES):
        assert_close(ort_padded[key][1], ort_alone[key][0], ONNX_TOL, f"{name} {key}: padded vs alone at {n}")
    assert_close(ort_padded[contract.ATTENTION][1, :n], ort_alone[contract.ATTENTION][0], ONNX_TOL, f"{name} padded")
    assert np.all(ort_padded[contract.ATTENTION][1, n:] == 0)


# The multi-class export of the seven slowest models to export (4.5-14 s each on 2 cores) runs in the
# slow suite; their binary export and every other model's multi-class export stay in the quick loop.
SLOW_MULTICLASS_EXPORT = {"TransMIL", "SmTransformerABMIL", "CAMIL", "SmABMIL", "GTP", "SETMIL", "IIBMIL"}
ONNX_CASES = [pytest.param(name, k, marks=[pytest.mark.slow] if k > 1 and name in SLOW_MULTICLASS_EXPORT else [])
              for name in MODELS for k in N_CLASSES]


@pytest.mark.parametrize(("name", "n_classes"), ONNX_CASES)
def test_onnx_matches_eager(exported, name, n_classes):
    for n in onnx_sizes(name):
        check_onnx_at(exported, name, n_classes, n)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_eager_large_bag(exported, name):
    limit = get_model_class(name).max_bag_size
    if limit is None:
        check_onnx_at(exported, name, 3, LARGE_BAG)
        return
    # Full self-attention: the declared size alone, in a session without onnxruntime's memory arena
    # (with the old explicit N x N graph the arena kept a run's blocks and took new ones: 23 GB for
    # IIBMIL; the fused MultiHeadAttention graph holds none, and the three self-attention models
    # together, eager included, peak at 1.06 GB RSS), then a padded batch of three bags of a quarter
    # of that size.
    import onnxruntime as ort

    model, path, _ = exported(name, 3)
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    n = min(LARGE_BAG, limit)
    feeds = contract_feeds(model, (n,), seed=n)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, feeds)))
    del session
    for key, expected in eager_outputs(model, feeds).items():
        assert_close(outputs[key], expected, ONNX_TOL, f"{name} {key} alone at {n}")
    check_onnx_at(exported, name, 3, n // 4, padding=n // 8)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_axes_are_symbolic_and_outputs_follow_metadata(exported, name):
    model, path, session = exported(name, 3)
    inputs = {i.name: i.shape for i in session.inference.get_inputs()}
    assert inputs[contract.FEATURES] == [contract.BATCH_AXIS, contract.BAG_AXIS, IN_DIM]
    assert inputs[contract.MASK] == [contract.BATCH_AXIS, contract.BAG_AXIS]
    outputs = {o.name: o.shape for o in session.inference.get_outputs()}
    assert outputs[contract.LOGITS] == [contract.BATCH_AXIS, 3]
    assert outputs[contract.ATTENTION] == [contract.BATCH_AXIS, contract.BAG_AXIS]
    assert (contract.ATTENTION_BY_CLASS in outputs) == model.class_attention
    if model.class_attention:
        assert outputs[contract.ATTENTION_BY_CLASS] == [contract.BATCH_AXIS, 3, contract.BAG_AXIS]
    assert session.metadata.model_name == name and session.metadata.model_config == model.config


@pytest.mark.parametrize("name", MODELS)
def test_onnx_is_deterministic(exported, name):
    model, _, session = exported(name, 1)
    feeds = contract_feeds(model, (300, 257), seed=5)
    first, second = session.run(feeds), session.run(feeds)
    for key in first:
        assert np.array_equal(first[key], second[key]), f"{name} {key} differs between two runs"


@pytest.mark.parametrize("name", MODELS)
def test_no_exported_tensor_has_two_bag_axes(exported, name):
    """O(N) memory in onnxruntime: no (.., bag, .., bag) tensor, also in the self-attention models,
    whose attention is one fused node (its outputs are (batch, bag, dim)). Symbolic shapes first."""
    _, path, _ = exported(name, 1)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    values = [*inferred.graph.value_info, *inferred.graph.output]
    assert values, "shape inference found no intermediate shapes to check"
    offenders = []
    for value in values:
        dims = [d.dim_param for d in value.type.tensor_type.shape.dim]
        if sum(1 for d in dims if "bag" in d) >= 2:
            offenders.append(f"{value.name} {dims}")
    assert not offenders, f"{name}: tensors with two bag axes: {offenders[:5]}"


@pytest.mark.parametrize("name", MODELS)
def test_no_accumulating_scatter_nd_in_the_exported_graph(exported, name):
    """DESIGN section 4: index_add / index_put(accumulate=True) export to ScatterND with reduction add,
    which onnxruntime sums wrongly and run-to-run differently on several threads; sums over repeated
    indices must be ScatterElements (scatter_add) or gathers. Subgraphs included."""

    def nodes(graph):
        for node in graph.node:
            yield node
            for attribute in node.attribute:
                subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
                for subgraph in subgraphs:
                    yield from nodes(subgraph)

    _, path, _ = exported(name, 1)
    offenders = [
        node.name for node in nodes(onnx.load(str(path)).graph)
        if node.op_type == "ScatterND"
        and any(a.name == "reduction" and onnx.helper.get_attribute_value(a) != b"none" for a in node.attribute)
    ]
    assert not offenders, f"{name}: accumulating ScatterND nodes {offenders[:5]}"


BAG_FOR_SHAPES = 301  # larger than every width of the test configs, so only bag-sized axes reach it


@pytest.mark.parametrize("name", MODELS)
def test_no_intermediate_tensor_is_bag_by_bag_when_run(exported, name):
    """The same, on the shapes onnxruntime actually produces: symbolic inference loses data-dependent
    axes (a padded token count, a grid side, an edge count), so every node output of the top-level
    graph becomes a graph output and one bag of 301 instances runs. No tensor may have two axes of at
    least 301 (bag, tokens, edges), nor 301^2 elements in any two axes together."""
    import onnxruntime as ort

    model, path, _ = exported(name, 1)
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.value_info, *proto.graph.output]}
    existing = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        for output in node.output:
            if output and output not in existing and types.get(output):
                proto.graph.output.append(onnx.helper.make_tensor_value_info(output, types[output], None))
                existing.add(output)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = contract_feeds(model, (BAG_FOR_SHAPES,), seed=0)
    names = [o.name for o in session.get_outputs()]
    offenders = []
    for output, value in zip(names, session.run(names, feeds)):
        large = sorted((d for d in np.shape(value) if d >= BAG_FOR_SHAPES), reverse=True)
        if len(large) >= 2:
            offenders.append(f"{output} {np.shape(value)}")
    assert len(names) > 10, "too few intermediate tensors exposed to check"
    assert not offenders, f"{name}: bag-by-bag tensors: {offenders[:5]}"


@pytest.mark.parametrize("name", MODELS)
def test_validate_rebuilds_the_eager_model_from_the_file(exported, name):
    from mil_export import validate_onnx

    _, path, _ = exported(name, 1)
    rows = validate_onnx(path, sizes=(1, 13))
    assert len(rows) == 4
    assert max(row.max_error for row in rows) <= ONNX_TOL


# -- training on planted positives ----------------------------------------------------------------


def instance_auroc(bags, attention) -> float:
    from mil_train.metrics import classification_metrics  # noqa: F401  (sklearn comes with it)
    from sklearn.metrics import roc_auc_score

    values = [roc_auc_score(bag["y_inst"].numpy(), att.numpy()) for bag, att in zip(bags, attention)
              if 0 < int(bag["y_inst"].sum()) < len(bag["y_inst"])]
    return float(np.mean(values))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_trains_to_planted_positives(name):
    from sklearn.metrics import roc_auc_score

    from mil_train.data import synthetic_bags
    from mil_train.trainer import Trainer, make_loader

    # tiles on a grid, witnesses clustered: what smoothness priors (ProbSmooth's KL) are built for
    train = synthetic_bags(120, feature_dim=IN_DIM, bag_size=(20, 60), seed=10, with_coords=True)
    val = synthetic_bags(30, feature_dim=IN_DIM, bag_size=(20, 60), seed=11, with_coords=True)
    test = synthetic_bags(60, feature_dim=IN_DIM, bag_size=(20, 60), seed=12, with_coords=True)
    model = build_model(name, 1, seed=0)
    if model.uses_graph:  # built once per bag by the model's rule, as mil-train does
        from mil_train.data import MILDataset

        train, val, test = ([MILDataset(bags, graph_rule=model.graph_rule)[i] for i in range(len(bags))]
                            for bags in (train, val, test))
    trainer = Trainer(model, **training_settings(name), monitor="val_auroc", seed=0, progress=False)
    trainer.fit(make_loader(train, batch_size=4, shuffle=True), make_loader(val, batch_size=8))
    predicted = trainer.predict(make_loader(test, batch_size=8))
    labels = [float(bag["Y"]) for bag in test]
    bag_auroc = roc_auc_score(labels, predicted["probabilities"][:, 0].numpy())
    assert bag_auroc >= 0.95, f"{name}: held-out bag AUROC {bag_auroc:.3f}"
    if model.attention_localises:
        positives = [i for i, y in enumerate(labels) if y == 1]
        auroc = instance_auroc([test[i] for i in positives], [predicted["attention"][i] for i in positives])
        assert auroc >= 0.8, f"{name}: instance AUROC of attention {auroc:.3f}"


# -- the command lines ------------------------------------------------------------------------------


def write_mil_csv(path, bags) -> None:
    rows = []
    for b, bag in enumerate(bags):
        for label, x in zip(bag["y_inst"].tolist(), bag["X"].numpy()):
            rows.append(",".join([str(label), str(b), *(f"{v:.5f}" for v in x)]))
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def mil_csv(tmp_path_factory):
    from mil_train.data import synthetic_bags

    path = tmp_path_factory.mktemp("csv") / "bags.csv"
    write_mil_csv(path, synthetic_bags(16, feature_dim=IN_DIM, bag_size=(5, 15), seed=3))
    return path


@pytest.fixture(scope="module")
def mil_h5_folder(tmp_path_factory):
    """CLAM/TRIDENT feature files with tile coords and their labels table: data for spatial models."""
    from mil_runtime.features_io import write_feature_file
    from mil_train.data import synthetic_bags

    folder = tmp_path_factory.mktemp("h5")
    tile = 256
    rows = ["slide_id,label"]
    for b, bag in enumerate(synthetic_bags(16, feature_dim=IN_DIM, bag_size=(5, 15), seed=3, with_coords=True)):
        coords_px = bag["coords"].numpy()[:, ::-1] * tile  # (N, 2) level-0 (x, y)
        write_feature_file(folder / f"slide{b}.h5", bag["X"].numpy(), coords_px, tile, mpp=0.5)
        rows.append(f"slide{b},{int(bag['Y'])}")
    labels = tmp_path_factory.mktemp("labels") / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return folder, labels


@pytest.mark.parametrize("name", MODELS)
def test_mil_train_cli_trains_and_saves_the_model(tmp_path, mil_csv, mil_h5_folder, name):
    from mil_train.checkpoint import load_checkpoint
    from mil_train.cli import main

    args = [f"{k}={json.dumps(v)}" for k, v in small_config(name, IN_DIM, 1).items() if k not in ("in_dim", "n_classes")]
    out = tmp_path / f"{name}.pt"
    spatial = get_model_class(name).uses_graph or get_model_class(name).uses_coords
    data = [str(mil_h5_folder[0]), "--labels", str(mil_h5_folder[1])] if spatial else [str(mil_csv)]
    cli_args = [name, *data, "-o", str(out), "--epochs", "2", "--batch-size", "2"]
    for arg in args:
        cli_args += ["--model-arg", arg]
    result = CliRunner().invoke(main, cli_args)
    assert result.exit_code == 0, result.output
    model, payload = load_checkpoint(out)
    assert model.name == name and payload["config"]["in_dim"] == IN_DIM


def training_feeds(model, features: np.ndarray, grid: np.ndarray) -> dict:
    """One bag as the training side feeds it: coords in grid units and, for graph models, the graph that
    `MILDataset(graph_rule=model.graph_rule)` and `collate` build from them."""
    from mil_train.data import MILDataset, collate, make_bag

    feeds = {contract.FEATURES: features[None], contract.MASK: np.ones((1, len(features)), bool)}
    if not (model.uses_graph or model.uses_coords):
        return feeds
    bag = make_bag(features, np.float32(0), coords=grid)
    batch = collate([MILDataset([bag], graph_rule=model.graph_rule if model.uses_graph else None)[0]])
    if model.uses_coords:
        feeds[contract.COORDS] = batch["coords"].numpy()
    if model.uses_graph:
        feeds[contract.EDGE_INDEX] = batch["edge_index"].numpy()
        feeds[contract.EDGE_WEIGHT] = batch["edge_weight"].numpy()
    return feeds


@pytest.mark.parametrize("name", [m for m in MODELS if get_model_class(m).uses_graph])
def test_runtime_builds_the_training_graph_from_the_recorded_rule(exported, name):
    """The exported file records the model's rule; the runtime's numpy rule over padded coords gives
    the edges and weights the training side's dataset and collate give, bag for bag."""
    from mil_runtime.graphs import batch_graph as runtime_batch_graph
    from mil_train.data import MILDataset, collate, make_bag

    model, _, session = exported(name, 1)
    assert session.metadata.graph == model.graph_rule
    rng = np.random.default_rng(7)
    bags, coords = [], []
    for n, side in ((30, 8), (11, 5), (57, 12)):
        cells = rng.choice(side * side, size=n, replace=False)
        grid = np.stack([cells // side, cells % side], axis=1).astype(np.int64) + 3  # holes, offset
        coords.append(grid)
        bags.append(make_bag(rng.standard_normal((n, 4)).astype(np.float32), np.float32(0), coords=grid))
    batch = collate([MILDataset(bags, graph_rule=model.graph_rule)[i] for i in range(len(bags))])
    padded = np.zeros((3, 57, 2), dtype=np.int64)
    for b, grid in enumerate(coords):
        padded[b, : len(grid)] = grid
    rule = session.metadata.graph
    edge_index, edge_weight = runtime_batch_graph(padded, batch["mask"].numpy(), rule["rule"], **(rule.get("params") or {}))
    np.testing.assert_array_equal(edge_index, batch["edge_index"].numpy())
    np.testing.assert_allclose(edge_weight, batch["edge_weight"].numpy(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", MODELS)
def test_mil_infer_on_a_feature_file(tmp_path, exported, name):
    from mil_runtime.cli import main
    from mil_runtime.features_io import write_feature_file

    model, path, _ = exported(name, 3)
    n, width, tile = 37, 7, 256
    features = np.random.default_rng(4).standard_normal((n, IN_DIM)).astype(np.float32)
    index = np.arange(n)
    coords_px = np.stack([(index % width) * tile, (index // width) * tile], axis=1).astype(np.int64)
    h5 = write_feature_file(tmp_path / "slide.features.h5", features, coords_px, tile, mpp=0.5)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(h5), "--model", str(path), "--out", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["n_instances"] == n
    grid = np.stack([index // width, index % width], axis=1)  # (n, 2) (y, x): what the runtime derives
    eager = eager_outputs(model, training_feeds(model, features, grid))
    probabilities = list(record["probabilities"].values())
    assert_close(probabilities, eager[contract.PROBABILITIES][0], ONNX_TOL, f"{name} mil-infer probabilities")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_mil_infer_on_a_slide(tmp_path_factory, name):
    import warnings

    from mil_export import export_onnx
    from mil_export.encoders import build_encoder, export_encoder
    from mil_runtime.cli import main
    from mil_runtime.demo.synthetic_slide import write_synthetic_slide
    from mil_runtime.encoder import encoder_filename, sha256_file

    folder = tmp_path_factory.mktemp(f"slide-{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pretrained weights: plumbing only
        encoder, _ = build_encoder("tiny_cnn")
    encoder_path = export_encoder(encoder, folder / encoder_filename("tiny_cnn"), name="tiny_cnn")
    model = build_model(name, 3, in_dim=encoder.output_dim)
    ref = {"name": "tiny_cnn", "output_dim": encoder.output_dim, "sha256": sha256_file(encoder_path)}
    model_path = export_onnx(model, folder / f"{name}.onnx", class_names=["a", "b", "c"], encoder=ref,
                             tiling={"tile_px": 112, "mpp": 2.0, "overlap": 0.0})
    slide = folder / "slide.svs"
    write_synthetic_slide(slide, height=2048, width=2048, lesions=1, seed=1)
    out = folder / "out"
    result = CliRunner().invoke(main, [str(slide), "--model", str(model_path), "--out", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["n_instances"] > 0 and math.isclose(sum(record["probabilities"].values()), 1.0, abs_tol=1e-5)
    assert (out / "slide.heatmap.png").is_file() and (out / "slide.tiles.geojson").is_file()
    per_class = sorted(p.name for p in out.glob("slide.heatmap.*.png"))
    assert per_class == ([f"slide.heatmap.{c}.png" for c in "abc"] if model.class_attention else [])


@pytest.mark.parametrize("name", [m for m in MODELS if get_model_class(m).uses_graph or get_model_class(m).uses_coords])
def test_mil_train_refuses_bags_without_coords_for_spatial_models(tmp_path, mil_csv, name):
    from mil_runtime.errors import InvalidInputError
    from mil_train.cli import main

    result = CliRunner().invoke(main, [name, str(mil_csv), "-o", str(tmp_path / "m.pt"), "--epochs", "1"])
    assert result.exit_code == InvalidInputError.exit_code, result.output
    assert "have no coords" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()
