"""mil-serve speed (issue 11 section 5), in one run and under the same load:

- slide tiles: mil-serve (cold: no tile cache; warm: its tile cache filled) vs a bare threaded server
  around DeepZoomGenerator (http.server.ThreadingHTTPServer, JPEG q75: the floor), 8 concurrent
  keep-alive clients fetching random tiles of the three finest Deep Zoom levels of a generated
  12,288 x 12,288 slide; plus the single-thread floor (get_tile + JPEG encode);
- overlay tiles: the same load on /v1/jobs/{id}/heatmap_files (cold and warm overlay cache);
- re-aggregation of a 10,000-tile ABMIL job (a 13,184 x 13,184 slide at 1 um/px, 97% tissue) vs
  `predict` on the same bag (server-side time from the Server-Timing header, and end to end);
- a job vs `run_slide` on the same slide;
- 16 clients fetching tiles with and without a job running: tile p99.

    python benchmarks/serve.py [--work DIR] [--requests 150] [--json out.json]

Servers run as child processes (uvicorn for mil-serve), clients as threads of this process, all on
the same cores: ratios are from one run on one machine. Slides are generated once into --work.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = REPO / "models" / "demo" / "abmil_demo.onnx"
TILE_SLIDE = "tiles-12288.svs"
BAG_SLIDE = "bag-13184.svs"
BAG_SIDE = 13184  # 103 x 103 tiles of 128 um at 1 um/px, ~97% tissue: just over 10,000 tiles


# ---------------------------------------------------------------------------------------------- servers
def bare_server(root: Path, port: int) -> None:
    """The floor: ThreadingHTTPServer + DeepZoomGenerator, GET /<slide>_files/<level>/<col>_<row>.jpeg."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    generators = {}
    lock = threading.Lock()

    def generator(name: str):
        with lock:
            if name not in generators:
                generators[name] = DeepZoomGenerator(OpenSlide(str(root / name)), 254, 1, limit_bounds=False)
            return generators[name]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            try:
                name, rest = self.path.lstrip("/").split("_files/")
                level, address = rest.split("/")
                col, row = address.removesuffix(".jpeg").split("_")
                tile = generator(name).get_tile(int(level), (int(col), int(row)))
                out = io.BytesIO()
                tile.save(out, "jpeg", quality=75)
                data = out.getvalue()
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
            except Exception:  # noqa: BLE001
                data = b"not found"
                self.send_response(404)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def milserve_server(root: Path, state: Path, port: int, cache_mb: float, overlay_mb: float, nice: int) -> None:
    """What `mil-serve` runs (its switch interval included), with the caches and job niceness chosen."""
    import uvicorn

    from mil_runtime.serve import create_app
    from mil_runtime.serve.cli import SWITCH_INTERVAL_S

    app = create_app([MODEL], root, state_dir=state, tile_cache_mb=cache_mb, overlay_cache_mb=overlay_mb,
                     job_nice=nice)
    app.state.service.jobs.prestart()  # as mil-serve does
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen([sys.executable, __file__, "--_child", *args, str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stderr.read().decode()[-3000:])
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------- clients
def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, bytes, dict]:
    for attempt in range(2):  # an idle keep-alive connection may have been closed by the server: reconnect once
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read(), dict(response.getheaders())
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            conn.close()
            if attempt:
                raise
    raise AssertionError("unreachable")


def load(port: int, paths: list[str], clients: int, per_client: int, seed: int = 0,
         stop: threading.Event | None = None) -> dict:
    """`clients` keep-alive clients, each GETting `per_client` random paths; tiles/s and latency percentiles."""
    latencies: list[float] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for _ in range(per_client):
            if stop is not None and stop.is_set():
                break
            path = rng.choice(paths)
            start = time.perf_counter()
            status, _, _ = request(conn, "GET", path)
            mine.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"{path}: HTTP {status}")
        conn.close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return {"tiles_per_s": round(len(latencies) / elapsed, 1), "p50_ms": round(pick(0.50), 2),
            "p99_ms": round(pick(0.99), 2), "requests": len(latencies)}


def finest_tiles(width: int, height: int, prefix: str, suffix: str) -> list[str]:
    from mil_runtime.serve.tiles import DeepZoomGrid

    grid = DeepZoomGrid(width, height)
    paths = []
    for level in range(grid.level_count - 3, grid.level_count):
        w, h = grid.level_dimensions[level]
        for col in range(-(-w // 254)):
            for row in range(-(-h // 254)):
                paths.append(f"{prefix}{level}/{col}_{row}{suffix}")
    return paths


def floor_ms(slide_path: Path, paths: list[str], n: int = 300) -> float:
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    gen = DeepZoomGenerator(OpenSlide(str(slide_path)), 254, 1, limit_bounds=False)
    rng = random.Random(1)
    start = time.perf_counter()
    for _ in range(n):
        level, address = rng.choice(paths).rsplit("_files/", 1)[-1].split("/")
        col, row = address.split(".")[0].split("_")
        out = io.BytesIO()
        gen.get_tile(int(level), (int(col), int(row))).save(out, "jpeg", quality=75)
    return (time.perf_counter() - start) / n * 1000


def wait_job(conn, job_id: str) -> dict:
    while True:
        _, body, _ = request(conn, "GET", f"/v1/jobs/{job_id}")
        job = json.loads(body)
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.02)


def paired_jobs(conn, root: Path, work: Path, rounds: int = 2) -> dict:
    """A job and run_slide on the tile slide, alternated `rounds` times (each job with its own run key: a
    whole-slide ROI shifted by a pixel; run_slide with the same ROI), so that load from elsewhere hits both."""
    from mil_runtime.encoder import find_encoder, load_encoder
    from mil_runtime.model import load_model
    from mil_runtime.pipeline import run_slide

    runner = load_model(MODEL)
    encoder = load_encoder(find_encoder(MODEL, runner.metadata))
    jobs, direct, tiles = [], [], None
    for i in range(rounds):
        ring = [[-1 - i, -1 - i], [20000, -1 - i], [20000, 20000], [-1 - i, 20000], [-1 - i, -1 - i]]
        roi = {"type": "Polygon", "coordinates": [ring]}
        started = time.perf_counter()
        _, body, _ = request(conn, "POST", "/v1/jobs", json.dumps({"slide": TILE_SLIDE, "model": "abmil_demo",
                                                                   "roi": roi}).encode(), {"Content-Type": "application/json"})
        job = wait_job(conn, json.loads(body)["id"])
        jobs.append(round(time.perf_counter() - started, 2))
        assert job["state"] == "done", job
        roi_file = work / f"roi-{i}.geojson"
        roi_file.write_text(json.dumps(roi))
        out = work / f"paired-{i}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        result = run_slide(root / TILE_SLIDE, runner, encoder, out_dir=out, workers=2, roi=roi_file,
                           geojson_frame="level0")
        direct.append(round(time.perf_counter() - started, 2))
        tiles = result.n_tiles
    return {"tiles": tiles, "job_s": jobs, "run_slide_s": direct}


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/milkit-serve-bench")
    parser.add_argument("--requests", type=int, default=150, help="requests per client per measurement")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    sys.setswitchinterval(0.001)  # the clients' threads, too, hand the GIL on quickly (same for every server)
    from benchmarks.machine_info import cpu_model, package_version, usable_cores
    from mil_runtime.demo import write_synthetic_slide

    work = Path(args.work)
    root = work / "slides"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / TILE_SLIDE).is_file():
        print("generating the 12,288 x 12,288 tile slide ...", flush=True)
        write_synthetic_slide(root / TILE_SLIDE, height=12288, width=12288, mpp=0.5, lesions="random 3", seed=11)
    if not (root / BAG_SLIDE).is_file():
        print(f"generating the {BAG_SIDE} x {BAG_SIDE} bag slide (~10,000 tiles) ...", flush=True)
        write_synthetic_slide(root / BAG_SLIDE, height=BAG_SIDE, width=BAG_SIDE, mpp=1.0, lesions="random 3",
                              tissue=0.97, seed=12)
    machine = {"cpu": cpu_model(), "cores": usable_cores(), "openslide": package_version("openslide-python"),
               "fastapi": package_version("fastapi"), "uvicorn": package_version("uvicorn"),
               "onnxruntime": package_version("onnxruntime"), "python": sys.version.split()[0],
               "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}
    print("machine:", json.dumps(machine), flush=True)
    figures: dict = {"machine": machine}
    n = args.requests
    tile_paths = finest_tiles(12288, 12288, f"/v1/slides/{TILE_SLIDE}_files/", ".jpeg")
    bare_paths = [p.replace("/v1/slides/", "/") for p in tile_paths]

    figures["floor_ms_per_tile"] = round(floor_ms(root / TILE_SLIDE, tile_paths), 2)
    bare = Child("bare", str(root))
    try:
        load(bare.port, bare_paths, 8, 20)  # open the slide
        figures["bare"] = load(bare.port, bare_paths, 8, n, seed=1)
    finally:
        bare.stop()
    print("bare server:", figures["bare"], flush=True)

    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    cold = Child("milserve", str(root), str(state), "0", "0", "0")  # job threads not niced: job vs run_slide
    try:
        load(cold.port, tile_paths, 8, 20)
        figures["milserve_cold"] = load(cold.port, tile_paths, 8, n, seed=1)
        print("mil-serve cold:", figures["milserve_cold"], flush=True)
        conn = http.client.HTTPConnection("127.0.0.1", cold.port, timeout=600)
        # a job vs run_slide on the same slide (10,000 tiles)
        started = time.perf_counter()
        _, body, _ = request(conn, "POST", "/v1/jobs", json.dumps({"slide": BAG_SLIDE, "model": "abmil_demo"}).encode(),
                             {"Content-Type": "application/json"})
        job = wait_job(conn, json.loads(body)["id"])
        figures["job_s"] = round(time.perf_counter() - started, 2)
        assert job["state"] == "done", job
        figures["job_pairs"] = paired_jobs(conn, root, work)
        figures["overlay_cold"] = load(cold.port, finest_tiles(BAG_SIDE, BAG_SIDE, f"/v1/jobs/{job['id']}/heatmap_files/",
                                                               ".png"), 8, n, seed=2)
        print("overlay cold:", figures["overlay_cold"], flush=True)
        region = {"include": {"type": "Polygon", "coordinates": [[[-1, -1], [BAG_SIDE + 1, -1], [BAG_SIDE + 1, BAG_SIDE + 1], [-1, BAG_SIDE + 1], [-1, -1]]]}}
        times, server, serialised = [], [], []
        for _ in range(21):
            start = time.perf_counter()
            status, body, headers = request(conn, "POST", f"/v1/jobs/{job['id']}/reaggregate", json.dumps(region).encode(),
                                            {"Content-Type": "application/json"})
            times.append(time.perf_counter() - start)
            assert status == 200 and json.loads(body)["n_tiles"] >= 10000, body[:200]
            timing = {k.lower(): v for k, v in headers.items()}.get("server-timing", "")
            parts = dict(part.strip().split(";dur=") for part in timing.split(",") if ";dur=" in part)
            server.append(float(parts.get("compute", "nan")) / 1000)  # region selection + predict
            serialised.append(float(parts.get("total", "nan")) / 1000)  # + building the 10,000-tile answer
        conn.close()
    finally:
        cold.stop()

    from mil_runtime.encoder import find_encoder, load_encoder
    from mil_runtime.features_io import read_feature_file
    from mil_runtime.model import load_model
    from mil_runtime.pipeline import run_slide

    runner = load_model(MODEL)
    encoder = load_encoder(find_encoder(MODEL, runner.metadata))
    out = work / "run_slide"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = run_slide(root / BAG_SLIDE, runner, encoder, out_dir=out, workers=2, geojson_frame="level0")
    figures["run_slide_s"] = round(time.perf_counter() - start, 2)
    figures["job_vs_run_slide_10k"] = round(figures["job_s"] / figures["run_slide_s"], 3)  # not interleaved
    pairs = figures["job_pairs"]
    figures["job_vs_run_slide"] = round(min(pairs["job_s"]) / min(pairs["run_slide_s"]), 3)
    features = read_feature_file(out / f"{Path(BAG_SLIDE).stem}.features.h5").features
    predict = []
    for _ in range(21):
        start = time.perf_counter()
        runner.predict(features)
        predict.append(time.perf_counter() - start)
    figures["reaggregate_10k"] = {
        "tiles": result.n_tiles, "predict_ms": round(min(predict) * 1000, 2),
        "compute_ms": round(min(server[1:]) * 1000, 2),
        "server_total_ms": round(min(serialised[1:]) * 1000, 2), "end_to_end_ms": round(min(times[1:]) * 1000, 2)}
    r = figures["reaggregate_10k"]
    r["compute_vs_predict"] = round(r["compute_ms"] / r["predict_ms"], 3)
    r["end_to_end_vs_predict"] = round(r["end_to_end_ms"] / r["predict_ms"], 3)
    print("job:", figures["job_s"], "s; run_slide:", figures["run_slide_s"], "s (10k tiles); paired:", pairs,
          "; reaggregate:", r, flush=True)

    warm = Child("milserve", str(root), str(state), "256", "64", "10")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", warm.port, timeout=600)
        _, body, _ = request(conn, "POST", "/v1/jobs", json.dumps({"slide": BAG_SLIDE, "model": "abmil_demo"}).encode(),
                             {"Content-Type": "application/json"})
        job = wait_job(conn, json.loads(body)["id"])  # served from the finished result (restart-safe state)
        overlay_paths = finest_tiles(BAG_SIDE, BAG_SIDE, f"/v1/jobs/{job['id']}/heatmap_files/", ".png")
        for path in tile_paths + overlay_paths:  # fill the caches
            request(conn, "GET", path)
        figures["milserve_warm"] = load(warm.port, tile_paths, 8, n, seed=1)
        figures["overlay_warm"] = load(warm.port, overlay_paths, 8, n, seed=2)
        print("mil-serve warm:", figures["milserve_warm"], "overlay warm:", figures["overlay_warm"], flush=True)
    finally:
        warm.stop()

    # 16 clients on tiles, without and with a job running (a fresh state: the job really runs)
    shutil.rmtree(state, ignore_errors=True)
    busy = Child("milserve", str(root), str(state), "0", "0", "10")  # the default: job threads at nice 10
    try:
        load(busy.port, tile_paths, 8, 20)
        figures["mix_idle"] = load(busy.port, tile_paths, 16, n // 2, seed=3)
        conn = http.client.HTTPConnection("127.0.0.1", busy.port, timeout=600)
        _, body, _ = request(conn, "POST", "/v1/jobs", json.dumps({"slide": BAG_SLIDE, "model": "abmil_demo"}).encode(),
                             {"Content-Type": "application/json"})
        job_id = json.loads(body)["id"]
        time.sleep(1.0)
        figures["mix_job"] = load(busy.port, tile_paths, 16, n // 2, seed=4)
        _, body, _ = request(conn, "GET", f"/v1/jobs/{job_id}")
        figures["mix_job"]["job_state_after"] = json.loads(body)["state"]
        figures["mix_p99_ratio"] = round(figures["mix_job"]["p99_ms"] / figures["mix_idle"]["p99_ms"], 2)
        print("16 clients idle:", figures["mix_idle"], "with a job:", figures["mix_job"], flush=True)
        conn.close()
    finally:
        busy.stop()

    machine["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    bare_rate, cold_rate = figures["bare"]["tiles_per_s"], figures["milserve_cold"]["tiles_per_s"]
    figures["cold_vs_bare"] = round(cold_rate / bare_rate, 3)
    figures["cold_vs_example_457"] = round(cold_rate / 457, 2)
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        kind = sys.argv[2]
        if kind == "bare":
            bare_server(Path(sys.argv[3]), int(sys.argv[4]))
        else:
            milserve_server(Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[8]), float(sys.argv[5]),
                            float(sys.argv[6]), int(sys.argv[7]))
    else:
        main()
