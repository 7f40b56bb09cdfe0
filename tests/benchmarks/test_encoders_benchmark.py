"""benchmarks/encoders.py: its options, the comparisons it reports (hand-computed cases), and a slow smoke run
on a 1-block timm ViT-S (the table's shape and the fp32 check, never its timings)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "encoders.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_milkit_bench_encoders", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_parse_into_lists_and_numbers(bench):
    args = bench.parse_args(["--encoders", "phikon, uni_v1,", "--depth", "2", "--batch", "4", "--tiles", "16",
                             "--device", "cuda", "--threads", "3", "--peak-tflops", "500", "--json", "x.json"])
    assert args.encoders == ["phikon", "uni_v1"]
    assert (args.depth, args.batch, args.tiles, args.threads, args.peak_tflops) == (2, 4, 16, 3, 500.0)
    assert args.device == "cuda" and args.json == Path("x.json")
    defaults = bench.parse_args([])
    assert defaults.encoders is None and defaults.depth is None and defaults.device == "cpu"
    assert defaults.threads >= 1 and defaults.memory_limit_gb == 10.0
    assert defaults.phases == ["export", "eager", "ort"]
    assert bench.parse_args(["--phases", "eager"]).phases == ["eager"]


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--depth", "-1"], ["--device", "tpu"], ["--phases", "eager,warp"]])
def test_bad_options_are_refused(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_relative_l2_per_tile_by_hand(bench):
    exact = np.array([[3.0, 4.0], [1.0, 0.0]])
    approx = np.array([[3.0, 4.5], [1.0, 0.0]])
    assert bench.relative_l2_per_tile(approx, exact).tolist() == pytest.approx([0.1, 0.0])
    assert bench.relative_l2(approx, exact) == pytest.approx(0.5 / np.sqrt(26))


def test_topk_overlap_is_one_on_equal_features_and_drops_when_the_top_tiles_change(bench):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 16)).astype(np.float32)  # (tiles, D)
    assert bench.abmil_topk_overlap(features, features.copy()) == (1.0, 10)
    shuffled = features[rng.permutation(40)]  # the same tiles in another order: other indices on top
    overlap, k = bench.abmil_topk_overlap(features, shuffled)
    assert k == 10 and overlap < 1.0
    assert bench.topk_size(12) == 6 and bench.topk_size(20) == 10


def test_table_row_from_hand_made_measurements(bench):
    args = bench.parse_args(["--device", "cuda"])
    row = {"encoder": "uni_v1", "depth": None, "tile_px": 224, "failed": {},
           "eager_fp16": {"tiles_per_s": 1000.0, "peak_rss_gb": 3.0, "output_dim": 1024, "params": 303_000_000,
                          "flops_per_tile": 2e11},
           "ort_fp16": {"tiles_per_s": 1500.0, "peak_rss_gb": 4.0}}
    text = bench.table([row], args, peak=1000.0, gemm=None)
    header, _, body = text.splitlines()
    cells = [c.strip() for c in body.strip("|").split("|")]
    named = dict(zip([c.strip() for c in header.strip("|").split("|")], cells))
    assert named["ORT / eager"] == "1.50x"
    assert named["ORT fp16 GFLOP/s"] == "300000"  # 2e11 FLOP x 1500 tiles/s
    assert named["% of 1000 TFLOP/s"] == "30"
    assert named["GFLOP/tile"] == "200.0" and named["peak RSS GB"] == "4.0"


@pytest.mark.slow
def test_smoke_run_on_a_one_block_vit(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--encoders", "timm:vit_small_patch16_224", "--depth", "1", "--tiles", "4",
         "--batch", "2", "--repeats", "1", "--threads", "1", "--json", str(out), "--markdown", str(tmp_path / "s.md")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["eager_fp32"]["output_dim"] == 384 and row["tile_px"] == 224
    assert row["eager_fp32"]["flops_per_tile"] > 0 and row["export_fp32"]["graph_mb"] > 0
    assert row["eager_fp32"]["tiles_per_s"] > 0 and row["ort_fp32"]["tiles_per_s"] > 0
    assert row["fp32_check_rel_l2"] < 1e-4  # the graph and the eager backbone compute the same features
    assert (tmp_path / "s.md").read_text().startswith("## Benchmark\n")


def test_flops_count_attention_by_hand(bench):
    """One SDPA over (1, heads, T, d): QK^T and AV are 2 x T^2 x d multiply-adds per head = 4 T^2 d FLOPs."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def forward(self, x):  # (1, heads, T, d)
            return nn.functional.scaled_dot_product_attention(x, x, x)

    heads, tokens, width = 4, 50, 16
    assert bench.flops_per_tile(Attention(), torch.randn(1, heads, tokens, width)) == 4 * heads * tokens ** 2 * width
