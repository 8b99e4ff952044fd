"""Content-hashed, atomic store of prepared runs (one ``.npz`` + one ``.json`` per run).

The ``.npz`` is uncompressed, so its signals can be memory-mapped in place (``Store.get(key, mmap=True)``,
the way training reads a store: windows are paged in lazily by the process that uses them).

An entry is ``<key>.npz`` (arrays: ``eeg [C, S]``, ``fmri [R, T]``, ``channel_pos [C, 3]``,
``region_pos [R, 3]``, ``region_mask [R]``, ``channel_names [C]``, ``region_names [R]``, optional
``modules [R]``; readable with ``numpy.load`` alone, no pickles) and ``<key>.json`` (scalars, metadata,
the parameters that produced it and fingerprints of its source files). The JSON is written last and
is the commit marker: an entry exists only when both files do, and both are moved into place with
``os.replace`` from temporary files, so an error or a kill mid-write never leaves a partial entry.

Keys are chosen by the caller (``prepare`` uses ``<run id>-<hash of every parameter and source
fingerprint>``), so a change of any preprocessing or graph parameter, of the atlas, of a source file or
of :data:`SCHEMA_VERSION` gives a new key instead of a stale hit.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from twinbrain.data.mapped import npz_memmap
from twinbrain.data.types import Recording
from twinbrain.schema import MODALITIES

# Bump when the entry format or the meaning of stored arrays changes: old entries are then never reused.
SCHEMA_VERSION = 2          # 2: positions in millimetres (were metres)
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def params_hash(obj: Any) -> str:
    """sha256 of a canonical JSON encoding (sorted keys); floats keep their repr."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """Cheap identity of a (possibly large) source file: relative path, size, mtime in ns."""
    path = Path(path)
    st = path.stat()
    name = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else path.name
    return {"path": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


class Store:
    """Directory of prepared runs: ``get(key)``, ``put(key, recording)``, ``keys()``, ``find(params)``.

    Reading needs nothing but this directory (cache-only mode: train on a node without the raw data).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        if not _KEY.match(key):
            raise ValueError(f"store key {key!r} may only contain letters, digits, '_', '.', '-'")
        return self.root / f"{key}.npz", self.root / f"{key}.json"

    def keys(self) -> list[str]:
        """Committed entries (JSON and npz both present), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json")
                      if not p.name.startswith(".") and (p.with_suffix(".npz")).is_file()
                      and _KEY.match(p.stem) and not p.stem.startswith("truth-"))

    def __contains__(self, key: str) -> bool:
        npz, js = self._paths(key)
        return npz.is_file() and js.is_file()

    def __len__(self) -> int:
        return len(self.keys())

    def info(self, key: str) -> dict[str, Any]:
        """The entry's JSON: run ids, rates, ``params``, ``sources``, ``meta``."""
        _, js = self._paths(key)
        if not js.is_file():
            raise KeyError(f"no entry '{key}' in store {self.root}")
        try:
            return json.loads(js.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{js}: corrupt store entry ({exc}); delete it and re-run `twinbrain prepare`") from exc

    def get(self, key: str, mmap: bool = False) -> Recording:
        """Load one entry as a :class:`Recording` (raises KeyError if absent).

        ``mmap=True``: ``eeg`` and ``fmri`` are read-only memory maps into the ``.npz`` (nothing is read
        until a window is sliced; see :mod:`twinbrain.data.mapped`), so a process's memory does not grow
        with the cohort. The other arrays are small and loaded."""
        npz, _ = self._paths(key)
        info = self.info(key)
        if info.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{npz}: written with store schema {info.get('schema')}, this code reads "
                             f"{SCHEMA_VERSION}; re-run `twinbrain prepare` to rebuild the store")
        try:
            signals = MODALITIES if mmap else ()
            with np.load(npz, allow_pickle=False) as z:
                arr = {k: z[k] for k in z.files if k not in signals}
            arr.update({k: npz_memmap(npz, k) for k in signals})
            for k in MODALITIES:
                if not mmap and arr[k].dtype != np.float32:          # float16 storage -> float32 in memory
                    arr[k] = arr[k].astype(np.float32)
        except Exception as exc:
            raise ValueError(f"{npz}: unreadable store entry ({type(exc).__name__}: {exc}); delete it and "
                             f"re-run `twinbrain prepare`") from exc
        rec = Recording(
            subject=info["subject"], session=info["session"], task=info["task"], run=info["run"],
            eeg=arr["eeg"], eeg_sfreq=float(info["eeg_sfreq"]), fmri=arr["fmri"], tr=float(info["tr"]),
            channel_names=[str(n) for n in arr["channel_names"]],
            region_names=[str(n) for n in arr["region_names"]],
            channel_pos=arr["channel_pos"], region_pos=arr["region_pos"],
            region_mask=arr["region_mask"].astype(bool), eeg_onset_s=float(info["eeg_onset_s"]),
            modules=arr.get("modules"), meta=dict(info.get("meta", {}), store_key=key))
        rec.check(str(npz))
        return rec

    def put(self, key: str, rec: Recording, info: dict[str, Any] | None = None, dtype=np.float32) -> None:
        """Write one entry atomically; on any error nothing of it remains. ``dtype``: storage type of the
        signals (float32; float16 halves disk and page cache — windows are computed in float32 either way)."""
        rec.check(rec.key)
        npz, js = self._paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        tag = f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp_npz, tmp_js = self.root / f"{tag}.npz.tmp", self.root / f"{tag}.json.tmp"
        if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"store {self.root}: signal dtype {dtype} not supported; use float32 or float16")
        arrays = {"eeg": np.asarray(rec.eeg, dtype), "fmri": np.asarray(rec.fmri, dtype),
                  "channel_pos": np.asarray(rec.channel_pos, np.float32),
                  "region_pos": np.asarray(rec.region_pos, np.float32),
                  "region_mask": np.asarray(rec.region_mask, bool),
                  "channel_names": np.array(rec.channel_names, dtype=str),
                  "region_names": np.array(rec.region_names, dtype=str)}
        if rec.modules is not None:
            arrays["modules"] = np.asarray(rec.modules, np.int64)
        doc = {"schema": SCHEMA_VERSION, "key": key, "subject": rec.subject, "session": rec.session,
               "task": rec.task, "run": rec.run, "eeg_sfreq": rec.eeg_sfreq, "tr": rec.tr,
               "eeg_onset_s": rec.eeg_onset_s, "eeg_shape": list(rec.eeg.shape),
               "fmri_shape": list(rec.fmri.shape), "meta": _json_safe(rec.meta), **_json_safe(info or {})}
        committed = False
        try:
            with open(tmp_npz, "wb") as fh:          # a file object: np.savez adds no suffix
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            with open(tmp_js, "w") as fh:
                json.dump(doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_npz, npz)
            os.replace(tmp_js, js)                   # commit marker last
            committed = True
        finally:
            for p in (tmp_npz, tmp_js):
                p.unlink(missing_ok=True)
            if not committed:                        # npz may already be in place without its JSON
                js.unlink(missing_ok=True)
                npz.unlink(missing_ok=True)

    def remove(self, key: str) -> None:
        npz, js = self._paths(key)
        js.unlink(missing_ok=True)                   # uncommit first
        npz.unlink(missing_ok=True)

    def find(self, params: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
        """Keys whose stored ``params`` equal ``params`` on every key not in ``ignore``."""
        ignore = set(ignore)
        want = {k: v for k, v in _json_safe(params).items() if k not in ignore}
        out = []
        for key in self.keys():
            have = self.info(key).get("params", {})
            if {k: v for k, v in have.items() if k not in ignore} == want:
                out.append(key)
        return out

    def closest_mismatch(self, params: dict[str, Any], ignore: Iterable[str] = ()) -> tuple[str, list[str]]:
        """(key, differing parameter names) of the entry that differs from ``params`` least."""
        ignore, want = set(ignore), _json_safe(params)
        best: tuple[str, list[str]] = ("", [])
        for key in self.keys():
            have = self.info(key).get("params", {})
            diff = sorted(k for k in set(want) | set(have) if k not in ignore and want.get(k) != have.get(k))
            if not best[0] or len(diff) < len(best[1]):
                best = (key, diff)
        return best
