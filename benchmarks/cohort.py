"""Cohort speed (issue 13 section 5): the local executor, `--shard` over 2 processes, and Ray with 2 workers.

    python benchmarks/cohort.py [--slides 16] [--size 2048] [--records 1000] [--netns] [--markdown FILE]

On `--slides` generated slides (mil_runtime.demo, `--size` px square at 0.5 um/px) and the demo model
bundle (models/demo: tiny_cnn encoder, ABMIL, 128 px tiles at 1 um/px):

1. End to end, as a user runs it (`mil-infer SLIDES --model M --out OUT --cohort -q`): one process
   (local executor, onnxruntime's default threads); two processes `--shard 0/2` and `--shard 1/2` at
   once (`--threads 1` each); `--executor ray --ray-workers 2` (a local Ray instance started by the
   command; each actor 1 CPU, 1 onnxruntime thread). Wall time from launch to exit (imports, model loads
   and Ray's start included), slides/s, and when the first result line appeared.
2. The engine's own overhead per slide, in one process, `threads=1` everywhere: between consecutive
   results, the time not spent inside `SlideWorker.process` (the worker's own clock), for the local
   executor and for Ray with 1 worker; Ray's minus local's is what the engine adds to each slide.
   Ray's start (ray.init, actors loading the model) is reported apart.
3. Resume of a finished cohort of `--records` records: that many complete output sets (one real set,
   its files hard-linked under new stems, each record naming its members; every input a hard link of one
   slide, so every run key matches), then `run_cohort` over all inputs (all skipped), the CLI doing the
   same, and `mil-infer --status OUT`. OpenSlide is never to be called: the in-process resume counts
   openslide.OpenSlide calls and Python-level opens of the inputs (an audit hook).
4. A projection of the wall time for 30,000 slides on N GPUs, from the measured per-slide overhead and
   resume figures plus stated assumptions (`--tiles-per-slide`, `--gpu-tiles-per-s`), printed with
   them.

A benchmark, not a test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:  # benchmarks/machine_info.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import cpu_model, package_version, usable_cores  # noqa: E402
MODEL = REPO / "models" / "demo" / "abmil_demo.onnx"
NETNS_ENV = "MILKIT_PRIVATE_NETNS"
PROJECTION_SLIDES = 30_000


def machine() -> str:
    versions = [f"{name} {package_version(name)}" for name in ("onnxruntime", "ray")]
    return (f"{cpu_model()}, {usable_cores()} cores available, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, {', '.join(versions)}")


def make_slides(folder: Path, count: int, size: int) -> list[Path]:
    from mil_runtime.demo import write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"slide{seed:02d}.tiff"
        write_synthetic_slide(path, height=size, width=size, seed=seed, lesions=1 if seed % 2 else None)
        paths.append(path)
    return paths


# -- 1. end to end ---------------------------------------------------------------------------------------
def mil_infer_cmd(slides: list[Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mil_runtime.cli", *map(str, slides), "--model", str(MODEL), "--out", str(out),
            "--cohort", "-q", *extra]


def timed_processes(commands: list[list[str]], env: dict[str, str]) -> dict:
    """Run `commands` at once; wall time until all exit, and when the first stdout line came."""
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for cmd in commands]
    first, lines = None, 0
    import selectors

    selector = selectors.DefaultSelector()
    for proc in procs:
        selector.register(proc.stdout, selectors.EVENT_READ)
    open_streams = len(procs)
    while open_streams:
        for key, _ in selector.select():
            line = key.fileobj.readline()
            if not line:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            lines += 1
            first = first if first is not None else time.perf_counter() - start
    errors = [proc.stderr.read() for proc in procs]
    codes = [proc.wait() for proc in procs]
    wall = time.perf_counter() - start
    if any(codes):
        raise SystemExit(f"a run failed ({codes}): {' | '.join(e.strip()[-2000:] for e in errors)}")
    return {"wall_s": wall, "first_result_s": first, "result_lines": lines}


def end_to_end(slides: list[Path], work: Path, env: dict[str, str], with_ray: bool) -> dict:
    runs = {}
    runs["local (1 process)"] = timed_processes([mil_infer_cmd(slides, work / "e2e_local")], env)
    runs["--shard K/2 (2 processes)"] = timed_processes(
        [mil_infer_cmd(slides, work / "e2e_shard", "--shard", f"{k}/2", "--threads", "1") for k in (0, 1)], env)
    if with_ray:
        runs["--executor ray (2 workers)"] = timed_processes(
            [mil_infer_cmd(slides, work / "e2e_ray", "--executor", "ray", "--ray-workers", "2")], env)
    for name, out in (("local (1 process)", "e2e_local"), ("--shard K/2 (2 processes)", "e2e_shard"),
                      ("--executor ray (2 workers)", "e2e_ray")):
        if name in runs:
            runs[name]["complete_sets"] = complete_sets(work / out, slides)
            runs[name]["slides_per_s"] = len(slides) / runs[name]["wall_s"]
    return runs


def complete_sets(out: Path, slides: list[Path]) -> int:
    from mil_runtime.outputs.record import read_output_set

    return sum(read_output_set(out, slide.stem).complete for slide in slides)


# -- 2. the engine's overhead per slide ------------------------------------------------------------------
def steady_overhead(stamps: list[float], seconds: list[float], workers: int) -> dict:
    """Between the first and the last result: wall per slide, and (one worker) time outside process() per
    slide. With more workers than free cores their clocks include waiting for a core: no overhead then."""
    n = len(stamps)
    span = stamps[-1] - stamps[0]
    overhead = (span - sum(seconds[1:])) / (n - 1) if workers == 1 else None
    return {"per_slide_wall_s": span / (n - 1), "overhead_per_slide_s": overhead,
            "process_mean_s": statistics.mean(seconds), "slides_per_s_steady": (n - 1) / span}


def engine_overhead(slides: list[Path], work: Path, with_ray: bool) -> dict:
    from mil_runtime.cohort.executors.local import run_local
    from mil_runtime.cohort.plan import plan_items
    from mil_runtime.cohort.worker import CohortJob, SlideWorker

    job = CohortJob(model_path=MODEL, device="cpu", threads=1)
    figures = {}
    start = time.perf_counter()
    worker = SlideWorker(job)
    load = time.perf_counter() - start
    warm = plan_items(slides[:1], work / "api_warm")
    list(run_local(warm, job, worker=worker))  # encoder loaded, caches warm
    stamps, seconds = [], []
    start = time.perf_counter()
    for result in run_local(plan_items(slides, work / "api_local"), job, worker=worker):
        assert result.status == "done", result.error_line
        stamps.append(time.perf_counter())
        seconds.append(result.seconds)
    figures["local"] = {"start_s": load, "wall_s": stamps[-1] - start, **steady_overhead(stamps, seconds, 1)}
    if not with_ray:
        return figures
    import ray

    from mil_runtime.cohort.executors.ray import run_ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    figures["ray_init_s"] = time.perf_counter() - start
    try:
        for workers in (1, 2):
            stamps, seconds = [], []
            start = time.perf_counter()
            for result in run_ray(plan_items(slides, work / f"api_ray{workers}"), job, progress=False,
                                  workers=workers):
                assert result.status == "done", result.error_line
                stamps.append(time.perf_counter())
                seconds.append(result.seconds)
            first_start = stamps[0] - start - seconds[0]  # actors started and loaded before the first slide
            figures[f"ray {workers} worker{'s' if workers > 1 else ''}"] = {
                "start_s": first_start, "wall_s": stamps[-1] - start, **steady_overhead(stamps, seconds, workers)}
    finally:
        ray.shutdown()
    return figures


# -- 3. resume of a finished cohort ------------------------------------------------------------------
def build_finished_cohort(slide: Path, work: Path, count: int) -> tuple[list[Path], Path]:
    """`count` complete sets in OUT whose run keys match `count` inputs (hard links of `slide`)."""
    from mil_runtime.cohort.runner import run_cohort
    from mil_runtime.cohort.worker import CohortJob

    inputs_dir, out = work / "resume_inputs", work / "resume_out"
    inputs_dir.mkdir()
    seed_input = inputs_dir / "r00000.tiff"
    os.link(slide, seed_input)
    job = CohortJob(model_path=MODEL, device="cpu", threads=1)
    summary = run_cohort([seed_input], MODEL, out, job=job, progress=False)
    assert summary.counts["done"] == 1, summary.results
    record = json.loads((out / "r00000.json").read_text())
    members = record["output_set"]["files"]
    inputs = [seed_input]
    for index in range(1, count):
        stem = f"r{index:05d}"
        target = inputs_dir / f"{stem}.tiff"
        os.link(slide, target)
        inputs.append(target)
        renamed = {}
        for name, digest in members.items():
            new_name = stem + name[len("r00000"):]
            os.link(out / name, out / new_name)
            renamed[new_name] = digest
        copy = json.loads(json.dumps(record))
        copy["input"]["path"] = str(target)
        copy["outputs"] = {kind: str(out / (stem + Path(path).name[len("r00000"):]))
                           for kind, path in record.get("outputs", {}).items()}
        copy["output_set"]["files"] = renamed
        copy["output_set"]["stat"] = {stem + name[len("r00000"):]: value  # hard links: same size and mtime
                                      for name, value in record["output_set"].get("stat", {}).items()}
        (out / f"{stem}.json").write_text(json.dumps(copy, indent=2) + "\n")
    return inputs, out


def resume(slide: Path, work: Path, count: int, env: dict[str, str]) -> dict:
    import openslide

    from mil_runtime.cohort.runner import run_cohort
    from mil_runtime.cohort.worker import CohortJob

    start = time.perf_counter()
    inputs, out = build_finished_cohort(slide, work, count)
    build = time.perf_counter() - start
    member_bytes = sum(p.stat().st_size for p in out.glob("r00000.*"))

    opened = {"openslide": 0, "python_opens_of_inputs": 0}
    real_open = openslide.OpenSlide
    input_names = {str(p) for p in inputs}

    def counting_open(*args, **kwargs):
        opened["openslide"] += 1
        return real_open(*args, **kwargs)

    def audit(event, args):
        if event == "open" and args and str(args[0]) in input_names:
            opened["python_opens_of_inputs"] += 1

    import mil_runtime.outputs.record as record_module

    real_sha = record_module.file_sha256
    hashed = {"files": 0, "bytes": 0}

    def counting_sha(path, *args, **kwargs):
        hashed["files"] += 1
        hashed["bytes"] += os.stat(path).st_size
        return real_sha(path, *args, **kwargs)

    openslide.OpenSlide = counting_open
    record_module.file_sha256 = counting_sha
    sys.addaudithook(audit)
    job = CohortJob(model_path=MODEL, device="cpu", threads=1)
    try:
        start = time.perf_counter()
        summary = run_cohort(inputs, MODEL, out, job=job, progress=False)
        api = time.perf_counter() - start
    finally:
        openslide.OpenSlide = real_open
        record_module.file_sha256 = real_sha
    counts = summary.counts
    assert counts["skipped"] == count, counts

    from mil_runtime.run_key import file_sha256

    big = work / "hash_probe.bin"
    big.write_bytes(os.urandom(64 << 20))
    start = time.perf_counter()
    file_sha256(big)
    sha_mb_s = 64 / (time.perf_counter() - start)
    big.unlink()

    start = time.perf_counter()
    status = subprocess.run([sys.executable, "-m", "mil_runtime.cli", "--status", str(out)], capture_output=True,
                            text=True, env=env)
    status_s = time.perf_counter() - start
    start = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "mil_runtime.cli", str(inputs[0].parent / "*.tiff"), "--model",
                          str(MODEL), "--out", str(out), "--cohort", "-q"], capture_output=True, text=True, env=env)
    cli_s = time.perf_counter() - start
    return {"records": count, "build_s": build, "api_resume_s": api, "api_ms_per_record": 1000 * api / count,
            "skipped": counts["skipped"], "opened": opened, "cli_resume_s": cli_s, "cli_rc": cli.returncode,
            "cli_tail": (cli.stderr.strip().splitlines() or [""])[-1][:200],
            "status_s": status_s, "status_line": status.stdout.strip()[:300] or status.stderr.strip()[:300],
            "set_bytes": member_bytes, "hashed_bytes_per_record": hashed["bytes"] / count,
            "hashed_files_per_record": hashed["files"] / count, "sha256_mb_s": sha_mb_s}


# -- 4. projection ------------------------------------------------------------------------------------
def projection(overhead: dict, resumed: dict | None, args) -> dict:
    ray = overhead.get("ray 1 worker") or overhead["local"]
    engine_s = max(0.0, ray["overhead_per_slide_s"] or 0.0)
    start_s = overhead.get("ray_init_s", 0.0) + ray["start_s"]
    compute_s = args.tiles_per_slide / args.gpu_tiles_per_s + args.fixed_s_per_slide
    rows = []
    for gpus in (1, 2, 4, 8, 16, 32, 64):
        per_gpu = math.ceil(PROJECTION_SLIDES / gpus)
        wall = start_s + per_gpu * (compute_s + engine_s)
        rows.append({"gpus": gpus, "hours": wall / 3600, "engine_share": engine_s / (compute_s + engine_s)})
    resume_s = None
    if resumed:
        small = resumed["api_ms_per_record"] / 1000 * PROJECTION_SLIDES
        passes = resumed["hashed_bytes_per_record"] / max(resumed["set_bytes"], 1)  # how often a set is hashed
        hashing = PROJECTION_SLIDES * passes * args.feature_mb / resumed["sha256_mb_s"]
        resume_s = {"as_measured_s": small, "with_feature_files_s": small + hashing}
    return {"compute_s_per_slide": compute_s, "engine_s_per_slide": engine_s, "start_s": start_s, "rows": rows,
            "resume": resume_s}


def markdown(report: dict, args) -> str:
    lines = [f"Machine: {report['machine']}.", ""]
    n = report["slides"]
    lines += [f"`python benchmarks/cohort.py --slides {n} --size {args.size} --records {args.records}` "
              f"({n} generated slides of {args.size} x {args.size} px at 0.5 um/px, "
              f"{report['tiles_per_slide']:.0f} tissue tiles each on average; demo model bundle).", ""]
    if report.get("end_to_end"):
        lines += ["| run (mil-infer ... --cohort) | wall s | slides/s | first result s | complete sets |",
                  "|---|---|---|---|---|"]
        for name, fig in report["end_to_end"].items():
            lines.append(f"| {name} | {fig['wall_s']:.1f} | {fig['slides_per_s']:.2f} | "
                         f"{fig['first_result_s']:.1f} | {fig['complete_sets']}/{n} |")
        lines.append("")
    over = report["overhead"]
    lines += ["Engine overhead, in one process (threads=1): between consecutive results, the time not spent inside "
              "SlideWorker.process.", "",
              "| executor | start s | steady s/slide | inside process() s/slide | overhead ms/slide | steady slides/s |",
              "|---|---|---|---|---|---|"]
    for name in ("local", "ray 1 worker", "ray 2 workers"):
        if name in over:
            fig = over[name]
            ms = "—" if fig["overhead_per_slide_s"] is None else f"{1000 * fig['overhead_per_slide_s']:.1f}"
            lines.append(f"| {name} | {fig['start_s']:.2f} | {fig['per_slide_wall_s']:.3f} | "
                         f"{fig['process_mean_s']:.3f} | {ms} | {fig['slides_per_s_steady']:.2f} |")
    if "ray 1 worker" in over:
        extra = over["ray 1 worker"]["overhead_per_slide_s"] - over["local"]["overhead_per_slide_s"]
        lines += ["", f"Ray adds {1000 * extra:.1f} ms per slide over the local executor (1 worker each); "
                      f"ray.init took {over['ray_init_s']:.1f} s and the actors {over['ray 1 worker']['start_s']:.1f} s "
                      "to be ready for their first slide."]
    res = report.get("resume")
    if res:
        lines += ["", f"Resume of a finished cohort of {res['records']:,} records (all skipped): run_cohort "
                      f"{res['api_resume_s']:.2f} s ({res['api_ms_per_record']:.2f} ms per record; OpenSlide opened "
                      f"{res['opened']['openslide']} slides, Python opened input files "
                      f"{res['opened']['python_opens_of_inputs']} times); the same through the CLI "
                      f"{res['cli_resume_s']:.2f} s (exit {res['cli_rc']}); `mil-infer --status OUT` "
                      f"{res['status_s']:.2f} s (`{res['status_line']}`). Each record's set is "
                      f"{res['set_bytes'] / 1024:.0f} KiB; the resume hashed {res['hashed_files_per_record']:.1f} files, "
                      f"{res['hashed_bytes_per_record'] / 1024:.0f} KiB, per record (sha256 runs at "
                      f"{res['sha256_mb_s']:.0f} MB/s here)."]
    proj = report["projection"]
    lines += ["", f"Projection, {PROJECTION_SLIDES:,} slides on N GPUs (Ray, one worker per GPU): wall = start + "
                  f"ceil({PROJECTION_SLIDES:,} / N) x (compute + engine overhead) per slide, with compute = "
                  f"{args.tiles_per_slide:,} tiles / {args.gpu_tiles_per_s:,} tiles/s + {args.fixed_s_per_slide:g} s "
                  f"= {proj['compute_s_per_slide']:.2f} s (assumed, not measured here), engine overhead "
                  f"{1000 * proj['engine_s_per_slide']:.1f} ms and start {proj['start_s']:.1f} s (measured above).",
              "", "| GPUs | hours | engine share |", "|---|---|---|"]
    for row in proj["rows"]:
        lines.append(f"| {row['gpus']} | {row['hours']:.2f} | {100 * row['engine_share']:.2f} % |")
    if proj["resume"]:
        lines += ["", f"Resuming all {PROJECTION_SLIDES:,} when finished: {proj['resume']['as_measured_s']:.0f} s at the "
                      f"measured rate with sets as small as these; with {args.feature_mb:g} MB of features per slide, "
                      f"hashed as often as above at the measured sha256 rate, "
                      f"{proj['resume']['with_feature_files_s'] / 60:.0f} min."]
    lines += ["", "Assumptions: the readers keep each GPU fed (enough CPU cores per GPU to decode "
                  f"{args.gpu_tiles_per_s:,} tiles/s), slides are spread evenly, inputs and OUT on a file system "
                  "every node reads at that rate, no slide fails; the fixed per-slide cost (open, tissue, write) "
                  "is an assumption too."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048, help="slide side, px at 0.5 um/px")
    parser.add_argument("--records", type=int, default=1000, help="records of the finished cohort to resume")
    parser.add_argument("--no-ray", action="store_true", help="leave Ray out")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--netns", action="store_true",
                        help="re-run inside a private network namespace with only loopback (root; for Ray)")
    parser.add_argument("--tiles-per-slide", type=int, default=10_000, help="projection: tissue tiles per slide")
    parser.add_argument("--gpu-tiles-per-s", type=int, default=2_000, help="projection: encoder tiles/s per GPU")
    parser.add_argument("--fixed-s-per-slide", type=float, default=2.0,
                        help="projection: per-slide open + tissue + write seconds")
    parser.add_argument("--feature-mb", type=float, default=40.0, help="projection: features.h5 MB per slide")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the section to this file")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure as JSON")
    parser.add_argument("--work", type=Path, default=None, help="keep the slides and outputs here")
    args = parser.parse_args(argv)
    if args.netns and os.environ.get(NETNS_ENV) != "1":
        command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "netns", sys.executable,
                   str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(command, env={**os.environ, NETNS_ENV: "1"})
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "RAY_USAGE_STATS_ENABLED": "0"}
    with_ray = not args.no_ray
    work = args.work or Path(tempfile.mkdtemp(prefix="milkit-cohort-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"slides: {args.slides} x {args.size} px in {work}", file=sys.stderr)
        slides = make_slides(work / "slides", args.slides, args.size)
        report = {"machine": machine(), "slides": args.slides}
        if not args.skip_end_to_end:
            print("end to end ...", file=sys.stderr)
            report["end_to_end"] = end_to_end(slides, work, env, with_ray)
        print("engine overhead ...", file=sys.stderr)
        report["overhead"] = engine_overhead(slides, work, with_ray)
        tiles = [json.loads((work / "api_local" / f"{s.stem}.json").read_text())["n_instances"] for s in slides]
        report["tiles_per_slide"] = statistics.mean(tiles)
        if args.records:
            print(f"resume of {args.records} records ...", file=sys.stderr)
            report["resume"] = resume(slides[0], work, args.records, env)
        report["projection"] = projection(report["overhead"], report.get("resume"), args)
        text = markdown(report, args)
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
