"""ProbSmoothABMIL <-> torchmil.models.ProbSmoothABMIL.

torchmil samples attention even in eval mode (n_samples_test = 5,000 draws, averaged), so its eval
output is random. `reference_outputs` runs torchmil on its own deterministic path instead: the same
module with its pool switched to covar_mode="zero" for the call, where torchmil's `_sample_f` returns
the mean logits unchanged (no draw, no clipping). That is torchmil's forward, masked softmax, pooling
and classifier on f = mean, i.e. milkit's eval-mode definition; the switch is undone afterwards.
"""

from __future__ import annotations

import contextlib

import torch

from mil_train.interop.torchmil import TorchmilAdapter, masked_normalise, register_adapter, strip_lazy

# torchmil ProbSmoothAttentionPool keys -> milkit ProbSmoothAttentionPool keys (after strip_lazy)
POOL_RENAMES = {
    "in_mlp.": "in_mlp.",
    "mu_f_nn.": "mean_head.",
    "log_diag_Sigma_nn.": "log_var_head.",
}


def rename_pool_keys(state: dict[str, torch.Tensor], source: str = "pool.", target: str = "pool.") -> dict[str, torch.Tensor]:
    """torchmil pool keys under `source` -> milkit's under `target`; other keys are left out."""
    out = {}
    for key, value in state.items():
        if not key.startswith(source):
            continue
        rest = key[len(source):]
        for old, new in POOL_RENAMES.items():
            if rest.startswith(old):
                out[target + new + rest[len(old):]] = value
                break
        else:
            raise KeyError(f"unexpected torchmil ProbSmoothAttentionPool key {key}")
    return out


@contextlib.contextmanager
def mean_path(pool: torch.nn.Module):
    """torchmil's pool with sampling off: covar_mode "zero" makes `_sample_f` return the mean."""
    saved = pool.covar_mode
    pool.covar_mode = "zero"
    try:
        yield pool
    finally:
        pool.covar_mode = saved


def deterministic_outputs(reference: torch.nn.Module, X: torch.Tensor, mask: torch.Tensor | None, *args):
    """(logits (batch, 1), normalised attention (batch, bag)) of torchmil's forward with f = mean.

    `args` come before mask in torchmil's forward (adj); mask is passed by keyword because torchmil's
    own `predict` passes it positionally into `adj` and so ignores it.
    """
    with mean_path(reference.pool):
        logits, scores = reference(X, *args, mask=mask, return_att=True)  # (batch,), (batch, bag)
    return logits.unsqueeze(-1), masked_normalise(scores, mask)


@register_adapter
class ProbSmoothABMILAdapter(TorchmilAdapter):
    name = "ProbSmoothABMIL"

    def build_reference(self, config):
        from torchmil.models import ProbSmoothABMIL

        return ProbSmoothABMIL(
            in_shape=(config["in_dim"],),
            att_dim=config.get("att_dim", 128),
            covar_mode=config.get("covar_mode", "diag"),
            n_samples_train=config.get("n_samples_train", 1000),
            n_samples_test=config.get("n_samples_test", 5000),
        )

    def convert_state_dict(self, state, config):
        state = strip_lazy(state)
        out = rename_pool_keys(state)
        for key, value in state.items():
            if key.startswith("classifier."):
                out[key] = value
            elif not key.startswith("pool."):
                raise KeyError(f"unexpected torchmil ProbSmoothABMIL key {key}")
        return out

    def reference_outputs(self, reference, X, mask):
        return deterministic_outputs(reference, X, mask, None)
