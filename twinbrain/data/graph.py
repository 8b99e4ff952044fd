"""Connectivity and graph construction (fMRI-fMRI, EEG-EEG, EEG->fMRI), computed on fit spans only.

Edges are chosen by k-NN on a similarity in [0, 1] plus a threshold; ``edge_weight`` is that similarity.
Connectivity is computed ONLY on the span(s) it is given (the training span), never on evaluation
windows, so a graph cannot carry information about data it will be evaluated on.

Axes: fMRI ``[R, T]`` (regions x volumes), EEG ``[C, S]`` (channels x samples), similarity matrices
``[R, R]``, ``[C, C]`` and cross ``[C, R]`` (channel x region). Edges are ``src -> dst``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from twinbrain.config import GraphConfig
from twinbrain.data.mapped import release_recording
from twinbrain.data.timing import channel_mask, eeg_index, eeg_span, span_volumes
from twinbrain.data.types import Recording

FMRI_FC = ("fmri", "fc", "fmri")
EEG_FC = ("eeg", "fc", "eeg")
EEG_TO_FMRI = ("eeg", "to", "fmri")
RELATIONS = (FMRI_FC, EEG_FC, EEG_TO_FMRI)


@dataclass
class GraphEdges:
    """Edges per relation: ``edge_index[key]`` ``[2, E]`` int64 (src, dst), ``edge_weight[key]`` ``[E]`` float32."""
    n_fmri: int
    n_eeg: int
    edge_index: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict)
    edge_weight: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in RELATIONS:  # every relation always present (possibly E = 0)
            self.edge_index.setdefault(key, np.zeros((2, 0), dtype=np.int64))
            self.edge_weight.setdefault(key, np.zeros(0, dtype=np.float32))

    def num_edges(self) -> dict[str, int]:
        return {"__".join(k): int(self.edge_index[k].shape[1]) for k in RELATIONS}

    def torch(self, key: tuple[str, str, str]):
        """``(edge_index LongTensor [2, E], edge_weight FloatTensor [E])`` for one relation."""
        import torch
        return (torch.from_numpy(np.ascontiguousarray(self.edge_index[key], dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(self.edge_weight[key], dtype=np.float32)))


# ------------------------------------------------------------------ similarity measures

def abs_corr(x: np.ndarray) -> np.ndarray:
    """``|Pearson r|`` between rows of ``x`` ``[N, T]`` -> ``[N, N]`` in [0, 1], diagonal 0.

    Constant rows (missing slots) get 0 similarity to everything instead of NaN.
    """
    xc = np.array(x, dtype=np.float64)                 # one working copy, centred in place
    xc -= xc.mean(axis=1, keepdims=True)
    norm = np.sqrt(np.einsum("ij,ij->i", xc, xc))
    ok = norm > 1e-12 * max(1.0, float(norm.max(initial=0.0)))
    inv = np.where(ok, 1.0 / np.where(ok, norm, 1.0), 0.0)
    # Scale the small [N, N] Gram matrix rather than the long [N, T] signal.
    r = np.abs((xc @ xc.T) * inv[:, None] * inv[None, :])
    np.fill_diagonal(r, 0.0)
    return np.clip(r, 0.0, 1.0)


def band_coherence(x: np.ndarray, sfreq: float, band: tuple[float, float],
                   seg_s: float = 1.0, chunk: int = 64) -> np.ndarray:
    """Magnitude-squared coherence averaged over ``band`` (Hz): ``x`` ``[C, S]`` -> ``[C, C]`` in [0, 1].

    Welch estimate with Hann windows of ``seg_s`` seconds and 50 % overlap, vectorised over channel
    pairs: cross-spectra ``[F_band, C, C]`` are accumulated over chunks of segments to bound memory.
    """
    x = np.asarray(x, dtype=np.float64)
    c, s = x.shape
    nper = min(s, max(8, int(round(seg_s * sfreq))))
    step = max(1, nper // 2)
    starts = np.arange(0, s - nper + 1, step)
    freqs = np.fft.rfftfreq(nper, 1.0 / sfreq)
    lo, hi = band[0], min(band[1], sfreq / 2)
    sel = np.flatnonzero((freqs >= lo) & (freqs <= hi))
    if sel.size == 0 or starts.size == 0:
        return np.zeros((c, c))
    win = np.hanning(nper)
    sxy = np.zeros((sel.size, c, c), dtype=np.complex128)           # [F, C, C] cross-spectra
    offs = np.arange(nper)
    for i in range(0, starts.size, chunk):  # loop over segment chunks, not node pairs
        seg = x[:, starts[i:i + chunk, None] + offs]              # [C, K, nper]
        seg = (seg - seg.mean(axis=2, keepdims=True)) * win
        f = np.ascontiguousarray(np.fft.rfft(seg, axis=2)[:, :, sel].transpose(2, 0, 1))  # [F, C, K]
        # optimize=True routes this through BLAS; plain complex batched matmul was ~7x slower here.
        sxy += np.einsum("fck,fdk->fcd", f, f.conj(), optimize=True)
    pxx = np.real(np.diagonal(sxy, axis1=1, axis2=2))             # [F, C] auto-spectra
    denom = pxx[:, :, None] * pxx[:, None, :]
    msc = np.where(denom > 0, np.abs(sxy) ** 2 / np.where(denom > 0, denom, 1.0), 0.0)
    out = np.clip(msc.mean(axis=0), 0.0, 1.0)
    np.fill_diagonal(out, 0.0)
    return out


def eeg_power_per_volume(rec: Recording, v0: int, v1: int) -> tuple[np.ndarray, int, int]:
    """Mean squared EEG amplitude per fMRI volume: ``[C, V]`` for the volumes ``[a, b)`` EEG fully covers.

    Returns ``(power, a, b)``; volumes in ``[v0, v1)`` without complete EEG are dropped.
    """
    bounds = eeg_index(rec, np.arange(v0, v1 + 1) * rec.tr)       # [V + 1] sample boundaries
    full = (bounds[:-1] >= 0) & (bounds[1:] <= rec.eeg.shape[1]) & (bounds[1:] > bounds[:-1])
    idx = np.flatnonzero(full)
    if idx.size == 0:
        return np.zeros((rec.eeg.shape[0], 0)), v0, v0
    a, b = int(idx[0]), int(idx[-1]) + 1                             # contiguous run inside the span
    edges = bounds[a:b + 1]
    sq = np.asarray(rec.eeg[:, edges[0]:edges[-1]], dtype=np.float64) ** 2
    power = np.add.reduceat(sq, edges[:-1] - edges[0], axis=1) / np.diff(edges)[None, :]
    return power, v0 + a, v0 + b


def lag_volumes(tr: float, lag_min_s: float, lag_max_s: float) -> np.ndarray:
    """Whole-volume lags inside ``[lag_min_s, lag_max_s]``; the nearest one if none fits (TR > range)."""
    lags = np.arange(math.ceil(lag_min_s / tr - 1e-6), math.floor(lag_max_s / tr + 1e-6) + 1)
    if lags.size == 0:
        lags = np.array([int(round(0.5 * (lag_min_s + lag_max_s) / tr))])
    return lags.astype(np.int64)


def lagged_cross_corr(power: np.ndarray, bold: np.ndarray, lags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max over lags of ``|r(power[c, t], bold[r, t + lag])|`` (EEG leads BOLD).

    power ``[C, V]``, bold ``[R, V]`` on the same volumes. Returns ``(r [C, R], best_lag [C, R])``
    (lags in volumes). Lags leaving fewer than 3 overlapping volumes are skipped.
    """
    c, r = power.shape[0], bold.shape[0]
    best = np.zeros((c, r))
    best_lag = np.zeros((c, r), dtype=np.int64)
    v = power.shape[1]
    for lag in lags:  # a handful of lags; each one is a single [C, R] matrix product
        n = v - int(lag)
        if lag < 0 or n < 3:
            continue
        rc = _corr_between(power[:, :n], bold[:, lag:lag + n])
        better = rc > best
        best = np.where(better, rc, best)
        best_lag = np.where(better, lag, best_lag)
    return best, best_lag


def _corr_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|r|`` between rows of ``a`` ``[A, n]`` and rows of ``b`` ``[B, n]`` -> ``[A, B]``."""
    def unit(x):
        xc = np.array(x, dtype=np.float64)
        xc -= xc.mean(axis=1, keepdims=True)
        nrm = np.sqrt(np.einsum("ij,ij->i", xc, xc))
        ok = nrm > 1e-12 * max(1.0, float(nrm.max(initial=0.0)))
        xc *= np.where(ok, 1.0 / np.where(ok, nrm, 1.0), 0.0)[:, None]
        return xc
    return np.clip(np.abs(unit(np.asarray(a, np.float64)) @ unit(np.asarray(b, np.float64)).T), 0.0, 1.0)


# ------------------------------------------------------------------ edges from similarity

def knn_edges(sim: np.ndarray, k: int, threshold: float, symmetric: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """k-NN + threshold on a square similarity ``[N, N]``.

    Every node receives edges from its ``k`` most similar nodes with similarity > ``threshold``
    (no self loops). FC is undirected, so with ``symmetric`` the edge set is the union with its
    reverse (in-degree may then exceed ``k``). Returns ``edge_index [2, E]`` int64 (row 0 = src)
    and ``edge_weight [E]`` float32 = similarity, in (0, 1].
    """
    n = sim.shape[0]
    k = min(int(k), n - 1)
    if k <= 0:
        return np.zeros((2, 0), np.int64), np.zeros(0, np.float32)
    s = np.nan_to_num(np.asarray(sim, dtype=np.float64), nan=0.0)
    s = s.copy()
    np.fill_diagonal(s, -np.inf)
    nbr = np.argpartition(-s, k - 1, axis=1)[:, :k]               # [N, k] sources per destination
    dst = np.repeat(np.arange(n), k)
    src = nbr.ravel()
    keep = s[dst, src] > threshold
    adj = np.zeros((n, n), dtype=bool)
    adj[src[keep], dst[keep]] = True
    if symmetric:
        adj |= adj.T
    src, dst = np.nonzero(adj)
    w = s[src, dst] if not symmetric else np.maximum(s[src, dst], s[dst, src])
    return np.stack([src, dst]).astype(np.int64), np.clip(w, 0.0, 1.0).astype(np.float32)


def topk_bipartite(sim: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For every source row of ``sim`` ``[N_src, N_dst]``, edges to its top-``k`` destinations above ``threshold``."""
    n_src, n_dst = sim.shape
    k = min(int(k), n_dst)
    if k <= 0 or n_src == 0:
        return np.zeros((2, 0), np.int64), np.zeros(0, np.float32)
    s = np.nan_to_num(np.asarray(sim, dtype=np.float64), nan=0.0)
    nbr = np.argpartition(-s, k - 1, axis=1)[:, :k]
    src = np.repeat(np.arange(n_src), k)
    dst = nbr.ravel()
    w = s[src, dst]
    keep = w > threshold
    order = np.lexsort((dst[keep], src[keep]))                     # deterministic edge order
    ei = np.stack([src[keep][order], dst[keep][order]]).astype(np.int64)
    return ei, np.clip(w[keep][order], 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------ per-recording connectivity

@dataclass
class Connectivity:
    """Similarities of one recording (or a group average): fmri ``[R, R]``, eeg ``[C, C]``, cross ``[C, R]``.

    ``fmri_mask`` ``[R]`` / ``eeg_mask`` ``[C]``: slots with data (pairs with a missing slot are ignored
    when averaging over recordings).
    """
    fmri: np.ndarray
    eeg: np.ndarray
    cross: np.ndarray
    fmri_mask: np.ndarray
    eeg_mask: np.ndarray


def connectivity(rec: Recording, span: tuple[float, float], gcfg: GraphConfig,
                 eeg_band: tuple[float, float] = (1.0, 40.0)) -> Connectivity:
    """Connectivity of ``rec`` from data inside ``span = (start_s, end_s)`` only (fMRI clock, s)."""
    v0, v1 = span_volumes(rec, *span)
    if v1 - v0 < 3:
        raise ValueError(f"{rec.key}: fit span {span} s holds only {v1 - v0} volumes; "
                         f"need at least 3 to estimate connectivity")
    bold = np.asarray(rec.fmri[:, v0:v1], dtype=np.float64)          # [R, V]
    fm = np.asarray(rec.region_mask, dtype=bool)
    em = channel_mask(rec)
    fmri = abs_corr(bold)
    s0, s1 = eeg_span(rec, v0, v1)
    eeg = rec.eeg[:, s0:s1]                                            # [C, S_span]
    if gcfg.eeg_measure == "coherence":
        eeg_sim = band_coherence(eeg, rec.eeg_sfreq, eeg_band)
    else:
        eeg_sim = abs_corr(eeg)
    power, a, b = eeg_power_per_volume(rec, v0, v1)                   # [C, V'] on volumes [a, b)
    lags = lag_volumes(rec.tr, gcfg.cross_lag_min_s, gcfg.cross_lag_max_s)
    cross, _ = lagged_cross_corr(power, np.asarray(rec.fmri[:, a:b], np.float64), lags)
    pair_f, pair_e = np.outer(fm, fm), np.outer(em, em)
    return Connectivity(fmri * pair_f, eeg_sim * pair_e, cross * np.outer(em, fm), fm, em)


def average_connectivity(conns: list[Connectivity]) -> Connectivity:
    """Mean over recordings, per pair counting only recordings where both slots have data."""
    def mean(vals, masks):
        num = np.sum([v * m for v, m in zip(vals, masks)], axis=0)
        den = np.sum(masks, axis=0)
        return np.where(den > 0, num / np.maximum(den, 1), 0.0)
    fm = [np.outer(c.fmri_mask, c.fmri_mask) for c in conns]
    em = [np.outer(c.eeg_mask, c.eeg_mask) for c in conns]
    cm = [np.outer(c.eeg_mask, c.fmri_mask) for c in conns]
    return Connectivity(mean([c.fmri for c in conns], fm), mean([c.eeg for c in conns], em),
                        mean([c.cross for c in conns], cm),
                        np.any([c.fmri_mask for c in conns], axis=0), np.any([c.eeg_mask for c in conns], axis=0))


def edges_from_connectivity(conn: Connectivity, gcfg: GraphConfig) -> GraphEdges:
    """k-NN + threshold edges for the three relations (plus optional structural fMRI edges)."""
    r, c = conn.fmri.shape[0], conn.eeg.shape[0]
    ei_f, w_f = knn_edges(conn.fmri, gcfg.k_fmri, gcfg.threshold)
    if gcfg.structural:
        ei_f, w_f = _merge_structural(ei_f, w_f, gcfg, r)
    ei_e, w_e = knn_edges(conn.eeg, gcfg.k_eeg, gcfg.threshold)
    ei_x, w_x = topk_bipartite(conn.cross, gcfg.k_cross, gcfg.threshold)
    return GraphEdges(r, c, {FMRI_FC: ei_f, EEG_FC: ei_e, EEG_TO_FMRI: ei_x},
                      {FMRI_FC: w_f, EEG_FC: w_e, EEG_TO_FMRI: w_x})


def load_structural(path: str, r: int) -> np.ndarray:
    """Structural connectivity ``[R, R]`` from a ``.npy``: absolute, symmetrised, scaled to max 1."""
    try:
        sc = np.load(path)
    except OSError as exc:
        raise ValueError(f"graph.structural: cannot read '{path}': {exc}") from exc
    if sc.shape != (r, r):
        raise ValueError(f"graph.structural: '{path}' is {sc.shape}, expected [R, R] = ({r}, {r}) "
                         f"matching the atlas slots")
    sc = np.abs(np.nan_to_num(sc.astype(np.float64)))
    sc = np.maximum(sc, sc.T)
    return sc / sc.max() if sc.max() > 0 else sc


def _merge_structural(ei: np.ndarray, w: np.ndarray, gcfg: GraphConfig, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Union of the FC edges with k-NN edges of the structural matrix (scaled to max 1); weight = max."""
    sc = load_structural(gcfg.structural, r)
    ei_s, w_s = knn_edges(sc, gcfg.k_fmri, gcfg.threshold)
    dense = np.zeros((r, r))
    dense[ei[0], ei[1]] = w
    dense[ei_s[0], ei_s[1]] = np.maximum(dense[ei_s[0], ei_s[1]], w_s)
    src, dst = np.nonzero(dense)
    return np.stack([src, dst]).astype(np.int64), dense[src, dst].astype(np.float32)


def _check_same_slots(recs: list[Recording]) -> None:
    ref = recs[0]
    for rec in recs[1:]:
        if rec.fmri.shape[0] != ref.fmri.shape[0] or rec.eeg.shape[0] != ref.eeg.shape[0]:
            raise ValueError(f"{rec.key}: {rec.fmri.shape[0]} regions x {rec.eeg.shape[0]} channels but "
                             f"{ref.key} has {ref.fmri.shape[0]} x {ref.eeg.shape[0]}; a group graph needs fixed "
                             f"atlas/channel slots (map missing ones to masked slots)")


def build_run_graph(rec: Recording, span: tuple[float, float], gcfg: GraphConfig,
                    eeg_band: tuple[float, float] = (1.0, 40.0)) -> GraphEdges:
    """Graph of one recording from its fit span ``(start_s, end_s)`` (graph.scope == 'run')."""
    return edges_from_connectivity(connectivity(rec, span, gcfg, eeg_band), gcfg)


def build_group_graph(recs: list[Recording], spans: list[tuple[float, float]], gcfg: GraphConfig,
                      eeg_band: tuple[float, float] = (1.0, 40.0)) -> GraphEdges:
    """One graph for every window (graph.scope == 'group'): connectivity of each training recording
    on its training span (``spans[i]`` belongs to ``recs[i]``), averaged per pair, then k-NN."""
    if not recs or len(recs) != len(spans):
        raise ValueError(f"build_group_graph: need one span per recording, got {len(recs)} recordings "
                         f"and {len(spans)} spans")
    _check_same_slots(recs)
    conns = []
    for rec, span in zip(recs, spans):
        conns.append(connectivity(rec, span, gcfg, eeg_band))
        release_recording(rec)                    # a mapped cohort streams through in O(one recording)
    return edges_from_connectivity(average_connectivity(conns), gcfg)
