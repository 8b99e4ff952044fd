"""Built-in simulated EEG-fMRI cohort with ground truth.

``simulate_cohort(cfg.sim)`` returns a ``Cohort`` whose ``truth`` holds the
directed coupling, per-subject coupling, paired-run perturbation responses and
the EEG lead field.  Modules: ``connectome`` (regions, modular directed
coupling), ``dynamics`` (Stuart–Landau alpha + slow activity), ``hemodynamics``
(Balloon–Windkessel), ``eeg_forward`` (10-20 sensors, dipole lead field),
``cohort`` (assembly), ``truth_io`` (save/load of the ground truth).
"""
from .cohort import simulate_cohort
from .truth_io import load_truth, save_truth

__all__ = ["simulate_cohort", "save_truth", "load_truth"]
