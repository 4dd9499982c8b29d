"""``tools/train_net.py --resume`` against the run it continues.

detectron2 writes the new ``config.yaml`` over the run's own before it resumes, then restores
the saved optimizer and scheduler, so a run resumed under a changed config trained on with the
old learning rates while its folder recorded the new ones, and without a word. Here the config
is compared with the run's ``config.yaml`` first: a changed start (``MODEL.WEIGHTS``,
``VIRTEX.INIT_NAME``) is refused, since the report would name the old run's numbers after the
new init; any other change is warned about, naming the keys, and the solver's new values take
effect (:mod:`pretrain.optim_resume`).
"""
from __future__ import annotations

from pathlib import Path

import yaml
from detectron2.config import CfgNode

from pretrain.config import flatten_config
from pretrain.errors import BadValueError

#: Where the run started: what its report is named after.
START_KEYS = ("MODEL.WEIGHTS", "VIRTEX.INIT_NAME")
#: How the run is executed and recorded, not what it learns: listed in an info line, not warned about.
EXECUTION_KEYS = frozenset({"SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD", "DATALOADER.NUM_WORKERS",
                            "MODEL.DEVICE", "VIS_PERIOD", "CUDNN_BENCHMARK"})


def config_changes(saved_yaml: str, cfg: CfgNode) -> list[str]:
    """``KEY: saved -> now`` for every key whose value differs between a run's ``config.yaml``
    and ``cfg`` (tuples and lists compare alike, as in the YAML file)."""
    before, after = flatten_config(CfgNode.load_cfg(saved_yaml)), flatten_config(cfg)
    return [f"{key}: {before.get(key, '(absent)')} -> {after.get(key, '(absent)')}"
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]


def check_resume(cfg: CfgNode) -> tuple[list[str], list[str]]:
    """For a ``--resume`` into ``cfg.OUTPUT_DIR``: the changes of recipe and of execution since
    the run's ``config.yaml`` (both empty when there is no checkpoint to resume). Raises
    :class:`BadValueError` when the run would continue under another start."""
    output_dir = Path(cfg.OUTPUT_DIR)
    saved = output_dir / "config.yaml"
    if not ((output_dir / "last_checkpoint").is_file() and saved.is_file()):  # fvcore's has_checkpoint
        return [], []
    try:
        changes = config_changes(saved.read_text(encoding="utf-8"), cfg)
    except yaml.YAMLError as err:
        raise BadValueError(f"{saved}: not a readable config ({' '.join(str(err).split())}); restore the run's "
                            "config.yaml, or drop --resume and choose another OUTPUT_DIR") from None
    started_otherwise = [line for line in changes if line.split(":", 1)[0] in START_KEYS]
    if started_otherwise:
        raise BadValueError(
            f"{output_dir}: --resume would continue the run trained from other weights ({'; '.join(started_otherwise)}) "
            f"and report it under the new name; resume with the run's own {saved}, or drop --resume and choose "
            "another OUTPUT_DIR for the new run")
    execution = [line for line in changes if line.split(":", 1)[0] in EXECUTION_KEYS]
    return [line for line in changes if line not in execution], execution
