"""Resume, rerun, retry of failures and the records of a cohort run (mil_runtime.cohort.run_cohort, local).

Truth read independently of the runner: the set's files on disk (read_output_set, their mtime_ns), the
run key computed by mil_runtime.run_key from the request, and the failed.json files.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
from cohort_helpers import DEMO_MODEL, make_h5, make_slide, other_model, run, statuses

from mil_runtime.cohort import CohortJob
from mil_runtime.cohort.records import cohort_status, failure_path
from mil_runtime.cohort.plan import CohortItem
from mil_runtime.outputs.record import read_output_set
from mil_runtime.run_key import compute_run_key, file_sha256, run_settings
from mil_runtime.slide.tissue import TISSUE_THRESHOLD


def record_mtime(out: Path, stem: str) -> int:
    return (out / f"{stem}.json").stat().st_mtime_ns


def test_resume_skips_only_complete_sets_with_the_same_run_key(tmp_path):
    src = tmp_path / "in"
    inputs = [make_h5(src / f"f{i}.h5", seed=i) for i in range(4)]
    slide = make_slide(src / "slide.tiff", seed=5)
    out = tmp_path / "out"
    job = CohortJob(DEMO_MODEL, outputs="json,csv")
    first = run([*inputs, slide], out, job=job)
    assert set(statuses(first).values()) == {"done"}
    before = {p.stem: record_mtime(out, p.stem) for p in [*inputs, slide]}
    time.sleep(0.01)
    second = run([*inputs, slide], out, job=job)
    assert set(statuses(second).values()) == {"skipped"}  # the slide's key is known without opening it
    assert {p.stem: record_mtime(out, p.stem) for p in [*inputs, slide]} == before

    (out / "f0.json").write_text("{ truncated")  # damaged record
    (out / "f1.json").unlink()  # incomplete: no record
    os.utime(inputs[2], ns=(time.time_ns(), time.time_ns() - 10**9))  # the input changed (another identity)
    with open(out / "slide.tiles.csv", "a") as handle:  # a member that no longer matches the record's sha256
        handle.write("0,0\n")
    third = run([*inputs, slide], out, job=job)
    assert statuses(third) == {str(inputs[0]): "done", str(inputs[1]): "done", str(inputs[2]): "done",
                               str(inputs[3]): "skipped", str(slide): "done"}
    assert record_mtime(out, "f3") == before["f3"]
    for path in [*inputs, slide]:
        assert read_output_set(out, path.stem).complete
    expected = compute_run_key(inputs[2], model_sha256=file_sha256(DEMO_MODEL), encoder_sha256=None,
                               settings=run_settings())
    assert read_output_set(out, "f2").run_key == expected

    other = run([*inputs, slide], out, job=CohortJob(DEMO_MODEL, outputs="json,csv", tissue_threshold=0.3))
    assert statuses(other)[str(slide)] == "done"  # other settings: redone
    assert statuses(other)[str(inputs[0])] == "skipped"  # feature files have no tissue setting
    encoder = DEMO_MODEL.parent / "tiny_cnn.onnx"
    assert read_output_set(out, "slide").run_key == compute_run_key(
        slide, model_sha256=file_sha256(DEMO_MODEL), encoder_sha256=file_sha256(encoder),
        settings=run_settings(tissue_threshold=0.3, outputs=["json", "csv"], geojson_frame="bounds"))
    assert read_output_set(out, "slide").run_key != compute_run_key(
        slide, model_sha256=file_sha256(DEMO_MODEL), encoder_sha256=file_sha256(encoder),
        settings=run_settings(tissue_threshold=TISSUE_THRESHOLD, outputs=["json", "csv"], geojson_frame="bounds"))


def test_rerun_redoes_everything(tmp_path):
    inputs = [make_h5(tmp_path / "in" / f"f{i}.h5", seed=i) for i in range(3)]
    out = tmp_path / "out"
    run(inputs, out)
    before = {p.stem: record_mtime(out, p.stem) for p in inputs}
    again = run(inputs, out, rerun=True)
    assert set(statuses(again).values()) == {"done"}
    assert all(record_mtime(out, p.stem) != before[p.stem] for p in inputs)


def test_changing_the_model_redoes_every_slide(tmp_path):
    src = tmp_path / "in"
    inputs = [make_h5(src / f"f{i}.h5", seed=i) for i in range(3)] + [make_slide(src / "s.tiff", seed=1)]
    out = tmp_path / "out"
    job = CohortJob(DEMO_MODEL, outputs="json")
    assert set(statuses(run(inputs, out, job=job)).values()) == {"done"}
    second_model = other_model(tmp_path / "models")
    changed = run(inputs, out, model=second_model, job=job)
    assert set(statuses(changed).values()) == {"done"}
    for path in inputs:
        assert read_output_set(out, path.stem).record["model"]["sha256"] == file_sha256(second_model)
    assert set(statuses(run(inputs, out, model=second_model, job=job)).values()) == {"skipped"}


def test_failures_are_recorded_and_retried_only_when_asked(tmp_path):
    src = tmp_path / "in"
    good = make_h5(src / "good.h5", seed=1)
    bad = src / "bad.h5"
    bad.write_bytes(b"not an hdf5 file")
    out = tmp_path / "out"
    first = run([good, bad], out)
    assert statuses(first) == {str(good): "done", str(bad): "failed"}
    failed = json.loads(failure_path(CohortItem(bad, out, "bad")).read_text())
    result = first.results[1]
    assert failed["code"] == result.error_code == 6 and failed["line"] == result.error_line
    assert failed["line"].startswith(f"error: {bad}: ") and failed["input"] == str(bad)
    assert failed["run_key"] == compute_run_key(bad, model_sha256=file_sha256(DEMO_MODEL), encoder_sha256=None,
                                                settings=run_settings())
    assert first.exit_code == 6
    stamp = failure_path(CohortItem(bad, out, "bad")).stat().st_mtime_ns

    again = run([good, bad], out)  # not retried: the record answers
    assert statuses(again) == {str(good): "skipped", str(bad): "failed"}
    assert again.results[1].error_line == failed["line"] and again.exit_code == 6
    assert failure_path(CohortItem(bad, out, "bad")).stat().st_mtime_ns == stamp

    retried = run([good, bad], out, retry_failed=True)  # retried, fails again, recorded again
    assert statuses(retried) == {str(good): "skipped", str(bad): "failed"}
    assert failure_path(CohortItem(bad, out, "bad")).stat().st_mtime_ns != stamp

    stat = bad.stat()
    make_h5(bad, seed=2)  # repaired under the same name and mtime: only --retry-failed tries it
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    size_key = compute_run_key(bad, model_sha256=file_sha256(DEMO_MODEL), encoder_sha256=None, settings=run_settings())
    if size_key == failed["run_key"]:  # same size too: the identity cannot tell, the record stands
        assert statuses(run([good, bad], out))[str(bad)] == "failed"
    fixed = run([good, bad], out, retry_failed=True)
    assert statuses(fixed) == {str(good): "skipped", str(bad): "done"}
    assert not failure_path(CohortItem(bad, out, "bad")).exists() and fixed.exit_code == 0


def test_cohort_json_first_and_the_predictions_table_from_the_records(tmp_path):
    src = tmp_path / "in"
    inputs = [make_h5(src / f"f{i}.h5", seed=i) for i in range(4)]
    bad = src / "bad.h5"
    bad.write_bytes(b"junk")
    out = tmp_path / "out"
    seen = []

    def on_result(result):  # cohort.json exists before the first slide is run
        seen.append(json.loads((out / "cohort.json").read_text()))

    summary = run([*inputs, bad], out, on_result=on_result, shard=(0, 2))
    manifest = seen[0]
    assert [entry["input"] for entry in manifest["items"]] == [str(p) for p in [*inputs, bad]]  # all, not the share
    assert manifest["model"]["sha256"] == file_sha256(DEMO_MODEL)
    mine = {str(r.item.input) for r in summary.results}
    assert 0 < len(mine) < 5  # a real share
    with open(out / "predictions.csv", newline="") as handle:
        rows = {row["input"]: row for row in csv.DictReader(handle)}
    assert list(rows) == [str(p) for p in [*inputs, bad]]
    for path in [*inputs, bad]:
        row = rows[str(path)]
        if str(path) not in mine:
            assert row["status"] == "pending" and row["class_name"] == ""
        elif path == bad:
            assert row["status"] == "failed" and row["error_code"] == "6" and row["error_line"].startswith("error: ")
        else:
            record = read_output_set(out, path.stem).record
            assert row["status"] == "done" and row["class_name"] == record["prediction"]["class_name"]
            assert float(row["p_lesion"]) == record["probabilities"]["lesion"]
            assert float(row["p_clean"]) == record["probabilities"]["clean"]
            assert int(row["n_tiles"]) == record["n_instances"] == 6 and row["record"] == f"{path.stem}.json"
    counts = cohort_status(out)
    assert counts["total"] == 5 and counts["done"] + counts["failed"] == len(mine)
    assert counts["pending"] == 5 - len(mine)


def test_an_unexpected_crash_on_one_input_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    import mil_runtime.cli as cli

    inputs = [make_h5(tmp_path / "in" / f"f{i}.h5", seed=i) for i in range(3)]
    real = cli.infer_input

    def crash_on_f1(path, runner, settings):
        if path.stem == "f1":
            raise RuntimeError("reader crashed")
        return real(path, runner, settings)

    monkeypatch.setattr(cli, "infer_input", crash_on_f1)
    out = tmp_path / "out"
    summary = run(inputs, out)
    assert statuses(summary) == {str(inputs[0]): "done", str(inputs[1]): "failed", str(inputs[2]): "done"}
    crashed = summary.results[1]
    assert crashed.error_code == 1 and "unexpected RuntimeError: reader crashed" in crashed.error_line
    assert json.loads((out / "f1.failed.json").read_text())["code"] == 1
    assert not (out / "f1.lock").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
