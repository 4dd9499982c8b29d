"""Where datasets come from: detectron2's builtin ones under ``DETECTRON2_DATASETS``, and a
user's own COCO-format ones named in the config (``VIRTEX.COCO_DATASETS``).

detectron2 reads ``DETECTRON2_DATASETS`` once, when ``detectron2.data`` is first imported, and
registers every builtin dataset (coco_2017_*, lvis_v1_*, voc_20XX_*) under that root. A variable
set later is silently ignored, and a missing file only surfaces deep inside the data loader; the
checks here turn both into clear errors before training starts. A dataset of one's own (an
annotation tool's COCO export, with its own classes) is registered from the config, as
detectron2's ``register_coco_instances`` would be from a script, so that the tools take it too.
"""
from __future__ import annotations

import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from pretrain.config import ConfigError
from pretrain.errors import MissingInputError

_PROBE = ("coco_2017_val", "coco/annotations/instances_val2017.json")
_OWN_DATASETS: set[str] = set()  # names registered from VIRTEX.COCO_DATASETS: their paths are the user's own


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
    missing, builtin_missing = [], False
    for name in names:
        metadata = MetadataCatalog.get(name)
        for attribute in ("json_file", "image_root", "dirname"):
            path = getattr(metadata, attribute, None)
            if path is not None and "://" not in path and not Path(path).exists():
                missing.append(f"{name}: {attribute} {path}")
                builtin_missing |= name not in _OWN_DATASETS
    if missing:
        where = f" (builtin datasets resolve under DETECTRON2_DATASETS='{configured_root()}')" if builtin_missing else ""
        raise MissingInputError(f"dataset files not found{where}:\n  " + "\n  ".join(missing))


def register_coco_datasets(entries, where: str) -> None:
    """Register each ``[name, instances JSON, image folder]`` of ``VIRTEX.COCO_DATASETS`` as a
    COCO-format dataset (classes from its JSON, COCO evaluation). A name detectron2 already has
    for other files (a builtin dataset) is a :class:`~pretrain.config.ConfigError`; the same entry
    again (a config loaded twice in one process) is left as it is."""
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(v, str) and v for v in entry)):
            raise ConfigError(f"{where}: VIRTEX.COCO_DATASETS entry {entry!r} must be [name, instances JSON, image "
                              "folder], three strings")
        name, json_file, image_root = entry
        if name in DatasetCatalog.list():
            registered = MetadataCatalog.get(name)
            if (registered.get("json_file", None), registered.get("image_root", None)) == (json_file, image_root):
                continue
            raise ConfigError(f"{where}: VIRTEX.COCO_DATASETS names {name!r}, which is already a dataset "
                              f"({registered.get('json_file', 'registered by detectron2')}); give yours another name")
        register_coco_instances(name, {}, json_file, image_root)
        _OWN_DATASETS.add(name)
