"""Building blocks shared by the models."""

from mil_train.nn.attention_pool import AttentionPool
from mil_train.nn.mlp import instance_mlp
from mil_train.nn.self_attention import MultiheadSelfAttention
from mil_train.nn.transformer import TransformerEncoder, TransformerEncoderLayer
from mil_train.nn.prob_smooth_pool import ProbSmoothAttentionPool

__all__ = [
    "AttentionPool",
    "instance_mlp",
    "MultiheadSelfAttention",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "ProbSmoothAttentionPool",
]
