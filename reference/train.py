"""``python -m reference.train``: train the assignment's BiGRU head on cached frozen-encoder
features of IMDB, keep the best-validation checkpoint, report its test loss and accuracy.

    python -m reference.train --data PATH --encoder NAME --epochs 2 --batch-size 128 \\
        --max-length 512 --out DIR [--limit-train N --limit-test N] [--device auto|cpu|cuda] \\
        [--seed 3407] [--cache .cache/features] [--resume]

The assignment's recipe: Adam (default lr), ``BCEWithLogitsLoss``, 17,500/7,500 train/valid
split with seed 3407 (with ``--limit-train N``: a stratified N-review subset, split 70/30),
best validation loss checkpointed.  The encoder is frozen, so its token features are computed
once (:mod:`reference.features`) and every epoch runs only the GRU head, on length-bucketed
batches through the exact packed path of :mod:`reference.model`.

Loss and accuracy are means over examples: ``sum_i loss_i / N`` and ``#correct / N`` (a mean of
batch means would over-weight the last, short batch).  A review counts as positive when its
logit is > 0 (``round(sigmoid(z)) == 1``, as the assignment's ``binary_accuracy``).

Deterministic for a fixed seed on CPU: the head's init and dropout draw from ``torch``'s seeded
generator, epoch ``e`` shuffles its batches with seed ``seed + e``; ``--resume`` restores the
generator, so an interrupted run resumed gives the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .data import bucket_batches, stratified_subset, train_valid_split
from .model import GRUHead

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


def _bar(iterable, desc, progress):
    return tqdm(iterable, desc=desc, leave=False, disable=not progress, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def run_epoch(head: GRUHead, split: Split, batch_size: int, optimizer=None, seed: int = 0,
              device="cpu", progress: bool = False, desc: str = "") -> tuple[float, float]:
    """One pass over ``split``: trains when ``optimizer`` is given (shuffled buckets, dropout),
    else evaluates (length-sorted, no grad).  Returns (mean loss, accuracy) over examples."""
    train = optimizer is not None
    head.train(train)
    criterion = nn.BCEWithLogitsLoss(reduction="sum")
    batches = bucket_batches(split.store.lengths[split.idx], batch_size, shuffle=train, seed=seed)
    total, correct, seen = 0.0, 0, 0
    bar = _bar(batches, desc, progress)
    for b in bar:
        x, lengths = split.store.batch(split.idx[b])
        y = torch.as_tensor(split.labels[b], dtype=torch.float32, device=device)
        with torch.set_grad_enabled(train):
            logits = head(x.to(device), lengths).squeeze(1)
            loss = criterion(logits, y)
        if train:
            optimizer.zero_grad()
            (loss / len(b)).backward()            # the batch mean, as the assignment
            optimizer.step()
        total += float(loss.detach())
        correct += int(((logits > 0) == (y > 0.5)).sum())
        seen += len(b)
        if progress:
            bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{correct / seen:.4f}")
    return total / seen, correct / seen


def fit(head: GRUHead, train: Split, valid: Split, out, *, epochs: int, batch_size: int = 128,
        seed: int = 3407, lr: float = 1e-3, device="cpu", state: dict | None = None,
        config: dict | None = None, progress: bool = False, log=print) -> list[dict]:
    """Train for epochs ``1..epochs`` (or continue after ``state``, a :func:`checkpoint.load_state`
    dict).  After every epoch: the head's weights go to ``out/model.safetensors`` when the
    validation loss is the best so far, and the resume state to ``out/last.pt``.  Returns the
    history, one dict per epoch."""
    optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=lr)
    history, best, start = [], math.inf, 1
    if state is not None:
        ckpt.load_head_state(head, state["model"], "resume state")
        optimizer.load_state_dict(state["optimizer"])
        history, best, start = list(state["history"]), state["best_valid_loss"], state["epoch"] + 1
        torch.set_rng_state(state["rng"])
    for epoch in range(start, epochs + 1):
        t0 = time.perf_counter()
        tl, ta = run_epoch(head, train, batch_size, optimizer, seed + epoch, device, progress,
                           f"epoch {epoch}/{epochs} train")
        t1 = time.perf_counter()
        vl, va = run_epoch(head, valid, batch_size, None, 0, device, progress,
                           f"epoch {epoch}/{epochs} valid")
        t2 = time.perf_counter()
        rec = {"epoch": epoch, "train_loss": tl, "train_acc": ta, "valid_loss": vl,
               "valid_acc": va, "train_seconds": round(t1 - t0, 2),
               "valid_seconds": round(t2 - t1, 2), "best": vl < best}
        if vl < best:
            best = vl
            ckpt.save_weights(out, head)
        history.append(rec)
        ckpt.save_state(out, {"model": ckpt.head_state(head), "optimizer": optimizer.state_dict(),
                              "epoch": epoch, "history": history, "best_valid_loss": best,
                              "rng": torch.get_rng_state(), "config": config or {}})
        log(f"epoch {epoch}: train loss {tl:.4f} acc {ta:.2%} | valid loss {vl:.4f} acc {va:.2%}"
            f" | {t1 - t0:.0f} s + {t2 - t1:.0f} s{'  (best, saved)' if rec['best'] else ''}")
    return history


# --- features, with the cache shared by other processes --------------------------------------

def features(encoder, texts, cache, max_length: int, device="cpu", desc="features",
             progress=True):
    """(FeatureStore of ``texts``, seconds spent waiting for another process writing the same
    cache entry): :func:`reference.features.extract_features`, which never runs two
    extractions of one entry side by side."""
    from .features import extract_features

    store = extract_features(encoder, texts, cache, max_length=max_length, device=device,
                             progress=progress, desc=desc)
    return store, store.wait_seconds


# --- command line ------------------------------------------------------------------------------

def _positive(kind):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v
    return parse


def build_parser(prog="python -m reference.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--data", help="aclImdb directory or .tar.gz (default: $IMDB_PATH)")
    p.add_argument("--encoder", default="auto", help="auto | bert-base-uncased | minilm | FOLDER")
    p.add_argument("--epochs", type=_positive(int), default=2)
    p.add_argument("--batch-size", type=_positive(int), default=128)
    p.add_argument("--max-length", type=_positive(int), default=512,
                   help="tokens per review, [CLS] and [SEP] included (2..512)")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--limit-train", type=_positive(int), metavar="N",
                   help="stratified subset of N train reviews (split 70/30 into train/valid)")
    p.add_argument("--limit-test", type=_positive(int), metavar="N",
                   help="stratified subset of N test reviews")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--cache", default=".cache/features", help="feature cache root (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--hidden-dim", type=_positive(int), default=256)
    p.add_argument("--n-layers", type=_positive(int), default=2)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--lr", type=_positive(float), default=1e-3)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def check_args(p: argparse.ArgumentParser, a) -> None:
    if not 2 <= a.max_length <= 512:
        p.error(f"--max-length must be in 2..512 (BERT's positions), got {a.max_length}")
    if not 0 <= a.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {a.dropout}")
    if a.limit_train is not None and a.limit_train < 10:
        p.error(f"--limit-train must be >= 10 (train and valid both need reviews), got {a.limit_train}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out}: exists and is not a directory")
    if a.resume and not (out / ckpt.STATE).exists():
        p.error(f"--resume: {out / ckpt.STATE} does not exist (nothing to resume)")


def select(reviews, limit, seed):
    if limit is None:
        return reviews
    if limit > len(reviews):
        raise ValueError(f"limit {limit} is larger than the split ({len(reviews)} reviews)")
    return reviews.subset(stratified_subset(reviews.labels, limit, seed))


RUN_KEYS = ("encoder", "max_length", "limit_train", "limit_test", "seed", "batch_size", "lr",
            "model")


def main(argv=None) -> int:
    from .data import ImdbError, find_imdb, load_imdb
    from .encoders import EncoderError, load_encoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = build_parser()
    a = p.parse_args(argv)
    check_args(p, a)
    device = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
    progress = not a.no_progress
    out = Path(a.out)
    t_start = time.perf_counter()
    try:
        path = find_imdb(a.data)
        data = load_imdb(path)
        train_reviews = select(data["train"], a.limit_train, a.seed)
        test_reviews = select(data["test"], a.limit_test, a.seed)
        encoder = load_encoder(a.encoder, device)
    except (ImdbError, EncoderError, ValueError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"data {path}: {len(train_reviews)} train / {len(test_reviews)} test reviews; "
          f"encoder {encoder.name} (hidden {encoder.hidden_size}); device {device}, "
          f"{torch.get_num_threads()} threads", flush=True)

    model_args = {"emb_dim": encoder.hidden_size, "hidden_dim": a.hidden_dim, "output_dim": 1,
                  "n_layers": a.n_layers, "bidirectional": True, "dropout": a.dropout}
    config = {"encoder": encoder.name, "encoder_source": encoder.source, "max_length": a.max_length,
              "limit_train": a.limit_train, "limit_test": a.limit_test, "seed": a.seed,
              "batch_size": a.batch_size, "lr": a.lr, "model": model_args}
    state = None
    if a.resume:
        state = ckpt.load_state(out)
        old = state.get("config", {})
        diff = [k for k in RUN_KEYS if old.get(k) != config[k]]
        if diff:
            p.exit(2, f"{p.prog}: error: --resume: {out} was trained with different "
                      f"{', '.join(diff)} ({', '.join(f'{k}={old.get(k)!r}' for k in diff)})\n")
        print(f"resuming after epoch {state['epoch']} from {out / ckpt.STATE}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out / ckpt.CONFIG, config)

    t0 = time.perf_counter()
    train_store, waited = features(encoder, train_reviews.texts, a.cache, a.max_length, device,
                                   "train", progress)
    feature_seconds = {"train": round(time.perf_counter() - t0 - waited, 1)}
    wait_seconds = {"train": round(waited, 1)}
    n = len(train_reviews)
    tr_idx, va_idx = train_valid_split(n, round(n * VALID_FRACTION), a.seed)
    train = Split(train_store, tr_idx, train_reviews.labels[tr_idx])
    valid = Split(train_store, va_idx, train_reviews.labels[va_idx])
    print(f"train {len(train)}, valid {len(valid)} reviews; train features "
          f"{feature_seconds['train']:.0f} s ({train_store.folder})"
          + (f", after waiting {waited:.0f} s for another process" if waited else ""), flush=True)

    torch.manual_seed(a.seed)
    head = GRUHead(**model_args).to(device)
    metrics = {"config": config, "n_train": len(train), "n_valid": len(valid),
               "n_test": len(test_reviews), "device": device, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "feature_seconds": feature_seconds,
               "feature_wait_seconds": wait_seconds}

    def log(msg):
        print(msg, flush=True)

    history = fit(head, train, valid, out, epochs=a.epochs, batch_size=a.batch_size, seed=a.seed,
                  lr=a.lr, device=device, state=state, config=config, progress=progress, log=log)
    metrics["epochs"] = history
    ckpt.write_json(out / ckpt.METRICS, metrics)

    t0 = time.perf_counter()
    test_store, waited = features(encoder, test_reviews.texts, a.cache, a.max_length, device,
                                  "test", progress)
    feature_seconds["test"] = round(time.perf_counter() - t0 - waited, 1)
    wait_seconds["test"] = round(waited, 1)
    best, _ = ckpt.load_head(out, device)
    best_epoch = min(history, key=lambda r: r["valid_loss"])["epoch"]
    t0 = time.perf_counter()
    test_loss, test_acc = run_epoch(best, Split(test_store, np.arange(len(test_store)),
                                                test_reviews.labels),
                                    a.batch_size, None, 0, device, progress, "test")
    metrics.update(best_epoch=best_epoch, test_loss=test_loss, test_acc=test_acc,
                   test_seconds=round(time.perf_counter() - t0, 1),
                   total_seconds=round(time.perf_counter() - t_start, 1))
    ckpt.write_json(out / ckpt.METRICS, metrics)
    print(f"test (best epoch {best_epoch}): loss {test_loss:.4f} acc {test_acc:.2%} "
          f"on {len(test_reviews)} reviews; metrics in {out / ckpt.METRICS}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
