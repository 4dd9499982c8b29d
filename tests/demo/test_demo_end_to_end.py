"""A reduced `make demo` end to end: every stage through the real tools, then a re-run that skips.

Small enough for CI (a few dozen images, a handful of iterations); the full-size demo's numbers
are in docs/demo.md. The report's numbers must be the evaluators' own (evaluation.json).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REDUCED = ["--num-train", "24", "--num-val", "4", "--pretrain-iters", "6", "--finetune-iters", "4", "--num-captions", "2"]


def _demo(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tools" / "demo.py"), "--data-root", str(tmp / "data"),
               "--output-dir", str(tmp / "demo"), *REDUCED, *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    first = _demo(tmp)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return tmp, first


def _mask_row(report: str, label: str) -> list:
    section = report.split("lvis_v1_val: mask AP")[1]
    row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in row.strip("|").split("|")[1:]]


STAGES = ["dataset", "vocabulary", "pretrain", "captions", "caption_eval", "attention", "convert_virtex",
          "convert_random", "finetune_lvis_virtex", "finetune_lvis_random", "report"]


def test_every_stage_runs_and_the_report_quotes_the_evaluators(demo_run):
    tmp, run = demo_run
    stages = re.findall(r"^\[(\d+)/11\] (\w+): ", run.stdout, flags=re.MULTILINE)
    assert [name for _, name in stages] == STAGES
    assert re.search(r"On this CPU the 11 stages to run take about \d+ minutes", run.stdout)
    assert "model:" in run.stdout and "reference:" in run.stdout, "captions are printed beside references"
    assert re.search(r"Val captions naming a class the image shows: \d+%; naming one it does not show: \d+%", run.stdout)
    assert "running finetune_lvis_virtex and finetune_lvis_random side by side" in run.stdout
    for label in ("virtex", "random"):  # the side-by-side fine-tunes write their output to logs/
        assert "Evaluation results for segm" in (tmp / "demo" / "logs" / f"finetune_lvis_{label}.log").read_text()
    assert "Stage timings" in run.stdout
    report = (tmp / "demo" / "report.md").read_text()
    timings = report.split("# Time per stage")[1]  # the report states each stage's time
    assert all(re.search(rf"^{name} +ran +\d+\.\d", timings, flags=re.MULTILINE) for name in STAGES)
    for label in ("virtex", "random"):
        record = json.loads((tmp / "demo" / f"lvis_{label}" / "inference" / "lvis_v1_val" / "evaluation.json").read_text())
        ap = record["results"]["segm"]["AP"]
        assert _mask_row(report, label)[0] == f"{ap:.1f}"
        assert f"{label} init {ap:.2f}" in run.stdout
    assert "# Pretraining" in report and "Example captions" in report
    # What the captions name, as eval_captioning counted it, and the attention maps, linked from the report.
    naming = json.loads((tmp / "demo" / "caption_eval_val.json").read_text())["class_naming"]
    assert f"Captions naming a class the image shows: **{naming['names_present']:.0%}**" in report
    grids = sorted((tmp / "demo" / "attention").glob("*_attention.png"))
    assert grids and all(f"![attention](attention/{g.name})" in report for g in grids)
    for png in ("pretraining_loss.png", "loss_curves.png", "lvis_v1_val_ap_by_frequency.png"):
        assert (tmp / "demo" / png).stat().st_size > 0
    import torch

    for init in ("virtex", "random"):  # VirTex's backbone and the official random-init baseline, converted
        assert "model" in torch.load(tmp / "demo" / f"{init}_R_18.pth", weights_only=True)


def test_rerun_skips_complete_stages_and_force_redoes_one(demo_run):
    tmp, _ = demo_run
    again = _demo(tmp)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("outputs complete, skipped") == len(STAGES)
    # An interrupted fine-tuning (evaluation missing, checkpoint present) resumes; later stages rerun.
    (tmp / "demo" / "lvis_random" / "inference" / "lvis_v1_val" / "evaluation.json").unlink()
    resumed = _demo(tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"\[10/11\] finetune_lvis_random: .*train_net\.py --resume", resumed.stdout)
    assert re.search(r"\[11/11\] report: ", resumed.stdout)
    assert "[9/11] finetune_lvis_virtex: outputs complete" in resumed.stdout


def test_outputs_of_another_config_stop_the_rerun_untouched(demo_run):
    tmp, _ = demo_run
    pretrain_dir = tmp / "demo" / "pretrain"
    before = sorted(p.name for p in pretrain_dir.iterdir())
    longer = _demo(tmp, "--pretrain-iters", "7")  # would otherwise resume the 6-iteration cosine run
    assert longer.returncode == 1
    assert "OPTIM.NUM_ITERATIONS: 6 -> 7" in longer.stderr and "--force" in longer.stderr
    assert "checkpoint_6.pth does not match the demo's pretraining config" in longer.stderr
    assert sorted(p.name for p in pretrain_dir.iterdir()) == before


def test_labels_control_and_detectron2_init_are_rows_of_their_own(tmp_path):
    """--inits adds the labels control (its own pretraining on the class labels, converted like
    VirTex's) and detectron2's own init; each is fine-tuned and reported."""
    run = _demo(tmp_path, "--inits", "labels", "default", "virtex", "random")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stages = re.findall(r"^\[\d+/15\] (\w+): ", run.stdout, flags=re.MULTILINE)
    assert stages[6:-1] == ["pretrain_labels", "convert_virtex", "convert_random", "convert_labels",
                          "finetune_lvis_virtex", "finetune_lvis_random", "finetune_lvis_labels",
                          "finetune_lvis_default"]
    report = (tmp_path / "demo" / "report.md").read_text()
    for label in ("virtex", "random", "labels", "default"):
        assert _mask_row(report, label)
    config = (tmp_path / "demo" / "pretrain_labels" / "config.yaml").read_text()
    assert "multilabel_classification" in config
    assert "CLASSIFICATION_LOSS: binary_cross_entropy" in config  # the loss that passes the supervised check


def test_a_labels_control_without_a_config_is_refused_before_any_stage(tmp_path):
    run = _demo(tmp_path, "--backbone", "vit", "--inits", "virtex", "labels")
    assert run.returncode == 2
    assert "--inits labels: there is no labels control for --backbone vit" in run.stderr
    assert not (tmp_path / "data").exists()
