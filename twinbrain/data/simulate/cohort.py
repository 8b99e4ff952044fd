"""Assemble the simulated cohort: anatomy, per-subject parameters, paired perturbation runs, recordings."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ...config import SimConfig
from ..types import Cohort, GroundTruth, Recording
from . import connectome, dynamics, eeg_forward
from .dynamics import NeuralParams, NetworkState, Stimulus, Timing
from .hemodynamics import BalloonParams

BURN_IN_S = 40.0         # discarded transient: several slow time constants and haemodynamic cycles
PRE_ONSET_S = 4.0        # paired runs: baseline before the pulse (rounded up to whole TRs)
RESPONSE_S = 40.0        # paired runs: response window after the pulse (rounded up to whole TRs)
EEG_VOLTS_PER_UNIT = 6e-4  # EEG = this * gain @ Re(z): ~20 uV channel std at the default noise

# Stream tags: every random draw comes from SeedSequence([seed, tag, ids...]), so one
# subject's data do not change when subjects or sessions are added.
_ANATOMY, _SUBJECT, _RUN, _PAIRED, _SENSOR = range(5)


def _rng(seed: int, tag: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2 ** 64, tag, *ids]))


@dataclass
class Anatomy:
    """What all subjects share: regions, sensors, group connectome, lead field.

    coupling: ``[R, R]`` group coupling (sim.coupling x normalised connectome), j -> i.
    gain: ``[C, R]`` lead field.  freq_hz: ``[R]`` group alpha frequency per region.
    """
    modules: np.ndarray
    region_names: list[str]
    region_pos: np.ndarray
    region_ori: np.ndarray
    channel_names: list[str]
    channel_pos: np.ndarray
    gain: np.ndarray
    coupling: np.ndarray
    freq_hz: np.ndarray
    perturb_regions: np.ndarray


@dataclass
class Subject:
    """One subject's parameters: coupling ``[R, R]``, bifurcation ``a`` ``[R]``, ``freq_hz`` ``[R]``."""
    coupling: np.ndarray
    a: np.ndarray
    freq_hz: np.ndarray
    coupling_scale: float


def build_anatomy(cfg: SimConfig) -> Anatomy:
    """Deterministic in ``cfg.seed``, ``n_regions``, ``n_modules``, ``n_channels``, ``coupling``."""
    rng = _rng(cfg.seed, _ANATOMY)
    r, m = cfg.n_regions, cfg.n_modules
    modules = connectome.module_labels(r, m)
    centre, _ = eeg_forward.head_sphere()
    pos, ori = connectome.region_layout(modules, centre, rng)
    coupling = cfg.coupling * connectome.group_coupling(pos, modules, rng)
    names, chan_pos = eeg_forward.select_channels(cfg.n_channels)
    width = max(3, len(str(r - 1)))
    freq = np.clip(dynamics.ALPHA_HZ + dynamics.ALPHA_SPREAD_HZ * rng.standard_normal(r), 7.0, 13.5)
    n_perturb = max(0, cfg.n_perturb)
    return Anatomy(modules=modules.astype(np.int64),
                   region_names=[f"M{modules[i]}_R{i:0{width}d}" for i in range(r)],
                   region_pos=pos, region_ori=ori, channel_names=names, channel_pos=chan_pos,
                   gain=eeg_forward.lead_field(chan_pos, pos, ori), coupling=coupling, freq_hz=freq,
                   perturb_regions=connectome.choose_perturb_regions(coupling, modules, n_perturb))


def build_subject(cfg: SimConfig, anatomy: Anatomy, index: int) -> Subject:
    """Subject ``index`` (0-based): group parameters with relative spread ``cfg.subject_variability``.

    Coupling: global scale x (1 + v xi) and per-edge log-normal jitter.  Local: the
    bifurcation parameter per region, the individual alpha frequency (one shift
    per subject, as between people) and a small regional jitter.
    """
    rng = _rng(cfg.seed, _SUBJECT, index)
    v = cfg.subject_variability
    r = cfg.n_regions
    scale = max(0.0, 1.0 + v * rng.standard_normal())
    coupling = scale * connectome.subject_coupling(anatomy.coupling, v, rng)
    a = np.minimum(dynamics.A_BASE * (1.0 + v * rng.standard_normal(r)), -0.1)
    freq = anatomy.freq_hz * (1.0 + v * rng.standard_normal()) + v * dynamics.ALPHA_SPREAD_HZ * rng.standard_normal(r)
    return Subject(coupling, a, np.clip(freq, 5.0, 15.0), cfg.coupling * scale)


def neural_params(cfg: SimConfig, subjects: list[Subject]) -> NeuralParams:
    """Stack subjects into G = len(subjects) networks."""
    return NeuralParams(coupling=np.stack([s.coupling for s in subjects]),
                        a=np.stack([s.a for s in subjects]),
                        freq_hz=np.stack([s.freq_hz for s in subjects]), noise=cfg.noise)


def _n_tr(seconds: float, tr: float) -> int:
    return max(1, math.ceil(seconds / tr - 1e-9))


def _paired_runs(cfg: SimConfig, anatomy: Anatomy, params: NeuralParams, start: NetworkState,
                 timing: Timing) -> tuple[np.ndarray, np.ndarray, float]:
    """Δ-responses of every subject to a pulse in each perturbed region.

    All P + 1 copies of a subject (baseline + one per stimulated region) start from
    the same state and share every noise draw, so the difference is the causal
    effect of the pulse alone.  Returns Δ-BOLD ``[G, P, R, T_resp]`` (percent),
    Δ-EEG ``[G, P, C, S_resp]`` (V) and the onset (s from the start of the paired runs).
    """
    g_n, r_n = params.shape
    regions = anatomy.perturb_regions
    n_pre, n_resp = _n_tr(PRE_ONSET_S, cfg.tr), _n_tr(RESPONSE_S, cfg.tr)
    onset = n_pre * cfg.tr
    weights = np.zeros((g_n, r_n, len(regions) + 1))
    weights[:, regions, np.arange(len(regions)) + 1] = cfg.perturb_amplitude
    stim = Stimulus(weights, onset, onset + cfg.perturb_duration_s)
    rngs = [_rng(cfg.seed, _PAIRED, g) for g in range(g_n)]
    seg = dynamics.integrate(params, start.tile(len(regions) + 1), rngs, timing, n_pre + n_resp,
                             gain=anatomy.gain, stimulus=stim)
    d_bold = (seg.bold[:, 1:] - seg.bold[:, :1])[..., n_pre:]
    d_eeg = (seg.eeg[:, 1:] - seg.eeg[:, :1])[..., n_pre * timing.samples_per_tr:]
    return d_bold.astype(np.float32), (EEG_VOLTS_PER_UNIT * d_eeg).astype(np.float32), onset


def simulate_cohort(cfg: SimConfig) -> Cohort:
    """Simulate ``n_subjects x n_sessions`` resting-state EEG-fMRI runs with ground truth.

    Recordings (subject-major, ids "01".., task "rest", run "1"): EEG
    ``[C, T * tr * eeg_sfreq]`` float32 in volts and fMRI ``[R, T]`` float32 in percent
    signal change, ``T = minutes * 60 / tr`` volumes, starting together
    (``eeg_onset_s = 0``) after a discarded burn-in of ``BURN_IN_S``.  Truth: group and
    per-subject coupling ``[R, R]`` (j -> i), modules, lead field ``[C, R]``, and per
    subject Δ-BOLD ``[P, R, T_resp]`` / Δ-EEG ``[P, C, T_resp * tr * eeg_sfreq]`` from
    ``RESPONSE_S`` after a pulse onset at ``perturb_onset_s`` in paired runs.
    Same ``cfg`` -> bit-identical output.  The config is validated by
    ``twinbrain.config`` (``load_config``), not here.
    """
    timing = Timing.build(cfg.eeg_sfreq, cfg.tr, cfg.dt_ms)
    anatomy = build_anatomy(cfg)
    subject_ids = [f"{i + 1:02d}" for i in range(cfg.n_subjects)]
    session_ids = [f"{j + 1:02d}" for j in range(cfg.n_sessions)]
    subjects = [build_subject(cfg, anatomy, i) for i in range(cfg.n_subjects)]
    runs = [(i, j) for i in range(cfg.n_subjects) for j in range(cfg.n_sessions)]
    params = neural_params(cfg, [subjects[i] for i, _ in runs])
    rngs = [_rng(cfg.seed, _RUN, i, j) for i, j in runs]
    n_vol = int(cfg.minutes * 60.0 / cfg.tr + 1e-9)

    state = NetworkState.initial(params, rngs)
    dynamics.integrate(params, state, rngs, timing, _n_tr(BURN_IN_S, cfg.tr))   # discarded

    # Paired perturbation runs branch off each subject's first session after its burn-in.
    n_p = len(anatomy.perturb_regions)
    first = [k for k, (_, j) in enumerate(runs) if j == 0]
    if n_p:
        sub_params = neural_params(cfg, subjects)
        d_bold, d_eeg, onset = _paired_runs(cfg, anatomy, sub_params, state.select(first), timing)
    else:
        n_resp, spt = _n_tr(RESPONSE_S, cfg.tr), timing.samples_per_tr
        d_bold = np.zeros((cfg.n_subjects, 0, cfg.n_regions, n_resp), np.float32)
        d_eeg = np.zeros((cfg.n_subjects, 0, cfg.n_channels, n_resp * spt), np.float32)
        onset = _n_tr(PRE_ONSET_S, cfg.tr) * cfg.tr

    seg = dynamics.integrate(params, state, rngs, timing, n_vol, gain=anatomy.gain)
    recordings = []
    for k, (i, j) in enumerate(runs):
        eeg = seg.eeg[k, 0]
        eeg *= EEG_VOLTS_PER_UNIT
        # Sensor noise relative to each channel's signal std.
        noise_sd = (cfg.eeg_noise * eeg.std(axis=1, dtype=np.float64)).astype(np.float32)
        eeg += noise_sd[:, None] * _rng(cfg.seed, _SENSOR, i, j).standard_normal(eeg.shape, np.float32)
        recordings.append(Recording(
            subject=subject_ids[i], session=session_ids[j], task="rest", run="1",
            eeg=eeg, eeg_sfreq=float(cfg.eeg_sfreq),
            fmri=seg.bold[k, 0].astype(np.float32), tr=float(cfg.tr),
            channel_names=list(anatomy.channel_names), region_names=list(anatomy.region_names),
            # The simulator's anatomy works in metres (lead field); recordings carry millimetres.
            channel_pos=anatomy.channel_pos * 1e3, region_pos=anatomy.region_pos * 1e3,
            region_mask=np.ones(cfg.n_regions, bool), eeg_onset_s=0.0, modules=anatomy.modules.copy(),
            meta={"simulated": True, "seed": cfg.seed, "stream": [_RUN, i, j],
                  "coupling_scale": subjects[i].coupling_scale,
                  "alpha_hz": float(subjects[i].freq_hz.mean()), "burn_in_s": _n_tr(BURN_IN_S, cfg.tr) * cfg.tr,
                  "dt_s": timing.dt, "eeg_unit": "V", "fmri_unit": "percent signal change"}))

    truth = GroundTruth(
        coupling=anatomy.coupling,
        subject_coupling={sid: s.coupling for sid, s in zip(subject_ids, subjects)},
        perturb_regions=anatomy.perturb_regions,
        perturb_bold={sid: d_bold[i] for i, sid in enumerate(subject_ids)},
        perturb_eeg={sid: d_eeg[i] for i, sid in enumerate(subject_ids)},
        perturb_onset_s=float(onset), modules=anatomy.modules, gain=anatomy.gain,
        meta=_truth_meta(cfg, anatomy, subjects, subject_ids, timing))
    return Cohort(recordings, truth)


def _truth_meta(cfg: SimConfig, anatomy: Anatomy, subjects: list[Subject], subject_ids: list[str],
                timing: Timing) -> dict:
    """JSON-serialisable description of the generator (round-trips through save_truth)."""
    return {
        "generator": "twinbrain.data.simulate",
        "model": "Stuart-Landau alpha oscillators gated by connectome-coupled slow activity; "
                 "Balloon-Windkessel BOLD driven by the slow activity; dipole lead field EEG",
        "config": dataclasses.asdict(cfg),
        "subjects": subject_ids,
        "region_names": list(anatomy.region_names),
        "channel_names": list(anatomy.channel_names),
        "coupling_scale": {sid: s.coupling_scale for sid, s in zip(subject_ids, subjects)},
        "alpha_hz": {sid: float(s.freq_hz.mean()) for sid, s in zip(subject_ids, subjects)},
        "perturb_amplitude": cfg.perturb_amplitude,
        "perturb_duration_s": cfg.perturb_duration_s,
        "perturb_target": "slow activity input I of the stimulated region",
        "response_tr": _n_tr(RESPONSE_S, cfg.tr),
        "eeg_volts_per_unit": EEG_VOLTS_PER_UNIT,
        "units": {"eeg": "V", "perturb_eeg": "V", "fmri": "percent signal change",
                  "perturb_bold": "percent signal change", "gain": "unitless (EEG = eeg_volts_per_unit * gain @ Re z)"},
        "dt_s": timing.dt, "burn_in_s": _n_tr(BURN_IN_S, cfg.tr) * cfg.tr,
        "constants": {"rate": dynamics.RATE, "a_base": dynamics.A_BASE, "desync": dynamics.DESYNC,
                      "tau_slow": dynamics.TAU_SLOW, "sigma_slow": dynamics.SIGMA_SLOW,
                      "spectral_radius": connectome.SPECTRAL_RADIUS,
                      "balloon": dataclasses.asdict(BalloonParams())},
    }
