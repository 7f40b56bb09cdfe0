"""Whole-slide reading: open (OpenSlide), mpp, tissue detection, the tile grid, threaded tile reading."""

from mil_runtime.slide.grid import GridPlan, pick_level, plan_grid
from mil_runtime.slide.mpp import resolve_mpp
from mil_runtime.slide.open import Slide, open_slide
from mil_runtime.slide.reader import TileReader
from mil_runtime.slide.tissue import TISSUE_THRESHOLD, TissueMask, detect_tissue

__all__ = [
    "GridPlan", "Slide", "TISSUE_THRESHOLD", "TileReader", "TissueMask", "detect_tissue", "open_slide",
    "pick_level", "plan_grid", "resolve_mpp",
]
