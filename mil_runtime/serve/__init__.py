"""mil-serve: the HTTP service and the viewer page (FastAPI; no PyTorch).

    from mil_runtime.serve import create_app
    app = create_app([Path("abmil.onnx")], Path("slides"), state_dir=Path("state"))
    # uvicorn.run(app) -- or mount it: outer.mount("/milkit", app)

See docs/serve.md for the API, its security and how to mount it.
"""

from __future__ import annotations

from mil_runtime.serve.app import create_app

__all__ = ["create_app"]
