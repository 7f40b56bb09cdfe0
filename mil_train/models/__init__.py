"""Registered MIL models, one module per model family. Importing this package registers every model."""

from mil_train.models.base import MILModel, MILOutput, masked_softmax
from mil_train.models.registry import create_model, get_model_class, list_models, register_model
from mil_train.models.abmil import ABMIL
from mil_train.models.clam import CLAM_MB, CLAM_SB
from mil_train.models.dsmil import DSMIL
from mil_train.models.dtfdmil import DTFDMIL
from mil_train.models.iibmil import IIBMIL
from mil_train.models.prob_smooth_abmil import ProbSmoothABMIL
from mil_train.models.transformer_abmil import TransformerABMIL
from mil_train.models.transformer_prob_smooth_abmil import TransformerProbSmoothABMIL

__all__ = [
    "MILModel",
    "MILOutput",
    "masked_softmax",
    "create_model",
    "get_model_class",
    "list_models",
    "register_model",
    "ABMIL",
    "CLAM_MB",
    "CLAM_SB",
    "DSMIL",
    "DTFDMIL",
    "IIBMIL",
    "ProbSmoothABMIL",
    "TransformerABMIL",
    "TransformerProbSmoothABMIL",
]
