"""Tile reading in threads, ahead of the encoder.

OpenSlide decodes in C and releases the GIL, so a few threads keep the encoder fed. Each thread reads
through its own OpenSlide handle (opened on first use): no handle is shared across threads, and no
lock is needed. At most `prefetch` tiles are in flight, so memory stays bounded on any slide size.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mil_runtime.slide.grid import GridPlan
from mil_runtime.slide.open import Slide, open_handle


class TileReader:
    """Iterate over (start index, uint8 tiles (B, tile_px, tile_px, 3)) in the order of `xy_level0`."""

    def __init__(self, slide_path: str | os.PathLike, plan: GridPlan, xy_level0: np.ndarray, *,
                 batch_size: int = 64, workers: int = 4, prefetch: int | None = None):
        self.slide_path = Path(slide_path)
        self.plan = plan
        self.xy = np.asarray(xy_level0, dtype=np.int64).reshape(-1, 2)  # (N, 2) as (x, y)
        self.batch_size = max(1, int(batch_size))
        self.workers = max(1, int(workers))
        self.prefetch = prefetch or 2 * max(self.batch_size, self.workers)
        self._local = threading.local()
        self._slides: list[Slide] = []
        self._slides_lock = threading.Lock()  # guards only the list of handles, not reads

    def __len__(self) -> int:
        return len(self.xy)

    def _slide(self) -> Slide:
        slide = getattr(self._local, "slide", None)
        if slide is None:
            slide = Slide(self.slide_path, open_handle(self.slide_path))
            self._local.slide = slide
            with self._slides_lock:
                self._slides.append(slide)
        return slide

    def read_tile(self, index: int) -> np.ndarray:
        """One tile as RGB uint8 (tile_px, tile_px, 3)."""
        plan = self.plan
        x, y = (int(v) for v in self.xy[index])
        pixels = self._slide().read_rgb((x, y), plan.level, (plan.read_px, plan.read_px))  # (read, read, 3)
        if plan.read_px == plan.tile_px:
            return pixels
        image = Image.fromarray(pixels).resize((plan.tile_px, plan.tile_px), Image.Resampling.BILINEAR)
        return np.asarray(image)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        pending: deque[Future] = deque()
        next_index = 0
        batch: list[np.ndarray] = []
        start = 0
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="milkit-tiles")
        try:
            while next_index < len(self.xy) or pending:
                while next_index < len(self.xy) and len(pending) < self.prefetch:
                    pending.append(pool.submit(self.read_tile, next_index))
                    next_index += 1
                batch.append(pending.popleft().result())
                if len(batch) == self.batch_size or (not pending and next_index == len(self.xy)):
                    yield start, np.stack(batch)  # (B, tile_px, tile_px, 3)
                    start += len(batch)
                    batch = []
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            self.close()

    def close(self) -> None:
        with self._slides_lock:
            for slide in self._slides:
                slide.close()
            self._slides.clear()
