"""Distributed stateful sampler, collate/augmentation and the resumable WindowLoader."""
import itertools

import numpy as np
import pytest
import torch

from tests.synth_recordings import make_cohort, make_config
from twinbrain.config import DataConfig
from twinbrain.data.module import DataModule
from twinbrain.data.sampler import WindowSampler, causal_moving_average, collate_windows


def _epoch(n, b, world, epoch=0, **kw):
    out = []
    for r in range(world):
        s = WindowSampler(n, b, world, r, seed=3, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_ranks_disjoint_and_complete():
    per_rank = _epoch(24, 4, 3)                            # 6 batches: 2 per rank, no padding
    flat = [i for batches in per_rank for b in batches for i in b]
    assert sorted(flat) == list(range(24))
    sets = [{i for b in batches for i in b} for batches in per_rank]
    assert all(not (a & c) for a, c in itertools.combinations(sets, 2))


@pytest.mark.parametrize("n,b,world", [(10, 3, 3), (7, 4, 2), (1, 2, 4), (13, 5, 4), (5, 1, 2)])
def test_equal_batch_counts_with_uneven_data(n, b, world):
    per_rank = _epoch(n, b, world)
    assert len({len(x) for x in per_rank}) == 1
    assert all(len(WindowSampler(n, b, world, r)) == len(per_rank[0]) for r in range(world))
    assert set(i for x in per_rank for bb in x for i in bb) == set(range(n))   # padding only repeats


def test_new_order_each_epoch_and_seeded():
    e0, e1 = _epoch(40, 5, 2, 0), _epoch(40, 5, 2, 1)
    assert e0 != e1 and e0 == _epoch(40, 5, 2, 0)
    assert _epoch(40, 5, 1, shuffle=False)[0][0] == [0, 1, 2, 3, 4]


def test_sampler_resume_mid_epoch():
    s = WindowSampler(50, 4, 2, 1, seed=7)
    s.set_epoch(2)
    it = iter(s)
    [next(it) for _ in range(3)]
    state = s.state_dict()
    rest = list(it)
    s2 = WindowSampler(50, 4, 2, 1, seed=7)
    s2.load_state_dict(state)
    assert list(s2) == rest and state["position"] == 3 and state["epoch"] == 2
    with pytest.raises(ValueError, match="does not match"):
        WindowSampler(50, 8, 2, 1, seed=7).load_state_dict(state)


def test_bucketing_gives_equal_size_batches():
    keys = np.random.default_rng(0).choice([3, 5, 7], size=61)
    seen = []
    for r in range(2):
        s = WindowSampler(61, 4, 2, r, seed=1, bucket_keys=keys)
        for b in s:
            assert len(set(keys[b])) == 1
            seen += b
    assert set(seen) == set(range(61))


def test_dummy_padding_flags_repeats():
    counts, real = [], []
    for r in range(3):
        s = WindowSampler(7, 2, 3, r, shuffle=False, pad="dummy")
        rb = s.rank_batches()
        counts.append(len(rb))
        real += [i for idx, pad in rb if not pad for i in idx]
    assert len(set(counts)) == 1 and sorted(real) == list(range(7))



def test_blocked_shuffle_reads_few_recordings_at_a_time():
    """``data.shuffle_block``: an epoch still holds every window once (over ranks, padding aside) with
    equal batch counts, walks the recordings ``block`` at a time (each block's windows together, in a
    new random order every epoch), is seeded, resumes exactly, and refuses a state of another block size."""
    group = np.repeat(np.arange(12), 5)[np.random.default_rng(0).permutation(60)]    # 12 recordings x 5 windows
    kw = dict(group_keys=group, block=3, bucket_keys=np.zeros(60, int))
    per_rank = _epoch(60, 4, 2, **kw)
    assert len({len(x) for x in per_rank}) == 1
    assert set(i for x in per_rank for b in x for i in b) == set(range(60))          # padding only repeats
    s = WindowSampler(60, 4, 1, 0, seed=3, **kw)
    assert sorted(np.concatenate(s.global_batches(0))) == list(range(60))
    for epoch in (0, 1):
        order = np.concatenate(s.global_batches(epoch))
        blocks = [set(group[order[k:k + 15]]) for k in range(0, 60, 15)]      # 3 recordings x 5 windows each
        assert all(len(b) == 3 for b in blocks) and set().union(*blocks) == set(range(12))
    assert not np.array_equal(np.concatenate(s.global_batches(0)), np.concatenate(s.global_batches(1)))
    assert _epoch(60, 4, 2, **kw) == per_rank
    plain = WindowSampler(60, 4, 1, 0, seed=3)
    assert len({tuple(sorted(set(group[order[k:k + 15]]))) for k in range(0, 60, 15)}) == 4
    assert len(set(group[np.concatenate(plain.global_batches(0))[:15]])) > 3      # a plain shuffle mixes them
    it = iter(s)
    head = [next(it) for _ in range(5)]
    state = s.state_dict()
    again = WindowSampler(60, 4, 1, 0, seed=3, **kw)
    again.load_state_dict(state)
    assert list(again) == list(it) and head
    other = WindowSampler(60, 4, 1, 0, seed=3, group_keys=group, block=4)
    with pytest.raises(ValueError, match="shuffle_block"):
        other.load_state_dict(state)
    legacy = {k: v for k, v in plain.state_dict().items() if k != "block"}     # saved before the key
    WindowSampler(60, 4, 1, 0, seed=3).load_state_dict(legacy)
    with pytest.raises(ValueError, match="group key"):
        WindowSampler(60, 4, 1, 0, block=2)


def test_causal_moving_average_matches_loop_and_is_causal():
    x = torch.randn(3, 17, 1)
    y = causal_moving_average(x, 4, dim=1)
    ref = torch.stack([x[:, max(0, t - 3):t + 1].mean(1) for t in range(17)], dim=1)
    torch.testing.assert_close(y, ref)
    x2 = x.clone()
    x2[:, 10:] += 100.0                                          # change the future only
    torch.testing.assert_close(causal_moving_average(x2, 4, dim=1)[:, :10], y[:, :10])


@pytest.fixture(scope="module")
def dm():
    cfg = make_config(val_subjects=1, test_subjects=1, augment_noise=0.1, augment_offset=0.2, augment_smooth=3)
    return DataModule(cfg, make_cohort(n_subjects=4)).setup()


def test_augmentation_changes_inputs_only(dm):
    windows = [dm.train_dataset[i] for i in range(3)]
    clean = collate_windows(windows)
    aug1 = collate_windows([dm.train_dataset[i] for i in range(3)], dm.cfg.data, torch.Generator().manual_seed(5))
    aug2 = collate_windows([dm.train_dataset[i] for i in range(3)], dm.cfg.data, torch.Generator().manual_seed(5))
    for m in ("fmri", "eeg"):
        assert torch.equal(aug1[m].y, clean[m].y) and torch.equal(clean[m].x, clean[m].y)
        assert not torch.allclose(aug1[m].x, aug1[m].y)
        assert torch.equal(aug1[m].x, aug2[m].x)                 # deterministic given the generator
    # causal: augmenting a signal whose future differs leaves the past identical (same generator)
    cfg = DataConfig(augment_smooth=4)
    b1 = collate_windows([dm.train_dataset[0]], cfg)
    w = dm.train_dataset[0]
    w["fmri"].x[:, 12:] += 50.0
    b2 = collate_windows([w], cfg)
    torch.testing.assert_close(b1["fmri"].x[:, :12], b2["fmri"].x[:, :12])


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(a[m].x, b[m].x) and torch.equal(a[m].y, b[m].y) for m in ("fmri", "eeg")) \
        and torch.equal(a.rec, b.rec) and torch.equal(a.start, b.start)


@pytest.mark.parametrize("stop", [2, 7])                         # mid-epoch and across an epoch boundary
def test_loader_resume_is_exact(dm, stop):
    loader = dm.train_loader(rank=1, world_size=2)
    n_epoch = len(loader)
    assert n_epoch < 7                                            # the run below crosses an epoch boundary
    it = iter(loader)
    _take(it, stop)
    state = loader.state_dict()
    ref = _take(it, 4)
    fresh = dm.train_loader(rank=1, world_size=2)
    fresh.load_state_dict(state)
    got = _take(iter(fresh), 4)
    assert all(_same(a, b) for a, b in zip(ref, got))
    assert fresh.epoch == loader.epoch


def test_loader_with_workers_matches_in_process(dm):
    a = _take(iter(dm.train_loader(0, 1)), 3)
    loader = dm.train_loader(0, 1)
    loader.num_workers = 1
    b = _take(iter(loader), 3)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert loader.state_dict()["sampler"]["position"] == 3
