"""Memory-mapped signals and a bounded resident cache: a process holds only the windows it reads.

A store entry's ``<key>.npz`` is an uncompressed zip (``np.savez``), so each signal inside it is a plain
``.npy`` at a fixed byte offset: :func:`npz_memmap` maps it read-only without reading it, and the
:class:`~twinbrain.data.types.Recording` holds that map as its ``eeg`` / ``fmri`` (an ``ndarray``: every
existing reader works unchanged).

Pages touched through a mapping join the process's resident set (RSS) until released, and the kernel
maps whole page-cache folios (often the whole file), so:

* windows are read with :func:`read_columns` (one ``pread`` per row: only the window becomes resident),
  or cut from the few recordings :class:`ResidentCache` holds whole within ``data.cache_mb``;
* full passes over a cohort (finite check, fingerprint, normalisation statistics, graphs, closed-form
  fits) call :func:`release` (``madvise(MADV_DONTNEED)``) after each recording, so they stream the cohort
  in O(one recording) of RSS.

The data stay in the kernel's page cache, shared by every process of a node and counted in none.
"""
from __future__ import annotations

import mmap
import os
import weakref
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE
_VERIFIED: dict[int, weakref.ref] = {}   # id -> mapped array already scanned for NaN/Inf


def npz_memmap(path: str | Path, name: str) -> np.ndarray:
    """Read-only memory map of member ``name`` (``<name>.npy``) of an uncompressed ``.npz``.

    Returns an ``np.memmap`` (an ``ndarray``; nothing is read until sliced), or a small in-memory array
    for an empty one (a zero-byte region cannot be mapped). Raises ValueError naming the file if the
    member is compressed (``np.savez_compressed``), which cannot be mapped.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path}: member {name}.npy is compressed and cannot be memory-mapped; rewrite the "
                             f"entry with np.savez (uncompressed) or re-run `twinbrain prepare`")
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)                      # zip local file header: name and extra lengths at 26..30
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: bad zip local header for {name}.npy; delete the entry and re-run prepare")
        n_name, n_extra = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        fh.seek(info.header_offset + 30 + n_name + n_extra)
        version = np.lib.format.read_magic(fh)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {name}.npy holds Python objects; store entries hold numbers only")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    arr = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    return arr


def _mapping(arr) -> mmap.mmap | None:
    """The ``mmap`` behind ``arr`` (a memmap or a view of one), or None for in-memory arrays."""
    while arr is not None:
        mm = getattr(arr, "_mmap", None)
        if mm is not None:
            return mm
        arr = getattr(arr, "base", None)
        if isinstance(arr, mmap.mmap):
            return arr
    return None


def is_mapped(arr) -> bool:
    return _mapping(arr) is not None


def release(*arrays) -> None:
    """Drop the pages of memory-mapped ``arrays`` from this process's resident set (no-op for others)."""
    for arr in arrays:
        mm = _mapping(arr)
        if mm is not None and not mm.closed:
            mm.madvise(mmap.MADV_DONTNEED)


def release_recording(rec) -> None:
    """:func:`release` both signals of a :class:`~twinbrain.data.types.Recording`."""
    release(rec.eeg, rec.fmri)


def all_finite(arr: np.ndarray, block_bytes: int = 32 << 20) -> bool:
    """``np.isfinite(arr).all()``; a mapped array is scanned in row blocks, released, and remembered, so
    later checks of the same mapping cost nothing."""
    if not is_mapped(arr):
        return bool(np.isfinite(arr).all())
    seen = _VERIFIED.get(id(arr))
    if seen is not None and seen() is arr:
        return True
    rows = max(1, block_bytes // max(1, arr.itemsize * int(np.prod(arr.shape[1:]))))
    ok = all(bool(np.isfinite(arr[i:i + rows]).all()) for i in range(0, arr.shape[0], rows))
    release(arr)
    if ok:
        key = id(arr)
        _VERIFIED[key] = weakref.ref(arr, lambda _ref, key=key: _VERIFIED.pop(key, None))
    return ok


def row_blocks_bytes(arr: np.ndarray, dtype=np.float32, block_bytes: int = 32 << 20):
    """Yield ``arr`` as C-order ``dtype`` bytes in row blocks (their concatenation is
    ``np.ascontiguousarray(arr, dtype).tobytes()``), releasing mapped pages as it goes."""
    rows = max(1, block_bytes // max(1, np.dtype(dtype).itemsize * int(np.prod(arr.shape[1:]))))
    for i in range(0, max(arr.shape[0], 1), rows):
        yield np.ascontiguousarray(arr[i:i + rows], dtype=dtype).tobytes()
        release(arr)


def read_columns(arr: np.ndarray, c0: int, c1: int) -> np.ndarray:
    """``arr[:, c0:c1]`` of a ``[N, T]`` array as a new in-memory array.

    For a memory map made by :func:`npz_memmap` (C order) the block is read with one ``pread`` per row,
    so the process's resident set gains only the block: touching pages through the mapping would map
    whole page-cache folios (measured on Linux 6.18: one column of a 36 MiB EEG map made 35 MiB resident).
    """
    if not (isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.ndim == 2
            and arr.flags.c_contiguous and arr.filename):
        return np.array(arr[:, c0:c1])
    n, t = arr.shape
    c0, c1 = max(0, int(c0)), min(t, int(c1))
    out = np.empty((n, max(0, c1 - c0)), arr.dtype)
    if out.size == 0:
        return out
    size, row = arr.itemsize, (c1 - c0) * arr.itemsize
    fd = os.open(arr.filename, os.O_RDONLY)
    try:
        for i in range(n):
            got = os.preadv(fd, [out[i]], arr.offset + (i * t + c0) * size)
            if got != row:
                raise OSError(f"{arr.filename}: short read ({got} of {row} bytes) at row {i}; the store entry "
                              f"is truncated - delete it and re-run `twinbrain prepare`")
    finally:
        os.close(fd)
    return out


class ResidentCache:
    """Per-process budget (bytes) of memory-mapped recordings held whole in memory.

    ``get(r, rec)`` returns ``(fmri, eeg)`` in-memory arrays to cut windows from, or None: then the caller
    reads the window alone with :func:`read_columns`. A mapped recording is admitted, read whole, while
    the held total stays within the budget; once full, nothing is evicted (a shuffled sampler would
    thrash an LRU), so small cohorts end up fully in memory and large ones hold a fixed share.
    In-memory recordings are returned as they are and not counted. ``budget_bytes <= 0``: hold nothing.
    ``evict=True`` (a sampler that walks the recordings in blocks, ``data.shuffle_block``): the least
    recently used recordings make room for a new one, so the cache follows the block being read.
    """

    def __init__(self, budget_bytes: int, evict: bool = False):
        self.budget, self.evict = int(budget_bytes), bool(evict)
        self._held: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes: dict[int, int] = {}     # what each held recording counts against the budget
        self.total = 0
        self.misses = 0

    def get(self, r: int, rec) -> tuple[np.ndarray, np.ndarray] | None:
        if not (is_mapped(rec.fmri) or is_mapped(rec.eeg)):
            return rec.fmri, rec.eeg
        held = self._held.get(r)
        if held is not None:
            self._held.move_to_end(r)
            return held
        need = int(rec.fmri.nbytes + rec.eeg.nbytes)
        while self.evict and self._held and self.total + need > self.budget and need <= self.budget:
            old, _ = self._held.popitem(last=False)
            self.total -= self._bytes.pop(old)
        if self.budget > 0 and self.total + need <= self.budget:
            held = (read_columns(rec.fmri, 0, rec.fmri.shape[1]), read_columns(rec.eeg, 0, rec.eeg.shape[1]))
            self._held[r], self._bytes[r] = held, need
            self.total += need
            return held
        self.misses += 1
        return None

    def clear(self) -> None:
        self._held.clear()
        self._bytes.clear()
        self.total = 0
