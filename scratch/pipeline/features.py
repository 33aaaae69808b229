"""The feature cache's format, torch-free: both pipelines read (and write) the same entries.

A frozen encoder's output for a review never changes, so it is computed once and stored::

    CACHE_ROOT/<key>/plan.json                     what the shards will hold (written first)
    CACHE_ROOT/<key>/portable_key                  the key a torch-free reader can compute
    CACHE_ROOT/<key>/shard_00000.safetensors ...   features (sum L_i, H) float16,
                                                   lengths (k,) int64, index (k,) int64
    CACHE_ROOT/<key>/index.json                    written last: the entry is complete

Shard ``s`` holds the reviews ``index`` (positions in the list of texts the entry was made
for), their token features one after the other (review ``index[j]`` has ``lengths[j]`` rows:
[CLS] first, [SEP] last).  :class:`FeatureStore` maps review ``i`` to its rows without reading
them (``safetensors`` slices are memory-mapped).

Writing an entry (:func:`extract`, given the texts' token ids and an ``encode`` function of a
batch): the reviews in increasing length, ``shard_size`` to a shard, cut into encoder batches of
at most ``batch_tokens`` padded tokens (almost no padding); each shard is written to a temporary
file and renamed, so a shard on disk is whole; an interrupted run resumes at the first missing
shard (saying "resuming: 3 of 6 shards done"); without ``index.json`` an entry is never read as
complete.  One writer per entry at a time (an ``flock`` on ``<entry>/.lock``): a second process
asking for the same features waits for the first and then reads its entry; the scratch
pipeline, which finds the reference's entries by their portable key (:func:`find_entry`),
waits for one still being written too (:func:`wait_for_writers`).

Many processes, one entry (:mod:`scratch.pipeline.ranks`, for ``torchrun``): the ranks of one
job divide the very same shard plan among themselves, balanced by tokens, so the entry is the
one a single process writes, shard for shard.  The one-writer rule then
reads "one job per entry": rank 0 holds the lock for the whole job, from before the plan is
fixed until after ``index.json`` is written, and the other ranks write only the shards it gave
them in between; they never take the lock nor touch ``plan.json``.  A single process and a
job, or two jobs, wait for each other as two processes do.  Across machines the cache must
be one shared filesystem whose ``flock`` reaches every machine (NFSv4, Lustre, ...).

What a failed run leaves behind.  An entry folder survives a failure only when it holds at
least one finished shard: then ``plan.json`` and the shards make the next run resume.  A run
that fails before its first shard (an encoder crash, Ctrl-C, SIGTERM through
:func:`reference.pipeline.cli.run`) removes the folder it made, ``plan.json`` and ``.lock``
included, before it lets go of the lock; a waiting writer then sees that its lock file is gone and
starts over.  Temporary files of a failed run are removed either way.  Only SIGKILL (or a
power cut) can leave a shard-less entry, which the next run of the same texts simply fills.

Checked when read.  Each shard's sha256, size, review and row counts are recorded when it is
written (beside it in ``sums/shard_XXXXX.safetensors.json`` at once, then all of them in
``index.json`` under ``shard_sums``).  Opening an entry checks its structure (``index.json``
readable and whole, every shard present with a readable header, tensor dtypes and shapes,
lengths and indices consistent with each other and with ``index.json``), and each shard's bytes
against its sha256 once per process (many shards hashed side by side; a shard this process
wrote or already checked is not read again).  A damaged entry raises :class:`DamagedEntry`,
one line naming the entry and the shard; :func:`extract` (the writer) then recomputes just the
damaged shards, saying so in one line.  Entries written before checksums are checked for
structure only and say how to add them: ``python -m scratch.pipeline.features stamp ENTRY``.
A full disk is :class:`scratch.pipeline.atomic.NoSpace` (folder, free space, space needed),
checked before the first shard and on every write; finished shards stay for the next run.

Finding an entry.  Each pipeline names its entries by its own key (``reference.pipeline.features``
hashes the torch model's weights and config); every entry's ``index.json`` also carries a
:func:`portable_key` (the encoder folder's files, ``max_length`` and the token ids), which
either pipeline computes without the other's libraries: :func:`find_entry` looks entries up
by it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm

from .atomic import NoSpace, atomic_write, gib, is_enospc
from .errors import CommandError
from .malloc import give_back_freed_memory

FORMAT = 1
SUMS = "shard_sums"               # index.json: {shard: {"sha256", "bytes", "reviews", "rows"}}
PORTABLE_KEY = "portable_key"     # an entry being written: its portable key, for readers that
                                  # wait for it (:func:`wait_for_writers`)
SUMS_DIR = "sums"                 # sums/shard_00000.safetensors.json: the same, written with it
log = logging.getLogger(__name__)


def sum_path(folder, name: str) -> Path:
    """Where shard ``name``'s record is written beside it."""
    return Path(folder) / SUMS_DIR / f"{name}.json"


class CacheError(CommandError):
    """A feature-cache problem a command reports in one line."""


class DamagedEntry(CacheError):
    """An entry that must not be used: ``shards`` (file names) are damaged, or its
    ``index.json`` is (``index``): :meth:`remove` leaves a partial entry whose writer
    recomputes just what is missing."""

    def __init__(self, folder, why: str, shards=(), index: bool = False):
        self.folder, self.why, self.shards, self.index = Path(folder), why, list(shards), index
        what = ("index.json" if index else self.shards[0]
                + (f" (and {len(self.shards) - 1} more shards)" if len(self.shards) > 1 else ""))
        super().__init__(f"damaged feature cache entry {self.folder}: {what}: {why}")

    @property
    def repair(self) -> str:
        """What recomputing it means, for the line that says so."""
        if self.index:
            return "rebuilding index.json (shards checked against their own checksums)"
        return f"recomputing {'that shard' if len(self.shards) == 1 else 'those shards'}"

    def remove(self) -> None:
        """(The caller holds the writer lock.)  Remove ``index.json`` and the damaged shards."""
        (self.folder / "index.json").unlink(missing_ok=True)
        for name in self.shards:
            (self.folder / name).unlink(missing_ok=True)
            sum_path(self.folder, name).unlink(missing_ok=True)


# ---- checking an entry ---------------------------------------------------------------------------

_VERIFIED: dict = {}                # (path, inode, size, mtime) -> the sha256 it was found to have
_UNSTAMPED: set = set()             # entries without checksums this process has warned about


def _file_key(path: Path) -> tuple:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 8 MiB blocks."""
    h, buf = hashlib.sha256(), bytearray(1 << 23)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def verified_sha256(path) -> str:
    """``file_sha256``, remembered for this process while the file is unchanged."""
    key = _file_key(path)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_sha256(path)
    return _VERIFIED[key]


def hash_threads(n_files: int) -> int:
    return max(1, min(n_files, os.cpu_count() or 1, 8))


def verify_shards(folder: Path, sums: dict, names) -> None:
    """Each shard's bytes against the sha256 ``sums`` records for it (those this process
    already checked are not read again; the others side by side): :class:`DamagedEntry`
    naming the shards that differ."""
    with ThreadPoolExecutor(hash_threads(len(names))) as pool:
        digests = list(pool.map(lambda n: verified_sha256(folder / n), names))
    bad = [n for n, d in zip(names, digests, strict=True) if d != sums[n]["sha256"]]
    if bad:
        raise DamagedEntry(folder, "its bytes differ from those written (sha256 mismatch)", bad)


def read_index(folder: Path) -> dict:
    """``index.json``, checked for what the readers need: :class:`DamagedEntry` otherwise."""
    try:
        meta = json.loads((folder / "index.json").read_bytes().decode("utf-8"))
        n, hidden, shards = int(meta["n"]), int(meta["hidden_size"]), meta["shards"]
        ok = (isinstance(meta, dict) and n >= 1 and hidden >= 1 and isinstance(shards, list)
              and shards == [f"shard_{s:05d}.safetensors" for s in range(len(shards))]
              and len(shards) >= 1)
        sums = meta.get(SUMS)
        if sums is not None:
            ok = ok and isinstance(sums, dict) and sorted(sums) == sorted(shards) and all(
                isinstance(sums[k], dict) and isinstance(sums[k].get("sha256"), str)
                and all(isinstance(sums[k].get(f), int) for f in ("bytes", "reviews", "rows"))
                for k in shards)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DamagedEntry(folder, f"unreadable ({type(e).__name__})", index=True) from None
    if not ok:
        raise DamagedEntry(folder, "its fields do not describe an entry", index=True)
    return meta


def read_shard(path: Path, hidden_size: int | None = None, record: dict | None = None):
    """(lengths, index, features slice) of a shard, its structure checked: present, a readable
    header, float16 (rows, H) features, int64 (k,) lengths and index, rows = sum of lengths,
    lengths >= 1 (and H, size, k, rows as ``record`` says).  A problem: :class:`DamagedEntry`."""
    def damaged(why):
        return DamagedEntry(path.parent, why, [path.name])
    if not path.exists():
        raise damaged("missing")
    if record is not None and (size := path.stat().st_size) != record["bytes"]:
        raise damaged(f"{size} bytes, {record['bytes']} were written")
    try:
        f = safe_open(str(path), framework="numpy")
        lengths, index = f.get_tensor("lengths"), f.get_tensor("index")
        feats = f.get_slice("features")
        shape, dtype = feats.get_shape(), feats.get_dtype()
    except Exception as e:                  # SafetensorError, OSError, a missing tensor, ...
        raise damaged(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    k = len(lengths)
    if not (lengths.dtype == index.dtype == np.int64 and lengths.shape == index.shape == (k,)
            and k >= 1 and dtype == "F16" and len(shape) == 2):
        raise damaged("unexpected tensor dtypes or shapes")
    if (lengths < 1).any() or shape[0] != int(lengths.sum()):
        raise damaged(f"lengths add up to {int(lengths.sum())} rows, features hold {shape[0]}")
    if hidden_size is not None and shape[1] != hidden_size:
        raise damaged(f"features {shape[1]} wide, index.json says {hidden_size}")
    if record is not None and (k, shape[0]) != (record["reviews"], record["rows"]):
        raise damaged(f"{k} reviews of {shape[0]} rows, {record['reviews']} of "
                      f"{record['rows']} were written")
    return lengths, index, feats


def shard_record(path: Path) -> dict:
    """What :data:`SUMS` records of a shard on disk, computed from its bytes."""
    lengths, _, feats = read_shard(path)
    return {"sha256": verified_sha256(path), "bytes": path.stat().st_size,
            "reviews": len(lengths), "rows": feats.get_shape()[0]}


def stamp_command(folder) -> str:
    return f"python -m scratch.pipeline.features stamp {folder}"


class FeatureStore:
    """Read-only view of a complete cache: review ``i`` -> float16 (L_i, H), memory-mapped."""

    def __init__(self, folder, wait_seconds: float = 0.0, verify: bool = True):
        """Open the complete entry ``folder``, its structure checked and (``verify``) each
        shard's bytes against its recorded sha256, once per process: a damaged entry raises
        :class:`DamagedEntry`; one without ``index.json`` FileNotFoundError."""
        self.folder = Path(folder)
        if not (self.folder / "index.json").exists():
            raise FileNotFoundError(f"{self.folder}: no index.json, the cache is not complete")
        self.meta = meta = read_index(self.folder)
        self.hidden_size, n = int(meta["hidden_size"]), int(meta["n"])
        sums = meta.get(SUMS)
        self.lengths = np.zeros(n, dtype=np.int64)
        self._where = np.full((n, 2), -1, dtype=np.int64)       # (shard, row offset)
        self._shards, problem, widths = [], None, {}
        for s, fname in enumerate(meta["shards"]):
            lengths, index, feats = read_shard(self.folder / fname, None,
                                               sums[fname] if sums else None)
            widths[fname] = feats.get_shape()[1]
            if problem is None and ((index < 0).any() or (index >= n).any()
                                    or (self._where[index % n, 0] >= 0).any()
                                    or len(np.unique(index)) != len(index)):
                problem = (fname, "review indices out of range or given twice")
            if problem is None:
                self.lengths[index] = lengths
                self._where[index, 0] = s
                self._where[index, 1] = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            self._shards.append(feats)
        if odd := [f for f, w in widths.items() if w != self.hidden_size]:
            if len(odd) == len(widths):          # all alike: index.json's hidden_size is wrong
                raise DamagedEntry(self.folder, f"hidden_size {self.hidden_size}, its shards' "
                                   f"features are {widths[odd[0]]} wide", index=True)
            raise DamagedEntry(self.folder, f"features {widths[odd[0]]} wide, index.json says "
                               f"{self.hidden_size}", odd)
        if sums is not None and verify:
            verify_shards(self.folder, sums, meta["shards"])
        elif sums is None and self.folder.resolve() not in _UNSTAMPED:
            _UNSTAMPED.add(self.folder.resolve())
            log.warning("%s: written before feature checksums, so its shards' content is not "
                        "checked; %s adds them", self.folder, stamp_command(self.folder))
        if problem is not None:             # the shard's bytes are as written: index.json lies
            raise (DamagedEntry(self.folder, problem[1], [problem[0]]) if sums is None else
                   DamagedEntry(self.folder, f"{problem[0]}: {problem[1]}", index=True))
        if (self._where[:, 0] < 0).any() or int(meta.get("tokens", self.lengths.sum())) != \
                int(self.lengths.sum()):
            raise DamagedEntry(self.folder, "its shards do not hold the reviews and tokens it "
                               "names", index=True)
        self.wait_seconds = wait_seconds   # time the writer spent behind another writer

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> np.ndarray:
        """Token features of review ``i``: float16 (L_i, H), [CLS] first, [SEP] last."""
        s, off = self._where[i]
        return self._shards[s][int(off):int(off + self.lengths[i])]

    def batch(self, indices, dtype=np.float32):
        """Zero-padded ``x`` (B, L_max, H) of ``dtype`` and ``lengths`` (B,) int64 for reviews
        ``indices`` (NumPy arrays)."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        x = np.zeros((len(indices), int(lengths.max()), self.hidden_size), dtype=dtype)
        for b, i in enumerate(indices):
            x[b, :lengths[b]] = self.get(i)
        return x, lengths


def token_batches(sorted_lengths, batch_tokens: int):
    """(start, stop) runs over ascending lengths, each padded batch holding at most
    ``batch_tokens`` tokens (its last, longest review times its size; at least one review)."""
    start, n = 0, len(sorted_lengths)
    while start < n:
        stop = start + 1
        while stop < n and (stop + 1 - start) * sorted_lengths[stop] <= batch_tokens:
            stop += 1
        yield start, stop
        start = stop


def check_extract(ids, batch_tokens: int, shard_size: int) -> None:
    """The arguments every extraction checks first (one process or many)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not len(ids):
        raise ValueError("no texts to extract features of")
    if batch_tokens < (longest := max(len(a) for a in ids)):
        raise ValueError(f"batch_tokens {batch_tokens} is smaller than the longest review "
                         f"({longest} tokens)")


def extract(folder, ids, encode, *, key: str, meta: dict, batch_tokens: int = 16_384,
            shard_size: int = 2_048, progress: bool = True, desc: str = "features") -> FeatureStore:
    """The entry ``folder`` of ``ids`` (token id arrays), by this process alone: read if
    complete (and sound), else written with ``encode`` (see :func:`write_entry`), resuming a
    partial one and recomputing the shards of a damaged one; one writer at a time.  The ranks
    of a torchrun job write one entry together through :func:`scratch.pipeline.ranks.extract`."""
    check_extract(ids, batch_tokens, shard_size)
    folder = Path(folder)
    if (store := open_entry(folder, desc)[0]) is not None:
        return store
    with writer_lock(folder, desc) as waited:       # one writer per entry; others wait here
        store, repaired = open_entry(folder, desc, repair=True)   # (found complete afterwards?)
        if store is None:
            try:
                write_entry(folder, ids, encode, key=key, meta=meta, batch_tokens=batch_tokens,
                            shard_size=shard_size, progress=progress, desc=desc,
                            say_resuming=not repaired)
            except BaseException:
                discard_unfinished(folder)
                raise
    store = FeatureStore(folder)
    store.wait_seconds = waited
    return store


def open_entry(folder: Path, desc: str = "features", repair: bool = False):
    """(The complete entry ``folder``, checked, or None when it is not complete or damaged;
    whether it was repaired).  ``repair`` (the caller holds the writer lock): a damaged entry is
    said in one line and made partial (:meth:`DamagedEntry.remove`) for the writer to recompute
    what it lacks."""
    if not (folder / "index.json").exists():
        return None, False
    try:
        return FeatureStore(folder), False
    except DamagedEntry as e:
        if repair:
            log.warning("%s: %s; %s", desc, e, e.repair)
            e.remove()
        return None, repair


@contextlib.contextmanager
def writer_lock(folder: Path, desc: str = "features", heartbeat=None, poll_seconds: float = 1.0):
    """Exclusive ``flock`` on ``folder/.lock`` (the folder is made if needed) while an entry is
    written; yields the seconds spent waiting for another process (or thread) that held it,
    exactly 0.0 when nobody did.  The kernel drops the lock when its holder exits, so a killed
    run never leaves a stale lock behind.  A holder may remove the entry (a run that failed
    before its first shard): the lock is then taken again on the new ``.lock``.

    ``heartbeat``: while another process holds the lock, try again every ``poll_seconds`` and
    call ``heartbeat()`` in between (the ranks of a torchrun job keep talking while their rank 0
    waits, so no collective times out); None: block in the kernel until the lock is free."""
    import fcntl

    folder, waited = Path(folder), 0.0
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:              # removed between mkdir and open: again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is extracting %s; waiting for it", desc, folder)
            t0 = time.perf_counter()
            if heartbeat is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                while not _try_lock(fd):
                    heartbeat()
                    time.sleep(poll_seconds)
            waited += time.perf_counter() - t0
        if _same_file(fd, folder / ".lock"):
            break
        os.close(fd)                           # we hold the lock of a removed entry
    try:
        yield waited
    finally:
        os.close(fd)


def being_written(folder: Path) -> bool:
    """Whether another process (or thread) holds ``folder``'s writer lock now: a probe, the lock
    let go at once when it was free."""
    try:
        fd = os.open(Path(folder) / ".lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def discard_unfinished(folder: Path) -> None:
    """After a failed extraction (the caller holds the lock): remove temporary files; remove
    the whole entry when it holds no finished shard, since there is nothing to resume."""
    for tmp in [*folder.glob(".*.tmp*"), *folder.glob(f"{SUMS_DIR}/.*.tmp*")]:
        tmp.unlink(missing_ok=True)
    if any(folder.glob("shard_*.safetensors")):
        return
    for side in (folder / SUMS_DIR).glob("*"):     # of shards that never landed
        side.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (folder / SUMS_DIR).rmdir()
    for name in ("plan.json", PORTABLE_KEY, ".lock"):
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):         # something else in there: leave it
        folder.rmdir()


# ---- writing an entry: plan, shards, index ------------------------------------------------------

@dataclass
class Plan:
    """What an entry's shards hold: the reviews in increasing length (a stable sort),
    ``shard_size`` to a shard; shard ``s`` is file ``names[s]`` with reviews ``shards[s]``."""
    key: str
    shard_size: int
    lengths: np.ndarray                  # (n,) tokens of each review
    shards: list                         # of (k,) int64 review positions

    @classmethod
    def of(cls, ids, key: str, shard_size: int) -> Plan:
        lengths = np.array([len(a) for a in ids])
        order = np.argsort(lengths, kind="stable")
        return cls(key, shard_size, lengths,
                   [order[i:i + shard_size] for i in range(0, len(order), shard_size)])

    @property
    def names(self) -> list[str]:
        return [f"shard_{s:05d}.safetensors" for s in range(len(self.shards))]

    @property
    def json(self) -> dict:
        """``plan.json``'s content."""
        return {"key": self.key, "shard_size": self.shard_size, "n": len(self.lengths)}

    def tokens(self, s: int) -> int:
        return int(self.lengths[self.shards[s]].sum())


def start_entry(folder: Path, plan: Plan, desc: str = "features",
                say_resuming: bool = True, portable_key: str | None = None) -> list[int]:
    """(The caller holds the writer lock.)  Remove temporary files left by killed runs and any
    shard cut for another plan (or for no known plan: shards without ``plan.json``), write
    ``plan.json`` (and ``portable_key``, when given: :func:`wait_for_writers`); check each
    finished shard (its sha256 against the one written beside it, or, written before
    checksums, its structure: then its checksum is added) and remove a damaged one; return the
    shards still to write."""
    for tmp in folder.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)
    plan_file = folder / "plan.json"
    old_plan = _read_plan(plan_file) if plan_file.exists() else "no plan.json"
    if old_plan != plan.json:
        stale = list(folder.glob("shard_*.safetensors"))   # a different plan: they don't fit
        if stale:
            log.info("%s: %d finished shards were cut for another plan (%s); starting over",
                     desc, len(stale), old_plan)
        for old in stale:
            old.unlink()
            sum_path(folder, old.name).unlink(missing_ok=True)
    atomic_write(plan_file, json.dumps(plan.json).encode())
    if portable_key:
        atomic_write(folder / PORTABLE_KEY, portable_key.encode())
    todo = [s for s, name in enumerate(plan.names)
            if not (folder / name).exists() or not _finished_shard_ok(folder, plan, s, desc)]
    if len(todo) < len(plan.shards) and say_resuming:
        log.info("%s: resuming: %d of %d shards done", desc, len(plan.shards) - len(todo),
                 len(plan.shards))
    return todo


def _finished_shard_ok(folder: Path, plan: Plan, s: int, desc: str) -> bool:
    """A shard a previous run finished is sound and fits ``plan``; else it is removed (and
    the line says so).  One without the checksum written beside it is adopted by structure."""
    path = folder / plan.names[s]
    side = sum_path(folder, path.name)
    try:
        try:
            record = json.loads(side.read_text())
            record = record if isinstance(record, dict) and "sha256" in record else None
        except (OSError, ValueError):
            record = None
        lengths, index, _ = read_shard(path, record=record)
        if not (np.array_equal(index, plan.shards[s])
                and np.array_equal(lengths, plan.lengths[plan.shards[s]])):
            raise DamagedEntry(folder, "does not hold the reviews of this plan", [path.name])
        if record is None:
            atomic_write(side, json.dumps(shard_record(path)).encode())
        elif verified_sha256(path) != record["sha256"]:
            raise DamagedEntry(folder, "its bytes differ from those written (sha256 mismatch)",
                               [path.name])
        return True
    except DamagedEntry as e:
        log.warning("%s: %s; recomputing it", desc, e)
        e.remove()
        return False


def shard_bytes(rows: int, reviews: int, hidden_size: int) -> int:
    """A shard's size on disk, near enough (its header is a few hundred bytes)."""
    return rows * hidden_size * 2 + reviews * 16 + 512


def check_space(folder: Path, plan: Plan, todo, hidden_size: int) -> None:
    """:class:`NoSpace` before any work when shards ``todo`` cannot fit in ``folder``."""
    needed = sum(shard_bytes(plan.tokens(s), len(plan.shards[s]), hidden_size) for s in todo)
    if needed and shutil.disk_usage(folder).free < needed:
        raise NoSpace(folder, needed, f"the {len(todo)} shards still to write")


def write_shard(path: Path, feats, lengths: np.ndarray, index: np.ndarray) -> dict:
    """Write one safetensors file, ``features`` (sum L_i, H) float16 made of the per-review
    arrays ``feats`` (never joined in memory), ``lengths`` and ``index`` (k,) int64, hashing
    it as it goes; fsynced.  Returns its :data:`SUMS` record."""
    rows, hidden = sum(len(f) for f in feats), feats[0].shape[1]
    nf, k = rows * hidden * 2, len(lengths)
    header = {"features": {"dtype": "F16", "shape": [rows, hidden], "data_offsets": [0, nf]},
              "lengths": {"dtype": "I64", "shape": [k], "data_offsets": [nf, nf + 8 * k]},
              "index": {"dtype": "I64", "shape": [k], "data_offsets": [nf + 8 * k, nf + 16 * k]}}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    h, size = hashlib.sha256(), 0
    parts = [struct.pack("<Q", len(head)), head,
             *(np.ascontiguousarray(f, dtype="<f2") for f in feats),
             np.ascontiguousarray(lengths, dtype="<i8"), np.ascontiguousarray(index, dtype="<i8")]
    with open(path, "wb") as out:
        for part in parts:
            view = memoryview(part).cast("B")
            out.write(view)
            h.update(view)
            size += len(view)
        out.flush()
        os.fsync(out.fileno())
    return {"sha256": h.hexdigest(), "bytes": size, "reviews": k, "rows": rows}


def write_shards(folder: Path, ids, encode, plan: Plan, todo, batch_tokens: int, bar) -> None:
    """Encode and write shards ``todo`` of ``plan``, each to a temporary file renamed when
    whole, with its checksum beside it (a failure removes the temporary files; a full disk is
    :class:`NoSpace`, naming the space the shards left need); ``bar`` counts tokens.  Features
    that are not finite are refused before they are written."""
    names = plan.names
    for j, s in enumerate(todo):
        feats, members = [], plan.shards[s]
        for start, stop in token_batches(plan.lengths[members], batch_tokens):
            feats += encode([ids[i] for i in members[start:stop]])
            bar.update(int(plan.lengths[members[start:stop]].sum()))
        if bad := [int(members[r]) for r, f in enumerate(feats) if not np.isfinite(f).all()]:
            raise CacheError(f"the encoder gave non-finite features for review "
                                     f"{bad[0]} ({len(bad)} in shard {s}): nothing written")
        tmp = folder / f".{names[s]}.tmp{os.getpid()}"
        path = folder / names[s]
        try:
            record = write_shard(tmp, feats, plan.lengths[members], members)
            atomic_write(sum_path(folder, path.name), json.dumps(record).encode())
            os.replace(tmp, path)
            _VERIFIED[_file_key(path)] = record["sha256"]     # written, so known sound
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if is_enospc(e):
                left = sum(shard_bytes(plan.tokens(t), len(plan.shards[t]), feats[0].shape[1])
                           for t in todo[j:])
                raise NoSpace(folder, left, f"the {len(todo) - j} shards still to write") from e
            raise
        del feats, record
        give_back_freed_memory()           # the next shard is bigger: not this one's hole


def finish_entry(folder: Path, plan: Plan, meta: dict, seconds: float) -> None:
    """(The caller holds the writer lock, every shard is on disk.)  Check that each shard holds
    the reviews ``plan`` gives it, then write ``index.json``: the entry is complete.  A shard
    that does not fit (another writer broke the one-writer rule) is removed, and the error says
    to run again: an entry is never completed over shards of another plan."""
    sums = {}
    for s, name in enumerate(plan.names):
        with safe_open(str(folder / name), framework="numpy") as f:
            fits = np.array_equal(f.get_tensor("index"), plan.shards[s])
        if not fits:
            (folder / name).unlink()
            raise RuntimeError(f"{folder / name} does not hold the reviews of this run's shard "
                               f"plan (written by another process meanwhile?): removed; run "
                               f"again to compute it")
        try:
            sums[name] = json.loads(sum_path(folder, name).read_text())
        except (OSError, ValueError):
            sums[name] = shard_record(folder / name)
    meta = {"key": plan.key, **meta, "n": len(plan.lengths), "dtype": "float16",
            "shards": plan.names, "tokens": int(plan.lengths.sum()),
            "seconds_this_run": round(seconds, 1), SUMS: sums}
    atomic_write(folder / "index.json", json.dumps(meta, indent=1).encode())


def token_bar(plan: Plan, todo, meta: dict, desc: str, progress: bool, who: str = ""):
    """A tqdm bar over the tokens of shards ``todo`` (disabled without ``progress``)."""
    return tqdm(total=sum(plan.tokens(s) for s in todo), unit="tok", unit_scale=True,
                desc=f"{desc} ({meta.get('encoder', '?')}{who}, {len(todo)}/{len(plan.shards)} "
                     "shards to go)", disable=not progress)


def write_entry(folder: Path, ids, encode, *, key: str, meta: dict, batch_tokens: int,
                shard_size: int, progress: bool = True, desc: str = "features",
                say_resuming: bool = True) -> None:
    """Write the shards still missing, then ``index.json`` = ``meta`` (which names at least
    ``hidden_size``) + what the shards hold (the caller holds the writer lock).
    ``encode(list of id arrays)`` -> list of (L_i, H) float16 arrays, one padded encoder batch."""
    plan = Plan.of(ids, key, shard_size)
    todo = start_entry(folder, plan, desc, say_resuming, meta.get("portable_key"))
    check_space(folder, plan, todo, int(meta["hidden_size"]))
    t0 = time.perf_counter()
    with token_bar(plan, todo, meta, desc, progress) as bar:
        write_shards(folder, ids, encode, plan, todo, batch_tokens, bar)
    finish_entry(folder, plan, meta, time.perf_counter() - t0)


def _read_plan(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError:
        return "unreadable plan.json"


# ---- finding an entry by what both pipelines can compute ------------------------------------

@functools.lru_cache(maxsize=8)
def _files_sha256(folder: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(Path(folder) / name, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def encoder_id(folder) -> str:
    """sha256 over the encoder folder's ``config.json`` and ``model.safetensors`` bytes (each
    file hashed once per process while unchanged: same inode, size, mtime and ctime; ctime
    moves on every write, even one that puts the old mtime back)."""
    folder = Path(folder).resolve()
    stamp = tuple((s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in
                  (os.stat(folder / n) for n in ("config.json", "model.safetensors")))
    return _files_sha256(str(folder), stamp)


def portable_key(encoder_folder, max_length: int, ids, unfreeze_top: int = 0) -> str:
    """The key both pipelines compute for the features of ``ids`` (token id arrays) from the
    encoder in ``encoder_folder`` at ``max_length`` (float16, whatever the precision used):
    its last hidden states, or with ``unfreeze_top`` K > 0 the hidden states entering layer
    ``L-K`` (:mod:`scratch.pipeline.unfreeze`; K = 0 keys are those of before K existed)."""
    fields = {"format": FORMAT, "encoder": encoder_id(encoder_folder),
              "max_length": int(max_length)}
    if unfreeze_top:
        fields["unfreeze_top"] = int(unfreeze_top)
    h = hashlib.sha256(json.dumps(fields).encode())
    for a in ids:
        h.update(len(a).to_bytes(4, "little"))
        h.update(int32_ids(a).tobytes())
    return h.hexdigest()[:24]


def int32_ids(a) -> np.ndarray:
    """Token ids as little-endian int32, the bytes keys hash; ids int32 cannot hold are refused
    (a cast would wrap them onto other ids, and two different reviews onto one key)."""
    a = np.asarray(a)
    b = a.astype("<i4")
    if not np.array_equal(a, b):
        raise ValueError(f"token ids outside int32 ({a.min()}..{a.max()}): not a vocabulary's")
    return b


def find_entry(cache_root, key: str) -> FeatureStore | None:
    """A complete, sound entry under ``cache_root`` whose index.json carries portable key
    ``key`` (one computed in float32 preferred over one computed under bf16 autocast), or None.
    When every such entry is damaged: the first one's :class:`DamagedEntry` (its ``meta``
    attribute is the entry's index.json)."""
    found = []
    for index in sorted(Path(cache_root).glob("*/index.json")):
        try:
            meta = json.loads(index.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("portable_key") == key:
            found.append((bool(meta.get("autocast_bf16")), str(index.parent), meta))
    damaged = None
    for _, folder, meta in sorted(found, key=lambda f: f[:2]):
        try:
            return FeatureStore(folder)
        except DamagedEntry as e:
            e.meta = meta
            if damaged is None:
                damaged = e
            else:
                log.warning("%s", e)
    if damaged is not None:
        raise damaged
    return None


def wait_for_writers(cache_root, key: str, desc: str = "features") -> float:
    """Wait while another process writes an entry of portable key ``key`` under ``cache_root``
    (a ``portable_key`` file, no ``index.json`` yet, its writer lock held: e.g. a
    ``reference.pipeline.features`` run still at work); the seconds waited, 0.0 when none was
    being written.  For a reader that cannot compute the writer's own key (the scratch pipeline
    and the reference's torch fingerprint) and would otherwise compute the same features again.
    A shared ``flock`` on the entry's ``.lock``: it is granted when the writer lets go, whether
    it finished (then :func:`find_entry` finds the entry) or died."""
    import fcntl

    waited = 0.0
    for marker in sorted(Path(cache_root).glob(f"*/{PORTABLE_KEY}")):
        folder = marker.parent
        try:
            if marker.read_text().strip() != key or (folder / "index.json").exists():
                continue
            fd = os.open(folder / ".lock", os.O_RDONLY)
        except OSError:                           # gone meanwhile: nothing to wait for
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is computing these features in %s; waiting for it",
                     desc, folder)
            t0 = time.perf_counter()
            fcntl.flock(fd, fcntl.LOCK_SH)
            waited += time.perf_counter() - t0
        finally:
            os.close(fd)
    return waited


# ---- maintenance: python -m scratch.pipeline.features verify|stamp ENTRY... ----------------------

def stamp(folder) -> str:
    """Add :data:`SUMS` to an entry written before checksums, once its structure checks out and
    every feature is finite; returns what was done, in words."""
    folder = Path(folder)
    _UNSTAMPED.add(folder.resolve())                # no advice to run what is running
    store = FeatureStore(folder, verify=False)
    if SUMS in store.meta:
        verify_shards(folder, store.meta[SUMS], store.meta["shards"])
        return "already has checksums, and its shards match them"
    for name, feats in zip(store.meta["shards"], store._shards, strict=True):
        rows = feats.get_shape()[0]
        for start in range(0, rows, 1 << 16):
            if not np.isfinite(feats[start:min(rows, start + (1 << 16))]).all():
                raise DamagedEntry(folder, "non-finite features", [name])
    names = store.meta["shards"]
    with ThreadPoolExecutor(hash_threads(len(names))) as pool:
        records = dict(zip(names, pool.map(lambda n: shard_record(folder / n), names),
                           strict=True))
    atomic_write(folder / "index.json",
                 json.dumps({**store.meta, SUMS: records}, indent=1).encode())
    _UNSTAMPED.discard(folder.resolve())
    return f"checksums added for its {len(names)} shards"


def verify(folder) -> str:
    """Check an entry as a reader does, hashing every shard again; returns the cost in words."""
    folder = Path(folder)
    _VERIFIED.clear()
    t0 = time.perf_counter()
    store = FeatureStore(folder)
    seconds = time.perf_counter() - t0
    size = sum((folder / n).stat().st_size for n in store.meta["shards"])
    how = "structure only (no checksums)" if SUMS not in store.meta else "sound"
    return (f"{how}: {len(store)} reviews, {len(store.meta['shards'])} shards, {gib(size)} "
            f"checked in {seconds:.1f} s ({size / 2**30 / max(seconds, 1e-9):.2f} GiB/s, "
            f"{hash_threads(len(store.meta['shards']))} threads)")


def main(argv=None) -> int:
    from . import cli

    p = cli.Parser(prog="python -m scratch.pipeline.features",
                   description="Feature-cache maintenance (entries either pipeline wrote).")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check entries as a reader does (every shard hashed)")
    v.add_argument("entries", nargs="+")
    s = sub.add_parser("stamp", help=f"add {SUMS} to entries written before checksums (after "
                                     "checking their structure and that every feature is finite)")
    s.add_argument("entries", nargs="+")
    a = p.parse_args(argv)
    failed = 0
    for entry in a.entries:
        try:
            print(f"{entry}: {(stamp if a.cmd == 'stamp' else verify)(entry)}", flush=True)
        except (CacheError, FileNotFoundError) as e:
            print(f"{p.prog}: error: {cli.one_line(e)}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    from .cli import run

    raise SystemExit(run(main, "python -m scratch.pipeline.features"))
