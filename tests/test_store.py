"""Content-hashed store: keys, atomic writes, resumable prepare, cache-only loading."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from tests.bids_synth import make_config, make_recording, write_dataset
from twinbrain.data import prepare as prep
from twinbrain.data.bids import discover
from twinbrain.data.store import Store


def _key(cfg, root):
    pair = discover(root).found[0]
    return prep.run_key(pair, prep.preprocessing_params(cfg), root)[0]


@pytest.fixture
def dataset(tmp_path):
    root = write_dataset(tmp_path / "bids", [make_recording("01", n_vols=12),
                                             make_recording("02", n_vols=12, seed=1)])
    return root, make_config(root, tmp_path / "store")


@pytest.mark.parametrize("override,changes", [
    ({"data": {"eeg_l_freq": 0.5}}, True), ({"data": {"eeg_h_freq": 30.0}}, True),
    ({"data": {"eeg_sfreq": 200.0}}, True), ({"data": {"volume_marker": "V"}}, True),
    ({"data": {"pair_map": ["task-a=b"]}}, True), ({"graph": {"k_fmri": 5}}, False),
    ({"graph": {"threshold": 0.2}}, False), ({"graph": {"eeg_measure": "coherence"}}, False),
    ({"graph": {"cross_lag_max_s": 7.0}}, False),
    ({"train": {"lr": 0.1}}, False), ({"model": {"hidden": 64}}, False),
    ({"data": {"window_s": 40.0}}, False), ({"data": {"num_workers": 2}}, False),
    ({"run": {"out": "elsewhere"}}, False),
])
def test_key_changes_with_every_preprocessing_parameter_and_no_graph_parameter(dataset, override, changes):
    root, cfg = dataset
    other = make_config(root, cfg.data.store_dir)
    for section, values in override.items():
        for name, value in values.items():
            setattr(getattr(other, section), name, value)
    assert (_key(other, root) != _key(cfg, root)) == changes


def test_store_key_covers_what_the_store_holds_only(dataset):
    """The store holds prepared signals, no graphs: graph.k_fmri leaves the key alone, a preprocessing
    field changes it."""
    root, cfg = dataset
    base = _key(cfg, root)
    cfg.graph.k_fmri += 3
    assert _key(cfg, root) == base
    assert not any(k.startswith("graph.") for k in prep.preprocessing_params(cfg))
    cfg.data.eeg_h_freq = 30.0
    assert _key(cfg, root) != base


def test_key_tracks_sources_atlas_and_schema(dataset, tmp_path, monkeypatch):
    root, cfg = dataset
    base = _key(cfg, root)
    assert _key(cfg, root) == base                              # deterministic
    side = root / "sub-01/ses-1/eeg/sub-01_ses-1_task-rest_run-1_eeg.json"
    side.write_text(side.read_text() + " ")                     # any source change
    assert _key(cfg, root) != base
    base = _key(cfg, root)
    monkeypatch.setattr(prep, "SCHEMA_VERSION", 99)
    assert _key(cfg, root) != base
    monkeypatch.undo()
    atlas = tmp_path / "a.nii.gz"
    atlas.write_bytes(b"one")
    cfg.data.atlas = str(atlas)
    with_atlas = prep.preprocessing_params(cfg)
    atlas.write_bytes(b"two")                                   # same name, new content
    assert prep.params_hash(prep.preprocessing_params(cfg)) != prep.params_hash(with_atlas)


def test_put_get_roundtrip_readable_with_numpy(tmp_path):
    rec = make_recording("07", n_vols=6)
    store = Store(tmp_path / "s")
    store.put("sub-07-abc", rec, {"params": {"a": 1}})
    assert store.keys() == ["sub-07-abc"] and "sub-07-abc" in store
    back = store.get("sub-07-abc")
    np.testing.assert_allclose(back.eeg, rec.eeg.astype(np.float32))
    assert back.channel_names == rec.channel_names and back.region_names == rec.region_names
    assert back.modules.tolist() == rec.modules.tolist() and back.eeg_onset_s == rec.eeg_onset_s
    with np.load(tmp_path / "s/sub-07-abc.npz", allow_pickle=False) as z:   # numpy alone
        assert z["fmri"].shape == (5, 6) and list(z["region_names"]) == rec.region_names
    assert store.find({"a": 1}) == ["sub-07-abc"] and store.find({"a": 2}) == []


@pytest.mark.parametrize("fail_at", ["savez", "json"])
def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch, fail_at):
    store = Store(tmp_path / "s")

    def boom(*args, **kw):
        fh = args[0] if fail_at == "savez" else args[1]        # savez(fh, ...) / dump(obj, fh)
        fh.write(b"partial" if fail_at == "savez" else "{\"part")
        raise OSError("disk full")
    target = "twinbrain.data.store.np.savez" if fail_at == "savez" else "twinbrain.data.store.json.dump"
    monkeypatch.setattr(target, boom)
    with pytest.raises(OSError, match="disk full"):
        store.put("k1", make_recording("01", n_vols=6))
    assert store.keys() == [] and "k1" not in store
    assert os.listdir(tmp_path / "s") == []


def test_failure_during_commit_removes_entry(tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if str(dst).endswith(".json"):
            raise OSError("killed")
        real(src, dst)
    monkeypatch.setattr("twinbrain.data.store.os.replace", flaky)
    with pytest.raises(OSError):
        store.put("k1", make_recording("01", n_vols=6))
    assert len(calls) == 2 and os.listdir(tmp_path / "s") == []


def test_prepare_is_resumable_and_replaces_stale_entries(dataset):
    root, cfg = dataset
    first = prep.prepare(cfg, progress=False)
    assert len(first.prepared) == 2 and not first.cached
    again = prep.prepare(cfg, progress=False)
    assert again.cached == first.prepared and not again.prepared
    tsv = root / "sub-02/ses-1/func/sub-02_ses-1_task-rest_run-1_bold.tsv"
    tsv.write_text(tsv.read_text())
    os.utime(tsv, ns=(1, 1))                                    # source changed -> only that run redone
    third = prep.prepare(cfg, progress=False)
    assert third.prepared == ["sub-02_ses-1_task-rest_run-1"] and len(third.cached) == 1
    assert len(Store(cfg.data.store_dir).keys()) == 2          # the stale entry is gone
    assert "1 prepared, 1 already cached, 0 failed" in third.summary()


def test_cache_only_mode_without_raw_data(dataset, tmp_path):
    root, cfg = dataset
    ref = prep.load_prepared_cohort(cfg)
    shutil.rmtree(root)                                         # a node without the raw data
    offline = make_config(root, cfg.data.store_dir)
    offline.data.source = "store"
    cohort = prep.load_prepared_cohort(offline)
    assert [r.key for r in cohort.recordings] == [r.key for r in ref.recordings]
    np.testing.assert_array_equal(cohort.recordings[0].eeg, ref.recordings[0].eeg)
    offline.data.bids_root = ""                                 # any dataset in the store
    assert len(prep.load_prepared_cohort(offline).recordings) == 2
    offline.data.tasks = ["motor"]
    with pytest.raises(FileNotFoundError, match="no runs for data.tasks"):
        prep.load_prepared_cohort(offline)
    offline.data.tasks = []
    offline.graph.k_fmri = 3                                    # graphs are not in the store
    assert len(prep.load_prepared_cohort(offline).recordings) == 2
    offline.data.eeg_h_freq = 30.0                              # store built with other parameters
    with pytest.raises(FileNotFoundError, match="differs in: eeg.h_freq"):
        prep.load_prepared_cohort(offline)
    offline.data.eeg_h_freq = cfg.data.eeg_h_freq
    offline.data.store_dir = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="has no prepared runs"):
        prep.load_prepared_cohort(offline)
