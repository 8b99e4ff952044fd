"""Distributed, seeded, stateful window sampling; collate with input-only augmentation; the per-rank loader.

Every rank computes the same global list of batches for an epoch (seeded by ``(seed, epoch)``) and takes
every ``num_replicas``-th batch, so ranks see disjoint windows and — after padding — the same number of
batches, which keeps every collective in lock-step.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from twinbrain.config import DataConfig
from twinbrain.schema import MODALITIES


class WindowSampler:
    """Batches of window indices for one rank.

    Args:
        num_windows: dataset size. batch_size: windows per batch.
        num_replicas / rank: data-parallel world size and this rank.
        seed: base seed; the order of epoch ``e`` depends only on ``(seed, e)``.
        shuffle: permute windows (and batches) every epoch; False = dataset order.
        bucket_keys: optional ``[num_windows]`` size key (e.g. node count); a batch then only holds
            windows with equal key.
        pad: 'wrap' (training) repeats batches from the start of the epoch so every rank gets the same
            count; 'dummy' (evaluation) repeats them too but flags them (:meth:`rank_batches`) so callers
            give them weight 0 and every real window counts exactly once across ranks.
        group_keys / block: with ``block > 0`` and ``group_keys`` ``[num_windows]`` (the recording of each
            window), a shuffled epoch permutes the recordings, walks them ``block`` at a time and shuffles
            windows only inside a block (``data.shuffle_block``): every rank reads from the same few
            recordings at a time, which a per-process cache and the page cache can hold at any cohort size.
            Every window still comes exactly once per epoch; batches may straddle two blocks.
    Iterating yields ``list[int]`` from the current position; ``state_dict`` captures (epoch, position).
    """

    def __init__(self, num_windows: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, bucket_keys: Sequence[int] | np.ndarray | None = None, pad: str = "wrap",
                 group_keys: Sequence[int] | np.ndarray | None = None, block: int = 0):
        if num_windows <= 0:
            raise ValueError("WindowSampler: the dataset has no window; check the split and data.window_s")
        if batch_size <= 0 or num_replicas <= 0 or not 0 <= rank < num_replicas:
            raise ValueError(f"WindowSampler: bad batch_size={batch_size}, num_replicas={num_replicas}, rank={rank}")
        if pad not in ("wrap", "dummy"):
            raise ValueError(f"WindowSampler: pad must be 'wrap' or 'dummy', got '{pad}'")
        if bucket_keys is not None and len(bucket_keys) != num_windows:
            raise ValueError(f"WindowSampler: {len(bucket_keys)} bucket keys for {num_windows} windows")
        if block < 0 or (block > 0 and (group_keys is None or len(group_keys) != num_windows)):
            raise ValueError(f"WindowSampler: block={block} needs >= 0 and, when > 0, one group key per window")
        self.num_windows, self.batch_size = int(num_windows), int(batch_size)
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        self.shuffle, self.pad = shuffle, pad
        self.bucket_keys = None if bucket_keys is None else np.asarray(bucket_keys)
        self.block = int(block)
        self.group_keys = None if self.block == 0 else np.asarray(group_keys)
        self.epoch, self.position = 0, 0
        self._cache: dict[int, list] = {}

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All batches of ``epoch`` (identical on every rank), before padding."""
        rng = np.random.default_rng([self.seed, epoch])
        blocked = self.shuffle and self.block > 0
        if blocked:
            order = self._block_order(rng)
        else:
            order = rng.permutation(self.num_windows) if self.shuffle else np.arange(self.num_windows)
        if self.bucket_keys is None:
            groups = [order]
        else:
            keys = self.bucket_keys[order]
            groups = [order[keys == k] for k in np.unique(keys)]      # permuted order kept inside a bucket
        batches = [g[i:i + self.batch_size] for g in groups for i in range(0, len(g), self.batch_size)]
        if blocked and self.bucket_keys is not None:                  # buckets interleaved, blocks kept in turn
            where = np.empty(self.num_windows, np.int64)
            where[order] = np.arange(self.num_windows)
            batches = [batches[j] for j in np.argsort([where[b[0]] for b in batches], kind="stable")]
        elif self.shuffle and self.bucket_keys is not None:
            batches = [batches[j] for j in rng.permutation(len(batches))]  # mix buckets over the epoch
        return batches

    def _block_order(self, rng: np.random.Generator) -> np.ndarray:
        """Window order of one blocked epoch: recordings permuted and cut into blocks of ``block``, windows
        permuted inside each block."""
        groups, inverse = np.unique(self.group_keys, return_inverse=True)
        rank_of_group = np.empty(len(groups), np.int64)
        rank_of_group[rng.permutation(len(groups))] = np.arange(len(groups))
        block_of_window = rank_of_group[inverse] // self.block
        return np.lexsort((rng.random(self.num_windows), block_of_window))

    def rank_batches(self, epoch: int | None = None) -> list[tuple[list[int], bool]]:
        """This rank's ``[(indices, is_padding)]`` for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._cache:
            batches = self.global_batches(epoch)
            n = len(batches)
            per_rank = math.ceil(n / self.num_replicas)
            mine = []
            for j in range(self.rank, per_rank * self.num_replicas, self.num_replicas):
                # Padding wraps around to the start, so an uneven split never leaves a rank waiting.
                mine.append((batches[j % n].tolist(), j >= n))
            if len(self._cache) >= 2:  # a loader may look one epoch ahead (prefetch at the boundary)
                self._cache.pop(min(self._cache))
            self._cache[epoch] = mine
        return self._cache[epoch]

    def __len__(self) -> int:
        """Batches per epoch on this rank (equal on every rank)."""
        return len(self.rank_batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches(self.epoch)
        while self.position < len(batches):
            idx = batches[self.position][0]
            self.position += 1  # advanced before yielding: the state now points at the NEXT batch
            yield idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_windows": self.num_windows,
                "batch_size": self.batch_size, "num_replicas": self.num_replicas, "rank": self.rank,
                "block": self.block}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at ``(epoch, position)``. With a different dataset size, batch size or world size the
        exact position cannot be recovered: ``strict`` raises; otherwise the saved epoch restarts."""
        state = {"block": 0, **state}            # states saved before data.shuffle_block walked all windows
        keys = ("seed", "num_windows", "batch_size", "num_replicas", "block")
        if not all(state[k] == getattr(self, k) for k in keys):
            msg = {k: (state[k], getattr(self, k)) for k in keys}
            if strict:
                raise ValueError(f"sampler state does not match (saved, now): {msg}; resume with the same data, "
                                 f"batch size, world size and data.shuffle_block, or load with strict=False to "
                                 f"restart the epoch")
            self.set_epoch(state["epoch"])
            return
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ------------------------------------------------------------------ collate and augmentation

def causal_moving_average(x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """Mean of the last ``length`` samples up to and including t along ``dim`` (fewer at the start).

    Causal: output at t depends only on inputs at ``<= t``.
    """
    if length <= 1:
        return x
    c = torch.cumsum(x, dim=dim)
    t = x.shape[dim]
    shifted = torch.zeros_like(c)
    if length < t:  # c[t - length] subtracted for t >= length
        shifted.narrow(dim, length, t - length).copy_(c.narrow(dim, 0, t - length))
    count = torch.clamp(torch.arange(1, t + 1, device=x.device, dtype=x.dtype), max=float(length))
    shape = [1] * x.dim()
    shape[dim] = t
    return (c - shifted) / count.view(shape)


def augment_batch(batch, augment: DataConfig, generator: torch.Generator | None = None):
    """Augment ``batch[m].x`` for m in (fmri, eeg) in place of the attribute (new tensor); ``y`` stays clean.

    Order: causal smoothing (``augment_smooth`` samples of each modality's own grid), then a constant
    per-node offset (std ``augment_offset``), then white noise (std ``augment_noise``); all in z-units.
    Missing slots (mask False) are left at 0.
    """
    for m in MODALITIES:
        x = batch[m].x                                                    # [N, T, 1]
        out = causal_moving_average(x, int(augment.augment_smooth), dim=1)
        if augment.augment_offset > 0:
            out = out + augment.augment_offset * torch.randn(x.shape[0], 1, x.shape[2], generator=generator,
                                                             dtype=x.dtype, device=x.device)
        if augment.augment_noise > 0:
            out = out + augment.augment_noise * torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                                           device=x.device)
        mask = batch[m].mask.view(-1, 1, 1).to(x.dtype)
        batch[m].x = out * mask
    return batch


def _active(augment: DataConfig | None) -> bool:
    return augment is not None and (augment.augment_noise > 0 or augment.augment_offset > 0
                                    or augment.augment_smooth > 1)


def collate_windows(windows: list, augment: DataConfig | None = None, generator: torch.Generator | None = None):
    """``Batch.from_data_list(windows)`` plus ``batch.weight`` ``[B]`` float32 (1 = real window); optional
    augmentation of the inputs only (deterministic given ``generator``)."""
    from torch_geometric.data import Batch
    batch = Batch.from_data_list(windows)
    batch.weight = torch.ones(len(windows), dtype=torch.float32)
    if _active(augment):
        augment_batch(batch, augment, generator)
    return batch


def _collate_clean(windows: list):
    return collate_windows(windows, None, None)


class WindowLoader:
    """Batches for one rank: dataset + sampler + augmentation seed.

    ``infinite=True`` (training): iterates across epochs forever (the epoch advances automatically).
    ``infinite=False`` (evaluation): one pass over the sampler's current epoch, restarting at position 0
    on every ``iter()``. Padding batches of a 'dummy' sampler carry ``batch.weight == 0``.
    Augmentation of batch ``(epoch, position)`` uses a generator seeded from ``(seed, rank, epoch, position)``,
    so it does not depend on workers or prefetching and resumes exactly. With ``num_workers > 0`` a torch
    DataLoader loads and collates clean batches in workers from the index lists this loader dictates; the
    augmentation runs here, in the main process.
    Resume: ``load_state_dict`` then take a NEW ``iter(loader)``; the first batch is the one after the
    last batch handed out before ``state_dict`` was taken.
    """

    def __init__(self, dataset, sampler: WindowSampler, *, augment: DataConfig | None = None, seed: int = 0,
                 num_workers: int = 0, infinite: bool = True, device: torch.device | str | None = None):
        self.dataset, self.sampler, self.augment = dataset, sampler, augment
        # Batches are moved to ``device`` before augmentation, so the noise is drawn there (on a GPU the
        # host-side random draws were half of the step time); the seed per batch keeps resume exact.
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seed, self.num_workers, self.infinite = int(seed), int(num_workers), infinite

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def _schedule(self, epoch: int, position: int) -> Iterator[tuple[int, int, list[int], bool]]:
        """``(epoch, position, indices, is_padding)`` from a start state onwards (no side effects)."""
        while True:
            batches = self.sampler.rank_batches(epoch)
            for p in range(position, len(batches)):
                yield epoch, p, batches[p][0], batches[p][1]
            if not self.infinite:
                return
            epoch, position = epoch + 1, 0

    def _generator(self, epoch: int, position: int) -> torch.Generator:
        seq = np.random.SeedSequence([self.seed, self.sampler.rank, epoch, position])
        return torch.Generator(device=self.device).manual_seed(
            int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))

    def __iter__(self):
        if not self.infinite:
            self.sampler.position = 0
        sched = list(self._schedule(self.sampler.epoch, self.sampler.position)) if not self.infinite else None
        plan = iter(sched) if sched is not None else self._schedule(self.sampler.epoch, self.sampler.position)
        if self.num_workers > 0:
            from torch.utils.data import DataLoader
            order = iter(sched) if sched is not None else self._schedule(self.sampler.epoch, self.sampler.position)
            loader = DataLoader(self.dataset, batch_sampler=_IndexLists(order), collate_fn=_collate_clean,
                                num_workers=self.num_workers)
            clean = iter(loader)
        else:
            clean = None
        for epoch, pos, idx, is_pad in plan:
            batch = next(clean) if clean is not None else _collate_clean([self.dataset[i] for i in idx])
            if is_pad and self.sampler.pad == "dummy":
                batch.weight = torch.zeros_like(batch.weight)
            if self.device.type != "cpu":
                batch = batch.to(self.device, non_blocking=True)
            if _active(self.augment):
                augment_batch(batch, self.augment, self._generator(epoch, pos))
            # The state now names the batch AFTER the one being handed out.
            if pos + 1 < len(self.sampler.rank_batches(epoch)) or not self.infinite:
                self.sampler.epoch, self.sampler.position = epoch, pos + 1
            else:
                self.sampler.set_epoch(epoch + 1)
            yield batch

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "seed": self.seed}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.sampler.load_state_dict(state["sampler"], strict=strict)
        self.seed = int(state["seed"])


class _IndexLists:
    """A batch sampler replaying a precomputed schedule (DataLoader iterates it in the main process)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __iter__(self):
        for _, _, idx, _ in self.schedule:
            yield idx
