"""`mil-serve`: serve models, slides and the viewer page over HTTP (binds 127.0.0.1 by default).

    mil-serve --model abmil.onnx [--model other.onnx ...] --slides ROOT [--host 127.0.0.1] [--port 8000]
              [--state DIR] [--results DIR] [--token-file F] [--cors-origin URL ...] [--max-jobs N] [--workers N]
    mil-serve --demo       the demo model and the demo slides (a synthetic slide with planted lesions)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mil-serve", description="Serve MIL models, slides and the viewer page.")
    p.add_argument("--model", action="append", default=[], metavar="M.onnx", help="a MIL model (repeatable)")
    p.add_argument("--slides", metavar="ROOT", help="folder of slides (paths are confined to it)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state", metavar="DIR", help=f"results and the job index (default ./{DEFAULT_STATE})")
    p.add_argument("--results", metavar="DIR", help="serve the finished sets of `mil-infer --out DIR` as jobs")
    p.add_argument("--token-file", metavar="F", help="require Authorization: Bearer <the file's token>")
    p.add_argument("--cors-origin", action="append", default=[], metavar="URL", help="allowed origin (repeatable)")
    p.add_argument("--max-jobs", type=int, default=8, help="queued + running jobs before 503 (default 8)")
    p.add_argument("--workers", type=int, default=1, help="jobs run at once (default 1)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--demo", action="store_true", help="serve the demo model and demo slides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import uvicorn

        from mil_runtime.serve import create_app
    except ImportError as exc:
        print(f"mil-serve: needs the serve extra ({exc.name} missing): pip install 'milkit[serve]'", file=sys.stderr)
        return 1
    state = Path(args.state) if args.state else DEFAULT_STATE
    models, slides = [Path(m) for m in args.model], Path(args.slides) if args.slides else None
    try:
        if args.demo:
            from mil_runtime.demo.__main__ import DEFAULT_MODEL

            models = models or [DEFAULT_MODEL]
            slides = slides or demo_slides(state / "demo-slides")
        if not models:
            raise InvalidInputError("give at least one --model (or --demo)")
        if slides is None and args.results is None:
            raise InvalidInputError("give --slides ROOT (or --results DIR, or --demo)")
        app = create_app(models, slides, state_dir=state, results_dir=Path(args.results) if args.results else None,
                         token_file=Path(args.token_file) if args.token_file else None,
                         cors_origins=args.cors_origin, max_jobs=args.max_jobs, workers=args.workers,
                         device=args.device)
    except MilkitError as exc:
        print(f"mil-serve: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    print(f"mil-serve: http://{args.host}:{args.port}/  (API under /v1, OpenAPI at /v1/openapi.json)",
          file=sys.stderr, flush=True)
    app.state.service.jobs.prestart()  # job processes up and their models loaded before the first job
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
