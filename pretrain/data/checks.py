"""Dataset checks run before any compute is spent: every problem at once, each naming its file.

A defect in the data (a missing image, a truncated JPEG, a malformed captions file) otherwise
surfaces hours into a run, one at a time. The checks here collect problems into a
:class:`~pretrain.errors.CheckReport` and raise one :class:`~pretrain.errors.DatasetCheckError`
listing them; warnings (defaults applied, images that ``DATA.SKIP_BAD_IMAGES`` will skip) are
returned for the caller to log. The detectron2 datasets' checks (``detectron2_ext.dataset_checks``)
use the same report and error, which is why both live in the neutral :mod:`pretrain.errors`.

Pretraining data (:func:`check_pretraining_data`): for ``train`` (and ``val`` when
``ENGINE.VAL_PERIOD`` validates) the captions file ``DATA.ROOT/annotations/captions_{split}
2017.json`` is read as the dataset reads it, every image it lists must be in ``{split}2017/``,
and images are decoded as training decodes them (:func:`pretrain.data.images.load_rgb_image`),
as ``DATA.CHECK_IMAGES`` says:

* ``sample`` (default): a fixed random sample of :data:`SAMPLE_SIZE` images per split, so a
  split of up to 1000 images is decoded in full and COCO's 118K training images cost about
  1000 decodes (seconds) rather than 118K (several minutes) before every run and resume;
* ``all``: every image (use it once on a new corpus, e.g. with ``tools/check_dataset.py``);
* ``none``: no decoding (the files' presence is still checked).

With ``DATA.SKIP_BAD_IMAGES`` missing and unreadable images are warnings (training skips
them); otherwise they are errors. Tar shards (``DATA.FORMAT webdataset``) are not read ahead:
they may be remote or piped, and their stream has its own bad-sample limit.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from pretrain.data.captions import read_caption_records
from pretrain.data.dataset_root import DatasetLayoutError
from pretrain.data.images import BadImageError, load_rgb_image
from pretrain.distributed import all_gather_objects
from pretrain.errors import BadValueError, CheckReport, DatasetCheckError

logger = logging.getLogger(__name__)

CHECK_IMAGES_MODES = ("sample", "all", "none")
SAMPLE_SIZE = 1000  # images decoded per split by DATA.CHECK_IMAGES "sample" (all of a smaller split)
_SKIP_HINT = "or set DATA.SKIP_BAD_IMAGES True to skip missing and unreadable images"


def sample_indices(count: int, mode: str, seed: int = 0) -> list[int]:
    """Indices of the ``count`` images to decode under ``DATA.CHECK_IMAGES`` ``mode`` (sorted)."""
    if mode not in CHECK_IMAGES_MODES:
        raise BadValueError(f"DATA.CHECK_IMAGES is {mode!r}; choose one of {', '.join(CHECK_IMAGES_MODES)}")
    if mode == "none":
        return []
    if mode == "all" or count <= SAMPLE_SIZE:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), SAMPLE_SIZE))


def decode_images(paths: Sequence[Path], desc: str, progress: bool = True) -> list[tuple[Path, str]]:
    """``(path, error)`` of the images that :func:`load_rgb_image` cannot decode, in order.

    Decoding runs in a few threads (Pillow releases the GIL while it decodes) under a tqdm bar.
    """

    def error(path: Path) -> str | None:
        try:
            load_rgb_image(path)
        except BadImageError as err:
            return str(err)
        return None

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(error, paths), total=len(paths), desc=desc, unit="img",
                            disable=not progress or not paths, mininterval=1.0, leave=False))
    return [(path, message) for path, message in zip(paths, results) if message is not None]


def check_caption_split(root: str | os.PathLike, split: str, report: CheckReport, check_images: str = "sample",
                        skip_bad_images: bool = False, progress: bool = True) -> int:
    """Check one COCO Captions split under ``root`` into ``report``; returns its image count."""
    root = Path(root)
    captions_json = root / "annotations" / f"captions_{split}2017.json"
    image_dir = root / f"{split}2017"
    try:
        records = read_caption_records(captions_json)
    except (DatasetLayoutError, BadValueError) as err:  # both name the file and the entry
        report.problem(f"{err}; fix the captions file (COCO Captions format)")
        return 0
    if not records:
        report.problem(f"{captions_json}: 'annotations': no image has a caption; nothing to train on")
        return 0
    if not image_dir.is_dir():
        report.problem(f"{image_dir}: image folder not found (needed by {captions_json}); "
                       f"put the {split}2017 images there or point DATA.ROOT at the folder that has them")
        return len(records)
    present = set(os.listdir(image_dir))
    missing = [r for r in records if r.file_name not in present and not (image_dir / r.file_name).is_file()]
    bad = [(image_dir / r.file_name, f"{image_dir / r.file_name}: image file not found") for r in missing]
    missing_names = {r.file_name for r in missing}
    found = [image_dir / r.file_name for r in records if r.file_name not in missing_names]
    chosen = [found[i] for i in sample_indices(len(found), check_images)]
    bad += decode_images(chosen, f"checking {split}2017 images", progress)
    if bad and skip_bad_images:
        report.warn(f"{image_dir}: {len(missing)} of the {len(records)} images listed in {captions_json} are "
                    f"missing and {len(bad) - len(missing)} of the {len(chosen)} decoded are unreadable, e.g. "
                    f"{bad[0][1]}; DATA.SKIP_BAD_IMAGES skips them")
    elif bad:
        for _, message in bad:
            report.problem(f"{message} (listed in {captions_json}); put a readable image there, remove it "
                           f"from the captions file, {_SKIP_HINT}")
    logger.info("checked %s: %d images, %d of them decoded (DATA.CHECK_IMAGES %s)", captions_json, len(records),
                len(chosen), check_images)
    return len(records)


def pretraining_splits(cfg) -> list[str]:
    """The splits of ``DATA.ROOT`` a pretraining run reads: train, and val when it validates;
    none from shards (``DATA.FORMAT webdataset``), whose samples are checked as they are read
    (:mod:`pretrain.data.shards`: bad ones are skipped, counted and listed)."""
    if cfg.DATA.FORMAT == "webdataset":
        return []
    return ["train", "val"] if cfg.ENGINE.VAL_PERIOD else ["train"]


def check_caption_data(cfg, progress: bool = True, check_images: str | None = None) -> list[str]:
    """Check the caption data of every split the run reads; returns the warnings and raises
    :class:`DatasetCheckError` listing the problems. ``check_images`` overrides ``DATA.CHECK_IMAGES``."""
    report = CheckReport()
    mode = check_images or cfg.DATA.CHECK_IMAGES
    sample_indices(0, mode)  # an unknown mode is an error before anything is read
    if cfg.DATA.FORMAT != "coco":
        logger.info("DATA.FORMAT %s: samples are checked as the shards stream (DATA.MAX_BAD_FRACTION)",
                    cfg.DATA.FORMAT)
        return []
    for split in pretraining_splits(cfg):
        check_caption_split(cfg.DATA.ROOT, split, report, mode, cfg.DATA.SKIP_BAD_IMAGES, progress)
    report.raise_if_problems()
    return report.warnings


def check_pretraining_data(cfg, main: bool = True) -> None:
    """Run :func:`check_caption_data` once per job (on the main rank) and stop every rank on a
    problem: the other ranks wait for the main rank's verdict, so none starts training alone.
    Warnings are logged on the main rank."""
    verdict = None
    if main:
        try:
            for warning in check_caption_data(cfg):
                logger.warning(warning)
        except DatasetCheckError as err:
            verdict = (err.problems, err.total)
        except Exception as err:
            all_gather_objects(("crash", f"{type(err).__name__}: {err}"))
            raise
    verdict = all_gather_objects(verdict)[0]
    if verdict is None:
        return
    if verdict[0] == "crash":
        raise RuntimeError(f"the main rank failed while checking the data: {verdict[1]}")
    raise DatasetCheckError(*verdict)
