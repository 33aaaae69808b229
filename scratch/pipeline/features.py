"""The feature cache's format, torch-free: both pipelines read (and write) the same entries.

A frozen encoder's output for a review never changes, so it is computed once and stored::

    CACHE_ROOT/<key>/plan.json                     what the shards will hold (written first)
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
asking for the same features waits for the first and then reads its entry.

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
:func:`reference.pipeline.cli.run`) removes the folder it made, ``plan.json`` and ``.lock`` included,
before it lets go of the lock; a waiting writer then sees that its lock file is gone and
starts over.  Temporary files of a failed run are removed either way.  Only SIGKILL (or a
power cut) can leave a shard-less entry, which the next run of the same texts simply fills.

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .atomic import atomic_write

FORMAT = 1
log = logging.getLogger(__name__)


class FeatureStore:
    """Read-only view of a complete cache: review ``i`` -> float16 (L_i, H), memory-mapped."""

    def __init__(self, folder, wait_seconds: float = 0.0):
        self.folder = Path(folder)
        index_file = self.folder / "index.json"
        if not index_file.exists():
            raise FileNotFoundError(f"{self.folder}: no index.json, the cache is not complete")
        self.meta = json.loads(index_file.read_text())
        self.hidden_size = int(self.meta["hidden_size"])
        n = int(self.meta["n"])
        self.lengths = np.zeros(n, dtype=np.int64)
        self._where = np.full((n, 2), -1, dtype=np.int64)       # (shard, row offset)
        self._shards = []
        for s, fname in enumerate(self.meta["shards"]):
            f = safe_open(str(self.folder / fname), framework="numpy")
            lengths, index = f.get_tensor("lengths"), f.get_tensor("index")
            self.lengths[index] = lengths
            self._where[index, 0] = s
            self._where[index, 1] = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            self._shards.append(f.get_slice("features"))
        self.wait_seconds = wait_seconds   # time the writer spent behind another writer
        if (self._where[:, 0] < 0).any():
            raise ValueError(f"{self.folder}: corrupt cache, some reviews have no features")

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
    complete, else written with ``encode`` (see :func:`write_entry`), resuming a partial one;
    one writer at a time.  The ranks of a torchrun job write one entry together through
    :func:`scratch.pipeline.ranks.extract`."""
    check_extract(ids, batch_tokens, shard_size)
    folder = Path(folder)
    if (folder / "index.json").exists():
        return FeatureStore(folder)
    with writer_lock(folder, desc) as waited:       # one writer per entry; others wait here
        if not (folder / "index.json").exists():     # (and find it complete afterwards)
            try:
                write_entry(folder, ids, encode, key=key, meta=meta, batch_tokens=batch_tokens,
                            shard_size=shard_size, progress=progress, desc=desc)
            except BaseException:
                discard_unfinished(folder)
                raise
    store = FeatureStore(folder)
    store.wait_seconds = waited
    return store


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
    for tmp in folder.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)
    if any(folder.glob("shard_*.safetensors")):
        return
    for name in ("plan.json", ".lock"):
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


def start_entry(folder: Path, plan: Plan, desc: str = "features") -> list[int]:
    """(The caller holds the writer lock.)  Remove temporary files left by killed runs and any
    shard cut for another plan (or for no known plan: shards without ``plan.json``), write
    ``plan.json``; return the shards still to write."""
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
    atomic_write(plan_file, json.dumps(plan.json).encode())
    todo = [s for s, name in enumerate(plan.names) if not (folder / name).exists()]
    if len(todo) < len(plan.shards):
        log.info("%s: resuming: %d of %d shards done", desc, len(plan.shards) - len(todo),
                 len(plan.shards))
    return todo


def write_shards(folder: Path, ids, encode, plan: Plan, todo, batch_tokens: int, bar) -> None:
    """Encode and write shards ``todo`` of ``plan``, each to a temporary file renamed when
    whole (a failure removes the temporary file); ``bar`` counts tokens."""
    names = plan.names
    for s in todo:
        feats, members = [], plan.shards[s]
        for start, stop in token_batches(plan.lengths[members], batch_tokens):
            feats += encode([ids[i] for i in members[start:stop]])
            bar.update(int(plan.lengths[members[start:stop]].sum()))
        tmp = folder / f".{names[s]}.tmp{os.getpid()}"
        try:
            save_file({"features": np.concatenate(feats),
                       "lengths": plan.lengths[members].astype(np.int64),
                       "index": members.astype(np.int64)}, str(tmp))
            os.replace(tmp, folder / names[s])
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def finish_entry(folder: Path, plan: Plan, meta: dict, seconds: float) -> None:
    """(The caller holds the writer lock, every shard is on disk.)  Check that each shard holds
    the reviews ``plan`` gives it, then write ``index.json``: the entry is complete.  A shard
    that does not fit (another writer broke the one-writer rule) is removed, and the error says
    to run again: an entry is never completed over shards of another plan."""
    for s, name in enumerate(plan.names):
        with safe_open(str(folder / name), framework="numpy") as f:
            fits = np.array_equal(f.get_tensor("index"), plan.shards[s])
        if not fits:
            (folder / name).unlink()
            raise RuntimeError(f"{folder / name} does not hold the reviews of this run's shard "
                               f"plan (written by another process meanwhile?): removed; run "
                               f"again to compute it")
    meta = {"key": plan.key, **meta, "n": len(plan.lengths), "dtype": "float16",
            "shards": plan.names, "tokens": int(plan.lengths.sum()),
            "seconds_this_run": round(seconds, 1)}
    atomic_write(folder / "index.json", json.dumps(meta, indent=1).encode())


def token_bar(plan: Plan, todo, meta: dict, desc: str, progress: bool, who: str = ""):
    """A tqdm bar over the tokens of shards ``todo`` (disabled without ``progress``)."""
    return tqdm(total=sum(plan.tokens(s) for s in todo), unit="tok", unit_scale=True,
                desc=f"{desc} ({meta.get('encoder', '?')}{who}, {len(todo)}/{len(plan.shards)} "
                     "shards to go)", disable=not progress)


def write_entry(folder: Path, ids, encode, *, key: str, meta: dict, batch_tokens: int,
                shard_size: int, progress: bool = True, desc: str = "features") -> None:
    """Write the shards still missing, then ``index.json`` = ``meta`` (which names at least
    ``hidden_size``) + what the shards hold (the caller holds the writer lock).
    ``encode(list of id arrays)`` -> list of (L_i, H) float16 arrays, one padded encoder batch."""
    plan = Plan.of(ids, key, shard_size)
    todo = start_entry(folder, plan, desc)
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
    file hashed once per process while unchanged)."""
    folder = Path(folder).resolve()
    stamp = tuple((s.st_size, s.st_mtime_ns) for s in
                  (os.stat(folder / n) for n in ("config.json", "model.safetensors")))
    return _files_sha256(str(folder), stamp)


def portable_key(encoder_folder, max_length: int, ids) -> str:
    """The key both pipelines compute for the features of ``ids`` (token id arrays) from the
    encoder in ``encoder_folder`` at ``max_length`` (float16, whatever the precision used)."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "encoder": encoder_id(encoder_folder),
                                   "max_length": int(max_length)}).encode())
    for a in ids:
        h.update(len(a).to_bytes(4, "little"))
        h.update(np.asarray(a, dtype=np.int32).tobytes())
    return h.hexdigest()[:24]


def find_entry(cache_root, key: str) -> FeatureStore | None:
    """A complete entry under ``cache_root`` whose index.json carries portable key ``key``
    (one computed in float32 preferred over one computed under bf16 autocast), or None."""
    found = []
    for index in sorted(Path(cache_root).glob("*/index.json")):
        try:
            meta = json.loads(index.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("portable_key") == key:
            found.append((bool(meta.get("autocast_bf16")), index.parent))
    return FeatureStore(min(found)[1]) if found else None
