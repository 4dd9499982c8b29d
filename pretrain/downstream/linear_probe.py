"""Linear probe: a linear classifier on frozen backbone features (VirTex's ImageNet protocol).

Protocol defaults (the official linear-classification settings): the backbone is frozen and
stays in eval mode, so BatchNorm uses the checkpoint's running statistics; one ``Linear``
layer on the global-average-pooled features, weights ~ N(0, 0.01), bias 0; cross-entropy;
SGD with momentum 0.9, LR 0.3 at batch 256, no weight decay, cosine decay to zero over the
run (100 epochs on ImageNet); training images get a random resized crop (8-100 % of the area)
to 224 and a horizontal flip, validation images the shorter-side-256 centre-224 crop.

Data are ImageFolder-style: ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>``
(the layout of the usual ImageNet preparation), with the same class folders in both splits.

Runs in one process or as one rank of a ``torchrun`` job: each rank reads its share of every
batch, only the linear layer is wrapped in DistributedDataParallel (the frozen backbone needs
no gradient synchronisation), and validation counts are summed over ranks, each rank scoring a
disjoint share of the val split, so the accuracy is over the whole split exactly once.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2
from tqdm import tqdm

from pretrain.checkpoint_io import save_checkpoint
from pretrain.data.images import is_hidden, load_rgb_image
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.distributed import DistContext, all_reduce_sum
from pretrain.downstream.features import eval_transform, pooled_features
from pretrain.errors import BadValueError, MissingInputError
from pretrain.files import write_json_atomic
from pretrain.schedule import lr_multiplier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSettings:
    """Optimisation and data settings of a linear-probe run (defaults: the official ones)."""

    iterations: int = 500_500  # 100 ImageNet epochs at batch 256
    batch_size: int = 256  # global, split evenly across ranks
    lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_iterations: int = 0
    crop: int = 224
    resize: int = 256
    min_crop_scale: float = 0.08
    eval_period: int = 5000  # 0: evaluate only at the end
    log_period: int = 50
    num_workers: int = 4
    seed: int = 0


def train_transform(crop: int, min_scale: float) -> v2.Compose:
    """Random resized crop (``min_scale``-100 % of the area) to ``crop``, flip, normalisation."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(crop, scale=(min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def image_folder(root: str | os.PathLike, split: str, transform: v2.Transform) -> ImageFolder:
    """``root/split`` as an ImageFolder dataset; errors name the folder that is missing or empty."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: split folder not found (expected {folder}/<class>/<image>)")
    hidden: list[str] = []
    try:
        dataset = VisibleImageFolder(str(folder), transform=transform, loader=load_rgb_image,
                                     is_valid_file=lambda path: _image_file(path, hidden))
    except FileNotFoundError as err:  # no class folders, or no image in any of them
        raise BadValueError(f"{folder}: empty split ({err})") from None
    if hidden:
        logger.warning("%s: left out %d hidden file%s (e.g. %s)", folder, len(hidden), "s" if len(hidden) > 1 else "",
                       hidden[0])
    return dataset


class VisibleImageFolder(ImageFolder):
    """torchvision's ImageFolder whose classes are the folders that are not hidden
    (:func:`~pretrain.data.images.is_hidden`): Jupyter's ``.ipynb_checkpoints`` in a split was
    taken for a class, an empty one, and the split refused."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, _ = super().find_classes(directory)
        classes = [name for name in classes if not is_hidden(name)]
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: index for index, name in enumerate(classes)}


def _image_file(path: str, hidden: list[str]) -> bool:
    """Whether ImageFolder takes ``path`` (torchvision's image suffixes); a hidden file (macOS's
    ``._photo.JPEG``, no image: it stopped a probe when its batch came) is noted in ``hidden``."""
    if not has_file_allowed_extension(path, IMG_EXTENSIONS):
        return False
    if is_hidden(os.path.basename(path)):
        hidden.append(path)
        return False
    return True


class LinearProbe(nn.Module):
    """A frozen backbone (always in eval mode) and a trainable ``Linear`` on its pooled features."""

    def __init__(self, backbone: nn.Module, feature_size: int, num_classes: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.fc = nn.Linear(feature_size, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def train(self, mode: bool = True) -> LinearProbe:
        """Only the linear layer changes mode; the backbone keeps its BatchNorm statistics."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.backbone, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images))


@torch.no_grad()
def evaluate(probe: LinearProbe, dataset: Dataset, ctx: DistContext, batch_size: int, num_workers: int) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) and mean loss over the whole ``dataset``, all ranks together."""
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers)
    probe.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss sum, top-1, top-5, count
    k = min(5, probe.fc.out_features)
    for images, labels in tqdm(loader, desc="linear probe val", unit="batch", mininterval=2.0, disable=not ctx.is_main):
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        logits = probe(images)
        top = logits.topk(k, dim=1).indices
        totals[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        totals[1] += (top[:, 0] == labels).sum()
        totals[2] += (top == labels[:, None]).any(dim=1).sum()
        totals[3] += labels.numel()
    all_reduce_sum(totals)
    probe.train()
    count = float(totals[3])
    return {"top1": 100 * float(totals[1]) / count, f"top{k}": 100 * float(totals[2]) / count,
            "loss": float(totals[0]) / count, "images": count}


def train_linear_probe(
    probe: LinearProbe,
    train_set: Dataset,
    val_set: Dataset,
    settings: ProbeSettings,
    ctx: DistContext,
    output_dir: str | os.PathLike,
) -> dict[str, float]:
    """Train ``probe.fc`` for ``settings.iterations`` SGD steps and return the final val metrics.

    Rank 0 writes TensorBoard scalars (``linear_probe/*``), ``linear_probe.pth`` (the linear
    layer's state dict under ``model``, atomically) and ``linear_probe_metrics.json`` to
    ``output_dir``.
    """
    if settings.batch_size % ctx.world_size:
        raise BadValueError(f"batch size {settings.batch_size} is not divisible by the {ctx.world_size} ranks")
    output_dir = Path(output_dir)
    probe.to(ctx.device).train()
    head = DistributedDataParallel(probe.fc) if ctx.is_distributed else probe.fc
    optimizer = torch.optim.SGD(
        probe.fc.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier("cosine", settings.iterations, settings.warmup_iterations)
    )
    sampler = DistributedSampler(
        train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=settings.seed, drop_last=True
    )
    per_rank = settings.batch_size // ctx.world_size
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=settings.num_workers, drop_last=True)
    if len(loader) == 0:
        raise BadValueError(f"the training split has fewer images than one batch of {settings.batch_size}")

    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        output_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(log_dir=str(output_dir))
    epoch, batches = 0, iter(())
    metrics: dict[str, float] = {}
    progress = tqdm(range(1, settings.iterations + 1), desc="linear probe", unit="it", disable=not ctx.is_main)
    for iteration in progress:
        try:
            images, labels = next(batches)
        except StopIteration:
            sampler.set_epoch(epoch)
            epoch += 1
            batches = iter(loader)
            images, labels = next(batches)
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        loss = F.cross_entropy(head(probe.features(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if writer is not None and iteration % settings.log_period == 0:
            writer.add_scalar("linear_probe/train_loss", loss.item(), iteration)
            writer.add_scalar("linear_probe/lr", optimizer.param_groups[0]["lr"], iteration)
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if iteration == settings.iterations or (settings.eval_period and iteration % settings.eval_period == 0):
            metrics = evaluate(probe, val_set, ctx, per_rank, settings.num_workers)
            if writer is not None:
                for name, value in metrics.items():
                    if name != "images":
                        writer.add_scalar(f"linear_probe/val_{name}", value, iteration)
                logger.info("iteration %d: %s", iteration, metrics)
    if writer is not None:
        writer.close()
        save_checkpoint({"model": probe.fc.state_dict(), "iteration": settings.iterations}, output_dir / "linear_probe.pth", force=True)
        summary = {"metrics": metrics, "settings": asdict(settings), "world_size": ctx.world_size}
        write_json_atomic(output_dir / "linear_probe_metrics.json", summary)
    return metrics


def build_datasets(root: str | os.PathLike, settings: ProbeSettings) -> tuple[ImageFolder, ImageFolder]:
    """Train and val ImageFolder datasets with the protocol's transforms; the class folders of
    both splits must be the same."""
    train_set = image_folder(root, "train", train_transform(settings.crop, settings.min_crop_scale))
    val_set = image_folder(root, "val", eval_transform(settings.resize, settings.crop))
    if train_set.classes != val_set.classes:
        missing = sorted(set(train_set.classes) - set(val_set.classes))
        extra = sorted(set(val_set.classes) - set(train_set.classes))
        raise BadValueError(
            f"{Path(root) / 'val'}: class folders differ from the train split's "
            f"({len(val_set.classes)} vs {len(train_set.classes)} classes; missing here: {_some(missing)}, "
            f"not in train: {_some(extra)}); both splits need the same class folders"
        )
    return train_set, val_set


def _some(names: list[str], shown: int = 3) -> str:
    """Up to ``shown`` names, and how many more."""
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
