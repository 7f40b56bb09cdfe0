"""Claims in a cohort: overlapping processes on one OUT never process a slide twice or lose one; a dead
writer's claim is taken over; a live one elsewhere leaves the slide to its owner ("busy", exit 12).

The overlap test counts, per input, the processes that report "done" for it (each subprocess prints
its results as JSON), and checks the sets on disk independently (read_output_set, no lock left).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cohort_helpers import DEMO_MODEL, env, make_h5, run, statuses

from mil_runtime import claims
from mil_runtime.claims import lock_path
from mil_runtime.cohort.records import cohort_status
from mil_runtime.outputs.record import read_output_set

DRIVER = """
import json, sys
from pathlib import Path
from mil_runtime.cohort import run_cohort
inputs, out, model, shard = json.loads(sys.argv[1])
summary = run_cohort([Path(p) for p in inputs], model, out, shard=tuple(shard) if shard else None, progress=False)
print(json.dumps([[str(r.item.input), r.status] for r in summary.results]))
"""


def test_overlapping_sharded_processes_process_every_slide_exactly_once(tmp_path):
    inputs = [str(make_h5(tmp_path / "in" / f"f{i:02d}.h5", seed=i)) for i in range(10)]
    out = tmp_path / "out"
    shares = [None, None, [0, 2], [1, 2]]  # two whole-cohort processes and a 2-way shard, all at once
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps([inputs, str(out), str(DEMO_MODEL), share])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(MILKIT_FAULT_RENAME_DELAY_S=0.05))  # each commit takes a while: overlap
             for share in shares]
    reports = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        reports.append(json.loads(stdout))
    done = {path: 0 for path in inputs}
    for report in reports:
        for path, status in report:
            assert status in ("done", "skipped", "busy")
            done[path] += status == "done"
    assert done == {path: 1 for path in inputs}  # none twice, none lost
    assert sum(len(report) for report in reports) == 2 * len(inputs) + len(inputs)  # each share answered for each
    for path in inputs:
        assert read_output_set(out, Path(path).stem).complete
        assert not lock_path(out, Path(path).stem).exists()
    assert cohort_status(out)["done"] == len(inputs)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_claim(out: Path, stem: str, *, host: str, pid: int, heartbeat: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = lock_path(out, stem)
    path.write_text(json.dumps({"host": host, "pid": pid, "started": heartbeat, "heartbeat": heartbeat,
                                "token": "x"}))
    return path


def test_a_stale_claim_is_taken_over_and_a_live_one_elsewhere_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "STALE_AFTER_S", 2.0)
    inputs = [make_h5(tmp_path / "in" / f"{name}.h5", seed=i) for i, name in enumerate(["gone", "silent", "live"])]
    out = tmp_path / "out"
    write_claim(out, "gone", host=socket.gethostname(), pid=dead_pid(), heartbeat=time.time())  # owner exited
    write_claim(out, "silent", host="another-host", pid=1, heartbeat=time.time() - 60)  # heartbeat too old
    live = write_claim(out, "live", host="another-host", pid=1, heartbeat=time.time())  # alive elsewhere
    (out / ".silent.json.ab12cd34.tmp").write_text("a dead writer's staged file")
    assert cohort_status_after_manifest(inputs, out)["stale_claims"] == 2
    summary = run(inputs, out)
    assert statuses(summary) == {str(inputs[0]): "done", str(inputs[1]): "done", str(inputs[2]): "busy"}
    busy = summary.results[2]
    assert busy.error_code == 12 and "being written by pid 1 on another-host" in busy.error_line
    assert summary.exit_code == 12
    assert not lock_path(out, "gone").exists() and not lock_path(out, "silent").exists()
    assert not (out / ".silent.json.ab12cd34.tmp").exists()
    assert live.exists() and not (out / "live.json").exists()
    counts = cohort_status(out)
    assert (counts["done"], counts["pending"], counts["running"], counts["stale_claims"]) == (2, 1, 1, 0)


def cohort_status_after_manifest(inputs, out):
    from mil_runtime.cohort import CohortJob, plan_items
    from mil_runtime.cohort.records import write_cohort_manifest

    write_cohort_manifest(out, plan_items(inputs, out), CohortJob(DEMO_MODEL))
    return cohort_status(out)


def test_a_claim_left_beside_a_finished_set_is_cleaned_when_the_set_is_skipped(tmp_path):
    inputs = [make_h5(tmp_path / "in" / "a.h5", seed=1)]
    out = tmp_path / "out"
    run(inputs, out)
    write_claim(out, "a", host=socket.gethostname(), pid=dead_pid(), heartbeat=time.time())
    assert statuses(run(inputs, out)) == {str(inputs[0]): "skipped"}
    assert not lock_path(out, "a").exists()


def test_a_set_finished_by_another_process_between_the_look_and_the_claim_is_not_redone(tmp_path, monkeypatch):
    """The race the claim alone does not close: the set was incomplete when looked at, another process
    finished it and released its claim, then this one took the claim. The check under the claim skips it."""
    from mil_runtime.cohort import CohortJob, SlideWorker
    from mil_runtime.cohort.plan import plan_items

    source = make_h5(tmp_path / "in" / "a.h5", seed=1)
    out = tmp_path / "out"
    run([source], out)  # "the other process"
    stamp = (out / "a.json").stat().st_mtime_ns
    worker = SlideWorker(CohortJob(DEMO_MODEL))
    looks = []
    real = SlideWorker._complete

    def first_look_sees_nothing(self, item, key):
        looks.append(item.stem)
        return None if len(looks) == 1 else real(self, item, key)

    monkeypatch.setattr(SlideWorker, "_complete", first_look_sees_nothing)
    result = worker.process(plan_items([source], out)[0])
    assert result.status == "skipped" and len(looks) == 2
    assert (out / "a.json").stat().st_mtime_ns == stamp and not lock_path(out, "a").exists()


@pytest.mark.parametrize("record", ["manifest", "table", "failure"])
def test_another_process_cleaning_up_never_removes_a_cohort_record_being_committed(tmp_path, monkeypatch, record):
    """The interleaving that lost OUT/cohort.json under four overlapping processes: one process's start-up
    clean-up (clean_stale_temps) ran while another had `.cohort.json.<random>.tmp` written but not yet
    renamed. Here the clean-up runs at exactly that point, inside the write; the record must survive."""
    from mil_runtime.cohort import CohortJob, records
    from mil_runtime.cohort.plan import plan_items

    source = make_h5(tmp_path / "in" / "a.h5", seed=1)
    out = tmp_path / "out"
    item = plan_items([source], out)[0]
    job = CohortJob(DEMO_MODEL)
    if record != "manifest":
        records.write_cohort_manifest(out, [item], job)
    real_json, real_csv = records.json, records.csv

    def clean_then(write):
        def wrapped(*args, **kwargs):
            claims.clean_stale_temps(out)  # the other process, mid-commit
            return write(*args, **kwargs)
        return wrapped

    class JsonCleaningMidWrite:
        dump = staticmethod(clean_then(real_json.dump))
        loads = staticmethod(real_json.loads)

    class CsvCleaningMidWrite:
        DictWriter = staticmethod(clean_then(real_csv.DictWriter))

    monkeypatch.setattr(records, "json", JsonCleaningMidWrite)
    monkeypatch.setattr(records, "csv", CsvCleaningMidWrite)
    if record == "manifest":
        path = records.write_cohort_manifest(out, [item], job)
        monkeypatch.undo()
        assert records.read_cohort_manifest(out)[0] == [item]
    elif record == "table":
        path = records.write_predictions_table(out)
        monkeypatch.undo()
        assert path.read_text().splitlines()[1].startswith(f"{source},a,pending")
    else:
        with claims.claim_stem(out, "a"):  # a failure is recorded under the stem's claim
            path = records.write_failure(item, 8, "error: unreadable", None)
        monkeypatch.undo()
        assert records.read_failure(item)["code"] == 8
    assert path is not None and path.exists()
    assert not [name for name in os.listdir(out) if name.endswith((".tmp", ".lock"))]
