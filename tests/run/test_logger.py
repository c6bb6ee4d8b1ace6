"""The run's history on resume: exactly the rows of an uninterrupted run, whatever the kill left."""

from __future__ import annotations

import json

import pytest

from reinforcepp.errors import InputError
from reinforcepp.run import RunLogger, read_metrics
from reinforcepp.run.logger import read_rows


def tb_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_truncate_drops_rows_after_the_checkpoint_and_a_cut_last_line(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log(step, {"x": float(step)})
    log.close()
    samples = "".join(json.dumps({"step": s, "completion": "c"}) + "\n" for s in (2, 4))
    (tmp_path / "samples.jsonl").write_text(samples + '{"step": 6, "compl')
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "kind": "tr')  # the disk filled up mid-row
    with pytest.warns(UserWarning, match="metrics.jsonl: dropped a truncated last line"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    log = RunLogger(tmp_path, tensorboard=False)
    with pytest.warns(UserWarning, match="truncated last line"):
        log.truncate(3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert [r["step"] for r in read_rows(tmp_path / "samples.jsonl")] == [2]


def test_a_bad_line_inside_the_file_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(InputError, match=r"metrics.jsonl:2: not a JSON row"):
        read_rows(path)


def test_tensorboard_holds_one_point_per_step_after_resume(tmp_path):
    log = RunLogger(tmp_path, tensorboard=True)
    for step in range(1, 5):
        log.log(step, {"x": float(step)})
    log.close()
    resumed = RunLogger(tmp_path, tensorboard=True)
    resumed.truncate(2)
    for step in range(3, 6):
        resumed.log(step, {"x": 10.0 * step})
    resumed.close()
    assert tb_scalars(tmp_path, "x") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def raw_points(run_dir):
    """Every (tag, step, value) of every raw event file, in file-name order: what any reader sees."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    out = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            if event.WhichOneof("what") == "session_log":
                out.append(("session_log", event.step, None))
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


def test_tensorboard_raw_files_hold_each_step_once_after_resumes(tmp_path):
    log = RunLogger(tmp_path, tensorboard=True)
    for step in range(1, 7):
        log.log(step, {"x": float(step), "y": -float(step)})
    log.close()
    for last, end in ((2, 5), (4, 7)):  # killed after step 5 with checkpoint 2, then after 7 with checkpoint 4
        resumed = RunLogger(tmp_path, tensorboard=True)
        resumed.truncate(last)
        for step in range(last + 1, end + 1):
            resumed.log(step, {"x": 10.0 * step, "y": -10.0 * step})
        resumed.close()
    expected = [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0), (6, 60.0), (7, 70.0)]
    points = raw_points(tmp_path)
    assert [(s, v) for t, s, v in points if t == "x"] == expected
    assert [(s, -v) for t, s, v in points if t == "y"] == expected
    assert not any(t == "session_log" for t, _, _ in points)
    assert tb_scalars(tmp_path, "x") == expected
    assert not (tmp_path / "tensorboard.old").exists() and not (tmp_path / ".tensorboard.tmp").exists()


def test_tensorboard_rewrite_killed_between_the_renames_is_recovered(tmp_path):
    import os

    from reinforcepp.run.logger import rewrite_tensorboard

    log = RunLogger(tmp_path, tensorboard=True)
    for step in range(1, 4):
        log.log(step, {"x": float(step)})
    log.close()
    before = raw_points(tmp_path)
    os.replace(tmp_path / "tensorboard", tmp_path / "tensorboard.old")  # a kill after the first rename
    (tmp_path / ".tensorboard.tmp").mkdir()  # and a half-written new folder
    rewrite_tensorboard(tmp_path / "tensorboard", 2)
    assert raw_points(tmp_path) == before[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]
