"""Splits, normalisation, window alignment, the HeteroData schema and the DataModule."""
import json

import numpy as np
import pytest
import torch

from tests.synth_recordings import make_cohort, make_config, make_recording
from twinbrain.data.graph import RELATIONS, build_group_graph
from twinbrain.data.module import DataModule
from twinbrain.data.timing import common_span
from twinbrain.data.types import Cohort
from twinbrain.data.windows import (Split, WindowDataset, build_maps, compute_norm_stats, split_recordings,
                                    window_starts)


def test_subject_split_never_shares_subjects():
    cohort = make_cohort(n_subjects=6, n_sessions=2)
    cfg = make_config(val_subjects=1, test_subjects=2)
    sp = split_recordings(cohort, cfg)
    subs = {name: {cohort.recordings[i].subject for i, _, _ in sp.spans(name)} for name in ("train", "val", "test")}
    assert len(subs["val"]) == 1 and len(subs["test"]) == 2 and len(subs["train"]) == 3
    assert not (subs["train"] & subs["val"] or subs["train"] & subs["test"] or subs["val"] & subs["test"])
    assert sp.subjects == {k: sorted(v) for k, v in subs.items()}
    assert split_recordings(cohort, cfg).to_dict() == sp.to_dict()              # deterministic
    tests = set()
    for seed in range(6):
        cfg.train.seed = seed
        tests.add(tuple(split_recordings(cohort, cfg).subjects["test"]))
    assert len(tests) > 1                                                        # the seed matters
    with pytest.raises(ValueError, match="no training"):
        split_recordings(cohort, make_config(val_subjects=3, test_subjects=3))
    with pytest.raises(ValueError, match="has no window"):
        split_recordings(cohort, make_config(window_s=500.0))


def test_explicit_subject_ids_define_leave_one_subject_out_folds():
    cohort = make_cohort(n_subjects=5, n_sessions=2)
    seen = []
    for held_out in cohort.subjects:
        sp = split_recordings(cohort, make_config(test_subject_ids=[held_out]))
        assert sp.subjects["test"] == [held_out]
        assert held_out not in sp.subjects["train"] + sp.subjects["val"] and len(sp.subjects["val"]) == 1
        assert {cohort.recordings[i].subject for i, _, _ in sp.test} == {held_out}
        seen.append(held_out)
    assert seen == cohort.subjects
    sp = split_recordings(cohort, make_config(test_subject_ids=["01"], val_subject_ids=["03", "04"]))
    assert sp.subjects == {"test": ["01"], "val": ["03", "04"], "train": ["00", "02"]}
    with pytest.raises(ValueError, match="data.test_subject_ids.*not subjects"):
        split_recordings(cohort, make_config(test_subject_ids=["99"]))
    with pytest.raises(ValueError, match="no training"):
        split_recordings(cohort, make_config(test_subject_ids=["00", "01", "02"], val_subject_ids=["03", "04"]))


def test_chronological_windows_do_not_overlap_across_splits():
    cohort = make_cohort(n_subjects=2, n_vols=200)
    cfg = make_config(split="chronological", val_fraction=0.2, test_fraction=0.2)
    sp = split_recordings(cohort, cfg)
    for r, rec in enumerate(cohort.recordings):
        iv = {}
        for name in ("train", "val", "test"):
            starts = np.concatenate([window_starts(rec, (s, e), cfg.data.window_s, cfg.data.stride_s)
                                     for i, s, e in sp.spans(name) if i == r])
            assert starts.size > 0
            iv[name] = (starts.min() * rec.tr, (starts.max() * rec.tr + cfg.data.window_s))
        # train ends, one window gap, val starts; same for val -> test
        assert iv["train"][1] + cfg.data.window_s <= iv["val"][0] + 1e-9
        assert iv["val"][1] + cfg.data.window_s <= iv["test"][0] + 1e-9


def test_norm_stats_come_from_training_span_only():
    cohort = make_cohort(n_subjects=2, n_vols=200)
    cfg = make_config(split="chronological", val_fraction=0.2, test_fraction=0.2)
    sp = split_recordings(cohort, cfg)
    st1 = compute_norm_stats(cohort, sp)
    assert st1.per_rec[0].source == "train-span"
    for i, s, e in sp.train:
        rec = cohort.recordings[i]
        v_end = int(np.floor(e / rec.tr))
        rec.fmri[:, v_end:] += 50.0 * np.random.default_rng(i).standard_normal(rec.fmri[:, v_end:].shape)
        rec.eeg[:, int(e * rec.eeg_sfreq):] *= 7.0                           # the future changes wildly
    st2 = compute_norm_stats(cohort, sp)
    assert json.dumps(st1.to_dict()) == json.dumps(st2.to_dict())
    x = cohort.recordings[0].fmri[:, :int(sp.train[0][2])]                   # the statistics are the span's
    np.testing.assert_allclose(st1.per_rec[0].fmri_mean, x.mean(1), rtol=1e-5)
    np.testing.assert_allclose(st1.per_rec[0].fmri_std, x.std(1), rtol=1e-4)


def test_held_out_subjects_use_group_or_calibration_stats():
    cohort = make_cohort(n_subjects=4)
    sp = split_recordings(cohort, make_config(val_subjects=1, test_subjects=1))
    st1 = compute_norm_stats(cohort, sp)
    held = [i for name in ("val", "test") for i, _, _ in sp.spans(name)]
    assert all(st1.per_rec[i].source == "group" for i in held)
    for i in held:                                                         # held-out data never feed statistics
        cohort.recordings[i].fmri += 1000.0
    assert json.dumps(st1.to_dict()) == json.dumps(compute_norm_stats(cohort, sp).to_dict())

    cfg = make_config(val_subjects=1, test_subjects=1, calib_s=30.0)
    sp = split_recordings(cohort, cfg)
    st = compute_norm_stats(cohort, sp)
    for i in held:
        assert st.per_rec[i].source == "calib" and sp.calib[i] == (0.0, 30.0)
        assert all(s >= 30.0 for j, s, _ in sp.val + sp.test if j == i)       # windows start after calibration
        np.testing.assert_allclose(st.per_rec[i].fmri_mean, cohort.recordings[i].fmri[:, :30].mean(1), rtol=1e-5)
        cohort.recordings[i].fmri[:, 30:] *= 3.0
    assert json.dumps(st.to_dict()) == json.dumps(compute_norm_stats(cohort, sp).to_dict())


def _single_dataset(rec, graph=None, **kw):
    cohort = Cohort([rec])
    span = common_span(rec)
    sp = Split([(0, *span)], [], [])
    stats = compute_norm_stats(cohort, sp)
    graph = graph or build_group_graph([rec], [span], make_config().graph)
    smap, sesmap = build_maps(cohort)
    return WindowDataset(cohort, sp.train, graph, stats, smap, sesmap, window_s=kw.get("window_s", 20.0),
                         stride_s=kw.get("stride_s", 10.0))


@pytest.mark.parametrize("onset", [-2.0, 0.0, 3.0])
def test_window_alignment_marker(onset):
    rec = make_recording(n_vols=80, tr=1.0, sfreq=20.0, onset=onset, seed=1)
    rec.fmri[:, 37] += 1e3                                       # event in volume 37 ...
    k = int(round((37.5 - onset) * 20.0))                        # ... and in the EEG at 37.5 s (mid-volume)
    rec.eeg[:, k] += 1.0
    ds = _single_dataset(rec)
    hits = 0
    for i in range(len(ds)):
        a = ds.window_arrays(i)
        assert a["fmri"].shape == (6, 20) and a["eeg"].shape == (4, 400)
        if a["start"] <= 37 < a["start"] + 20:
            hits += 1
            assert int(np.argmax(a["fmri"][0])) == 37 - a["start"]
            ke = int(np.argmax(a["eeg"][0]))
            assert ke // 20 == 37 - a["start"] and ke == (37 - a["start"]) * 20 + 10
    assert hits == 2
    assert ds.index[:, 1].min() >= np.ceil(max(0.0, onset))


def test_eeg_coverage_and_rate_errors():
    rec = make_recording(n_vols=80, sfreq=20.0)
    rec.eeg = rec.eeg[:, :50 * 20]                               # EEG ends at 50 s, fMRI at 80 s
    cohort = Cohort([rec])
    sp = Split([(0, 0.0, 80.0)], [], [])
    with pytest.raises(ValueError, match=rec.key):
        WindowDataset(cohort, sp.train, build_group_graph([rec], [(0.0, 50.0)], make_config().graph),
                      compute_norm_stats(cohort, sp), *build_maps(cohort), window_s=20.0, stride_s=10.0)
    odd = make_recording("09", sfreq=25.0)
    cohort = Cohort([make_recording("01"), make_recording("02"), odd])
    with pytest.raises(ValueError, match=f"{odd.key}.*resample"):
        DataModule(make_config(val_subjects=1, test_subjects=1), cohort).setup()


def test_heterodata_schema_and_empty_relations():
    from torch_geometric.data import Batch
    rec = make_recording(n_vols=60)
    cfg = make_config()
    cfg.graph.threshold = 0.99                                   # no edge survives: E = 0 everywhere
    ds = _single_dataset(rec, graph=build_group_graph([rec], [(0.0, 60.0)], cfg.graph))
    d = ds[1]
    for m, n, t in (("fmri", 6, 20), ("eeg", 4, 400)):
        assert d[m].x.shape == (n, t, 1) and d[m].x.dtype == torch.float32
        assert torch.equal(d[m].x, d[m].y) and d[m].x.data_ptr() != d[m].y.data_ptr()
        assert d[m].mask.shape == (n,) and d[m].mask.dtype == torch.bool
        assert d[m].node_id.dtype == torch.long and d[m].node_id.tolist() == list(range(n))
        assert d[m].pos.shape == (n, 3) and d[m].pos.dtype == torch.float32
    for key in RELATIONS:
        assert d[key].edge_index.shape == (2, 0) and d[key].edge_index.dtype == torch.long
        assert d[key].edge_weight.shape == (0,) and d[key].edge_weight.dtype == torch.float32
    for name in ("subject", "session", "rec", "start"):
        assert d[name].shape == (1,) and d[name].dtype == torch.long
    assert d.start.item() == 10
    b = Batch.from_data_list([ds[0], ds[1], ds[2]])
    assert b.subject.shape == (3,) and b["fmri"].x.shape == (18, 20, 1) and b["fmri"].batch.max() == 2


def test_datamodule_end_to_end():
    cohort = make_cohort(n_subjects=5, n_sessions=2)
    cfg = make_config(val_subjects=1, test_subjects=1)
    dm = DataModule(cfg, cohort).setup()
    assert dm.n_fmri_slots == 6 and dm.n_eeg_slots == 4 and dm.samples_per_tr == 20 and dm.truth is None
    assert dm.subject_map == {f"{s:02d}": s for s in range(5)} and len(dm.session_map) == 10
    assert len(dm.train_dataset) > 0 and len(dm.val_dataset) > 0 and len(dm.test_dataset) > 0
    json.dumps(dm.metadata())
    d = dm.train_dataset[0]
    assert all(d[k].edge_index.shape[1] > 0 for k in RELATIONS)
    it = iter(dm.train_loader(rank=0, world_size=2))
    b = next(it)
    assert b.num_graphs <= cfg.train.batch_size and b.weight.tolist() == [1.0] * b.num_graphs
    # evaluation: every window exactly once across ranks (padding has weight 0), equal batch counts
    seen, counts = [], []
    for rank in range(3):
        loader = dm.eval_loader("val", rank, 3, batch_size=2)
        batches = list(loader)
        counts.append(len(batches))
        for bb in batches:
            seen += [(int(r), int(s)) for r, s, w in zip(bb.rec, bb.start, bb.weight) if w > 0]
    assert len(set(counts)) == 1
    assert sorted(seen) == sorted(map(tuple, dm.val_dataset.index.tolist()))


def test_run_scope_graphs_use_fit_spans():
    cohort = make_cohort(n_subjects=4)
    cfg = make_config(val_subjects=1, test_subjects=1, calib_s=30.0)
    cfg.graph.scope = "run"
    dm = DataModule(cfg, cohort).setup()
    assert isinstance(dm.graphs, dict) and set(dm.graphs) == set(range(4))
    held = [i for i, _, _ in dm.split.val + dm.split.test]
    before = {i: dm.graphs[i].edge_weight[RELATIONS[0]].copy() for i in held}
    for i in held:                                               # after the calibration span: no effect
        cohort.recordings[i].fmri[:, 30:] = np.random.default_rng(i).standard_normal((6, 90))
    dm2 = DataModule(cfg, cohort).setup()
    for i in held:
        np.testing.assert_array_equal(before[i], dm2.graphs[i].edge_weight[RELATIONS[0]])


@pytest.mark.slow
def test_datamodule_on_simulated_cohort():
    simulate = pytest.importorskip("twinbrain.data.simulate")
    if not hasattr(simulate, "simulate_cohort"):
        pytest.skip("twinbrain.data.simulate.simulate_cohort not available yet")
    from twinbrain.config import load_config
    cfg = load_config(overrides={"sim": {"n_subjects": 3, "minutes": 2.0, "n_regions": 12, "n_channels": 8,
                                         "n_modules": 3, "n_perturb": 2},
                                 "data": {"window_s": 40.0, "stride_s": 20.0},
                                 "graph": {"k_fmri": 3, "k_eeg": 2, "k_cross": 2},
                                 "model": {"eeg_patch": 50, "eeg_stride": 50}})
    dm = DataModule(cfg).setup()
    assert dm.n_fmri_slots == 12 and dm.n_eeg_slots == 8 and dm.samples_per_tr == 500
    b = next(iter(dm.train_loader(0, 1)))
    assert b["eeg"].x.shape[1] == 20 * 500 and torch.isfinite(b["eeg"].x).all()
