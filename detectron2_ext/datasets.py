"""Dataset checks: detectron2's builtin datasets resolve under ``DETECTRON2_DATASETS``.

detectron2 reads ``DETECTRON2_DATASETS`` once, when ``detectron2.data`` is first imported, and
registers every builtin dataset (coco_2017_*, lvis_v1_*, voc_20XX_*) under that root. A variable
set later is silently ignored, and a missing file only surfaces deep inside the data loader; the
checks here turn both into clear errors before training starts.
"""
from __future__ import annotations

import os
from pathlib import Path

from detectron2.data import MetadataCatalog

from pretrain.errors import MissingInputError

_PROBE = ("coco_2017_val", "coco/annotations/instances_val2017.json")


def configured_root() -> Path:
    """The root that ``DETECTRON2_DATASETS`` names now (detectron2's default: ./datasets)."""
    return Path(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))


def registered_root() -> Path:
    """The root detectron2 registered its builtin datasets under when it was imported."""
    name, relative = _PROBE
    json_file = MetadataCatalog.get(name).json_file
    return Path(json_file[: -len(relative)] or ".")


def check_datasets_root() -> None:
    """Fail if ``DETECTRON2_DATASETS`` changed after detectron2 registered its datasets."""
    configured, registered = configured_root(), registered_root()
    if configured.resolve() != registered.resolve():
        raise RuntimeError(
            f"DETECTRON2_DATASETS is '{configured}', but detectron2 registered its builtin datasets "
            f"under '{registered}': the variable must be set before detectron2.data is imported "
            f"(e.g. in the shell that starts the program)"
        )


def check_dataset_files(names) -> None:
    """Fail, naming the path, if a registered dataset's annotation file or folder is missing."""
    missing = []
    for name in names:
        metadata = MetadataCatalog.get(name)
        for attribute in ("json_file", "image_root", "dirname"):
            path = getattr(metadata, attribute, None)
            if path is not None and "://" not in path and not Path(path).exists():
                missing.append(f"{name}: {attribute} {path}")
    if missing:
        raise MissingInputError(
            "dataset files not found (datasets resolve under DETECTRON2_DATASETS="
            f"'{configured_root()}'):\n  " + "\n  ".join(missing)
        )
