"""Registered MIL models, one module per model family. Importing this package registers every model."""

from mil_train.models.base import MILModel, MILOutput, masked_softmax
from mil_train.models.registry import create_model, get_model_class, list_models, register_model
from mil_train.models.abmil import ABMIL
from mil_train.models.camil import CAMIL
from mil_train.models.clam import CLAM_MB, CLAM_SB
from mil_train.models.composed import Composed
from mil_train.models.dsmil import DSMIL
from mil_train.models.dtfdmil import DTFDMIL
from mil_train.models.gtp import GTP
from mil_train.models.iibmil import IIBMIL
from mil_train.models.patch_gcn import PatchGCN
from mil_train.models.prob_smooth_abmil import ProbSmoothABMIL
from mil_train.models.setmil import SETMIL
from mil_train.models.sm_abmil import SmABMIL
from mil_train.models.sm_transformer_abmil import SmTransformerABMIL
from mil_train.models.transformer_abmil import TransformerABMIL
from mil_train.models.transformer_prob_smooth_abmil import TransformerProbSmoothABMIL
from mil_train.models.transmil import TransMIL

__all__ = [
    "MILModel",
    "MILOutput",
    "masked_softmax",
    "create_model",
    "get_model_class",
    "list_models",
    "register_model",
    "ABMIL",
    "CAMIL",
    "CLAM_MB",
    "CLAM_SB",
    "Composed",
    "DSMIL",
    "DTFDMIL",
    "GTP",
    "IIBMIL",
    "PatchGCN",
    "ProbSmoothABMIL",
    "SETMIL",
    "SmABMIL",
    "SmTransformerABMIL",
    "TransformerABMIL",
    "TransformerProbSmoothABMIL",
    "TransMIL",
]
