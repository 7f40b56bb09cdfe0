"""Bridges to other MIL libraries. `mil_train.interop.torchmil` loads torchmil 1.0.2 models."""
