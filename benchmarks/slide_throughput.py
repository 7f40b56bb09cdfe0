"""Slide throughput on CMU-1-Small-Region.svs with the ResNet-50 (truncated, 1024-d) encoder, in tiles/s.

    python benchmarks/slide_throughput.py [--slide PATH] [--repeats 3] [--append docs/benchmarks.md]

(a) encoder alone: the exported encoder (onnxruntime) on tiles already in memory, batches of 64;
    (a') the same network in eager PyTorch, for reference.
(b) the whole milkit pipeline, `mil_runtime.pipeline.run_slide` with outputs: open, mpp, tissue, threaded
    OpenSlide reads, encoder, ABMIL, JSON/heatmap/GeoJSON/CSV/features files.
(c) a PyTorch pipeline of the usual shape: OpenSlide reads in a torch Dataset + DataLoader (worker
    processes), torchvision transforms, the eager encoder and the eager ABMIL, on the same tiles.
Targets on CPU: (b) within 1.2x of (a), and (b) faster than (c).

Weights are the seeded random init (throughput does not depend on their values); nothing is downloaded.
Each figure is the median of `--repeats` timed runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "tests" / "data" / "CMU-1-Small-Region.svs"
TILE_PX, TILE_MPP = 224, 0.5
BATCH = 64
WORKERS = 2


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} cores available, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads)")


def build_models(folder: Path):
    """Export the ResNet-50 trunk encoder and a random ABMIL that names it; return their paths and modules."""
    from mil_export import export_onnx
    from mil_export.encoders import build_encoder, export_encoder
    from mil_runtime.contract import EncoderRef, Tiling
    from mil_runtime.encoder import encoder_filename
    from mil_runtime.session import file_identity
    from mil_train.models import ABMIL

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder, _ = build_encoder("resnet50_trunc", input_px=TILE_PX)
    encoder_path = export_encoder(encoder, folder / encoder_filename("resnet50_trunc"), name="resnet50_trunc",
                                  tile_px=TILE_PX)
    torch.manual_seed(0)
    abmil = ABMIL(in_dim=1024, n_classes=1).eval()
    ref = EncoderRef("resnet50_trunc", 1024, file_identity(encoder_path))
    model_path = export_onnx(abmil, folder / "abmil.onnx", encoder=ref, tiling=Tiling(TILE_PX, TILE_MPP))
    return encoder_path, model_path, encoder, abmil


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: sessions, caches, thread pools
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class OpenSlideTiles(torch.utils.data.Dataset):
    """The usual PyTorch recipe: one OpenSlide handle per worker, PIL tile -> torchvision transforms."""

    def __init__(self, path: Path, xy: np.ndarray, read_px: int, level: int):
        from torchvision import transforms

        self.path, self.xy, self.read_px, self.level = str(path), xy, read_px, level
        self.handle = None
        self.transform = transforms.Compose([
            transforms.Resize(TILE_PX),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ])

    def __len__(self) -> int:
        return len(self.xy)

    def __getitem__(self, index: int) -> torch.Tensor:
        import openslide

        if self.handle is None:
            self.handle = openslide.OpenSlide(self.path)
        x, y = (int(v) for v in self.xy[index])
        tile = self.handle.read_region((x, y), self.level, (self.read_px, self.read_px)).convert("RGB")
        return self.transform(tile)  # (3, TILE_PX, TILE_PX)


def torch_pipeline(slide: Path, xy: np.ndarray, read_px: int, level: int, encoder, abmil) -> np.ndarray:
    """(c): DataLoader reads + transforms, eager backbone (normalisation already done) and eager ABMIL."""
    loader = torch.utils.data.DataLoader(OpenSlideTiles(slide, xy, read_px, level), batch_size=BATCH,
                                         num_workers=WORKERS, persistent_workers=False)
    features = []
    with torch.inference_mode():
        for batch in loader:  # (B, 3, TILE_PX, TILE_PX)
            features.append(encoder.backbone(batch).flatten(1))  # (B, 1024)
        out = abmil(torch.cat(features)[None])  # (1, N, 1024) in
    return out.attention[0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=SLIDE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--append", type=Path, default=None, help="append the results section to this file")
    args = parser.parse_args()

    from mil_runtime.encoder import load_encoder
    from mil_runtime.model import load_model
    from mil_runtime.pipeline import run_slide
    from mil_runtime.slide.reader import TileReader

    info = machine()
    print(info, flush=True)
    with tempfile.TemporaryDirectory(prefix="milkit-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        encoder_path, model_path, torch_encoder, abmil = build_models(folder)
        print(f"exported encoder + ABMIL in {time.perf_counter() - t0:.0f} s", flush=True)
        model = load_model(model_path, device="cpu")
        encoder = load_encoder(encoder_path, device="cpu")

        probe = run_slide(args.slide, model, encoder, workers=WORKERS)  # the tiles every variant processes
        plan, xy, n = probe.plan, probe.xy_level0, probe.n_tiles
        tiles = np.concatenate([b for _, b in TileReader(args.slide, plan, xy, batch_size=BATCH, workers=WORKERS)])
        print(f"{args.slide.name}: {n} tissue tiles of {TILE_PX} px at {TILE_MPP} um/px "
              f"(level {plan.level}, read {plan.read_px} px)", flush=True)

        def encoder_alone():
            for start in range(0, n, BATCH):
                encoder.encode(tiles[start:start + BATCH])

        def eager_encoder_alone():
            with torch.inference_mode():
                for start in range(0, n, BATCH):
                    torch_encoder(torch.from_numpy(tiles[start:start + BATCH]))

        out_dir = folder / "out"

        def milkit_pipeline():
            run_slide(args.slide, model, encoder, out_dir=out_dir, workers=WORKERS, reuse_features=False)

        def pytorch_pipeline():
            torch_pipeline(args.slide, xy, plan.read_px, plan.level, torch_encoder, abmil)

        rows = []
        for label, fn in (("(a) encoder alone, onnxruntime, tiles in memory", encoder_alone),
                          ("(a') encoder alone, eager PyTorch, tiles in memory", eager_encoder_alone),
                          ("(b) milkit pipeline (run_slide, all outputs)", milkit_pipeline),
                          ("(c) PyTorch pipeline (DataLoader + torchvision + eager)", pytorch_pipeline)):
            seconds = timed(fn, args.repeats)
            rows.append((label, seconds, n / seconds))
            print(f"{label:58s} {seconds:7.2f} s  {n / seconds:7.1f} tiles/s", flush=True)

    a, b, c = rows[0][2], rows[2][2], rows[3][2]
    ratios = (f"(a)/(b) = {a / b:.2f}x (target <= 1.2x: {'met' if a / b <= 1.2 else 'NOT met'}); "
              f"(b)/(c) = {b / c:.2f}x (target > 1: {'met' if b > c else 'NOT met'})")
    print(ratios)
    section = markdown(info, args.slide.name, n, plan, rows, ratios, args.repeats)
    if args.append:
        with open(args.append, "a") as handle:
            handle.write(section)
        print(f"appended to {args.append}")


def markdown(info, slide_name, n, plan, rows, ratios, repeats) -> str:
    table = "\n".join(f"| {label} | {seconds:.2f} | {tps:.1f} |" for label, seconds, tps in rows)
    return f"""
## Slide throughput

`python benchmarks/slide_throughput.py` on {slide_name}: {n} tissue tiles of {TILE_PX} px at {TILE_MPP} um/px
(read at level {plan.level}, {plan.read_px} px), ResNet-50 truncated after layer3 (1024-d, seeded random
weights), ABMIL aggregation, batch {BATCH}, {WORKERS} reader threads / DataLoader workers, CPU only.
Median of {repeats} runs after a warm-up. Machine: {info}.

| variant | seconds | tiles/s |
|---|---|---|
{table}

{ratios}.
(b) includes opening the slide, tissue detection, reading, encoding, ABMIL and writing all outputs; (c)
reads the same tiles and runs the same encoder and ABMIL in eager PyTorch. The machine's cores were shared
with other jobs while this ran, so single figures are noisy; the ratios come from one run.
"""


if __name__ == "__main__":
    sys.exit(main())
