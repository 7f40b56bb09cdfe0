"""Attention / LayerNorm / GELU fusion of exported ViT graphs with onnxruntime's transformer optimizer.

Why a rewrite before export: onnxruntime's fusion (`onnxruntime.transformers.optimizer`, model_type "vit")
matches the attention layout of BERT-style exports: three projections, each MatMul -> Add -> Reshape ->
Transpose, scores = MatMul(q, k) / sqrt(head_dim) -> Softmax -> MatMul(v), then Transpose -> Reshape ->
MatMul -> Add into the residual. timm's `Attention` exports differently under torch.export: one packed qkv
projection split by Slice + Squeeze, and scaled_dot_product_attention decomposed with sqrt(scale) applied to
both q and k through a Reshape/Transpose detour; with fused_attn off the Slice + Squeeze split remains. Neither
matches, so nothing fuses but LayerNorm and GELU. A block scaled by LayerScale (UNI, Virchow2, H-optimus-0)
also puts a Mul between the output projection and the residual Add, which breaks the match. And the matcher
takes the first Add feeding the residual: in block 0 that is the position-embedding Add (x + pos_embed), so
block 0 only fuses when the attention branch is the Add's first input.

transformers' ViT (Phikon) has separate q/k/v projections, but scales the scores by a Mul after the product,
which no pattern expects. So, for the export only, each timm `Block` gets `FusableAttention`: the same weights (q, k, v as views of the
packed qkv matrix; LayerScale folded into the output projection, which is exact in real arithmetic) in the
layout above, and a forward that adds the attention branch before the residual; each transformers
`ViTAttention` gets a forward that divides by sqrt(head_dim). All is undone afterwards; the eager model is
never changed.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import math
from typing import Any, Iterator

import torch
from torch import nn


MICROSOFT_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (Attention, SkipLayerNormalization, BiasGelu)


class FusableAttention(nn.Module):
    """timm's multi-head self-attention (and its block's LayerScale) in the layout onnxruntime fuses."""

    def __init__(self, attention: nn.Module, layer_scale: nn.Module | None) -> None:
        super().__init__()
        self.num_heads = int(attention.num_heads)
        self.head_dim = int(attention.head_dim)
        width = self.num_heads * self.head_dim
        weight = attention.qkv.weight.detach()  # (3 * width, dim)
        bias = attention.qkv.bias.detach() if attention.qkv.bias is not None else weight.new_zeros(3 * width)
        # a zero bias still exports the Add the fusion pattern expects
        self.q, self.k, self.v = (_linear(weight[i * width:(i + 1) * width], bias[i * width:(i + 1) * width])
                                  for i in range(3))
        gamma = getattr(layer_scale, "gamma", None)
        proj_weight, proj_bias = attention.proj.weight.detach(), attention.proj.bias
        proj_bias = proj_bias.detach() if proj_bias is not None else proj_weight.new_zeros(proj_weight.shape[0])
        if gamma is not None:  # ls(proj(x)) = gamma * (W x + b) = (gamma W) x + gamma b
            proj_weight, proj_bias = proj_weight * gamma.detach()[:, None], proj_bias * gamma.detach()
        self.proj = _linear(proj_weight, proj_bias)

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        split = (batch, tokens, self.num_heads, self.head_dim)
        q = self.q(x).view(split).transpose(1, 2)  # (batch, heads, tokens, head_dim)
        k = self.k(x).view(split).permute(0, 2, 3, 1)  # (batch, heads, head_dim, tokens)
        v = self.v(x).view(split).transpose(1, 2)  # (batch, heads, tokens, head_dim)
        scores = torch.matmul(q, k) / math.sqrt(self.head_dim)  # (batch, heads, tokens, tokens)
        context = torch.matmul(scores.softmax(dim=-1), v)  # (batch, heads, tokens, head_dim)
        context = context.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.proj(context)  # (batch, tokens, dim)


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def _fusable_block_forward(block: nn.Module, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False):
    """timm Block.forward in eval mode, attention branch first in the residual Add (LayerScale is folded)."""
    x = block.attn(block.norm1(x)) + x  # (batch, tokens, dim)
    return x + block.ls2(block.mlp(block.norm2(x)))  # (batch, tokens, dim)


def _is_plain_timm_attention(module: nn.Module | None) -> bool:
    """A timm Attention whose math FusableAttention reproduces: no qk norm, no gate, no output norm."""
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:
        return False
    if not isinstance(module, Attention) or not isinstance(module.qkv, nn.Linear):
        return False
    extras = [getattr(module, name, None) for name in ("q_norm", "k_norm", "norm")]
    return getattr(module, "gate", None) is None and all(e is None or isinstance(e, nn.Identity) for e in extras)


def attention_blocks(backbone: nn.Module) -> list[nn.Module]:
    """timm `Block`s of `backbone` (the plain pre-norm block) whose attention FusableAttention reproduces."""
    try:
        from timm.models.vision_transformer import Block
    except ImportError:
        return []
    return [m for m in backbone.modules() if type(m) is Block and _is_plain_timm_attention(m.attn)]


def hf_attentions(backbone: nn.Module) -> list[nn.Module]:
    """transformers' ViT attentions (Phikon) with biased q/k/v projections, which the pattern needs."""
    try:
        from transformers.models.vit.modeling_vit import ViTAttention
    except ImportError:
        return []
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    return [m for m in backbone.modules() if type(m) is ViTAttention
            and all(getattr(getattr(m, p, None), "bias", None) is not None for p in projections)]


def _hf_fusable_forward(attention: nn.Module, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs):
    """transformers' ViTAttention.forward (eager) in the layout onnxruntime fuses: scores divided by
    sqrt(head_dim) instead of multiplied by its inverse after the product, k transposed once.

    `attention_mask` is ignored: ViTModel builds it from the attention_mask it was given, and milkit's
    backbones give none (a tile has no padding), so it lets every token see every token.
    """
    batch, tokens, _ = hidden_states.shape
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    split = (batch, tokens, heads, head_dim)
    q = attention.q_proj(hidden_states).view(split).transpose(1, 2)  # (batch, heads, tokens, head_dim)
    k = attention.k_proj(hidden_states).view(split).permute(0, 2, 3, 1)  # (batch, heads, head_dim, tokens)
    v = attention.v_proj(hidden_states).view(split).transpose(1, 2)  # (batch, heads, tokens, head_dim)
    scores = torch.matmul(q, k) / math.sqrt(head_dim)  # (batch, heads, tokens, tokens)
    context = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    return attention.o_proj(context), None  # (batch, tokens, dim), no attention weights


def is_fusable_vit(backbone: nn.Module) -> bool:
    return bool(attention_blocks(backbone) or hf_attentions(backbone))


def vit_shape(backbone: nn.Module) -> tuple[int, int]:
    """(num_heads, hidden_size) of the first swappable attention: what the optimizer needs."""
    blocks = attention_blocks(backbone)
    if blocks:
        return int(blocks[0].attn.num_heads), int(blocks[0].attn.qkv.in_features)
    attention = hf_attentions(backbone)[0]
    return int(attention.num_attention_heads), int(attention.q_proj.in_features)


@contextlib.contextmanager
def fusable_layout(backbone: nn.Module) -> Iterator[int]:
    """Swap every plain timm attention (+ LayerScale) for FusableAttention and give transformers' ViT
    attentions the fusable forward; restore on exit. Yields the number of attentions swapped."""
    swapped: list[tuple[nn.Module, nn.Module, nn.Module]] = []
    rewired: list[nn.Module] = []
    try:
        for block in attention_blocks(backbone):
            layer_scale = getattr(block, "ls1", None)
            swapped.append((block, block.attn, layer_scale))
            block.attn = FusableAttention(block.attn, layer_scale)
            block.forward = functools.partial(_fusable_block_forward, block)  # instance attribute: undone below
        for attention in hf_attentions(backbone):  # already attention-first in its residual Add
            rewired.append(attention)
            attention.forward = functools.partial(_hf_fusable_forward, attention)
        yield len(swapped) + len(rewired)
    finally:
        for block, attention, layer_scale in swapped:
            block.attn = attention
            del block.forward
        for attention in rewired:
            del attention.forward


def op_counts(proto: Any) -> dict[str, int]:
    return dict(sorted(collections.Counter(node.op_type for node in proto.graph.node).items()))


def fuse(proto: Any, num_heads: int, hidden_size: int) -> tuple[Any, dict[str, Any]]:
    """Run onnxruntime's ViT fusions on `proto`; (fused proto, record of op counts before/after and fusions)."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    before = op_counts(proto)
    options = FusionOptions("vit")
    # opt_level 0: only the pattern fusions; onnxruntime's own graph optimizations run at session load,
    # for whichever provider loads the file
    optimized = optimizer.optimize_model(
        proto, model_type="vit", num_heads=num_heads, hidden_size=hidden_size, optimization_options=options,
        opt_level=0, use_gpu=False,
    )
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    model = optimized.model
    del optimized  # its shape-inference helper holds a copy of the graph
    gc.collect()
    if fused and not any(o.domain == MICROSOFT_DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=MICROSOFT_DOMAIN, version=1)  # the fused ops' domain, for onnx.checker
    return model, {"fusions": fused, "ops_before": before, "ops_after": op_counts(model)}


def light_proto(model: Any) -> tuple[Any, dict[str, Any]]:
    """The ModelProto of onnx_ir `model` (consumed) for the optimizer, without the weights it never reads.

    The optimizer's shape inference copies the whole graph, and onnx's inference inside it copies it again:
    with the weights in, that is several copies of every weight. The attention fusion reads only the q/k/v
    projections (MatMul -> Add -> Reshape), to pack them into one; every other MatMul weight (MLP, output
    projection) is only rewired, so it goes in as an empty tensor of the same name, type and shape.
    Returns (proto, {name: onnx_ir tensor} of the weights left out), for save_graph to write them.
    """
    import onnx_ir as ir

    lifted = {}
    for name, value in list(model.graph.initializers.items()):
        if value.const_value is not None and value.const_value.nbytes >= 1024 and _only_rewired(value):
            lifted[name] = model.graph.initializers.pop(name).const_value
    proto = ir.to_proto(model)
    for name, tensor in lifted.items():
        proto.graph.initializer.add(name=name, dims=list(tensor.shape.numpy()), data_type=int(tensor.dtype))
    return proto, lifted


def _only_rewired(value: Any) -> bool:
    """True for a MatMul weight (input 1 of every use) outside the MatMul -> Add -> Reshape of q, k, v."""
    uses = list(value.uses())
    return bool(uses) and all(node.op_type == "MatMul" and index == 1 and not _splits_into_heads(node)
                              for node, index in uses)


def _splits_into_heads(matmul: Any) -> bool:
    """MatMul -> Add -> Reshape: a q, k or v projection, which the attention fusion reads to pack."""
    return any(add.op_type == "Add" and any(r.op_type == "Reshape" for r, _ in add.outputs[0].uses())
               for add, _ in matmul.outputs[0].uses())
