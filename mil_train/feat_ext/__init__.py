"""Instance feature extractors: modules that map images in a bag to the features a MIL model pools.

    create_feature_extractor("small_cnn", out_dim=32)        # by registered name and a JSON config
    model = create_model("ABMIL", in_dim=32, feat_ext={"name": "small_cnn", "out_dim": 32})

A model with a feature extractor takes X as (batch, bag, 3, H, W) float images in [0, 1] (tile / 255)
and applies the extractor to its real instances only, `instance_chunk` at a time, each chunk
activation-checkpointed in training (attach.py). `mil-export` splits such a model into an encoder ONNX
(uint8 tiles in, the normalisation inside) and the MIL ONNX, linked by the encoder's sha256.
"""

from mil_train.feat_ext.attach import attach_feat_ext, encode_instances, feat_ext_of
from mil_train.feat_ext.extractor import FeatureExtractor
from mil_train.feat_ext.registry import (create_feature_extractor, feature_extractor_spec, list_feature_extractors,
                                         register_feature_extractor)
from mil_train.feat_ext.small_cnn import SmallCNN

__all__ = [
    "FeatureExtractor",
    "SmallCNN",
    "attach_feat_ext",
    "create_feature_extractor",
    "encode_instances",
    "feat_ext_of",
    "feature_extractor_spec",
    "list_feature_extractors",
    "register_feature_extractor",
]
