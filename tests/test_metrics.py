"""Streaming metrics: hand-computed values, chunking/merging/all-reduce invariance, CRPS and coverage."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import norm

from twinbrain.scoring.metrics import (CRPSAccumulator, MetricSet, PearsonAccumulator, R2Accumulator,
                                    gaussian_crps, skill)

T = torch.tensor


def _f64(x):
    return torch.as_tensor(x, dtype=torch.float64)


def test_r2_and_pearson_hand_computed():
    y, p = T([1.0, 2.0, 3.0, 4.0]), T([1.0, 2.0, 3.0, 5.0])
    r2 = R2Accumulator()
    r2.update(p, y)
    # ȳ = 2.5, SS_tot = 30 − 4·6.25 = 5, SS_res = 1
    assert r2.compute().item() == pytest.approx(0.8)
    assert r2.mse().item() == pytest.approx(0.25)
    pr = PearsonAccumulator()
    pr.update(p, y)
    # dx = [-1.75, -0.75, 0.25, 2.25], dy = [-1.5, -0.5, 0.5, 1.5]: 6.5 / sqrt(8.75 · 5)
    assert pr.compute().item() == pytest.approx(6.5 / math.sqrt(8.75 * 5))


def test_r2_truth_is_one_and_global_mean_is_zero():
    y = torch.randn(7, 5, 3)
    truth, mean = R2Accumulator(), R2Accumulator()
    truth.update(y.clone(), y)
    mean.update(torch.full_like(y, y.double().mean().item()), y)
    assert truth.compute().item() == pytest.approx(1.0)
    assert mean.compute().item() == pytest.approx(0.0, abs=1e-6)
    # A per-window mean is *not* the baseline: it beats the global mean when window means differ.
    y2 = y + torch.arange(7.0)[:, None, None]
    win = R2Accumulator()
    win.update(y2.mean(dim=(1, 2), keepdim=True).expand_as(y2), y2)
    assert win.compute().item() > 0.5


def test_per_horizon_and_mask():
    # [W=2, H=2]: horizon 0 sees y=[1, 3], pred=[1, 3]; horizon 1 sees y=[2, 4], pred=[3, 3]
    y, p = T([[1.0, 2.0], [3.0, 4.0]]), T([[1.0, 3.0], [3.0, 3.0]])
    r2 = R2Accumulator(horizons=2)
    r2.update(p, y)
    # horizon 1: ȳ = 3, SS_tot = 2, SS_res = 1 + 1 = 2 → 0
    assert torch.allclose(r2.compute(), _f64([1.0, 0.0]))
    # Masked entries are ignored even when they hold NaN.
    y3 = torch.cat([y, T([[float("nan"), float("nan")]])])
    p3 = torch.cat([p, T([[float("nan"), 0.0]])])
    mask = T([True, True, False])[:, None]
    r2m = R2Accumulator(horizons=2)
    r2m.update(p3, y3, mask)
    assert torch.allclose(r2m.compute(), r2.compute())
    assert torch.equal(r2m.count, _f64([2.0, 2.0]))
    with pytest.raises(ValueError, match="horizon axis"):
        R2Accumulator(horizons=3).update(p, y)
    with pytest.raises(ValueError, match="broadcast"):
        R2Accumulator().update(p, y, T([True, False, True]))


def _data(seed=0, w=12, n=6, h=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(w, n, h, generator=g) + 0.3
    p = 0.7 * y + 0.5 * torch.randn(w, n, h, generator=g)
    s = 0.4 + torch.rand(w, n, h, generator=g)
    return p, y, s


def _accs(h=3):
    return [R2Accumulator(h), PearsonAccumulator(h), CRPSAccumulator(h)]


def _feed(acc, p, y, s):
    acc.update((p, s) if isinstance(acc, CRPSAccumulator) else p, y)


def _results(acc):
    out = [acc.compute()]
    if isinstance(acc, CRPSAccumulator):
        out.append(acc.coverage())
    return out


def test_chunks_and_merge_equal_one_shot():
    p, y, s = _data()
    for one, chunked, a, b in zip(_accs(), _accs(), _accs(), _accs()):
        _feed(one, p, y, s)
        for i in range(0, 12, 5):                          # uneven chunks: 5, 5, 2
            _feed(chunked, p[i:i + 5], y[i:i + 5], s[i:i + 5])
        _feed(a, p[:4], y[:4], s[:4])
        _feed(b, p[4:], y[4:], s[4:])
        a.merge(b)
        for ref, got1, got2 in zip(_results(one), _results(chunked), _results(a)):
            assert torch.allclose(ref, got1, atol=1e-12) and torch.allclose(ref, got2, atol=1e-12)
    with pytest.raises(ValueError, match="cannot merge"):
        R2Accumulator(3).merge(R2Accumulator(2))


def test_pearson_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 4)) + 2.0
    y = 0.6 * x + rng.normal(size=(500, 4))
    acc = PearsonAccumulator(horizons=4)
    acc.update(_f64(x), _f64(y))
    ref = [np.corrcoef(x[:, h], y[:, h])[0, 1] for h in range(4)]
    assert np.allclose(acc.compute().numpy(), ref, atol=1e-12)


def test_gaussian_crps_closed_form_and_numeric_integral():
    # μ = 0, σ = 1, y = 0: 2φ(0) − 1/√π
    assert gaussian_crps(_f64(0.0), _f64(1.0), _f64(0.0)).item() == pytest.approx(
        2 / math.sqrt(2 * math.pi) - 1 / math.sqrt(math.pi))
    for mu, sigma, y in [(0.3, 0.7, 1.9), (-1.0, 2.0, -1.5), (0.0, 0.2, 0.0)]:
        f = lambda x: norm.cdf(x, mu, sigma) ** 2                       # noqa: E731  below y
        g = lambda x: (1 - norm.cdf(x, mu, sigma)) ** 2                 # noqa: E731  above y
        num = integrate.quad(f, -np.inf, y)[0] + integrate.quad(g, y, np.inf)[0]
        assert gaussian_crps(_f64(mu), _f64(sigma), _f64(y)).item() == pytest.approx(num, rel=1e-6)
    # zero spread degrades to the absolute error
    assert gaussian_crps(_f64(1.0), _f64(0.0), _f64(3.0)).item() == pytest.approx(2.0)


def test_coverage_of_calibrated_gaussian_is_nominal():
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(200_000, generator=g, dtype=torch.float64)
    sigma = 0.2 + torch.rand(200_000, generator=g, dtype=torch.float64)
    y = mu + sigma * torch.randn(200_000, generator=g, dtype=torch.float64)
    acc = CRPSAccumulator(levels=(0.5, 0.9))
    acc.update((mu, sigma), y)
    assert np.allclose(acc.coverage().numpy(), [0.5, 0.9], atol=0.01)
    over = CRPSAccumulator(levels=(0.5, 0.9))             # too narrow: under-covers
    over.update((mu, 0.5 * sigma), y)
    assert (over.coverage() < acc.coverage() - 0.1).all()


def test_skill():
    assert skill(0.9, 0.8) == pytest.approx(0.5)
    assert skill(0.8, 0.8) == 0.0
    assert skill(0.5, 0.8) < 0
    assert math.isnan(skill(1.0, 1.0))
    t = skill(_f64([0.9, 0.5]), _f64([0.8, 1.0]))
    assert t[0].item() == pytest.approx(0.5) and math.isnan(t[1].item())


def test_metric_set_keys_and_values():
    p, y, s = _data()
    ms = MetricSet(["fmri", "eeg"], horizons=[1, 2, 5], probabilistic=True)
    ms.update("fmri", p, y, std=s)
    ms.update("eeg", y, y, std=s)
    out = ms.compute()
    r2 = R2Accumulator(3)
    r2.update(p, y)
    assert out[("fmri", "r2", 5)] == pytest.approx(r2.compute()[2].item())
    assert out[("eeg", "r2", 1)] == pytest.approx(1.0)
    assert {("fmri", "crps", 2), ("fmri", "coverage_50", 1), ("eeg", "coverage_90", 5)} <= set(out)
    assert "fmri/pearson/h2" in ms.flat()
    with pytest.raises(ValueError, match="std"):
        ms.update("fmri", p, y)
    rec = MetricSet(["fmri"])                               # no horizon axis -> horizon 0
    rec.update("fmri", p, y)
    assert ("fmri", "r2", 0) in rec.compute()


# ---------------------------------------------------------------- distributed (2 gloo processes)

def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from datetime import timedelta
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        p, y, s = _data()
        sl = slice(0, 5) if rank == 0 else slice(5, 12)       # unequal shards
        accs = _accs()
        for acc in accs:
            _feed(acc, p[sl], y[sl], s[sl])
            acc.all_reduce()
        ms = MetricSet(["fmri"], horizons=[1, 2, 3], probabilistic=True)
        ms.update("fmri", p[sl], y[sl], std=s[sl])
        ms.all_reduce()
        torch.save({"acc": [_results(a) for a in accs], "ms": ms.compute()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_two_gloo_processes_equals_single_process(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.start_processes(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("distributed workers did not finish within 120 s")
    finally:
        for proc in ctx.processes:                          # only our own two workers
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    p, y, s = _data()
    ref_accs = _accs()
    for acc in ref_accs:
        _feed(acc, p, y, s)
    ref_ms = MetricSet(["fmri"], horizons=[1, 2, 3], probabilistic=True)
    ref_ms.update("fmri", p, y, std=s)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for ref_acc, got_res in zip(ref_accs, got["acc"]):
            for a, b in zip(_results(ref_acc), got_res):
                assert torch.allclose(a, b, atol=1e-12)
        ref = ref_ms.compute()
        assert got["ms"].keys() == ref.keys()
        assert all(got["ms"][k] == pytest.approx(v, abs=1e-12) for k, v in ref.items())
