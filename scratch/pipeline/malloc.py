"""Keep freed memory in the process, so that big temporary arrays do not cost page faults.

An encoder forward or a training step allocates and frees arrays of tens to hundreds of MB
(attention scores, the feed-forward layer's activations, gradients).  glibc's malloc serves
every request above 32 MB (and, by its dynamic threshold, many smaller ones) with a fresh
``mmap`` and gives it back with ``munmap`` when freed, so the next batch faults the same
memory in again, page by page, each 4 KiB page zeroed by the kernel.  Measured here (AMD EPYC,
one thread, MPNet forward on 8 x 512 tokens in bf16 autocast): 0.9-1.2 million page faults
and 1.7-2.9 s of system time per call beside 4.9-5.1 s of user time; with the two settings
below, 3,072 faults, 0.00-0.05 s of system time and 4.6-4.7 s of user time, peak memory 4%
higher.  The feature extraction ran at 41% system time before.

:func:`reuse_freed_memory` sets, through glibc's ``mallopt`` (ctypes)::

    M_MMAP_MAX = 0            every block comes from the heap, none from its own mmap
    M_TRIM_THRESHOLD = -1     the heap is never trimmed: freed memory stays in the process

("Setting M_TRIM_THRESHOLD to -1 disables trimming completely", mallopt(3)), so a freed block
is reused by the next request of its size.  A finite threshold is not enough: at 512 tokens the
extraction's batch frees 1.16 GB at the heap's top, and with a 1 GiB threshold glibc gave it
back after every batch (strace: brk up and down each time, 200k page faults a second).
Process-wide and for the process's lifetime: the command-line entry points call it first.
Elsewhere (no glibc) it does nothing and returns False.

Kept memory is reused only by requests that fit a freed block: work whose big blocks grow one
after the other (an extraction's shards) calls :func:`give_back_freed_memory` between them.
"""
from __future__ import annotations

import ctypes
import functools
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4          # glibc's <malloc.h>
TRIM_THRESHOLD = -1                             # never trim (mallopt(3))


@functools.cache
def _glibc():
    """glibc, loaded through ctypes (once), or None elsewhere."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.cache
def reuse_freed_memory() -> bool:
    """Ask glibc to keep and reuse freed memory (see the module).  True when both settings
    took; False off glibc.  Idempotent."""
    if (libc := _glibc()) is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                   TRIM_THRESHOLD))


class _MallInfo2(ctypes.Structure):          # glibc's struct mallinfo2 (glibc >= 2.33)
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def free_heap_bytes() -> int | None:
    """Bytes free inside malloc's heaps, kept for reuse (``mallinfo2().fordblks``, all arenas);
    None off glibc or before 2.33."""
    if (libc := _glibc()) is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2            # (the default restype is int)
    return int(libc.mallinfo2().fordblks)


def give_back_freed_memory(above: int = 0) -> bool:
    """Return the heap's free pages to the system now (glibc's ``malloc_trim(0)``, which the
    never-trim setting above does not stop); with ``above`` > 0 only when more than ``above``
    bytes lie free in the heap (:func:`free_heap_bytes`).  True when it gave some back; False
    when none, or off glibc.

    For work whose big blocks grow one after the other, as a feature extraction's shards do (the
    plan sorts reviews by length, and each shard is gathered in memory, then written): a freed
    shard's hole is too small for the next, bigger one, so with trimming off the heap grows by
    about every shard written.  A K = 1 entry computed from K = 2's (IMDB's train split, MPNet,
    10 of 13 shards) had grown to 17.5 GB of anonymous memory for shards of at most 1.6 GB.
    :func:`scratch.pipeline.features.write_shards` calls this after each shard: one call per
    several minutes of encoding, so the page faults it brings back are few.  Training steps on
    batches of every length fragment the heap the same way (an MPNet run training its top layer
    on 128 x 512 tokens held 11.7 GB after 26 batches, where one step needs under 3): the
    training loops call it after each batch with ``above`` = :data:`TRAINING_SLACK`, so the
    faults come back only when the heap wastes more than that."""
    if (libc := _glibc()) is None:
        return False
    if above and (free_heap_bytes() or 0) <= above:
        return False
    return bool(libc.malloc_trim(0))


TRAINING_SLACK = 2**30                          # free heap bytes a training loop lets be
