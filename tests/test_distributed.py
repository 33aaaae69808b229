"""Issue 12: the reference pipeline scales out with torchrun.

In one process, torch-free: how the shards are dealt to the ranks, how a global batch is
sliced, and the protocol by which the ranks of a job write one cache entry
(:func:`scratch.pipeline.ranks.extract_together`), threads standing in for the ranks.  With
torch.multiprocessing (3 processes, gloo): ``fit`` under DistributedDataParallel follows the
one-process ``fit``.  Under torchrun (2 processes, gloo on the loopback interface, a tiny
synthetic archive and a tiny random encoder): both commands give the one-process results, the
job and an unrelated writer of the same entry wait for each other, ``--resume`` works, and a
rank that dies ends either command within seconds, never a hang.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file

from reference.pipeline import checkpoint as ckpt
from reference.pipeline import features as Fe
from reference.pipeline import train
from reference.pipeline.distributed import Ranks
from scratch.pipeline import features as sf
from scratch.pipeline import ranks as fr
from tests.ddp_toy import batch_gradients, fit_toy, fit_worker
from tests.imdb_fixtures import review, save_tiny_encoder
from tests.test_train import strip_times

ROOT = Path(__file__).resolve().parents[1]


# --- dealing shards, slicing batches --------------------------------------------------------------

@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=40), st.data(),
       st.integers(1, 6))
def test_each_shard_goes_to_one_rank_and_the_tokens_are_balanced(tokens, data, size):
    todo = data.draw(st.lists(st.sampled_from(range(len(tokens))), unique=True))
    parts = fr.assign_shards(todo, tokens, size)
    assert len(parts) == size and sorted(sum(parts, [])) == sorted(todo)
    assert all(p == sorted(p) for p in parts)
    assert fr.assign_shards(list(reversed(todo)), tokens, size) == parts   # order-free
    if todo:
        loads = [sum(tokens[s] for s in p) for p in parts]
        assert max(loads) - min(loads) <= max(tokens[s] for s in todo)


@given(st.integers(0, 60), st.integers(1, 7))
def test_the_ranks_slices_make_up_the_global_batch(n, size):
    batch = np.random.default_rng(n).permutation(n)
    parts = [Ranks(r, size).part(batch) for r in range(size)]
    np.testing.assert_array_equal(np.concatenate(parts), batch)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


# --- the ranks of a job write one entry: threads as ranks -----------------------------------------

class ThreadGroup:
    """``size`` threads as the ranks of one job: rank 0's object goes through a shared slot
    between two barriers; a wait gives up after ``timeout`` seconds (BrokenBarrierError), as a
    collective times out, and a rank that fails breaks the barrier for the others, as torchrun
    stops them."""

    def __init__(self, size: int, timeout: float = 20.0):
        self.size, self.slot = size, None
        self.wall = threading.Barrier(size, timeout=timeout)

    def start(self, fn) -> tuple[list, list[threading.Thread]]:
        """Run ``fn(ranks)`` on every rank's thread; (results or exceptions by rank, threads)."""
        results = [None] * self.size

        def body(r):
            try:
                results[r] = fn(ThreadRanks(self, r))
            except BaseException as e:                  # noqa: B036  (handed to the test)
                results[r] = e
                self.wall.abort()

        threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}")
                   for r in range(self.size)]
        for t in threads:
            t.start()
        return results, threads

    def run(self, fn) -> list:
        results, threads = self.start(fn)
        for t in threads:
            t.join(60)
        return results


class ThreadRanks:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def share(self, obj):
        if self.rank == 0:
            self.group.slot = obj
        self.group.wall.wait()
        value = self.group.slot
        self.group.wall.wait()
        return value

    def barrier(self):
        self.group.wall.wait()


IDS = [np.random.default_rng(i).integers(1, 1000, 1 + (7 * i) % 19).astype(np.int32)
       for i in range(23)]
META = {"encoder": "fake", "hidden_size": 3}


class Encoder:
    """A deterministic stand-in for the encoder that records which thread encoded what."""

    def __init__(self, fail_in=None):
        self.calls, self.fail_in = [], fail_in

    def __call__(self, batch):
        me = threading.current_thread().name
        if me == self.fail_in and self.calls.count(me) == 1:      # its second batch
            raise RuntimeError(f"{me}: encoder crashed")
        self.calls.append(me)
        self.reviews = getattr(self, "reviews", 0) + len(batch)
        return [np.stack([a, 2 * a, a % 5], 1).astype(np.float16) for a in batch]


def write(folder, encode, ranks=None, **kw):
    kw = dict(key="k", meta=META, batch_tokens=40, shard_size=4, progress=False) | kw
    return fr.extract(folder, IDS, encode, ranks=ranks, **kw)


def assert_same_entry(a: Path, b: Path) -> None:
    """Entries ``a`` and ``b`` hold the same plan, index (but for the run's seconds) and
    shards, tensor for tensor."""
    assert (a / "plan.json").read_bytes() == (b / "plan.json").read_bytes()
    ia, ib = (json.loads((f / "index.json").read_text()) for f in (a, b))
    ia.pop("seconds_this_run"), ib.pop("seconds_this_run")
    assert ia == ib
    for name in ia["shards"]:
        sa, sb = load_file(str(a / name)), load_file(str(b / name))
        assert sa.keys() == sb.keys() == {"features", "lengths", "index"}
        for k in sa:
            assert sa[k].dtype == sb[k].dtype
            np.testing.assert_array_equal(sa[k], sb[k])
    assert not list(b.glob(".*.tmp*"))


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_write_the_one_process_entry_each_shard_once(tmp_path, size):
    write(tmp_path / "one", Encoder())
    enc = Encoder()
    stores = ThreadGroup(size).run(lambda ranks: write(tmp_path / "job", enc, ranks))
    assert all(isinstance(s, sf.FeatureStore) and len(s) == len(IDS) for s in stores)
    assert_same_entry(tmp_path / "one", tmp_path / "job")
    assert enc.reviews == len(IDS)                               # no review encoded twice
    assert {f"rank{r}" for r in range(size)} <= set(enc.calls)   # every rank did a share


def test_a_job_with_fewer_shards_than_ranks_says_so(tmp_path, caplog):
    enc = Encoder()
    with caplog.at_level("INFO", logger="scratch.pipeline.ranks"):
        ThreadGroup(3).run(lambda ranks: write(tmp_path / "job", enc, ranks, shard_size=10))
    assert "shards to write for 3 ranks" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="scratch.pipeline.ranks"):
        ThreadGroup(3).run(lambda ranks: write(tmp_path / "big", enc, ranks, shard_size=20))
    assert "features: 2 shards to write for 3 ranks, 1 of them idle" in caplog.text
    write(tmp_path / "one", Encoder(), shard_size=20)
    assert_same_entry(tmp_path / "one", tmp_path / "big")


def test_the_job_and_an_unrelated_writer_wait_for_each_other(tmp_path):
    """The unrelated writer holds the entry's lock for longer than a collective may wait:
    rank 0 waits for it and keeps the others talking (they would time out after 1.5 s), no
    rank writes anything meanwhile; then the job writes the entry.  Conversely a writer that
    comes while the job holds the lock waits and encodes nothing."""
    folder, enc = tmp_path / "job", Encoder()
    with sf.writer_lock(folder):
        results, threads = ThreadGroup(2, timeout=1.5).start(
            lambda ranks: write(folder, enc, ranks))
        time.sleep(3.5)
        assert not enc.calls and not list(folder.glob("shard_*"))
        assert all(t.is_alive() for t in threads) and results == [None, None]
    for t in threads:
        t.join(60)
    assert all(isinstance(s, sf.FeatureStore) for s in results)
    assert all(s.wait_seconds >= 3 for s in results)
    write(tmp_path / "one", Encoder())
    assert_same_entry(tmp_path / "one", folder)

    started, slow_calls = threading.Event(), []

    def slow(batch):
        started.set()
        slow_calls.append(threading.current_thread().name)
        time.sleep(0.2)
        return enc(batch)

    results, threads = ThreadGroup(2).start(lambda ranks: write(tmp_path / "late", slow, ranks))
    assert started.wait(30)
    unrelated = Encoder()
    late = write(tmp_path / "late", unrelated)
    for t in threads:
        t.join(60)
    assert not unrelated.calls and late.wait_seconds > 0 and len(late) == len(IDS)
    assert_same_entry(tmp_path / "one", tmp_path / "late")


def test_a_failing_rank_fails_the_job_and_the_entry_resumes(tmp_path):
    enc = Encoder(fail_in="rank1")
    results = ThreadGroup(2).run(lambda ranks: write(tmp_path / "job", enc, ranks))
    assert isinstance(results[1], RuntimeError) and "encoder crashed" in str(results[1])
    assert isinstance(results[0], threading.BrokenBarrierError)   # stopped, not hanging
    folder = tmp_path / "job"
    assert not (folder / "index.json").exists() and not list(folder.glob(".*.tmp*"))
    kept = len(list(folder.glob("shard_*")))
    assert kept >= 1 and (folder / "plan.json").exists()          # rank 0's shards stay
    again = Encoder()
    write(folder, again)                                         # one process finishes it
    write(tmp_path / "one", Encoder())
    assert_same_entry(tmp_path / "one", folder)
    n_shards = -(-len(IDS) // 4)
    assert again.reviews < len(IDS) and kept < n_shards


def test_an_entry_is_never_completed_over_a_shard_of_another_plan(tmp_path, caplog):
    """A shard of another plan (say, from a straggling rank of a job whose rank 0 already died)
    is never part of a finished entry: found at the start of a run, it is named and recomputed;
    renamed in while the run writes, it fails the run (removed, no index.json), and the next
    run recomputes that shard alone."""
    write(tmp_path / "one", Encoder())
    write(tmp_path / "five", Encoder(), shard_size=5)
    foreign = (tmp_path / "five" / "shard_00001.safetensors").read_bytes()
    folder = tmp_path / "job"
    write(folder, Encoder())

    # there before the run starts: its bytes are not the ones recorded with it
    (folder / "index.json").unlink()
    (folder / "shard_00001.safetensors").write_bytes(foreign)
    enc = Encoder()
    with caplog.at_level("WARNING", logger="scratch.pipeline.features"):
        write(folder, enc)
    assert [m for m in caplog.messages if "shard_00001.safetensors" in m and "recomputing" in m]
    assert enc.reviews == 4                                      # that shard alone, again
    assert_same_entry(tmp_path / "one", folder)

    # renamed in by another writer while this run computes shard 2
    (folder / "index.json").unlink()
    (folder / "shard_00002.safetensors").unlink()

    class Straggler(Encoder):
        def __call__(self, batch):
            (folder / "shard_00001.safetensors").write_bytes(foreign)
            return super().__call__(batch)

    with pytest.raises(RuntimeError, match=r"shard_00001.safetensors does not hold the reviews"):
        write(folder, Straggler())
    assert not (folder / "index.json").exists()
    assert not (folder / "shard_00001.safetensors").exists()
    enc = Encoder()
    write(folder, enc)
    assert enc.reviews == 4                                      # that shard alone, again
    assert_same_entry(tmp_path / "one", folder)


def test_shards_without_a_plan_are_not_trusted(tmp_path, caplog):
    write(tmp_path / "one", Encoder())
    folder = tmp_path / "job"
    write(folder, Encoder(), shard_size=5)
    for name in ("index.json", "plan.json"):
        (folder / name).unlink()
    with caplog.at_level("INFO", logger="scratch.pipeline.features"):
        write(folder, Encoder())
    assert any("cut for another plan (no plan.json)" in m for m in caplog.messages)
    assert_same_entry(tmp_path / "one", folder)


# --- fit under DistributedDataParallel: 3 processes ---------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fit_under_ddp_follows_one_process_and_trains_with_dropout(tmp_path):
    """Dropout 0: every global batch's gradient, averaged by DDP over 3 ranks (one with an
    empty slice in the last batch), is the one-process batch-mean gradient; and the 3-process
    losses equal the one-process losses up to float32 rounding (other batch shapes in the
    GRU's products, N / B * sum instead of sum / B, the gradient summed over ranks), the
    weights too.  (Adam forgives a gradient scaled by a constant; the gradients do not.)
    Dropout 0.25: ranks draw other masks than one process would, so the numbers differ, but it
    learns as well."""
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    one = fit_toy(tmp_path / "one", 0.0)
    one_grads = batch_gradients()
    mp.spawn(fit_worker, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    ddp_grads = torch.load(tmp_path / "grads.pt")
    assert len(ddp_grads) == len(one_grads) == 6
    for a, b in zip(one_grads, ddp_grads, strict=True):   # every batch's: sum_i grad loss_i / B
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    ddp = json.loads((tmp_path / "histories.json").read_text())
    for a, b in zip(strip_times(one), strip_times(ddp["0.0"]), strict=True):
        assert a.keys() == b.keys() and a["best"] == b["best"]
        for k in ("train_loss", "valid_loss", "train_acc", "valid_acc"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), k
    wa, wb = (ckpt.load_head(tmp_path / d)[0].state_dict() for d in ("one", "ddp0.0"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    dropout = ddp["0.25"]
    assert dropout[-1]["train_loss"] < dropout[0]["train_loss"]
    assert dropout[-1]["valid_acc"] >= 0.9
    assert len(ckpt.load_state(tmp_path / "ddp0.25")["rng_ranks"]) == 3


# --- the commands under torchrun: 2 processes on the loopback interface ---------------------------

def write_tree(root: Path, n_train: int = 12, n_test: int = 8) -> Path:
    """aclImdb/{train,test}/{pos,neg}: n reviews a class, test reviews other than train's."""
    for split, n, first in (("train", n_train, 0), ("test", n_test, 100)):
        for label in ("pos", "neg"):
            d = root / "aclImdb" / split / label
            d.mkdir(parents=True)
            for i in range(first, first + n):
                (d / f"{i}_{8 if label == 'pos' else 2}.txt").write_text(
                    review(i, label == "pos"), encoding="utf-8")
    return root / "aclImdb"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return write_tree(root / "data"), save_tiny_encoder(root / "enc")


def features_args(world, cache) -> list[str]:
    data, enc = world
    return ["--data", str(data), "--encoder", str(enc), "--cache", str(cache), "--shard-size",
            "3", "--max-length", "32", "--batch-tokens", "64", "--device", "cpu", "--no-progress"]


def train_args(world, cache, out, epochs) -> list[str]:
    data, enc = world
    return ["--data", str(data), "--encoder", str(enc), "--cache", str(cache), "--max-length",
            "32", "--device", "cpu", "--no-progress", "--batch-size", "4", "--hidden-dim", "8",
            "--dropout", "0", "--lr", "0.01", "--epochs", str(epochs), "--out", str(out)]


def torchrun_cmd(module: str, args, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
            str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "--max-restarts", "0", "-m", module, *args]


ENV = os.environ | {"HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(ROOT)}


def torchrun(module: str, args, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(module, args), cwd=ROOT, env=ENV | env,
                          capture_output=True, text=True, timeout=timeout)


def one_process(main, args):
    """``main(args)`` in this process with one thread, as each torchrun rank has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process_cache(world, tmp_path_factory):
    """The features of ``world`` by one process: {n reviews: entry folder}."""
    cache = tmp_path_factory.mktemp("one") / "cache"
    one_process(Fe.main, features_args(world, cache))
    return {json.loads((e / "index.json").read_text())["n"]: e for e in cache.iterdir()}


@pytest.mark.slow
def test_torchrun_features_write_the_one_process_cache(world, one_process_cache, tmp_path):
    """2 ranks write the same entries, tensor for tensor; the job first waits for an unrelated
    writer that holds the train entry's lock, and writes nothing meanwhile."""
    train_entry = tmp_path / "cache" / one_process_cache[24].name
    err = tmp_path / "stderr.txt"
    with sf.writer_lock(train_entry), open(err, "w") as err_file:
        job = subprocess.Popen(torchrun_cmd("reference.pipeline.features",
                                            [*features_args(world, tmp_path / "cache"),
                                             "--dist-timeout", "120"]),
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=err_file,
                               text=True)
        deadline = time.monotonic() + 180
        while "another process is extracting" not in err.read_text():
            assert job.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        time.sleep(1.5)
        assert not list(train_entry.glob("shard_*"))
    out, _ = job.communicate(timeout=180)
    assert job.returncode == 0, err.read_text()
    assert out.count("train: 24 reviews") == 1 and "(2 processes)" in out   # rank 0 prints
    for entry in one_process_cache.values():
        assert_same_entry(entry, tmp_path / "cache" / entry.name)


@pytest.mark.slow
def test_torchrun_train_follows_one_process_and_resumes(world, tmp_path):
    """Dropout 0, global batch 4: 17 train reviews make a last batch of one, so rank 1 has an
    empty slice there.  One epoch, then ``--resume`` to two, killed (rank 0, right after it
    saved) after batch 2 of epoch 2 with ``--save-every 2``, then ``--resume`` again: the
    losses and accuracies are the one-process run's up to float32 rounding (see
    reference.pipeline.train), and so is the test."""
    two = tmp_path / "two"
    for epochs, extra in ((1, []), (2, ["--resume"])):
        done = torchrun("reference.pipeline.train",
                        [*train_args(world, tmp_path / "cache", two, epochs),
                         *extra, "--dist-timeout", "120"])
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count(f"epoch {epochs}: train loss") == 1          # rank 0 logs
        if epochs == 1:                    # epoch 2 cut after its batch 2, then resumed
            cut = torchrun("tests.dist_crash",
                           ["train", *train_args(world, tmp_path / "cache", two, 2), "--resume",
                            "--save-every", "2", "--dist-timeout", "120"],
                           CRASH_MODE="after-save")
            assert cut.returncode != 0 and ckpt.load_state(two)["partial"]["batches"] == 2
        else:
            assert "resuming after epoch 1 and batch 2 of epoch 2" in done.stdout
    one_process(train.main, train_args(world, tmp_path / "cache1", tmp_path / "one", 2))
    m1, m2 = (json.loads((tmp_path / d / ckpt.METRICS).read_text()) for d in ("one", "two"))
    assert (m2["processes"], m2["n_train"], m2["n_valid"], m2["n_test"]) == (2, 17, 7, 16)
    for a, b in zip(strip_times(m1["epochs"]), strip_times(m2["epochs"]), strict=True):
        assert a["best"] == b["best"] and a["train_acc"] == b["train_acc"]
        assert a["valid_acc"] == b["valid_acc"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-5)
    assert m2["test_loss"] == pytest.approx(m1["test_loss"], rel=1e-5)
    assert (m2["test_acc"], m2["best_epoch"]) == (m1["test_acc"], m1["best_epoch"])
    assert len(ckpt.load_state(two)["rng_ranks"]) == 2
    w1, w2 = (ckpt.load_head(tmp_path / d)[0].state_dict() for d in ("one", "two"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["features", "train"])
def test_a_dead_rank_ends_the_run_at_once(world, one_process_cache, tmp_path, command):
    """Rank 1 exits in its first encoder batch (features) or training batch (train), no
    clean-up.  The run fails within seconds although a collective may wait 600 s, torchrun
    names rank 1 and its exit status; what is left of the cache resumes in one process to the
    one-process entry, and no metrics are written."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = (features_args(world, cache) if command == "features" else
            train_args(world, cache, out, 2))
    t0 = time.monotonic()
    done = torchrun("tests.dist_crash", [command, *args, "--dist-timeout", "600"], timeout=300)
    took = time.monotonic() - t0
    assert done.returncode != 0 and took < 150, (took, done.stderr[-3000:])
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*3", done.stderr), \
        done.stderr[-3000:]
    assert not (out / ckpt.METRICS).exists()
    if command == "features":
        entry = cache / one_process_cache[24].name
        assert not (entry / "index.json").exists() and not list(entry.glob(".*.tmp*"))
        one_process(Fe.main, features_args(world, cache))
        for e in one_process_cache.values():
            assert_same_entry(e, cache / e.name)


@pytest.mark.slow
def test_a_hung_rank_ends_the_run_after_the_timeout(world, tmp_path):
    """Rank 1 stops answering in its first training batch (alive, asleep): rank 0 waits in
    DDP's all-reduce for --dist-timeout 10 s, then ends with one line naming the timeout, and
    torchrun stops rank 1."""
    t0 = time.monotonic()
    done = torchrun("tests.dist_crash", ["train", *train_args(world, tmp_path / "cache",
                                                              tmp_path / "out", 2),
                                         "--dist-timeout", "10"], timeout=300, CRASH_MODE="hang")
    took = time.monotonic() - t0
    assert done.returncode != 0 and took < 150, (took, done.stderr[-3000:])
    assert re.search(r"python -m reference.pipeline.train: error: rank 0 of 2: "
                     r"lost the other ranks \(.*[Tt]imed out", done.stderr), done.stderr[-3000:]
    assert not (tmp_path / "out" / ckpt.METRICS).exists()
