"""tools/train_net.py on the built-in dataset: the three downstream setups train a few iterations
on CPU and evaluate (COCO and LVIS Mask R-CNN R50-FPN, VOC Faster R-CNN R50-C4), COCO also over
2 gloo processes; eval-only reproduces a trained model's detections; the report's numbers are
the evaluators', and an evaluation that is not the end of its run's training is marked; a full
disk while a checkpoint is written is one line and leaves the previous checkpoint the newest.

Every run uses the real configs, shrunk further by overrides (128 px, 2 iterations, fewer test
detections) so the module fits in a few minutes on 2 shared cores.
"""
import errno
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from detectron2_ext import load_config
from detectron2_ext.transfer import convert_checkpoint_file
from pretrain.checkpoint_io import read_training_checkpoint
from tests.limits import file_size_limit
from virtex_d2.cli import DEBUG_VARIABLE
from virtex_d2.reports.downstream import read_run, write_report

REPO = Path(__file__).resolve().parents[2]
CPU_CONFIGS = REPO / "configs" / "detectron2" / "cpu"
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192", "INPUT.MIN_SIZE_TEST", "128",
         "INPUT.MAX_SIZE_TEST", "192", "SOLVER.MAX_ITER", "2", "TEST.DETECTIONS_PER_IMAGE", "20",
         "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]
NO_PRECISE_BN = ["TEST.PRECISE_BN.ENABLED", "False"]  # exercised once, in the 2-process run
COCO_METRICS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}
LVIS_METRICS = COCO_METRICS | {"APr", "APc", "APf"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train_net(config: str, output_dir: Path, *opts, launcher=(), timeout=900) -> subprocess.CompletedProcess:
    """Run tools/train_net.py; returns how it ended.

    The GPUs are hidden: these runs test the CPU path (device, SyncBN, DDP adaptations) and
    assert its effects, also on a machine that has a GPU.
    """
    command = [sys.executable, str(REPO / "tools" / "train_net.py"), *launcher,
               "--config-file", str(CPU_CONFIGS / config), *SMALL, *map(str, opts), "OUTPUT_DIR", str(output_dir)]
    env = {key: value for key, value in os.environ.items() if key != DEBUG_VARIABLE}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                            env={**env, "CUDA_VISIBLE_DEVICES": ""})
    result.args = " ".join(command)
    return result


def train_net(config: str, output_dir: Path, *opts, launcher=()):
    """Run tools/train_net.py to completion; returns the output directory."""
    result = run_train_net(config, output_dir, *opts, launcher=launcher)
    assert result.returncode == 0, f"{result.args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return output_dir


def evaluation(run: Path, dataset: str) -> dict:
    record = json.loads((run / "inference" / dataset / "evaluation.json").read_text())
    assert record["dataset"] == dataset
    assert isinstance(record["detections"], int) and record["detections"] >= 0  # what the model made
    return record


def metrics_lines(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.json").read_text().splitlines() if line.strip()]


def saved_config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def assert_trained_and_evaluated(run: Path, dataset: str, evaluator: str, tasks: dict):
    """Two finite training losses logged, then the evaluator's results, also in metrics.json."""
    lines = metrics_lines(run)
    losses = [line for line in lines if "total_loss" in line]
    assert losses and losses[-1]["iteration"] == 1 and math.isfinite(losses[-1]["total_loss"])
    record = evaluation(run, dataset)
    assert record["evaluator"] == evaluator
    assert (record["iteration"], record["max_iter"], record["weights"]) == (2, 2, None)  # at the end of training
    assert {task: {m for m in metrics if not m.startswith("AP-")} for task, metrics in record["results"].items()} == tasks
    flat = {k: v for line in lines for k, v in line.items() if "/" in k and k.split("/")[0] in tasks}
    for task, metrics in record["results"].items():
        for metric, value in metrics.items():
            assert same(flat[f"{task}/{metric}"], value), f"{task}/{metric}"
    assert (run / "model_final.pth").is_file()


@pytest.fixture(scope="module")
def converted_weights(tmp_path_factory) -> Path:
    """A ResNet-50 checkpoint in the official VirTex layout, converted by the library."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    state = {f"visual.cnn.{k}": v for k, v in torchvision.models.resnet50().state_dict().items()}
    torch.save({"model": state}, folder / "virtex.pth")
    targets = [(name, load_config(REPO / "configs" / "detectron2" / name))
               for name in ("coco_segm_default_init_2x.yaml", "voc_det_default_init_24k.yaml")]
    convert_checkpoint_file(folder / "virtex.pth", folder / "virtex_r50.pth", targets)
    return folder / "virtex_r50.pth"


@pytest.fixture(scope="module")
def coco_run(synthetic_root, converted_weights, tmp_path_factory):
    return train_net("coco_segm_default_init_cpu.yaml", tmp_path_factory.mktemp("coco_virtex"),
                     "MODEL.WEIGHTS", converted_weights, "VIRTEX.INIT_NAME", "virtex", *NO_PRECISE_BN)


@pytest.fixture(scope="module")
def coco_ddp_run(synthetic_root, tmp_path_factory):
    return train_net("coco_segm_default_init_cpu.yaml", tmp_path_factory.mktemp("coco_random_ddp"),
                     launcher=["--num-gpus", "2", "--dist-url", f"tcp://127.0.0.1:{free_port()}"])


@pytest.fixture(scope="module")
def lvis_run(synthetic_root, tmp_path_factory):
    return train_net("lvis_segm_default_init_cpu.yaml", tmp_path_factory.mktemp("lvis_random"), *NO_PRECISE_BN)


@pytest.fixture(scope="module")
def voc_run(synthetic_root, converted_weights, tmp_path_factory):
    return train_net("voc_det_default_init_cpu.yaml", tmp_path_factory.mktemp("voc_virtex"),
                     "MODEL.WEIGHTS", converted_weights, "VIRTEX.INIT_NAME", "virtex", *NO_PRECISE_BN)


def test_coco_from_converted_weights(coco_run, converted_weights):
    assert_trained_and_evaluated(coco_run, "coco_2017_val", "COCOEvaluator", {"bbox": COCO_METRICS, "segm": COCO_METRICS})
    cfg = saved_config(coco_run)
    assert (cfg["MODEL"]["DEVICE"], cfg["MODEL"]["RESNETS"]["NORM"], cfg["MODEL"]["FPN"]["NORM"]) == ("cpu", "SyncBN", "SyncBN")
    log = (coco_run / "log.txt").read_text()
    assert f"Loading from {converted_weights}" in log
    assert "matched with submodule backbone.bottom_up - Total num: 53" in log  # 53 conv+norm modules


def test_coco_two_gloo_processes_with_naive_syncbn(coco_ddp_run):
    assert_trained_and_evaluated(coco_ddp_run, "coco_2017_val", "COCOEvaluator",
                                 {"bbox": COCO_METRICS, "segm": COCO_METRICS})
    cfg = saved_config(coco_ddp_run)
    assert (cfg["MODEL"]["RESNETS"]["NORM"], cfg["MODEL"]["FPN"]["NORM"]) == ("naiveSyncBN", "naiveSyncBN")
    assert cfg["VIRTEX"]["INIT_NAME"] == "random"
    log = (coco_ddp_run / "log.txt").read_text()
    assert "compat: no CUDA, detectron2's DDP wrapper gets device_ids=None" in log
    assert "compat: 2 local processes without CUDA" in log
    assert "Running precise-BN for 2 iterations" in log
    assert "on 2 devices" in log  # inference was shared by both processes


def test_lvis_random_init(lvis_run):
    assert_trained_and_evaluated(lvis_run, "lvis_v1_val", "LVISEvaluator", {"bbox": LVIS_METRICS, "segm": LVIS_METRICS})
    cfg = saved_config(lvis_run)
    assert cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 1203
    assert cfg["DATALOADER"]["SAMPLER_TRAIN"] == "RepeatFactorTrainingSampler"
    log = (lvis_run / "log.txt").read_text()
    assert "compat: set np.float = float for lvis" in log
    # The launcher re-executed itself with tcmalloc (or tuned glibc), as tools/pretrain.py does.
    assert "allocator: tcmalloc" in log or "allocator: glibc-tuned" in log


def test_voc_c4_with_extra_norm(voc_run, converted_weights):
    assert_trained_and_evaluated(voc_run, "voc_2007_test", "PascalVOCDetectionEvaluator",
                                 {"bbox": {"AP", "AP50", "AP75"}})
    cfg = saved_config(voc_run)
    assert cfg["MODEL"]["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"
    assert cfg["DATASETS"]["TRAIN"] == ["voc_2007_trainval", "voc_2012_trainval"]
    weights = torch.load(voc_run / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert weights["roi_heads.res5.norm.weight"].shape == (2048,)
    assert f"Loading from {converted_weights}" in (voc_run / "log.txt").read_text()


def test_eval_only_reproduces_the_trained_model(coco_run, tmp_path):
    train_net("coco_segm_default_init_cpu.yaml", tmp_path, "MODEL.WEIGHTS", coco_run / "model_final.pth",
              launcher=["--eval-only"])
    record = evaluation(tmp_path, "coco_2017_val")  # of another run's weights, after its 2 iterations
    assert (record["iteration"], record["max_iter"], record["weights"]) == (2, 2, str(coco_run / "model_final.pth"))
    name = "inference/coco_2017_val/coco_instances_results.json"
    trained, reloaded = (json.loads((run / name).read_text()) for run in (coco_run, tmp_path))
    assert len(trained) == len(reloaded) > 0
    def key(d):
        return d["image_id"], d["category_id"], round(d["score"], 4)

    for a, b in zip(sorted(trained, key=key), sorted(reloaded, key=key)):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)


def test_report_matches_the_evaluators(coco_run, coco_ddp_run, lvis_run, voc_run, tmp_path):
    command = [sys.executable, str(REPO / "tools" / "report.py"), str(coco_run), str(coco_ddp_run), str(lvis_run),
               f"virtex-voc={voc_run}", "--output", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["datasets"]["coco_2017_val"]["mask"]) == {"virtex", "random"}  # side by side
    expected_runs = [(coco_run, "coco_2017_val", "virtex"), (coco_ddp_run, "coco_2017_val", "random"),
                     (lvis_run, "lvis_v1_val", "random"), (voc_run, "voc_2007_test", "virtex-voc")]
    for run, dataset, label in expected_runs:
        flat = {k: v for line in metrics_lines(run) for k, v in line.items() if "/" in k}
        tasks = report["datasets"][dataset]
        for task_key, task in (("bbox", "box"), ("segm", "mask")):
            if f"{task_key}/AP" not in flat:
                assert task not in tasks
                continue
            row = tasks[task][label]
            assert set(row) == {k.split("/")[1] for k in flat if k.startswith(task_key + "/") and "-" not in k}
            for metric, value in row.items():
                expected = flat[f"{task_key}/{metric}"]
                assert (value is None and math.isnan(expected)) or value == expected, (dataset, task, metric)
    assert {"APr", "APc", "APf"} <= set(report["datasets"]["lvis_v1_val"]["mask"]["random"])
    assert all(run["caveats"] == {} for run in report["runs"].values())  # each is its run's result
    assert "†" not in (tmp_path / "report.md").read_text()
    for png in ("loss_curves.png", "lvis_v1_val_ap_by_frequency.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "## lvis_v1_val: mask AP" in (tmp_path / "report.md").read_text()


STALE_TEMPORARY = ".model_0000001.pth.0123456789abcdef.tmp"  # what a save killed mid-write leaves


@pytest.fixture(scope="module")
def stopped_run(coco_run, tmp_path_factory):
    """``coco_run`` (2 iterations) resumed towards ``SOLVER.MAX_ITER 5`` under a 32 MiB file size
    limit: it evaluates after its 3rd iteration (``TEST.EVAL_PERIOD 3``), then its checkpoint after
    the 4th (``SOLVER.CHECKPOINT_PERIOD 4``) does not fit and the run stops, as a full disk stops
    it. Returns the folder and how train_net ended."""
    run = tmp_path_factory.mktemp("coco_stopped")
    shutil.copy(coco_run / "model_final.pth", run)  # a copy: nothing may write through to coco_run
    (run / "last_checkpoint").write_text("model_final.pth")
    (run / STALE_TEMPORARY).write_bytes(b"\0" * 1024)
    with file_size_limit(32 * 2**20):
        result = run_train_net("coco_segm_default_init_cpu.yaml", run, "SOLVER.MAX_ITER", 5, "SOLVER.CHECKPOINT_PERIOD", 4,
                               "TEST.EVAL_PERIOD", 3, *NO_PRECISE_BN, launcher=["--resume"])
    return run, result


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_previous_one(stopped_run):
    """fvcore wrote checkpoints in place: the run ended in torch's "[enforce fail at
    inline_container.cc] unexpected pos" traceback and left a truncated model_0000003.pth, which
    ``last_checkpoint`` would name once a later save got through; detectron2's training loop also
    logged the error's traceback on stdout."""
    run, result = stopped_run
    assert result.returncode == 1, f"{result.args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stdout + result.stderr and "inline_container" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"train_net: error: file size limit reached while writing {run / 'model_0000003.pth'}: File too large; "
        f"nothing was written, the previous checkpoint {run / 'model_final.pth'} is intact; "
        "raise the limit (ulimit -f) or choose another output")
    assert sorted(path.name for path in run.glob("*.pth*")) == ["model_final.pth"]
    assert not list(run.glob(".*.tmp")), "the temporaries of this save and of a killed one are gone"
    assert (run / "last_checkpoint").read_text() == "model_final.pth"
    assert read_training_checkpoint(run / "model_final.pth")["iteration"] == 1  # coco_run's, intact
    # detectron2's training loop logs the error it raises again: in one line, also in log.txt
    assert f"Exception during training: [Errno {errno.EFBIG}] {run / 'model_0000003.pth'}: File too large;" in (
        run / "log.txt").read_text()


def test_a_periodic_evaluation_left_by_a_stopped_run_is_marked_in_the_report(stopped_run, tmp_path):
    run, _ = stopped_run
    record = evaluation(run, "coco_2017_val")
    assert (record["iteration"], record["max_iter"], record["weights"]) == (3, 5, None)
    write_report([read_run(run, "stopped")], tmp_path)  # what tools/report.py writes and prints
    markdown = (tmp_path / "report.md").read_text()
    assert "| stopped † |" in markdown
    assert "† **stopped** on coco_2017_val: evaluated after 3 iterations of SOLVER.MAX_ITER 5: not the end of training." in markdown


def test_a_rank_meeting_a_bad_image_ends_a_two_process_run_with_one_line(synthetic_root, tmp_path, monkeypatch):
    """Every training image cut in half (past the header the dataset check reads): both ranks fail
    decoding in their first and only iteration. It was torch multiprocessing's traceback of one
    rank, status 1, after that rank had evaluated and written model_final.pth (detectron2 took
    the failed last iteration for the end of training), or a hang in the evaluation's collectives
    while the other rank waited in training's."""
    root = tmp_path / "datasets"
    shutil.copytree(synthetic_root, root)
    for image in (root / "coco" / "train2017").glob("*.jpg"):
        image.write_bytes(image.read_bytes()[:image.stat().st_size // 2])
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    run = tmp_path / "run"
    result = run_train_net("coco_segm_default_init_cpu.yaml", run, "SOLVER.MAX_ITER", 1, *NO_PRECISE_BN, timeout=120,
                           launcher=["--num-gpus", "2", "--dist-url", f"tcp://127.0.0.1:{free_port()}"])
    assert result.returncode == 2, f"{result.args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stdout + result.stderr
    told = [line for line in result.stderr.splitlines() if line.startswith("train_net: error:")]
    assert told == [result.stderr.strip().splitlines()[-1]], "one line, once, last"
    assert re.fullmatch(rf"train_net: error: {re.escape(str(root))}/coco/train2017/\d+\.jpg: cannot read image "
                        r"\(image file is truncated .*\); replace the file or remove its entry from the dataset", told[0])
    assert not list(run.glob("*.pth")) and not (run / "inference").exists()


def own_coco_export(synthetic_root: Path, split: str, folder: Path, names: dict[int, str]) -> Path:
    """The built-in ``split`` as an annotation tool exports a dataset with its own classes: only
    the categories in ``names`` (built-in id -> own name), numbered from 0 as Roboflow does."""
    data = json.loads((synthetic_root / "coco" / "annotations" / f"instances_{split}2017.json").read_text())
    own_id = {builtin: i for i, builtin in enumerate(names)}
    data["categories"] = [{"id": own_id[c], "name": name, "supercategory": "shape"} for c, name in names.items()]
    data["annotations"] = [{**a, "category_id": own_id[a["category_id"]]} for a in data["annotations"]
                           if a["category_id"] in own_id]
    path = folder / f"{split}.json"
    path.write_text(json.dumps(data))
    return path


def test_a_coco_export_with_its_own_classes_trains_and_evaluates(synthetic_root, tmp_path):
    data = json.loads((synthetic_root / "coco" / "annotations" / "instances_train2017.json").read_text())
    common = [c for c, _ in Counter(a["category_id"] for a in data["annotations"]).most_common(3)]
    names = dict(zip(common, ["widget", "gadget", "gizmo"]))
    datasets = [[f"shapes_{split}", str(own_coco_export(synthetic_root, split, tmp_path, names)),
                 str(synthetic_root / "coco" / f"{split}2017")] for split in ("train", "val")]
    run = train_net("coco_segm_default_init_cpu.yaml", tmp_path / "run", "VIRTEX.COCO_DATASETS", repr(datasets),
                    "DATASETS.TRAIN", "('shapes_train',)", "DATASETS.TEST", "('shapes_val',)",
                    "MODEL.ROI_HEADS.NUM_CLASSES", "3", *NO_PRECISE_BN)
    assert_trained_and_evaluated(run, "shapes_val", "COCOEvaluator", {"bbox": COCO_METRICS, "segm": COCO_METRICS})
    per_class = evaluation(run, "shapes_val")["results"]["segm"]
    assert {"AP-widget", "AP-gadget", "AP-gizmo"} <= set(per_class)


def resumable_copy(run: Path, folder: Path) -> Path:
    """A folder holding ``run``'s final checkpoint, its tag and its config.yaml: a run to resume."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model_final.pth", "last_checkpoint", "config.yaml"):
        shutil.copy(run / name, folder / name)
    return folder


def test_a_resume_under_changed_solver_values_warns_and_trains_with_them(coco_run, converted_weights, tmp_path):
    """detectron2 wrote the new config.yaml over the run's and then trained on with the saved
    learning rate and weight decay, without a word. Now the changed keys are named and the new
    values are the ones used: the rate logged at the last iteration is detectron2's schedule of
    the new base rate at that iteration."""
    from detectron2.solver import build_lr_scheduler

    run = resumable_copy(coco_run, tmp_path / "run")
    assert saved_config(run)["SOLVER"]["BASE_LR"] == 0.0025
    changed = ["SOLVER.MAX_ITER", "4", "SOLVER.BASE_LR", "0.01", "SOLVER.WEIGHT_DECAY", "0.001", "DATASETS.TEST", "()"]
    train_net("coco_segm_default_init_cpu.yaml", run, "MODEL.WEIGHTS", converted_weights, "VIRTEX.INIT_NAME", "virtex",
              *NO_PRECISE_BN, *changed, launcher=["--resume"])
    log = (run / "log.txt").read_text()
    warning = next(line for line in log.splitlines() if "continues with another recipe" in line)
    for change in ("SOLVER.BASE_LR: 0.0025 -> 0.01", "SOLVER.MAX_ITER: 2 -> 4", "SOLVER.WEIGHT_DECAY: 0.0001 -> 0.001"):
        assert change in warning
    cfg = load_config(CPU_CONFIGS / "coco_segm_default_init_cpu.yaml", [*SMALL, *changed])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    schedule = build_lr_scheduler(cfg, optimizer)
    for _ in range(3):
        optimizer.step()
        schedule.step()
    (last,) = [line for line in metrics_lines(run) if line.get("iteration") == 3 and "lr" in line]
    assert last["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
    groups = torch.load(run / "model_final.pth", weights_only=True)["trainer"]["_trainer"]["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} <= {0.001, 0.0} and any(g["weight_decay"] == 0.001 for g in groups)


def test_a_resume_from_other_weights_is_refused_in_one_line(coco_run, tmp_path):
    """It would report the old run's numbers under the new init's name."""
    from detectron2_ext.resume import check_resume
    from pretrain.errors import BadValueError

    run = resumable_copy(coco_run, tmp_path / "run")
    cfg = load_config(CPU_CONFIGS / "coco_segm_default_init_cpu.yaml", ["OUTPUT_DIR", str(run), "MODEL.WEIGHTS", "r18.pth",
                                                                        "VIRTEX.INIT_NAME", "imagenet"])
    with pytest.raises(BadValueError) as caught:
        check_resume(cfg)
    message = str(caught.value)
    assert message.startswith(f"{run}: --resume would continue the run trained from other weights (MODEL.WEIGHTS: ")
    assert "-> r18.pth" in message and "VIRTEX.INIT_NAME: virtex -> imagenet" in message
    assert check_resume(load_config(CPU_CONFIGS / "coco_segm_default_init_cpu.yaml", ["OUTPUT_DIR", str(tmp_path / "new")])) == ([], [])


def test_a_resume_into_a_folder_with_a_damaged_config_yaml_is_refused_in_one_line(tmp_path):
    from detectron2_ext.resume import check_resume
    from pretrain.errors import BadValueError

    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    (tmp_path / "config.yaml").write_text("MODEL: [unclosed\n")
    cfg = load_config(CPU_CONFIGS / "coco_segm_default_init_cpu.yaml", ["OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(BadValueError, match=rf"^{tmp_path / 'config.yaml'}: not a readable config \(.*\); restore"):
        check_resume(cfg)
