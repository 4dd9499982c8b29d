"""Evaluators chosen from the dataset, with their results saved as they return them.

COCO uses ``COCOEvaluator`` (its fast C++ implementation only when detectron2's compiled ops
exist), LVIS ``LVISEvaluator`` and VOC ``PascalVOCDetectionEvaluator``. Each is wrapped so that
the dict it returns is also written, unchanged, to ``<output_folder>/evaluation.json``: the
reports read those numbers instead of recomputing anything, with the number of detections the
model made (the evaluators return NaN, or leave a task out, when it made none, and a report
should say that rather than "not computable"). The VOC evaluator computes its
results inside :func:`~detectron2_ext.voc_annotations.evaluator_reads_with_defaults`, so the
VOC devkit's defaults apply to our evaluation only, not to the rest of the process.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
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
from .voc_annotations import evaluator_reads_with_defaults

RESULTS_FILE = "evaluation.json"


def has_compiled_ops() -> bool:
    """True when detectron2's C++/CUDA extension (``detectron2._C``) can be imported."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


class SavedResultsEvaluator(DatasetEvaluator):
    """Delegates to an evaluator and writes its results to a JSON file on the main process.

    ``context``: what the inner evaluator's ``evaluate`` runs inside (e.g. the VOC reader's defaults).
    """

    def __init__(self, evaluator: DatasetEvaluator, dataset_name: str, path,
                 context: Callable[[], AbstractContextManager] = nullcontext):
        self.evaluator = evaluator
        self.dataset_name = dataset_name
        self.path = Path(path)
        self.context = context
        self.detections = 0

    def reset(self):
        self.evaluator.reset()
        self.detections = 0

    def process(self, inputs, outputs):
        self.evaluator.process(inputs, outputs)
        self.detections += sum(len(output["instances"]) for output in outputs if "instances" in output)

    def evaluate(self):
        with self.context():
            results = self.evaluator.evaluate()
        detections = sum(comm.gather(self.detections, dst=0))  # every process's count on the main one
        if comm.is_main_process() and results:
            record = {"dataset": self.dataset_name, "evaluator": type(self.evaluator).__name__, "results": results,
                      "detections": detections}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, record, default=float)
        return results


def build_evaluator(dataset_name: str, output_folder) -> SavedResultsEvaluator:
    """The evaluator for a registered dataset, by its ``evaluator_type`` metadata."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    context = nullcontext
    if evaluator_type == "coco":
        evaluator = COCOEvaluator(dataset_name, output_dir=str(output_folder), use_fast_impl=has_compiled_ops())
    elif evaluator_type == "lvis":
        patch_lvis_numpy()
        evaluator = LVISEvaluator(dataset_name, output_dir=str(output_folder))
    elif evaluator_type == "pascal_voc":
        evaluator = PascalVOCDetectionEvaluator(dataset_name)
        context = evaluator_reads_with_defaults
    else:
        raise NotImplementedError(f"no evaluator for dataset '{dataset_name}' (evaluator_type {evaluator_type!r})")
    return SavedResultsEvaluator(evaluator, dataset_name, Path(output_folder) / RESULTS_FILE, context)
