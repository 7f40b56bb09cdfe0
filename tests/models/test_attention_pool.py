"""AttentionPool.pool_linear (ABMIL's fused path) against the plain form `linear(pool(H, mask))`:
the same logits and weights, the same gradients, and padding holding NaN reaches neither."""

from __future__ import annotations

import pytest
import torch

from mil_train.nn import AttentionPool


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("n_outputs", [1, 3])
def test_pool_linear_equals_the_linear_of_the_pool(gated, act, n_outputs):
    torch.manual_seed(0)
    pool, linear = AttentionPool(32, 8, act, gated), torch.nn.Linear(32, n_outputs)
    H = torch.randn(2, 20, 32, requires_grad=True)  # (batch, bag, dim)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False

    fused, weights = pool.pool_linear(H, mask, linear)
    pooled, reference_weights = pool(H, mask)
    reference = linear(pooled)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, reference_weights, rtol=1e-5, atol=1e-7)
    assert torch.all(weights[1, 12:] == 0)

    inputs = [*pool.parameters(), *linear.parameters(), H]
    fused_grads = torch.autograd.grad(fused.square().sum(), inputs)
    reference_grads = torch.autograd.grad(reference.square().sum(), inputs)
    for got, want in zip(fused_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert torch.all(fused_grads[-1][1, 12:] == 0)  # padding gets no gradient


def test_padding_that_holds_nan_reaches_neither_the_logits_nor_the_weights():
    torch.manual_seed(1)
    pool, linear = AttentionPool(32, 8, "tanh", gated=True), torch.nn.Linear(32, 2)
    H = torch.randn(2, 20, 32)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False
    clean, clean_weights = pool.pool_linear(H, mask, linear)
    H[1, 12:] = float("nan")
    fused, weights = pool.pool_linear(H, mask, linear)
    assert torch.isfinite(fused).all() and torch.isfinite(weights).all()
    torch.testing.assert_close(fused, clean, rtol=0, atol=0)
    torch.testing.assert_close(weights, clean_weights, rtol=0, atol=0)


@pytest.mark.parametrize("gated", [False, True])
def test_under_bf16_autocast_both_paths_agree_with_float32_to_bf16_precision(gated):
    torch.manual_seed(2)
    pool, linear = AttentionPool(64, 16, "tanh", gated), torch.nn.Linear(64, 2)
    H = torch.randn(1, 300, 64)
    mask = torch.ones(1, 300, dtype=torch.bool)
    exact, exact_weights = pool.pool_linear(H, mask, linear)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, weights = pool.pool_linear(H, mask, linear)
        pooled, plain_weights = pool(H, mask)
        plain = linear(pooled)
    for got in (fused, plain):
        torch.testing.assert_close(got.float(), exact, atol=0.03, rtol=0.03)
    for got in (weights, plain_weights):
        torch.testing.assert_close(got.float(), exact_weights, atol=2e-3, rtol=0.05)
