"""``DataModule``: cohort -> split -> normalisation -> graphs -> datasets -> per-rank loaders.

Evaluation loaders give every real window to exactly one rank and pad the shorter ranks with whole
dummy batches (``batch.weight == 0``) so every rank runs the same number of forward passes (FSDP and
ZeRO-3 gather parameters inside forward). Evaluation accumulators are sums weighted by
``batch.weight`` and all-reduced across ranks, so padding never counts.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from twinbrain.config import Config
from twinbrain.data.graph import GraphEdges, build_group_graph, build_run_graph, lag_volumes
from twinbrain.data.mapped import release_recording
from twinbrain.data.sampler import WindowLoader, WindowSampler
from twinbrain.data.timing import samples_per_tr, span_volumes, volumes
from twinbrain.data.types import POSITION_UNIT, Cohort, GroundTruth, cohort_fingerprint, present_modalities
from twinbrain.data.windows import (NormStats, Split, WindowDataset, build_maps, compute_norm_stats,
                                    split_recordings)

log = logging.getLogger(__name__)


class DataModule:
    """Everything the trainer, evaluator and twin need from the data, built once by :meth:`setup`.

    ``cohort`` may be passed directly (tests, notebooks); otherwise ``setup`` loads it with
    :func:`twinbrain.data.source.load_cohort`.
    """

    def __init__(self, cfg: Config, cohort: Cohort | None = None):
        self.cfg = cfg
        self.cohort = cohort
        self.in_memory = cohort is not None      # recorded in the run directory (see metadata())
        self._fingerprint: str | None = None
        self._record: str | None = None
        self.split: Split | None = None
        self.stats: NormStats | None = None
        self.graphs: GraphEdges | dict[int, GraphEdges] | None = None
        self.group_graph: GraphEdges | None = None
        self._datasets: dict[str, WindowDataset] = {}
        self._maps: tuple[dict[str, int], dict[str, int]] | None = None

    # -------------------------------------------------------------- build
    def setup(self) -> "DataModule":
        cfg = self.cfg
        if self.cohort is None:
            from twinbrain.data.source import load_cohort
            self.cohort = load_cohort(cfg)
        self._check_cohort()
        self._maps = build_maps(self.cohort)
        self.split = split_recordings(self.cohort, cfg)
        self.stats = compute_norm_stats(self.cohort, self.split)
        self._build_graphs()
        d = cfg.data
        for name in ("train", "val", "test"):
            self._datasets[name] = WindowDataset(self.cohort, self.split.spans(name), self.graphs, self.stats,
                                                 self.subject_map, self.session_map,
                                                 window_s=d.window_s, stride_s=d.stride_s, cache_mb=d.cache_mb,
                                                 cache_evict=d.shuffle_block > 0)
        self._log_summary()
        return self

    def _check_cohort(self) -> None:
        """Fixed node slots, one TR and one samples-per-TR for the whole cohort (windows must batch)."""
        recs = self.cohort.recordings
        if not recs:
            raise ValueError("the cohort has no recordings")
        ref = recs[0]
        spt = samples_per_tr(ref)
        for rec in recs:
            rec.check()
            if rec.region_names != ref.region_names or rec.channel_names != ref.channel_names:
                raise ValueError(f"{rec.key}: region/channel slots differ from {ref.key}; node identity must be "
                                 f"fixed — map every recording onto the same atlas slots and channel list")
            if abs(rec.tr - ref.tr) > 1e-9:
                raise ValueError(f"{rec.key}: TR {rec.tr} s differs from {ref.key} ({ref.tr} s); windows of "
                                 f"different TRs cannot be batched — resample the fMRI to one TR")
            if samples_per_tr(rec) != spt:
                raise ValueError(f"{rec.key}: {samples_per_tr(rec)} EEG samples per TR but {ref.key} has {spt}; "
                                 f"resample the EEG to one rate (data.eeg_sfreq)")
        volumes(self.cfg.data.window_s, ref.tr, "data.window_s")
        volumes(self.cfg.data.stride_s, ref.tr, "data.stride_s")

    def _build_graphs(self) -> None:
        """Graphs from training spans only (plus calibration spans of held-out runs in run scope)."""
        g, recs = self.cfg.graph, self.cohort.recordings
        band = (self.cfg.data.eeg_l_freq, self.cfg.data.eeg_h_freq)
        fit = {}
        for i, s, e in self.split.train:  # the longest training span of each recording fits its graph
            if i not in fit or e - s > fit[i][1] - fit[i][0]:
                fit[i] = (s, e)
        ids = sorted(fit)
        self.group_graph = build_group_graph([recs[i] for i in ids], [fit[i] for i in ids], g, band)
        if g.scope == "group":
            self.graphs = self.group_graph
            return
        # Run scope: a held-out run without a usable calibration span falls back to the group graph,
        # because its own data are what it will be evaluated on.
        min_vols = int(lag_volumes(recs[0].tr, g.cross_lag_min_s, g.cross_lag_max_s).max()) + 3
        for i, span in self.split.calib.items():
            v0, v1 = span_volumes(recs[i], *span)
            if v1 - v0 >= min_vols:
                fit.setdefault(i, span)
        self.graphs = {}
        for i in range(len(recs)):
            self.graphs[i] = build_run_graph(recs[i], fit[i], g, band) if i in fit else self.group_graph
            release_recording(recs[i])

    def _log_summary(self) -> None:
        sp = self.split
        subj = {k: len(v) for k, v in sp.subjects.items()}
        wins = {k: len(v) for k, v in self._datasets.items()}
        if isinstance(self.graphs, dict):
            per = [gr.num_edges() for gr in self.graphs.values()]
            edges = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
            kind = "mean edges per run graph"
        else:
            edges, kind = self.graphs.num_edges(), "edges (group graph)"
        log.info("data: %d recordings, split=%s, subjects per split %s, windows per split %s, %s %s",
                 len(self.cohort.recordings), self.cfg.data.split, subj, wins, kind, edges)

    # -------------------------------------------------------------- properties
    def _need(self):
        if self.split is None:
            raise RuntimeError("DataModule.setup() has not been called")

    @property
    def subject_map(self) -> dict[str, int]:
        self._need()
        return self._maps[0]

    @property
    def session_map(self) -> dict[str, int]:
        self._need()
        return self._maps[1]

    @property
    def n_fmri_slots(self) -> int:
        self._need()
        return int(self.cohort.recordings[0].fmri.shape[0])

    @property
    def n_eeg_slots(self) -> int:
        self._need()
        return int(self.cohort.recordings[0].eeg.shape[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities with node slots in this cohort (``('fmri',)`` for an fMRI-only cohort)."""
        return present_modalities(self.n_fmri_slots, self.n_eeg_slots)

    @property
    def samples_per_tr(self) -> int:
        self._need()
        return samples_per_tr(self.cohort.recordings[0])

    @property
    def tr(self) -> float:
        self._need()
        return float(self.cohort.recordings[0].tr)

    @property
    def region_names(self) -> list[str]:
        self._need()
        return list(self.cohort.recordings[0].region_names)

    @property
    def channel_names(self) -> list[str]:
        self._need()
        return list(self.cohort.recordings[0].channel_names)

    @property
    def truth(self) -> GroundTruth | None:
        self._need()
        return self.cohort.truth

    @property
    def train_dataset(self) -> WindowDataset:
        self._need()
        return self._datasets["train"]

    @property
    def val_dataset(self) -> WindowDataset:
        self._need()
        return self._datasets["val"]

    @property
    def test_dataset(self) -> WindowDataset:
        self._need()
        return self._datasets["test"]

    def dataset(self, split: str) -> WindowDataset:
        self._need()
        if split not in self._datasets:
            raise ValueError(f"unknown split '{split}'; use train, val or test")
        return self._datasets[split]

    def metadata(self) -> dict:
        """JSON-serialisable facts a checkpoint needs to rebuild inputs later (maps, slots, stats, split)."""
        self._need()
        return {"subject_map": self.subject_map, "session_map": self.session_map,
                "n_fmri_slots": self.n_fmri_slots, "n_eeg_slots": self.n_eeg_slots,
                "samples_per_tr": self.samples_per_tr, "tr": self.tr, "region_names": self.region_names,
                "channel_names": self.channel_names, "norm_stats": self.stats.to_dict(),
                "split": self.split.to_dict(), "recordings": [r.key for r in self.cohort.recordings],
                "cohort_fingerprint": self.fingerprint, "modalities": list(self.modalities),
                "position_unit": POSITION_UNIT,
                **({"cohort_record": rec} if (rec := self._record_cohort()) else {})}

    @property
    def fingerprint(self) -> str:
        """:func:`twinbrain.data.types.cohort_fingerprint` of the cohort (computed once)."""
        self._need()
        if self._fingerprint is None:
            self._fingerprint = cohort_fingerprint(self.cohort.recordings)
        return self._fingerprint

    def _record_cohort(self) -> str | None:
        """A cohort passed in memory is written once into ``<run.out>/cohort`` (an arrays folder, used as is)
        when the run directory exists, so every CLI verb can rebuild it from the checkpoint alone."""
        if not self.in_memory:
            return None
        if self._record is None:
            run = Path(self.cfg.run.out)
            if not run.is_dir():
                return None
            root = (run / "cohort").resolve()
            manifest = root / "manifest.json"
            try:
                same = json.loads(manifest.read_text()).get("fingerprint") == self.fingerprint
            except (OSError, ValueError):
                same = False
            if not same:
                from twinbrain.data.arrays import write_arrays
                write_arrays(self.cohort, root, preprocessed=True, fingerprint=self.fingerprint)
            self._record = str(root)
        return self._record

    # -------------------------------------------------------------- loaders
    def train_loader(self, rank: int = 0, world_size: int = 1, device=None) -> WindowLoader:
        """Infinite, shuffled, augmented batches of ``train.batch_size`` windows for ``rank``."""
        ds = self.train_dataset
        sampler = WindowSampler(len(ds), self.cfg.train.batch_size, world_size, rank, seed=self.cfg.train.seed,
                                shuffle=True, bucket_keys=ds.sizes(), pad="wrap", group_keys=ds.index[:, 0],
                                block=self.cfg.data.shuffle_block)
        return WindowLoader(ds, sampler, augment=self.cfg.data, seed=self.cfg.train.seed,
                            num_workers=self.cfg.data.num_workers, infinite=True, device=device)

    def eval_loader(self, split: str = "val", rank: int = 0, world_size: int = 1,
                    batch_size: int | None = None) -> WindowLoader:
        """One pass, no augmentation, dataset order; each real window on exactly one rank, the same batch
        count on every rank (padding batches have ``batch.weight == 0``)."""
        ds = self.dataset(split)
        if len(ds) == 0:
            raise ValueError(f"split '{split}' has no window (data.split={self.cfg.data.split}); "
                             f"hold out subjects / a tail fraction for it")
        sampler = WindowSampler(len(ds), batch_size or self.cfg.train.batch_size, world_size, rank,
                                seed=self.cfg.train.seed, shuffle=False, bucket_keys=ds.sizes(), pad="dummy")
        return WindowLoader(ds, sampler, augment=None, seed=self.cfg.train.seed,
                            num_workers=self.cfg.data.num_workers, infinite=False)
