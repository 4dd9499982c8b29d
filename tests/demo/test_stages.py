"""The stage runner: skip complete stages, resume partial ones, redo with force, re-run the
stages that read a re-run one, run independent stages side by side."""
import json
import os
import sys
import time

import pytest

from virtex_d2.pipeline.demo import (
    TIMINGS_HEADING,
    DemoSettings,
    add_timings_to_report,
    lvis_mask_ap,
)
from virtex_d2.pipeline.stages import (
    SideBySide,
    Stage,
    StageError,
    format_timings,
    run_stages,
    stages_to_run,
)


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


def test_a_stage_that_runs_reruns_only_the_later_stages_that_read_it(tmp_path):
    a, b, c, d = (tmp_path / n for n in "abcd")
    stages = [_stage("a", a), _stage("b", b, needs=()), _stage("c", c, needs=("b",)), _stage("d", d)]
    run_stages(stages, echo=lambda _: None)
    b.unlink()
    statuses = {r.name: r.status for r in run_stages(stages, echo=lambda _: None)}
    assert statuses == {"a": "skipped", "b": "ran", "c": "ran", "d": "ran"}, "d reads every earlier stage"
    a.unlink()
    statuses = {r.name: r.status for r in run_stages(stages, echo=lambda _: None)}
    assert statuses == {"a": "ran", "b": "skipped", "c": "skipped", "d": "ran"}


def test_stages_side_by_side_do_not_rerun_each_other(tmp_path):
    """Within a SideBySide group, one stage running does not make a complete sibling run again,
    even one that reads every earlier stage (needs None); the stage after the group does rerun."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    group = SideBySide([_stage("a", a), _stage("b", b)], log_dir=tmp_path / "logs")
    stages = [group, _stage("c", c)]
    b.write_text("done")
    c.write_text("done")
    assert stages_to_run(stages) == {"a", "c"}
    statuses = {r.name: r.status for r in run_stages(stages, echo=lambda _: None)}
    assert statuses == {"a": "ran", "b": "skipped", "c": "ran"}


def test_adding_an_init_to_a_finished_demo_runs_only_that_branch_and_the_report(tmp_path):
    """The demo's own stage graph, on the real runner: with every stage of a virtex/random demo
    complete, asking for the labels control as well trains, converts and fine-tunes only it, and
    rewrites the report; the finished fine-tunings are not redone."""
    from pathlib import Path

    from virtex_d2.pipeline.demo import build_stages

    settings = DemoSettings(checkout=Path(__file__).resolve().parents[2], output_dir=tmp_path,
                            inits=("virtex", "random", "labels"))
    groups = build_stages(settings)
    done = tmp_path / "done"
    done.mkdir()
    for stage in (st for item in groups for st in getattr(item, "stages", [item])):
        marker = done / stage.name
        stage.command, stage.is_complete, stage.outputs = _writer(marker), marker.is_file, []
        stage.outdated, stage.is_partial, stage.report = None, lambda: False, None
        if "labels" not in stage.name:
            marker.write_text("done")
    ran = [r.name for r in run_stages(groups, echo=lambda _: None) if r.status == "ran"]
    assert ran == ["pretrain_labels", "convert_labels", "finetune_lvis_labels", "report"]
    # A new dataset, in turn, redoes everything that reads it; the random init does not.
    (done / "dataset").unlink()
    skipped = [r.name for r in run_stages(groups, echo=lambda _: None) if r.status == "skipped"]
    assert skipped == ["convert_random"]


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


def _side_tool(tmp_path, name, body):
    tool = tmp_path / f"{name}_tool.py"
    tool.write_text("import os, pathlib, sys, time\n" + body)
    return [sys.executable, str(tool)]


def test_side_by_side_stages_run_at_once_with_a_share_of_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    stages = []
    for name, other in (("left", "right"), ("right", "left")):
        # Each waits for the other to have started: run one after the other, both would time out.
        body = (f"pathlib.Path({str(tmp_path / name)!r} + '.started').touch()\n"
                f"deadline = time.time() + 60\n"
                f"while not pathlib.Path({str(tmp_path / other)!r} + '.started').exists():\n"
                f"    if time.time() > deadline: sys.exit('{other} never started')\n"
                f"    time.sleep(0.05)\n"
                f"print('working on', {name!r})\n"
                f"pathlib.Path({str(tmp_path / name)!r}).write_text(os.environ['OMP_NUM_THREADS'])\n")
        stages.append(Stage(name=name, command=_side_tool(tmp_path, name, body),
                            is_complete=(tmp_path / name).is_file, progress=lambda: (1, 2)))
    logs = tmp_path / "logs"
    results = run_stages([_stage("first", tmp_path / "first"), SideBySide(stages, log_dir=logs)],
                         echo=lambda _: None)
    assert [(r.name, r.status) for r in results] == [("first", "ran"), ("left", "ran"), ("right", "ran")]
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert (tmp_path / "left").read_text() == (tmp_path / "right").read_text() == share
    assert (logs / "left.log").read_text().strip() == "working on left"
    # The total counts the side-by-side pair once, by the longer of the two.
    total = float(format_timings(results).splitlines()[-1].split()[-1])
    expected = results[0].seconds + max(results[1].seconds, results[2].seconds)
    assert total == pytest.approx(expected, abs=0.11)
    assert "(side by side)" in format_timings(results)
    # Complete side-by-side stages are skipped like any other.
    skipped = run_stages([SideBySide(stages, log_dir=logs)], echo=lambda _: None)
    assert [r.status for r in skipped] == ["skipped"] * 2
    assert "(side by side)" not in format_timings(skipped), "only stages that ran together are marked"


def test_a_failing_side_by_side_stage_stops_the_other_and_names_its_log(tmp_path):
    slow = Stage(name="slow", command=_side_tool(tmp_path, "slow", f"time.sleep(60)\npathlib.Path({str(tmp_path / 'slow')!r}).touch()\n"),
                 is_complete=(tmp_path / "slow").is_file)
    bad = Stage(name="bad", command=_side_tool(tmp_path, "bad", "print('boom')\nsys.exit(3)\n"), is_complete=lambda: False)
    start = time.perf_counter()
    with pytest.raises(StageError, match=r"'bad' failed with exit code 3 \(its output: .*bad\.log\)"):
        run_stages([SideBySide([slow, bad], log_dir=tmp_path / "logs")], echo=lambda _: None)
    assert time.perf_counter() - start < 30, "the other stage was stopped, not waited for"
    assert (tmp_path / "logs" / "bad.log").read_text().strip() == "boom"
    assert not (tmp_path / "slow").exists()


def test_outputs_made_otherwise_stop_the_run_unless_forced(tmp_path):
    done = tmp_path / "done"
    done.write_text("made with other settings")
    stage = _stage("tool", done, outdated=lambda: "made with seed 1")
    # Planning already stops (the demo plans before it estimates), and so does the runner.
    for plan_or_run in (stages_to_run, lambda stages: run_stages(stages, echo=lambda _: None)):
        with pytest.raises(StageError, match="stage 'tool': made with seed 1; nothing was changed. Pass --force"):
            plan_or_run([stage])
    assert done.read_text() == "made with other settings"
    assert run_stages([stage], force=True, echo=lambda _: None)[0].status == "ran"
    assert done.read_text() == "done"


def test_vit_backbone_runs_the_same_stages_with_the_vit_configs(tmp_path):
    from pathlib import Path

    from pretrain.errors import BadValueError
    from virtex_d2.pipeline.demo import DemoSettings, build_stages

    REPO = Path(__file__).resolve().parents[2]
    resnet, vit = (DemoSettings(checkout=REPO, output_dir=tmp_path, backbone=b) for b in ("resnet", "vit"))
    assert [getattr(st, "name", None) for st in build_stages(vit)] == [getattr(st, "name", None) for st in build_stages(resnet)]
    commands = {st.name: " ".join(map(str, st.command)) for st in build_stages(vit) if hasattr(st, "command")}
    assert "configs/builtin/bicaptioning_ViT_T_16_L1_H192.yaml" in commands["pretrain"]
    assert "lvis_segm_ViTDet_T_builtin.yaml" in commands["convert_virtex"]
    assert "virtex_ViT_T_16.pth" in commands["convert_virtex"]
    # The official random-init baseline of a ViT: the pretraining ViT at its image size, seeded.
    assert "--init random --vit vit_tiny_patch16_224 --image-size 128 --seed 0" in commands["convert_random"]
    assert vit.finetune_config.name == "lvis_segm_ViTDet_T_builtin.yaml"
    with pytest.raises(BadValueError, match="--backbone must be one of resnet, vit"):
        DemoSettings(backbone="swin")


def test_the_demo_report_gains_the_stage_timings_once_and_only_when_it_was_rewritten(tmp_path):
    settings = DemoSettings(output_dir=tmp_path)
    report_stage = Stage(name="report", command=_writer(tmp_path / "report.md"),
                         is_complete=(tmp_path / "report.md").is_file)
    results = run_stages([_stage("pretrain", tmp_path / "ckpt"), report_stage], echo=lambda _: None)
    (tmp_path / "report.json").write_text(json.dumps({"runs": {}}))
    assert add_timings_to_report(settings, results)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("done") and report.count(TIMINGS_HEADING) == 1
    assert format_timings(results) in report
    record = json.loads((tmp_path / "report.json").read_text())
    assert record["runs"] == {} and set(record["stage_seconds"]) == {"pretrain", "report"}
    assert record["stage_seconds"]["report"]["status"] == "ran"
    # A second run finds every stage complete: the report and its timings stay as they were.
    again = run_stages([_stage("pretrain", tmp_path / "ckpt"), report_stage], echo=lambda _: None)
    assert not add_timings_to_report(settings, again)
    assert (tmp_path / "report.md").read_text() == report


def test_the_demo_reads_mask_ap_and_a_run_that_detected_nothing_has_none(tmp_path):
    settings = DemoSettings(output_dir=tmp_path)
    for init, results in (("virtex", {"bbox": {"AP": float("nan")}}), ("random", {"segm": {"AP": 12.5}})):
        path = settings.finetune_dir(init) / "inference" / "lvis_v1_val" / "evaluation.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"dataset": "lvis_v1_val", "results": results, "detections": 0}))
    assert lvis_mask_ap(settings) == {"virtex": None, "random": 12.5}
