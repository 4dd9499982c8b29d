"""Evaluators chosen from the dataset, with their results saved as they return them.

COCO uses ``COCOEvaluator`` (its fast C++ implementation only when detectron2's compiled ops
exist), LVIS ``LVISEvaluator`` and VOC ``PascalVOCDetectionEvaluator``. Each is wrapped so that
the dict it returns is also written, unchanged, to ``<output_folder>/evaluation.json``: the
reports read those numbers instead of recomputing anything, with the number of detections the
model made (the evaluators return NaN, or leave a task out, when it made none, and a report
should say that rather than "not computable"), and which weights were evaluated
(:class:`EvaluatedModel`: the iteration, the run's ``SOLVER.MAX_ITER`` and, for
``--eval-only``, the file), so that a report can tell the evaluation at the end of a run's
training from a periodic one that a killed run left behind, or from other weights evaluated into
the same folder. The VOC evaluator computes its
results inside :func:`~detectron2_ext.voc_annotations.evaluator_reads_with_defaults`, so the
VOC devkit's defaults apply to our evaluation only, not to the rest of the process.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class EvaluatedModel:
    """Which weights an evaluation is of, saved with its results (its fields go into the record).

    ``iteration``: how many training iterations the weights had when evaluated (None: not
    known); ``max_iter``: the run's ``SOLVER.MAX_ITER``, so ``iteration == max_iter`` is the
    evaluation at the end of training; ``weights``: None for the model of a training run as it
    stands, else (``--eval-only``) the file evaluated, relative to ``OUTPUT_DIR`` when it is one of
    the run's own files (so the record stays true when the folder is moved) and absolute
    otherwise, or "" when no file was loaded (:func:`weights_name`).
    """

    iteration: int | None
    max_iter: int
    weights: str | None = None

    @classmethod
    def loaded(cls, cfg, path: str, unread: dict) -> EvaluatedModel:
        """The weights ``--eval-only`` loaded from ``path`` ("" for none), with what the
        checkpointer left ``unread`` of the file: detectron2's training checkpoints hold there
        the index of their last iteration, one less than the iterations trained."""
        last = unread.get("iteration")
        iteration = last + 1 if isinstance(last, int) else None
        return cls(iteration, cfg.SOLVER.MAX_ITER, weights_name(path, cfg.OUTPUT_DIR))

    @classmethod
    def of_record(cls, record: dict) -> EvaluatedModel | None:
        """What an ``evaluation.json`` record says was evaluated; None for a record written before
        this was saved (nothing is known of its iteration)."""
        if "max_iter" not in record:
            return None
        return cls(record["iteration"], record["max_iter"], record["weights"])

    @property
    def of_this_run(self) -> bool:
        """Whether these are the run's own weights: its model in training, or a file of its folder."""
        return self.weights is None or (self.weights != "" and Path(self.weights).name == self.weights)

    @property
    def at_end_of_training(self) -> bool:
        """Whether this is the run's own model after all of its ``SOLVER.MAX_ITER`` iterations:
        the run's result, rather than a periodic evaluation or one of other weights."""
        return self.of_this_run and self.iteration == self.max_iter


def weights_name(path: str, output_dir) -> str:
    """How :class:`EvaluatedModel` records the weights file ``path``: its bare name when it lies in
    ``output_dir``, else its absolute path (a URL as given), "" for none."""
    if not path:
        return ""
    if Path(path).resolve().parent == Path(output_dir).resolve():
        return Path(path).name
    return str(Path(path).resolve()) if os.path.isfile(path) else path


class SavedResultsEvaluator(DatasetEvaluator):
    """Delegates to an evaluator and writes its results to a JSON file on the main process.

    ``evaluated``: which weights these are (recorded with the results). ``context``: what the
    inner evaluator's ``evaluate`` runs inside (e.g. the VOC reader's defaults).
    """

    def __init__(self, evaluator: DatasetEvaluator, dataset_name: str, path, evaluated: EvaluatedModel,
                 context: Callable[[], AbstractContextManager] = nullcontext):
        self.evaluator = evaluator
        self.dataset_name = dataset_name
        self.path = Path(path)
        self.evaluated = evaluated
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
                      "detections": detections, **asdict(self.evaluated)}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, record, default=float)
        return results


def build_evaluator(dataset_name: str, output_folder, evaluated: EvaluatedModel) -> SavedResultsEvaluator:
    """The evaluator for a registered dataset, by its ``evaluator_type`` metadata, recording
    ``evaluated`` with its results."""
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
    return SavedResultsEvaluator(evaluator, dataset_name, Path(output_folder) / RESULTS_FILE, evaluated, context)
