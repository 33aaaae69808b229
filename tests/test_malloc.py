"""scratch.pipeline.malloc: after reuse_freed_memory(), a big array freed and allocated again
costs no page faults; without it, every allocation faults its pages in again.  Each case runs in
a fresh interpreter (the setting is process-wide and for life)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource, sys
import numpy as np
from scratch.pipeline.malloc import give_back_freed_memory, reuse_freed_memory
took = reuse_freed_memory() if sys.argv[1] == "on" else None
mib = int(sys.argv[2])
faults = []
for _ in range(5):                        # written, freed: an activation's life
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(mib * 2**18, np.float32)
    a.fill(1.0)
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": took, "faults": faults}))
"""


def probe(mode: str, mib: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(mib)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
@pytest.mark.parametrize("mib", [256, 1536])
def test_freed_memory_is_reused_without_page_faults(mib):
    """NumPy asks for huge pages on big arrays, so the count is of 2 MiB pages here (about 130
    per 256 MiB) where torch's tensors fault 4 KiB ones; either way the kernel zeroes them.
    1.5 GiB: more than a finite trim threshold of 1 GiB would keep (the heap is never trimmed;
    at 512 tokens an extraction batch frees 1.16 GB).  Where the kernel has no huge page at
    hand it faults 4 KiB pages instead (512 times as many), so a count is compared with the
    array's size in 2 MiB pages, the fewest faults that bring it in, not with another count."""
    huge_pages = mib // 2                       # 2 MiB pages in the array
    default = probe("off", mib)
    assert default["faults"][0] >= huge_pages // 2
    assert all(f >= huge_pages // 2 for f in default["faults"][1:])   # faulted in again, each time
    kept = probe("on", mib)
    assert kept["took"] is True
    assert kept["faults"][0] >= huge_pages // 2                      # the first time, as always
    assert all(f <= huge_pages // 20 for f in kept["faults"][1:])    # then reused


def test_every_command_asks_for_it(monkeypatch):
    """cli.run, the door of every ``python -m`` command, calls it before main."""
    from scratch.pipeline import cli

    calls = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: calls.append("malloc"))
    assert cli.run(lambda: calls.append("main") or 0, "prog") == 0
    assert calls == ["malloc", "main"]


GROWING = r"""
import json, sys
import numpy as np
from scratch.pipeline.malloc import give_back_freed_memory, reuse_freed_memory
assert reuse_freed_memory()
mode = sys.argv[1]

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

base, grown = anon_mib(), []
for s in range(6):                              # shards of longer reviews, one after the other
    rows = [np.ones((40 + 40 * s, 768), np.float16) for _ in range(512)]
    shard = np.concatenate(rows)                # gathered, then written
    del rows, shard
    if mode == "on":
        give_back_freed_memory()
    elif mode == "above":
        give_back_freed_memory(above=100 * 2**20)
    grown.append(anon_mib() - base)
print(json.dumps(grown))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_growing_shards_do_not_grow_the_heap_when_freed_memory_is_given_back():
    """With freed memory kept (never trimmed), blocks that grow one after the other leave the
    heap holding every one of them (a shard's hole is too small for the next); given back after
    each, the process holds about nothing between shards; given back past 100 MiB free, at most
    that much more.  Six shards of 30-180 MiB: kept, the heap ends holding over 300 MiB more
    than it began with; given back, under 20."""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", GROWING, mode], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    kept, given, above = run("off"), run("on"), run("above")
    assert kept[-1] > 300 and kept[-1] > kept[0] + 200, kept
    assert max(given) < 20, given
    # given back only past 100 MiB free: the heap holds at most that plus the biggest shard
    assert max(above) < 100 + 180 + 20 and above[-1] < kept[-1] - 100, above


def test_each_shard_written_gives_freed_memory_back(tmp_path, monkeypatch):
    """scratch.pipeline.features.write_shards gives the heap's free pages back after every shard
    it writes (the shards grow: see give_back_freed_memory)."""
    from scratch.pipeline import features

    calls = []
    monkeypatch.setattr(features, "give_back_freed_memory", lambda: calls.append(1))
    ids = [np.arange(1, 2 + i % 7) for i in range(10)]
    encode = lambda batch: [np.full((len(a), 4), 0.5, np.float16) for a in batch]  # noqa: E731
    store = features.extract(tmp_path / "e", ids, encode, key="k", meta={"hidden_size": 4},
                             shard_size=3, progress=False)
    assert len(store.meta["shards"]) == 4 and len(calls) == 4


def test_giving_back_is_harmless_off_glibc(monkeypatch):
    from scratch.pipeline import malloc

    malloc._glibc.cache_clear()                         # (glibc is looked up once)
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("", ""))
    try:
        assert malloc.give_back_freed_memory() is False
        assert malloc.give_back_freed_memory(above=1) is False
        assert malloc.free_heap_bytes() is None
    finally:
        malloc._glibc.cache_clear()


def test_free_heap_bytes_sees_a_freed_block():
    """mallinfo2's free bytes grow by a block freed inside the heap (kept there)."""
    code = r"""
import json, numpy as np
from scratch.pipeline.malloc import free_heap_bytes, reuse_freed_memory
assert reuse_freed_memory()
a = np.ones(64 * 2**18, np.float32); b = np.ones(2**10, np.float32)   # b keeps a off the top
before = free_heap_bytes(); del a
print(json.dumps([before, free_heap_bytes()]))
"""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("a glibc function")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    before, after = json.loads(out)
    assert after - before >= 63 * 2**20, (before, after)        # 64 MiB, less headers


@pytest.mark.parametrize("side", ["reference", "scratch"])
def test_every_training_batch_checks_the_heap(monkeypatch, side):
    """Both training loops ask after every batch to give freed memory back past the slack."""
    import importlib

    from tests.helpers import MemoryStore

    train = importlib.import_module(f"{side}.pipeline.train")
    calls = []
    monkeypatch.setattr(train, "give_back_freed_memory", lambda above: calls.append(above))
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(3 + i % 5, 8)).astype(np.float16) for i in range(10)]
    store = MemoryStore(feats, torch_batches=side == "reference")
    split = train.Split(store, np.arange(10), (np.arange(10) % 2).astype(np.float32))
    if side == "reference":
        from reference.model import GRUHead
        head = GRUHead(8, 4, 1, 1, True, 0.0).double()
    else:
        from scratch.sentiment import SentimentHead
        head = SentimentHead(8, 4, 1, 1, True, 0.0, seed=0)
    train.run_epoch(head, split, batch_size=4)
    assert calls == [malloc_slack()] * 3


def malloc_slack():
    from scratch.pipeline.malloc import TRAINING_SLACK
    return TRAINING_SLACK
