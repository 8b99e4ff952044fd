"""Synthetic windows and batches that follow the batch schema in docs/ARCHITECTURE.md.

A plain module (not a test file) so every test can ``from tests.batches import make_batch``;
``tests/conftest.py`` also exposes the functions as fixtures.

Shapes (one window): ``['fmri'].x/.y [N_f, T_f, 1]``, ``['eeg'].x/.y [N_e, T_e, 1]`` with
``T_e = T_f * samples_per_tr``; ``mask [N] bool``, ``node_id [N] long``, ``pos [N, 3]``; three relations
``('fmri','fc','fmri')``, ``('eeg','fc','eeg')``, ``('eeg','to','fmri')`` with ``edge_index [2, E]`` and
``edge_weight [E]`` in (0, 1]; ``subject``, ``session``, ``rec``, ``start`` as ``[1]`` long.
"""
from __future__ import annotations

import math

import torch
from torch_geometric.data import Batch, HeteroData

RELATIONS = (("fmri", "fc", "fmri"), ("eeg", "fc", "eeg"), ("eeg", "to", "fmri"))


def tiny_model_config(**overrides):
    """A ``ModelConfig`` small enough for unit tests (hidden 16, 2 blocks, EEG patch 4 / stride 2, S = 2),
    matching windows of ``make_window(samples_per_tr=4)``; ``overrides`` replace fields."""
    from twinbrain.config import ModelConfig
    base = dict(hidden=16, heads=2, blocks=2, kernel_size=3, dropout=0.0, eeg_patch=4, eeg_stride=2,
                forecast_steps=2)
    base.update(overrides)
    return ModelConfig(**base)


def random_edges(n_src: int, n_dst: int, n_edges: int, gen: torch.Generator,
                 same_type: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_edges`` distinct src -> dst pairs (no self loops within one node type) and weights in [0.1, 1]."""
    pairs = [(s, d) for s in range(n_src) for d in range(n_dst) if not (same_type and s == d)]
    n_edges = min(n_edges, len(pairs))
    order = torch.randperm(len(pairs), generator=gen)[:n_edges]
    ei = torch.tensor([pairs[i] for i in order.tolist()], dtype=torch.long).reshape(-1, 2).t().contiguous()
    ew = 0.1 + 0.9 * torch.rand(n_edges, generator=gen)
    return ei, ew


def make_window(n_fmri: int = 6, n_eeg: int = 4, t_f: int = 8, samples_per_tr: int = 4,
                subject: int = 0, session: int = 0, seed: int = 0,
                n_edges_fmri: int | None = None, n_edges_eeg: int | None = None,
                n_edges_cross: int | None = None, masked_fmri: tuple[int, ...] = (),
                masked_eeg: tuple[int, ...] = (), signals: dict[str, torch.Tensor] | None = None,
                rec: int = 0, start: int = 0) -> HeteroData:
    """One random window per the schema. ``x == y`` (no augmentation); masked slots are zero.

    ``n_edges_*`` default to ``2 * n_dst``; pass 0 for an empty relation.  ``signals`` optionally gives
    ``{'fmri': [N_f, T_f], 'eeg': [N_e, T_e]}`` to use instead of white noise.
    """
    gen = torch.Generator().manual_seed(seed)
    t_e = t_f * samples_per_tr
    data = HeteroData()
    for m, n, t, masked in (("fmri", n_fmri, t_f, masked_fmri), ("eeg", n_eeg, t_e, masked_eeg)):
        sig = signals[m].float() if signals is not None else torch.randn(n, t, generator=gen)
        mask = torch.ones(n, dtype=torch.bool)
        mask[list(masked)] = False
        sig = sig * mask[:, None]
        data[m].x = sig[..., None].clone()
        data[m].y = sig[..., None].clone()
        data[m].mask = mask
        data[m].node_id = torch.arange(n)
        data[m].pos = torch.randn(n, 3, generator=gen)
    sizes = {"fmri": n_fmri, "eeg": n_eeg}
    counts = {RELATIONS[0]: n_edges_fmri, RELATIONS[1]: n_edges_eeg, RELATIONS[2]: n_edges_cross}
    for rel in RELATIONS:
        src, _, dst = rel
        n_e = 2 * sizes[dst] if counts[rel] is None else counts[rel]
        ei, ew = random_edges(sizes[src], sizes[dst], n_e, gen, same_type=src == dst)
        data[rel].edge_index = ei
        data[rel].edge_weight = ew
    data.subject = torch.tensor([subject])
    data.session = torch.tensor([session])
    data.rec = torch.tensor([rec])
    data.start = torch.tensor([start])
    return data


def make_batch(n_windows: int = 2, seed: int = 0, n_subjects: int = 2, n_sessions: int = 2,
               **kwargs) -> Batch:
    """``Batch.from_data_list`` of ``n_windows`` windows with seeds ``seed + i``, subject ``i % n_subjects``,
    session ``i % n_sessions``; ``kwargs`` go to :func:`make_window`."""
    windows = [make_window(subject=i % n_subjects, session=i % n_sessions, seed=seed + i, **kwargs)
               for i in range(n_windows)]
    return Batch.from_data_list(windows)


def oscillator_signals(n_fmri: int, n_eeg: int, t_f: int, samples_per_tr: int, seed: int,
                       period_f: float = 5.0, period_e: float = 6.0, noise: float = 0.05
                       ) -> dict[str, torch.Tensor]:
    """Linear dynamics for forecasting tests: every node is a damped AR(2) oscillator
    ``x[t+1] = 2 r cos(w) x[t] - r^2 x[t-1] + noise`` (period ``period_*`` steps, random phase), which
    persistence forecasts badly.  Returns ``{'fmri': [N_f, T_f], 'eeg': [N_e, T_e]}``, z-scored per node."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m, n, t, period in (("fmri", n_fmri, t_f, period_f), ("eeg", n_eeg, t_f * samples_per_tr, period_e)):
        w, r = 2 * math.pi / period, 0.97
        x = torch.zeros(n, t + 50)
        x[:, 0] = torch.randn(n, generator=gen)
        x[:, 1] = torch.randn(n, generator=gen)
        for k in range(2, t + 50):
            x[:, k] = 2 * r * math.cos(w) * x[:, k - 1] - r * r * x[:, k - 2] \
                + noise * torch.randn(n, generator=gen)
        x = x[:, 50:]
        out[m] = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)
    return out
