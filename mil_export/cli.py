"""`mil-export`: turn a training checkpoint into a milkit ONNX model, and check an exported model.

    mil-export model CHECKPOINT -o model.onnx [--encoder enc.onnx] [--class-names a,b] [--tile-px N --mpp X]
    mil-export validate model.onnx [--sizes 1,2,7,49,1000,50000] [--checkpoint ckpt.pt] [--tolerance 1e-4]

Errors the user can cause print one line on stderr and exit with the code of their
mil_runtime.errors class (3 input not found, 4 not a model/checkpoint, 5 mismatch, 7 output, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mil_runtime.errors import MilkitError, ModelFormatError


class OneLineUsageError(click.UsageError):
    """A usage error as one line, `mil-export: error: <what> (see mil-export [COMMAND] --help)`, exit 2."""

    def show(self, file=None) -> None:
        command = "mil-export" + (f" {self.ctx.info_name}" if self.ctx is not None and self.ctx.parent else "")
        click.echo(f"mil-export: error: {' '.join(self.format_message().split())} (see {command} --help)", err=True)


def _one_line(exc: click.UsageError) -> OneLineUsageError:
    return exc if isinstance(exc, OneLineUsageError) else OneLineUsageError(exc.format_message(), exc.ctx)


class MilkitGroup(click.Group):
    """A click group that turns a MilkitError from any subcommand into one stderr line and its exit code,
    and usage errors into one line plus the help hint."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None
        except MilkitError as exc:
            click.echo(f"mil-export: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def _split_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise click.BadParameter("give class names separated by commas, e.g. benign,tumour")
    return names


def _parse_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give bag sizes as integers separated by commas") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("bag sizes must be >= 1")
    return sizes


@click.group(cls=MilkitGroup)
@click.version_option(package_name="milkit")
def main() -> None:
    """Export milkit models to ONNX and validate exported models."""


@main.command("model")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .onnx file to write.")
@click.option("--encoder", "encoder_onnx", type=click.Path(dir_okay=False, path_type=Path),
              help="The exported encoder .onnx the features came from; recorded by name, dim and sha256. "
                   "A model trained with its own feature extractor (feat_ext) needs none: its encoder is "
                   "written beside -o as NAME.encoder.onnx.")
@click.option("--class-names", help="Comma-separated class names (binary models: negative,positive).")
@click.option("--tile-px", type=click.IntRange(min=1), help="Tile size in pixels the features were made at.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), help="Microns per pixel of those tiles.")
@click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Tile overlap fraction (with --tile-px/--mpp).")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's).")
@click.option("--verbose", is_flag=True, help="Show the exporter's progress messages.")
def model_command(checkpoint, output, encoder_onnx, class_names, tile_px, mpp, overlap, opset, verbose) -> None:
    """Export CHECKPOINT (saved by mil_train) to an ONNX model with milkit metadata."""
    from mil_export.onnx_export import export_checkpoint, read_metadata

    if (tile_px is None) != (mpp is None):
        raise click.UsageError("give --tile-px and --mpp together (or neither to keep the checkpoint's tiling)")
    tiling = {"tile_px": tile_px, "mpp": mpp, "overlap": overlap} if tile_px is not None else None
    path = export_checkpoint(
        checkpoint,
        output,
        encoder_onnx=encoder_onnx,
        class_names=_split_names(class_names),
        tiling=tiling,
        opset=opset,
        verbose=verbose,
    )
    metadata = read_metadata(path)
    from mil_export.pair import pair_encoder_path
    from mil_runtime.session import file_identity

    beside = pair_encoder_path(path)
    if metadata.encoder is not None and beside.is_file() and file_identity(beside) == metadata.encoder.sha256:
        click.echo(f"wrote {beside}: the model's own encoder {metadata.encoder.name}, uint8 tiles in")
    outputs = (f"{metadata.n_classes} output(s) {metadata.names}" if metadata.is_classifier
               else f"{metadata.task_type} outputs {', '.join(metadata.outputs)}")
    click.echo(
        f"wrote {path}: {metadata.model_name}, {outputs}, "
        f"{metadata.feature_dim}-d features, inputs {', '.join(metadata.inputs)}"
    )


@main.command("validate")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--sizes", default="1,2,7,49,1000,50000", show_default=True, help="Bag sizes, comma-separated.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="Compare with this checkpoint's model instead of the one rebuilt from the file's weights.")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="Passes when |onnxruntime - PyTorch| <= tol + tol * |PyTorch| on every output.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random test bags.")
def validate_command(model_path, sizes, checkpoint, tolerance, seed) -> None:
    """Compare onnxruntime with eager PyTorch on MODEL, alone and padded, at each bag size."""
    from mil_export.onnx_export import load_checkpoint_checked
    from mil_export.validate import format_table, rebuild_model, split_sizes, validate_onnx
    from mil_runtime.session import open_session

    if checkpoint is not None:
        model = load_checkpoint_checked(checkpoint)[0]
    else:
        metadata = open_session(model_path, device="cpu").metadata
        try:
            model = rebuild_model(model_path, metadata)
        except (TypeError, ValueError) as exc:  # milkit.model config of the wrong types for the model
            raise ModelFormatError(
                f"{model_path}: cannot rebuild {metadata.model_name} from its milkit.model config "
                f"({' '.join(str(exc).split())[:200]}); re-export the model or pass --checkpoint"
            ) from None
    kept, skipped = split_sizes(model, _parse_sizes(sizes))
    if skipped:
        click.echo(
            f"skipping bag sizes {', '.join(map(str, skipped))}: {model.name} declares max_bag_size "
            f"{model.max_bag_size} (full self-attention; see its model card in docs/models/)", err=True
        )
    if not kept:
        raise click.UsageError(f"no bag size left to validate; give sizes up to {model.max_bag_size}")
    rows = validate_onnx(model_path, model=model, sizes=kept, seed=seed)
    click.echo(format_table(rows))
    worst = max(rows, key=lambda row: row.scaled)
    where = f"bag {worst.bag}{' padded' if worst.padded else ''}"
    if not worst.passes(tolerance):
        click.echo(
            f"mil-export: FAILED: max |a - b| / (1 + |b|) = {worst.scaled:.3e} at {where} > tolerance {tolerance:g}",
            err=True,
        )
        sys.exit(1)
    click.echo(f"OK: max error {max(r.max_error for r in rows):.3e}; max |a - b| / (1 + |b|) {worst.scaled:.3e} "
               f"<= tolerance {tolerance:g}")


# --- ENCODER helper: register the `encoder` subcommand below this line -----------------------------
from mil_export.encoder_cli import encoder_command  # noqa: E402

main.add_command(encoder_command)


if __name__ == "__main__":
    main()
