"""Building blocks shared by the models, one module each.

Pools:        attention_pool (Ilse et al.), class_attention_pool (one branch per class, CLAM_MB),
              prob_smooth_pool (Gaussian attention logits with a graph-smoothness prior)
Instances:    instance_classifier (CLAM's top-k clustering), max_instance (DSMIL's critical instance),
              pseudo_bags (DTFD's partition and tier-1 distillation), prototype_memory (IIBMIL)
Sequence:     self_attention (masked multi-head), transformer (encoder layer and encoder)
Losses, misc: smooth_svm (smooth top-1 SVM), mlp (instance embedding), masking (masked softmax)
"""

from mil_train.nn.attention_pool import AttentionPool
from mil_train.nn.class_attention_pool import ClassAttentionPool
from mil_train.nn.instance_classifier import InstanceClustering
from mil_train.nn.masking import masked_softmax
from mil_train.nn.max_instance import MaxInstanceAttention
from mil_train.nn.mlp import instance_mlp
from mil_train.nn.prob_smooth_pool import ProbSmoothAttentionPool
from mil_train.nn.prototype_memory import PrototypeMemory
from mil_train.nn.pseudo_bags import PseudoBagDistiller
from mil_train.nn.self_attention import MultiheadSelfAttention
from mil_train.nn.smooth_svm import SmoothTop1SVM
from mil_train.nn.transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "AttentionPool",
    "ClassAttentionPool",
    "InstanceClustering",
    "MaxInstanceAttention",
    "MultiheadSelfAttention",
    "ProbSmoothAttentionPool",
    "PrototypeMemory",
    "PseudoBagDistiller",
    "SmoothTop1SVM",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "instance_mlp",
    "masked_softmax",
]
