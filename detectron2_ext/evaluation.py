"""Evaluators chosen from the dataset, with their results saved as they return them.

COCO uses ``COCOEvaluator`` (its fast C++ implementation only when detectron2's compiled ops
exist), LVIS ``LVISEvaluator`` and VOC ``PascalVOCDetectionEvaluator``. Each is wrapped so that
the dict it returns is also written, unchanged, to ``<output_folder>/evaluation.json``: the
reports read those numbers instead of recomputing anything.
"""
from __future__ import annotations

from pathlib import Path

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
)
from detectron2.utils import comm

from pretrain.files import write_json_atomic

from .compat import patch_lvis_numpy

RESULTS_FILE = "evaluation.json"


def has_compiled_ops() -> bool:
    """True when detectron2's C++/CUDA extension (``detectron2._C``) can be imported."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


class SavedResultsEvaluator(DatasetEvaluator):
    """Delegates to an evaluator and writes its results to a JSON file on the main process."""

    def __init__(self, evaluator: DatasetEvaluator, dataset_name: str, path):
        self.evaluator = evaluator
        self.dataset_name = dataset_name
        self.path = Path(path)

    def reset(self):
        self.evaluator.reset()

    def process(self, inputs, outputs):
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        results = self.evaluator.evaluate()
        if comm.is_main_process() and results:
            record = {"dataset": self.dataset_name, "evaluator": type(self.evaluator).__name__, "results": results}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, record, default=float)
        return results


def build_evaluator(dataset_name: str, output_folder) -> SavedResultsEvaluator:
    """The evaluator for a registered dataset, by its ``evaluator_type`` metadata."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type == "coco":
        evaluator = COCOEvaluator(dataset_name, output_dir=str(output_folder), use_fast_impl=has_compiled_ops())
    elif evaluator_type == "lvis":
        patch_lvis_numpy()
        evaluator = LVISEvaluator(dataset_name, output_dir=str(output_folder))
    elif evaluator_type == "pascal_voc":
        evaluator = PascalVOCDetectionEvaluator(dataset_name)
    else:
        raise NotImplementedError(f"no evaluator for dataset '{dataset_name}' (evaluator_type {evaluator_type!r})")
    return SavedResultsEvaluator(evaluator, dataset_name, Path(output_folder) / RESULTS_FILE)
