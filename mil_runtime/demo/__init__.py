"""The demo (`python -m mil_runtime.demo`) and the synthetic slides it, the tests and the benchmarks use."""

from mil_runtime.demo.synthetic_slide import SyntheticSlide, rank_auroc, write_blank_slide, write_synthetic_slide

__all__ = ["SyntheticSlide", "rank_auroc", "write_blank_slide", "write_synthetic_slide"]
