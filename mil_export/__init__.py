"""torch -> ONNX: export registered MIL models under the milkit contract, and check the export."""

from mil_export.onnx_export import export_checkpoint, export_onnx
from mil_export.pair import export_pair
from mil_export.validate import validate_onnx

__all__ = ["export_onnx", "export_checkpoint", "export_pair", "validate_onnx"]
