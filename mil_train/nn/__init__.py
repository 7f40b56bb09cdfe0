"""Building blocks shared by the models."""

from mil_train.nn.attention_pool import AttentionPool
from mil_train.nn.mlp import instance_mlp

__all__ = ["AttentionPool", "instance_mlp"]
