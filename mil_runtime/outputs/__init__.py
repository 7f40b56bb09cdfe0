"""Slide outputs: JSON result, attention heatmap, tissue mask, QuPath GeoJSON, tiles CSV, features .h5."""

from mil_runtime.outputs.colormap import apply_colormap, viridis_lut
from mil_runtime.outputs.geojson import tiles_feature_collection
from mil_runtime.outputs.heatmap import attention_heatmap
from mil_runtime.outputs.writer import SUFFIXES, TileTable, output_paths, to_jsonable, write_slide_outputs

__all__ = [
    "SUFFIXES", "TileTable", "apply_colormap", "attention_heatmap", "output_paths", "tiles_feature_collection",
    "to_jsonable", "viridis_lut", "write_slide_outputs",
]
