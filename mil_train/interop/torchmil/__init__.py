"""torchmil 1.0.2 -> milkit: rebuild a torchmil model as the matching milkit model, weights included.

    reference = torchmil.models.CLAM_SB(in_shape=(1024,))            # trained in torchmil
    model = from_torchmil(reference, "CLAM_SB", in_dim=1024)         # the same function in milkit

torchmil is a reference for tests and benchmarks, never a dependency of milkit itself: it is imported
only inside the adapters' `build_reference`. One module per model in this package registers a
`TorchmilAdapter` under the milkit registry name; every module here is imported on first use.

What an adapter knows, for one model:
  build_reference(config)      the torchmil model with the hyperparameters of a milkit config
  convert_state_dict(state)    torchmil state_dict keys (and layouts) -> milkit keys
  reference_outputs(ref, X, mask, *, edge_index, edge_weight, coords)
                               torchmil's eval-mode outputs in milkit's terms: logits (batch, 1)
                               and attention (batch, bag) normalised like milkit's (sum 1 over real
                               instances, 0 on padding), on torchmil's deterministic path; graph
                               models get milkit's edge list, which `torchmil_adjacency` turns into
                               the sparse adjacency torchmil takes
torchmil's heads are binary (one logit), so only n_classes=1 configs have a torchmil counterpart.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch

from mil_train.models import MILModel, create_model

_ADAPTERS: dict[str, "TorchmilAdapter"] = {}


class TorchmilAdapter:
    """How one milkit model corresponds to its torchmil original; subclass per model and register."""

    name: str = ""  # milkit registry name

    def build_reference(self, config: dict[str, Any]) -> torch.nn.Module:
        """A torchmil model (randomly initialised) with the same hyperparameters as `config`."""
        raise NotImplementedError

    def convert_state_dict(self, state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """torchmil state_dict -> milkit state_dict for a model built from `config`."""
        raise NotImplementedError

    def reference_outputs(
        self,
        reference: torch.nn.Module,
        X: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (batch, 1), attention (batch, bag)) of `reference` in eval mode, milkit's normalisation.

        edge_index / edge_weight: milkit's graph in the flattened (batch * bag) node space; coords
        (batch, bag, 2). Models that take neither ignore them.
        """
        raise NotImplementedError


def register_adapter(cls: type[TorchmilAdapter]) -> type[TorchmilAdapter]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` (the milkit registry name)")
    _ADAPTERS[cls.name] = cls()
    return cls


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def list_adapters() -> list[str]:
    _discover()
    return sorted(_ADAPTERS)


def get_adapter(name: str) -> TorchmilAdapter:
    _discover()
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise KeyError(f"no torchmil adapter for {name!r}; adapters: {', '.join(sorted(_ADAPTERS))}") from None


def build_reference(name: str, **config: Any) -> torch.nn.Module:
    """The torchmil counterpart of `create_model(name, **config)`, in eval mode."""
    return get_adapter(name).build_reference(config).eval()


def from_torchmil(reference: torch.nn.Module, name: str, **config: Any) -> MILModel:
    """The milkit model `name` built from `config`, holding `reference`'s weights, in eval mode."""
    model = create_model(name, **config)
    adapter = get_adapter(name)
    state = adapter.convert_state_dict(dict(reference.state_dict()), dict(model.config))
    model.load_state_dict(state)
    return model.eval()


def reference_outputs(name: str, reference: torch.nn.Module, X: torch.Tensor, mask: torch.Tensor | None = None,
                      **spatial: torch.Tensor | None):
    """torchmil's (logits (batch, 1), normalised attention (batch, bag)) for `reference`, eval mode.

    spatial: edge_index, edge_weight and coords for the models that take them, as milkit passes them.
    """
    given = {key: value for key, value in spatial.items() if value is not None}
    with torch.no_grad():
        return get_adapter(name).reference_outputs(reference.eval(), X, mask, **given)


def torchmil_adjacency(edge_index: torch.Tensor, edge_weight: torch.Tensor | None, batch: int, bag: int) -> torch.Tensor:
    """milkit's edge list over the flattened (batch * bag) nodes -> torchmil's sparse COO (batch, bag, bag).

    Edge (s, t) of bag b = s // bag becomes adj[b, s % bag, t % bag] = weight. Tests only: milkit
    itself never builds a sparse tensor.
    """
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.shape[1])
    source, target = edge_index[0], edge_index[1]  # (E,), (E,)
    if bool(((source // bag) != (target // bag)).any()):
        raise ValueError("an edge joins two bags; edges must stay inside their bag's node range")
    indices = torch.stack([source // bag, source % bag, target % bag])  # (3, E)
    return torch.sparse_coo_tensor(indices, edge_weight.float(), (batch, bag, bag)).coalesce()


def masked_normalise(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """torchmil returns attention before its softmax: apply milkit's masked softmax over the bag."""
    from mil_train.models import masked_softmax

    return masked_softmax(scores, mask)


def strip_lazy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchmil wraps Linear layers in LazyLinear (`<name>.module.weight`): drop the `.module` level."""
    return {key.replace(".module.", "."): value for key, value in state.items()}


def rename_prefixes(state: dict[str, torch.Tensor], renames: dict[str, str], model: str) -> dict[str, torch.Tensor]:
    """Rename each key by the first matching prefix of `renames`; a key none matches is an error
    (a torchmil version with other parameters must not load silently)."""
    out = {}
    for key, value in state.items():
        old = next((prefix for prefix in renames if key.startswith(prefix)), None)
        if old is None:
            raise KeyError(f"unexpected torchmil {model} key {key}")
        out[renames[old] + key[len(old):]] = value
    return out
