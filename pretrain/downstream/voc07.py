"""PASCAL VOC 2007 linear classification: the checkpoint-selection protocol of VirTex.

Protocol (the official one; settings from the paper's code release):

* features: the frozen backbone's global-average-pooled last feature map (2048-d for a
  ResNet-50) of the shorter-side-256, centre-224 crop of each image, L2-normalised;
* one linear SVM per class, trained on ``trainval``: scikit-learn ``LinearSVC`` with squared
  hinge loss, L2 penalty, ``class_weight={1: 2, -1: 1}``, ``max_iter=2000``, solved in the dual
  (the official code ran scikit-learn < 1.5, whose default was ``dual=True``; newer releases
  default to ``"auto"``, which picks the primal here); the cost ``C`` is
  chosen among ``(0.01, 0.1, 1.0, 10.0)`` by the mean average precision of 3-fold
  cross-validation (the first cost with the highest mean wins), then the SVM is refit on all of
  ``trainval`` with that cost;
* labels come from ``ImageSets/Main/{class}_{split}.txt`` (1 present, -1 absent, 0 "difficult":
  only difficult instances of the class). In training a difficult image counts as a negative;
  in testing it is left out of that class's AP, as in the official code;
* AP is scikit-learn's ``average_precision_score`` on the SVM decision values over the test
  images, i.e. the area under the non-interpolated precision-recall step curve (the official
  VirTex score), **not** the VOC 2007 devkit's 11-point interpolated AP, which reads a little
  higher. mAP is the mean over classes.

A class that cannot be trained or scored (fewer positive or negative training images than
two, or no positive test image, which happens only on tiny datasets) is reported with its
reason and left out of the mean; the result says how many classes the mAP covers.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import LinearSVC
from torch import nn

from pretrain.data.voc_classes import VOC_CLASSES
from pretrain.downstream.features import ImageFiles, eval_transform, extract_features
from pretrain.errors import InputError

logger = logging.getLogger(__name__)

SVM_COSTS = (0.01, 0.1, 1.0, 10.0)
CV_FOLDS = 3
SVM_MAX_ITER = 2000


class VocLayoutError(InputError, ValueError):
    """A VOC split or label file that is missing, empty or malformed."""


@dataclass(frozen=True)
class VocSplit:
    """One VOC split: image ids in split-file order, their JPEG paths and an (N, 20) label
    matrix with the file values 1 (present), -1 (absent) and 0 (difficult only)."""

    name: str
    image_ids: list[str]
    image_paths: list[Path]
    labels: np.ndarray


def _read_split_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise VocLayoutError(f"{path}: split file not found")
    ids = path.read_text(encoding="utf-8-sig").split()  # -sig: a BOM is not part of the first id
    if not ids:
        raise VocLayoutError(f"{path}: empty split (no image ids)")
    if len(set(ids)) != len(ids):
        raise VocLayoutError(f"{path}: lists an image id more than once")
    return ids


def _read_class_labels(path: Path, ids: list[str]) -> np.ndarray:
    """The labels of ``ids`` in one ``{class}_{split}.txt`` file, which must list exactly them."""
    if not path.is_file():
        raise VocLayoutError(f"{path}: per-class label file not found")
    labels: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
            raise VocLayoutError(f"{path}:{number}: expected '<image id> <1|-1|0>', got {line!r}")
        labels[parts[0]] = int(parts[1])
    missing = [i for i in ids if i not in labels]
    extra = sorted(set(labels) - set(ids))
    if missing or extra:
        raise VocLayoutError(
            f"{path}: does not label the images of its split file "
            f"(missing e.g. {missing[:3]}, unknown e.g. {extra[:3]})"
        )
    return np.array([labels[i] for i in ids], dtype=np.int8)


def read_voc_split(voc_root: str | os.PathLike, split: str, classes: Sequence[str] = VOC_CLASSES) -> VocSplit:
    """Read split ``split`` (``trainval``, ``test``, ...) of a VOC root such as ``.../VOC2007``.

    Needs ``ImageSets/Main/{split}.txt``, ``ImageSets/Main/{class}_{split}.txt`` for every
    class and ``JPEGImages/{id}.jpg`` for every listed image; errors name the file at fault.
    """
    root = Path(voc_root)
    main = root / "ImageSets" / "Main"
    ids = _read_split_ids(main / f"{split}.txt")
    labels = np.stack([_read_class_labels(main / f"{name}_{split}.txt", ids) for name in classes], axis=1)
    paths = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise VocLayoutError(f"{absent[0]}: image file not found ({len(absent)} of the {split} split's images are missing)")
    return VocSplit(split, ids, paths, labels)


@dataclass(frozen=True)
class ClassResult:
    """One class's SVM: test AP (NaN when not scored), chosen cost, its mean cross-val AP,
    and why the class was not scored (empty when it was)."""

    name: str
    ap: float
    cost: float | None = None
    cv_ap: float | None = None
    skipped: str = ""


def skip_reason(train_labels: np.ndarray, test_labels: np.ndarray) -> str:
    """Why one class (its VOC file values in each split) cannot be trained and scored; empty when
    it can. Cross-validation needs two positive and two negative training images, AP one
    positive test image that is not "difficult"."""
    positives, negatives = int((train_labels == 1).sum()), int((train_labels != 1).sum())
    if min(positives, negatives) < 2:
        return f"{positives} positive / {negatives} negative training images"
    if not (test_labels == 1).any():
        return "no positive test image"
    return ""


def train_test_class_svm(
    name: str,
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    costs: Sequence[float] = SVM_COSTS,
    folds: int = CV_FOLDS,
) -> ClassResult:
    """Cross-validate the cost of one class's SVM on the training set, refit, and score the test set.

    ``*_labels`` hold the VOC file values (1, -1, 0); see the module docstring for their use.
    Fewer than ``folds`` positive (or negative) training images reduce the number of folds to
    that count; fewer than two make cross-validation impossible and skip the class.
    """
    skipped = skip_reason(train_labels, test_labels)
    if skipped:
        return ClassResult(name, math.nan, skipped=skipped)
    y_train = np.where(train_labels == 1, 1, -1)
    n_folds = min(folds, int((y_train == 1).sum()), int((y_train == -1).sum()))
    scored = test_labels != 0

    best_cost, best_cv_ap = None, -math.inf
    with warnings.catch_warnings():
        # max_iter=2000 is the protocol: an unconverged liblinear solve is part of it.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for cost in costs:
            svm = _svm(cost)
            cv = StratifiedKFold(n_folds, shuffle=False)
            cv_ap = float(np.mean(cross_val_score(svm, train_x, y_train, cv=cv, scoring="average_precision")))
            if cv_ap > best_cv_ap:
                best_cost, best_cv_ap = cost, cv_ap
        svm = _svm(best_cost).fit(train_x, y_train)
    scores = svm.decision_function(test_x[scored])
    ap = float(average_precision_score(test_labels[scored] == 1, scores))
    return ClassResult(name, ap, best_cost, best_cv_ap)


def _svm(cost: float) -> LinearSVC:
    return LinearSVC(
        C=cost, class_weight={1: 2, -1: 1}, penalty="l2", loss="squared_hinge", dual=True, max_iter=SVM_MAX_ITER,
        random_state=0,
    )


@dataclass
class Voc07Result:
    """Per-class results and their mean over the scored classes."""

    classes: list[ClassResult] = field(default_factory=list)

    @property
    def scored(self) -> list[ClassResult]:
        return [c for c in self.classes if not c.skipped]

    @property
    def mean_ap(self) -> float:
        """mAP in [0, 1] over the scored classes (NaN when none could be scored)."""
        scored = self.scored
        return float(np.mean([c.ap for c in scored])) if scored else math.nan

    def to_dict(self) -> dict:
        """JSON-ready results; APs in [0, 1], ``None`` where a class was not scored."""
        return {
            "mAP": _or_none(self.mean_ap),
            "classes_scored": len(self.scored),
            "classes": {
                c.name: {"AP": _or_none(c.ap), "cost": c.cost, "cv_AP": c.cv_ap, **({"skipped": c.skipped} if c.skipped else {})}
                for c in self.classes
            },
        }


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def voc07_svm_map(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    classes: Sequence[str] = VOC_CLASSES,
    costs: Sequence[float] = SVM_COSTS,
    jobs: int = 1,
) -> Voc07Result:
    """Train and test one SVM per class (``jobs`` classes in parallel processes)."""
    if train_labels.shape[1] != len(classes) or test_labels.shape[1] != len(classes):
        raise ValueError(f"label matrices must have {len(classes)} columns, one per class")
    results = Parallel(n_jobs=jobs)(
        delayed(train_test_class_svm)(name, train_x, train_labels[:, k], test_x, test_labels[:, k], costs)
        for k, name in enumerate(classes)
    )
    for result in results:
        if result.skipped:
            logger.warning("VOC07 class '%s' is left out of the mAP: %s", result.name, result.skipped)
    return Voc07Result(list(results))


def evaluate_backbone(
    backbone: nn.Module,
    voc_root: str | os.PathLike,
    device="cpu",
    batch_size: int = 64,
    num_workers: int = 2,
    resize: int = 256,
    crop: int = 224,
    costs: Sequence[float] = SVM_COSTS,
    jobs: int = 1,
) -> Voc07Result:
    """The VOC07 SVM protocol for one frozen backbone: features of ``trainval`` and ``test``,
    then :func:`voc07_svm_map`."""
    transform = eval_transform(resize, crop)
    features = {}
    splits = {name: read_voc_split(voc_root, name) for name in ("trainval", "test")}
    reasons = {name: skip_reason(splits["trainval"].labels[:, k], splits["test"].labels[:, k])
               for k, name in enumerate(VOC_CLASSES)}
    if all(reasons.values()):
        examples = {}  # one class per distinct kind of reason
        for name, reason in reasons.items():
            examples.setdefault(reason == "no positive test image", f"'{name}': {reason}")
        raise VocLayoutError(
            f"{voc_root}: no class can be scored (e.g. {'; '.join(examples.values())}); each class needs two "
            "positive and two negative trainval images and a positive test image"
        )
    for name, split in splits.items():
        features[name] = extract_features(
            backbone, ImageFiles(split.image_paths, transform), device, batch_size, num_workers,
            l2_normalize=True, desc=f"VOC07 {name} features",
        ).numpy()
    return voc07_svm_map(
        features["trainval"], splits["trainval"].labels, features["test"], splits["test"].labels,
        costs=costs, jobs=jobs,
    )


def results_table(rows: Sequence[tuple[str, int | None, Voc07Result]]) -> str:
    """A Markdown table of ``(checkpoint, iteration, result)`` rows, mAP in percent, best marked."""
    best = max((r.mean_ap for _, _, r in rows if not math.isnan(r.mean_ap)), default=math.nan)
    lines = ["| checkpoint | iteration | VOC07 mAP (%) | classes scored |", "|---|---|---|---|"]
    for name, iteration, result in rows:
        mark = " (best)" if len(rows) > 1 and result.mean_ap == best else ""
        iteration_text = "-" if iteration is None else str(iteration)
        lines.append(
            f"| {name} | {iteration_text} | {100 * result.mean_ap:.2f}{mark} | {len(result.scored)}/{len(result.classes)} |"
        )
    return "\n".join(lines) + "\n"
