"""Building blocks shared by the models."""

from mil_train.nn.attention_pool import AttentionPool
from mil_train.nn.class_attention_pool import ClassAttentionPool
from mil_train.nn.instance_classifier import InstanceClustering
from mil_train.nn.smooth_svm import SmoothTop1SVM
from mil_train.nn.mlp import instance_mlp
from mil_train.nn.self_attention import MultiheadSelfAttention
from mil_train.nn.transformer import TransformerEncoder, TransformerEncoderLayer
from mil_train.nn.prob_smooth_pool import ProbSmoothAttentionPool

__all__ = [
    "AttentionPool",
    "ClassAttentionPool",
    "InstanceClustering",
    "SmoothTop1SVM",
    "instance_mlp",
    "MultiheadSelfAttention",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "ProbSmoothAttentionPool",
]
