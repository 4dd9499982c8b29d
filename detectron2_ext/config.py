"""Config keys that virtex-d2 adds to detectron2's config (``add_virtex_config``).

Everything else in our detectron2 configs is a standard detectron2 key; the keys here only
record how a run was initialised (for reports) and how SyncBN is replaced where it cannot run.
"""
from pathlib import Path

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from pretrain.config import ConfigError


def add_virtex_config(cfg):
    """Add the ``VIRTEX`` subtree to a detectron2 config, in place."""
    cfg.VIRTEX = CN()
    # Name of the backbone initialisation (e.g. "virtex", "imagenet", "random"), shown by the
    # reports. Empty: tools/train_net.py fills it from MODEL.WEIGHTS ("random" when empty).
    cfg.VIRTEX.INIT_NAME = ""
    # Norm that replaces "SyncBN" when several processes train without CUDA: torch's
    # SyncBatchNorm only runs on GPUs, detectron2's naiveSyncBN also runs over gloo.
    cfg.VIRTEX.CPU_SYNC_NORM = "naiveSyncBN"


def load_config(config_file, opts=()):
    """A mutable detectron2 config with our keys, merged from a YAML file and KEY VALUE overrides.

    A missing file, an unknown key or a value of the wrong type is a
    :class:`~pretrain.config.ConfigError` naming the file or the command line.
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
    return cfg


def default_init_name(weights: str) -> str:
    """The initialisation name for reports when VIRTEX.INIT_NAME is empty."""
    return Path(weights).stem if weights else "random"
