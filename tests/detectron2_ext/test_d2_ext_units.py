"""detectron2_ext without training: configs, registered head, runtime adaptations, dataset checks
and the report built from crafted evaluator outputs."""
import json
import logging
import math
import re
from pathlib import Path

import detectron2.engine.defaults as d2_defaults
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.modeling import ROI_HEADS_REGISTRY, build_model
from detectron2.structures import Boxes, Instances
from PIL import Image

from detectron2_ext import load_config
from detectron2_ext.compat import (
    adapt_config_to_devices,
    patch_cpu_ddp,
    patch_lvis_numpy,
)
from detectron2_ext.datasets import check_dataset_files, check_datasets_root
from detectron2_ext.evaluation import EvaluatedModel, SavedResultsEvaluator
from tests.tool_main import Tool
from virtex_d2.reports.downstream import read_run, write_report

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "detectron2"
TORCHVISION_MEAN = [123.675, 116.28, 103.53]
TORCHVISION_STD = [58.395, 57.12, 57.375]


def test_configs_follow_the_virtex_protocol():
    coco = load_config(CONFIGS / "coco_segm_default_init_2x.yaml")
    for cfg in (coco, load_config(CONFIGS / "voc_det_default_init_24k.yaml")):
        assert (cfg.MODEL.RESNETS.NORM, cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.RESNETS.STRIDE_IN_1X1) == ("SyncBN", 0, False)
        assert cfg.INPUT.FORMAT == "RGB" and cfg.TEST.PRECISE_BN.ENABLED
        assert cfg.MODEL.PIXEL_MEAN == TORCHVISION_MEAN and cfg.MODEL.PIXEL_STD == TORCHVISION_STD
        assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.MODEL.WEIGHTS) == (16, 0.02, "")
    assert coco.MODEL.FPN.NORM == "SyncBN" and coco.MODEL.MASK_ON
    assert (coco.SOLVER.MAX_ITER, coco.SOLVER.STEPS) == (180000, (120000, 160000))
    assert coco.DATASETS.TRAIN == ("coco_2017_train",) and coco.DATASETS.TEST == ("coco_2017_val",)

    lvis = load_config(CONFIGS / "lvis_segm_default_init_2x.yaml")
    assert lvis.DATASETS.TRAIN == ("lvis_v1_train",) and lvis.DATASETS.TEST == ("lvis_v1_val",)
    assert lvis.MODEL.ROI_HEADS.NUM_CLASSES == 1203 and lvis.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 1e-4
    assert lvis.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler" and lvis.DATALOADER.REPEAT_THRESHOLD == 0.001
    assert lvis.TEST.DETECTIONS_PER_IMAGE == 300
    imagenet = load_config(CONFIGS / "lvis_segm_imagenet_init_2x.yaml")
    assert imagenet.MODEL.RESNETS.NORM == "FrozenBN" and imagenet.VIRTEX.INIT_NAME == "imagenet"

    voc = load_config(CONFIGS / "voc_det_default_init_24k.yaml")
    assert voc.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and voc.MODEL.BACKBONE.NAME == "build_resnet_backbone"
    assert voc.DATASETS.TRAIN == ("voc_2007_trainval", "voc_2012_trainval") and voc.DATASETS.TEST == ("voc_2007_test",)
    assert (voc.SOLVER.MAX_ITER, voc.SOLVER.STEPS, voc.SOLVER.WARMUP_ITERS) == (24000, (18000, 22000), 100)
    assert voc.MODEL.ROI_HEADS.NUM_CLASSES == 20 and not voc.MODEL.MASK_ON


@pytest.mark.parametrize("name", ["coco_segm", "lvis_segm", "voc_det"])
def test_cpu_configs_keep_model_and_data(name):
    full = load_config(next(CONFIGS.glob(f"{name}_default_init_*.yaml")))
    cpu = load_config(CONFIGS / "cpu" / f"{name}_default_init_cpu.yaml")
    for key in ("MODEL.META_ARCHITECTURE", "MODEL.BACKBONE", "MODEL.RESNETS", "MODEL.FPN", "MODEL.ROI_HEADS.NAME",
                "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.PIXEL_MEAN", "DATASETS", "INPUT.FORMAT"):
        node_full, node_cpu = full, cpu
        for part in key.split("."):
            node_full, node_cpu = node_full[part], node_cpu[part]
        assert node_full == node_cpu, key
    assert cpu.SOLVER.IMS_PER_BATCH == 2 and cpu.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 64


@pytest.fixture
def without_cuda(monkeypatch):
    """The CPU-only machine these adaptations are for, also on a machine with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_multiprocess_cpu_uses_naive_syncbn_also_in_the_extra_norm(without_cuda):
    cfg = load_config(CONFIGS / "voc_det_default_init_24k.yaml")
    adapt_config_to_devices(cfg, world_size=2)
    assert cfg.MODEL.DEVICE == "cpu" and cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
    assert "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY
    model = build_model(cfg)
    assert isinstance(model.roi_heads.res5.norm, NaiveSyncBatchNorm)
    assert isinstance(model.backbone.stem.conv1.norm, NaiveSyncBatchNorm)

    single = load_config(CONFIGS / "coco_segm_default_init_2x.yaml")
    adapt_config_to_devices(single, world_size=1)
    assert (single.MODEL.RESNETS.NORM, single.MODEL.FPN.NORM) == ("SyncBN", "SyncBN")
    frozen = load_config(CONFIGS / "voc_det_default_init_24k.yaml", ["MODEL.RESNETS.NORM", "FrozenBN"])
    frozen.MODEL.DEVICE = "cpu"
    assert isinstance(build_model(frozen).roi_heads.res5.norm, FrozenBatchNorm2d)


def test_cpu_ddp_patch_passes_no_device_ids(without_cuda, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(d2_defaults, "create_ddp_model", lambda model, **kw: calls.append(kw) or model)
    with caplog.at_level(logging.INFO, logger="detectron2_ext.compat"):
        patch_cpu_ddp()
    d2_defaults.create_ddp_model(torch.nn.Linear(1, 1), broadcast_buffers=False)
    assert calls == [{"device_ids": None, "broadcast_buffers": False}]
    assert "device_ids=None" in caplog.text


def test_with_cuda_the_config_and_ddp_are_left_alone(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(CONFIGS / "voc_det_default_init_24k.yaml")
    adapt_config_to_devices(cfg, world_size=2)
    assert (cfg.MODEL.DEVICE, cfg.MODEL.RESNETS.NORM) == ("cuda", "SyncBN")
    original = d2_defaults.create_ddp_model
    monkeypatch.setattr(d2_defaults, "create_ddp_model", original)  # restored after, whatever happens
    patch_cpu_ddp()
    assert d2_defaults.create_ddp_model is original


def test_lvis_numpy_shim_is_visible(monkeypatch, caplog):
    monkeypatch.delattr(np, "float", raising=False)
    try:
        with caplog.at_level(logging.INFO, logger="detectron2_ext.compat"):
            patch_lvis_numpy()
        assert np.float is float
        assert "np.float = float for lvis" in caplog.text
    finally:
        if "float" in vars(np):
            del np.float


def test_dataset_root_and_files_are_checked(monkeypatch, tmp_path):
    check_datasets_root()  # tests/conftest.py set DETECTRON2_DATASETS before detectron2 was imported
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(RuntimeError, match="must be set before detectron2.data is imported"):
        check_datasets_root()
    MetadataCatalog.get("virtex_test_missing").set(json_file=str(tmp_path / "nope.json"), image_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="(?s)resolve under DETECTRON2_DATASETS.*virtex_test_missing: json_file .*nope.json"):
        check_dataset_files(["virtex_test_missing"])
    # A dataset of one's own names its files itself: the hint about the variable does not apply.
    own = ["virtex_test_own", str(tmp_path / "own.json"), str(tmp_path / "images")]
    load_config(CONFIGS / "cpu" / "coco_segm_default_init_cpu.yaml", ["VIRTEX.COCO_DATASETS", repr([own])])
    with pytest.raises(FileNotFoundError) as missing:
        check_dataset_files(["virtex_test_own"])
    assert str(missing.value) == (f"dataset files not found:\n  virtex_test_own: json_file {own[1]}\n  "
                                  f"virtex_test_own: image_root {own[2]}")


AT_THE_END = {"iteration": 2, "max_iter": 2, "weights": None}  # what a finished run's evaluation records


def make_run(directory: Path, init: str, dataset: str, results: dict, losses, evaluated=AT_THE_END, **record) -> Path:
    (directory / "inference" / dataset).mkdir(parents=True)
    (directory / "inference" / dataset / "evaluation.json").write_text(
        json.dumps({"dataset": dataset, "evaluator": "X", "results": results, **evaluated, **record}))
    (directory / "config.yaml").write_text(f"VIRTEX:\n  INIT_NAME: {init}\n")
    (directory / "metrics.json").write_text("\n".join(json.dumps({"iteration": i, "total_loss": v}) for i, v in losses))
    return directory


def test_a_killed_and_resumed_runs_metrics_give_its_curve_and_the_report(tmp_path, caplog):
    """detectron2 appends metrics.json line by line: a run killed mid-write leaves a cut line,
    and its --resume logs the iterations after the checkpoint again (the report crashed with a
    JSONDecodeError traceback on the first, and drew the second as a curve going back)."""
    run = make_run(tmp_path / "a", "virtex", "voc_2007_test", {"bbox": {"AP": 50.0}}, [(19, 3.0), (39, 2.5)])
    with open(run / "metrics.json", "a") as handle:  # killed mid-line, resumed from iteration 20
        handle.write('\n{"iteration": 59, "total_lo\n' + json.dumps({"iteration": 39, "total_loss": 2.0}) + "\n")
    caplog.set_level(logging.WARNING)
    assert read_run(run).losses == [(19, 3.0), (39, 2.0)]
    assert f"{run / 'metrics.json'}: line 3 is not JSON" in caplog.text
    assert Tool("report").main([str(run), "--output", str(tmp_path / "report")]) == 0


def test_report_from_crafted_runs(tmp_path):
    lvis_metrics = {"AP": 23.0, "AP50": 35.4, "AP75": 24.3, "APs": 15.1, "APm": 30.2, "APl": -100.0,
                    "APr": 12.5, "APc": 21.7, "APf": 28.9, "AP-person": 1.0}
    runs = [
        read_run(make_run(tmp_path / "a", "virtex", "lvis_v1_val", {"segm": lvis_metrics, "bbox": dict(lvis_metrics, AP=25.5)},
                          [(19, 3.0), (39, 2.0)])),
        read_run(make_run(tmp_path / "b", "random", "lvis_v1_val", {"segm": dict(lvis_metrics, AP=17.4, APr=math.nan)},
                          [(19, 3.5)])),
        read_run(make_run(tmp_path / "c", "random", "voc_2007_test", {"bbox": {"AP": 55.3, "AP50": 81.3, "AP75": 61.0}}, []),
                 label="rand-voc"),
    ]
    paths = write_report(runs, tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["datasets"]["lvis_v1_val"]["mask"]["virtex"]["APr"] == 12.5
    assert report["datasets"]["lvis_v1_val"]["box"]["virtex"]["AP"] == 25.5
    assert report["datasets"]["lvis_v1_val"]["mask"]["random"]["APr"] is None
    assert "AP-person" not in report["datasets"]["lvis_v1_val"]["mask"]["virtex"]
    assert report["datasets"]["voc_2007_test"]["box"] == {"rand-voc": {"AP": 55.3, "AP50": 81.3, "AP75": 61.0}}
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| virtex | 23.0 | 35.4 | 24.3 | 15.1 | 30.2 | – | 12.5 | 21.7 | 28.9 |" in markdown
    assert "| random | 17.4 | 35.4 | 24.3 | 15.1 | 30.2 | – | – | 21.7 | 28.9 |" in markdown
    assert sorted(p.name for p in paths) == ["loss_curves.png", "lvis_v1_val_ap_by_frequency.png", "report.json", "report.md"]
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError, match="--force"):
        write_report(runs, tmp_path / "report")
    with pytest.raises(ValueError, match="two runs labelled 'virtex' evaluate lvis_v1_val"):
        write_report([runs[0], read_run(tmp_path / "a")], tmp_path / "report2")


def test_a_run_without_detections_is_named_in_the_report(tmp_path):
    """LVISEvaluator returns NaN box AP and leaves the mask task out when a model detects nothing:
    the report says so, instead of only 'not computable'."""
    nan_box = {"bbox": {m: math.nan for m in ("AP", "AP50", "APr")}}
    runs = [read_run(make_run(tmp_path / "a", "virtex", "lvis_v1_val", nan_box, [], detections=0)),
            read_run(make_run(tmp_path / "b", "random", "lvis_v1_val", {"bbox": {"AP": 1.0}}, [], detections=812)),
            read_run(make_run(tmp_path / "c", "old", "lvis_v1_val", {"bbox": {"AP": 2.0}}, []))]  # recorded none
    write_report(runs, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "**virtex made no detections on lvis_v1_val**" in markdown
    assert "random made no" not in markdown and "old made no" not in markdown
    record = json.loads((tmp_path / "report" / "report.json").read_text())
    assert record["runs"]["virtex"]["detections"] == {"lvis_v1_val": 0} and record["runs"]["old"]["detections"] == {}


def test_saved_results_record_how_many_detections_the_model_made(tmp_path):
    class Constant(DatasetEvaluator):
        def evaluate(self):
            return {"bbox": {"AP": 1.0}}

    def output(n):
        return {"instances": Instances((8, 8), pred_boxes=Boxes(torch.zeros(n, 4)))}

    evaluator = SavedResultsEvaluator(Constant(), "d", tmp_path / "evaluation.json", EvaluatedModel(3, 5))
    evaluator.reset()
    evaluator.process([{}, {}], [output(3), output(0)])
    evaluator.process([{}], [output(2)])
    assert evaluator.evaluate() == {"bbox": {"AP": 1.0}}
    record = json.loads((tmp_path / "evaluation.json").read_text())
    assert record["detections"] == 5 and record["results"] == {"bbox": {"AP": 1.0}}
    assert (record["iteration"], record["max_iter"], record["weights"]) == (3, 5, None)


def test_the_weights_eval_only_evaluates_are_recorded_by_name_in_the_run_and_by_path_outside(tmp_path, monkeypatch):
    """--eval-only records how far the loaded checkpoint had trained (detectron2 saves the index of
    its last iteration) and the file: its bare name when it is one of the run's own, so the record
    stays true when the folder is moved, else its full path."""
    cfg = load_config(CONFIGS / "cpu" / "coco_segm_default_init_cpu.yaml", ["OUTPUT_DIR", str(tmp_path / "run")])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere.pth").write_bytes(b"")
    own = EvaluatedModel.loaded(cfg, "run/model_0000049.pth", {"iteration": 49})
    assert own == EvaluatedModel(50, 100, "model_0000049.pth") and own.of_this_run and not own.at_end_of_training
    final = EvaluatedModel.loaded(cfg, str(tmp_path / "run" / "model_final.pth"), {"iteration": 99})
    assert final.weights == "model_final.pth" and final.at_end_of_training
    other = EvaluatedModel.loaded(cfg, "elsewhere.pth", {})
    assert other == EvaluatedModel(None, 100, str(tmp_path / "elsewhere.pth")) and not other.of_this_run
    assert EvaluatedModel.loaded(cfg, "", {}).weights == "" and not EvaluatedModel.loaded(cfg, "", {}).of_this_run
    url = EvaluatedModel.loaded(cfg, "https://example.org/model_final.pth", {"iteration": 99})
    assert url.weights == "https://example.org/model_final.pth" and not url.at_end_of_training


def test_an_evaluation_that_is_not_the_end_of_its_runs_training_is_marked(tmp_path):
    """A periodic evaluation a killed run left, --eval-only of an earlier checkpoint or of other
    weights, and a file written before iterations were recorded are marked, each with one line
    saying which; the end of training, also re-evaluated with --eval-only, is not."""
    box = {"bbox": {"AP": 1.0}}
    kinds = {"final": {"iteration": 5, "max_iter": 5, "weights": None},
             "rerun": {"iteration": 5, "max_iter": 5, "weights": "model_final.pth"},
             "killed": {"iteration": 3, "max_iter": 5, "weights": None},
             "earlier": {"iteration": 2, "max_iter": 5, "weights": "model_0000001.pth"},
             "other": {"iteration": 5, "max_iter": 5, "weights": "/elsewhere/model_final.pth"},
             "old": {}}
    runs = [read_run(make_run(tmp_path / label, label, "d", box, [], evaluated)) for label, evaluated in kinds.items()]
    write_report(runs, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| final | 1.0 |" in markdown and "| rerun | 1.0 |" in markdown
    expected = {
        "killed": "evaluated after 3 iterations of SOLVER.MAX_ITER 5: not the end of training",
        "earlier": "evaluated with --eval-only on its model_0000001.pth, after 2 iterations of SOLVER.MAX_ITER 5: "
                   "not the end of training",
        "other": "evaluated with --eval-only on /elsewhere/model_final.pth, not a checkpoint of this run "
                 "(5 iterations of training)",
        "old": "evaluated at an unknown iteration (its evaluation.json is from before tools/train_net.py recorded it), "
               "so perhaps not at the end of training",
    }
    for label, caveat in expected.items():
        assert f"| {label} † | 1.0 |" in markdown
        assert f"\n† **{label}** on d: {caveat}.\n" in markdown
    assert markdown.count("†") == 2 * len(expected)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {label: run["caveats"] for label, run in report["runs"].items()} == {
        "final": {}, "rerun": {}, **{label: {"d": caveat} for label, caveat in expected.items()}}


def test_a_machine_fault_in_the_mapper_is_raised_as_it_is(monkeypatch):
    import errno

    from detectron2.data import DatasetMapper

    from detectron2_ext.image_mapper import ImageNamingMapper
    from pretrain.data.images import BadImageError

    def failing_call(self, dataset_dict):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(DatasetMapper, "__call__", failing_call)
    mapper = object.__new__(ImageNamingMapper)  # __call__ is all that is exercised
    with pytest.raises(OSError) as caught:
        mapper({"file_name": "a.jpg"})
    assert not isinstance(caught.value, BadImageError)


def test_an_unreadable_image_met_while_training_is_named_in_one_line(synthetic_root, tmp_path):
    """detectron2 decodes images batch by batch, long after the header-only dataset checks: a
    truncated file must end the run with its name, also from inside a DataLoader worker."""
    from detectron2.data import DatasetFromList, MapDataset

    from detectron2_ext.image_mapper import ImageNamingMapper
    from pretrain.data.images import BadImageError

    cfg = load_config(CONFIGS / "builtin" / "lvis_segm_R_18_FPN_builtin.yaml")
    source = next((synthetic_root / "coco" / "val2017").glob("*.jpg"))
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(source.read_bytes())
    bad.write_bytes(source.read_bytes()[:300])
    width, height = Image.open(good).size
    mapper = ImageNamingMapper(cfg, is_train=False)
    record = {"image_id": 1, "height": height, "width": width}
    assert mapper({**record, "file_name": str(good)})["image"].shape[1:] == (height, width)
    loader = torch.utils.data.DataLoader(MapDataset(DatasetFromList([{**record, "file_name": str(bad)}]), mapper),
                                         batch_size=1, num_workers=1, collate_fn=lambda batch: batch)
    with pytest.raises(BadImageError) as caught:
        list(loader)
    headline = caught.value.headline
    assert "\n" not in headline and headline.startswith(f"{bad}: cannot read image (")
    assert headline.endswith("replace the file or remove its entry from the dataset")


@pytest.mark.parametrize("entries, message", [
    ("[['coco_2017_val', 'mine.json', 'images']]", "names 'coco_2017_val', which is already a dataset"),
    ("[['mine', 'mine.json']]", "entry ['mine', 'mine.json'] must be [name, instances JSON, image folder]"),
])
def test_own_coco_datasets_may_not_take_a_builtin_name_or_miss_a_part(entries, message):
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIGS / "cpu" / "coco_segm_default_init_cpu.yaml", ["VIRTEX.COCO_DATASETS", entries])
