"""The routes of mil-serve (see docs/serve.md for the reference)."""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from mil_runtime.errors import InvalidInputError, MilkitError
from mil_runtime.serve.auth import Auth, route_path
from mil_runtime.serve.errors import ApiError
from mil_runtime.serve.jobs import CANCELLED, DONE, FAILED, Handle, JobData, JobManager
from mil_runtime.serve.overlay import AttentionRaster, Colouring, legend_png
from mil_runtime.serve.paths import list_slides, resolve_slide
from mil_runtime.serve.tiles import BytesLRU, SlideTiles

PAGE_DIR = Path(__file__).resolve().parent / "page"
_SLIDE_TILE = re.compile(r"^(.+)_files/(\d{1,3})/(\d{1,7})_(\d{1,7})\.jpeg$", re.S)
_HEAT_TILE = re.compile(r"^(\d{1,3})/(\d{1,7})_(\d{1,7})\.png$")
CACHE_CONTROL = "private, max-age=3600"
SSE_POLL_S = 0.2
SSE_MAX_S = 6 * 3600


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slide: str = Field(min_length=1, max_length=1024)
    model: str = Field(min_length=1, max_length=200)
    roi: dict[str, Any] | None = None


class RegionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include: dict[str, Any] | None = None
    exclude: dict[str, Any] | None = None


class Service:
    """What the routes share: models, slides, jobs, tiles, auth, caches."""

    def __init__(self, *, models, slides_root: Path | None, jobs: JobManager, auth: Auth, tiles: SlideTiles,
                 overlay_cache_mb: float = 32, max_upload_bytes: int = 512 * 2**20) -> None:
        self.models, self.slides_root, self.jobs, self.auth, self.tiles = models, slides_root, jobs, auth, tiles
        self.max_upload_bytes = max_upload_bytes
        self.overlay_cache = BytesLRU(int(overlay_cache_mb * 2**20))
        self._data: OrderedDict[tuple, JobData] = OrderedDict()
        self._rasters: OrderedDict[tuple, AttentionRaster] = OrderedDict()
        self._lock = threading.Lock()
        self._slide_info: dict[tuple, dict] = {}

    # -- job objects ----------------------------------------------------------------------------
    def slide_rel(self, handle: Handle) -> str | None:
        path = handle.comp.slide_path
        if self.slides_root is None or path is None:
            return None
        try:
            rel = Path(path).relative_to(self.slides_root).as_posix()
        except ValueError:
            return None
        return rel

    def job_object(self, handle: Handle, root: str = "") -> dict[str, Any]:
        """The job as the API shows it; `root`: the app's mount prefix (ASGI root_path), put before its URLs."""
        comp = handle.comp
        state = handle.state
        base = f"/v1/jobs/{handle.id}"
        rel = self.slide_rel(handle)
        classes: list[str] = []
        if state == DONE:
            try:
                classes = self.data(handle).classes
            except (OSError, ValueError):
                classes = []
        urls = {
            "slide_dzi": self.auth.sign(f"/v1/slides/{rel}", ".dzi", root=root) if rel else None,
            "heatmap_dzi": self.auth.sign(f"{base}/heatmap", ".dzi", root=root),
            "legend": self.auth.sign(f"{base}/legend", ".png", root=root),
            **{key: f"{root}{base}/{name}" for key, name in (
                ("result", "result"), ("geojson", "geojson"), ("csv", "csv"), ("features", "features.h5"),
                ("dsa", "dsa.json"), ("dicom_annotations", "annotations.dcm"), ("dicom_attention", "attention.dcm"),
                ("events", "events"), ("view", "view"))},
        }
        return {"id": handle.id, "state": state, "stage": comp.stage if state != CANCELLED else "cancelled",
                "done": comp.done, "total": comp.total, "slide": handle.slide, "model": handle.model,
                "error": handle.error, "classes": classes, "urls": urls}

    def done_handle(self, job_id: str) -> Handle:
        handle = self.jobs.get(job_id)
        if handle.state != DONE:
            raise ApiError(409, f"job {job_id} is {handle.state}, not done", 0)
        return handle

    def data(self, handle: Handle) -> JobData:
        comp = handle.comp
        key = (str(comp.folder), comp.stem)
        with self._lock:
            found = self._data.get(key)
            if found is not None:
                self._data.move_to_end(key)
                return found
        found = JobData(comp.folder, comp.stem)
        with self._lock:
            self._data[key] = found
            while len(self._data) > 16:
                self._data.popitem(last=False)
        return found

    def slide_dimensions(self, handle: Handle) -> tuple[int, int]:
        path = handle.comp.slide_path
        if path is None or not Path(path).exists():
            raise ApiError(404, "the slide of this job is not on this server", 3)
        return self.tiles.open(Path(path)).slide.dimensions

    def raster(self, handle: Handle, colouring: Colouring) -> tuple[AttentionRaster, float, float]:
        data = self.data(handle)
        colouring.check(data.classes)
        key = (str(handle.comp.folder), handle.comp.stem, colouring)
        with self._lock:
            found = self._rasters.get(key)
            if found is not None:
                self._rasters.move_to_end(key)
                return found
        width, height = self.slide_dimensions(handle)
        values, low, high = colouring.scale(data.values(colouring.cls))
        raster = AttentionRaster(data.xy, data.stride, values, colouring.cmap, width, height)
        entry = (raster, low, high)
        with self._lock:
            self._rasters[key] = entry
            while len(self._rasters) > 32:
                self._rasters.popitem(last=False)
        return entry

    def slide_info(self, rel: str, path: Path, root: str = "") -> dict[str, Any]:
        from mil_runtime.slide.mpp import resolve_mpp

        stat = path.stat()
        key = (rel, stat.st_size, stat.st_mtime_ns)
        info = self._slide_info.get(key)
        if info is None:
            try:
                opened = self.tiles.open(path)
                width, height = opened.slide.dimensions
                try:
                    mpp = float(resolve_mpp(opened.slide.properties)[0])
                except MilkitError:
                    mpp = None
            except MilkitError:
                width = height = mpp = None
            info = {"path": rel, "width": width, "height": height, "mpp": mpp}
            self._slide_info[key] = info
        return {**info, "dzi": self.auth.sign(f"/v1/slides/{rel}", ".dzi", root=root) if info["width"] else None}


def _root(request: Request) -> str:
    """The prefix the app is mounted under (ASGI root_path), "" when it is served at /."""
    return (request.scope.get("root_path") or "").rstrip("/")


def _colouring(cls: str | None, norm: str, vmin: float | None, vmax: float | None, cmap: str) -> Colouring:
    return Colouring(cls or None, norm, vmin, vmax, cmap)


def _not_modified(request: Request, etag: str) -> bool:
    match = request.headers.get("if-none-match")
    return match is not None and etag in [m.strip() for m in match.split(",")]


def build_router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/v1")

    @api.get("/models")
    def models() -> list[dict[str, Any]]:
        return [entry.describe() for entry in service.models.values()]

    @api.get("/slides")
    def slides(request: Request) -> list[dict[str, Any]]:
        root = service.slides_root
        return [service.slide_info(rel, root / rel, _root(request)) for rel in list_slides(root)]

    @api.get("/slides/{path:path}", responses={200: {"content": {"application/xml": {}, "image/jpeg": {}}}})
    def slide_files(path: str, request: Request) -> Response:
        if path.endswith(".dzi"):
            slide = resolve_slide(service.slides_root, path[:-4])
            return Response(service.tiles.dzi(slide), media_type="application/xml",
                            headers={"Cache-Control": CACHE_CONTROL})
        match = _SLIDE_TILE.match(path)
        if match is None:
            raise ApiError(404, "not a Deep Zoom path: use {slide}.dzi or {slide}_files/{level}/{col}_{row}.jpeg")
        slide = resolve_slide(service.slides_root, match.group(1))
        level, col, row = (int(match.group(i)) for i in (2, 3, 4))
        found = service.tiles.tile(slide, level, col, row)
        if found is None:
            raise ApiError(404, f"no tile {level}/{col}_{row} in this slide's Deep Zoom pyramid")
        data, etag = found
        headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    @api.post("/jobs", status_code=202)
    def submit(body: JobRequest, request: Request) -> JSONResponse:
        slide = resolve_slide(service.slides_root, body.slide)
        handle = service.jobs.submit(body.slide, slide, body.model, body.roi)
        root = _root(request)
        return JSONResponse(service.job_object(handle, root), status_code=202,
                            headers={"Location": f"{root}/v1/jobs/{handle.id}"})

    @api.get("/jobs")
    def list_jobs(request: Request) -> list[dict[str, Any]]:
        return [service.job_object(h, _root(request)) for h in list(service.jobs.handles.values())]

    @api.get("/jobs/{job_id}")
    def job(job_id: str, request: Request) -> dict[str, Any]:
        return service.job_object(service.jobs.get(job_id), _root(request))

    @api.delete("/jobs/{job_id}", status_code=204)
    def cancel(job_id: str) -> Response:
        service.jobs.cancel(job_id)
        return Response(status_code=204)

    @api.get("/jobs/{job_id}/view", status_code=303)
    def view(job_id: str, request: Request) -> RedirectResponse:
        from urllib.parse import quote

        return RedirectResponse(f"{_root(request)}/?job={quote(job_id, safe='')}", status_code=303)

    @api.get("/jobs/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}})
    async def events(job_id: str, request: Request) -> StreamingResponse:
        handle = service.jobs.get(job_id)
        root = _root(request)

        async def stream():
            last = None
            waited = 0.0
            while waited < SSE_MAX_S:
                obj = service.job_object(handle, root)
                text = json.dumps(obj, separators=(",", ":"))
                if text != last:
                    yield f"event: progress\ndata: {text}\n\n"
                    last = text
                if obj["state"] == DONE:
                    record = await asyncio.to_thread(handle.comp.folder.joinpath(f"{handle.comp.stem}.json").read_text)
                    yield f"event: result\ndata: {json.dumps(json.loads(record), separators=(',', ':'))}\n\n"
                    return
                if obj["state"] in (FAILED, CANCELLED):
                    yield f"event: {obj['state']}\ndata: {text}\n\n"
                    return
                await asyncio.sleep(SSE_POLL_S)
                waited += SSE_POLL_S

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def _member(job_id: str, suffix: str, media: str) -> FileResponse:
        handle = service.done_handle(job_id)
        path = handle.comp.folder / f"{handle.comp.stem}{suffix}"
        if not path.is_file():
            raise ApiError(404, f"this result has no {suffix.lstrip('.')} file", 3)
        return FileResponse(path, media_type=media, filename=path.name, content_disposition_type="inline")

    @api.get("/jobs/{job_id}/result")
    def result(job_id: str) -> FileResponse:
        return _member(job_id, ".json", "application/json")

    @api.get("/jobs/{job_id}/geojson")
    def geojson(job_id: str) -> FileResponse:
        return _member(job_id, ".tiles.geojson", "application/geo+json")

    @api.get("/jobs/{job_id}/csv")
    def csv(job_id: str) -> FileResponse:
        return _member(job_id, ".tiles.csv", "text/csv")

    @api.get("/jobs/{job_id}/features.h5")
    def features(job_id: str) -> FileResponse:
        return _member(job_id, ".features.h5", "application/x-hdf5")

    @api.get("/jobs/{job_id}/dsa.json")
    def dsa(job_id: str) -> FileResponse:
        return _member(job_id, ".dsa.json", "application/json")

    @api.get("/jobs/{job_id}/annotations.dcm", responses={200: {"content": {"application/dicom": {}}}})
    def dicom_annotations(job_id: str) -> FileResponse:
        return _member(job_id, ".annotations.dcm", "application/dicom")

    @api.get("/jobs/{job_id}/attention.dcm", responses={200: {"content": {"application/dicom": {}}}})
    def dicom_attention(job_id: str) -> FileResponse:
        return _member(job_id, ".attention.dcm", "application/dicom")

    @api.get("/jobs/{job_id}/heatmap.dzi", responses={200: {"content": {"application/xml": {}}}})
    def heatmap_dzi(job_id: str, cls: str | None = Query(None, alias="class", max_length=200),
                    norm: Literal["rank", "linear"] = "rank", vmin: float | None = None, vmax: float | None = None,
                    cmap: str = Query("viridis", max_length=40)) -> Response:
        handle = service.done_handle(job_id)
        raster, _, _ = service.raster(handle, _colouring(cls, norm, vmin, vmax, cmap))
        return Response(raster.grid.dzi("png"), media_type="application/xml", headers={"Cache-Control": "no-cache"})

    @api.get("/jobs/{job_id}/heatmap_files/{tile:path}", responses={200: {"content": {"image/png": {}}}})
    def heatmap_tile(job_id: str, tile: str, request: Request,
                     cls: str | None = Query(None, alias="class", max_length=200),
                     norm: Literal["rank", "linear"] = "rank", vmin: float | None = None,
                     vmax: float | None = None, cmap: str = Query("viridis", max_length=40)) -> Response:
        match = _HEAT_TILE.match(tile)
        if match is None:
            raise ApiError(404, "not an overlay tile path: heatmap_files/{level}/{col}_{row}.png")
        level, col, row = (int(match.group(i)) for i in (1, 2, 3))
        handle = service.done_handle(job_id)
        colouring = _colouring(cls, norm, vmin, vmax, cmap)
        key = (handle.comp.key, colouring, level, col, row)
        etag = '"%s"' % abs(hash(key))
        headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        data = service.overlay_cache.get(key)
        if data is None:
            raster, _, _ = service.raster(handle, colouring)
            data = raster.tile_png(level, col, row)
            if data is None:
                raise ApiError(404, f"no tile {level}/{col}_{row} in this slide's Deep Zoom pyramid")
            service.overlay_cache.put(key, data)
        return Response(data, media_type="image/png", headers=headers)

    @api.get("/jobs/{job_id}/legend.png", responses={200: {"content": {"image/png": {}}}})
    def legend(job_id: str, cls: str | None = Query(None, alias="class", max_length=200),
               norm: Literal["rank", "linear"] = "rank", vmin: float | None = None, vmax: float | None = None,
               cmap: str = Query("viridis", max_length=40)) -> Response:
        handle = service.done_handle(job_id)
        data = service.data(handle)
        colouring = _colouring(cls, norm, vmin, vmax, cmap).check(data.classes)
        _, low, high = colouring.scale(data.values(colouring.cls))
        title = f"attention{' ' + colouring.cls if colouring.cls else ''} ({colouring.norm})"
        return Response(legend_png(colouring, low, high, title), media_type="image/png",
                        headers={"Cache-Control": "no-cache"})

    @api.get("/jobs/{job_id}/top")
    def top(job_id: str, k: int = Query(10, ge=1, le=1000),
            cls: str | None = Query(None, alias="class", max_length=200)) -> list[dict[str, Any]]:
        data = service.data(service.done_handle(job_id))
        Colouring(cls or None).check(data.classes)
        values = data.values(cls or None)
        order = np.argsort(-values, kind="stable")[:k]
        return [{"rank": r + 1, "x": int(data.xy[i, 0]), "y": int(data.xy[i, 1]), "width": data.tile_level0,
                 "height": data.tile_level0, "attention": float(values[i])} for r, i in enumerate(order)]

    @api.get("/jobs/{job_id}/at")
    def at(job_id: str, x: float = Query(..., allow_inf_nan=False), y: float = Query(..., allow_inf_nan=False),
           cls: str | None = Query(None, alias="class", max_length=200)) -> dict[str, Any]:
        data = service.data(service.done_handle(job_id))
        Colouring(cls or None).check(data.classes)
        i = data.tile_at(x, y)
        if i is None:
            return {"tile": None, "attention": None, "rank": None, "scores": None, "attention_by_class": None}
        values = data.values(cls or None)
        rank = int(1 + np.count_nonzero(values > values[i]))
        scores = {c: float(v[i]) for c, v in data.scores.items()} if data.scores else None
        by_class = {c: float(v[i]) for c, v in data.attention_by_class.items()} if data.classes else None
        return {"tile": {"x": int(data.xy[i, 0]), "y": int(data.xy[i, 1]), "width": data.tile_level0,
                         "height": data.tile_level0},
                "attention": float(values[i]), "rank": rank, "scores": scores, "attention_by_class": by_class}

    @api.post("/jobs/{job_id}/reaggregate")
    def reaggregate(job_id: str, body: RegionRequest) -> JSONResponse:
        started = time.perf_counter()
        handle = service.done_handle(job_id)
        if (body.include is None) == (body.exclude is None):
            raise ApiError(400, 'give exactly one of "include" or "exclude" (a GeoJSON region)', 6)
        data = service.data(handle)
        keep = region_mask(data, body.include if body.include is not None else body.exclude)
        if body.exclude is not None:
            keep = ~keep
        if not keep.any():
            raise ApiError(400, "no tile is left " + ("inside the region" if body.include is not None
                                                       else "outside the region"), InvalidInputError.exit_code)
        model = service.models.get(handle.model) or _model_by_sha(service, data)
        features, grid = data.features(), data.grid_yx
        if not keep.all():
            features, grid = features[keep], grid[keep]
        prediction = model.runner.predict(features, coords=grid, source=f"job {job_id}")
        computed = time.perf_counter()
        answer = prediction_body(prediction, data.xy[keep], int(keep.sum()))
        timing = f"compute;dur={(computed - started) * 1000:.2f}, total;dur={(time.perf_counter() - started) * 1000:.2f}"
        return JSONResponse(answer, headers={"Server-Timing": timing})

    @api.post("/predict")
    def predict(file: UploadFile = File(...), model: str = Form(..., max_length=200)) -> dict[str, Any]:
        entry = service.models.get(model)
        if entry is None:
            raise ApiError(404, f"no model {model!r}; GET /v1/models lists them", 3)
        features, coords_px, grid = read_upload(file, service.jobs.store.uploads, service.max_upload_bytes)
        prediction = entry.runner.predict(features, coords=grid, source=file.filename or "upload")
        return prediction_body(prediction, coords_px, len(features))

    return api


def _model_by_sha(service: Service, data: JobData):
    sha = (data.record.get("model") or {}).get("sha256")
    for entry in service.models.values():
        if entry.sha256 == sha:
            return entry
    raise ApiError(409, "the model of this result is not loaded on this server; start mil-serve with it", 3)


def prediction_body(prediction, xy: np.ndarray | None, n: int) -> dict[str, Any]:
    attention = np.asarray(prediction.attention, dtype=np.float64).tolist()
    if xy is not None:  # [[x, y, a], ...]: plain lists once, no per-item conversions
        points = [[x, y, a] for (x, y), a in zip(np.asarray(xy, dtype=np.int64).tolist(), attention)]
    else:
        points = attention
    task_outputs = prediction.task_outputs()  # {} for classifiers
    if task_outputs:  # survival (risk, hazards, survival) or regression (values): no classes, as in the record
        body = {"prediction": task_outputs, "n_tiles": int(n), "attention": points}
    else:
        body = {"prediction": {"class_name": prediction.predicted_name, "class_index": int(prediction.predicted_index),
                               "probability": float(prediction.probability)},
                "probabilities": prediction.probabilities_by_name(), "n_tiles": int(n), "attention": points}
    if prediction.attention_by_class:
        body["attention_by_class"] = {c: np.asarray(v, dtype=np.float64).tolist()
                                      for c, v in prediction.attention_by_class.items()}
    return body


def region_polygons(geojson: Any) -> list:
    """[(exterior, holes)] level-0 rings of a GeoJSON region, parsed as `--roi` files are
    (mil_runtime.slide.regions, frame level0), without a file: InvalidInputError when it has no polygon."""
    from mil_runtime.slide.regions import geojson_polygons

    polygons, _ = geojson_polygons(geojson, (0, 0), "region")
    if not polygons:
        raise InvalidInputError("region: no Polygon or MultiPolygon in it (level-0 px GeoJSON)")
    return polygons


def region_mask(data: JobData, geojson: dict, tmp_dir: Path | None = None) -> np.ndarray:
    """(N,) bool: tiles whose centre lies inside the GeoJSON region (level-0 px, holes excluded)."""
    centres = data.xy.astype(np.float64) + data.tile_level0 / 2.0  # (N, 2) level-0 (x, y)
    inside = np.zeros(len(centres), dtype=bool)
    for exterior, holes in region_polygons(geojson):
        here = points_in_ring(centres, exterior)
        for hole in holes:
            here &= ~points_in_ring(centres, hole)
        inside |= here
    return inside


def points_in_ring(points: np.ndarray, ring) -> np.ndarray:
    """(N,) bool: points (N, 2) inside one closed ring of (x, y) vertices, its boundary included
    (scikit-image's `points_in_poly`, after a bounding-box cut that keeps the test to the candidates)."""
    from skimage.measure import points_in_poly

    vertices = np.asarray(ring, dtype=np.float64)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    x, y = points[:, 0], points[:, 1]
    box = np.flatnonzero((x >= low[0]) & (x <= high[0]) & (y >= low[1]) & (y <= high[1]))
    result = np.zeros(len(points), dtype=bool)
    axis_box = len(vertices) in (4, 5) and len(np.unique(vertices[:, 0])) == 2 and len(np.unique(vertices[:, 1])) == 2
    if axis_box:  # a rectangle (the page's "region in view") is its bounding box: 0.06 ms, not 0.37, at 10,000 tiles
        result[box] = True
    elif len(box):
        result[box] = points_in_poly(points[box], vertices)
    return result


def read_upload(file: UploadFile, tmp_dir: Path, limit: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(features, level-0 (x, y) corners or None, grid (y, x) or None) of an uploaded .h5 or .npz."""
    name = (file.filename or "").lower()
    if not name.endswith((".h5", ".hdf5", ".npz")):
        raise ApiError(400, "upload a CLAM/TRIDENT .h5 or an .npz with `features` (and `coords`)", 6)
    suffix = ".npz" if name.endswith(".npz") else ".h5"
    with tempfile.NamedTemporaryFile(suffix=suffix, dir=tmp_dir, delete=False) as out:
        size = 0
        while block := file.file.read(1 << 20):
            size += len(block)
            if size > limit:
                out.close()
                Path(out.name).unlink(missing_ok=True)
                raise ApiError(413, f"the upload is larger than {limit // 2**20} MiB", 6)
            out.write(block)
    path = Path(out.name)
    try:
        if suffix == ".h5":
            from mil_runtime.features_io import read_feature_file

            try:
                stored = read_feature_file(path)
            except MilkitError:
                raise
            except Exception as exc:  # noqa: BLE001  h5py on garbage
                raise InvalidInputError(f"not a readable feature file ({type(exc).__name__})") from None
            grid = stored.grid_coords() if stored.coords_px is not None and (stored.stride_level0 or stored.tile_px_level0) else None
            return stored.features, stored.coords_px, grid
        try:
            with np.load(path, allow_pickle=False) as npz:
                features = np.asarray(npz["features"])
                coords = np.asarray(npz["coords"]) if "coords" in npz.files else None
                size_l0 = int(npz["patch_size_level0"]) if "patch_size_level0" in npz.files else None
        except KeyError:
            raise InvalidInputError("the .npz has no `features` array") from None
        except (ValueError, OSError, EOFError) as exc:
            raise InvalidInputError(f"not a readable .npz ({type(exc).__name__})") from None
        if features.ndim == 3 and features.shape[0] == 1:
            features = features[0]
        if not np.issubdtype(features.dtype, np.number) or np.iscomplexobj(features):
            raise InvalidInputError("`features` must be a real numeric (N, D) array")
        features = features.astype(np.float32)
        grid = None
        if coords is not None:
            if coords.ndim != 2 or coords.shape != (len(features), 2) or not np.issubdtype(coords.dtype, np.integer):
                raise InvalidInputError(f"`coords` must be ({len(features)}, 2) integer level-0 (x, y) px")
            coords = coords.astype(np.int64)
            stride = size_l0 or int(np.gcd.reduce(coords.ravel())) or 1
            grid = (coords[:, ::-1] // stride).astype(np.int64)
        return features, coords, grid
    finally:
        path.unlink(missing_ok=True)


def mount_page(app: FastAPI) -> None:
    index = PAGE_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        if not index.is_file():
            raise ApiError(404, "the page is not built: run `make page`")
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    if PAGE_DIR.is_dir():
        app.mount("/page", StaticFiles(directory=PAGE_DIR), name="page")


class UploadLimit:
    """ASGI middleware: POST /v1/predict bodies over the limit get 413 (by Content-Length, or counted)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not route_path(scope).startswith("/v1/predict"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            from mil_runtime.serve.auth import _send_json
            from mil_runtime.serve.errors import error_body

            await _send_json(send, 413, error_body(6, f"the upload is larger than {self.limit // 2**20} MiB"))
            return None
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"the upload is larger than {self.limit // 2**20} MiB", 6)
            return message

        return await self.app(scope, counted, send)


def create_app(models: list[Path], slides_root: Path | None, *, state_dir: Path, results_dir: Path | None = None,
               token_file: Path | None = None, cors_origins: list[str] | tuple[str, ...] = (), max_jobs: int = 8,
               workers: int = 1, encoder_paths: dict | None = None, tile_cache_mb: float = 64,
               max_upload_mb: float = 512, device: str = "auto", overlay_cache_mb: float = 32,
               job_nice: int = 10) -> FastAPI:
    """The mil-serve ASGI app: the /v1 API, its OpenAPI at /v1/openapi.json, and the page at /.

    `models`: .onnx MIL models (each loaded once; its encoder found next to it, or in `encoder_paths`
    {model path: encoder path}). `slides_root`: the folder whose slides are served (paths confined to it).
    `state_dir`: results and the job index. `results_dir`: finished `mil-infer --out` sets served as jobs.
    `token_file`: turns on bearer auth (and signed tile URLs). `cors_origins`: an allow-list (never "*").
    `job_nice`: the CPU niceness of job threads (Linux), so that tiles stay fast while a job runs; 0 = none.
    """
    from fastapi.middleware.cors import CORSMiddleware

    from mil_runtime.serve.auth import AuthMiddleware, read_token
    from mil_runtime.serve.errors import install_error_handlers
    from mil_runtime.serve.models import load_models
    from mil_runtime.serve.results import add_results
    from mil_runtime.serve.store import Store

    origins = [str(o) for o in cors_origins]
    if any(o.strip() == "*" for o in origins):
        raise InvalidInputError("--cors-origin is an allow-list of origins; '*' is not allowed")
    root = Path(slides_root).resolve() if slides_root is not None else None
    if root is not None and not root.is_dir():
        from mil_runtime.errors import InputNotFoundError

        raise InputNotFoundError(f"--slides {slides_root}: no such folder")
    auth = Auth(read_token(token_file) if token_file is not None else None)
    entries = load_models([Path(m) for m in models], encoder_paths, device=device)
    store = Store(Path(state_dir))
    jobs = JobManager(store, entries, max_jobs=max_jobs, workers=workers, job_nice=job_nice, device=device)
    service = Service(models=entries, slides_root=root, jobs=jobs, auth=auth, tiles=SlideTiles(tile_cache_mb),
                      overlay_cache_mb=overlay_cache_mb, max_upload_bytes=int(max_upload_mb * 2**20))
    if results_dir is not None:
        add_results(service, Path(results_dir))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        jobs.close()

    app = FastAPI(title="mil-serve", version=_version(), openapi_url="/v1/openapi.json", docs_url=None,
                  redoc_url=None, swagger_ui_oauth2_redirect_url=None, lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    app.include_router(build_router(service))
    mount_page(app)
    app.add_middleware(UploadLimit, limit=service.max_upload_bytes)
    app.add_middleware(AuthMiddleware, auth=auth)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)

    return app


def _version() -> str:
    from mil_runtime._version import __version__

    return __version__
