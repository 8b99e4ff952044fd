"""Discovery of EEG-fMRI, fMRI-only and EEG-only runs in a BIDS dataset (raw or derivative).

A run is one ``(subject, session, task, run)``. Its EEG file (``eeg/*_eeg.{set,vhdr,edf,bdf,fif}``) and
fMRI file (``func/*_bold.nii[.gz]`` or an already parcellated ``func/*_bold.{tsv,tsv.gz,npy}``) are
paired by those entities; ``pair_map`` renames EEG entity values for datasets whose labels differ
(``"task-eegfmriNF=NF"`` pairs EEG task ``eegfmriNF`` with fMRI task ``NF``). Numeric run labels pair
regardless of zero padding (``run-01`` with ``run-1``). Files under ``derivatives/`` win over raw files
of the same run (they are the cleaned EEG / preprocessed BOLD). Nothing is read here except file
names and JSON/TSV sidecars; every decision not to use a run is recorded in the report with a reason.

Which modalities a cohort uses (``data.modalities``): ``both`` (pairs only), ``fmri`` or ``eeg`` (that
modality alone, the other ignored), or ``auto``: pairs when any run has both, else the one modality the
dataset has. One cohort has one set of modalities, because node slots must be the same in every run.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gzip
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from twinbrain.data.types import entity_label

EEG_EXTS = (".set", ".vhdr", ".edf", ".bdf", ".fif")
NIFTI_EXTS = (".nii", ".nii.gz")
TABLE_EXTS = (".tsv", ".tsv.gz", ".npy")
_ENTITY = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")
_PAIR_ENTITIES = ("sub", "ses", "task", "run")
MODALITY_MODES = ("auto", "both", "fmri", "eeg")
EXPECTED_LAYOUT = ("expected BIDS layout: <root>/sub-<label>/[ses-<label>/]eeg/sub-<label>[_ses-<label>]_task-<label>"
                   "[_run-<index>]_eeg.{set,vhdr,edf,bdf,fif} and/or .../func/..._bold.{nii,nii.gz} (with "
                   "data.atlas) or parcellated ..._bold.{tsv,npy} + _regions.tsv, each with a JSON sidecar "
                   "(RepetitionTime for BOLD); see docs/data.md. For plain arrays use data.source: arrays")


@dataclass(frozen=True)
class BidsFile:
    """A file whose name follows ``key-value_..._suffix.ext``."""
    path: Path
    entities: tuple[tuple[str, str], ...]
    suffix: str
    ext: str
    derivative: bool

    def get(self, name: str, default: str = "") -> str:
        return dict(self.entities).get(name, default)


def parse_bids_name(path: str | Path, derivative: bool = False) -> BidsFile | None:
    """Split a BIDS file name into entities, suffix and extension; None if it does not follow BIDS."""
    path = Path(path)
    name = path.name
    ext = "".join(path.suffixes[-2:]) if name.endswith((".nii.gz", ".tsv.gz")) else path.suffix
    stem = name[: len(name) - len(ext)]
    parts = stem.split("_")
    if not parts or not parts[-1].isalnum():
        return None
    ents = []
    for p in parts[:-1]:
        m = _ENTITY.match(p)
        if not m:
            return None
        ents.append((m.group(1), m.group(2)))
    return BidsFile(path, tuple(ents), parts[-1], ext, derivative)


def run_label(value: str) -> str:
    """Pairing form of a run label: ``'01'`` and ``'1'`` are the same run."""
    return str(int(value)) if value.isdigit() else value


def parse_pair_map(items: list[str] | tuple[str, ...]) -> dict[tuple[str, str], str]:
    """``["task-eegfmriNF=NF"]`` -> ``{("task", "eegfmriNF"): "NF"}`` (EEG value -> fMRI value)."""
    out = {}
    for item in items:
        m = re.match(r"^(sub|ses|task|run)-([a-zA-Z0-9]+)=([a-zA-Z0-9]+)$", item.strip())
        if not m:
            raise ValueError(f"data.pair_map entry '{item}' is not ENTITY-EEGVALUE=FMRIVALUE with ENTITY in "
                             f"sub, ses, task, run (e.g. 'task-eegfmriNF=NF')")
        out[(m.group(1), m.group(2))] = m.group(3)
    return out


def read_json(path: Path) -> dict:
    try:
        out = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON sidecar ({exc}); fix or regenerate the file") from exc
    if not isinstance(out, dict):
        raise ValueError(f"{path}: a JSON sidecar must be an object, got {type(out).__name__}")
    return out


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a TSV file as dicts keyed by its header (``n/a`` kept as text)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, csv.Error, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable TSV file ({exc}); fix or regenerate it") from exc
    return rows


def find_associated(data: BidsFile, root: Path, suffix: str, exts: tuple[str, ...]) -> Path | None:
    """BIDS inheritance: the closest ``*_<suffix><ext>`` whose entities are a subset of ``data``'s.

    Searches the file's folder and its parents up to ``root``; in one folder the most specific
    candidate (most matching entities) wins.
    """
    mine = set(data.entities)
    folder = data.path.parent
    root = root.resolve()
    while True:
        best, best_n = None, -1
        for p in sorted(folder.glob(f"*{suffix}*")):
            f = parse_bids_name(p)
            if f is None or f.suffix != suffix or f.ext not in exts or p == data.path:
                continue
            if set(f.entities) <= mine and len(f.entities) > best_n:
                best, best_n = p, len(f.entities)
        if best is not None:
            return best
        if folder.resolve() == root or folder.parent == folder:
            return None
        folder = folder.parent


@dataclass
class RunPair:
    """One run with every file preprocessing needs (None where the dataset has none): EEG and fMRI, or
    one of them (the other is None)."""
    subject: str
    session: str
    task: str
    run: str
    eeg: Path | None
    fmri: Path | None
    fmri_kind: str                     # 'nifti' | 'table' (already parcellated [regions x volumes]) | 
    eeg_sidecar: Path | None = None
    fmri_sidecar: Path | None = None
    channels: Path | None = None       # channels.tsv (types, bad channels)
    electrodes: Path | None = None     # electrodes.tsv (positions)
    coordsystem: Path | None = None    # *_coordsystem.json (units of electrodes.tsv)
    confounds: Path | None = None      # fMRIPrep *_desc-confounds_timeseries.tsv
    regions: Path | None = None        # region table of a parcellated fMRI file
    eeg_entities: dict[str, str] = field(default_factory=dict)
    fmri_entities: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return entity_label(self.subject, self.session, self.task, self.run)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, p in (("fmri", self.fmri), ("eeg", self.eeg)) if p is not None)

    def describe(self) -> str:
        return " + ".join(p.name for p in (self.eeg, self.fmri) if p is not None)

    def sources(self) -> list[Path]:
        """Every input file whose change must invalidate the prepared run."""
        return [p for p in (self.eeg, self.fmri, self.eeg_sidecar, self.fmri_sidecar, self.channels,
                            self.electrodes, self.coordsystem, self.confounds, self.regions) if p is not None]


@dataclass
class Skip:
    what: str
    reason: str


@dataclass
class DiscoveryReport:
    root: Path
    found: list[RunPair] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    mode: str = "both"                 # modalities used: 'both' | 'fmri' | 'eeg'

    @property
    def kind(self) -> str:
        return {"both": "paired EEG-fMRI", "fmri": "fMRI-only", "eeg": "EEG-only"}[self.mode]

    def summary(self) -> str:
        subs = sorted({p.subject for p in self.found})
        tasks = sorted({p.task for p in self.found})
        lines = [f"BIDS root {self.root}: {len(self.found)} {self.kind} runs, {len(subs)} subjects "
                 f"({', '.join(subs) or '-'}), tasks {', '.join(tasks) or '-'}; {len(self.skipped)} skipped"]
        lines += [f"  + {p.key}: {p.describe()}" for p in self.found]
        lines += [f"  - {s.what}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _scan(root: Path) -> list[BidsFile]:
    """EEG and func files under ``root``; files inside ``derivatives/`` are flagged as derivative."""
    out = []
    for p in sorted(root.rglob("sub-*")):
        rel = p.relative_to(root).parts
        if not p.is_file() or any(x.startswith(".") or x == "sourcedata" for x in rel):
            continue
        if p.parent.name not in ("eeg", "func"):
            continue
        f = parse_bids_name(p, derivative="derivatives" in rel[:-1])
        if f is not None and f.get("sub"):
            out.append(f)
    return out


def _pick(cands: list[BidsFile], what: str, atlas_space: str) -> tuple[BidsFile | None, str]:
    """One file among candidates of the same run: derivative > raw, atlas space, desc-preproc."""
    if any(c.derivative for c in cands):
        cands = [c for c in cands if c.derivative]
    if len(cands) > 1 and atlas_space and any(c.get("space") for c in cands):
        cands = [c for c in cands if c.get("space") == atlas_space] or cands
    if len(cands) > 1 and any(c.get("desc") == "preproc" for c in cands):
        cands = [c for c in cands if c.get("desc") == "preproc"]
    if len(cands) == 1:
        return cands[0], ""
    names = ", ".join(c.path.name for c in cands)
    return None, (f"{len(cands)} candidate {what} files ({names}); keep one, or name the atlas with the "
                  f"space-<label> entity of the BOLD you want")


def discover(root: str | Path, *, tasks: list[str] | tuple[str, ...] = (), pair_map: list[str] = (),
             prefer: str = "table", atlas_space: str = "", modalities: str = "auto") -> DiscoveryReport:
    """Find (and pair) EEG and fMRI runs under ``root``.

    Args:
        tasks: keep only these task labels; empty = all.
        pair_map: entity renames EEG -> fMRI, see :func:`parse_pair_map` (only used for pairs).
        prefer: 'nifti' (an atlas is configured: parcellate BOLD images) or 'table' (use already
            parcellated ``*_bold.tsv/.npy``); runs that only have the other kind are skipped.
        atlas_space: ``space-`` label of the atlas, used to choose among BOLD files in several spaces.
        modalities: 'auto' | 'both' | 'fmri' | 'eeg' (see the module doc); ``report.mode`` says which was used.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BIDS root {root} does not exist; set data.bids_root to the dataset folder")
    if modalities not in MODALITY_MODES:
        raise ValueError(f"data.modalities '{modalities}' is not one of {', '.join(MODALITY_MODES)}")
    rename = parse_pair_map(pair_map)
    eeg, bold, confounds = defaultdict(list), defaultdict(list), defaultdict(list)
    for f in _scan(root):
        ents = dict(f.entities)
        if f.suffix == "eeg" and f.ext in EEG_EXTS:
            if modalities in ("auto", "both"):
                for (ent, old), new in rename.items():
                    if ents.get(ent) == old:
                        ents[ent] = new
            eeg[_pair_key(ents)].append(f)
        elif f.suffix == "bold" and f.ext in NIFTI_EXTS + TABLE_EXTS:
            bold[_pair_key(ents)].append(f)
        elif f.suffix in ("timeseries", "regressors") and f.get("desc") == "confounds":
            confounds[_pair_key(ents)].append(f)
    mode = modalities
    if mode == "auto":
        mode = "both" if eeg and bold else "eeg" if eeg else "fmri"
    report = DiscoveryReport(root, mode=mode)
    use_eeg, use_bold = (eeg if mode in ("both", "eeg") else {}), (bold if mode in ("both", "fmri") else {})

    want_ext = NIFTI_EXTS if prefer == "nifti" else TABLE_EXTS
    for key in sorted(set(use_eeg) | set(use_bold)):
        label = entity_label(*key)
        if tasks and key[2] not in tasks:
            report.skipped.append(Skip(label, f"task '{key[2]}' not in data.tasks {list(tasks)}"))
            continue
        if mode == "both" and key not in bold:
            report.skipped.append(Skip(label, f"EEG {eeg[key][0].path.name} has no fMRI run with the same "
                                              f"sub/ses/task/run; add data.pair_map if the labels differ"))
            continue
        if mode == "both" and key not in eeg:
            report.skipped.append(Skip(label, f"fMRI {bold[key][0].path.name} has no EEG run with the same "
                                              f"sub/ses/task/run; add data.pair_map if the labels differ"))
            continue
        b = why_b = None
        if key in use_bold:
            usable = [x for x in bold[key] if x.ext in want_ext]
            if not usable:
                kind = ("NIfTI BOLD image to parcellate with data.atlas (clear data.atlas to use parcellated "
                        "tables)") if prefer == "nifti" else \
                    "parcellated *_bold.tsv/.npy (set data.atlas to parcellate NIfTI BOLD)"
                report.skipped.append(Skip(label, f"no {kind}; found {', '.join(x.path.name for x in bold[key])}"))
                continue
            b, why_b = _pick(usable, "fMRI", atlas_space)
        e = why_e = None
        if key in use_eeg:
            e, why_e = _pick(eeg[key], "EEG", "")
        if (key in use_eeg and e is None) or (key in use_bold and b is None):
            report.skipped.append(Skip(label, why_e or why_b))
            continue
        report.found.append(_make_pair(root, e, b, confounds.get(key, [])))
    return report


def _pair_key(ents: dict[str, str]) -> tuple[str, str, str, str]:
    return ents.get("sub", ""), ents.get("ses", ""), ents.get("task", ""), run_label(ents.get("run", ""))


def _make_pair(root: Path, e: BidsFile | None, b: BidsFile | None, confounds: list[BidsFile]) -> RunPair:
    conf = None
    if confounds and b is not None:  # the confounds file of the same pipeline as the chosen BOLD
        same = [c for c in confounds if c.path.parent == b.path.parent] or confounds
        conf = same[0].path
    ents = dict((b or e).entities)

    def near(f: BidsFile | None, suffix: str, exts: tuple[str, ...]) -> Path | None:
        return find_associated(f, root, suffix, exts) if f is not None else None
    return RunPair(
        subject=ents["sub"], session=ents.get("ses", ""), task=ents.get("task", ""),
        run=ents.get("run", ""), eeg=e.path if e else None, fmri=b.path if b else None,
        fmri_kind="" if b is None else "nifti" if b.ext in NIFTI_EXTS else "table",
        eeg_sidecar=near(e, "eeg", (".json",)),
        fmri_sidecar=near(b, "bold", (".json",)),
        channels=near(e, "channels", (".tsv",)),
        electrodes=near(e, "electrodes", (".tsv",)),
        coordsystem=near(e, "coordsystem", (".json",)),
        confounds=conf,
        regions=near(b, "regions", (".tsv",)) if b is not None and b.ext in TABLE_EXTS else None,
        eeg_entities=dict(e.entities) if e else {}, fmri_entities=dict(b.entities) if b else {})


# ---------------------------------------------------------------- sidecar values

def repetition_time(pair: RunPair) -> float:
    """TR in seconds from the fMRI JSON sidecar (``RepetitionTime``); never guessed."""
    if pair.fmri_sidecar is None:
        raise ValueError(f"{pair.fmri}: no JSON sidecar with RepetitionTime found (looked for "
                         f"{pair.fmri.name.split('.')[0]}.json and inherited *_bold.json up to the dataset root); "
                         f"add one, e.g. {{\"RepetitionTime\": 2.0}}")
    meta = read_json(pair.fmri_sidecar)
    tr = meta.get("RepetitionTime")
    if not isinstance(tr, (int, float)) or isinstance(tr, bool) or tr <= 0:
        raise ValueError(f"{pair.fmri_sidecar}: RepetitionTime is {tr!r}; it must be the TR in seconds (> 0)")
    return float(tr)


def discarded_volumes(pair: RunPair) -> int:
    """Volumes removed before volume 0 whose scanner markers are still in the EEG."""
    meta = read_json(pair.fmri_sidecar) if pair.fmri_sidecar else {}
    return int(meta.get("NumberOfVolumesDiscardedByUser", 0) or 0)


def acq_time_offset(pair: RunPair, root: Path) -> float | None:
    """EEG start minus fMRI start (s) from ``*_scans.tsv`` ``acq_time`` columns, or None if unknown."""
    times = {}
    if pair.eeg is None or pair.fmri is None:
        return None
    for kind, ents in (("eeg", pair.eeg_entities), ("bold", pair.fmri_entities)):
        sub_dir = root / f"sub-{ents['sub']}"
        folders = [sub_dir / f"ses-{ents['ses']}", sub_dir] if ents.get("ses") else [sub_dir]
        want = {k: v for k, v in ents.items() if k in _PAIR_ENTITIES}
        for folder in folders:
            for scans in folder.glob("*_scans.tsv"):
                for row in read_tsv(scans):
                    f = parse_bids_name(row.get("filename", ""))
                    if f and f.suffix == kind and all(dict(f.entities).get(k) == v for k, v in want.items()):
                        try:
                            times[kind] = _dt.datetime.fromisoformat(row.get("acq_time", ""))
                        except ValueError:
                            pass
    if "eeg" in times and "bold" in times:
        return (times["eeg"] - times["bold"]).total_seconds()
    return None
