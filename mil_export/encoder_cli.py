"""`mil-export encoder NAME -o encoder.onnx`: export a registered tile encoder under the milkit contract."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from mil_runtime.errors import MilkitError


@click.command("encoder")
@click.argument("name")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local state_dict file (.pth/.pt/.bin). Without it: seeded random weights, for tests only.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output .onnx path. Default: <NAME>.onnx in the current folder, the name mil-infer "
                   "looks for next to a model.")
@click.option("--input-px", type=click.IntRange(min=8), default=None,
              help="Network input size; tiles are resized to it inside the graph. Default: the architecture's.")
@click.option("--tile-px", type=click.IntRange(min=1), default=None,
              help="Fix the tile size the graph accepts. Default: any tile size (symbolic height and width).")
def encoder_command(name: str, weights: Path | None, output: Path | None, input_px: int | None,
                    tile_px: int | None) -> None:
    """Export tile encoder NAME (resnet50_trunc, tiny_cnn, timm:<model>) to ONNX.

    The graph takes uint8 RGB tiles [batch, H, W, 3] and returns float32 features [batch, D]; resizing and
    mean/std normalisation are inside it.
    """
    from mil_export.encoders import build_encoder, export_encoder
    from mil_runtime.encoder import encoder_filename, sha256_file

    output = output or Path(encoder_filename(name))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoder, info = build_encoder(name, weights, input_px=input_px)
        for warning in caught:
            click.echo(f"warning: {warning.message}", err=True)
        export_encoder(encoder, output, name=name, tile_px=tile_px, provenance=info)
    except MilkitError as exc:
        click.echo(f"mil-export: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    click.echo(f"wrote {output}: {name}, {encoder.output_dim}-d features, input {encoder.input_px} px, "
               f"tiles {'any size' if tile_px is None else f'{tile_px} px'}")
    click.echo(f"sha256 {sha256_file(output)}")
