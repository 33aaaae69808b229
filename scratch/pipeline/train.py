"""``python -m scratch.pipeline.train``: the assignment's head trained from scratch, torch-free, on
the same cached features, split, batches and recipe as :mod:`reference.pipeline.train`.

    python -m scratch.pipeline.train --data PATH --encoder minilm --epochs 2 --batch-size 128 \\
        --max-length 512 --out DIR [--limit-train N --limit-test N] [--seed 3407] \\
        [--cache .cache/features] [--dtype float32|float64] [--resume]

The recipe, step for step the reference's: Adam (:class:`scratch.optim.Adam`, torch's
defaults), the mean BCE-with-logits of each batch, the 17,500/7,500 split with ``seed`` (a
stratified ``--limit-train`` subset split 70/30), epoch ``e`` shuffling its length buckets with
seed ``seed + e``, the best-validation-loss checkpoint (the reference's folder format:
``reference.pipeline.predict`` loads it), test loss and accuracy of that checkpoint in
``metrics.json``.
Loss and accuracy are means over examples.

Features: the entry that ``reference.pipeline.features`` wrote for these reviews, encoder and
length (found by :func:`scratch.pipeline.features.portable_key`: encoder files, max_length, token
ids); where there is none, the scratch encoder (:mod:`scratch.bert`, BERT or MPNet, float32)
computes them and writes an entry in the same format.  Initial weights and dropout masks come
from NumPy generators seeded with ``seed`` (not torch's), so a scratch run and a reference run of
the same seed start from different weights; the tests prove the two equal step for step from the
*same* weights.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..backend import to_numpy
from ..bert_folder import BertError
from ..functional import bce_with_logits
from ..optim import Adam
from ..sentiment import SentimentHead
from . import checkpoint as ckpt
from . import cli
from .atomic import write_json
from .data import bucket_batches, train_valid_split
from .encoder_names import Encoder, EncoderNameError
from .features import DamagedEntry, extract, find_entry, portable_key
from .tokenizer import pad_batch

VALID_FRACTION = 0.3      # 7,500 of 25,000, as the assignment


@dataclass
class Split:
    """Reviews ``idx`` of a feature store with their labels (``labels[j]`` is review
    ``idx[j]``'s)."""
    store: object
    idx: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.idx)


def _bar(iterable, desc, progress):
    return tqdm(iterable, desc=desc, leave=False, disable=not progress, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def run_epoch(head: SentimentHead, split: Split, batch_size: int, optimizer: Adam | None = None,
              seed: int = 0, progress: bool = False, desc: str = "") -> tuple[float, float]:
    """One pass over ``split``: trains when ``optimizer`` is given (shuffled buckets, dropout),
    else evaluates (length-sorted, nothing cached).  Returns (mean loss, accuracy) over examples."""
    train = optimizer is not None
    batches = bucket_batches(split.store.lengths[split.idx], batch_size, shuffle=train, seed=seed)
    total, correct, seen = 0.0, 0, 0
    bar = _bar(batches, desc, progress)
    for b in bar:
        x, lengths = split.store.batch(split.idx[b], dtype=head.dtype)   # (B, L, E), (B,)
        y = np.asarray(split.labels[b], dtype=head.dtype)                # (B,)
        if train:
            loss, grads, logits = head.loss_and_grads(x, lengths, y)
            optimizer.step(grads)
            total += loss * len(b)
        else:
            logits = head(x, lengths, training=False, cache=False)
            total += float(bce_with_logits(logits[:, 0], y).sum())
        if not math.isfinite(total):
            raise FloatingPointError(f"{desc}: the loss is not finite ({total}); lower --lr")
        correct += int(((logits[:, 0] > 0) == (y > 0.5)).sum())
        seen += len(b)
        if progress:
            bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{correct / seen:.4f}")
    return total / seen, correct / seen


def fit(head: SentimentHead, train: Split, valid: Split, out, *, epochs: int,
        batch_size: int = 128, seed: int = 3407, lr: float = 1e-3, state: dict | None = None,
        config: dict | None = None, progress: bool = False, log=print) -> list[dict]:
    """Train for epochs ``1..epochs`` (or continue after ``state``, a :func:`ckpt.load_state`
    dict).  After every epoch: the weights to ``out`` when the validation loss is the best so far
    (:func:`scratch.pipeline.checkpoint.save_weights`), the resume state to
    ``out/last.safetensors``."""
    optimizer = Adam(head.params, lr=lr)
    history, best, start = [], math.inf, 1
    if state is not None:
        head.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        head.set_rng_state(state["rng"])
        history, best, start = list(state["history"]), state["best_valid_loss"], state["epoch"] + 1
    for epoch in range(start, epochs + 1):
        t0 = time.perf_counter()
        tl, ta = run_epoch(head, train, batch_size, optimizer, seed + epoch, progress,
                           f"epoch {epoch}/{epochs} train")
        t1 = time.perf_counter()
        vl, va = run_epoch(head, valid, batch_size, None, 0, progress,
                           f"epoch {epoch}/{epochs} valid")
        t2 = time.perf_counter()
        rec = {"epoch": epoch, "train_loss": tl, "train_acc": ta, "valid_loss": vl,
               "valid_acc": va, "train_seconds": round(t1 - t0, 2),
               "valid_seconds": round(t2 - t1, 2), "best": vl < best}
        if vl < best:
            best = vl
            ckpt.save_weights(out, head, config)
        history.append(rec)
        ckpt.save_state(out, {"model": head.state_dict(), "optimizer": optimizer.state_dict(),
                              "epoch": epoch, "history": history, "best_valid_loss": best,
                              "rng": head.rng_state(), "config": config or {}})
        log(f"epoch {epoch}: train loss {tl:.4f} acc {ta:.2%} | valid loss {vl:.4f} acc {va:.2%}"
            f" | {t1 - t0:.0f} s + {t2 - t1:.0f} s{'  (best, saved)' if rec['best'] else ''}")
    return history


# --- features: the reference's cache entry, or computed here ------------------------------------

def features(encoder: Encoder, texts, cache, max_length: int, progress: bool = True,
             desc: str = "features", batch_tokens: int = 16_384, repair_command: str = ""):
    """The FeatureStore of ``texts``: the entry either pipeline wrote for these token ids, this
    encoder and ``max_length`` (:func:`scratch.pipeline.features.find_entry`), else one computed
    now by the scratch encoder (float32, stored float16) in the same format.  A damaged entry
    is never read: one this function wrote has its damaged shards recomputed (saying so), one
    the reference wrote is refused (:class:`DamagedEntry`) with ``repair_command``."""
    ids = encoder.tokenizer.encode(texts, max_length)
    key = portable_key(encoder.folder, max_length, ids)
    try:
        if (store := find_entry(cache, key)) is not None:
            return store
    except DamagedEntry as e:
        if e.folder.name != f"scratch-{key}":
            raise DamagedEntry(e.folder, f"{e.why}; written by reference.pipeline.features, "
                               f"which recomputes just the damaged shards: "
                               f"{repair_command or 'python -m reference.pipeline.features ...'}"
                               + _same_plan_options(e), e.shards, e.index) from None
    bert = encoder.load_bert("float32")

    def encode(batch):                     # one padded batch -> each review's (L_i, H) float16
        input_ids, mask = pad_batch(batch, encoder.tokenizer.pad_id)
        hidden = to_numpy(bert(input_ids, mask))                         # (B, T, H)
        return [hidden[b, :len(a)].astype(np.float16) for b, a in enumerate(batch)]

    meta = {"encoder": encoder.name, "source": encoder.folder, "max_length": max_length,
            "autocast_bf16": False, "hidden_size": encoder.hidden_size, "portable_key": key,
            "computed_by": "scratch.bert (float32)"}
    return extract(Path(cache) / f"scratch-{key}", ids, encode, key=key, meta=meta,
                   batch_tokens=batch_tokens, progress=progress, desc=desc)


def _same_plan_options(e: DamagedEntry) -> str:
    """The options that make reference.pipeline.features write entry ``e`` again (its autocast
    choice and shard size), so that it recomputes just the damaged shards."""
    extra = " --autocast bf16" if e.meta.get("autocast_bf16") else " --no-autocast"
    try:
        size = json.loads((e.folder / "plan.json").read_text())["shard_size"]
        return extra + ("" if size == 2048 else f" --shard-size {int(size)}")
    except (OSError, ValueError, KeyError, TypeError):
        return extra


# --- command line ---------------------------------------------------------------------------------

def build_parser(prog="python -m scratch.pipeline.train") -> argparse.ArgumentParser:
    p = cli.Parser(prog=prog, description="Train the assignment's BiGRU head from scratch "
                   "(NumPy, no torch) on cached frozen-encoder features of IMDB: "
                   "reference.pipeline.train's recipe, split, batches and checkpoint format.")
    p.add_argument("--data", help="aclImdb directory or .tar.gz, or a labelled table (.csv, "
                   ".tsv, .jsonl, .parquet; default: $IMDB_PATH)")
    p.add_argument("--encoder", default="auto", help="auto | minilm | mpnet | FOLDER (features "
                   "either pipeline cached, else computed by scratch.bert)")
    p.add_argument("--epochs", type=cli.positive(int), default=2)
    p.add_argument("--batch-size", type=cli.positive(int), default=128)
    p.add_argument("--max-length", type=int, default=512,
                   help="tokens per review, specials included (2..the encoder's positions, 512)")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--limit-train", type=cli.positive(int), metavar="N",
                   help="stratified subset of N train reviews (split 70/30 into train/valid)")
    p.add_argument("--limit-test", type=cli.positive(int), metavar="N",
                   help="stratified subset of N test reviews")
    p.add_argument("--seed", type=cli.non_negative(int), default=3407,
                   help="seed of the split, the subsets, the initial weights and the dropout")
    p.add_argument("--cache", default=".cache/features",
                   help="feature cache root (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="the head's arrays (features are stored float16 either way)")
    p.add_argument("--hidden-dim", type=cli.positive(int), default=256)
    p.add_argument("--n-layers", type=cli.positive(int), default=2)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--init", metavar="DIR", help="start from the head weights of this checkpoint "
                   "folder (e.g. a reference head's initial weights) instead of seeded ones")
    p.add_argument("--lr", type=cli.positive(float), default=1e-3)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    cli.add_table_args(p)
    return p


RUN_KEYS = ("encoder", "max_length", "limit_train", "limit_test", "seed", "batch_size", "lr",
            "model", "dtype", "init")


def check_args(p, a) -> Encoder:
    """Every option before anything slow is read (the encoder's config.json only)."""
    if not 0 <= a.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {a.dropout}")
    if a.limit_train is not None and a.limit_train < 10:
        p.error(f"--limit-train must be >= 10 (train and valid both need reviews), "
                f"got {a.limit_train}")
    out = cli.check_folder(p, "--out", a.out)
    cli.check_folder(p, "--cache", a.cache)
    if a.resume and not (out / ckpt.STATE).exists():
        p.error(f"--resume: {out / ckpt.STATE} does not exist (nothing to resume)")
    try:
        encoder = Encoder.inspect(a.encoder)
    except (EncoderNameError, OSError, ValueError, KeyError) as e:
        p.error(cli.one_line(e))
    if not 2 <= a.max_length <= encoder.max_length:
        p.error(f"--max-length must be in 2..{encoder.max_length} ({encoder.name}'s positions), "
                f"got {a.max_length}")
    return encoder


def main(argv=None) -> int:
    t_start = time.perf_counter()
    p = build_parser()
    a = p.parse_args(argv)
    encoder = check_args(p, a)
    init = None
    if a.init:                               # checked now, used once the features are there
        try:
            init, _ = ckpt.load_head(a.init, dtype=a.dtype, require_checksum=True)
        except ckpt.CheckpointError as e:
            p.error(f"--init: {cli.one_line(e)}")
        want = {"emb_dim": encoder.hidden_size, "hidden_dim": a.hidden_dim, "output_dim": 1,
                "n_layers": a.n_layers, "bidirectional": True}
        if diff := {k: v for k, v in want.items() if getattr(init, k) != v}:
            p.error(f"--init {a.init}: a head with {init.config()}, this run needs {diff}")
    path, data = cli.load_data(p, a.data, a)
    reviews = {split: cli.check_limit(p, f"--limit-{split}", data[split], limit, a.seed)
               for split, limit in (("train", a.limit_train), ("test", a.limit_test))}
    try:
        encoder.load_tokenizer()
    except BertError as e:
        p.error(cli.one_line(e))
    progress, out = not a.no_progress, Path(a.out)
    model = {"emb_dim": encoder.hidden_size, "hidden_dim": a.hidden_dim, "output_dim": 1,
             "n_layers": a.n_layers, "bidirectional": True, "dropout": a.dropout}
    config = {"encoder": encoder.name, "encoder_source": encoder.folder, "max_length": a.max_length,
              "limit_train": a.limit_train, "limit_test": a.limit_test, "seed": a.seed,
              "batch_size": a.batch_size, "lr": a.lr, "model": model, "dtype": a.dtype,
              "init": a.init, "trained_by": "scratch"}
    if reviews["train"].label_names:              # a table's two label values, 0 then 1
        config["labels"] = list(reviews["train"].label_names)
    state = None
    if a.resume:
        try:
            state = ckpt.load_state(out)
        except ckpt.CheckpointError as e:
            p.error(f"--resume: {cli.one_line(e)}")
        old = state.get("config", {})
        if diff := [k for k in RUN_KEYS if old.get(k) != config[k]]:
            p.error(f"--resume: {out} was trained with different {', '.join(diff)} "
                    f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)})")
        print(f"resuming after epoch {state['epoch']} from {out / ckpt.STATE}", flush=True)
    print(f"data {path}: {len(reviews['train'])} train / {len(reviews['test'])} test reviews; "
          f"encoder {encoder.name} (hidden {encoder.hidden_size}); scratch head, {a.dtype}",
          flush=True)
    metrics = {"config": config, "numpy": np.__version__, "feature_seconds": {}}

    repair = " ".join(["python -m reference.pipeline.features", "--data", str(path), "--encoder",
                       a.encoder, "--max-length", str(a.max_length), "--cache", a.cache,
                       *(["--limit-train", str(a.limit_train)] if a.limit_train else []),
                       *(["--limit-test", str(a.limit_test)] if a.limit_test else []),
                       "--seed", str(a.seed)])

    def timed_features(split):
        t0 = time.perf_counter()
        try:
            store = features(encoder, reviews[split].texts, a.cache, a.max_length, progress, split,
                             repair_command=repair)
        except (EncoderNameError, BertError) as e:
            p.error(cli.one_line(e))
        metrics["feature_seconds"][split] = round(time.perf_counter() - t0 - store.wait_seconds, 1)
        print(f"{split} features: {metrics['feature_seconds'][split]:.0f} s ({store.folder})",
              flush=True)
        return store

    store = timed_features("train")
    labels, n = reviews["train"].labels, len(reviews["train"])
    tr_idx, va_idx = train_valid_split(n, round(n * VALID_FRACTION), a.seed)
    train, valid = Split(store, tr_idx, labels[tr_idx]), Split(store, va_idx, labels[va_idx])
    head = SentimentHead(**model, dtype=a.dtype, seed=a.seed)
    if init is not None and state is None:
        head.load_state_dict(init.params)
    try:
        history = fit(head, train, valid, out, epochs=a.epochs, batch_size=a.batch_size,
                      seed=a.seed, lr=a.lr, state=state, config=config, progress=progress,
                      log=lambda msg: print(msg, flush=True))
    except FloatingPointError as e:
        p.error(str(e))
    metrics.update(n_train=len(train), n_valid=len(valid), n_test=len(reviews["test"]),
                   epochs=history)

    test_store = timed_features("test")
    best, _ = ckpt.load_head(out, dtype=a.dtype, require_checksum=True)
    best_epoch = min(history, key=lambda r: r["valid_loss"])["epoch"]
    t0 = time.perf_counter()
    test = Split(test_store, np.arange(len(test_store)), reviews["test"].labels)
    loss, acc = run_epoch(best, test, a.batch_size, None, 0, progress, "test")
    metrics.update(best_epoch=best_epoch, test_loss=loss, test_acc=acc,
                   test_seconds=round(time.perf_counter() - t0, 1),
                   total_seconds=round(time.perf_counter() - t_start, 1))
    write_json(out / ckpt.METRICS, metrics)
    print(f"test (best epoch {best_epoch}): loss {loss:.4f} acc {acc:.2%} on {len(test)} "
          f"reviews; metrics in {out / ckpt.METRICS}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, "python -m scratch.pipeline.train"))
