"""Building blocks shared by the models, one module each.

Pools:        attention_pool (Ilse et al.), mean_pool and max_pool (masked mean / max),
              class_attention_pool (one branch per class, CLAM_MB), prob_smooth_pool (Gaussian
              attention logits with a graph-smoothness prior), sm_attention_pool (attention pooling
              with Sm smoothing), mincut_pool (dense min-cut pooling driven by an edge list, GTP)
Instances:    instance_classifier (CLAM's top-k clustering), max_instance (DSMIL's critical instance),
              pseudo_bags (DTFD's partition and tier-1 distillation), prototype_memory (IIBMIL)
Sequence:     self_attention (masked multi-head), transformer (encoder layer and encoder),
              nystrom_attention (landmark attention and its transformer layer, TransMIL / CAMIL),
              ppeg (TransMIL's positional encoding on a square grid), sm_transformer (encoder with Sm)
Graph:        neighbour_table (the edge list as neighbour slots; the weighted neighbour sum),
              gcn_conv (torchmil's GCNConv), deep_gcn (DeepGCNLayer), sm (the Sm smoothing operator),
              neighbour_attention (CAMIL's attention restricted to graph edges)
Space:        spatial_grid (bag <-> grid over coords), t2t (tokens-to-token unfold, SETMIL's pyramid
              fusion), relative_position (image relative position buckets), irpe_attention (SETMIL)
Losses, misc: smooth_svm (smooth top-1 SVM), mlp (instance embedding), masking (masked softmax)
"""

from mil_train.nn.attention_pool import AttentionPool
from mil_train.nn.class_attention_pool import ClassAttentionPool
from mil_train.nn.deep_gcn import DeepGCNLayer
from mil_train.nn.gcn_conv import GCNConv
from mil_train.nn.instance_classifier import InstanceClustering
from mil_train.nn.irpe_attention import IRPEMultiheadSelfAttention, IRPETransformerEncoder
from mil_train.nn.masking import masked_softmax
from mil_train.nn.max_instance import MaxInstanceAttention
from mil_train.nn.max_pool import MaxPool
from mil_train.nn.mean_pool import MeanPool
from mil_train.nn.mincut_pool import mincut_pool
from mil_train.nn.mlp import instance_mlp
from mil_train.nn.neighbour_attention import NeighbourAttention
from mil_train.nn.neighbour_table import NeighbourTable, aggregate, neighbour_table
from mil_train.nn.nystrom_attention import NystromAttention, NystromTransformerLayer
from mil_train.nn.ppeg import PPEG
from mil_train.nn.prob_smooth_pool import ProbSmoothAttentionPool
from mil_train.nn.prototype_memory import PrototypeMemory
from mil_train.nn.pseudo_bags import PseudoBagDistiller
from mil_train.nn.self_attention import MultiheadSelfAttention
from mil_train.nn.sm import Sm
from mil_train.nn.sm_attention_pool import SmAttentionPool
from mil_train.nn.sm_transformer import SmTransformerEncoder
from mil_train.nn.smooth_svm import SmoothTop1SVM
from mil_train.nn.t2t import PyramidMultiScaleFusion, T2TLayer
from mil_train.nn.transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "AttentionPool",
    "ClassAttentionPool",
    "DeepGCNLayer",
    "GCNConv",
    "IRPEMultiheadSelfAttention",
    "IRPETransformerEncoder",
    "InstanceClustering",
    "MaxInstanceAttention",
    "MaxPool",
    "MeanPool",
    "MultiheadSelfAttention",
    "NeighbourAttention",
    "NeighbourTable",
    "NystromAttention",
    "NystromTransformerLayer",
    "PPEG",
    "ProbSmoothAttentionPool",
    "PrototypeMemory",
    "PseudoBagDistiller",
    "PyramidMultiScaleFusion",
    "Sm",
    "SmAttentionPool",
    "SmTransformerEncoder",
    "SmoothTop1SVM",
    "T2TLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "aggregate",
    "instance_mlp",
    "masked_softmax",
    "mincut_pool",
    "neighbour_table",
]
