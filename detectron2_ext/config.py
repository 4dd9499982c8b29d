"""Config keys that virtex-d2 adds to detectron2's config (``add_virtex_config``).

Everything else in our detectron2 configs is a standard detectron2 key; the keys here only
record how a run was initialised (for reports) and how SyncBN is replaced where it cannot run.
:func:`load_config` also checks the values of our keys, and of the few detectron2 keys whose bad
values detectron2 only notices after the model and data are built (a learning rate, a period,
a batch size), so that a bad value ends with a line naming the key before anything is read.
"""
import math
import numbers
from pathlib import Path

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from pretrain.config import ConfigError

from .datasets import register_coco_datasets
from .vit_config import add_vitdet_config

# Norms that run in several processes without CUDA (torch's SyncBatchNorm does not).
CPU_SYNC_NORMS = ("naiveSyncBN", "naiveSyncBN_N", "BN", "FrozenBN", "GN")


def add_virtex_config(cfg):
    """Add the ``VIRTEX`` subtree to a detectron2 config, in place."""
    cfg.VIRTEX = CN()
    # Name of the backbone initialisation (e.g. "virtex", "imagenet", "random"), shown by the
    # reports. Empty: tools/train_net.py fills it from MODEL.WEIGHTS ("random" when empty).
    cfg.VIRTEX.INIT_NAME = ""
    # Norm that replaces "SyncBN" when several processes train without CUDA: torch's
    # SyncBatchNorm only runs on GPUs, detectron2's naiveSyncBN also runs over gloo.
    cfg.VIRTEX.CPU_SYNC_NORM = "naiveSyncBN"
    # Datasets of one's own in the COCO instances format, each [name, instances JSON, image
    # folder], registered under that name for DATASETS.TRAIN / DATASETS.TEST (classes from the
    # JSON: set MODEL.ROI_HEADS.NUM_CLASSES to their number).
    cfg.VIRTEX.COCO_DATASETS = []
    add_vitdet_config(cfg)  # MODEL.VIT, MODEL.SFP, the AdamW and LSJ keys of ViTDet


def load_config(config_file, opts=()):
    """A mutable detectron2 config with our keys, merged from a YAML file and KEY VALUE overrides.

    A missing file, an unknown key, a value of the wrong type or out of range
    (:func:`check_values`) is a :class:`~pretrain.config.ConfigError` naming the file or the
    command line, and the key.
    """
    cfg = get_cfg()
    add_virtex_config(cfg)
    if not Path(config_file).is_file():
        raise ConfigError(f"{config_file}: config file not found")
    try:
        cfg.merge_from_file(str(config_file))
    except (KeyError, ValueError, TypeError, AssertionError) as err:  # yacs: unknown key, wrong type
        raise ConfigError(f"{config_file}: {err}; fix it in the file") from None
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd list: {opts}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, TypeError, AssertionError) as err:
        raise ConfigError(f"command line: {err}; check the KEY VALUE overrides") from None
    where = f"{config_file} with the command line" if opts else str(config_file)
    check_values(cfg, where)
    register_coco_datasets(cfg.VIRTEX.COCO_DATASETS, where)
    return cfg


def config_value(cfg, dotted: str):
    """The value of ``cfg`` at a dotted key such as ``MODEL.RESNETS.NORM``."""
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _is_int(value, low: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def _is_number(value, low: float) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def value_problems(cfg) -> list[str]:
    """``KEY is VALUE; must be RANGE`` for every checked key out of range (empty: all fit)."""
    rules = [
        ("VIRTEX.CPU_SYNC_NORM", cfg.VIRTEX.CPU_SYNC_NORM in CPU_SYNC_NORMS, "one of " + ", ".join(CPU_SYNC_NORMS)),
        ("SOLVER.IMS_PER_BATCH", _is_int(cfg.SOLVER.IMS_PER_BATCH, 1), "an integer >= 1"),
        ("SOLVER.BASE_LR", _is_number(cfg.SOLVER.BASE_LR, 0), "a number >= 0"),
        ("SOLVER.MAX_ITER", _is_int(cfg.SOLVER.MAX_ITER, 1), "an integer >= 1"),
        ("SOLVER.WARMUP_ITERS", _is_int(cfg.SOLVER.WARMUP_ITERS, 0), "an integer >= 0"),
        ("SOLVER.CHECKPOINT_PERIOD", _is_int(cfg.SOLVER.CHECKPOINT_PERIOD, 1), "an integer >= 1"),
        ("TEST.EVAL_PERIOD", _is_int(cfg.TEST.EVAL_PERIOD, 0), "an integer >= 0 (0: evaluate at the end only)"),
        ("DATALOADER.NUM_WORKERS", _is_int(cfg.DATALOADER.NUM_WORKERS, 0), "an integer >= 0"),
    ]
    return [f"{key} is {config_value(cfg, key)!r}; must be {allowed}" for key, ok, allowed in rules if not ok]


def check_values(cfg, source: str = "config") -> None:
    """Raise one :class:`~pretrain.config.ConfigError` naming every checked key out of range."""
    problems = value_problems(cfg)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def check_world_size(cfg, world_size: int) -> None:
    """:class:`~pretrain.config.ConfigError` unless ``SOLVER.IMS_PER_BATCH`` splits evenly over
    ``world_size`` processes (detectron2 asserts it only once the data loader is built)."""
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH is {cfg.SOLVER.IMS_PER_BATCH}; must be divisible by the "
                          f"{world_size} training processes (--num-gpus x --num-machines)")


def default_init_name(weights: str) -> str:
    """The initialisation name for reports when VIRTEX.INIT_NAME is empty."""
    return Path(weights).stem if weights else "random"
