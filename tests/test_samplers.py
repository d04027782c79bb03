"""Samplers: rank shares partition each epoch, reshuffling, P x K batches, exact continuation from a position."""
from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest

from data.samplers import IdentitySampler, ShuffleSampler, sample_seed


def take(sampler, n):
    return list(islice(iter(sampler), n))


def test_shuffle_ranks_partition_every_epoch():
    n, world = 23, 3  # not divisible: the stream runs on across epoch boundaries
    per_rank = [take(ShuffleSampler(n, seed=5, rank=r, world_size=world), 40) for r in range(world)]
    # Interleave the ranks back into the global stream and cut it into epochs.
    stream = [per_rank[p % world][p // world][0] for p in range(40 * world)]
    for epoch in range(len(stream) // n):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_shuffle_epoch_shares_are_disjoint_and_cover():
    n, world = 24, 2
    shares = [[i for i, _ in take(ShuffleSampler(n, seed=1, rank=r, world_size=world), n // world)]
              for r in range(world)]
    assert set(shares[0]).isdisjoint(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(n))


def test_shuffle_reshuffles_each_epoch_and_streams_differ():
    s = ShuffleSampler(50, seed=0)
    assert list(s.epoch_order(0)) != list(s.epoch_order(1))
    a = [i for i, _ in take(ShuffleSampler(50, seed=0, stream=0), 50)]
    b = [i for i, _ in take(ShuffleSampler(50, seed=0, stream=1), 50)]
    assert a != b and sorted(a) == sorted(b)


@pytest.mark.parametrize("start", [0, 1, 7, 23, 61])
def test_shuffle_resumes_exactly(start):
    whole = take(ShuffleSampler(23, seed=9, rank=1, world_size=2), 90)
    resumed = take(ShuffleSampler(23, seed=9, rank=1, world_size=2, start=start), 90 - start)
    assert resumed == whole[start:]


def test_sample_seeds_are_distinct_and_stable():
    seeds = [s for _, s in take(ShuffleSampler(10, seed=3), 100)]
    assert len(set(seeds)) == 100
    assert seeds[42] == sample_seed(3, 0, 42)
    assert 0 <= max(seeds) < 2**63


def test_too_many_ranks_is_an_error():
    with pytest.raises(ValueError, match="cannot feed"):
        ShuffleSampler(3, seed=0, rank=0, world_size=4)


def labels_for(counts):
    return [pid for pid, c in enumerate(counts) for _ in range(c)]


def test_identity_batches_are_p_by_k():
    labels = labels_for([5, 3, 8, 1, 4, 6, 2, 7])
    p, k = 4, 2
    items = take(IdentitySampler(labels, batch_size=p * k, num_instances=k, seed=0), p * k * 30)
    for b in range(30):
        batch = items[b * p * k:(b + 1) * p * k]
        counts = Counter(labels[i] for i, _ in batch)
        assert len(counts) == p and set(counts.values()) == {k}


def test_identity_ranks_hold_whole_identities_and_differ():
    labels = labels_for([4] * 12)
    world, batch, k = 2, 8, 2  # 4 identities per global batch, 2 per rank
    shares = [take(IdentitySampler(labels, batch_size=batch, num_instances=k, seed=1, rank=r, world_size=world), 40)
              for r in range(world)]
    for b in range(10):
        ids = [Counter(labels[i] for i, _ in share[b * 4:(b + 1) * 4]) for share in shares]
        assert all(len(c) == 2 and set(c.values()) == {k} for c in ids)
        assert set(ids[0]).isdisjoint(ids[1])  # one global batch: distinct identities over the ranks


def test_identity_epoch_visits_nearly_every_image():
    labels = labels_for([4, 6, 8, 4, 10, 4, 6, 2] * 4)
    sampler = IdentitySampler(labels, batch_size=8, num_instances=2, seed=2)
    for epoch in range(3):
        seen = {int(i) for g in sampler.epoch_groups(epoch) for i in g}
        assert len(seen) >= 0.9 * len(labels)
        assert {labels[i] for i in seen} == set(labels)


@pytest.mark.parametrize("start", [0, 3, 8, 50])
def test_identity_resumes_exactly(start):
    labels = labels_for([5, 3, 8, 1, 4, 6, 2, 7])
    make = lambda s: IdentitySampler(labels, batch_size=8, num_instances=2, seed=4, rank=1, world_size=2, start=s)
    whole = take(make(0), 120)
    assert take(make(start), 120 - start) == whole[start:]


def test_identity_sampler_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="multiple of num_instances"):
        IdentitySampler([0, 1], batch_size=5, num_instances=2, seed=0)
    with pytest.raises(ValueError, match="identities"):
        IdentitySampler([0, 0, 1, 1], batch_size=8, num_instances=2, seed=0)
    with pytest.raises(ValueError, match="processes"):
        IdentitySampler(labels_for([2] * 8), batch_size=6, num_instances=2, seed=0, world_size=2)
