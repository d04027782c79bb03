"""Training samplers: endless, distributed-aware, resumable streams of (index, sample seed).

Both samplers cut one global stream of dataset indices into per-rank shares:
- `ShuffleSampler` (DG-Net's loaders a and b): a fresh permutation of the whole training set each epoch;
  rank r takes global positions r, r + W, r + 2W, ..., so in every epoch the ranks' shares are disjoint
  and together cover the data.
- `IdentitySampler` (the teacher with batch-hard triplet loss): P identities x K images per global batch;
  each rank takes whole identities (P/W of them), so the triplet loss on one rank sees complete groups.

The stream never ends (the training loop counts iterations, not epochs), so ranks stay in lock-step and
the last batch of an epoch simply continues into the next. Each item is `(index, seed)`: the dataset
draws all its randomness (flip, crop, erasing, the positive) from that seed, which is a pure function of
the global stream position. A sampler restarted at `start` (the number of items this rank has already
consumed) therefore gives exactly the samples, augmentations included, that an uninterrupted run would
have given next, whatever the number of loader workers. That is what makes resume exact.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

_STREAM_SALT = 0x5EED  # keeps sample seeds apart from the permutation seeds drawn from the same base seed


def sample_seed(seed: int, stream: int, position: int) -> int:
    """The seed of the item at global `position` of a stream: independent of workers and ranks."""
    state = np.random.SeedSequence([seed, stream, _STREAM_SALT, position]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))  # 63 bits: fits torch.Generator.manual_seed


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")


class ShuffleSampler(Sampler):
    """Endless reshuffled stream of `num_samples` indices, this rank's share of it, from item `start`."""

    def __init__(self, num_samples: int, *, seed: int, stream: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        _check_rank(rank, world_size)
        if num_samples < world_size:
            raise ValueError(f"{num_samples} training images cannot feed {world_size} processes")
        self.num_samples, self.seed, self.stream = num_samples, seed, stream
        self.rank, self.world_size, self.start = rank, world_size, start

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of epoch `epoch` (the same on every rank)."""
        return np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n, world = self.num_samples, self.world_size
        position = self.start * world + self.rank  # global stream position of this rank's next item
        epoch, order = -1, None
        while True:
            if position // n != epoch:
                epoch = position // n
                order = self.epoch_order(epoch)
            yield int(order[position % n]), sample_seed(self.seed, self.stream, position)
            position += world


class IdentitySampler(Sampler):
    """Endless P x K stream: each global batch holds `num_identities` identities with K images each.

    Every epoch visits each identity's images in K-groups (an identity with fewer than K images, or a
    last group that is short, is topped up by re-drawing from that identity). A global batch takes
    P groups of distinct identities; rank r takes groups [r*P/W, (r+1)*P/W) of every batch.
    """

    def __init__(self, labels: Sequence[int], *, batch_size: int, num_instances: int, seed: int,
                 stream: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        _check_rank(rank, world_size)
        if batch_size % num_instances:
            raise ValueError(f"batch_size {batch_size} is not a multiple of num_instances {num_instances}")
        self.groups_per_batch = batch_size // num_instances
        if self.groups_per_batch % world_size:
            raise ValueError(f"{self.groups_per_batch} identities per batch cannot be split over {world_size} "
                             "processes; make batch_size / num_instances a multiple of the process count")
        by_identity: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            by_identity[int(label)].append(index)
        if len(by_identity) < self.groups_per_batch:
            raise ValueError(f"a batch needs {self.groups_per_batch} identities, the data has {len(by_identity)}")
        self.identities = sorted(by_identity)
        self.members = [np.asarray(by_identity[pid]) for pid in self.identities]
        self.num_instances, self.seed, self.stream = num_instances, seed, stream
        self.rank, self.world_size, self.start = rank, world_size, start

    def epoch_groups(self, epoch: int) -> list[np.ndarray]:
        """The K-groups of one epoch in global order, arranged so each batch's identities are distinct."""
        rng = np.random.default_rng([self.seed, self.stream, epoch])
        k = self.num_instances
        queues: list[list[np.ndarray]] = []
        for members in self.members:
            order = rng.permutation(members)
            short = -len(order) % k
            if short:
                order = np.concatenate([order, rng.choice(members, size=short, replace=True)])
            queues.append([order[i:i + k] for i in range(0, len(order), k)])
        groups: list[np.ndarray] = []
        live = [i for i, q in enumerate(queues) if q]
        p = self.groups_per_batch
        while len(live) >= p:  # identities left over with fewer than P companions wait for the next epoch
            # Drawing identities in proportion to their remaining groups keeps that leftover small.
            remaining = np.array([len(queues[i]) for i in live], dtype=np.float64)
            for identity in rng.choice(live, size=p, replace=False, p=remaining / remaining.sum()):
                groups.append(queues[identity].pop())
            live = [i for i in live if queues[i]]
        return groups

    def __iter__(self) -> Iterator[tuple[int, int]]:
        k, p, world = self.num_instances, self.groups_per_batch, self.world_size
        share = p // world  # groups per rank per batch
        per_rank_batch = share * k
        batch, offset = divmod(self.start, per_rank_batch)  # where this rank resumes
        epoch, groups, first_batch_of_epoch = 0, self.epoch_groups(0), 0
        while True:
            batches_in_epoch = len(groups) // p
            while batch >= first_batch_of_epoch + batches_in_epoch:
                first_batch_of_epoch += batches_in_epoch
                epoch += 1
                groups = self.epoch_groups(epoch)
                batches_in_epoch = len(groups) // p
            b = batch - first_batch_of_epoch
            mine = groups[b * p + self.rank * share:b * p + (self.rank + 1) * share]
            indices = np.concatenate(mine)
            for j in range(offset, per_rank_batch):
                position = (batch * p + self.rank * share) * k + j  # global position of the item
                yield int(indices[j]), sample_seed(self.seed, self.stream, position)
            batch, offset = batch + 1, 0
