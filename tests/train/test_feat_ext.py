"""Instance feature extractors (mil_train.feat_ext): the registry, applying them to real instances only in
chunks (checkpointed in training), models built with `feat_ext=`, checkpoints, and digit bags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil_train.feat_ext import (FeatureExtractor, SmallCNN, create_feature_extractor, encode_instances,
                                feature_extractor_spec, list_feature_extractors)
from mil_train.models import create_model

SPEC = {"name": "small_cnn", "widths": [4, 8], "out_dim": 6}


def images(batch: int, bag: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, bag, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_registry_builds_by_name_with_a_json_config():
    extractor = create_feature_extractor("small_cnn", out_dim=5, widths=[4, 8])
    assert isinstance(extractor, FeatureExtractor) and isinstance(extractor.backbone, SmallCNN)
    assert extractor.output_dim == 5 and extractor.in_shape == (3, 8, 8)
    assert feature_extractor_spec(extractor) == {"name": "small_cnn", "out_dim": 5, "widths": [4, 8]}
    again = create_feature_extractor("small_cnn", out_dim=5, widths=[4, 8])  # a fixed-seed init
    assert all(torch.equal(a, b) for a, b in zip(extractor.state_dict().values(), again.state_dict().values()))
    assert {"small_cnn", "tiny_cnn", "resnet50_trunc", "timm:<model>", "torchvision:<model>"} <= set(list_feature_extractors())
    with pytest.raises(KeyError, match="unknown feature extractor 'nope'"):
        create_feature_extractor("nope")
    with pytest.raises(ValueError, match="must be JSON"):
        create_feature_extractor("small_cnn", widths=(torch.tensor(1),))
    resnet = create_feature_extractor("torchvision:resnet18", input_px=32)
    assert resnet.output_dim == 512  # its fc removed, the pooled width measured


def test_real_instances_only_in_chunks_equal_one_image_at_a_time():
    extractor = create_feature_extractor(**SPEC).eval()
    X = images(2, 5)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    X[1, 2:] = 0  # padding
    with torch.no_grad():
        by_hand = torch.zeros(2, 5, 6)
        for b in range(2):
            for i in range(5):
                if mask[b, i]:
                    by_hand[b, i] = extractor(X[b, i:i + 1].float() / 255)[0]
        for chunk in (1, 3, 256):
            torch.testing.assert_close(encode_instances(extractor, X, mask, chunk), by_hand, rtol=1e-6, atol=1e-6)

    seen = []
    counting = create_feature_extractor(**SPEC)
    counting.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        encode_instances(counting, X, mask, 3)
    assert seen == [3, 3, 1]  # 7 real instances; the 3 padded ones never pass through


def test_checkpointed_chunks_give_the_plain_gradient():
    X, mask = images(2, 6, seed=1), torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    grads = []
    for chunk in (2, 256):
        extractor = create_feature_extractor(**SPEC)
        encode_instances(extractor, X, mask, chunk).square().sum().backward()
        grads.append([p.grad.clone() for p in extractor.parameters()])
    plain = create_feature_extractor(**SPEC)
    (plain(X[mask].float() / 255) ** 2).sum().backward()
    for chunked, whole, reference in zip(*grads, [p.grad for p in plain.parameters()]):
        torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(whole, reference, rtol=1e-5, atol=1e-6)


def test_a_model_on_images_equals_the_model_on_their_features():
    torch.manual_seed(0)
    model = create_model("ABMIL", in_dim=6, n_classes=1, att_dim=8, feat_ext=SPEC, instance_chunk=2).eval()
    X, mask = images(2, 5, seed=2), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        features = encode_instances(model.feat_ext, X, mask)
        on_images, on_features = model(X, mask), model(features, mask)
    torch.testing.assert_close(on_images.logits, on_features.logits)
    torch.testing.assert_close(on_images.attention, on_features.attention)
    assert model.config["feat_ext"] == SPEC and model.config["instance_chunk"] == 2
    with pytest.raises(ValueError, match="6-d features but ABMIL takes in_dim=7"):
        create_model("ABMIL", in_dim=7, feat_ext=SPEC)
    with pytest.raises(ValueError, match="instance_chunk is for models with a feature extractor"):
        create_model("ABMIL", in_dim=6, instance_chunk=4)


def test_checkpoint_rebuilds_a_registered_extractor_and_refuses_an_unregistered_one(tmp_path):
    from mil_train.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(1)
    model = create_model("ABMIL", in_dim=6, n_classes=1, att_dim=8, feat_ext=SPEC).eval()
    with torch.no_grad():
        for p in model.feat_ext.parameters():
            p.add_(0.1)  # weights unlike the registry's fixed init: the checkpoint must carry them
    loaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt"))
    X = images(1, 4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(X).logits, model(X).logits)

    from mil_train.feat_ext.registry import _small_cnn

    unregistered = create_model("ABMIL", in_dim=6, att_dim=8, feat_ext=_small_cnn(widths=[4, 8], out_dim=6))
    with pytest.raises(ValueError, match="not registered"):
        save_checkpoint(unregistered, tmp_path / "u.pt")
    assert not (tmp_path / "u.pt").exists()


def test_the_trainer_trains_the_extractor_end_to_end():
    from mil_train.data.digits import digit_bags
    from mil_train.trainer import Trainer, make_loader

    model = create_model("ABMIL", in_dim=6, n_classes=1, att_dim=8, feat_ext=SPEC)
    before = [p.detach().clone() for p in model.feat_ext.parameters()]
    Trainer(model, epochs=1, seed=0, progress=False).fit(make_loader(digit_bags(6), batch_size=2, shuffle=True, seed=0))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.feat_ext.parameters()))


def test_digit_bags_follow_the_protocol():
    from mil_train.data.digits import digit_bags, digit_pool

    train_pool, test_pool = digit_pool("train")[0], digit_pool("test")[0]
    assert len(train_pool) + len(test_pool) == 1797 and train_pool.dtype == np.uint8
    train_keys = {img.tobytes() for img in train_pool}
    assert sum(img.tobytes() in train_keys for img in test_pool) < 0.05 * len(test_pool)  # (duplicate digits exist)
    bags = digit_bags(300, target=3, seed=4)
    for bag in bags:
        assert bag["X"].shape[1:] == (3, 8, 8) and bag["X"].dtype == torch.uint8
        assert float(bag["Y"]) == float(bag["y_inst"].max())
    sizes = [bag["X"].shape[0] for bag in bags]
    assert 9 < np.mean(sizes) < 11 and 1.5 < np.std(sizes) < 2.5
    assert torch.equal(digit_bags(3, seed=4)[0]["X"], bags[0]["X"])  # seeded


@pytest.mark.slow  # 30 epochs of a CNN through ABMIL on 200 bags: ~25-45 s on one core
def test_small_cnn_and_abmil_learn_digit_bags_end_to_end():
    """Held-out bags (unseen images): bag AUROC >= 0.95; attention ranks the 9s first (instance AUROC >= 0.9)."""
    from sklearn.metrics import roc_auc_score

    from mil_train.data.digits import digit_bags
    from mil_train.trainer import Trainer, make_loader, seed_everything

    seed_everything(0)
    train, test = digit_bags(200, seed=1), digit_bags(200, split="test", seed=2)
    model = create_model("ABMIL", in_dim=32, n_classes=1, att_dim=32, feat_ext={"name": "small_cnn", "out_dim": 32})
    trainer = Trainer(model, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4), epochs=30, seed=0,
                      progress=False)
    trainer.fit(make_loader(train, batch_size=1, shuffle=True, seed=0))
    predicted = trainer.predict(make_loader(test, batch_size=1))
    assert roc_auc_score(predicted["Y"].numpy(), predicted["probabilities"].reshape(-1).numpy()) >= 0.95
    y_inst = np.concatenate([bag["y_inst"].numpy() for bag in test])
    attention = np.concatenate([a.numpy() for a in predicted["attention"]])
    assert roc_auc_score(y_inst, attention) >= 0.9


def test_exported_pair_matches_eager_on_images(tmp_path):
    """mil_export.export_pair: encoder (uint8 tiles in) + MIL graph, linked by sha256; predict_images on
    channels-last images equals the eager model on the same images within 1e-4; another encoder is refused."""
    from mil_export import export_pair
    from mil_runtime import load_model, predict_images
    from mil_runtime.encoder import load_encoder
    from mil_runtime.errors import ContractMismatchError

    torch.manual_seed(2)
    model = create_model("ABMIL", in_dim=6, n_classes=2, att_dim=8, feat_ext=SPEC).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mil_path, encoder_path = export_pair(model, tmp_path / "m.onnx", tmp_path / "m.encoder.onnx")
    runner, encoder = load_model(mil_path), load_encoder(encoder_path)
    assert runner.metadata.encoder.name == "small_cnn" and encoder.tile_px == 8
    for n in (1, 7, 300):
        X = images(1, n, seed=n)  # (1, n, 3, 8, 8) training layout
        with torch.no_grad():
            eager = model(X)
        got = predict_images(runner, encoder, X[0].permute(0, 2, 3, 1).numpy(), batch_size=128)  # (n, 8, 8, 3)
        np.testing.assert_allclose(got.attention, eager.attention[0].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.class_probabilities, torch.softmax(eager.logits, -1)[0].numpy(), rtol=1e-4,
                                   atol=1e-4)
    from mil_export.encoders import export_encoder

    other = create_feature_extractor(**SPEC)  # the same architecture and name, other weights
    export_encoder(other.to_tile_encoder().eval(), tmp_path / "o.encoder.onnx", name="small_cnn", tile_px=8)
    with pytest.raises(ContractMismatchError, match="not the same file"):
        predict_images(runner, load_encoder(tmp_path / "o.encoder.onnx"), images(1, 3)[0].permute(0, 2, 3, 1).numpy())


def image_folder(root, n_bags: int = 8, channels_last: bool = False):
    """A folder of .h5 image bags (`images` uint8) from digit bags, and its slide_id,label table."""
    import h5py

    from mil_train.data.digits import digit_bags

    root.mkdir()
    rows = ["slide_id,label"]
    for i, bag in enumerate(digit_bags(n_bags, seed=5)):
        images = bag["X"].numpy()  # (N, 3, 8, 8)
        with h5py.File(root / f"bag{i}.h5", "w") as h5:
            h5["images"] = images.transpose(0, 2, 3, 1) if channels_last else images
        rows.append(f"bag{i},{int(bag['Y'])}")
    (root.parent / "labels.csv").write_text("\n".join(rows) + "\n")
    return root, root.parent / "labels.csv"


def test_mil_train_learns_image_bags_with_a_feature_extractor(tmp_path):
    from click.testing import CliRunner

    from mil_train.checkpoint import load_checkpoint
    from mil_train.cli import main

    folder, labels = image_folder(tmp_path / "bags", channels_last=True)
    base = ["ABMIL", str(folder), "--labels", str(labels), "--epochs", "1", "--val-fraction", "0",
            "--model-arg", "att_dim=4"]
    done = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "m.pt"), "--feat-ext",
                                     '{"name": "small_cnn", "widths": [4, 8], "out_dim": 6}', "--instance-chunk", "3"])
    assert done.exit_code == 0, done.output
    model, _ = load_checkpoint(tmp_path / "m.pt")
    assert model.config["feat_ext"] == {"name": "small_cnn", "widths": [4, 8], "out_dim": 6}
    assert model.config["in_dim"] == 6 and model.instance_chunk == 3

    refusals = {
        "give a feature extractor": [],
        "takes (3, 16, 16)": ["--feat-ext", '{"name": "small_cnn", "input_px": 16}'],
        "--instance-chunk is for models with a feature extractor": ["--instance-chunk", "4"],
        "unknown feature extractor": ["--feat-ext", "nope"],
    }
    for message, extra in refusals.items():
        refused = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "x.pt"), *extra])
        assert refused.exit_code != 0 and message in refused.output, (message, refused.output)
        assert not (tmp_path / "x.pt").exists()


def test_every_constructor_takes_a_feature_extractor_and_a_copy_uses_its_own():
    """ABMIL(feat_ext=...) as create_model does; a deep copy (EMA, a fold's fresh model) computes its loss
    with its own extractor, not the original's."""
    import copy

    from mil_train.models import ABMIL

    model = ABMIL(in_dim=6, att_dim=8, feat_ext=SPEC, instance_chunk=2)
    assert model.config["feat_ext"] == SPEC and model.instance_chunk == 2
    with pytest.raises(ValueError, match="instance_chunk is for models with a feature extractor"):
        ABMIL(in_dim=6, instance_chunk=2)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.feat_ext.parameters():
            p.add_(0.5)
    batch = {"X": images(1, 4, seed=6), "Y": torch.tensor([1.0])}
    twin.compute_loss(batch)[1]["cls"].backward()
    assert all(p.grad is not None for p in twin.feat_ext.parameters())
    assert all(p.grad is None for p in model.feat_ext.parameters())
