"""mil-serve's page in a real browser (Debian's chromium driven by playwright).

Demo-style apps (the demo model, a small synthetic slide with two planted lesions) run under uvicorn in a
thread on 127.0.0.1, each on a free port.
- The main test runs a job from the page's pickers and follows its progress bar (SSE). With the slide
  tiles drawn, the overlay is turned on, and the screenshot's pixels must show the hot end of the colour
  map over the planted lesions (the generator's own ground truth) and nowhere else. The opacity slider
  must scale the overlay's change to the pixels; cmap= must recolour it; the attention under the pointer
  must show (throttled); a top-k entry must fly the view to its tile; re-aggregation of the region in view
  must split the tiles; a roi job, a failed job and /v1/jobs/{id}/view are checked too.
- With --token-file and a per-class-attention model: the page asks for the token, sends it only as the
  bearer header, loads tiles by signed URLs (renewed in place), and its class selector switches the map.
- create_app mounted at /milkit, and --results (an earlier run's outputs browsed as jobs).
Every request the browser makes outside 127.0.0.1:<port> is blocked and recorded: none may be attempted
(no CDN); a quick test (no browser) checks that the page's files name no other host.
MILKIT_PAGE_SHOTS=DIR keeps the screenshots.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest


CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "mil_runtime" / "serve" / "page"
MODEL = REPO / "models" / "demo" / "abmil_demo.onnx"
ENCODER = REPO / "models" / "demo" / "tiny_cnn.onnx"
TOY_CLASSES = ["stroma", "tumor/high grade", "other"]  # a "/" must survive the class= query
TOKEN = "page-test-token-7d41c09e5b2a"
MOUNT = "/milkit"
VENDOR = REPO / "mil_runtime" / "serve" / "page" / "vendor" / "openseadragon" / "openseadragon.min.js"
SLIDE = "cases/lesions.svs"  # a sub-folder, so that the page handles paths with a slash
BLANK = "blank.svs"
HEIGHT, WIDTH = 2048, 3072  # small: the job takes a few seconds on one core
LESIONS = [(640, 760, 330), (1300, 2260, 380)]  # (cy, cx, r) level-0 px, well apart and inside the slide
VIEW = {"width": 1300, "height": 800}



def _missing(why: str) -> None:
    """Skip, or fail where CI is set (there .ci/run and `make test` provide everything)."""
    if os.environ.get("CI"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why + "; set CI to make this a failure")


@pytest.fixture(scope="module")
def _requirements():
    # checked here, not at import: a quick run (-m "not slow") collects this file and must not fail on it
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright package is missing (pip install -c constraints.txt playwright)")
    if not VENDOR.exists():
        _missing(f"{VENDOR} is missing: run `make page` (`make test` does)")


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
    from mil_runtime.demo import write_blank_slide, write_synthetic_slide

    root = tmp_path_factory.mktemp("slides")
    (root / SLIDE).parent.mkdir(parents=True)
    write_blank_slide(root / BLANK, height=1024, width=1024)  # no tissue: its job fails
    return write_synthetic_slide(root / SLIDE, height=HEIGHT, width=WIDTH, mpp=0.5, lesions=LESIONS,
                                 tissue=0.6, seed=11)


@pytest.fixture(scope="module")
def server(truth, tmp_path_factory):
    from mil_runtime.serve import create_app

    root = truth.path.parents[1]
    app = create_app([MODEL], root, state_dir=tmp_path_factory.mktemp("state"))
    from serve_helpers import slow_down

    slow_down(app, delay=0.25, batch_size=8)  # a job runs ~2 s: progress and cancel can be seen
    with _Server(app) as running:
        yield running


@pytest.fixture(scope="module")
def toy_model_file(tmp_path_factory) -> Path:
    """A per-class-attention model (tests/class_attention_toy.py) on the demo encoder's features."""
    pytest.importorskip("torch")
    from class_attention_toy import toy_model
    from mil_export import export_onnx

    from mil_runtime.session import open_session

    folder = tmp_path_factory.mktemp("toy")
    shutil.copy(ENCODER, folder / ENCODER.name)  # found beside the model, as for a shipped bundle
    encoder = open_session(ENCODER, device="cpu")
    ref = {"name": encoder.metadata.model_name, "output_dim": encoder.metadata.feature_dim, "sha256": encoder.sha256}
    return export_onnx(toy_model(encoder.metadata.feature_dim, len(TOY_CLASSES), seed=5), folder / "toy.onnx",
                       class_names=TOY_CLASSES, encoder=ref, tiling={"tile_px": 128, "mpp": 1.0, "overlap": 0.0})


@pytest.fixture(scope="module")
def auth_server(truth, toy_model_file, tmp_path_factory):
    """The demo model and the toy, with --token-file: the API needs the token, tiles signed URLs."""
    from mil_runtime.serve import create_app

    state = tmp_path_factory.mktemp("auth-state")
    token_file = state.parent / f"{state.name}.token"
    token_file.write_text(TOKEN + "\n")
    app = create_app([MODEL, toy_model_file], truth.path.parents[1], state_dir=state, token_file=token_file)
    with _Server(app) as running:
        yield running


@pytest.fixture(scope="module")
def mounted_server(truth, tmp_path_factory):
    """create_app mounted at /milkit inside another app, as an existing server would embed it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from mil_runtime.serve import create_app

    inner = create_app([MODEL], truth.path.parents[1], state_dir=tmp_path_factory.mktemp("mounted-state"))

    @asynccontextmanager
    async def lifespan(outer):
        async with inner.router.lifespan_context(inner):  # Starlette does not run a mounted app's lifespan
            yield

    outer = FastAPI(lifespan=lifespan)
    outer.mount(MOUNT, inner)
    with _Server(outer) as running:
        yield running


@pytest.fixture(scope="module")
def results_server(truth, tmp_path_factory):
    """`mil-serve --results DIR`: an earlier run's output set (run_slide with out_dir), served as a job."""
    from mil_runtime.encoder import find_encoder, load_encoder
    from mil_runtime.model import load_model
    from mil_runtime.pipeline import run_slide
    from mil_runtime.serve import create_app

    out = tmp_path_factory.mktemp("results")
    model = load_model(MODEL, device="cpu")
    run_slide(truth.path, model, load_encoder(find_encoder(MODEL, model.metadata), device="cpu"), out_dir=out,
              workers=1)
    app = create_app([MODEL], truth.path.parents[1], state_dir=tmp_path_factory.mktemp("results-state"),
                     results_dir=out)
    with _Server(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser(_requirements):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
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


def _wait_job(page, timeout_s: float = 240.0) -> str:
    """Until the page shows the job finished (done, failed or cancelled); returns #progress-text."""
    page.wait_for_function("() => /^(done|failed|cancelled)/"
                           ".test(document.querySelector('#progress-text').textContent)",
                           timeout=timeout_s * 1000)
    return page.locator("#progress-text").inner_text()


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


class _Watched:
    """A browser context whose requests beyond 127.0.0.1:<port> are blocked and recorded."""

    def __init__(self, browser, port: int) -> None:
        self.origin = f"http://127.0.0.1:{port}"
        self.outside: list[str] = []  # URLs the page tried to reach elsewhere (blocked)
        self.errors: list[str] = []  # uncaught exceptions in the page
        self.requests: list = []  # every request the pages made (playwright Request objects)
        self.responses: list[tuple[str, int]] = []  # (url, status) of every answer
        self.console: list[str] = []  # console errors (a Content-Security-Policy violation would be one)
        self.context = browser.new_context(viewport=VIEW, device_scale_factor=1)
        self.context.route("**/*", self._gate)

    def _gate(self, route) -> None:
        parts = urlsplit(route.request.url)
        if parts.scheme in ("data", "blob") or (parts.scheme == "http" and
                                                f"{parts.scheme}://{parts.netloc}" == self.origin):
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()

    def page(self):
        page = self.context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", lambda request: self.requests.append(request))
        page.on("response", lambda response: self.responses.append((response.url, response.status)))
        page.on("console", lambda message: message.type == "error" and self.console.append(message.text))
        return page

    def failed(self, since: int = 0) -> list[tuple[str, int]]:
        """Answers >= 400 the pages got (from the `since`-th answer on)."""
        return [(url, status) for url, status in self.responses[since:] if status >= 400]

    @property
    def urls(self) -> list[str]:
        return [request.url for request in self.requests]

    def check_stayed_home(self, allowed_console=()) -> None:
        assert not self.outside, f"the page tried to reach beyond 127.0.0.1: {self.outside}"
        http = [u for u in self.urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")]
        assert all(u.startswith(self.origin + "/") for u in http)
        assert any(u.endswith("/page/vendor/openseadragon/openseadragon.min.js") for u in http)
        assert not self.errors, self.errors
        console = [m for m in self.console if not any(a in m for a in allowed_console)]
        assert not console, console


# -- the tests -------------------------------------------------------------------------------------
def test_page_files_name_nothing_outside_this_server():
    """Quick (no browser): the page's own files load nothing from another host, only ./page/... files."""
    html = (PAGE / "index.html").read_text()
    for name in ("index.html", "viewer.js", "viewer.css"):
        text = (PAGE / name).read_text()
        assert not re.search(r"(?i)(?:https?:|wss?:)?//[a-z0-9.-]+\.[a-z]{2,}", text), name  # no host anywhere
        assert "@import" not in text and "import(" not in text, name
    sources = re.findall(r'<(?:script|link)\b[^>]*\b(?:src|href)="([^"]*)"', html)
    assert sources and all(s == "data:," or s.startswith("page/") for s in sources), sources
    assert "page/vendor/openseadragon/openseadragon.min.js" in sources
    csp = re.search(r'http-equiv="Content-Security-Policy"\s+content="([^"]*)"', html).group(1)
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "http" not in csp


@pytest.mark.slow
def test_page_shows_attention_over_the_planted_lesions(server, truth, browser):
    watched = _Watched(browser, server.port)
    origin = watched.origin
    context = watched.context
    page = watched.page()
    try:
        page.goto(origin + "/", wait_until="load")

        # the pickers come from /v1/slides and /v1/models; the slide opens before any job
        page.wait_for_function("() => document.querySelectorAll('#slide-picker option').length === 2")
        assert sorted(page.locator("#slide-picker option").evaluate_all("opts => opts.map(o => o.value)")) == \
            sorted([SLIDE, BLANK])
        assert page.locator("#model-picker option").count() == 1
        page.select_option("#slide-picker", SLIDE)
        page.wait_for_function("(path) => window.milkit.state.slidePath === path",
                               arg=f"/v1/slides/{SLIDE}.dzi")
        _wait_drawn(page)

        # run a job: the progress bar follows it to the end, then the overlay, legend, prediction, top-k
        page.evaluate("""() => {
            window.progressSeen = [];
            const text = document.querySelector('#progress-text'), bar = document.querySelector('#progress');
            new MutationObserver(() => window.progressSeen.push([text.textContent, bar.value, bar.max]))
                .observe(text, {childList: true, characterData: true, subtree: true});
        }""")
        page.click("#run")
        page.wait_for_function("() => new URLSearchParams(location.search).get('job')")
        assert _wait_job(page).startswith("done"), page.locator("#error").inner_text()
        assert page.locator("#progress").evaluate("bar => bar.value === bar.max && !bar.hidden")
        seen = page.evaluate("() => window.progressSeen")
        midway = [(text, value, top) for text, value, top in seen
                  if text.startswith("running") and 0 < value < top and text.endswith(f" {int(value)}/{int(top)}")]
        assert midway, f"the progress bar never showed a running job part-way: {seen}"
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

        # another colour map (cmap=): at full opacity the painted tiles turn grey
        page.locator("#opacity").fill("1")
        page.select_option("#cmap-select", "gray")
        page.wait_for_function("() => { const item = window.milkit.state.overlayItem;"
                               " return item && String(item.source.queryParams).includes('cmap=gray'); }")
        _wait_drawn(page)
        grey = _shot(page, "overlay-gray").astype(int)
        spread = grey.max(axis=2) - grey.min(axis=2)
        assert (spread[painted] <= 12).mean() > 0.9, "cmap=gray did not paint grey"
        assert "cmap=gray" in page.locator("#legend").get_attribute("src")
        page.select_option("#cmap-select", "viridis")

        # attention under the pointer: hover the top tile
        top = page.evaluate("() => { const li = document.querySelector('#topk li');"
                            " return [Number(li.dataset.x), Number(li.dataset.y)]; }")
        (sx, sy), = _to_viewer_px(page, [(top[0] + tile_level0 / 2, top[1] + tile_level0 / 2)])
        box = page.locator("#viewer").bounding_box()
        page.mouse.move(box["x"] + sx - 5, box["y"] + sy - 5)
        page.mouse.move(box["x"] + sx, box["y"] + sy)
        page.wait_for_function("() => document.querySelector('#pointer-attention').textContent.match(/rank 1(\\D|$)/)",
                               timeout=10_000)
        # throttled: a burst of pointer moves makes at most one /at request per 150 ms (plus the trailing one)
        asked = sum(urlsplit(u).path.endswith("/at") for u in watched.urls)
        started = time.monotonic()
        for i in range(40):
            page.mouse.move(box["x"] + sx + 2 * i, box["y"] + sy + i)
        elapsed = time.monotonic() - started
        page.wait_for_timeout(500)
        burst = sum(urlsplit(u).path.endswith("/at") for u in watched.urls) - asked
        assert 1 <= burst <= elapsed / 0.15 + 2, (burst, elapsed)

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

        # re-aggregation on the region in view (around that lesion tile): without it + only it = every tile
        n_tiles = page.evaluate("() => window.milkit.state.result.n_instances")
        found = {}
        for mode in ("exclude", "include"):
            page.click(f"#reaggregate-{mode}")
            page.wait_for_function("(mode) => { const d = document.querySelector('#reaggregate-result').dataset;"
                                   " return d.state === 'error' || (d.state === 'done' && d.mode === mode); }",
                                   arg=mode, timeout=30_000)
            data = page.locator("#reaggregate-result").evaluate("box => ({...box.dataset})")
            assert data["state"] == "done", page.locator("#reaggregate-result").inner_text()
            found[mode] = data
        assert 0 < int(found["include"]["tiles"]) < n_tiles
        assert int(found["include"]["tiles"]) + int(found["exclude"]["tiles"]) == n_tiles
        assert found["include"]["prediction"] == "lesion"
        assert page.locator(".region-marker").count() == 1
        if os.environ.get("MILKIT_PAGE_SHOTS"):
            page.screenshot(path=str(Path(os.environ["MILKIT_PAGE_SHOTS"]) / "page.png"))

        # /v1/jobs/{id}/view opens the same job in a fresh page (checked below)
        job = page.evaluate("() => window.milkit.state.job.id")

        # a job on the region in view only (roi): the same slide, fewer tiles
        page.check("#run-roi")
        page.click("#run")
        page.wait_for_function("(job) => window.milkit.state.job && window.milkit.state.job.id !== job", arg=job)
        assert _wait_job(page).startswith("done"), page.locator("#error").inner_text()
        page.wait_for_function("() => window.milkit.state.result !== null", timeout=60_000)
        roi_tiles = page.evaluate("() => window.milkit.state.result.n_instances")
        assert 0 < roi_tiles < n_tiles

        # Cancel while it runs: the whole slide as the roi (another run key, every tile), cancelled mid-way
        page.evaluate("() => window.milkit.viewer.viewport.goHome(true)")
        previous = page.evaluate("() => window.milkit.state.job.id")
        page.click("#run")
        page.wait_for_function("(job) => window.milkit.state.job && window.milkit.state.job.id !== job",
                               arg=previous)
        page.wait_for_function("() => document.querySelector('#progress-text').textContent.startsWith('running')",
                               timeout=60_000)
        page.click("#cancel")
        assert _wait_job(page).startswith("cancelled")
        assert page.locator("#cancel").is_hidden()
        cancelled = page.evaluate("() => window.milkit.state.job.id")
        assert httpx.get(f"{origin}/v1/jobs/{cancelled}").json()["state"] == "cancelled"
        page.uncheck("#run-roi")

        # a job that fails (a slide without tissue) shows the runtime's code and line, and no stale overlay
        page.select_option("#slide-picker", BLANK)
        page.click("#run")
        assert _wait_job(page).startswith("failed")
        message = page.locator("#error").inner_text()
        assert page.locator("#error").is_visible() and message.startswith("failed (code "), message
        assert page.evaluate("() => window.milkit.state.overlayItem") is None
        assert page.locator("#topk li").count() == 0
        assert page.locator("#prediction").inner_text().strip() == "no result yet"

        fresh = watched.page()
        fresh.goto(f"{origin}/v1/jobs/{job}/view")
        assert urlsplit(fresh.url).query == f"job={job}"
        fresh.wait_for_function("() => document.querySelectorAll('#topk li').length > 0", timeout=60_000)
        assert fresh.locator("#prediction").inner_text().strip() == "lesion"
        fresh.close()
    finally:
        context.close()

    watched.check_stayed_home()
    assert any(urlsplit(u).path == f"/v1/jobs/{job}/events" for u in watched.urls)  # progress came by SSE
    assert not watched.failed(), watched.failed()


@pytest.mark.slow
def test_page_asks_for_the_token_and_switches_class_maps(auth_server, truth, browser):
    watched = _Watched(browser, auth_server.port)
    page = watched.page()
    try:
        page.goto(watched.origin + "/", wait_until="load")
        # the page loads without the token (it holds no data) and asks for it
        page.wait_for_selector("#token-form:not([hidden])")
        assert page.locator("#slide-picker option").count() == 0
        # a wrong token is refused, forgotten, and asked for again
        page.fill("#token", "not-" + TOKEN)
        page.click("#token-submit")
        page.wait_for_function("() => !document.querySelector('#token-form').hidden &&"
                               " document.querySelector('#token-form label').textContent.includes('refused')")
        assert page.evaluate("() => sessionStorage.getItem('milkit-token')") is None
        assert page.locator("#slide-picker option").count() == 0
        page.fill("#token", TOKEN)
        asked = len(watched.requests)  # requests before this went without a token (and got 401)
        answered = len(watched.responses)
        page.click("#token-submit")
        page.wait_for_function("() => document.querySelectorAll('#model-picker option').length === 2")
        assert page.evaluate("() => sessionStorage.getItem('milkit-token')") == TOKEN
        _wait_drawn(page)  # the slide's DZI and tiles load through signed URLs

        models = page.evaluate("() => window.milkit.state.models")
        toy = next(m["id"] for m in models if m["class_names"] == TOY_CLASSES)
        page.select_option("#slide-picker", SLIDE)
        page.select_option("#model-picker", toy)
        page.click("#run")
        assert _wait_job(page).startswith("done"), page.locator("#error").inner_text()
        page.wait_for_function("() => document.querySelectorAll('#topk li').length > 0", timeout=60_000)
        page.wait_for_function("() => window.milkit.state.overlayItem !== null", timeout=60_000)

        # one map per class: the selector lists them, starting at the predicted class
        assert page.locator("#class-select").is_enabled()
        assert page.locator("#class-select option").all_inner_texts() == TOY_CLASSES
        predicted = page.locator("#prediction").inner_text().strip()
        assert predicted in TOY_CLASSES and page.locator("#class-select").input_value() == predicted
        _wait_drawn(page)
        first = _shot(page, "class-first")
        other = next(c for c in TOY_CLASSES if c != predicted and "/" in c) if predicted != TOY_CLASSES[1] \
            else TOY_CLASSES[0]
        page.select_option("#class-select", other)
        page.wait_for_function("(cls) => { const item = window.milkit.state.overlayItem;"
                               " return item && new URLSearchParams(String(item.source.queryParams))"
                               ".get('class') === cls; }",
                               arg=other, timeout=30_000)
        _wait_drawn(page)
        second = _shot(page, "class-second")
        assert np.abs(first.astype(int) - second.astype(int)).sum(axis=2).astype(bool).mean() > 0.05, (
            "switching the class did not change the overlay")
        legend = page.locator("#legend").get_attribute("src")
        assert parse_qs(urlsplit(legend).query)["class"] == [other]

        # signed URLs expire: the page swaps in fresh ones under the open images, and tiles keep loading
        before = page.evaluate("() => [String(window.milkit.state.slideItem.source.queryParams),"
                               " String(window.milkit.state.overlayItem.source.queryParams)]")
        page.wait_for_timeout(1100)  # expiries have one-second resolution
        page.evaluate("() => window.milkit.refreshSignatures()")
        after = page.evaluate("() => [String(window.milkit.state.slideItem.source.queryParams),"
                              " String(window.milkit.state.overlayItem.source.queryParams)]")
        for old, new in zip(before, after):
            assert parse_qs(old.lstrip("?"))["exp"] != parse_qs(new.lstrip("?"))["exp"]
            assert parse_qs(old.lstrip("?")).get("class") == parse_qs(new.lstrip("?")).get("class")
        fresh_sig = parse_qs(after[0].lstrip("?"))["sig"][0]
        page.evaluate("() => { const v = window.milkit.viewer.viewport; v.zoomBy(4); v.applyConstraints(); }")
        _wait_drawn(page)
        assert any(fresh_sig in r.url and "_files/" in r.url for r in watched.requests)
    finally:
        watched.context.close()

    watched.check_stayed_home(allowed_console=("status of 401", "status of 403"))
    api = [r for r in watched.requests if urlsplit(r.url).path.startswith("/v1/")]
    tiles = [r for r in api if "_files/" in r.url or r.url.split("?")[0].endswith((".dzi", "legend.png"))]
    fetched = [r for r in watched.requests[asked:] if r.resource_type == "fetch"]
    assert tiles and fetched
    # the token travels only as the bearer header of fetch(); tiles, DZIs and the legend use signed URLs
    assert not any(TOKEN in r.url for r in watched.requests)
    for request in fetched:
        assert request.headers.get("authorization") == f"Bearer {TOKEN}", request.url
    for request in tiles:
        query = parse_qs(urlsplit(request.url).query)
        assert "sig" in query and "exp" in query and "authorization" not in request.headers, request.url
    classes = {parse_qs(urlsplit(r.url).query).get("class", [None])[0] for r in tiles if "heatmap_files" in r.url}
    assert {predicted, other} <= classes
    tops = [parse_qs(urlsplit(r.url).query).get("class", [None])[0]
            for r in api if urlsplit(r.url).path.endswith("/top")]
    assert tops[-1] == other  # the top-k list follows the chosen class's map
    assert not any(urlsplit(r.url).path.endswith("/events") for r in api)  # EventSource cannot send the header
    assert not watched.failed(since=answered), watched.failed(since=answered)
    assert {status for _, status in watched.failed()} <= {401, 403}  # before the right token


@pytest.mark.slow
def test_page_works_where_create_app_is_mounted(mounted_server, browser):
    watched = _Watched(browser, mounted_server.port)
    page = watched.page()
    try:
        page.goto(f"{watched.origin}{MOUNT}/", wait_until="load")
        page.wait_for_function("() => document.querySelectorAll('#slide-picker option').length === 2")
        page.select_option("#slide-picker", SLIDE)
        page.click("#run")
        assert _wait_job(page).startswith("done"), page.locator("#error").inner_text()
        page.wait_for_function("() => document.querySelectorAll('#topk li').length > 0", timeout=60_000)
        page.wait_for_function("() => window.milkit.state.overlayItem !== null", timeout=60_000)
        _wait_drawn(page)
        assert page.locator("#prediction").inner_text().strip() == "lesion"
        # .../v1/jobs/{id}/view stays inside the mount
        job = page.evaluate("() => window.milkit.state.job.id")
        fresh = watched.page()
        fresh.goto(f"{watched.origin}{MOUNT}/v1/jobs/{job}/view")
        assert urlsplit(fresh.url).path == MOUNT + "/" and urlsplit(fresh.url).query == f"job={job}"
        fresh.wait_for_function("() => window.milkit.state.overlayItem !== null", timeout=60_000)
        _wait_drawn(fresh)
    finally:
        watched.context.close()
    assert not watched.outside and not watched.errors and not watched.console, (
        watched.outside, watched.errors, watched.console)
    http = [u for u in watched.urls if urlsplit(u).scheme == "http"]
    assert all(urlsplit(u).path.startswith(MOUNT + "/") for u in http), [u for u in http if MOUNT not in u]
    assert any("/heatmap_files/" in u for u in http) and any(".svs_files/" in u for u in http)
    assert not watched.failed(), watched.failed()


@pytest.mark.slow
def test_page_browses_finished_results(results_server, browser):
    watched = _Watched(browser, results_server.port)
    page = watched.page()
    try:
        page.goto(watched.origin + "/", wait_until="load")
        page.wait_for_function("() => document.querySelectorAll('#job-picker option').length === 2")
        job = page.locator("#job-picker option").nth(1)
        assert job.inner_text().startswith(SLIDE)
        page.select_option("#job-picker", job.get_attribute("value"))
        page.wait_for_function("() => document.querySelectorAll('#topk li').length > 0", timeout=60_000)
        page.wait_for_function("() => window.milkit.state.overlayItem !== null", timeout=60_000)
        _wait_drawn(page)
        assert page.locator("#prediction").inner_text().strip() == "lesion"
        assert urlsplit(page.url).query == f"job={job.get_attribute('value')}"
        assert not any(urlsplit(u).path == "/v1/jobs" and r.method == "POST"
                       for r in watched.requests for u in [r.url])  # served, not run again
    finally:
        watched.context.close()
    watched.check_stayed_home()
    assert not watched.failed(), watched.failed()
