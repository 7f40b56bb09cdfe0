"""`mil-export encoder NAME -o encoder.onnx`: export a registered tile encoder under the milkit contract."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from mil_runtime.errors import MilkitError

# --check compares with the fp32 reference pipeline: fp16 networks differ by ~1e-3 (rel. L2), fp32 by ~1e-6
CHECK_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


@click.command("encoder")
@click.argument("name")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local weights file (.safetensors, or a state_dict in .pth/.pt/.bin). Without it: seeded "
                   "random weights, for tests only.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output .onnx path. Default: <NAME>.onnx in the current folder, the name mil-infer "
                   "looks for next to a model. Graphs over 2 GB also write <OUTPUT>.data beside it.")
@click.option("--input-px", type=click.IntRange(min=8), default=None,
              help="Network input size; tiles are resized to it inside the graph. Default: the architecture's.")
@click.option("--tile-px", type=click.IntRange(min=1), default=None,
              help="Fix the tile size the graph accepts. Default: any tile size (symbolic height and width).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of the network. fp16: the network runs in float16; tiles stay uint8, the "
                   "preprocessing and the features float32.")
@click.option("--no-fuse", "no_fuse", is_flag=True,
              help="Skip onnxruntime's attention / LayerNorm / GELU fusion (applied to ViT backbones by default).")
@click.option("--check", "check_tiles", type=click.Path(exists=True, path_type=Path), default=None,
              help="After export, compare the graph's features on these tiles (a folder of images, or a "
                   "slide) with the published pipeline (torchvision transforms on PIL + the eager model); "
                   "exit 1 if any tile differs by more than the tolerance.")
@click.option("--depth", type=click.IntRange(min=1), default=None, hidden=True,
              help="Build a foundation model with fewer blocks (tests and smoke runs only).")
@click.option("--check-tolerance", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Relative L2 tolerance of --check. Default: 1e-4 for fp32, 1e-2 for fp16.")
def encoder_command(name: str, weights: Path | None, output: Path | None, input_px: int | None,
                    tile_px: int | None, precision: str, no_fuse: bool, check_tiles: Path | None,
                    depth: int | None, check_tolerance: float | None) -> None:
    """Export tile encoder NAME (a foundation model such as uni_v1, or resnet50_trunc, tiny_cnn,
    timm:<model>) to ONNX.

    The graph takes uint8 RGB tiles [batch, H, W, 3] and returns float32 features [batch, D]; the resize
    (as torchvision's Resize + CenterCrop do on a PIL image) and mean/std normalisation are inside it.
    """
    from mil_export.encoders import build_encoder, export_encoder, foundation_names
    from mil_runtime.encoder import encoder_filename
    from mil_runtime.session import file_identity

    output = output or Path(encoder_filename(name))
    if check_tiles is not None and name not in foundation_names():  # say so before a long export
        click.echo(f"mil-export: error: --check compares with a published pipeline, which only the foundation "
                   f"encoders have ({', '.join(foundation_names())}), not {name!r}", err=True)
        sys.exit(MilkitError.exit_code)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoder, info = build_encoder(name, weights, input_px=input_px, depth=depth)
        for warning in caught:
            click.echo(f"warning: {warning.message}", err=True)
        export_encoder(encoder, output, name=name, tile_px=tile_px, provenance=info, precision=precision,
                       fuse=False if no_fuse else None)
        identity = file_identity(output)
    except MilkitError as exc:
        click.echo(f"mil-export: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    click.echo(f"wrote {output}: {name}, {encoder.output_dim}-d features, input {encoder.input_px} px, "
               f"tiles {'any size' if tile_px is None else f'{tile_px} px'}, {precision}")
    click.echo(f"sha256 {identity}")
    if check_tiles is not None:
        tolerance = check_tolerance or CHECK_TOLERANCE[precision]
        _check(name, weights, output, check_tiles, tolerance, input_px=input_px, depth=depth)


def _check(name: str, weights: Path | None, output: Path, tiles: Path, tolerance: float, **build) -> None:
    """--check: the exported graph against the reference pipeline; one error line and exit 1 on failure."""
    try:
        from mil_export.reference import check_encoder

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-init warning was shown once already
            report = check_encoder(name, weights, output, tiles, tolerance=tolerance, **build)
    except ImportError as exc:
        click.echo(f"mil-export: error: --check needs the reference pipeline ({exc})", err=True)
        sys.exit(MilkitError.exit_code)
    except MilkitError as exc:
        click.echo(f"mil-export: error: --check: {exc}", err=True)
        sys.exit(exc.exit_code)
    summary = " ".join(report.summary().split())  # one line whatever the report's layout
    if not report.passed:
        click.echo(f"mil-export: error: --check failed (tolerance {tolerance:g}): {summary}", err=True)
        sys.exit(MilkitError.exit_code)
    click.echo(f"check passed (tolerance {tolerance:g}): {summary}")
