"""A terminal progress bar for detectron2 training (tqdm), beside detectron2's periodic log lines.

detectron2 reports progress only every 20 iterations in its log; on a CPU that can be minutes
apart, so users of ``tools/train_net.py`` also get a live bar with the iteration, the total
loss and the time left. Only the main process draws it.
"""
from __future__ import annotations

from detectron2.engine import HookBase
from detectron2.utils import comm
from tqdm import tqdm


class ProgressBarHook(HookBase):
    """Draw one tqdm bar over the trainer's iterations, showing the latest total loss."""

    def __init__(self, description: str = "train"):
        self._description = description
        self._bar = None

    def before_train(self):
        if comm.is_main_process():
            self._bar = tqdm(total=self.trainer.max_iter, initial=self.trainer.start_iter,
                             desc=self._description, unit="it", dynamic_ncols=True)

    def after_step(self):
        if self._bar is None:
            return
        latest = self.trainer.storage.latest()
        if "total_loss" in latest:
            self._bar.set_postfix(loss=f"{latest['total_loss'][0]:.3f}", refresh=False)
        self._bar.update(1)

    def after_train(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
