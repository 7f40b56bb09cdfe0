"""benchmarks/wsi_mil.py: lesions are planted on the slide's own tissue, the cache holds the pipeline's
tiles with their true lesion fractions, the localisation scores match hand-computed cases, and a tiny
cross-validated run gives a full row per model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "wsi_mil.py"
SMALL_PX = 1536  # the smallest slides on which the demo tiling finds tissue reliably: ~25 tiles


def load_bench():
    spec = importlib.util.spec_from_file_location("_milkit_bench_wsi_mil", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.fixture(scope="module")
def bench():
    return load_bench()


@pytest.fixture(scope="module")
def cached(bench, tmp_path_factory):
    pytest.importorskip("tifffile")
    cache = tmp_path_factory.mktemp("wsi-cache")
    return cache, bench.generate(2, SMALL_PX, cache, log=lambda text: None)  # one lesion slide, one clean


def test_specs_alternate_lesion_and_clean_slides_with_radii_in_range(bench):
    specs = [bench.slide_spec(i, 4096) for i in range(40)]
    assert all(1 <= len(s["radii_px"]) <= 3 for s in specs[0::2])
    assert all(not s["radii_px"] for s in specs[1::2])
    low, high = (r / bench.SLIDE_MPP for r in bench.LESION_RADIUS_UM)
    radii = [r for s in specs for r in s["radii_px"]]
    assert low - 1 <= min(radii) and max(radii) <= high
    assert bench.slide_spec(6, 4096) == bench.slide_spec(6, 4096)  # the cache key stands for the slide


def test_cached_slides_hold_pipeline_tiles_and_true_lesion_fractions(bench, cached):
    cache, paths = cached
    assert [p.name for p in paths] == [f"slide{i:04d}.npz" for i in range(2)]
    assert not list(paths[0].parent.glob("*.svs"))  # slides are deleted once encoded
    slides = bench.load_slides(paths)
    for index, slide in enumerate(slides):
        spec = bench.slide_spec(index, SMALL_PX)
        assert slide["label"] == int(bool(spec["radii_px"]))
        assert slide["features"].shape == (len(slide["grid_yx"]), 64)
        lesions = bench.plant_lesions(spec)
        assert slide["lesions"].tolist() == [list(lesion) for lesion in lesions]
        tissue = bench.tissue_mask_of(spec)
        for cy, cx, _ in lesions:  # every centre sits on the slide's own tissue
            assert tissue[cy // 16, cx // 16]
        # Tile fractions from the discs, recomputed by hand on a 16 x 16 grid of pixel centres per tile.
        tile = int(slide["tile_level0"])
        offsets = (np.arange(16) + 0.5) * tile / 16
        for (x, y), fraction in zip(slide["xy_level0"], slide["lesion_fraction"]):
            ys, xs = np.meshgrid(y + offsets, x + offsets, indexing="ij")
            inside = np.zeros_like(ys, dtype=bool)
            for cy, cx, r in lesions:
                inside |= (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
            assert fraction == pytest.approx(inside.mean())
        if lesions:
            assert (slide["lesion_fraction"] > 0).any()
    # A second call finds them cached: same files, not rewritten.
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert [p.stat().st_mtime_ns for p in bench.generate(2, SMALL_PX, cache, log=lambda t: None)] == stamps


def _slide(label, fractions, shares=()):
    return {"label": label, "lesion_fraction": np.asarray(fractions, dtype=float),
            "lesion_share_of_tissue": np.asarray(shares, dtype=float)}


def test_localisation_scores_match_hand_computed_cases(bench):
    slides = [
        _slide(1, [0.0, 0.6, 0.2, 0.0], [0.005]),  # small lesion; attention's top tile is in it
        _slide(1, [0.0, 0.0, 1.0, 0.0], [0.05]),  # top tile misses; lesion tile ranks 2nd of 4
        _slide(0, [0.0, 0.0, 0.0]),  # clean slides are left out of localisation
    ]
    attention = [[0.1, 0.5, 0.3, 0.1], [0.9, 0.1, 0.5, 0.2], [1.0, 0.0, 0.0]]
    scores = bench.localisation(slides, attention)
    # Slide 1: both lesion tiles above both clean ones (AUROC 1); slide 2: lesion tile above 2 of 3 clean.
    assert scores["instance_auroc"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert scores["top_hit"] == pytest.approx(0.5)
    assert scores["top_hit_small"] == pytest.approx(1.0) and scores["n_small"] == 1
    missing = bench.localisation(slides, [None, None, None])
    assert np.isnan(missing["instance_auroc"]) and np.isnan(missing["top_hit"])


def fake_cached_slides(folder: Path, n: int = 4) -> list[Path]:
    """Cached-slide files as generate() writes them, with random features: what run_model reads."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(n):
        tiles = 12 + index
        fraction = np.zeros(tiles)
        fraction[:3] = 0.5 if index % 2 == 0 else 0.0
        path = folder / f"slide{index:04d}.npz"
        np.savez(path, features=rng.standard_normal((tiles, 8)).astype(np.float32),
                 grid_yx=np.stack(np.divmod(np.arange(tiles), 4), axis=1), label=int(index % 2 == 0),
                 lesion_fraction=fraction, lesion_share_of_tissue=np.array([0.02] if index % 2 == 0 else []))
        paths.append(path)
    return paths


def test_tiny_cross_validated_run_scores_every_slide(bench, tmp_path):
    paths = fake_cached_slides(tmp_path)
    job = {"model": "ABMIL", "paths": [str(p) for p in paths], "epochs": 1, "folds": 2, "cache": str(tmp_path)}
    result = bench.run_model(job)
    assert len(result["probabilities"]) == 4 and all(0.0 <= p <= 1.0 for p in result["probabilities"])
    slides = bench.load_slides(paths)
    assert [len(a) for a in result["attention"]] == [len(s["features"]) for s in slides]
    row = bench.score(slides, result)
    assert 0.0 <= row["slide_auroc"] <= 1.0 and 0.0 <= row["top_hit"] <= 1.0
    assert len(result["fit_seconds"]) == 2 and row["peak_rss_mb"] > 0
    line = bench.table([row, {"model": "TransMIL", "epochs": 1, "error": "not run (deadline 21:35 UTC)"}])
    assert line.splitlines()[2].startswith("| ABMIL | 1 | ") and "not run" in line.splitlines()[3]


def test_graph_models_get_their_graph_and_coords(bench, cached):
    from mil_train.models import create_model

    _, paths = cached
    slides = bench.load_slides(paths[:1])
    model = create_model("PatchGCN", in_dim=64, n_classes=1)
    (bag,) = bench.to_bags(model, slides, "cache")
    assert bag["coords"].tolist() == slides[0]["grid_yx"].tolist()
    assert bag["edge_index"].shape[0] == 2 and bag["edge_index"].shape[1] > 0


def test_features_are_standardised_with_the_training_fold_only(bench):
    slides = [{"features": np.array([[0.0, 10.0], [2.0, 10.0]])}, {"features": np.array([[4.0, 10.0]])},
              {"features": np.array([[100.0, -50.0]])}]  # the held-out slide must not move the scaling
    mean, std = bench.training_scaling(slides, [0, 1])
    assert mean.tolist() == pytest.approx([2.0, 10.0])
    assert std.tolist() == pytest.approx([np.sqrt(8 / 3), 1e-6])  # a constant feature keeps a floor, not 0
