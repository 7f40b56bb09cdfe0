"""Planning a cohort: the mirrored layout (same stems in two folders never collide), shards (a partition,
deterministic, independent of the input order) and SLURM array variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from cohort_helpers import make_h5, run, statuses

from mil_runtime.cohort.plan import CohortItem, plan_items, shard, shard_from_env
from mil_runtime.outputs.record import read_output_set


def test_mirror_layout_keeps_same_stems_in_two_folders_apart(tmp_path):
    root = tmp_path / "slides"
    inputs = [make_h5(root / "site_a" / "x.h5", seed=1), make_h5(root / "site_b" / "x.h5", seed=2),
              make_h5(root / "site_a" / "deep" / "y.h5", seed=3)]
    out = tmp_path / "out"
    summary = run(inputs, out)  # auto: inputs from several folders -> mirrored
    assert set(statuses(summary).values()) == {"done"}
    for path, folder in zip(inputs, ["site_a", "site_b", "site_a/deep"]):
        found = read_output_set(out / folder, path.stem)
        assert found.complete and found.record["input"]["path"] == str(path)
    assert not (out / "x.json").exists()
    assert set(statuses(run(inputs, out)).values()) == {"skipped"}  # the mirrored sets resume


def test_without_mirror_the_second_same_stem_is_refused_not_overwritten(tmp_path):
    first, second = make_h5(tmp_path / "a" / "x.h5", seed=1), make_h5(tmp_path / "b" / "x.h5", seed=2)
    out = tmp_path / "out"
    summary = run([first, second], out, mirror=False)
    assert statuses(summary) == {str(first): "done", str(second): "failed"}
    line = summary.results[1].error_line
    assert summary.results[1].error_code == 7 and line.startswith(f"error: {second}: ") and str(first) in line
    assert read_output_set(out, "x").record["input"]["path"] == str(first)
    assert not (out / "x.failed.json").exists()  # the record of the first is not touched


def test_one_folder_is_flat_and_mirror_can_be_forced(tmp_path):
    inputs = [tmp_path / "in" / "a.h5", tmp_path / "in" / "b.h5"]
    assert {item.out_dir for item in plan_items(inputs, tmp_path / "out")} == {tmp_path / "out"}
    assert [item.out_dir for item in plan_items(inputs, tmp_path / "out", mirror=True)] == [tmp_path / "out"] * 2
    nested = plan_items([tmp_path / "r" / "p" / "a.svs", tmp_path / "r" / "q" / "a.svs", tmp_path / "r" / "p" / "a.svs"],
                        tmp_path / "out", mirror=None)
    assert nested == [CohortItem(tmp_path / "r" / "p" / "a.svs", tmp_path / "out" / "p", "a"),
                      CohortItem(tmp_path / "r" / "q" / "a.svs", tmp_path / "out" / "q", "a")]  # given twice: once


def test_shards_partition_the_cohort_deterministically():
    items = plan_items([Path(f"/data/slides/s{i:03d}.svs") for i in range(200)], Path("/out"))
    shares = [shard(items, k, 4) for k in range(4)]
    assert sorted(i.input for share in shares for i in share) == sorted(i.input for i in items)  # all, once each
    assert sorted(len(share) for share in shares) == [50, 50, 50, 50]  # dealt evenly
    reordered = plan_items([Path(f"/data/slides/s{i:03d}.svs") for i in reversed(range(200))], Path("/out"))
    assert {i.input for i in shard(reordered, 2, 4)} == {i.input for i in shares[2]}
    with pytest.raises(ValueError):
        shard(items, 4, 4)


def test_shard_from_the_option_or_a_slurm_array():
    assert shard_from_env("1/3", {}) == (1, 3)
    assert shard_from_env(None, {}) is None
    assert shard_from_env(None, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    assert shard_from_env(None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4",
                                 "SLURM_ARRAY_TASK_MIN": "1"}) == (3, 4)  # --array=1-4
    assert shard_from_env("0/2", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}) == (0, 2)  # option wins
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            shard_from_env(bad, {})
    with pytest.raises(ValueError, match="SLURM"):
        shard_from_env(None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4"})


def test_an_input_named_like_the_cohort_record_is_refused_before_anything_is_written(tmp_path):
    from mil_runtime.errors import InvalidInputError

    inputs = [make_h5(tmp_path / "in" / "a.h5", seed=1), make_h5(tmp_path / "in" / "cohort.h5", seed=2)]
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match="cohort.json there is the cohort's own record"):
        run(inputs, out)
    assert not out.exists() or not any(out.iterdir())
    nested = [make_h5(tmp_path / "in" / "site" / "cohort.h5", seed=3), inputs[0]]  # mirrored: OUT/site/cohort.*
    assert set(statuses(run(nested, out)).values()) == {"done"}
    assert read_output_set(out / "site", "cohort").complete and (out / "cohort.json").exists()
