"""The reference commands under ``torchrun``: more processes, on one machine or several, share
the feature extraction and the training of the head.

    torchrun --nproc-per-node 2 -m reference.pipeline.features ...      each rank encodes its shards
    torchrun --nproc-per-node 2 -m reference.pipeline.train ...         DistributedDataParallel head

torchrun starts the processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` for each; :func:`session` joins them into one process
group (gloo on CPU; gloo for CPU tensors and NCCL for CUDA tensors on GPUs, one GPU per
local rank) and hands the command a :class:`Ranks`.  Without torchrun (or with one process)
:data:`SINGLE` stands in: every rank method is then the identity, so the commands run one
code path.

A rank that dies ends the run, never hangs it: torchrun (``--max-restarts 0``) stops the
others when one exits with an error, a rank blocked in a collective with a dead peer gets an
error from the backend, which :func:`session` turns into one line naming its rank; and every
collective waits at most ``timeout`` seconds (``--dist-timeout``) for a rank that is alive
but stuck.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = 1800.0          # seconds; torch's own default for gloo


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``size`` processes of a job (``rank`` 0 writes the
    checkpoints, the metrics and the cache's index, and prints)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, batch: np.ndarray) -> np.ndarray:
        """This rank's slice of a global batch: ``size`` contiguous runs whose lengths differ
        by at most one (some empty when the batch is smaller than ``size``)."""
        return np.array_split(batch, self.size)[self.rank] if self.size > 1 else batch

    def share(self, obj):
        """Rank 0's ``obj`` on every rank (a collective: every rank calls it)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def all_sum(self, values) -> list[float]:
        """Element-wise sums over the ranks of ``values`` (numbers; float64 on the wire)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def wrap(self, model: torch.nn.Module, device) -> torch.nn.Module:
        """``model`` in DistributedDataParallel (its gradients averaged over the ranks after
        every backward, its parameters broadcast from rank 0 now), or ``model`` itself alone."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        cuda = torch.device(device).type == "cuda"
        return DistributedDataParallel(model, device_ids=[self.local_rank] if cuda else None)


SINGLE = Ranks()


def from_env(env=os.environ) -> Ranks:
    """The ranks torchrun describes in ``env`` (:data:`SINGLE` without it): no process group
    is made here."""
    size = int(env.get("WORLD_SIZE", 1))
    if size == 1:
        return SINGLE
    return Ranks(int(env["RANK"]), size, int(env.get("LOCAL_RANK", 0)))


def current() -> Ranks:
    """The job's :class:`Ranks` once :func:`session` made the process group, else SINGLE."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def session(prog: str, device: str = "cpu", timeout: float = DEFAULT_TIMEOUT):
    """Join torchrun's process group for the ``with`` block (nothing to join alone) and yield
    :class:`Ranks`.  On CUDA each process takes GPU ``LOCAL_RANK``.  A collective that fails
    because another rank died or stopped answering ends the command with one line on stderr
    (``PROG: error: rank R of N: ...``) and exit status 1 at once (``os._exit``: a process
    group that lost a peer cannot be torn down without a deadlock in gloo); otherwise the
    process group is torn down when the block ends."""
    ranks = from_env()
    if ranks.size == 1:
        yield ranks
        return
    backend = "gloo"
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    try:
        yield ranks
    except RuntimeError as e:
        if not lost_rank(e):
            raise
        print(f"{prog}: error: rank {ranks.rank} of {ranks.size}: lost the other ranks "
              f"({_first_line(e)}); torchrun's report names the rank that failed",
              file=sys.stderr, flush=True)
        # A process group that lost a peer cannot be torn down: freeing it (here, or when the
        # DDP model and the exception's frames go) makes gloo's destructor join a worker thread
        # that waits for the GIL this thread holds, a deadlock (seen in 1 of 5 runs of
        # tests/test_distributed.py's hung-rank test).  Every file this process wrote is already
        # atomic and complete, so leave at once; torchrun reports the exit status.
        sys.stdout.flush()
        os._exit(1)
    finally:
        with contextlib.suppress(Exception):
            close_group()


def close_group() -> None:
    """Destroy the process group once nothing holds it.  A DistributedDataParallel model keeps
    the group alive through its reducer, and DDP's hooks put the model in reference cycles
    that only the garbage collector frees: collect them first, so that the group goes here and
    not at interpreter exit, where its threads may still run (the likely cause of a rank that
    aborted once in CI with "terminate called without an active exception")."""
    gc.collect()
    dist.destroy_process_group()


def lost_rank(e: BaseException) -> bool:
    """Whether ``e`` is a collective's failure (a peer gone, a timeout) rather than a bug:
    torch.distributed's own errors, and gloo's, which come as plain RuntimeErrors naming
    gloo's sources."""
    return isinstance(e, dist.DistError) or "gloo/" in str(e)


def _first_line(e: BaseException) -> str:
    """The first sentence of ``e``'s message, without gloo's ``[source.cc:line]`` prefix."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    return re.split(r"(?<=\.) ", re.sub(r"^\[[^\]]*\]\s*", "", lines[0]))[0][:200].rstrip(".")


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank ``rank``'s own random stream (its dropout masks), distinct per rank."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
