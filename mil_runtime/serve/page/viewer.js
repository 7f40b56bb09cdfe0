// milkit viewer: a slide in OpenSeadragon with the attention overlay of a mil-serve job.
//
// Plain ES module, no bundler, no CDN: OpenSeadragon is the copy `make page` puts in ./vendor/ (loaded by
// index.html as a classic script before this module). Every URL is relative to the page, so the page works
// wherever create_app is mounted. API: docs/serve.md.
//
// Auth: the page itself holds no data and loads without a token. When the API answers 401 it asks for
// one, keeps it in sessionStorage and sends it as an `Authorization: Bearer` header on fetch(); it never
// goes into a URL. Tile, DZI and legend URLs come from the API already signed (?exp=&sig=).

const OSD = window.OpenSeadragon;
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "milkit-token";
const API = new URL("v1/", document.baseURI);
const POLL_MS = 500;
const POINTER_MS = 150; // at most one /at request per this many ms
const TOP_K = 10;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  slides: [],
  models: [],
  job: null, // the job object (GET /v1/jobs/{id})
  result: null, // the job's result JSON
  slidePath: null, // URL path of the open slide DZI
  slideUrl: null, // its full URL (with the signature, when auth is on)
  slideItem: null, // its OpenSeadragon TiledImage
  overlayItem: null, // the heatmap's TiledImage
  overlaySeq: 0,
  followSeq: 0, // bumps when the followed job changes; stale followers stop
  eventSource: null,
  marker: null, // the top-k tile marker element
  regionMarker: null, // the region the last re-aggregation used
};

class ApiError extends Error {
  constructor(status, code, line) {
    super(line);
    this.status = status;
    this.code = code;
  }
}

// -- the API ---------------------------------------------------------------------------------------
// The folder the page is served from ("/" normally, "/milkit/" when create_app is mounted there).
const BASE_PATH = new URL(".", document.baseURI).pathname;

function resolve(url) {
  // A root-relative URL from the API ("/v1/...") belongs under the mount point: when the server does not
  // know where it is mounted, prefix it with the page's own folder.
  if (typeof url === "string" && url.startsWith("/") && !url.startsWith("//") && !url.startsWith(BASE_PATH)) {
    url = BASE_PATH + url.slice(1);
  }
  return new URL(url, API).href;
}

async function api(path, { method = "GET", body } = {}) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(resolve(path), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  if (response.status === 401 || (response.status === 403 && state.token && headers.Authorization)) {
    // no token yet, or the one we sent was refused: ask (again); a refused token is forgotten
    const refused = Boolean(state.token);
    if (refused) {
      state.token = null;
      sessionStorage.removeItem(TOKEN_KEY);
    }
    askToken(refused ? "That token was refused. Enter the access token again" : null);
    const line = refused ? "the access token was refused" : "this server needs an access token";
    throw new ApiError(response.status, 0, line);
  }
  if (!response.ok) {
    let code = 0;
    let line = `${response.status} ${response.statusText}`;
    try {
      const data = await response.json();
      if (data && data.error) {
        code = data.error.code;
        line = data.error.line || line;
      }
    } catch (_) {
      /* not JSON: keep the status line */
    }
    throw new ApiError(response.status, code, line);
  }
  if (response.status === 204) return null;
  return response.json();
}

function withQuery(url, params) {
  const u = new URL(resolve(url));
  for (const [key, value] of Object.entries(params)) {
    if (value === "" || value === null || value === undefined) u.searchParams.delete(key);
    else u.searchParams.set(key, value);
  }
  return u.href;
}

function jobPath(suffix = "") {
  return `jobs/${encodeURIComponent(state.job.id)}${suffix}`;
}

// -- messages --------------------------------------------------------------------------------------
function showError(error) {
  const box = $("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

function askToken(message) {
  const form = $("token-form");
  form.hidden = false;
  if (message) form.querySelector("label").textContent = message;
  $("token").focus();
}

// -- the viewer ------------------------------------------------------------------------------------
const viewer = OSD({
  element: $("viewer"),
  prefixUrl: new URL("page/vendor/openseadragon/images/", document.baseURI).href,
  drawer: "canvas",
  crossOriginPolicy: false,
  showNavigator: false,
  maxZoomPixelRatio: 2,
  visibilityRatio: 0.5,
  preserveImageSizeOnResize: true,
  gestureSettingsMouse: { clickToZoom: false },
  timeout: 120000,
});

viewer.addHandler("open", () => {
  state.slideItem = viewer.world.getItemAt(0);
  state.overlayItem = null;
});

viewer.addHandler("open-failed", (event) => showError(`the slide did not open: ${event.message}`));

function openSlide(dziUrl) {
  const url = resolve(dziUrl);
  const path = new URL(url).pathname;
  state.slideUrl = url;
  if (state.slidePath === path && state.slideItem) {
    setQuery(state.slideItem, url); // the same slide: keep the view, take the fresher signature
    return Promise.resolve(state.slideItem);
  }
  state.slidePath = path;
  state.slideItem = null;
  state.overlayItem = null;
  return new Promise((done, fail) => {
    viewer.addOnceHandler("open", () => {
      scheduleRefresh();
      done(state.slideItem);
    });
    viewer.addOnceHandler("open-failed", (event) => fail(new Error(event.message)));
    viewer.open(url);
  });
}

// -- signed URLs stay fresh -------------------------------------------------------------------------
// With --token-file, DZI/tile/legend URLs carry ?exp=&sig= and expire (an hour by default). Before they
// do, ask the API for fresh ones and swap the query under the open images: the view stays where it is.
const REFRESH_MARGIN_S = 120;
let refreshTimer = null;

function expiry(url) {
  if (!url) return null;
  const exp = Number(new URL(resolve(url)).searchParams.get("exp"));
  return Number.isFinite(exp) && exp > 0 ? exp : null;
}

function setQuery(item, url) {
  item.source.queryParams = new URL(resolve(url)).search; // DziTileSource appends it to every tile URL
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  const urls = [state.slideUrl, state.job && state.job.urls ? state.job.urls.heatmap_dzi : null];
  const exps = urls.map(expiry).filter((exp) => exp !== null);
  if (!exps.length) return;
  const wait = Math.max(5, Math.min(...exps) - Date.now() / 1000 - REFRESH_MARGIN_S);
  refreshTimer = setTimeout(() => refreshSignatures().catch(showError), wait * 1000);
}

async function refreshSignatures() {
  const job = state.job;
  if (job) {
    const fresh = await api(`jobs/${encodeURIComponent(job.id)}`);
    if (state.job !== job) return;
    job.urls = fresh.urls;
    if (fresh.urls.slide_dzi) state.slideUrl = resolve(fresh.urls.slide_dzi);
  } else if (state.slidePath) {
    const slides = await api("slides");
    const slide = slides.find((s) => new URL(resolve(s.dzi)).pathname === state.slidePath);
    if (slide) state.slideUrl = resolve(slide.dzi);
  }
  if (state.slideItem && state.slideUrl) setQuery(state.slideItem, state.slideUrl);
  if (job && state.overlayItem) setQuery(state.overlayItem, withQuery(job.urls.heatmap_dzi, overlayQuery()));
  if (job && job.urls.legend && !$("legend").hidden) $("legend").src = withQuery(job.urls.legend, overlayQuery());
  scheduleRefresh();
}

// -- the overlay -----------------------------------------------------------------------------------
function overlayQuery() {
  return { class: $("class-select").value, norm: $("norm-select").value, cmap: $("cmap-select").value };
}

function overlayOpacity() {
  return $("overlay-toggle").checked ? Number($("opacity").value) : 0;
}

function addOverlay() {
  const job = state.job;
  if (!job || !state.slideItem || !job.urls || !job.urls.heatmap_dzi) return;
  const seq = ++state.overlaySeq;
  const bounds = state.slideItem.getBounds();
  viewer.addTiledImage({
    tileSource: withQuery(job.urls.heatmap_dzi, overlayQuery()),
    x: bounds.x,
    y: bounds.y,
    width: bounds.width, // the overlay is on the slide's own DZI grid: same world rectangle
    opacity: overlayOpacity(),
    success: (event) => {
      if (seq !== state.overlaySeq || state.job !== job) {
        viewer.world.removeItem(event.item); // a newer overlay (or job) replaced this one meanwhile
        return;
      }
      if (state.overlayItem) viewer.world.removeItem(state.overlayItem);
      state.overlayItem = event.item;
      scheduleRefresh();
    },
    error: (event) => showError(`the attention overlay did not load: ${event.message}`),
  });
  if (job.urls.legend) {
    const legend = $("legend");
    legend.src = withQuery(job.urls.legend, overlayQuery());
    legend.hidden = false;
  }
}

function removeOverlay() {
  state.overlaySeq += 1;
  if (state.overlayItem) viewer.world.removeItem(state.overlayItem);
  state.overlayItem = null;
  $("legend").hidden = true;
  $("legend").removeAttribute("src");
}

$("opacity").addEventListener("input", () => {
  if (state.overlayItem) state.overlayItem.setOpacity(overlayOpacity());
});
$("overlay-toggle").addEventListener("change", () => {
  if (state.overlayItem) state.overlayItem.setOpacity(overlayOpacity());
});
$("class-select").addEventListener("change", () => {
  addOverlay();
  loadTopk().catch(showError); // the top tiles of the chosen class's map
});
$("norm-select").addEventListener("change", addOverlay);
$("cmap-select").addEventListener("change", addOverlay);

function fillClasses(classes, preferred) {
  const select = $("class-select");
  const previous = select.value || preferred;
  select.replaceChildren();
  if (!classes || classes.length === 0) {
    select.append(new Option("attention (one map)", ""));
    select.disabled = true;
    return;
  }
  for (const name of classes) select.append(new Option(name, name));
  select.value = classes.includes(previous) ? previous : classes[0];
  select.disabled = false;
}

// -- the result ------------------------------------------------------------------------------------
function formatNumber(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return String(value);
  if (value !== 0 && Math.abs(value) < 1e-3) return value.toExponential(2);
  return value.toFixed(4);
}

function renderPrediction(result) {
  const box = $("prediction");
  const body = $("probabilities").tBodies[0];
  body.replaceChildren();
  if (!result) {
    box.textContent = "no result yet";
    box.classList.add("muted");
    return;
  }
  const predicted = result.prediction ? result.prediction.class_name : null;
  box.textContent = predicted == null ? "(no prediction)" : predicted;
  box.classList.remove("muted");
  for (const [name, p] of Object.entries(result.probabilities || {})) {
    const row = body.insertRow();
    row.dataset.class = name;
    if (name === predicted) row.classList.add("predicted");
    row.insertCell().textContent = name;
    const cell = row.insertCell();
    cell.className = "value";
    cell.textContent = typeof p === "number" ? p.toFixed(3) : String(p);
  }
}

let topkSeq = 0;

async function loadTopk() {
  const list = $("topk");
  const job = state.job;
  const seq = ++topkSeq;
  const tiles = await api(withQuery(jobPath("/top"), { k: TOP_K, class: $("class-select").value }));
  if (state.job !== job || seq !== topkSeq) return; // a newer list (or job) is on its way
  list.replaceChildren();
  for (const tile of tiles) {
    const item = document.createElement("li");
    item.tabIndex = 0;
    item.dataset.rank = tile.rank;
    item.dataset.x = tile.x;
    item.dataset.y = tile.y;
    item.dataset.width = tile.width;
    item.dataset.height = tile.height;
    item.textContent = `${formatNumber(tile.attention)} at (${tile.x}, ${tile.y})`;
    item.title = `rank ${tile.rank}: ${tile.width} x ${tile.height} px at level 0`;
    const go = () => flyTo(tile, item);
    item.addEventListener("click", go);
    item.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        go();
      }
    });
    list.append(item);
  }
}

function flyTo(tile, item) {
  if (!state.slideItem) return;
  const pad = Math.max(tile.width, tile.height); // one tile of context on every side
  const view = state.slideItem.imageToViewportRectangle(
    tile.x - pad, tile.y - pad, tile.width + 2 * pad, tile.height + 2 * pad);
  viewer.viewport.fitBounds(view);
  if (state.marker) viewer.removeOverlay(state.marker);
  state.marker = document.createElement("div");
  state.marker.className = "tile-marker";
  viewer.addOverlay({
    element: state.marker,
    location: state.slideItem.imageToViewportRectangle(tile.x, tile.y, tile.width, tile.height),
  });
  for (const other of $("topk").children) other.classList.toggle("active", other === item);
}

// -- re-aggregation: the prediction without (or only with) the region in view ----------------------
function viewRegion() {
  // the visible rectangle in level-0 px, clipped to the slide, as a GeoJSON polygon
  const size = state.slideItem.getContentSize();
  const view = state.slideItem.viewportToImageRectangle(viewer.viewport.getBounds(true));
  const x0 = Math.max(0, Math.floor(view.x));
  const y0 = Math.max(0, Math.floor(view.y));
  const x1 = Math.min(size.x, Math.ceil(view.x + view.width));
  const y1 = Math.min(size.y, Math.ceil(view.y + view.height));
  const ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]];
  return { box: [x0, y0, x1, y1], geometry: { type: "Polygon", coordinates: [ring] } };
}

async function reaggregate(mode) {
  const box = $("reaggregate-result");
  const job = state.job;
  if (!job || job.state !== "done" || !state.slideItem) return;
  const region = viewRegion();
  const [x0, y0, x1, y1] = region.box;
  if (state.regionMarker) viewer.removeOverlay(state.regionMarker);
  state.regionMarker = document.createElement("div");
  state.regionMarker.className = "region-marker";
  viewer.addOverlay({ element: state.regionMarker,
                      location: state.slideItem.imageToViewportRectangle(x0, y0, x1 - x0, y1 - y0) });
  box.textContent = "…";
  box.dataset.state = "busy";
  try {
    const answer = await api(jobPath("/reaggregate"), { method: "POST", body: { [mode]: region.geometry } });
    if (state.job !== job) return;
    const label = mode === "exclude" ? "without the view" : "only the view";
    const lines = [`${label}: ${answer.prediction.class_name} (${answer.n_tiles} tiles)`];
    for (const [name, p] of Object.entries(answer.probabilities || {})) lines.push(`${name}: ${p.toFixed(3)}`);
    box.textContent = lines.join("\n");
    box.classList.remove("muted");
    box.dataset.state = "done";
    box.dataset.mode = mode;
    box.dataset.tiles = answer.n_tiles;
    box.dataset.prediction = answer.prediction.class_name;
  } catch (error) {
    box.textContent = error.message;
    box.dataset.state = "error";
  }
}

$("reaggregate-exclude").addEventListener("click", () => reaggregate("exclude"));
$("reaggregate-include").addEventListener("click", () => reaggregate("include"));

// -- attention under the pointer (throttled) -------------------------------------------------------
const pointer = { pending: null, inflight: false, last: 0, timer: null, seq: 0 };

function pointerMoved(position) {
  pointer.pending = position;
  pumpPointer();
}

function pumpPointer() {
  if (pointer.inflight || !pointer.pending) return;
  const wait = pointer.last + POINTER_MS - performance.now();
  if (wait > 0) {
    if (!pointer.timer) {
      pointer.timer = setTimeout(() => {
        pointer.timer = null;
        pumpPointer();
      }, wait);
    }
    return;
  }
  const position = pointer.pending;
  pointer.pending = null;
  pointer.inflight = true;
  pointer.last = performance.now();
  queryAt(position)
    .catch((error) => {
      $("pointer-attention").textContent = error.message;
    })
    .finally(() => {
      pointer.inflight = false;
      pumpPointer();
    });
}

async function queryAt(position) {
  const box = $("pointer-attention");
  const job = state.job;
  if (!job || job.state !== "done" || !state.slideItem) return;
  const point = state.slideItem.viewerElementToImageCoordinates(position);
  const x = Math.floor(point.x);
  const y = Math.floor(point.y);
  const size = state.slideItem.getContentSize();
  if (x < 0 || y < 0 || x >= size.x || y >= size.y) {
    box.textContent = "outside the slide";
    return;
  }
  const seq = ++pointer.seq;
  const answer = await api(withQuery(jobPath("/at"), { x, y, class: $("class-select").value }));
  if (seq !== pointer.seq || state.job !== job) return;
  box.classList.remove("muted");
  if (!answer.tile) {
    box.textContent = `(${x}, ${y}): no tile here`;
    return;
  }
  const lines = [`(${x}, ${y})`, `attention ${formatNumber(answer.attention)}, rank ${answer.rank}`];
  for (const [name, score] of Object.entries(answer.scores || {})) lines.push(`${name}: ${formatNumber(score)}`);
  box.textContent = lines.join("\n");
}

new OSD.MouseTracker({
  element: viewer.canvas,
  moveHandler: (event) => pointerMoved(event.position),
});

// -- jobs ------------------------------------------------------------------------------------------
function stopFollowing() {
  state.followSeq += 1;
  if (state.eventSource) state.eventSource.close();
  state.eventSource = null;
}

function showProgress(job) {
  const bar = $("progress");
  const running = job.state === "queued" || job.state === "running";
  bar.hidden = !running && job.state !== "done";
  bar.max = Math.max(job.total || 0, 1);
  bar.value = job.state === "done" ? bar.max : Math.min(job.done || 0, bar.max);
  const stage = job.stage && job.stage !== job.state ? ` · ${job.stage}` : "";
  const count = job.total ? ` ${job.done || 0}/${job.total}` : "";
  $("progress-text").textContent = `${job.state}${stage}${running ? count : ""}`;
  $("cancel").hidden = !running;
  if (job.state === "failed" && job.error) showError(`failed (code ${job.error.code}): ${job.error.line}`);
}

function follow(job) {
  stopFollowing();
  const seq = state.followSeq;
  const live = () => seq === state.followSeq;
  // EventSource cannot send headers: with a token, poll the job with the bearer header instead.
  if (!state.token && window.EventSource && job.urls && job.urls.events) {
    const source = new EventSource(resolve(job.urls.events));
    state.eventSource = source;
    let finished = false;
    const end = () => {
      finished = true;
      source.close();
    };
    source.addEventListener("progress", (event) => live() && showProgress(JSON.parse(event.data)));
    source.addEventListener("result", (event) => {
      end();
      if (live()) finish(job.id, JSON.parse(event.data)).catch(showError);
    });
    for (const kind of ["failed", "cancelled"]) {
      source.addEventListener(kind, (event) => {
        end();
        if (live()) {
          state.job = JSON.parse(event.data);
          showProgress(state.job);
        }
      });
    }
    source.onerror = () => {
      if (finished || !live()) return;
      end();
      poll(job.id, seq); // the stream broke: fall back to polling
    };
    return;
  }
  poll(job.id, seq);
}

async function poll(id, seq) {
  while (seq === state.followSeq) {
    let job;
    try {
      job = await api(`jobs/${encodeURIComponent(id)}`);
    } catch (error) {
      showError(error);
      return;
    }
    if (seq !== state.followSeq) return;
    state.job = job;
    showProgress(job);
    if (job.state === "done") {
      await finish(id, null);
      return;
    }
    if (job.state === "failed" || job.state === "cancelled") return;
    await new Promise((wake) => setTimeout(wake, POLL_MS));
  }
}

async function finish(id, result) {
  const job = await api(`jobs/${encodeURIComponent(id)}`); // fresh URLs and class list
  state.job = job;
  showProgress(job);
  await showResult(result);
}

async function showResult(result) {
  const job = state.job;
  if (!result) result = await api(job.urls.result);
  if (state.job !== job) return;
  state.result = result;
  renderPrediction(result);
  refreshJobs().catch(() => {}); // a job that just finished joins the list
  fillClasses(job.classes, result.prediction ? result.prediction.class_name : null); // predicted class first
  $("overlay-toggle").disabled = false;
  $("reaggregate-exclude").disabled = $("reaggregate-include").disabled = false;
  if (job.urls.slide_dzi) {
    await openSlide(job.urls.slide_dzi);
    if (state.job !== job) return;
    if (!state.overlayItem) addOverlay();
  } else {
    // a --results job whose slide is not under --slides: the attention map alone, on the same grid
    await openSlide(withQuery(job.urls.heatmap_dzi, overlayQuery()));
    showError("this job's slide is not served here (not under --slides): its attention map is shown alone");
  }
  await loadTopk();
}

function clearJobView() {
  stopFollowing();
  state.job = null;
  state.result = null;
  removeOverlay();
  if (state.marker) viewer.removeOverlay(state.marker);
  state.marker = null;
  renderPrediction(null);
  $("topk").replaceChildren();
  $("pointer-attention").textContent = "-";
  $("pointer-attention").classList.add("muted");
  $("overlay-toggle").disabled = true;
  $("class-select").replaceChildren();
  $("class-select").disabled = true;
  $("progress").hidden = true;
  $("progress-text").textContent = "";
  $("cancel").hidden = true;
  $("job-picker").value = "";
  $("reaggregate-exclude").disabled = $("reaggregate-include").disabled = true;
  $("reaggregate-result").textContent = "";
  delete $("reaggregate-result").dataset.state;
  if (state.regionMarker) viewer.removeOverlay(state.regionMarker);
  state.regionMarker = null;
  showError(null);
}

async function showJob(job) {
  clearJobView();
  state.job = job;
  if (state.slides.some((s) => s.path === job.slide)) $("slide-picker").value = job.slide;
  if (state.models.some((m) => m.id === job.model)) $("model-picker").value = job.model;
  showProgress(job);
  if (job.urls && job.urls.slide_dzi) await openSlide(job.urls.slide_dzi);
  if (state.job !== job) return;
  if (job.state === "done") await showResult(null);
  else if (job.state === "queued" || job.state === "running") follow(job);
}

async function openJob(id) {
  try {
    await showJob(await api(`jobs/${encodeURIComponent(id)}`));
  } catch (error) {
    showError(error);
  }
}

async function runJob() {
  const slide = $("slide-picker").value;
  const model = $("model-picker").value;
  if (!slide || !model) {
    showError("pick a slide and a model first");
    return;
  }
  const body = { slide, model };
  if ($("run-roi").checked) {
    // only the region in view (of this slide): a GeoJSON polygon in level-0 px
    const picked = state.slides.find((s) => s.path === slide);
    if (!state.slideItem || !picked || state.slidePath !== new URL(resolve(picked.dzi)).pathname) {
      showError("open the slide first to run on the region in view");
      return;
    }
    body.roi = viewRegion().geometry;
  }
  $("run").disabled = true;
  try {
    const job = await api("jobs", { method: "POST", body });
    history.pushState(null, "", `?job=${encodeURIComponent(job.id)}`);
    await showJob(job);
  } catch (error) {
    showError(error);
  } finally {
    $("run").disabled = false;
  }
}

async function cancelJob() {
  if (!state.job) return;
  const job = state.job;
  stopFollowing();
  try {
    await api(jobPath(), { method: "DELETE" });
    showProgress({ ...job, state: "cancelled", stage: null });
  } catch (error) {
    showError(error);
  }
}

$("run").addEventListener("click", runJob);
$("cancel").addEventListener("click", cancelJob);

$("slide-picker").addEventListener("change", () => {
  const slide = state.slides.find((s) => s.path === $("slide-picker").value);
  if (!slide) return;
  clearJobView();
  history.pushState(null, "", location.pathname);
  openSlide(slide.dzi).catch(showError);
});

window.addEventListener("popstate", () => start());

// -- finished jobs (this server's, and with --results an earlier mil-infer run's: a cohort to browse) --
function fillJobs(jobs) {
  const select = $("job-picker");
  const latest = new Map(); // one entry per slide and model: the newest finished handle
  for (const job of jobs) if (job.state === "done") latest.set(`${job.slide}\u0000${job.model}`, job);
  const done = [...latest.values()].sort((a, b) => String(a.slide).localeCompare(String(b.slide)));
  select.replaceChildren(new Option(done.length ? `${done.length} finished` : "none yet", ""));
  for (const job of done) select.append(new Option(`${job.slide} · ${job.model}`, job.id));
  select.disabled = done.length === 0;
  if (state.job && done.some((job) => job.id === state.job.id)) select.value = state.job.id;
}

async function refreshJobs() {
  try {
    fillJobs(await api("jobs"));
  } catch (error) {
    if (error.status !== 404) throw error; // a server without the job list: leave the picker empty
    fillJobs([]);
  }
}

$("job-picker").addEventListener("change", () => {
  const id = $("job-picker").value;
  if (!id) return;
  history.pushState(null, "", `?job=${encodeURIComponent(id)}`);
  openJob(id);
});

// -- start -----------------------------------------------------------------------------------------
function fillPickers() {
  const slides = $("slide-picker");
  slides.replaceChildren();
  for (const slide of state.slides) {
    const label = slide.width ? `${slide.path} (${slide.width} x ${slide.height})` : slide.path;
    slides.append(new Option(label, slide.path));
  }
  const models = $("model-picker");
  models.replaceChildren();
  for (const model of state.models) {
    const classes = (model.class_names || []).join(", ");
    models.append(new Option(classes ? `${model.name} (${classes})` : model.name, model.id));
  }
  $("run").disabled = state.slides.length === 0 || state.models.length === 0;
}

async function start() {
  showError(null);
  const [slides, models] = await Promise.allSettled([api("slides"), api("models")]);
  if (slides.status === "rejected" && [401, 403].includes(slides.reason.status)) return; // the token form is up
  state.slides = slides.status === "fulfilled" ? slides.value : [];
  state.models = models.status === "fulfilled" ? models.value : [];
  fillPickers();
  for (const answer of [slides, models]) if (answer.status === "rejected") showError(answer.reason);
  await refreshJobs().catch(showError);
  const id = new URLSearchParams(location.search).get("job");
  if (id) {
    await openJob(id);
  } else {
    clearJobView();
    if (state.slides.length) await openSlide(state.slides[0].dzi).catch(showError);
  }
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("token-form").hidden = true;
  start();
});

// For tests and for embedding pages: the viewer and the page state (read-only use).
window.milkit = {
  viewer,
  state,
  refreshSignatures,
  // true once the slide (and the overlay, when there is one) has drawn every tile the view needs
  drawn() {
    const items = [state.slideItem, state.overlayItem].filter((item) => item && item.getOpacity() > 0);
    const still = viewer.viewport.getZoom(true) === viewer.viewport.getZoom(false) &&
      viewer.viewport.getCenter(true).equals(viewer.viewport.getCenter(false));
    return items.length > 0 && items.every((item) => item.getFullyLoaded()) && still && !viewer.world.needsDraw();
  },
};

start();
