"""Streaming forecast metrics: global-mean R², pooled Pearson r, Gaussian CRPS and interval coverage.

Every accumulator keeps only float64 *sums*, so it can be fed in chunks of any size, merged with another
accumulator (``merge``) and summed over ranks (``all_reduce``), and the result equals one pass over all
the data at once. Nothing here knows about the model: inputs are tensors of predictions and targets.

Shapes: ``pred`` and ``target`` have the same shape. With ``horizons=None`` everything is pooled into one
number. With ``horizons=H`` the *last* axis is the forecast horizon (size ``H``) and every statistic is kept
per horizon (``compute()`` returns ``[H]``). ``mask`` (bool, or 0/1 float) must broadcast to ``target``
by torch rules, e.g. a node mask ``[N]`` for ``[N, L, F]`` data is passed as ``mask[:, None, None]``.

R² is against the *global* mean of the accumulated targets: SS_tot = Σy² − n·ȳ², never a per-window mean
(which would reward a model for knowing each window's mean).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

Tensor = torch.Tensor


def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Sum ``tensors`` over all ranks with a single collective; identity without a process group.

    The tensors are packed into one float64 buffer so any number of accumulators costs one all-reduce.
    Every rank must call this with the same shapes in the same order. NCCL needs CUDA tensors, so the
    buffer lives on the current CUDA device for an NCCL group and on the CPU otherwise.
    """
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    backend = str(dist.get_backend())
    device = torch.device("cpu")
    if "gloo" not in backend and "mpi" not in backend and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].reshape(t.shape).to(t.device))
        i += t.numel()
    return out


class _Accumulator:
    """Base: a dict of float64 sum tensors, created at construction so every rank has the same state."""

    def __init__(self, horizons: int | None = None):
        if horizons is not None and horizons < 1:
            raise ValueError(f"horizons must be >= 1 or None, got {horizons}")
        self.horizons = horizons
        self.reset()

    # subclasses: field name -> extra trailing shape (after the optional horizon axis)
    def _fields(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def reset(self) -> None:
        lead = () if self.horizons is None else (self.horizons,)
        self.state = {k: torch.zeros(lead + extra, dtype=torch.float64)
                      for k, extra in self._fields().items()}

    def _prepare(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """float64 ``pred``, ``target`` and a 0/1 weight, all one shape; moves the state to their device."""
        if pred.shape != target.shape:
            raise ValueError(f"{type(self).__name__}: pred {tuple(pred.shape)} and target "
                             f"{tuple(target.shape)} differ; align them before updating")
        if self.horizons is not None and (target.ndim == 0 or target.shape[-1] != self.horizons):
            raise ValueError(f"{type(self).__name__}: last axis must be the horizon axis of size "
                             f"{self.horizons}, got shape {tuple(target.shape)}")
        y = target.detach().to(torch.float64)
        p = pred.detach().to(device=y.device, dtype=torch.float64)
        if mask is None:
            w = torch.ones_like(y)
        else:
            try:
                w = torch.broadcast_to(mask.detach().to(device=y.device, dtype=torch.float64), y.shape)
            except RuntimeError as exc:
                raise ValueError(f"{type(self).__name__}: mask {tuple(mask.shape)} does not broadcast to "
                                 f"{tuple(y.shape)}; add singleton axes, e.g. mask[:, None, None]") from exc
            # Masked entries may hold NaN (missing slots); zero them so 0 * NaN cannot poison the sums.
            p = torch.where(w > 0, p, torch.zeros_like(p))
            y = torch.where(w > 0, y, torch.zeros_like(y))
        if self.state and next(iter(self.state.values())).device != y.device:
            self.state = {k: v.to(y.device) for k, v in self.state.items()}
        return p, y, w

    def _sum(self, x: Tensor) -> Tensor:
        """Sum over every axis except the horizon axis (kept when ``horizons`` is set)."""
        return x.sum() if self.horizons is None else x.reshape(-1, self.horizons).sum(0)

    def merge(self, other: "_Accumulator") -> "_Accumulator":
        """Add ``other``'s sums into this one (same type and horizons); returns self."""
        if type(other) is not type(self) or other.horizons != self.horizons:
            raise ValueError(f"cannot merge {type(other).__name__}(horizons={other.horizons}) into "
                             f"{type(self).__name__}(horizons={self.horizons})")
        for k, v in self.state.items():
            if other.state[k].shape != v.shape:
                raise ValueError(f"cannot merge: state '{k}' has shape {tuple(other.state[k].shape)}, "
                                 f"expected {tuple(v.shape)}")
            self.state[k] = v + other.state[k].to(v.device)
        return self

    def all_reduce(self) -> "_Accumulator":
        """Sum the state over all ranks (no-op without torch.distributed); returns self."""
        keys = list(self.state)
        self.state = dict(zip(keys, all_reduce_sum([self.state[k] for k in keys])))
        return self

    @property
    def count(self) -> Tensor:
        """Number of (unmasked) elements seen, ``[]`` or ``[H]``."""
        return self.state["n"].cpu()


class R2Accumulator(_Accumulator):
    """Coefficient of determination against the global mean of the targets.

    R² = 1 − SS_res / SS_tot with SS_res = Σ(y − ŷ)² and SS_tot = Σy² − n·ȳ². The truth scores 1, the
    constant global-mean predictor scores 0, worse-than-mean predictors are negative. NaN when no data
    or constant targets.
    """

    def _fields(self) -> dict[str, tuple[int, ...]]:
        return {"n": (), "sum_y": (), "sum_y2": (), "ss_res": ()}

    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        p, y, w = self._prepare(pred, target, mask)
        s = self.state
        s["n"] += self._sum(w)
        s["sum_y"] += self._sum(w * y)
        s["sum_y2"] += self._sum(w * y * y)
        s["ss_res"] += self._sum(w * (y - p) ** 2)

    def compute(self) -> Tensor:
        """R², float64 on CPU: ``[]`` or ``[H]``."""
        s = {k: v.cpu() for k, v in self.state.items()}
        n = s["n"]
        ss_tot = s["sum_y2"] - s["sum_y"] ** 2 / n.clamp_min(1)
        r2 = 1.0 - s["ss_res"] / ss_tot
        return torch.where((n > 0) & (ss_tot > 0), r2, torch.full_like(r2, math.nan))

    def mse(self) -> Tensor:
        """Mean squared error, ``[]`` or ``[H]`` (NaN without data)."""
        n = self.state["n"].cpu()
        return torch.where(n > 0, self.state["ss_res"].cpu() / n.clamp_min(1), torch.full_like(n, math.nan))


class PearsonAccumulator(_Accumulator):
    """Pearson correlation of all (pred, target) pairs pooled together, from running sums."""

    def _fields(self) -> dict[str, tuple[int, ...]]:
        return {"n": (), "sx": (), "sy": (), "sxx": (), "syy": (), "sxy": ()}

    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        x, y, w = self._prepare(pred, target, mask)
        s = self.state
        s["n"] += self._sum(w)
        s["sx"] += self._sum(w * x)
        s["sy"] += self._sum(w * y)
        s["sxx"] += self._sum(w * x * x)
        s["syy"] += self._sum(w * y * y)
        s["sxy"] += self._sum(w * x * y)

    def compute(self) -> Tensor:
        """Pearson r, float64 on CPU: ``[]`` or ``[H]`` (NaN if either side is constant)."""
        s = {k: v.cpu() for k, v in self.state.items()}
        n = s["n"].clamp_min(1)
        cov = s["sxy"] - s["sx"] * s["sy"] / n
        vx = s["sxx"] - s["sx"] ** 2 / n
        vy = s["syy"] - s["sy"] ** 2 / n
        ok = (vx > 0) & (vy > 0)
        r = cov / torch.sqrt(torch.where(ok, vx * vy, torch.ones_like(vx)))
        return torch.where(ok, r.clamp(-1.0, 1.0), torch.full_like(r, math.nan))


def gaussian_crps(mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
    """Closed-form CRPS of N(mean, std²) at ``target``, elementwise (same units as the signal).

    CRPS = σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π], z = (y − μ)/σ (Gneiting & Raftery 2007). ``std`` is
    clamped at 1e-12 so a zero spread degrades gracefully to the absolute error.
    """
    sigma = std.to(torch.float64).clamp_min(1e-12)
    z = (target.to(torch.float64) - mean.to(torch.float64)) / sigma
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return sigma * (z * (2 * torch.special.ndtr(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


class CRPSAccumulator(_Accumulator):
    """Mean Gaussian CRPS and central-interval coverage of a probabilistic forecast.

    ``update(pred, target, mask)`` takes ``pred = (mean, std)``, both shaped like ``target``. Coverage
    for level ``c`` is the fraction of targets inside μ ± z σ with z = Φ⁻¹((1 + c) / 2); a calibrated
    forecast covers ≈ c.
    """

    def __init__(self, horizons: int | None = None, levels: Sequence[float] = (0.5, 0.9)):
        if not levels or not all(0.0 < c < 1.0 for c in levels):
            raise ValueError(f"interval levels must lie in (0, 1), got {list(levels)}")
        self.levels = tuple(float(c) for c in levels)
        super().__init__(horizons)

    def _fields(self) -> dict[str, tuple[int, ...]]:
        return {"n": (), "crps": (), "covered": (len(self.levels),)}

    def update(self, pred: tuple[Tensor, Tensor], target: Tensor, mask: Tensor | None = None) -> None:
        if not (isinstance(pred, (tuple, list)) and len(pred) == 2):
            raise TypeError("CRPSAccumulator.update expects pred=(mean, std)")
        mean, std = pred
        if std.shape != mean.shape:
            raise ValueError(f"std {tuple(std.shape)} and mean {tuple(mean.shape)} differ")
        mu, y, w = self._prepare(mean, target, mask)
        sigma = std.detach().to(device=y.device, dtype=torch.float64)
        sigma = torch.where(w > 0, sigma, torch.ones_like(sigma))
        s = self.state
        s["n"] += self._sum(w)
        s["crps"] += self._sum(w * gaussian_crps(mu, sigma, y))
        z = torch.special.ndtri(torch.tensor([(1 + c) / 2 for c in self.levels], dtype=torch.float64,
                                             device=y.device))
        dev = (y - mu).abs() / sigma.clamp_min(1e-12)
        inside = [self._sum(w * (dev <= zc).to(torch.float64)) for zc in z]
        s["covered"] += torch.stack(inside, dim=-1)

    def compute(self) -> Tensor:
        """Mean CRPS, float64 on CPU: ``[]`` or ``[H]`` (lower is better)."""
        n = self.state["n"].cpu()
        return torch.where(n > 0, self.state["crps"].cpu() / n.clamp_min(1), torch.full_like(n, math.nan))

    def coverage(self) -> Tensor:
        """Fraction inside each central interval: ``[L]`` or ``[H, L]`` in the order of ``levels``."""
        n = self.state["n"].cpu().unsqueeze(-1)
        cov = self.state["covered"].cpu() / n.clamp_min(1)
        return torch.where(n > 0, cov, torch.full_like(cov, math.nan))


def skill(r2, r2_base):
    """Skill score (R² − R²_base) / (1 − R²_base) for floats, numpy arrays or tensors.

    0 = as good as the baseline, 1 = perfect, < 0 = worse than the baseline. Where the baseline is
    already perfect (R²_base == 1) skill is undefined and NaN is returned rather than ±inf.
    """
    if isinstance(r2, Tensor) or isinstance(r2_base, Tensor):
        r2 = torch.as_tensor(r2, dtype=torch.float64)
        base = torch.as_tensor(r2_base, dtype=torch.float64)
        denom = 1.0 - base
        ok = denom.abs() > 1e-12
        return torch.where(ok, (r2 - base) / torch.where(ok, denom, torch.ones_like(denom)),
                           torch.full_like(denom, math.nan))
    r2a, base = np.asarray(r2, dtype=np.float64), np.asarray(r2_base, dtype=np.float64)
    denom = 1.0 - base
    ok = np.abs(denom) > 1e-12
    out = np.where(ok, (r2a - base) / np.where(ok, denom, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


class MetricSet:
    """All forecast metrics of an evaluation, keyed by ``(modality, metric, horizon)``.

    One R², Pearson (and, if ``probabilistic``, CRPS) accumulator per modality, created up front so every
    rank reduces the same state. ``horizons`` lists the horizon values (in steps) of the last axis of
    ``pred``; ``None`` means no horizon axis (e.g. reconstruction), reported as horizon 0.
    Metrics: ``r2``, ``mse``, ``pearson``, ``n`` (element count), and with ``probabilistic``: ``crps``,
    ``coverage_50``, ``coverage_90`` (one per level).
    """

    def __init__(self, modalities: Sequence[str], horizons: Sequence[int] | None = None,
                 probabilistic: bool = False, levels: Sequence[float] = (0.5, 0.9)):
        self.modalities = tuple(modalities)
        self.horizons = None if horizons is None else tuple(int(h) for h in horizons)
        self.probabilistic = probabilistic
        h = None if self.horizons is None else len(self.horizons)
        self.acc: dict[tuple[str, str], _Accumulator] = {}
        for m in self.modalities:
            self.acc[(m, "r2")] = R2Accumulator(h)
            self.acc[(m, "pearson")] = PearsonAccumulator(h)
            if probabilistic:
                self.acc[(m, "crps")] = CRPSAccumulator(h, levels)

    def update(self, modality: str, pred: Tensor, target: Tensor, mask: Tensor | None = None,
               std: Tensor | None = None) -> None:
        """Add one batch. ``pred``/``target``: same shape, last axis = ``len(horizons)`` if horizons."""
        if modality not in self.modalities:
            raise KeyError(f"unknown modality '{modality}'; this MetricSet has {list(self.modalities)}")
        self.acc[(modality, "r2")].update(pred, target, mask)
        self.acc[(modality, "pearson")].update(pred, target, mask)
        if self.probabilistic:
            if std is None:
                raise ValueError("MetricSet(probabilistic=True).update needs std (the forecast spread)")
            self.acc[(modality, "crps")].update((pred, std), target, mask)

    def merge(self, other: "MetricSet") -> "MetricSet":
        if set(other.acc) != set(self.acc) or other.horizons != self.horizons:
            raise ValueError("cannot merge MetricSets with different modalities, metrics or horizons")
        for key, acc in self.acc.items():
            acc.merge(other.acc[key])
        return self

    def all_reduce(self) -> "MetricSet":
        """Sum every accumulator over ranks in one collective; returns self."""
        keys = [(k, f) for k in sorted(self.acc) for f in sorted(self.acc[k].state)]
        reduced = all_reduce_sum([self.acc[k].state[f] for k, f in keys])
        for (k, f), t in zip(keys, reduced):
            self.acc[k].state[f] = t
        return self

    def reset(self) -> None:
        for acc in self.acc.values():
            acc.reset()

    def compute(self) -> dict[tuple[str, str, int], float]:
        """``{(modality, metric, horizon): value}`` as Python floats (horizon 0 without a horizon axis)."""
        hs = (0,) if self.horizons is None else self.horizons
        out: dict[tuple[str, str, int], float] = {}
        for m in self.modalities:
            values = {"r2": self.acc[(m, "r2")].compute(), "mse": self.acc[(m, "r2")].mse(),
                      "pearson": self.acc[(m, "pearson")].compute(),
                      "n": self.acc[(m, "r2")].count}
            if self.probabilistic:
                crps = self.acc[(m, "crps")]
                values["crps"] = crps.compute()
                cov = crps.coverage()
                for j, c in enumerate(crps.levels):
                    values[f"coverage_{round(c * 100):d}"] = cov[..., j]
            for name, v in values.items():
                flat = v.reshape(-1)
                for i, h in enumerate(hs):
                    out[(m, name, h)] = float(flat[i])
        return out

    def flat(self, prefix: str = "") -> dict[str, float]:
        """``{'<prefix>fmri/r2/h1': value, ...}`` for JSON logs (``h0`` without a horizon axis)."""
        return {f"{prefix}{m}/{name}/h{h}": v for (m, name, h), v in self.compute().items()}
