"""fMRI parcellation, fixed node identity, cleaning and parcellated-table input."""
from __future__ import annotations

import numpy as np
import pytest

from tests.bids_synth import make_config, make_recording, tiny_atlas, write_bold, write_dataset
from twinbrain.data.fmri import clean, load_atlas, load_fmri, parcellate, read_parcellated
from twinbrain.data.prepare import load_prepared_cohort


def test_parcellation_means_and_empty_parcel_mask(tmp_path):
    apath, table, lab, aff = tiny_atlas(tmp_path / "atlas")
    atlas = load_atlas(apath, table)
    assert atlas.names == ["left", "right", "ghost", "outside"] and atlas.space == "MNI"
    assert atlas.modules.tolist() == [0, 1, 1, 0]
    bold = tmp_path / "sub-01_task-rest_space-MNI_bold.nii.gz"
    data = write_bold(bold, lab, aff, n_vols=12, tr=2.0)
    ts, mask = parcellate(bold, atlas, tr=2.0)
    assert ts.shape == (4, 12)
    assert mask.tolist() == [True, True, False, False]      # ghost: no voxels; outside: no signal
    for slot, value in ((0, 1), (1, 2)):
        np.testing.assert_allclose(ts[slot], data[lab == value].mean(0), rtol=1e-5)
    assert not ts[2:].any()
    # centroid of label 1 (voxels x 0..1, y 0..3, z 0..2 at 3 mm) in MNI mm
    np.testing.assert_allclose(atlas.pos[0], [1.5, 4.5, 3.0], atol=1e-6)
    run = load_fmri(bold, "nifti", tr=2.0, atlas=atlas)
    np.testing.assert_allclose(run.data[:2].std(1), 1.0, rtol=1e-5)
    assert not run.data[2:].any() and run.meta["empty_regions"] == ["ghost", "outside"]


def _reference_parcellation(data: np.ndarray, lab: np.ndarray, index: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The previous hand-written parcellation (atlas on the BOLD grid): mean over live voxels per label."""
    live = data.std(-1) > 0
    ts, mask = np.zeros((len(index), data.shape[-1])), np.zeros(len(index), bool)
    for i, v in enumerate(index):
        sel = (lab == v) & live
        if sel.any():
            ts[i], mask[i] = data[sel].mean(0), True
    return ts, mask


def test_masker_equals_previous_parcellation_on_grid_and_resamples_off_grid(tmp_path):
    import nibabel as nib
    apath, table, lab, aff = tiny_atlas(tmp_path / "atlas")
    bold = tmp_path / "sub-01_task-rest_space-MNI_bold.nii.gz"
    data = write_bold(bold, lab, aff, n_vols=12, tr=2.0)
    ref, ref_mask = _reference_parcellation(data, lab, [1, 2, 3, 4])
    ts, mask = parcellate(bold, load_atlas(apath, table), tr=2.0)
    np.testing.assert_allclose(ts, ref, rtol=1e-5, atol=1e-4)
    assert mask.tolist() == ref_mask.tolist() == [True, True, False, False]
    # The same atlas at 1.5 mm (each voxel split in 2x2x2): nearest-neighbour resampling onto the 3 mm
    # BOLD grid recovers the labels, so the parcellation is the same.
    fine = np.repeat(np.repeat(np.repeat(lab, 2, 0), 2, 1), 2, 2)
    fpath = tmp_path / "atlas" / "space-MNI_atlas-fine_dseg.nii.gz"
    nib.save(nib.Nifti1Image(fine.astype(np.int16), np.diag([1.5, 1.5, 1.5, 1.0])), str(fpath))
    ts_f, mask_f = parcellate(bold, load_atlas(fpath, table), tr=2.0)
    np.testing.assert_allclose(ts_f, ts, rtol=1e-6)
    assert mask_f.tolist() == mask.tolist()
    # A shifted grid is resampled, not refused; a different space still is.
    shifted = tmp_path / "sub-02_task-rest_bold.nii.gz"
    write_bold(shifted, lab, aff + _shift(3.0), n_vols=5, tr=2.0)
    ts_s, mask_s = parcellate(shifted, load_atlas(apath, table), tr=2.0)
    assert ts_s.shape == (4, 5) and mask_s.any()
    other = tmp_path / "sub-01_task-rest_space-T1w_bold.nii.gz"
    write_bold(other, lab, aff, n_vols=5, tr=2.0)
    with pytest.raises(ValueError, match="space 'T1w' but the atlas .* is in space 'MNI'"):
        parcellate(other, load_atlas(apath, table), tr=2.0)


def test_probabilistic_atlas_and_the_atlas_own_label_table(tmp_path):
    import nibabel as nib
    apath, table, lab, aff = tiny_atlas(tmp_path / "atlas")
    bold = tmp_path / "sub-01_task-rest_space-MNI_bold.nii.gz"
    data = write_bold(bold, lab, aff, n_vols=12, tr=2.0)
    maps = np.stack([(lab == 1), (lab == 2)], -1).astype(np.float32)       # two disjoint binary maps
    mpath = tmp_path / "atlas" / "space-MNI_atlas-prob_probseg.nii.gz"
    nib.save(nib.Nifti1Image(maps, aff), str(mpath))
    (tmp_path / "atlas" / "space-MNI_atlas-prob_probseg.txt").write_text("# lookup table\n1 MapA 0 0 0 0\n"
                                                                          "2 MapB 0 0 0 0\n")
    atlas = load_atlas(mpath)                                             # table found beside the image
    assert atlas.kind == "maps" and atlas.names == ["MapA", "MapB"]
    ts, mask = parcellate(bold, atlas, tr=2.0)
    assert mask.tolist() == [True, True]
    # Disjoint binary maps: the least-squares map time series is the parcel mean.
    for slot, value in ((0, 1), (1, 2)):
        np.testing.assert_allclose(ts[slot], data[lab == value].mean(0), rtol=1e-4)
    np.testing.assert_allclose(atlas.pos[0], [1.5, 4.5, 3.0], atol=1e-6)     # weighted centroid


def _shift(mm: float) -> np.ndarray:
    out = np.zeros((4, 4))
    out[0, 3] = mm
    return out


def test_unknown_atlas_labels_refused(tmp_path):
    apath, table, *_ = tiny_atlas(tmp_path / "atlas", extra_label=9)
    with pytest.raises(ValueError, match=r"labels \[9\] are not in the label table .*atlas-tiny_dseg.tsv"):
        load_atlas(apath, table)


def test_header_tr_mismatch_refused(tmp_path):
    apath, table, lab, aff = tiny_atlas(tmp_path / "atlas")
    bold = tmp_path / "sub-01_task-rest_space-MNI_bold.nii.gz"
    write_bold(bold, lab, aff, n_vols=5, tr=2.0, header_tr=2.5)
    with pytest.raises(ValueError, match="TR mismatch - NIfTI header says 2.5 s"):
        parcellate(bold, load_atlas(apath, table), tr=2.0)


def test_confound_regression_and_detrend():
    rng = np.random.default_rng(0)
    t = 200
    signal = rng.standard_normal((2, t))
    conf = rng.standard_normal((t, 3))
    ts = signal + 4 * conf[:, :1].T + np.linspace(0, 10, t)          # confound + linear drift
    out = clean(ts, np.ones(2, bool), conf)
    assert np.corrcoef(out[0], signal[0])[0, 1] > 0.97
    assert abs(np.corrcoef(out[0], conf[:, 0])[0, 1]) < 1e-6
    np.testing.assert_allclose(out.std(1), 1.0)


def test_nifti_dataset_end_to_end_with_confounds(tmp_path):
    root = tmp_path / "bids"
    write_dataset(root, [make_recording("01", n_vols=20)])
    apath, table, lab, aff = tiny_atlas(tmp_path / "atlas")
    func = root / "sub-01/ses-1/func"
    write_bold(func / "sub-01_ses-1_task-rest_run-1_space-MNI_desc-preproc_bold.nii.gz", lab, aff, 20, 2.0)
    conf = func / "sub-01_ses-1_task-rest_run-1_desc-confounds_timeseries.tsv"
    rows = ["trans_x\ttrans_x_derivative1\tcsf\tframewise_displacement"] + \
        [f"{0.01 * i}\t{'n/a' if i == 0 else 0.01}\t{np.sin(i)}\t0.1" for i in range(20)]
    conf.write_text("\n".join(rows) + "\n")
    cfg = make_config(root, tmp_path / "store", atlas=str(apath), atlas_labels=str(table))
    rec = load_prepared_cohort(cfg).recordings[0]
    assert rec.region_names == ["left", "right", "ghost", "outside"]
    assert rec.region_mask.tolist() == [True, True, False, False] and rec.fmri.shape == (4, 20)
    assert rec.meta["confounds"] == ["trans_x", "trans_x_derivative1", "csf"]
    assert rec.modules.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("layout", ["columns", "rows", "npy"])
def test_parcellated_inputs(tmp_path, layout):
    rec = make_recording("01", n_regions=3, n_vols=10)
    rec.fmri[2] = 0.0
    rec.region_mask[2] = False
    root = write_dataset(tmp_path / "bids", [rec], fmri_format="npy" if layout == "npy" else "tsv")
    func = root / "sub-01/ses-1/func"
    regions = func / "sub-01_ses-1_task-rest_run-1_regions.tsv"
    if layout == "rows":   # one row per region, first column 'region', reordered vs the table
        path = func / "sub-01_ses-1_task-rest_run-1_bold.tsv"
        order = [1, 0, 2]
        lines = ["region\t" + "\t".join(f"v{i}" for i in range(10))]
        lines += [f"roi{i}\t" + "\t".join(f"{v:.7g}" for v in rec.fmri[i]) for i in order]
        path.write_text("\n".join(lines) + "\n")
    path = func / f"sub-01_ses-1_task-rest_run-1_bold.{'npy' if layout == 'npy' else 'tsv'}"
    ts, names, pos, modules, mask = read_parcellated(path, regions)
    assert names == ["roi0", "roi1", "roi2"] and ts.shape == (3, 10)
    np.testing.assert_allclose(ts, rec.fmri, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pos, rec.region_pos, atol=1e-6)
    assert mask.tolist() == [True, True, False] and modules.tolist() == [0, 1, 0]


def test_parcellated_labels_must_match_region_table(tmp_path):
    root = write_dataset(tmp_path / "bids", [make_recording("01", n_regions=3, n_vols=10)])
    func = root / "sub-01/ses-1/func"
    regions = func / "sub-01_ses-1_task-rest_run-1_regions.tsv"
    regions.write_text(regions.read_text().replace("roi2", "roiX"))
    with pytest.raises(ValueError, match=r"region labels do not match the region table.*'roi2'.*'roiX'"):
        read_parcellated(func / "sub-01_ses-1_task-rest_run-1_bold.tsv", regions)
