"""Starting a run: a fresh output folder, or ``--resume`` from its newest usable checkpoint.

On ``--resume`` one rank decides: the main rank picks the checkpoint (falling back past damaged
files), every other rank loads exactly that file, and if any rank cannot, every rank stops
naming it. Ranks that each picked their own file could train different weights without an error
(one rank fell back after a transient read fault) or wait forever in a collective.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pretrain.checkpoint_io import checkpoint_path, list_checkpoints
from pretrain.config import EXECUTION_ONLY_KEYS, config_differences
from pretrain.distributed import (
    DistContext,
    all_gather_objects,
    seed_everything,
    set_rng_state,
)
from pretrain.engine.checkpoint import CheckpointManager
from pretrain.engine.optim import inner_optimizer
from pretrain.engine.setup import Training
from pretrain.errors import InputError, OutputExistsError
from pretrain.optim_resume import apply_configured_values, configured_values

logger = logging.getLogger("pretrain.engine")


#: Config keys that decide the layout of the optimizer's state: a checkpoint saved under other
#: values has state the optimizer of this config cannot take (torch fails with a ``KeyError``).
OPTIMIZER_LAYOUT_KEYS = ("OPTIM.OPTIMIZER_NAME", "OPTIM.LOOKAHEAD.USE")


def restore(training: Training, state: dict, path: Path) -> int:
    """Load checkpoint ``path`` (read as ``state``) into the run's objects and this rank's RNG;
    returns its iteration. Weights or optimizer groups that the config's model does not fit, or
    another optimizer, are a :class:`ResumeMismatchError`; any other failure is raised as it is.

    The optimizer's hyper-parameters (learning rates, weight decay, momentum, Lookahead's alpha
    and k) are the config's, at the checkpoint's point in the schedule: torch's
    ``load_state_dict`` restores the saved ones, so a run resumed under a config that changed
    them went on with the old values while its log and config.yaml named the new ones.
    """
    ctx, seed = training.ctx, training.cfg.RANDOM_SEED
    _refuse_another_optimizer(state, path, training.cfg)
    try:
        training.model.load_state_dict(state["model"])
    except RuntimeError as err:  # torch: "Error(s) in loading state_dict": missing, unexpected or resized tensors
        raise ResumeMismatchError(_mismatch_message(err, path, state, training.cfg)) from err
    configured = configured_values(inner_optimizer(training.optimizer))
    try:
        training.optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:
        if "parameter group" not in str(err):  # torch's words for groups of another number or size
            raise
        raise ResumeMismatchError(_mismatch_message(err, path, state, training.cfg)) from err
    training.scheduler.load_state_dict(state["scheduler"])
    apply_configured_values(inner_optimizer(training.optimizer), configured, training.scheduler)
    if state["scaler"]:  # empty when saved without fp16 (e.g. on CPU); the scale then starts afresh
        training.scaler.load_state_dict(state["scaler"])
    iteration = int(state["iteration"])
    rng = state.get("rng", [])
    if len(rng) == ctx.world_size:
        set_rng_state(rng[ctx.rank])
    else:
        logger.warning(
            "checkpoint holds RNG states of %d ranks, this run has %d: reseeding each rank from "
            "(RANDOM_SEED, rank, iteration); the data order is unaffected",
            len(rng),
            ctx.world_size,
        )
        seed_everything(seed + ctx.rank + 1_000_003 * iteration)
    return iteration


def _refuse_another_optimizer(state: dict, path: Path, cfg) -> None:
    changed = [line for line in config_differences(state["config"], cfg) if line.split(":", 1)[0] in OPTIMIZER_LAYOUT_KEYS
               ] if "config" in state else []
    if changed:
        raise ResumeMismatchError(
            f"{path}: its optimizer state cannot be continued by another optimizer ({'; '.join(changed)}); resume "
            "with the checkpoint's config (config.yaml in the output folder) or start another output directory")


class ResumeError(RuntimeError):
    """The ranks could not agree on the checkpoint to resume from; every rank stops."""


class ResumeMismatchError(InputError, ValueError):
    """The config builds a model (or optimizer) that the checkpoint's weights do not fit."""


def _mismatch_message(err: Exception, path: Path, state: dict, cfg) -> str:
    """One line: the checkpoint, torch's first complaint, and the config keys that changed."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0] if lines else ""
    changed = config_differences(state["config"], cfg, ignore=EXECUTION_ONLY_KEYS) if "config" in state else []
    keys = f"; the config differs from the checkpoint's in {'; '.join(changed)}" if changed else ""
    return (f"{path}: does not fit the model of this config ({first.rstrip('.')}){keys}; resume with the "
            "checkpoint's config (config.yaml in the output folder) or start another output directory")


def agreed_resume_state(manager: CheckpointManager, ctx: DistContext) -> dict | None:
    """The checkpoint every rank resumes from (None: start from scratch), chosen by the main rank.

    When the main rank fails while choosing (an ``OSError`` after retries, say), it raises its
    own error and the other ranks a :class:`ResumeError`; when another rank cannot load the
    chosen file, every rank raises a :class:`ResumeError` naming the file and that rank.
    """
    state, failure = None, None
    if ctx.is_main:
        try:
            state = manager.choose_latest()
        except Exception as err:  # noqa: BLE001  (told to the other ranks first, then raised here as it is)
            failure = err
    choice = all_gather_objects(None if failure else (state["iteration"] if state else 0))[0]
    if choice is None:
        if failure is not None:
            raise failure
        raise ResumeError(f"{manager.output_dir}: rank 0 could not choose a checkpoint to resume from (its log says "
                          "why); every rank stops")
    if choice and not ctx.is_main:
        try:
            state = manager.read(choice)
        except Exception as err:  # noqa: BLE001  (whatever the reason, no rank may train from another file)
            failure = err
    failures = [(rank, message) for rank, message in enumerate(all_gather_objects(failure and str(failure))) if message]
    if failures:
        rank, message = failures[0]
        raise ResumeError(f"{checkpoint_path(manager.output_dir, choice)}: rank {rank} could not load the checkpoint "
                          f"rank 0 chose to resume from ({message}); every rank stops") from failure
    return state


def start_or_resume(training: Training, manager: CheckpointManager, output_dir: Path, resume: bool) -> int:
    """The iteration the run continues after: 0 for a fresh run, the checkpoint's on ``--resume``.

    A fresh run refuses a folder that already holds checkpoints; a resumed one warns, naming the
    keys, when the config differs from the checkpoint's.
    """
    if not resume:
        if list_checkpoints(output_dir):
            raise OutputExistsError(
                f"{output_dir} already holds checkpoints; pass --resume to continue that run or choose "
                "another output directory"
            )
        return 0
    state = agreed_resume_state(manager, training.ctx)
    if state is None:
        logger.info("--resume: no checkpoint in %s, starting from scratch", output_dir)
        return 0
    start = restore(training, state, checkpoint_path(output_dir, state["iteration"]))
    logger.info("resumed from %s", checkpoint_path(output_dir, start))
    if "config" in state:
        _report_config_changes(state["config"], training.cfg, start)
    return start


def _report_config_changes(saved: str, current, iteration: int) -> None:
    """Warn when the run continues with another recipe than its checkpoint's; keys that only
    change how it is executed (checkpoint and log periods, compilation) are noted, not warned
    about, so that the warning keeps meaning that the results now mix two recipes."""
    recipe = config_differences(saved, current, ignore=EXECUTION_ONLY_KEYS)
    execution = sorted(set(config_differences(saved, current)) - set(recipe))
    if recipe:
        logger.warning(
            "the config differs from the one checkpoint_%d.pth was trained with, so the run "
            "continues with another recipe (config.yaml now holds the new one): %s",
            iteration, "; ".join(recipe),
        )
    if execution:
        logger.info("the run continues with other execution settings than checkpoint_%d.pth (the "
                    "recipe is unchanged): %s", iteration, "; ".join(execution))
