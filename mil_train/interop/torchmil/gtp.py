"""GTP <-> torchmil.models.GTP.

Where torchmil 1.0.2 differs, and how `reference_outputs` reaches a deterministic, comparable path:

- Graph input. torchmil's forward takes a sparse COO adjacency (batch, bag, bag); milkit passes the
  edge list, which `torchmil_adjacency` turns into that tensor here (tests only). Without a graph or
  coords both sides see no edges (an empty adjacency): the GCN then reduces to its self loop.
- Memory. `dense_mincut_pool` builds the degree matrix densely: `diag(d)` is `torch.eye(N)` cast
  to float and multiplied by the expanded degrees, two N x N float32 tensors (measured with the
  profiler at N = 3,000: aten::eye 69 MiB, aten::mul 34 MiB), and S^T D S multiplies through it.
  At 100,000 instances each is 40 GB: out of memory. milkit computes tr(S^T D S) as
  sum_i d_i |S_i|^2 and A S by scatter_add over the edges (`mil_train.nn.mincut_pool`), and its
  forward needs neither (the losses are only computed in `compute_loss`).
- torch.inference_mode. `dense_mincut_pool` takes the degrees as `torch.einsum("ijk->ij", adj)` on the
  sparse adjacency; einsum's reduction over a sparse COO tensor raises "Cannot set version_counter
  for inference tensor" inside inference_mode (it works under no_grad, and with a dense adjacency,
  or with torch.sparse.sum). `reference_outputs` runs under no_grad.
- GraphCAM (`return_cam=True`, what torchmil's `predict` returns by default). It is relevance
  propagation: `torch.autograd.grad` through hooks that store every layer's input with
  requires_grad, so it needs autograd (it cannot run under no_grad or inference_mode, nor export);
  its values are signed and unnormalised; multi-layer relevances are combined by an elementwise
  product (`cam.prod(dim=0)`), not a matrix product; and it is pushed back to the instances through
  the raw assignment logits `cluster_proj(X)`, not the softmax assignments S that pooled them.
  milkit's `attention` is instead the class token's attention rollout over the cluster tokens
  pushed back through S and normalised over the bag (docs/models/GTP.md). `reference_outputs`
  computes that same definition from torchmil's own tensors: the softmax weights each relprop
  Softmax module keeps after a forward (`att_module.softmax.Y`, set by torchmil's forward hook)
  and the assignment logits caught by a forward hook on `cluster_proj`, softmaxed and masked as
  torchmil's pooling does. So the parity check covers torchmil's GCN, assignments, pooling,
  transformer attention and logits.
- The pooled adjacency that `dense_mincut_pool` returns (with an in-place write to its diagonal) is
  discarded by GTP; milkit's forward does not compute it (`mil_train.nn.mincut_pool.pooled_adjacency`
  does, for tests).
- Losses: torchmil's `MinCutLoss` / `OrthoLoss` are milkit's `mincut` / `ortho` (batch means, each
  weighing 1). A bag without edges gives torchmil 0 / 0 = NaN in the min-cut loss; milkit gives 0.
- The GCN layer has add_self_loops=True: each tile's own features are added once more, unnormalised,
  before the linear map (twice for a one-instance bag, whose dataset graph has a self loop): both
  sides do this.
- The transformer's MLP uses ReLU (torchmil's relprop encoder), not the GELU of torchmil's other
  encoders; milkit mirrors it (`mil_train.models.gtp.ClusterTransformerLayer`).
- torchmil's head is binary (one logit): parity is for n_classes=1.

State-dict keys (after `strip_lazy`): gcn_conv.fc.*, cluster_proj.*, cls_token and classifier.* keep
their names; transformer_encoder.* become transformer.* by `convert_torchmil_state_dict`, with the
relprop layer's `in_proj` (the skip projection) read as the `att_proj` that table knows.
"""

from __future__ import annotations

import torch

from mil_train.interop.torchmil import TorchmilAdapter, register_adapter, strip_lazy, torchmil_adjacency
from mil_train.nn.transformer import convert_torchmil_state_dict

KEPT = ("gcn_conv.fc.", "cluster_proj.", "cls_token", "classifier.")


@register_adapter
class GTPAdapter(TorchmilAdapter):
    name = "GTP"

    def build_reference(self, config):
        from torchmil.models import GTP

        return GTP(
            in_shape=(config["in_dim"],),
            att_dim=config.get("att_dim", 512),
            n_clusters=config.get("n_clusters", 100),
            n_layers=config.get("n_layers", 1),
            n_heads=config.get("n_heads", 8),
            use_mlp=config.get("use_mlp", True),
            dropout=config.get("dropout", 0.0),
        )

    def convert_state_dict(self, state, config):
        state = strip_lazy(state)
        encoder = {}
        out = {}
        for key, value in state.items():
            if key.startswith("transformer_encoder."):
                encoder[key.replace(".in_proj.", ".att_proj.")] = value
            elif key.startswith(KEPT):
                out[key] = value
            else:
                raise KeyError(f"unexpected torchmil GTP key {key}")
        out.update(convert_torchmil_state_dict(encoder, "transformer_encoder.", "transformer."))
        return out

    def reference_outputs(self, reference, X, mask, *, edge_index=None, edge_weight=None, coords=None):
        from mil_train.data.graphs import TORCHMIL_GRAPH_RULE as GRAPH_RULE
        from mil_train.models.gtp import attention_rollout, instance_attention
        from mil_train.nn.mincut_pool import cluster_assignments

        batch, bag = X.shape[0], X.shape[1]
        if edge_index is None and coords is not None:
            from mil_train.data.graphs import batch_graph

            edge_index, edge_weight = batch_graph(coords, mask, GRAPH_RULE["rule"], **GRAPH_RULE["params"])
        if edge_index is None:
            adj = torch.sparse_coo_tensor(torch.zeros(3, 0, dtype=torch.int64), torch.zeros(0), (batch, bag, bag))
        else:
            adj = torchmil_adjacency(edge_index, edge_weight, batch, bag)
        caught = {}
        hook = reference.cluster_proj.register_forward_hook(lambda module, args, out: caught.update(logits=out))
        try:
            logits = reference(X, adj, mask)  # (batch,)
        finally:
            hook.remove()
        weights = [layer.att_module.softmax.Y for layer in reference.transformer_encoder.layers]
        S = cluster_assignments(caught["logits"], mask)  # (batch, bag, K) as torchmil's pool: softmax, masked
        relevance = attention_rollout(weights)[:, 0, 1:]  # (batch, K)
        return logits.reshape(batch, 1), instance_attention(S, relevance)
