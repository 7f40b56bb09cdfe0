"""mil-serve's page in a real browser (Debian's chromium driven by playwright).

One demo-style app (the demo model, a small synthetic slide with two planted lesions) runs under uvicorn in
a thread on 127.0.0.1. The page runs a job from its pickers, the slide tiles draw, the overlay is turned on,
and the screenshot's pixels must show the hot end of the colour map over the planted lesions (the
generator's own ground truth) and nowhere else. Moving the opacity slider must change the overlay's alpha
in the pixels, a top-k entry must fly the view to its tile, and the attention under the pointer must show.
Every request the browser makes outside 127.0.0.1:<port> is blocked and recorded: none may be attempted
(no CDN).
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "demo" / "abmil_demo.onnx"
VENDOR = REPO / "mil_runtime" / "serve" / "page" / "vendor" / "openseadragon" / "openseadragon.min.js"
SLIDE = "cases/lesions.svs"  # a sub-folder, so that the page handles paths with a slash
HEIGHT, WIDTH = 2048, 3072  # small: the job takes a few seconds on one core
LESIONS = [(640, 760, 330), (1300, 2260, 380)]  # (cy, cx, r) level-0 px, well apart and inside the slide
VIEW = {"width": 1300, "height": 800}

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium for this test", pytrace=False)
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); set CI to make this a failure",
                allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api")
if not VENDOR.exists():
    pytest.fail(f"{VENDOR} is missing: run `make page`", pytrace=False)


# -- the server ------------------------------------------------------------------------------------
class _Server:
    """uvicorn serving `app` in a thread on a socket already bound to 127.0.0.1 (a free port, no race)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    from mil_runtime.demo import write_synthetic_slide

    root = tmp_path_factory.mktemp("slides")
    (root / SLIDE).parent.mkdir(parents=True)
    return write_synthetic_slide(root / SLIDE, height=HEIGHT, width=WIDTH, mpp=0.5, lesions=LESIONS,
                                 tissue=0.6, seed=11)


@pytest.fixture(scope="module")
def server(truth, tmp_path_factory):
    from mil_runtime.serve import create_app

    root = truth.path.parents[1]
    app = create_app([MODEL], root, state_dir=tmp_path_factory.mktemp("state"))
    with _Server(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


# -- helpers ---------------------------------------------------------------------------------------
def _wait_drawn(page, timeout_s: float = 60.0) -> None:
    """Until the slide (and overlay) drew every tile the view needs and stayed so for a moment."""
    page.wait_for_function("() => window.milkit && window.milkit.drawn()", timeout=timeout_s * 1000)
    page.wait_for_timeout(300)
    page.wait_for_function("() => window.milkit.drawn()", timeout=timeout_s * 1000)


def _shot(page, name: str) -> np.ndarray:
    """The viewer's pixels: (H, W, 3) uint8 RGB, in the viewer element's CSS pixels (device scale 1).

    With MILKIT_PAGE_SHOTS=DIR set, each screenshot is also saved there as <name>.png (to look at).
    """
    from PIL import Image

    png = page.locator("#viewer").screenshot(animations="disabled")
    if os.environ.get("MILKIT_PAGE_SHOTS"):
        folder = Path(os.environ["MILKIT_PAGE_SHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.png").write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _to_viewer_px(page, points: list[tuple[float, float]]) -> np.ndarray:
    """Level-0 (x, y) points -> viewer-element pixels, through the slide's own OpenSeadragon transform."""
    return np.array(page.evaluate(
        """(points) => {
            const item = window.milkit.state.slideItem;
            return points.map(([x, y]) => {
                const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
                return [p.x, p.y];
            });
        }""", [list(p) for p in points]))


def _lesion_masks(page, shape, tile_level0: int):
    """Boolean (H, W) masks of screen pixels: inside a lesion's core (r/2) and near any lesion (r + 1.5 tiles)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    centres = _to_viewer_px(page, [(cx, cy) for cy, cx, _ in LESIONS])
    edge = _to_viewer_px(page, [(0, 0), (1000, 0)])
    px_per_level0 = (edge[1, 0] - edge[0, 0]) / 1000.0
    cores, near = [], np.zeros(shape, bool)
    for (sx, sy), (_, _, r) in zip(centres, LESIONS):
        d2 = (xx - sx) ** 2 + (yy - sy) ** 2
        cores.append(d2 <= (0.5 * r * px_per_level0) ** 2)
        near |= d2 <= ((r + 1.5 * tile_level0) * px_per_level0) ** 2
    return cores, near


def _hot(on: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Pixels the overlay painted in the colour map's hot end (viridis yellow-green: high R and G, low B).

    Slide pixels are white glass, pink stroma (B ~200) or purple nuclei (R < 150): none of them pass, and
    the overlay must have changed the pixel (a big drop in blue) for it to count.
    """
    on, off = on.astype(np.int32), off.astype(np.int32)
    return (on[..., 0] > 150) & (on[..., 1] > 170) & (on[..., 2] < 120) & (off[..., 2] - on[..., 2] > 50)


# -- the test --------------------------------------------------------------------------------------
def test_page_shows_attention_over_the_planted_lesions(server, truth, browser):
    origin = f"http://127.0.0.1:{server.port}"
    context = browser.new_context(viewport=VIEW, device_scale_factor=1)
    outside, errors, seen = [], [], []

    def gate(route):
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or (parts.scheme == "http" and parts.netloc == f"127.0.0.1:{server.port}"):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    context.route("**/*", gate)
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda request: seen.append(request.url))
    try:
        page.goto(origin + "/", wait_until="load")

        # the pickers come from /v1/slides and /v1/models; the slide opens before any job
        page.wait_for_function("() => document.querySelectorAll('#slide-picker option').length > 0")
        assert page.locator("#slide-picker").input_value() == SLIDE
        assert page.locator("#model-picker option").count() >= 1
        _wait_drawn(page)

        # run a job: the progress bar follows it to the end, then the overlay, legend, prediction, top-k
        page.click("#run")
        page.wait_for_function("() => new URLSearchParams(location.search).get('job')")
        page.wait_for_function("() => document.querySelector('#progress-text').textContent.startsWith('done')",
                               timeout=240_000)
        assert page.locator("#progress").evaluate("bar => bar.value === bar.max && !bar.hidden")
        page.wait_for_function("() => document.querySelectorAll('#topk li').length > 0", timeout=60_000)
        page.wait_for_function("() => window.milkit.state.overlayItem !== null", timeout=60_000)
        page.wait_for_function("() => { const img = document.querySelector('#legend');"
                               " return !img.hidden && img.complete && img.naturalWidth > 0; }", timeout=30_000)
        assert page.locator("#prediction").inner_text().strip() == "lesion"
        assert page.locator("#probabilities tr").count() == 2

        # overlay off (slide only), then on at full opacity: hot pixels over the lesions, not elsewhere
        page.locator("#overlay-toggle").uncheck()
        page.locator("#opacity").fill("1")
        _wait_drawn(page)
        off = _shot(page, "overlay-off")
        assert (off.astype(int).sum(axis=2) < 700).mean() > 0.2, "the slide's tissue did not draw"
        page.locator("#overlay-toggle").check()
        _wait_drawn(page)
        on = _shot(page, "overlay-on")
        tile_level0 = int(page.locator("#topk li").first.get_attribute("data-width"))  # level-0 px
        cores, near = _lesion_masks(page, on.shape[:2], tile_level0)
        hot = _hot(on, off)
        assert hot.sum() > 500, f"no hot colour on screen ({hot.sum()} px)"
        assert hot[~near].sum() <= 0.03 * hot.sum(), (
            f"{hot[~near].sum()} of {hot.sum()} hot pixels lie away from the planted lesions")
        for i, core in enumerate(cores):
            assert hot[core].mean() > 0.5, f"lesion {i}: only {hot[core].mean():.0%} of its core is hot"

        # the slider changes the overlay's alpha: the overlay's change to the pixels shrinks with it
        page.locator("#opacity").fill("0.3")
        page.wait_for_function("() => Math.abs(window.milkit.state.overlayItem.getOpacity() - 0.3) < 1e-6")
        _wait_drawn(page)
        faint = _shot(page, "overlay-faint")
        full_delta = np.abs(on.astype(int) - off.astype(int)).sum(axis=2)
        faint_delta = np.abs(faint.astype(int) - off.astype(int)).sum(axis=2)
        painted = full_delta > 60
        ratio = faint_delta[painted].mean() / full_delta[painted].mean()
        assert 0.15 < ratio < 0.45, f"opacity 0.3 should scale the overlay's change by ~0.3, got {ratio:.2f}"

        # attention under the pointer: hover the top tile
        top = page.evaluate("() => { const li = document.querySelector('#topk li');"
                            " return [Number(li.dataset.x), Number(li.dataset.y)]; }")
        (sx, sy), = _to_viewer_px(page, [(top[0] + tile_level0 / 2, top[1] + tile_level0 / 2)])
        box = page.locator("#viewer").bounding_box()
        page.mouse.move(box["x"] + sx - 5, box["y"] + sy - 5)
        page.mouse.move(box["x"] + sx, box["y"] + sy)
        page.wait_for_function("() => document.querySelector('#pointer-attention').textContent.match(/rank 1(\\D|$)/)",
                               timeout=10_000)

        # a top-k click flies the view there: the viewport centres on that tile, zoomed in
        zoom_before = page.evaluate("() => window.milkit.viewer.viewport.getZoom(true)")
        entries = page.locator("#topk li")
        target = entries.nth(min(2, entries.count() - 1))
        tx, ty = float(target.get_attribute("data-x")), float(target.get_attribute("data-y"))
        target.click()
        _wait_drawn(page)
        centre = page.evaluate("""() => {
            const m = window.milkit, c = m.viewer.viewport.getCenter(true);
            const p = m.state.slideItem.viewportToImageCoordinates(c);
            return [p.x, p.y, m.viewer.viewport.getZoom(true)];
        }""")
        assert abs(centre[0] - (tx + tile_level0 / 2)) < tile_level0 / 2
        assert abs(centre[1] - (ty + tile_level0 / 2)) < tile_level0 / 2
        assert centre[2] > 1.5 * zoom_before
        assert page.locator("#topk li.active").count() == 1

        # /v1/jobs/{id}/view opens the same job in a fresh page
        job = page.evaluate("() => window.milkit.state.job.id")
        fresh = context.new_page()
        fresh.on("pageerror", lambda exc: errors.append(str(exc)))
        fresh.goto(f"{origin}/v1/jobs/{job}/view")
        assert urlsplit(fresh.url).query == f"job={job}"
        fresh.wait_for_function("() => document.querySelectorAll('#topk li').length > 0", timeout=60_000)
        assert fresh.locator("#prediction").inner_text().strip() == "lesion"
        fresh.close()
    finally:
        context.close()

    assert not outside, f"the page tried to reach beyond 127.0.0.1: {outside}"
    assert all(urlsplit(u).netloc == f"127.0.0.1:{server.port}" for u in seen if urlsplit(u).scheme == "http")
    assert any("/page/vendor/openseadragon/openseadragon.min.js" in u for u in seen)
    assert not errors, errors
