"""``python -m reference.pipeline.train``: train the assignment's BiGRU head on cached
frozen-encoder features of IMDB, keep the best-validation checkpoint, report its test loss
and accuracy.

    python -m reference.pipeline.train --data PATH --encoder NAME --epochs 2 --batch-size 128 \\
        --max-length 512 --out DIR [--limit-train N --limit-test N] [--device auto|cpu|cuda] \\
        [--seed 3407] [--cache .cache/features] [--resume] [--save-every N] \\
        [--unfreeze-top K [--encoder-lr 2e-5] [--micro-batch-tokens 8192]]

The assignment's recipe: Adam (default lr), ``BCEWithLogitsLoss``, 17,500/7,500 train/valid
split with seed 3407 (with ``--limit-train N``: a stratified N-review subset, split 70/30),
best validation loss checkpointed.  The encoder is frozen, so its token features are computed
once (:mod:`reference.pipeline.features`) and every epoch runs only the GRU head, on length-bucketed
batches through the exact packed path of :mod:`reference.model`.

Loss and accuracy are means over examples: ``sum_i loss_i / N`` and ``#correct / N`` (a mean of
batch means would over-weight the last, short batch).  A review counts as positive when its
logit is > 0 (``round(sigmoid(z)) == 1``, as the assignment's ``binary_accuracy``).

Deterministic for a fixed seed on CPU: the head's init and dropout draw from ``torch``'s seeded
generator, epoch ``e`` shuffles its batches with seed ``seed + e``; ``--resume`` restores the
generator, so an interrupted run resumed gives the same numbers as an uninterrupted one.
The state is saved after every epoch, and with ``--save-every N`` after every N-th training
batch too: a long epoch cut short goes on from its last saved batch, exactly as well.

Under ``torchrun --nproc-per-node N`` (:mod:`reference.pipeline.distributed`) the N processes share
the work: the feature extraction by shards, every global batch of ``--batch-size`` reviews by
slices (:meth:`Ranks.part`), the head in ``DistributedDataParallel``.  Rank ``r``'s loss is
``N / B * sum_{i in slice r} loss_i``, so DDP's gradient average ``(1/N) sum_r`` is exactly the
one-process batch mean ``(1/B) sum_i grad loss_i``, whatever the slices' sizes (a rank with an
empty slice adds a zero gradient).  Epoch losses and accuracies are sums all-reduced over the
ranks, validation and test included.  So with the same ``--batch-size`` the run follows the
one-process run, equal up to float rounding (other batch shapes in the GRU's matrix products,
the gradient summed in another order), with one exception: dropout.  Rank 0 draws its masks
from the one-process run's generator, rank r > 0 from its own (:func:`distributed.rank_seed`),
so with dropout on the runs differ by the masks drawn, as two seeds would.  Checkpoints,
metrics and printing are rank 0's; ``--resume`` restores every rank's generator.

``--unfreeze-top K`` (:mod:`scratch.pipeline.unfreeze`): the top K encoder layers train with the
head (:class:`reference.top_layers.TopGRUHead`, transformers' own ``BertLayer`` modules) on
cached hidden states entering layer ``L-K``; one Adam with two parameter groups, the head at
``--lr`` and the layers at ``--encoder-lr``; each batch (each rank's slice of it) in
micro-batches of at most ``--micro-batch-tokens`` padded tokens, their gradients accumulated
before the step (under DDP the gradients are all-reduced once, after the last micro-batch, the
layers' with the head's).  The checkpoint holds the trained layers beside the head, the resume
state their Adam moments.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import math
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from scratch.pipeline import unfreeze
from scratch.pipeline.malloc import TRAINING_SLACK, give_back_freed_memory

from ..model import GRUHead
from ..top_layers import TopGRUHead, position_table
from . import checkpoint as ckpt
from . import cli, distributed
from .data import bucket_batches, train_valid_split
from .distributed import SINGLE, Ranks

VALID_FRACTION = 0.3      # 7,500 of 25,000, as the assignment


@dataclass
class Split:
    """Reviews ``idx`` of a feature store (anything with ``.lengths`` and ``.batch(indices)``)
    with their labels: ``labels[j]`` belongs to review ``idx[j]``."""
    store: object
    idx: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        self.idx = np.asarray(self.idx, dtype=np.int64)
        self.labels = np.asarray(self.labels)
        if len(self.idx) != len(self.labels):
            raise ValueError(f"{len(self.idx)} reviews but {len(self.labels)} labels")

    def __len__(self):
        return len(self.idx)


def _bar(iterable, desc, progress, **kw):
    return tqdm(iterable, desc=desc, leave=False, disable=not progress, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0, **kw)


def run_epoch(head: GRUHead, split: Split, batch_size: int, optimizer=None, seed: int = 0,
              device="cpu", progress: bool = False, desc: str = "",
              ranks: Ranks = SINGLE, micro_tokens: int = unfreeze.DEFAULT_MICRO_TOKENS,
              masks=None, start: int = 0, sums: tuple = (0.0, 0, 0),
              after_batch=None) -> tuple[float, float]:
    """One pass over ``split``: trains when ``optimizer`` is given (shuffled buckets, dropout),
    else evaluates (length-sorted, no grad).  Returns (mean loss, accuracy) over examples.

    With ``ranks`` of a torchrun job (``head`` wrapped in DistributedDataParallel to train):
    every rank builds the same global batches and takes its slice of each; the sums behind the
    means are all-reduced at the end, so every rank returns the one-process numbers.

    A :class:`TopGRUHead` (trained encoder layers) runs each batch in micro-batches
    (:func:`top_batch`); ``masks``: an iterator of dropout masks, one per training
    micro-batch, applied instead of drawn ones (scratch's, for the comparison tests).

    An epoch cut short goes on from its batch ``start`` with ``sums`` = (summed loss, correct,
    seen) of the batches before it (the same batches: the order is drawn from ``seed``);
    ``after_batch(done, sums)``, when given, is called on every rank after each batch, with
    the number of batches done and this rank's running sums (:func:`fit` saves there)."""
    train = optimizer is not None
    head.train(train)
    dtype = next(head.parameters()).dtype               # labels in the head's precision
    if isinstance(getattr(head, "module", head), TopGRUHead):
        step = functools.partial(top_batch, micro_tokens=micro_tokens, masks=masks)
    else:
        step = head_batch
    batches = bucket_batches(split.store.lengths[split.idx], batch_size, shuffle=train, seed=seed)
    total, correct, seen = sums
    bar = _bar(batches[start:], desc, progress and ranks.main, initial=start, total=len(batches))
    for done, b in enumerate(bar, start + 1):
        mine = ranks.part(b)                      # the global batch b, or this rank's slice
        if not len(mine) and not train:
            continue
        rows = mine if len(mine) else b[:1]       # an empty slice still joins the averaging
        # the batch mean, as the assignment: sum / B alone; over N ranks each sends
        # N / B * (its sum), which DDP averages back to sum / B (a zero for an empty slice)
        scale = ranks.size / len(b) if len(mine) else 0.0
        y = torch.as_tensor(split.labels[rows], dtype=dtype, device=device)
        loss, logits = step(head, split, rows, y, scale, optimizer, device=device)
        if len(mine):
            total += loss
            correct += int(((logits > 0) == (y > 0.5)).sum())
            seen += len(mine)
            give_back_freed_memory(above=TRAINING_SLACK)   # batches of every length fragment
            if progress and ranks.main:
                bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{correct / seen:.4f}")
        if after_batch is not None:
            after_batch(done, (total, correct, seen))
    total, correct, seen = ranks.all_sum([total, correct, seen])
    return total / seen, correct / seen


def head_batch(head: GRUHead, split: Split, rows: np.ndarray, y: torch.Tensor, scale: float,
               optimizer, device="cpu") -> tuple[float, torch.Tensor]:
    """Reviews ``rows`` of ``split`` through the head; with ``optimizer``, the summed loss times
    ``scale`` is backpropagated and one step taken.  Returns (the summed loss, the logits
    (B,))."""
    train = optimizer is not None
    x, lengths = split.store.batch(split.idx[rows])
    with torch.set_grad_enabled(train):
        logits = head(x.to(device), lengths).squeeze(1)
        loss = nn.BCEWithLogitsLoss(reduction="sum")(logits, y)
    if train:
        optimizer.zero_grad()
        (loss * scale).backward()
        optimizer.step()
    return float(loss.detach()), logits.detach()


def top_batch(model, split: Split, rows: np.ndarray, y: torch.Tensor, scale: float, optimizer,
              micro_tokens: int, device="cpu", masks=None) -> tuple[float, torch.Tensor]:
    """Reviews ``rows`` of ``split`` through the trained layers and the head, in micro-batches
    of at most ``micro_tokens`` padded tokens (:func:`scratch.pipeline.unfreeze.micro_batches`,
    as scratch cuts them): with ``optimizer``, each micro-batch's summed loss times ``scale``
    is backpropagated (gradients accumulate; under DDP they are all-reduced after the last
    micro-batch only), then one step.  Returns (the summed loss, the logits (B,))."""
    train = optimizer is not None
    dtype = next(model.parameters()).dtype
    criterion = nn.BCEWithLogitsLoss(reduction="sum")
    pieces = unfreeze.micro_batches(split.store.lengths[split.idx[rows]], micro_tokens)
    if train:
        optimizer.zero_grad()
    total, logits = 0.0, []
    for j, piece in enumerate(pieces):
        x, lengths = split.store.batch(split.idx[rows[piece]])
        last = j == len(pieces) - 1
        sync = (model.no_sync() if train and not last and hasattr(model, "no_sync")
                else contextlib.nullcontext())
        with sync, torch.set_grad_enabled(train):
            z = model(x.to(device=device, dtype=dtype), lengths,
                      masks=next(masks) if train and masks is not None else None).squeeze(1)
            loss = criterion(z, y[piece])
            if train:
                (loss * scale).backward()
        total += float(loss.detach())
        logits.append(z.detach())
    if train:
        optimizer.step()
    return total, torch.cat(logits)


def denormals_flushed() -> bool:
    """Whether this thread's CPU flushes denormal floats to zero (probed: torch has no getter)."""
    tiny = torch.finfo(torch.float32).tiny
    return float(torch.tensor([tiny / 4]) * torch.tensor([1.0])) == 0.0


def openmp_runtime():
    """The OpenMP runtime already loaded in this process (torch's intra-op threads: libgomp,
    libiomp5 or libomp) as a ctypes library with ``GOMP_parallel``, or None (no such runtime
    found: another platform, or torch built without OpenMP)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/lib" in line}
    except OSError:
        return None
    for path in sorted(p for p in paths if re.search(r"/lib(gomp|iomp5|omp)\b[^/]*\.so", p)):
        lib = ctypes.CDLL(path)
        if hasattr(lib, "GOMP_parallel"):
            return lib
    return None


def on_every_intra_op_thread(fn) -> dict:
    """Run ``fn()`` once on each of torch's intra-op threads, the calling thread included:
    ``{native thread id: fn()'s result}``.

    A team of ``torch.get_num_threads()`` is started on the OpenMP runtime's own entry point
    (``GOMP_parallel(fn, data, num_threads, flags)``, which libgomp and libiomp5 both export),
    so it runs on the very pool threads torch's parallel operations use.  Without an OpenMP
    runtime, only on the calling thread."""
    results, lock = {}, threading.Lock()

    def body(_data):
        result = fn()
        with lock:
            results[threading.get_native_id()] = result

    omp, threads = openmp_runtime(), torch.get_num_threads()
    if omp is None or threads == 1:
        body(None)
        return results
    callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(body)
    omp.GOMP_parallel(callback, None, ctypes.c_uint(threads), ctypes.c_uint(0))
    return results


@contextmanager
def flush_denormals():
    """Flush denormal floats to zero inside the block, on every thread that computes, then
    restore each thread's previous setting.

    Backpropagation through a long review is the vanishing gradient made literal: the gradient
    reaching the first tokens underflows below float32's smallest normal number (1.2e-38), and
    x86 CPUs compute on such denormal numbers many times slower.  Measured on the MPNet
    features (128 reviews of 511 tokens, 768 wide, one thread, untrained head): 14% of the
    input gradient's entries are denormal (median 5e-24), and the head's backward takes 86 s
    unflushed against 5 s flushed; the forward, 4 s, is unchanged.  Flushing changes only
    numbers below 1.2e-38 (2.2e-308 in float64), which round away against the weights.

    ``torch.set_flush_denormal`` sets the calling thread's CPU flags only, and the intra-op
    threads torch has already started keep theirs (with 2 threads, half of a large element-wise
    product stayed denormal), so the flag is set on each of them
    (:func:`on_every_intra_op_thread`).  Threads started later inherit it from the thread that
    starts them."""
    before = on_every_intra_op_thread(denormals_flushed)
    caller_before = denormals_flushed()
    on_every_intra_op_thread(lambda: torch.set_flush_denormal(True))
    try:
        yield
    finally:
        on_every_intra_op_thread(lambda: torch.set_flush_denormal(
            before.get(threading.get_native_id(), caller_before)))


@flush_denormals()
def fit(head: GRUHead, train: Split, valid: Split, out, *, epochs: int, batch_size: int = 128,
        seed: int = 3407, lr: float = 1e-3, device="cpu", state: dict | None = None,
        config: dict | None = None, progress: bool = False, log=print,
        ranks: Ranks = SINGLE, encoder_lr: float = unfreeze.DEFAULT_ENCODER_LR,
        micro_tokens: int = unfreeze.DEFAULT_MICRO_TOKENS, masks=None,
        save_every: int = 0) -> list[dict]:
    """Train for epochs ``1..epochs`` (or continue after ``state``, a :func:`checkpoint.load_state`
    dict).  After every epoch: the head's weights go to ``out/model.safetensors`` with ``config``
    and their checksum to ``out/config.json`` when the validation loss is the best so far, and
    the resume state to ``out/last.pt``.  Returns the history, one dict per epoch.

    ``ranks`` of a torchrun job: every rank calls this with the same arguments (``state`` too)
    and trains ``head`` in DistributedDataParallel (``batch_size`` is the global batch); rank
    0 writes the files and logs.  The resume state holds every rank's generator
    (``rng_ranks``) beside rank 0's (``rng``, which a one-process resume uses).

    A :class:`TopGRUHead` trains its encoder layers too: Adam with two parameter groups (the
    head at ``lr``, the layers at ``encoder_lr``), batches in micro-batches of
    ``micro_tokens`` padded tokens; ``masks``, an iterator of dropout masks for the training
    micro-batches (see :func:`run_epoch`), makes the run follow scratch's masks.

    ``save_every`` = n > 0 also saves the resume state after every n-th training batch, with
    ``partial`` = {"batches": done, "sums": [summed loss, correct, seen] over the ranks,
    "seconds": training time so far}: an epoch cut short (hours, for trained layers) goes on
    from there on resume, exactly -- the batches are drawn from ``seed + epoch``, the
    generator, weights and Adam's moments are those after batch ``done``.

    Denormal floats are flushed to zero while it runs (:func:`flush_denormals`)."""
    if isinstance(head, TopGRUHead):
        optimizer = torch.optim.Adam([
            {"params": [p for n, p in head.named_parameters() if not n.startswith("encoder.")],
             "lr": lr},
            {"params": list(head.encoder.parameters()), "lr": encoder_lr}], lr=lr)
    else:
        optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=lr)
    history, best, start, partial = [], math.inf, 1, None
    if state is not None:
        ckpt.load_head_state(head, state["model"], "resume state")
        optimizer.load_state_dict(state["optimizer"])
        history, best, start = list(state["history"]), state["best_valid_loss"], state["epoch"] + 1
        partial = state.get("partial")             # epoch `start` cut short after a batch
        torch.set_rng_state(resumed_rng(state, ranks, seed))
    model = ranks.wrap(head, device)

    def save(epoch: int, cut: dict | None = None) -> None:
        """The resume state after ``epoch`` whole epochs (and ``cut``: the next one's first
        batches)."""
        rngs = ranks.gather(torch.get_rng_state())
        if ranks.main:
            ckpt.save_state(out, {"model": ckpt.model_state(head),
                                  "optimizer": optimizer.state_dict(), "epoch": epoch,
                                  "history": history, "best_valid_loss": best,
                                  "rng": rngs[0], "config": config or {}}
                            | ({"rng_ranks": rngs} if ranks.size > 1 else {})
                            | ({"partial": cut} if cut else {}))

    def save_cut(epoch: int, t0: float, before: float, done: int, sums: tuple) -> None:
        """run_epoch's after_batch: every ``save_every``-th batch of ``epoch``, the state."""
        if not save_every or done % save_every:
            return
        loss, correct, seen = ranks.all_sum(sums)
        if not math.isfinite(loss):                 # diverged: fit raises at the epoch's end
            return
        save(epoch - 1, {"batches": done, "sums": [loss, int(correct), int(seen)],
                         "seconds": round(before + time.perf_counter() - t0, 2)})
        if ranks.main:
            log(f"epoch {epoch}: batch {done} saved (--resume goes on from it)")

    for epoch in range(start, epochs + 1):
        t0 = time.perf_counter()
        # an epoch resumed mid-way: its first batches, sums (rank 0 holds the ranks' total)
        # and training time are the saved ones
        done, sums, before = 0, (0.0, 0, 0), 0.0
        if partial and epoch == start:
            done, before = partial["batches"], partial["seconds"]
            if ranks.main:
                sums = (partial["sums"][0], int(partial["sums"][1]), int(partial["sums"][2]))
        after_batch = functools.partial(save_cut, epoch, t0, before)
        tl, ta = run_epoch(model, train, batch_size, optimizer, seed + epoch, device, progress,
                           f"epoch {epoch}/{epochs} train", ranks, micro_tokens, masks,
                           done, sums, after_batch)
        t1 = time.perf_counter()
        vl, va = run_epoch(head, valid, batch_size, None, 0, device, progress,
                           f"epoch {epoch}/{epochs} valid", ranks, micro_tokens)
        t2 = time.perf_counter()
        if not (math.isfinite(tl) and math.isfinite(vl)):
            raise FloatingPointError(f"epoch {epoch}: train loss {tl}, valid loss {vl}: training "
                                     "diverged (a smaller --lr?); nothing saved for this epoch")
        rec = {"epoch": epoch, "train_loss": tl, "train_acc": ta, "valid_loss": vl,
               "valid_acc": va, "train_seconds": round(before + t1 - t0, 2),
               "valid_seconds": round(t2 - t1, 2), "best": vl < best}
        if vl < best:
            best = vl
            if ranks.main:
                ckpt.save_weights(out, head, config)
        history.append(rec)
        save(epoch)
        if not ranks.main:
            continue
        log(f"epoch {epoch}: train loss {tl:.4f} acc {ta:.2%} | valid loss {vl:.4f} acc {va:.2%}"
            f" | {rec['train_seconds']:.0f} s + {t2 - t1:.0f} s"
            + ("  (best, saved)" if rec["best"] else ""))
    return history


def resumed_rng(state: dict, ranks: Ranks, seed: int) -> torch.Tensor:
    """The generator state this rank continues from: its own when the saved run had as many
    ranks, else rank 0's ``rng`` on rank 0 and a fresh stream (:func:`distributed.rank_seed`
    of ``seed`` and the epoch) on the others."""
    saved = state.get("rng_ranks")
    if saved is not None and len(saved) == ranks.size:
        return saved[ranks.rank]
    if ranks.main:
        return state["rng"]
    return torch.Generator().manual_seed(
        distributed.rank_seed(seed + state["epoch"], ranks.rank)).get_state()


# --- features, with the cache shared by other processes --------------------------------------

def features(encoder, texts, cache, max_length: int, device="cpu", desc="features",
             progress=True, ranks: Ranks = SINGLE, autocast=None, unfreeze_top: int = 0):
    """(FeatureStore of ``texts``, seconds spent waiting for another process writing the same
    cache entry, 0.0 when nobody was): :func:`reference.pipeline.features.extract_features`, which
    never runs two extractions of one entry side by side (the ranks of a torchrun job write
    one together)."""
    from .features import extract_features

    store = extract_features(encoder, texts, cache, max_length=max_length, device=device,
                             progress=progress, desc=desc, ranks=ranks, autocast=autocast,
                             unfreeze_top=unfreeze_top)
    return store, store.wait_seconds


def timed_features(run: Run, split: str):
    """:func:`features` of ``run``'s ``split`` reviews; records the seconds spent computing
    (waits excluded) and waiting, and the entry read, in ``run.metrics``."""
    a, t0 = run.args, time.perf_counter()
    store, waited = features(run.encoder, run.reviews[split].texts, a.cache, a.max_length,
                             run.device, split, run.progress, run.ranks, a.autocast,
                             a.unfreeze_top)
    run.metrics["feature_seconds"][split] = round(time.perf_counter() - t0 - waited, 1)
    run.metrics["feature_wait_seconds"][split] = round(waited, 1)
    run.metrics.setdefault("feature_entries", {})[split] = str(store.folder)
    return store


# --- command line ------------------------------------------------------------------------------

def build_parser(prog="python -m reference.pipeline.train") -> argparse.ArgumentParser:
    p = cli.Parser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    cli.add_feature_args(p)
    cli.add_dist_args(p)
    p.add_argument("--epochs", type=cli.positive(int), default=2)
    p.add_argument("--batch-size", type=cli.positive(int), default=128)
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--save-every", type=cli.positive(int), default=None, metavar="N",
                   help="also save the resume state every N training batches (default: after "
                        "each epoch only), so that --resume goes on from the middle of an epoch")
    p.add_argument("--hidden-dim", type=cli.positive(int), default=256)
    p.add_argument("--n-layers", type=cli.positive(int), default=2)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--lr", type=cli.positive(float), default=1e-3)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    unfreeze.add_args(p)
    return p


def check_args(p: argparse.ArgumentParser, a):
    """Every option, before anything is loaded (the encoder's config.json only): returns
    (device, encoder info)."""
    if not 0 <= a.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {a.dropout}")
    if a.limit_train is not None and a.limit_train < 10:
        p.error("--limit-train must be >= 10 (train and valid both need reviews), "
                f"got {a.limit_train}")
    device = cli.check_device(p, a.device)
    out = cli.check_folder(p, "--out", a.out)
    cli.check_folder(p, "--cache", a.cache)
    cli.check_autocast(p, a.autocast)
    if a.resume and distributed.from_env().main and not (out / ckpt.STATE).exists():
        p.error(f"--resume: {out / ckpt.STATE} does not exist (nothing to resume)")
    info = cli.check_encoder(p, a.encoder, a.max_length)
    unfreeze.check_args(p, a, info.num_layers, info.family.model_type, a.max_length)
    return device, info


RUN_KEYS = ("encoder", "max_length", "limit_train", "limit_test", "seed", "batch_size", "lr",
            "model")


@dataclass
class Run:
    """What one ``reference.pipeline.train`` command works with, once its inputs are checked."""
    args: argparse.Namespace
    device: str
    encoder: object
    reviews: dict                    # {"train": Reviews, "test": Reviews}
    config: dict                     # config.json: RUN_KEYS, encoder_source (+ the checksum)
    metrics: dict
    state: dict | None = None        # the resume state of --resume
    ranks: Ranks = SINGLE            # the torchrun job's processes

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    @property
    def out(self) -> Path:
        return Path(self.args.out)


def prepare(p: argparse.ArgumentParser, a, device: str, info, ranks: Ranks = SINGLE) -> Run:
    """Data, subsets, encoder weights, the run's config and (--resume) its saved state (read
    by rank 0, shared with the others: --out is rank 0's folder)."""
    path, data = cli.load_data(p, a.data, a)
    reviews = {split: cli.check_limit(p, f"--limit-{split}", data[split], limit, a.seed)
               for split, limit in (("train", a.limit_train), ("test", a.limit_test))}
    encoder = cli.load_encoder(p, info, device)
    model = {"emb_dim": encoder.hidden_size, "hidden_dim": a.hidden_dim, "output_dim": 1,
             "n_layers": a.n_layers, "bidirectional": True, "dropout": a.dropout}
    config = {"encoder": encoder.name, "encoder_source": encoder.source, "max_length": a.max_length,
              "limit_train": a.limit_train, "limit_test": a.limit_test, "seed": a.seed,
              "batch_size": a.batch_size, "lr": a.lr, "model": model,
              **unfreeze.config_entries(a)}
    if reviews["train"].label_names:              # a table's two label values, 0 then 1
        config["labels"] = list(reviews["train"].label_names)
    metrics = {"config": config, "device": device, "threads": torch.get_num_threads(),
               "processes": ranks.size, "torch": torch.__version__, "feature_seconds": {},
               "feature_wait_seconds": {}}
    run = Run(a, device, encoder, reviews, config, metrics, ranks=ranks)
    if ranks.main:
        print(f"data {path}: {len(reviews['train'])} train / {len(reviews['test'])} test "
              f"reviews; encoder {encoder.name} (hidden {encoder.hidden_size}); device {device}, "
              f"{torch.get_num_threads()} threads"
              + (f" x {ranks.size} processes" if ranks.size > 1 else ""), flush=True)
    if a.resume:
        run.state = ranks.share(resume_state(p, run) if ranks.main else None)
    return run


def resume_state(p: argparse.ArgumentParser, run: Run) -> dict:
    """The state saved in --out, refused when it was trained with other settings."""
    try:
        state = ckpt.load_state(run.out)
    except ckpt.CheckpointError as e:
        p.error(f"--resume: {cli.one_line(e)}")
    old = state.get("config", {})
    if why := unfreeze.resume_refusal(run.out, old, run.config, RUN_KEYS):
        p.error(f"--resume: {why}")
    if missing := {"model", "optimizer", "epoch", "history", "best_valid_loss", "rng"} - set(state):
        p.error(f"--resume: {run.out / ckpt.STATE} lacks {sorted(missing)}")
    try:
        ckpt.check_head_state(new_model(run), state["model"], str(run.out / ckpt.STATE))
    except ckpt.CheckpointError as e:
        p.error(f"--resume: {cli.one_line(e)}")
    cut = state.get("partial")
    print(f"resuming after epoch {state['epoch']}"
          + (f" and batch {cut['batches']} of epoch {state['epoch'] + 1}" if cut else "")
          + f" from {run.out / ckpt.STATE}", flush=True)
    return state


def new_model(run: Run, pretrained: bool = False) -> GRUHead:
    """The run's model, its head drawn from torch's generator: a :class:`GRUHead`, or with
    --unfreeze-top a :class:`TopGRUHead` (``pretrained``: its layers' weights the encoder's)."""
    k, model = run.args.unfreeze_top, run.config["model"]
    if not k:
        return GRUHead(**model)
    bert = run.encoder.model
    if pretrained:
        return TopGRUHead.from_bert(bert, k, **model)
    return TopGRUHead(bert.config, bert.config.num_hidden_layers - k, **model,
                      table=position_table(bert))


def train_head(p: argparse.ArgumentParser, run: Run) -> list[dict]:
    """Train features, the 70/30 split, the head's epochs (best weights saved): history."""
    a = run.args
    store = timed_features(run, "train")
    labels, n = run.reviews["train"].labels, len(run.reviews["train"])
    tr_idx, va_idx = train_valid_split(n, round(n * VALID_FRACTION), a.seed)
    train, valid = Split(store, tr_idx, labels[tr_idx]), Split(store, va_idx, labels[va_idx])
    waited = run.metrics["feature_wait_seconds"]["train"]
    if run.ranks.main:
        print(f"train {len(train)}, valid {len(valid)} reviews; train features "
              f"{run.metrics['feature_seconds']['train']:.0f} s ({store.folder})"
              + (f", after waiting {waited:.1f} s for another process" if waited else ""),
              flush=True)
    torch.manual_seed(a.seed)
    head = new_model(run, pretrained=True).to(run.device)
    if not run.ranks.main:                      # rank 0 goes on with the one-process stream
        torch.manual_seed(distributed.rank_seed(a.seed, run.ranks.rank))
    try:
        history = fit(head, train, valid, run.out, epochs=a.epochs, batch_size=a.batch_size,
                      seed=a.seed, lr=a.lr, device=run.device, state=run.state,
                      config=run.config, progress=run.progress,
                      log=lambda msg: print(msg, flush=True), ranks=run.ranks,
                      encoder_lr=a.encoder_lr, micro_tokens=a.micro_batch_tokens,
                      save_every=a.save_every or 0)
    except FloatingPointError as e:
        p.error(str(e))
    run.metrics.update(n_train=len(train), n_valid=len(valid), n_test=len(run.reviews["test"]),
                       epochs=history)
    if run.ranks.main:
        ckpt.write_json(run.out / ckpt.METRICS, run.metrics)
    return history


def evaluate_test(run: Run, history: list[dict]) -> None:
    """Test features, then the best checkpoint (loaded and verified) on them: metrics.json."""
    store = timed_features(run, "test")
    best = best_head(run)
    best_epoch = min(history, key=lambda r: r["valid_loss"])["epoch"]
    t0 = time.perf_counter()
    test = Split(store, np.arange(len(store)), run.reviews["test"].labels)
    loss, acc = run_epoch(best, test, run.args.batch_size, None, 0, run.device, run.progress,
                          "test", run.ranks, run.args.micro_batch_tokens)
    run.metrics.update(best_epoch=best_epoch, test_loss=loss, test_acc=acc,
                       test_seconds=round(time.perf_counter() - t0, 1))
    if run.ranks.main:
        print(f"test (best epoch {best_epoch}): loss {loss:.4f} acc {acc:.2%} "
              f"on {len(test)} reviews; metrics in {run.out / ckpt.METRICS}", flush=True)


def best_head(run: Run) -> GRUHead:
    """The best checkpoint's head (with its trained layers), loaded and verified by rank 0
    (--out is its folder) and sent to the other ranks."""
    def load() -> GRUHead:
        head, layers, config = ckpt.load_parts(run.out)
        if not layers:
            return head
        return ckpt.top_head(run.encoder.model, head, layers, config, run.out)

    if run.ranks.size == 1:
        return load().to(run.device).eval()
    head = load() if run.ranks.main else new_model(run)
    weights = run.ranks.share(ckpt.model_state(head) if run.ranks.main else None)
    ckpt.load_head_state(head, weights, "rank 0's best head")
    return head.to(run.device).eval()


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    p = build_parser()
    a = p.parse_args(argv)
    device, info = check_args(p, a)
    with distributed.session(p.prog, device, a.dist_timeout) as ranks:
        run = prepare(p, a, device, info, ranks)
        history = train_head(p, run)
        evaluate_test(run, history)
        run.metrics["total_seconds"] = round(time.perf_counter() - t_start, 1)
        if ranks.main:
            ckpt.write_json(run.out / ckpt.METRICS, run.metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main, "python -m reference.pipeline.train"))
