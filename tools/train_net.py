#!/usr/bin/env python
"""Fine-tune and evaluate detectron2 models for VirTex transfer (COCO, LVIS, VOC).

detectron2's standard trainer with our configs (configs/detectron2/), an evaluator chosen from
the dataset, and weights read as data only (MODEL.WEIGHTS: converted weights from
tools/convert_backbone.py, or empty for random init). Without GPUs it runs on CPU, and
``--num-gpus N`` then starts N CPU processes over gloo, with naiveSyncBN in place of SyncBN:

    python tools/train_net.py --config-file configs/detectron2/coco_segm_default_init_2x.yaml \\
        --num-gpus 8 MODEL.WEIGHTS virtex_r50.pth OUTPUT_DIR outputs/coco_virtex

Before any process starts, the datasets the run trains and evaluates on are checked as training
and evaluation read them (``detectron2_ext.dataset_checks``; alone: ``tools/check_dataset.py``):
a defect stops it with exit status 2 and one line per problem naming the file and the field.
"""
import functools
import logging
import os
import sys
import weakref

import _bootstrap  # noqa: F401  (first: tools/pretrain.py would shadow the pretrain package)

from pretrain.malloc import (  # standard library only
    allocator_in_use,
    reexec_with_tuned_malloc,
)

if __name__ == "__main__":
    reexec_with_tuned_malloc()  # the allocator is chosen at process start, so before torch loads

from detectron2.data import build_detection_test_loader
from detectron2.engine import (
    DefaultTrainer,
    default_argument_parser,
    default_setup,
    hooks,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from detectron2_ext import load_config
from detectron2_ext.checkpoint import SafeDetectionCheckpointer
from detectron2_ext.compat import (
    adapt_config_to_devices,
    limit_cpu_threads,
    patch_cpu_ddp,
)
from detectron2_ext.config import check_world_size, default_init_name
from detectron2_ext.dataset_checks import check_config_datasets
from detectron2_ext.datasets import check_datasets_root
from detectron2_ext.evaluation import EvaluatedModel, build_evaluator
from detectron2_ext.image_mapper import ImageNamingMapper
from detectron2_ext.launch import launch_telling_errors
from detectron2_ext.preemption import (
    SaveAtStopSignal,
    TrainingStopped,
    leave_stop_signals_to_main_process,
    shut_down_train_workers,
)
from detectron2_ext.progress import ProgressBarHook
from detectron2_ext.resume import check_resume
from detectron2_ext.vit_training import (
    build_recipe_optimizer,
    build_recipe_train_loader,
    disable_amp_without_cuda,
)
from detectron2_ext.vit_verify import check_backbone_run
from pretrain.checkpoint_io import UNSAFE_OPT_IN_FLAG
from pretrain.optim_resume import apply_configured_values, configured_values
from pretrain.stop_signals import StopSignal, ignore_stop_signals
from virtex_d2.cli import OneLineErrorLog, one_line_report, run_tool


class Trainer(DefaultTrainer):
    """DefaultTrainer with dataset-specific evaluators that record which weights they evaluate
    (the iteration, for a report to tell the end of training from a periodic evaluation),
    weights-only, atomically written checkpoints, and a checkpoint at a cluster's stop signal."""

    def __init__(self, cfg, allow_unsafe_pickle=False):
        self.stop_signal = StopSignal()  # first: a signal while the model and data are built is remembered
        super().__init__(cfg)
        self.checkpointer = SafeDetectionCheckpointer(
            self.checkpointer.model, cfg.OUTPUT_DIR, allow_unsafe_pickle=allow_unsafe_pickle,
            trainer=weakref.proxy(self),
        )
        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer

    def build_hooks(self):
        """detectron2's hooks, its evaluation hook calling :meth:`evaluate`, a progress bar, and
        last the save at a stop signal (after the iteration's evaluation and metrics)."""
        built = [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self.evaluate) if isinstance(hook, hooks.EvalHook) else hook
                 for hook in super().build_hooks()]
        return [*built, ProgressBarHook(), SaveAtStopSignal(self.stop_signal)]

    def train(self):
        """detectron2's training, counting iterations from ``start_iter`` (a resumed run's weights
        have trained that far before any step of this process), to the end or to a stop signal."""
        self.iterations_trained = self.start_iter
        try:
            return super().train()
        except TrainingStopped as stopped:
            logging.getLogger("detectron2_ext").warning("%s; continue with --resume", stopped)
            return {}
        finally:
            shut_down_train_workers(self._trainer)

    def after_train(self):
        """detectron2's, except after an error in training (a bad image, a full disk): detectron2
        takes ``iter + 1 >= max_iter`` for the end of training, so a failed last iteration would be
        evaluated and saved as ``model_final.pth``, and with ``--num-gpus`` above 1 the failed rank
        would wait in the evaluation's collectives for ranks still in training's: the run hung."""
        if not isinstance(sys.exc_info()[1], Exception):
            return super().after_train()
        self.storage.iter = self.iter
        for hook in self._hooks:
            if not isinstance(hook, (hooks.EvalHook, hooks.PeriodicCheckpointer)):
                hook.after_train()
        return None

    def run_step(self):
        """One training step, counted once it is done (what :meth:`evaluate` records)."""
        super().run_step()
        self.iterations_trained = self.iter + 1

    def evaluate(self):
        """Evaluate the model as training has left it, periodically and at the end (detectron2's
        EvalHook calls this), recording how many iterations it has trained."""
        evaluated = EvaluatedModel(self.iterations_trained, self.cfg.SOLVER.MAX_ITER)
        self._last_eval_results = self.evaluate_model(self.cfg, self.model, evaluated)  # what train() returns
        return self._last_eval_results

    @classmethod
    def evaluate_model(cls, cfg, model, evaluated: EvaluatedModel):
        """detectron2's ``test`` on every ``DATASETS.TEST``, each ``evaluation.json`` recording
        ``evaluated`` with its results."""
        evaluators = [build_evaluator(name, os.path.join(cfg.OUTPUT_DIR, "inference", name), evaluated)
                      for name in cfg.DATASETS.TEST]
        return cls.test(cfg, model, evaluators)

    def resume_or_load(self, resume=True):
        """detectron2's, then on a resume the config's solver values (learning rates, weight
        decay, momentum) at the checkpoint's iteration instead of the saved ones."""
        configured = configured_values(self.optimizer)
        super().resume_or_load(resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            apply_configured_values(self.optimizer, configured, self.scheduler)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_recipe_optimizer(cfg, model)  # SGD, or ViTDet's AdamW with layer-wise lr decay

    @classmethod
    def build_train_loader(cls, cfg):
        # detectron2's, or ViTDet's large-scale jitter; its workers leave the stop signals to us
        return leave_stop_signals_to_main_process(build_recipe_train_loader(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # a stop signal during a periodic evaluation is acted on after it, as during training
        return leave_stop_signals_to_main_process(
            build_detection_test_loader(cfg, dataset_name, mapper=ImageNamingMapper(cfg, is_train=False)))


def setup(args):
    """Config from file and overrides, adapted to the machine, frozen; logging set up."""
    cfg = load_config(args.config_file, args.opts)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="detectron2_ext")
    prepare_for_run(cfg, comm.get_world_size())
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def prepare_for_run(cfg, world_size: int) -> None:
    """What this machine and the weights make of a loaded config: the config.yaml the run records."""
    adapt_config_to_devices(cfg, world_size)
    if not cfg.VIRTEX.INIT_NAME:
        cfg.VIRTEX.INIT_NAME = default_init_name(cfg.MODEL.WEIGHTS)
    disable_amp_without_cuda(cfg)  # detectron2's AMP trainer asserts CUDA


def check_resumed_run(args) -> tuple[list[str], list[str]]:
    """With --resume: how the config differs from the run it continues (recipe, execution);
    a changed start stops here, before any process starts."""
    if not args.resume or args.eval_only:
        return [], []
    cfg = load_config(args.config_file, args.opts)
    prepare_for_run(cfg, args.num_gpus * args.num_machines)
    return check_resume(cfg)


def check_datasets(args) -> list[str]:
    """The datasets the run trains and evaluates on (only evaluates, with --eval-only), checked
    once per machine before any training process starts; returns the warnings."""
    check_datasets_root()
    cfg = load_config(args.config_file, args.opts)  # values checked: a bad one names its key
    check_world_size(cfg, args.num_gpus * args.num_machines)
    return check_config_datasets(cfg, eval_only=args.eval_only)


def main(args, dataset_warnings=(), resume_changes=((), ())):
    cfg = setup(args)
    patch_cpu_ddp()
    limit_cpu_threads()
    logging.getLogger("detectron2.engine.train_loop").addFilter(OneLineErrorLog())  # run_tool says it in one line
    logger = logging.getLogger("detectron2_ext")
    for warning in dataset_warnings:
        logger.warning("dataset check: %s", warning)
    recipe, execution = resume_changes
    if recipe:
        logger.warning("--resume: the config differs from the one the run was trained with, so it continues with "
                       "another recipe (config.yaml now holds the new one; solver values take effect): %s",
                       "; ".join(recipe))
    if execution:
        logger.info("--resume: other execution settings than the run's (the recipe is unchanged): %s", "; ".join(execution))
    logger.info("initialisation: %s", cfg.VIRTEX.INIT_NAME)
    logger.info("allocator: %s", allocator_in_use())

    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR, allow_unsafe_pickle=args.allow_unsafe_pickle)
        unread = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.evaluate_model(cfg, model, EvaluatedModel.loaded(cfg, checkpointer.loaded_path, unread))

    trainer = Trainer(cfg, allow_unsafe_pickle=args.allow_unsafe_pickle)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.description = __doc__  # detectron2's parser prints it as written, before its examples
    parser.add_argument(UNSAFE_OPT_IN_FLAG, action="store_true",
                        help="allow MODEL.WEIGHTS files that need arbitrary unpickling (.pkl; trusted files only)")
    return parser.parse_args(argv)


def cli() -> int:
    """Check the datasets once, then train (or only evaluate) in ``--num-gpus`` processes."""
    args = parse_args()
    print("Command Line Args:", args)
    warnings = check_datasets(args)  # a DatasetCheckError: run_tool lists the problems, status 2
    # optimiser, ViTDet keys, MODEL.WEIGHTS of the right backbone kind and shape
    check_backbone_run(load_config(args.config_file, args.opts), args.allow_unsafe_pickle, args.resume)
    resume_changes = check_resumed_run(args)  # before default_setup writes the new config.yaml over the run's
    if args.num_gpus * args.num_machines > 1 and not args.eval_only:
        ignore_stop_signals()  # the ranks act on them and save; this process waits for them
    return launch_telling_errors(  # a rank's bad input or full disk: its one line, once, and its status
        main,
        args.num_gpus,
        tell=functools.partial(one_line_report, "train_net"),
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args, warnings, resume_changes),
    )


if __name__ == "__main__":
    sys.exit(run_tool("train_net", cli))
