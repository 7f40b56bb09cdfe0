"""`mil-serve`: serve models, slides and the viewer page over HTTP (binds 127.0.0.1 by default).

    mil-serve --model abmil.onnx [--model other.onnx ...] --slides ROOT [--host 127.0.0.1] [--port 8000]
              [--state DIR] [--results DIR] [--token-file F] [--cors-origin URL ...] [--max-jobs N] [--workers N]
    mil-serve --demo       the demo model and the demo slides (a synthetic slide with planted lesions)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from mil_runtime.errors import InvalidInputError, MilkitError

DEFAULT_STATE = Path("mil-serve-state")
SWITCH_INTERVAL_S = 0.001  # the GIL changes hands sooner than the default 5 ms: shorter tile latency tails


def demo_slides(folder: Path) -> Path:
    """The demo's slides in `folder` (generated once): the synthetic slide with planted lesions and the
    real H&E region a source checkout ships."""
    from mil_runtime.demo.__main__ import REAL_SLIDE, SYNTHETIC, SYNTHETIC_NAME

    folder.mkdir(parents=True, exist_ok=True)
    synthetic = folder / SYNTHETIC_NAME
    if not synthetic.is_file():
        from mil_runtime.demo.synthetic_slide import write_synthetic_slide

        print(f"mil-serve: generating the demo slide {synthetic} ...", file=sys.stderr, flush=True)
        write_synthetic_slide(synthetic, **SYNTHETIC)
    if REAL_SLIDE.is_file() and not (folder / REAL_SLIDE.name).exists():
        shutil.copy2(REAL_SLIDE, folder / REAL_SLIDE.name)
    return folder


class _OneLineCommand(click.Command):
    """Usage errors as one line, `mil-serve: error: <what> (see mil-serve --help)`, exit 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            message = " ".join(exc.format_message().split())
            raise click.UsageError(f"{message} (see mil-serve --help)", exc.ctx) from None


@click.command(cls=_OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "models", multiple=True, metavar="M.onnx", help="a MIL model (repeatable)")
@click.option("--slides", metavar="ROOT", help="folder of slides (paths are confined to it)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--state", metavar="DIR", help=f"results and the job index (default ./{DEFAULT_STATE})")
@click.option("--results", metavar="DIR", help="serve the finished sets of `mil-infer --out DIR` as jobs")
@click.option("--token-file", metavar="F", help="require Authorization: Bearer <the file's token>")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="URL", help="allowed origin (repeatable)")
@click.option("--max-jobs", default=8, show_default=True, type=click.IntRange(min=1),
              help="queued + running jobs before 503")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="jobs run at once")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--demo", is_flag=True, help="serve the demo model and demo slides")
def command(models, slides, host, port, state, results, token_file, cors_origins, max_jobs, workers, device,
            demo) -> int:
    """Serve MIL models, slides and the viewer page (http://HOST:PORT/; the API under /v1)."""
    try:
        import uvicorn

        from mil_runtime.serve import create_app
    except ImportError as exc:
        click.echo(f"mil-serve: needs the serve extra ({exc.name} missing): pip install 'milkit[serve]'", err=True)
        return 1
    state = Path(state) if state else DEFAULT_STATE
    models, slides = [Path(m) for m in models], Path(slides) if slides else None
    try:
        if demo:
            from mil_runtime.demo.__main__ import DEFAULT_MODEL

            models = models or [DEFAULT_MODEL]
            slides = slides or demo_slides(state / "demo-slides")
        if not models:
            raise InvalidInputError("give at least one --model (or --demo)")
        if slides is None and results is None:
            raise InvalidInputError("give --slides ROOT (or --results DIR, or --demo)")
        app = create_app(models, slides, state_dir=state, results_dir=Path(results) if results else None,
                         token_file=Path(token_file) if token_file else None,
                         cors_origins=list(cors_origins), max_jobs=max_jobs, workers=workers, device=device)
    except MilkitError as exc:
        click.echo(f"mil-serve: error: {' '.join(str(exc).split())}", err=True)
        return exc.exit_code
    click.echo(f"mil-serve: http://{host}:{port}/  (API under /v1, OpenAPI at /v1/openapi.json)", err=True)
    app.state.service.jobs.prestart()  # job processes up and their models loaded before the first job
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """mil-serve's exit status: 0, a runtime error's code (one line on stderr), or 2 for a usage error."""
    try:
        return command.main(args=argv, prog_name="mil-serve", standalone_mode=False) or 0
    except click.exceptions.Exit as exc:  # --help
        return exc.exit_code
    except click.UsageError as exc:
        click.echo(f"mil-serve: error: {exc.format_message()}", err=True)
        return 2
    except click.Abort:
        return 130


if __name__ == "__main__":
    sys.exit(main())
