"""A model trained with its own feature extractor: `mil-export model` writes it as an encoder + MIL pair,
and `mil-infer` runs the pair unchanged on a slide (the encoder found beside the model by its name)."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

SPEC = {"name": "small_cnn", "widths": [4, 8], "out_dim": 8, "input_px": 16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mil_train.checkpoint import save_checkpoint
    from mil_train.models import create_model

    torch.manual_seed(4)
    model = create_model("ABMIL", in_dim=8, n_classes=2, att_dim=8, feat_ext=SPEC).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # weights of their own: the exported pair must carry them
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "abmil_cnn.pt", class_names=["clean", "lesion"])
    return path, model


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """`mil-export model CKPT -o abmil_cnn.onnx --tile-px 16 --mpp 4`: (folder, its output)."""
    from mil_export.cli import main as export_main

    folder = tmp_path_factory.mktemp("pair")
    done = CliRunner().invoke(export_main, ["model", str(checkpoint[0]), "-o", str(folder / "abmil_cnn.onnx"),
                                            "--tile-px", "16", "--mpp", "4"])
    assert done.exit_code == 0, done.output
    return folder, done.output


def test_mil_export_writes_the_pair_and_refuses_an_outside_encoder(checkpoint, exported, tmp_path):
    from mil_export.cli import main as export_main
    from mil_runtime import load_model
    from mil_runtime.encoder import load_encoder

    ckpt, _ = checkpoint
    folder, output = exported
    out, encoder_path = folder / "abmil_cnn.onnx", folder / "abmil_cnn.encoder.onnx"
    assert f"wrote {encoder_path}" in output
    runner, encoder = load_model(out), load_encoder(encoder_path)
    assert runner.metadata.encoder.sha256 == hashlib.sha256(encoder_path.read_bytes()).hexdigest()
    assert encoder.name == "small_cnn" and encoder.tile_px == 16 and runner.metadata.tiling.tile_px == 16

    refused = CliRunner().invoke(export_main, ["model", str(ckpt), "-o", str(tmp_path / "x.onnx"),
                                               "--encoder", str(encoder_path)])
    assert refused.exit_code != 0 and "carries its own feature extractor" in refused.output
    assert not (tmp_path / "x.onnx").exists()


def test_mil_infer_runs_the_pair_on_a_slide(checkpoint, exported, tmp_path):
    """The slide's record: the encoder is the pair's (by sha256), and its attention and probabilities are
    the eager model's on the features the run wrote."""
    from mil_runtime import cli
    from mil_runtime.demo import write_synthetic_slide

    _, model = checkpoint
    folder = exported[0]
    slide = write_synthetic_slide(tmp_path / "s.svs", height=1024, width=1024, mpp=0.5, lesions=[(500, 500, 150)],
                                  tissue=0.6, seed=2).path
    run = CliRunner().invoke(cli.main, [str(slide), "--model", str(folder / "abmil_cnn.onnx"), "--out", str(tmp_path / "out"),
                                        "--quiet", "--workers", "1"])
    assert run.exit_code == 0, run.output
    record = json.loads((tmp_path / "out" / "s.json").read_text())
    encoder_sha = hashlib.sha256((folder / "abmil_cnn.encoder.onnx").read_bytes()).hexdigest()
    assert record["encoder"]["sha256"] == encoder_sha
    with h5py.File(tmp_path / "out" / "s.features.h5", "r") as h5:
        features = torch.from_numpy(np.asarray(h5["features"]))[None]  # (1, N, 8)
    assert features.shape[1] == len(record["tiles"]) > 10
    with torch.no_grad():
        eager = model(features)
    attention = np.array([t["attention"] for t in record["tiles"]])
    np.testing.assert_allclose(attention, eager.attention[0].numpy(), rtol=1e-4, atol=1e-5)
    probabilities = torch.softmax(eager.logits, -1)[0].numpy()
    np.testing.assert_allclose([record["probabilities"][c] for c in ("clean", "lesion")], probabilities, atol=1e-4)
