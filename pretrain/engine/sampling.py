"""Deterministic, resumable data order for training, independent of world size and workers.

Every iteration's global batch is a function of (seed, iteration) only: epoch ``e`` is a
permutation of the dataset drawn from ``seed + e`` and cut into ``len // global_batch`` batches
(the remainder is dropped, as with ``drop_last``); rank ``r`` of ``W`` takes the ``r``-th of
``W`` equal slices of the global batch. Each sample also gets its own seed from (seed, iteration,
position in the global batch), with which python, numpy and torch are re-seeded in the worker
just before the sample is loaded, so random augmentations and caption choice are reproducible.

Consequences: a run resumed at iteration ``i`` sees exactly the batches an uninterrupted run
would; 2 ranks × 4 images see the same 8 samples, with the same augmentations, as 1 rank × 8;
the number of DataLoader workers does not change the data.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from pretrain.distributed import seeded_rng

# Large odd constants that spread (seed, iteration, position) over the 63-bit seed space.
_ITER_STRIDE = 0x9E3779B97F4A7C15 >> 1
_POS_STRIDE = 0xBF58476D1CE4E5B9 >> 1


def sample_seed(seed: int, iteration: int, position: int) -> int:
    """The seed of the sample at ``position`` of the global batch of ``iteration``."""
    return (seed * 1_000_003 + iteration * _ITER_STRIDE + position * _POS_STRIDE) % (2**63 - 1)


class IterationBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for iterations ``start_iteration .. num_iterations - 1``, this rank's share of the
    global batch as ``(sample_seed, dataset_index)`` pairs for :class:`SeededDataset`."""

    def __init__(
        self,
        dataset_size: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_iterations: int,
        start_iteration: int = 0,
    ):
        if global_batch_size % world_size:
            raise ValueError(
                f"OPTIM.BATCH_SIZE {global_batch_size} is not divisible by the world size "
                f"{world_size}; choose a batch size that splits evenly across ranks"
            )
        if dataset_size < global_batch_size:
            raise ValueError(
                f"the training set has {dataset_size} images, fewer than one global batch "
                f"(OPTIM.BATCH_SIZE {global_batch_size})"
            )
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.num_iterations = num_iterations
        self.start_iteration = start_iteration
        self.batches_per_epoch = dataset_size // global_batch_size

    def __len__(self) -> int:
        return max(0, self.num_iterations - self.start_iteration)

    def batch_for(self, iteration: int, permutation: torch.Tensor) -> list[tuple[int, int]]:
        offset = (iteration % self.batches_per_epoch) * self.global_batch_size
        first = self.rank * self.local_batch_size
        positions = range(first, first + self.local_batch_size)
        return [(sample_seed(self.seed, iteration, p), int(permutation[offset + p])) for p in positions]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, permutation = -1, None
        for iteration in range(self.start_iteration, self.num_iterations):
            if iteration // self.batches_per_epoch != epoch:
                epoch = iteration // self.batches_per_epoch
                generator = torch.Generator().manual_seed(self.seed + epoch)
                permutation = torch.randperm(self.dataset_size, generator=generator)
            yield self.batch_for(iteration, permutation)


class SeededDataset(Dataset):
    """Wraps a map-style dataset so that ``dataset[(seed, index)]`` returns ``dataset[index]``
    loaded with python, numpy and torch seeded by ``seed``.

    The caller's RNG states are restored afterwards, so loading in the main process
    (``num_workers=0``) does not disturb the training RNG (dropout).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        seed, index = key
        with seeded_rng(seed):
            return self.dataset[index]
