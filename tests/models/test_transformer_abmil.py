"""TransformerABMIL: torchmil parity on non-default knobs and padded batches, attention = pooling weights."""

from __future__ import annotations

import pytest
import torch

from mil_train.models import TransformerABMIL, create_model

pytest.importorskip("torchmil")

from mil_train.interop.torchmil import build_reference, from_torchmil, reference_outputs  # noqa: E402

D = 16
TOL = 1e-5


def assert_rule(actual, expected, tol: float = TOL) -> None:
    excess = (actual - expected).abs() - (tol + tol * expected.abs())
    assert excess.max() <= 0, f"max |a - b| = {(actual - expected).abs().max():.3e}"


def pair(**knobs):
    config = {"in_dim": D, "n_classes": 1, "pool_att_dim": 8, "transf_att_dim": 16, "transf_n_heads": 4, **knobs}
    torch.manual_seed(0)
    reference = build_reference("TransformerABMIL", **config)
    with torch.no_grad():  # move LayerNorms off their identity init so a swapped key would show
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return reference, from_torchmil(reference, "TransformerABMIL", **config)


def padded_batch(sizes, fill=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n_max = max(sizes)
    X = torch.randn(len(sizes), n_max, D, generator=generator)
    mask = torch.arange(n_max)[None, :] < torch.tensor(sizes)[:, None]
    return X.masked_fill(~mask[..., None], fill), mask


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"pool_gated": True, "pool_act": "relu"},
        {"transf_n_layers": 2, "transf_use_mlp": False},
        {"transf_add_self": False, "transf_att_dim": 32, "pool_act": "gelu"},
    ],
    ids=["defaults", "gated-relu", "two-layers-no-mlp", "no-self-wider"],
)
def test_matches_torchmil_alone_and_padded(knobs):
    reference, model = pair(**knobs)
    X, mask = padded_batch((9, 4, 1))
    ref_logits, ref_attention = reference_outputs("TransformerABMIL", reference, X, mask)
    with torch.no_grad():
        out = model(X, mask)
    assert_rule(out.logits, ref_logits)
    assert_rule(out.attention, ref_attention)


def test_nan_padding_breaks_torchmil_but_not_this_model():
    reference, model = pair()
    X, mask = padded_batch((7, 3), fill=float("nan"))
    ref_logits, _ = reference_outputs("TransformerABMIL", reference, X, mask)
    assert torch.isnan(ref_logits[1]).all()  # recorded in the model card
    with torch.no_grad():
        out = model(X, mask)
        alone = model(X[1:, :3])
    assert_rule(out.logits[1], alone.logits[0], tol=1e-6)


def test_attention_is_the_pooling_weights_of_the_encoded_bag():
    model = create_model("TransformerABMIL", in_dim=D, n_classes=3, pool_att_dim=8, transf_att_dim=16,
                         transf_n_heads=4).eval()
    X, mask = padded_batch((6, 2), seed=1)
    with torch.no_grad():
        out = model(X, mask)
        H = model.encoder(X, mask)
        pooled, weights = model.pool(H, mask)
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.attention, weights)
    torch.testing.assert_close(out.logits, model.classifier(pooled))


def test_declares_its_attention_bound():
    assert TransformerABMIL.max_bag_size == 11_585  # 8 heads x N x N float32 <= 4 GiB
