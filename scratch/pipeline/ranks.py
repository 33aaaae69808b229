"""Many processes write one feature-cache entry together: the ranks of a ``torchrun`` job
(torch-free; :class:`reference.pipeline.distributed.Ranks` is the torch side).

The ranks divide the very shard plan one process follows (:class:`scratch.pipeline.features.Plan`:
reviews by length, ``shard_size`` to a shard), balanced by tokens (:func:`assign_shards`), so
the entry is the one a single process writes, shard for shard.  The writer lock keeps its
meaning, one writer per entry, where "writer" is now the whole job: see
:func:`extract_together`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

from . import features
from .features import (
    FeatureStore,
    Plan,
    check_extract,
    check_space,
    discard_unfinished,
    finish_entry,
    open_entry,
    start_entry,
    token_bar,
    write_shards,
    writer_lock,
)

log = logging.getLogger(__name__)


class Ranks(Protocol):
    """The processes of one job, as :func:`extract_together` needs them (torch-free: the
    reference pipeline passes :class:`reference.pipeline.distributed.Ranks`, over
    torch.distributed)."""
    rank: int                            # 0..size-1
    size: int

    def share(self, obj):
        """Rank 0's ``obj`` on every rank (every rank calls it; the others pass anything)."""

    def barrier(self) -> None:
        """Return once every rank has called it."""


def assign_shards(todo, tokens, size: int) -> list[list[int]]:
    """Shards ``todo`` (``tokens[s]`` tokens each) dealt out to ``size`` ranks, balanced by
    tokens: the largest shard first, each to the rank with the fewest tokens so far (the lower
    rank on a tie).  The same on every rank; each rank's shards in increasing order.  No rank
    ends up more than the largest shard above the least loaded one."""
    load, mine = [0] * size, [[] for _ in range(size)]
    for s in sorted(todo, key=lambda s: (-tokens[s], s)):
        r = min(range(size), key=lambda r: (load[r], r))
        load[r] += tokens[s]
        mine[r].append(s)
    return [sorted(m) for m in mine]


WAITING = "waiting for the writer lock"


def extract(folder, ids, encode, *, ranks: Ranks | None = None, **kw) -> FeatureStore:
    """:func:`scratch.pipeline.features.extract` by one process (``ranks`` None or a single
    rank) or by the ``ranks.size`` processes of one job together (:func:`extract_together`);
    ``kw``: ``key``, ``meta``, ``batch_tokens``, ``shard_size``, ``progress``, ``desc``."""
    if ranks is None or ranks.size == 1:
        return features.extract(folder, ids, encode, **kw)
    return extract_together(Path(folder), ids, encode, ranks, **kw)


def extract_together(folder: Path, ids, encode, ranks: Ranks, *, key: str, meta: dict,
                     batch_tokens: int, shard_size: int, progress: bool = True,
                     desc: str = "features") -> FeatureStore:
    """:func:`scratch.pipeline.features.extract` by the ``ranks.size`` processes of one job,
    every one of them calling it with the same ``ids``: the same entry as one process writes,
    shard for shard.

    The rule that keeps one writer per entry: rank 0 takes the entry's writer lock on behalf
    of the whole job (polling, so that the other ranks, waiting in :meth:`Ranks.share`, hear
    from it every second and no collective times out), fixes the plan under it
    (:func:`start_entry`) and deals the missing shards out (:func:`assign_shards`); each rank
    writes its own (atomically, as always); after a barrier, rank 0 checks every shard and
    writes ``index.json``, and only then lets go of the lock.  The other ranks never touch
    the lock or ``plan.json``: they write only shards rank 0 gave them, while rank 0 holds the
    lock.  So an unrelated writer (one process, or another job's rank 0) waits for the whole
    job, and the job waits for it.

    A rank that fails makes the job fail (torchrun stops the others): rank 0 then cleans up
    as one process does (:func:`discard_unfinished`), the others remove their temporary file;
    the finished shards of every rank stay for the next run, which may use any number of
    ranks.  Should a rank be stopped only after rank 0 let go of the lock and a shard of its
    lands late, :func:`finish_entry` refuses an entry whose shards do not fit the plan."""
    check_extract(ids, batch_tokens, shard_size)
    plan = Plan.of(ids, key, shard_size)
    if ranks.rank == 0:
        return _rank0(folder, ids, encode, ranks, plan, meta, batch_tokens, progress, desc)
    while (order := ranks.share(None)) == WAITING:
        pass
    if order["key"] != key:
        raise RuntimeError(f"{desc}: rank {ranks.rank} computed cache key {key}, rank 0 "
                           f"{order['key']}: the ranks do not see the same data or encoder")
    if order["todo"] is not None:
        mine = order["todo"][ranks.rank]
        with token_bar(plan, mine, meta, desc, False) as bar:
            write_shards(folder, ids, encode, plan, mine, batch_tokens, bar)
        ranks.barrier()                                   # every shard is on disk
    ranks.barrier()                                       # index.json is written
    store = FeatureStore(folder)
    store.wait_seconds = order["waited"]
    return store


def _rank0(folder: Path, ids, encode, ranks: Ranks, plan: Plan, meta: dict, batch_tokens: int,
           progress: bool, desc: str) -> FeatureStore:
    waited = 0.0
    if open_entry(folder, desc)[0] is not None:             # complete and sound
        ranks.share({"key": plan.key, "todo": None, "waited": waited})
    else:
        with writer_lock(folder, desc, heartbeat=lambda: ranks.share(WAITING)) as waited:
            store, repaired = open_entry(folder, desc, repair=True)
            try:
                todo = None if store else start_entry(folder, plan, desc, not repaired,
                                                         meta.get("portable_key"))
                if todo:
                    check_space(folder, plan, todo, int(meta["hidden_size"]))
                parts = (None if todo is None else
                         assign_shards(todo, [plan.tokens(s) for s in range(len(plan.shards))],
                                       ranks.size))
                if todo and len(todo) < ranks.size:
                    log.info("%s: %d shards to write for %d ranks, %d of them idle (a "
                             "smaller --shard-size cuts the work finer)", desc, len(todo),
                             ranks.size, ranks.size - len(todo))
                ranks.share({"key": plan.key, "todo": parts, "waited": waited})
                if parts is not None:
                    t0 = time.perf_counter()
                    with token_bar(plan, parts[0], meta, desc, progress,
                                    f", rank 0 of {ranks.size}") as bar:
                        write_shards(folder, ids, encode, plan, parts[0], batch_tokens, bar)
                    ranks.barrier()                       # every shard is on disk
                    finish_entry(folder, plan, meta, time.perf_counter() - t0)
            except BaseException:
                discard_unfinished(folder)
                raise
    ranks.barrier()                                       # index.json is written
    store = FeatureStore(folder)
    store.wait_seconds = waited
    return store
