"""The Ray executor (mil_runtime.cohort.executors.ray) on a local Ray instance.

Ray binds to the machine's own network address, so the Ray tests run inside a private network
namespace with only loopback (tests/cohort/netns.py): `test_ray_*_in_a_private_network_namespace`
re-runs this file there (`unshare -n`, `ip link set lo up`, as root) with MILKIT_PRIVATE_NETNS=1, and
only there are the tests marked `@in_netns` collected. They share one `ray.init(num_cpus=2,
include_dashboard=False)` (module fixture).

Independent truths the tests read: the files in OUT (read_output_set, hidden files, locks), and a log
that `LoggingWorker` (a SlideWorker subclass, run in the actors) appends to: one line per model load,
per encoder load and per attempt at a slide, with the pid. Faults are real: a worker process ends with
os._exit in the middle of committing a slide's set; the driver gets SIGKILL.

Run directly: `python -m pytest tests/cohort/test_ray.py` (quick) or with `-m slow`.
This file is also the driver script of the subprocess tests (`python test_ray.py drive '<json>'`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))  # netns, also when this file runs as the driver script

from netns import in_private_netns, interfaces, run_in_netns, why_no_netns  # noqa: E402

from mil_runtime.cohort.plan import CohortItem, plan_items, shard  # noqa: E402
from mil_runtime.cohort.worker import CohortJob, SlideWorker  # noqa: E402
from mil_runtime.outputs.record import read_output_set  # noqa: E402

DEMO = ROOT / "models" / "demo"
SET_SUFFIXES = (".json", ".heatmap.png", ".tissue.png", ".tiles.geojson", ".tiles.csv", ".features.h5")
LOG = "worker.log"  # next to the test's model copy: LoggingWorker's lines


def in_netns(test):
    """Collect `test` only inside the private network namespace (the outer tests run it there)."""
    test.__test__ = in_private_netns()
    return test


# -- the worker the actors run in these tests ----------------------------------------------------------
def _log(job_or_model, text: str) -> None:
    model = Path(getattr(job_or_model, "model_path", job_or_model))
    with open(model.parent / LOG, "a", encoding="utf-8") as handle:  # O_APPEND: one write per line
        handle.write(f"{text} {os.getpid()}\n")


class LoggingWorker(SlideWorker):
    """A SlideWorker that logs its loads and attempts, and dies on purpose on some stems.

    Stems starting `die_once` end the process (os._exit) after two files of the set were renamed into
    place, on their first attempt only; `die_always` on every attempt.
    """

    def __init__(self, job: CohortJob):
        import mil_runtime.encoder as encoder_module

        super().__init__(job)
        _log(job, "load")
        if "torch" in sys.modules:
            _log(job, "torch-imported")
        original = encoder_module.load_encoder

        def load_encoder(*args, **kwargs):
            _log(job, "encoder")
            return original(*args, **kwargs)

        encoder_module.load_encoder = load_encoder  # Settings.encoder imports it at call time

    def process(self, item: CohortItem, *, rerun: bool = False):
        import mil_runtime.atomic as atomic

        _log(self.job, f"attempt {item.stem}")
        die = item.stem.startswith("die_always")
        if item.stem.startswith("die_once"):
            marker = Path(self.job.model_path).parent / f"died.{item.stem}"
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                die = True
            except FileExistsError:
                pass
        original = atomic.fault_point

        def fault_point(renamed: int) -> None:
            if die and renamed == 2:
                os._exit(3)  # mid-commit: two files in place, the rest staged, no record
            original(renamed)

        atomic.fault_point = fault_point
        try:
            return super().process(item, rerun=rerun)
        finally:
            atomic.fault_point = original


def read_log(model: Path) -> list[tuple[str, int]]:
    path = model.parent / LOG
    if not path.exists():
        return []
    return [(line.rsplit(" ", 1)[0], int(line.rsplit(" ", 1)[1])) for line in path.read_text().splitlines()]


# -- fixtures and helpers ------------------------------------------------------------------------------
def make_slides(folder: Path, names: list[str], pool: Path) -> list[Path]:
    """Slides named `names` in `folder`: hard links to generated slides in `pool` (made once, by seed)."""
    from mil_runtime.demo import write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, name in enumerate(names):
        source = pool / f"seed{seed}.tiff"
        if not source.exists():
            write_synthetic_slide(source, height=1024, width=1024, seed=seed, lesions=1 if seed % 2 else None)
        os.link(source, folder / f"{name}.tiff")
        paths.append(folder / f"{name}.tiff")
    return paths


def model_copy(folder: Path) -> Path:
    """The demo model and its encoder in `folder` (the log goes beside them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("abmil_demo.onnx", "tiny_cnn.onnx"):
        shutil.copy(DEMO / name, folder / name)
    return folder / "abmil_demo.onnx"


def job_for(model: Path) -> CohortJob:
    return CohortJob(model_path=model, device="cpu", threads=1, workers=1, batch_size=16)


def assert_one_clean_set(out: Path, stem: str) -> dict:
    """The stem's files are exactly one complete output set: its members, no temporaries, no claim."""
    found = read_output_set(out, stem)
    assert found.complete, f"{stem}: {found.reason}"
    members = {f"{stem}{suffix}" for suffix in SET_SUFFIXES}
    assert set(found.files) == members
    present = {p.name for p in out.iterdir() if p.name.startswith(f"{stem}.") or p.name.startswith(f".{stem}.")}
    assert present == members, f"{stem}: files beside the set: {sorted(present - members)}"
    return found.record


def hidden_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob(".*"))


def record_identity(out: Path, stem: str):
    stat = (out / f"{stem}.json").stat()
    return stat.st_ino, stat.st_mtime_ns, (out / f"{stem}.json").read_bytes()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slide_pool")


# -- the tests (inside the namespace) ------------------------------------------------------------------
@in_netns
def test_the_namespace_has_only_loopback_and_ray_runs_on_it(ray_cluster):
    assert interfaces() == ["lo"]
    node = ray_cluster.nodes()[0]
    assert node["Alive"] and node["NodeManagerAddress"] == "127.0.0.1"
    assert ray_cluster.cluster_resources()["CPU"] == 2


@in_netns
def test_a_dead_worker_s_slide_is_retried_and_a_bad_slide_is_not(ray_cluster, pool, tmp_path):
    from mil_runtime.cohort.executors.ray import run_ray
    from mil_runtime.cohort.records import read_failure

    model = model_copy(tmp_path / "model")
    slides = make_slides(tmp_path / "slides", ["ok_a", "die_once", "ok_b", "die_always"], pool)
    bad = tmp_path / "slides" / "bad.svs"
    bad.write_text("this is not a slide\n")
    out = tmp_path / "out"
    items = plan_items([*slides, bad], out)
    results = {r.item.stem: r for r in run_ray(items, job_for(model), progress=False, workers=2, max_retries=1,
                                                 worker_class=LoggingWorker)}
    assert sorted(results) == ["bad", "die_always", "die_once", "ok_a", "ok_b"]
    log = read_log(model)
    attempts = {stem: sum(1 for what, _ in log if what == f"attempt {stem}") for stem in results}
    # died once -> one retry; died every time -> 1 + max_retries attempts; a bad file -> never retried
    assert attempts == {"ok_a": 1, "ok_b": 1, "die_once": 2, "die_always": 2, "bad": 1}
    for stem in ("ok_a", "ok_b", "die_once"):
        assert results[stem].status == "done", results[stem].error_line
        assert_one_clean_set(out, stem)
        assert read_failure(CohortItem(Path(), out, stem)) is None
    assert results["bad"].status == "failed" and results["bad"].error_code == 8  # SlideReadError
    assert read_failure(results["bad"].item)["code"] == 8
    gave_up = results["die_always"]
    assert gave_up.status == "failed" and gave_up.error_code == 1
    assert "died on each of 2 attempts" in gave_up.error_line and gave_up.error_line.count("\n") == 0
    assert read_failure(gave_up.item)["code"] == 1 and read_failure(gave_up.item)["run_key"] == \
        SlideWorker(job_for(model)).expected_run_key(gave_up.item)
    assert not read_output_set(out, "die_always").complete
    assert hidden_files(out) == [] and not list(out.glob("*.lock"))  # the dead worker's claim taken over
    # one model load per actor (3 deaths -> at most 2 + 3 actors), one encoder load per actor
    loads = [pid for what, pid in log if what == "load"]
    assert len(loads) == len(set(loads)) <= 2 + 3 < sum(attempts.values())
    encoders = [pid for what, pid in log if what == "encoder"]
    assert len(encoders) == len(set(encoders)) and set(encoders) <= set(loads)
    assert {pid for what, pid in log if what.startswith("attempt")} <= set(loads)
    assert ("torch-imported" not in {what for what, _ in log}), "the runtime imported torch in a Ray worker"


@in_netns
def test_gpus_asked_of_a_cluster_without_gpus_is_one_line(ray_cluster, pool, tmp_path):
    from mil_runtime.cohort.executors.ray import actor_options, run_ray
    from mil_runtime.errors import DeviceError

    items = plan_items(make_slides(tmp_path / "slides", ["one"], pool), tmp_path / "out")
    with pytest.raises(DeviceError, match=r"--gpus-per-worker 1: the Ray cluster has 0 GPUs"):
        list(run_ray(items, job_for(DEMO / "abmil_demo.onnx"), progress=False, gpus_per_worker=1))
    with pytest.raises(DeviceError, match="Ray gives each worker its own GPU"):
        list(run_ray(items, CohortJob(model_path=DEMO / "abmil_demo.onnx", device="cuda:1"), gpus_per_worker=1))
    assert actor_options(gpus_per_worker=0.5)["num_gpus"] == 0.5
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def _drive_cmd(spec: dict) -> list[str]:
    return [sys.executable, str(Path(__file__)), "drive", json.dumps(spec)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_dead(pids, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(_pid_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"Ray workers {[p for p in pids if _pid_alive(p)]} outlived their driver"
        time.sleep(0.2)


def _tiles(record: dict) -> list[tuple[int, int, float]]:
    return [(t["x"], t["y"], t["attention"]) for t in record["tiles"]]


@in_netns
@pytest.mark.slow
def test_a_killed_driver_loses_nothing_and_the_rerun_equals_a_local_run(ray_cluster, pool, tmp_path):
    from mil_runtime.cohort.executors.local import run_local
    from mil_runtime.cohort.executors.ray import run_ray

    model = model_copy(tmp_path / "model")
    stems = [f"c{i}" for i in range(8)]
    slides = make_slides(tmp_path / "slides", stems, pool)
    out = tmp_path / "out"
    spec = {"executor": "ray", "address": ray_cluster.get_runtime_context().gcs_address, "model": str(model),
            "slides": list(map(str, slides)), "out": str(out), "workers": 2,
            "env": {"MILKIT_FAULT_RENAME_DELAY_S": "0.1"}}  # each slide takes >= 0.6 s: the kill lands mid-run
    driver = subprocess.Popen(_drive_cmd(spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reported = []
    for line in driver.stdout:
        reported.append(json.loads(line))
        if len(reported) == 3:
            driver.send_signal(signal.SIGKILL)
            break
    driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read()[-3000:]
    assert [r["status"] for r in reported] == ["done"] * 3
    _wait_dead({pid for _, pid in read_log(model)})  # its actors end with it: nothing writes after this
    time.sleep(1.0)
    _wait_dead({pid for _, pid in read_log(model)})

    complete = {stem for stem in stems if read_output_set(out, stem).complete}
    assert {r["stem"] for r in reported} <= complete
    assert len(complete) < len(stems), "the first run finished before it was killed: nothing was tested"
    before = {stem: record_identity(out, stem) for stem in complete}
    first_attempts = [what for what, _ in read_log(model) if what.startswith("attempt")]

    items = plan_items(slides, out)
    second = {r.item.stem: r.status for r in run_ray(items, job_for(model), progress=False, workers=2,
                                                      worker_class=LoggingWorker)}
    # each slide processed exactly once across both runs: finished ones are skipped, untouched
    assert second == {stem: "skipped" if stem in complete else "done" for stem in stems}
    assert {stem: record_identity(out, stem) for stem in complete} == before
    all_attempts = [what for what, _ in read_log(model) if what.startswith("attempt")]
    assert sorted(all_attempts[len(first_attempts):]) == sorted(f"attempt {s}" for s in stems)  # one try each
    for stem in stems:
        assert_one_clean_set(out, stem)
    assert hidden_files(out) == [] and not list(out.glob("*.lock"))

    # the same slides by the local executor, in a clean OUT: predictions equal, attention within 1e-6
    local_out = tmp_path / "local"
    local = {r.item.stem: r for r in run_local(plan_items(slides, local_out), job_for(model))}
    assert {s: r.status for s, r in local.items()} == {s: "done" for s in stems}
    for stem in stems:
        ray_record = read_output_set(out, stem).record
        local_record = read_output_set(local_out, stem).record
        assert ray_record["prediction"] == local_record["prediction"]
        assert ray_record["probabilities"] == local_record["probabilities"]
        ray_tiles, local_tiles = _tiles(ray_record), _tiles(local_record)
        assert [t[:2] for t in ray_tiles] == [t[:2] for t in local_tiles] and ray_tiles
        assert max(abs(a[2] - b[2]) for a, b in zip(ray_tiles, local_tiles)) <= 1e-6
        assert ray_record["output_set"]["run_key"] == local_record["output_set"]["run_key"]

    # another model (same weights, another file) redoes every slide: mil-infer --executor ray, on this cluster
    import onnx

    other = model_copy(tmp_path / "other_model")
    proto = onnx.load(other)
    proto.doc_string = (proto.doc_string or "") + " (a copy)"
    onnx.save(proto, other)
    cli = subprocess.run([sys.executable, "-m", "mil_runtime.cli", *map(str, slides), "--model", str(other), "--out",
                          str(out), "--executor", "ray", "--ray-address", spec["address"], "--ray-workers", "2",
                          "--threads", "1", "--device", "cpu"], capture_output=True, text=True, timeout=180)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert f"cohort {out}: 8 done, 0 skipped (done before), 0 failed" in cli.stderr
    assert len(cli.stdout.splitlines()) == 8
    for stem in stems:
        record = assert_one_clean_set(out, stem)
        assert record["model"]["sha256"] != ray_record["model"]["sha256"]
        assert record["probabilities"] == read_output_set(local_out, stem).record["probabilities"]


@in_netns
@pytest.mark.slow
def test_two_overlapping_shards_and_a_ray_run_share_one_out(ray_cluster, pool, tmp_path):
    from mil_runtime.cohort.executors.ray import run_ray

    model = model_copy(tmp_path / "model")
    stems = [f"s{i}" for i in range(10)]
    slides = make_slides(tmp_path / "slides", stems, pool)
    out = tmp_path / "out"
    base = {"model": str(model), "slides": list(map(str, slides)), "out": str(out), "executor": "local",
            "env": {"MILKIT_FAULT_RENAME_DELAY_S": "0.15"}}  # ~1 s a slide: the runs overlap
    shards = [subprocess.Popen(_drive_cmd({**base, "shard": [k, 2]}), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    ray_results = [(r.item.stem, r.status) for r in run_ray(plan_items(slides, out), job_for(model),
                                                             progress=False, workers=2)]
    runs = {"ray": ray_results}
    for k, proc in enumerate(shards):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
        runs[f"shard{k}"] = [(r["stem"], r["status"]) for r in map(json.loads, stdout.splitlines())]
    assert sorted(s for s, _ in runs["shard0"] + runs["shard1"]) == stems  # the shards split the cohort
    assert sorted(s for s, _ in runs["ray"]) == stems
    statuses = {status for run in runs.values() for _, status in run}
    assert statuses <= {"done", "skipped", "busy"}, runs
    done = [stem for run in runs.values() for stem, status in run if status == "done"]
    assert sorted(done) == stems, f"each slide is done exactly once across the three runs: {runs}"
    for stem in stems:
        assert_one_clean_set(out, stem)
    assert hidden_files(out) == [] and not list(out.glob("*.lock"))


# -- outside the namespace: run the tests above inside one --------------------------------------------
QUICK = ["test_the_namespace_has_only_loopback_and_ray_runs_on_it",
         "test_a_dead_worker_s_slide_is_retried_and_a_bad_slide_is_not",
         "test_gpus_asked_of_a_cluster_without_gpus_is_one_line"]
SLOW = ["test_a_killed_driver_loses_nothing_and_the_rerun_equals_a_local_run",
        "test_two_overlapping_shards_and_a_ray_run_share_one_out"]


def _run_inside(names: list[str], timeout: float) -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'milkit[ray]')")
    reason = why_no_netns()
    if reason is not None:
        pytest.skip(f"no private network namespace for the Ray tests: {reason}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    node_ids = [f"{Path(__file__)}::{name}" for name in names]
    proc = run_in_netns([sys.executable, "-m", "pytest", *node_ids, "-q", "-p", "no:cacheprovider", "-m", ""],
                        env=env, timeout=timeout, cwd=ROOT)
    summary = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, summary
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) == len(names), summary


@pytest.mark.slow  # 11-15 s: moved out of the quick loop, which reached its 10-minute budget
@pytest.mark.skipif(in_private_netns(), reason="already inside the namespace")
def test_ray_quick_tests_in_a_private_network_namespace():
    _run_inside(QUICK, timeout=240)


@pytest.mark.slow
@pytest.mark.skipif(in_private_netns(), reason="already inside the namespace")
def test_ray_slow_tests_in_a_private_network_namespace():
    _run_inside(SLOW, timeout=600)


# -- the driver of the subprocess tests ----------------------------------------------------------------
def drive(spec: dict) -> None:
    """Run the slides of `spec` and print one JSON line per result, as it comes."""
    os.environ.update(spec.get("env", {}))
    model = Path(spec["model"])
    items = plan_items([Path(p) for p in spec["slides"]], Path(spec["out"]))
    if spec.get("shard"):
        items = shard(items, *spec["shard"])
    if spec["executor"] == "ray":
        import ray

        from mil_runtime.cohort.executors.ray import run_ray

        ray.init(address=spec["address"], logging_level="WARNING",
                 runtime_env={"env_vars": dict(spec.get("env", {}))})
        results = run_ray(items, job_for(model), progress=False, workers=spec["workers"],
                          worker_class=LoggingWorker)
    else:
        from mil_runtime.cohort.executors.local import run_local

        results = run_local(items, job_for(model))
    for result in results:
        print(json.dumps({"stem": result.item.stem, "status": result.status, "line": result.error_line}),
              flush=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "drive":
    drive(json.loads(sys.argv[2]))
