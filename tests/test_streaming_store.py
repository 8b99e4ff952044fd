"""Memory-mapped store: windows read lazily are bit-identical to an in-memory cohort's; the resident cache
holds at most its budget; full passes release what they touched."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.synth_recordings import make_recording
from twinbrain.config import Config
from twinbrain.data import mapped
from twinbrain.data.module import DataModule
from twinbrain.data.series import span_series
from twinbrain.data.store import Store
from twinbrain.data.types import Cohort, cohort_fingerprint


def _cohort(n=4):
    return Cohort([make_recording(f"{i:02d}", n_vols=80, seed=i) for i in range(n)])


def _mapped_cohort(tmp_path, cohort, dtype=np.float32):
    store = Store(tmp_path / "s")
    for i, rec in enumerate(cohort.recordings):
        store.put(f"k{i}", rec, dtype=dtype)
    return Cohort([store.get(f"k{i}", mmap=True) for i in range(len(cohort.recordings))]), store


def _cfg(cache_mb):
    cfg = Config()
    cfg.data.window_s, cfg.data.stride_s, cfg.data.cache_mb = 20.0, 10.0, cache_mb
    cfg.data.val_subjects = cfg.data.test_subjects = 1
    return cfg


def test_get_mmap_maps_signals_in_place(tmp_path):
    cohort, _ = _mapped_cohort(tmp_path, _cohort(1))
    rec = cohort.recordings[0]
    ref = _cohort(1).recordings[0]
    assert isinstance(rec.eeg, np.memmap) and isinstance(rec.fmri, np.memmap)
    assert not rec.eeg.flags.writeable
    np.testing.assert_array_equal(rec.eeg, ref.eeg.astype(np.float32))
    np.testing.assert_array_equal(mapped.read_columns(rec.eeg, 7, 61), rec.eeg[:, 7:61])
    np.testing.assert_array_equal(mapped.read_columns(rec.fmri, 70, 200), rec.fmri[:, 70:])   # clipped at T
    mapped.release_recording(rec)                                   # values survive a release
    np.testing.assert_array_equal(rec.fmri, ref.fmri.astype(np.float32))
    assert cohort_fingerprint(cohort.recordings) == cohort_fingerprint(_cohort(1).recordings)


@pytest.mark.parametrize("cache_mb", [0, 1000])
def test_mapped_windows_equal_in_memory_windows(tmp_path, cache_mb):
    ref = DataModule(_cfg(cache_mb), _cohort()).setup()
    got = DataModule(_cfg(cache_mb), _mapped_cohort(tmp_path, _cohort())[0]).setup()
    assert got.stats.to_dict() == ref.stats.to_dict()
    for name in ("train", "val"):
        a, b = ref.dataset(name), got.dataset(name)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            wa, wb = a.window_arrays(i), b.window_arrays(i)
            for m in ("fmri", "eeg"):
                np.testing.assert_array_equal(wa[m], wb[m])
    held = got.train_dataset.cache
    assert (held.total > 0) == (cache_mb > 0) and (held.misses > 0) == (cache_mb == 0)
    for x, y in zip(span_series(ref.cohort, ref.stats, ref.split.train, "eeg"),
                    span_series(got.cohort, got.stats, got.split.train, "eeg")):
        np.testing.assert_array_equal(x, y)


def test_cache_holds_at_most_its_budget(tmp_path):
    cohort, _ = _mapped_cohort(tmp_path, _cohort())
    per = cohort.recordings[0].eeg.nbytes + cohort.recordings[0].fmri.nbytes
    cache = mapped.ResidentCache(int(2.5 * per))
    for r, rec in enumerate(cohort.recordings):
        cache.get(r, rec)
    assert cache.total == 2 * per and cache.misses == 2                # two held, the rest read per window
    assert cache.get(3, cohort.recordings[3]) is None
    plain = _cohort(1).recordings[0]
    assert cache.get(9, plain)[1] is plain.eeg                          # in-memory recordings pass through



def test_evicting_cache_follows_the_recordings_being_read(tmp_path):
    """With ``evict`` (``data.shuffle_block``) the least recently used recording makes room: the cache
    never exceeds its budget, keeps the recordings read last, and returns their values."""
    cohort, _ = _mapped_cohort(tmp_path, _cohort())
    per = cohort.recordings[0].eeg.nbytes + cohort.recordings[0].fmri.nbytes
    cache = mapped.ResidentCache(int(2.5 * per), evict=True)
    for r in (0, 1, 0, 2, 3):                     # 0 used again before 2 arrives: 1 is the one evicted
        held = cache.get(r, cohort.recordings[r])
        assert held is not None and cache.total <= cache.budget
        np.testing.assert_array_equal(held[0], cohort.recordings[r].fmri)
    assert list(cache._held) == [2, 3] and cache.total == 2 * per and cache.misses == 0
    assert mapped.ResidentCache(per - 1, evict=True).get(0, cohort.recordings[0]) is None   # too big: read per window


def test_float16_storage_reads_as_float32_windows(tmp_path):
    cohort, store = _mapped_cohort(tmp_path, _cohort(), dtype=np.float16)
    assert cohort.recordings[0].eeg.dtype == np.float16
    assert store.get("k0").eeg.dtype == np.float32                     # loaded (not mapped): float32
    dm = DataModule(_cfg(0), cohort).setup()
    w = dm.train_dataset.window_arrays(0)
    assert w["eeg"].dtype == np.float32 and np.isfinite(w["eeg"]).all()
    with pytest.raises(ValueError, match="float32 or float16"):
        store.put("bad", _cohort(1).recordings[0], dtype=np.float64)


def test_compressed_entry_is_refused_with_the_fix(tmp_path):
    rec = _cohort(1).recordings[0]
    path = tmp_path / "c.npz"
    np.savez_compressed(path, eeg=rec.eeg.astype(np.float32))
    with pytest.raises(ValueError, match="compressed"):
        mapped.npz_memmap(path, "eeg")


def test_full_passes_leave_no_mapped_pages(tmp_path):
    cohort, _ = _mapped_cohort(tmp_path, _cohort())
    for rec in cohort.recordings:
        rec.check()
    assert mapped.all_finite(cohort.recordings[0].eeg)                 # remembered: no second scan
    bad = dataclasses.replace(cohort.recordings[0], eeg=np.full((4, 10), np.nan, np.float32))
    assert not mapped.all_finite(bad.eeg)
