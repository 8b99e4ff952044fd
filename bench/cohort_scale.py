"""Memory per process and window throughput against cohort size, over a memory-mapped prepared store.

    python bench/cohort_scale.py generate --subjects 100 --store /tmp/store-bench/n100
    python bench/cohort_scale.py measure --store /tmp/store-bench/n100 --batches 300
    python bench/cohort_scale.py measure --store /tmp/store-bench/n100 --in-memory     # the old way

``generate`` writes N synthetic subjects (one run each: ``--regions`` fMRI regions at TR ``--tr`` and
``--channels`` EEG channels at ``--sfreq`` Hz for ``--minutes``) straight into the store format
(``twinbrain.data.store.Store.put``: AR(1) noise, no simulation), with the preprocessing parameters of
this config, so ``data.source=store`` finds it. ``--dtype float16`` halves the disk it needs.

``measure`` builds the ``DataModule`` from the store (``data.source=store``; signals memory-mapped), then
reads ``--batches`` training batches of ``train.batch_size`` windows on each of ``--ranks`` processes
(rank r of a world of ``--ranks``, the trainer's sampler and loader) and prints, per process: setup
time, RSS after setup, steady RSS (median and max of VmRSS sampled every batch over the second half),
peak RSS (VmHWM) and windows/s. RSS = anonymous + file-backed pages mapped by the process (from
``/proc/self/status``); the page cache outside the process is not in it. ``--graph-fit K`` fits the group
graph on the first K training runs only (its time grows with N, its memory does not). ``--shuffle-block B``
sets ``data.shuffle_block`` (recordings walked B at a time, the cache evicting least recently used runs);
``--cold`` drops the store's files from the page cache (``posix_fadvise(DONTNEED)``) after setup, so the
timed reads come from the disk as they do when a store is larger than the node's RAM. Figures and the way
they were taken: docs/PERFORMANCE.md, "Cohort scale".
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def status_mib() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process (MiB)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) / 1024.0
    return out


def mapped_rss_mib(prefix: str) -> float:
    """Resident MiB of this process's mappings of files under ``prefix`` (the store), from smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not line.startswith(("Rss", "Size")):
            inside = len(head) >= 6 and head[5].startswith(prefix)
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total / 1024.0


def bench_config(a):
    from twinbrain.config import load_config
    cfg = load_config(None, [])
    d = cfg.data
    d.source, d.store_dir, d.eeg_sfreq = "store", str(a.store), float(a.sfreq)
    d.window_s, d.stride_s = float(a.window_s), float(a.stride_s)
    d.cache_mb = int(a.cache_mb)
    d.shuffle_block = int(a.shuffle_block)
    cfg.train.batch_size = int(a.batch_size)
    cfg.model.eeg_stride = cfg.model.eeg_patch = 125
    cfg.run.out = str(Path(a.store) / "run")
    return cfg


# ------------------------------------------------------------------ generate

def generate(a) -> None:
    from twinbrain.data.prepare import preprocessing_params
    from twinbrain.data.store import Store
    from twinbrain.data.types import Recording
    from scipy.signal import lfilter
    cfg = bench_config(a)
    store = Store(a.store)
    params = preprocessing_params(cfg)
    n_vols = int(round(a.minutes * 60 / a.tr))
    n_samp = int(round(n_vols * a.tr * a.sfreq))
    rng = np.random.default_rng(0)
    r_pos = rng.normal(0, 40, (a.regions, 3)).astype(np.float32)
    c_pos = rng.normal(0, 80, (a.channels, 3)).astype(np.float32)
    regions = [f"roi{i:03d}" for i in range(a.regions)]
    channels = [f"ch{i:02d}" for i in range(a.channels)]
    t0 = time.perf_counter()
    # One pool of AR(1) noise, twice a run long; each subject takes its own random offset per node (and a
    # gain and offset), so generating a subject costs a copy, not a filter.
    pool_f = lfilter([1.0], [1.0, -0.8], rng.standard_normal((a.regions, 2 * n_vols)), axis=1).astype(np.float32)
    pool_e = lfilter([1.0], [1.0, -0.95], rng.standard_normal((a.channels, 2 * n_samp)), axis=1).astype(np.float32)
    done = set(store.keys())
    for s in range(a.subjects):
        key = f"sub-{s:04d}_task-rest-bench"
        if key in done:
            continue
        r = np.random.default_rng(1000 + s)

        def cut(pool, n):
            off = r.integers(0, n, pool.shape[0])
            x = np.stack([pool[i, o:o + n] for i, o in enumerate(off)])
            return x * r.uniform(0.5, 2.0, (pool.shape[0], 1)).astype(np.float32) + r.normal(0, 1, (pool.shape[0], 1)).astype(np.float32)
        fmri, eeg = cut(pool_f, n_vols), cut(pool_e, n_samp)
        rec = Recording(subject=f"{s:04d}", session="", task="rest", run="", eeg=eeg.astype(np.float32),
                        eeg_sfreq=float(a.sfreq), fmri=fmri.astype(np.float32), tr=float(a.tr),
                        channel_names=channels, region_names=regions, channel_pos=c_pos, region_pos=r_pos,
                        region_mask=np.ones(a.regions, bool))
        store.put(key, rec, {"params": params, "sources": [], "truth": ""}, dtype=np.dtype(a.dtype))
        if (s + 1) % 50 == 0:
            print(f"  {s + 1}/{a.subjects} subjects, {time.perf_counter() - t0:.0f} s", flush=True)
    size = sum(p.stat().st_size for p in Path(a.store).glob("*.npz"))
    print(json.dumps({"subjects": a.subjects, "store": str(a.store), "store_gib": round(size / 2 ** 30, 2),
                      "dtype": a.dtype, "seconds": round(time.perf_counter() - t0, 1)}))


# ------------------------------------------------------------------ measure

def _rank(a, rank: int, world: int, queue) -> None:
    import torch
    torch.set_num_threads(1)
    from twinbrain.data.module import DataModule
    cfg = bench_config(a)
    t0 = time.perf_counter()
    cohort = None
    if a.in_memory:                                 # the old way: every signal loaded in every process
        from twinbrain.data.prepare import load_prepared_cohort
        from twinbrain.data.store import Store
        store = Store(a.store)
        cohort = load_prepared_cohort(cfg)
        for rec in cohort.recordings:
            full = store.get(rec.meta["store_key"])
            rec.eeg, rec.fmri = full.eeg, full.fmri
    if a.graph_fit:                                 # fit the group graph on the first K training runs only
        import dataclasses as dc
        build = DataModule._build_graphs

        def capped(self):
            full = self.split
            keep = sorted({i for i, _, _ in full.train})[:a.graph_fit]
            self.split = dc.replace(full, train=[sp for sp in full.train if sp[0] in set(keep)])
            try:
                build(self)
            finally:
                self.split = full
        DataModule._build_graphs = capped
    dm = DataModule(cfg, cohort).setup()
    setup_s = time.perf_counter() - t0
    after_setup = status_mib()
    setup_store = mapped_rss_mib(str(Path(a.store).resolve()))
    if a.cold:
        drop_page_cache(Path(a.store))
    loader = dm.train_loader(rank, world)
    it = iter(loader)
    rss, store_rss, n_win = [], [], 0
    for _ in range(a.warmup):
        next(it)
    t1, c1 = time.perf_counter(), time.process_time()
    for b in range(a.batches):
        batch = next(it)
        n_win += int(batch["subject"].numel()) if hasattr(batch, "__getitem__") else cfg.train.batch_size
        if b >= a.batches // 2:
            rss.append(status_mib()["VmRSS"])
            store_rss.append(mapped_rss_mib(str(Path(a.store).resolve())))
    dt, dc = time.perf_counter() - t1, time.process_time() - c1
    st = status_mib()
    cache = dm.train_dataset.cache
    queue.put({"rank": rank, "recordings": len(dm.cohort.recordings), "train_windows": len(dm.train_dataset),
               "setup_s": round(setup_s, 1), "rss_after_setup_mib": round(after_setup["VmRSS"], 1),
               "steady_rss_median_mib": round(statistics.median(rss), 1), "steady_rss_max_mib": round(max(rss), 1),
               "peak_rss_mib": round(st["VmHWM"], 1), "rss_anon_mib": round(st["RssAnon"], 1),
               "rss_file_mib": round(st["RssFile"], 1), "store_rss_max_mib": round(max(store_rss), 1),
               "rss_after_setup_store_mib": round(setup_store, 1), "windows_per_s": round(n_win / dt, 1),
               "windows": n_win, "cache_misses": cache.misses, "cache_held_mib": round(cache.total / 2 ** 20, 1),
               "cache_mb": cfg.data.cache_mb, "shuffle_block": cfg.data.shuffle_block, "cold": bool(a.cold),
               "timed_wall_s": round(dt, 1), "timed_cpu_s": round(dc, 1)})


def drop_page_cache(store: Path) -> None:
    """Ask the kernel to drop the store's file pages from the page cache (no root needed; pages other
    processes map stay)."""
    for f in store.rglob("*.npz"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(a) -> None:
    ctx = mp.get_context("spawn")                   # fresh processes: RSS is the data path's alone
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(a, r, a.ranks, queue)) for r in range(a.ranks)]
    for p in procs:
        p.start()
    rows = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    load = os.getloadavg()
    for row in sorted(rows, key=lambda r: r["rank"]):
        row.update(in_memory=bool(a.in_memory), load_avg=[round(x, 2) for x in load],
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        print(json.dumps(row), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("verb", choices=["generate", "measure"])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--subjects", type=int, default=100)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--regions", type=int, default=200)
    p.add_argument("--channels", type=int, default=63)
    p.add_argument("--sfreq", type=float, default=250.0)
    p.add_argument("--tr", type=float, default=2.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--window-s", type=float, default=80.0)
    p.add_argument("--stride-s", type=float, default=20.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--cache-mb", type=int, default=512)
    p.add_argument("--shuffle-block", type=int, default=0, help="data.shuffle_block (0 = one shuffle over all)")
    p.add_argument("--cold", action="store_true", help="drop the store from the page cache before timing")
    p.add_argument("--graph-fit", type=int, default=100,
                   help="fit the group graph on the first K training runs (0 = all; its cost grows with N)")
    p.add_argument("--in-memory", action="store_true", help="load every signal into every process (old way)")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    (generate if a.verb == "generate" else measure)(a)


if __name__ == "__main__":
    main()
