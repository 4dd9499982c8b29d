"""The stage runner: skip complete stages, resume partial ones, redo with force, chain re-runs."""
import sys

import pytest

from detectron2_ext.stages import Stage, StageError, format_timings, run_stages


def _writer(path, flag_file=None):
    """A stage command (python tool.py ...) that writes ``path`` and, if asked, its flags into ``flag_file``."""
    lines = ["import sys, pathlib"]
    if flag_file is not None:
        lines.append(f"pathlib.Path({str(flag_file)!r}).write_text(' '.join(sys.argv[1:]))")
    lines.append(f"pathlib.Path({str(path)!r}).write_text('done')")
    tool = path.with_name(f"{path.name}_tool.py")
    tool.write_text("\n".join(lines) + "\n")
    return [sys.executable, str(tool)]


def _stage(name, path, **kwargs):
    return Stage(name=name, command=_writer(path, kwargs.pop("flags", None)), is_complete=path.is_file, **kwargs)


def test_runs_then_skips_complete_stages(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    stages = [_stage("a", a), _stage("b", b)]
    assert [r.status for r in run_stages(stages, echo=lambda _: None)] == ["ran", "ran"]
    assert a.read_text() == b.read_text() == "done"
    assert [r.status for r in run_stages(stages, echo=lambda _: None)] == ["skipped", "skipped"]


def test_a_stage_that_runs_reruns_everything_after_it(tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "b_dir"
    out.mkdir()
    (out / "old").write_text("stale")
    b.write_text("old")
    stages = [_stage("a", a), _stage("b", b, outputs=[out])]
    assert [r.status for r in run_stages(stages, echo=lambda _: None)] == ["ran", "ran"]
    assert not out.exists(), "a re-run stage starts from clean outputs"


def test_force_passes_flags_and_partial_stages_resume(tmp_path):
    flags = tmp_path / "flags.txt"
    done = tmp_path / "done"
    stage = _stage("tool", done, flags=flags, force_args=["--force"], resume_args=["--resume"],
                   is_partial=lambda: True)
    assert run_stages([stage], echo=lambda _: None)[0].status == "resumed"
    assert flags.read_text() == "--resume"
    assert run_stages([stage], force=True, echo=lambda _: None)[0].status == "ran"
    assert flags.read_text() == "--force"


def test_failed_or_incomplete_stage_is_an_error(tmp_path):
    failing = Stage(name="bad", command=[sys.executable, "-c", "raise SystemExit(3)"], is_complete=lambda: False)
    with pytest.raises(StageError, match="'bad' failed with exit code 3"):
        run_stages([failing], echo=lambda _: None)
    silent = Stage(name="silent", command=[sys.executable, "-c", "pass"], is_complete=lambda: False)
    with pytest.raises(StageError, match="outputs are incomplete"):
        run_stages([silent], echo=lambda _: None)


def test_timings_table_lists_every_stage_and_the_total(tmp_path):
    results = run_stages([_stage("only", tmp_path / "x")], echo=lambda _: None)
    table = format_timings(results)
    assert "only" in table and "ran" in table and table.splitlines()[-1].startswith("total")
