"""``python -m scratch.pipeline.train``: the assignment's head trained from scratch, torch-free, on
the same cached features, split, batches and recipe as :mod:`reference.pipeline.train`.

    python -m scratch.pipeline.train --data PATH --encoder minilm --epochs 2 --batch-size 128 \\
        --max-length 512 --out DIR [--limit-train N --limit-test N] [--seed 3407] \\
        [--cache .cache/features] [--dtype float32|float64] [--resume] [--save-every N] \\
        [--unfreeze-top K [--encoder-lr 2e-5] [--micro-batch-tokens 8192]]

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

``--unfreeze-top K`` (:mod:`scratch.pipeline.unfreeze`): the top K encoder layers train with
the head (:class:`scratch.top_layers.TopHead`), on cached hidden states entering layer ``L-K``;
Adam at ``--encoder-lr`` on the layers and ``--lr`` on the head (:class:`GroupedAdam`, torch's
one Adam with two parameter groups), each batch in micro-batches of at most
``--micro-batch-tokens`` padded tokens, gradients accumulated.  The checkpoint holds the
trained layers beside the head; the resume state their Adam moments and dropout generators.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..backend import to_numpy
from ..bert_folder import BertConfig, BertError, read_position_table
from ..functional import bce_with_logits
from ..optim import Adam
from ..sentiment import SentimentHead
from ..top_layers import TopHead, TopLayers
from . import checkpoint as ckpt
from . import cli, unfreeze
from .atomic import write_json
from .data import bucket_batches, train_valid_split
from .encoder_names import Encoder, EncoderNameError
from .features import DamagedEntry, extract, find_entry, portable_key, wait_for_writers
from .malloc import TRAINING_SLACK, give_back_freed_memory
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


def _bar(iterable, desc, progress, **kw):
    return tqdm(iterable, desc=desc, leave=False, disable=not progress, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0, **kw)


class GroupedAdam:
    """Adam on a :class:`TopHead`: the head's parameters at ``lr``, the trained encoder
    layers' at ``encoder_lr`` (torch: one ``Adam`` with two parameter groups, the same
    update per parameter)."""

    def __init__(self, model: TopHead, lr: float, encoder_lr: float):
        self.head = Adam(model.head.params, lr=lr)
        self.encoder = Adam(model.top.params, lr=encoder_lr)

    def step(self, grads: dict) -> None:
        for adam in (self.head, self.encoder):
            adam.step({n: grads[n] for n in adam.params})

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "encoder": self.encoder.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.head.load_state_dict(sd["head"])
        self.encoder.load_state_dict(sd["encoder"])


def top_batch(model: TopHead, split: Split, b: np.ndarray, y: np.ndarray,
              optimizer: GroupedAdam | None, micro_tokens: int):
    """One batch ``b`` (positions in ``split``) through the trained layers and the head, in
    micro-batches of at most ``micro_tokens`` padded tokens: trains (gradients summed over the
    pieces, then one Adam step) when ``optimizer`` is given, else evaluates.  Returns (the
    batch's summed loss, its logits (B, 1))."""
    pieces = unfreeze.micro_batches(split.store.lengths[split.idx[b]], micro_tokens)
    total, grads, logits = 0.0, None, []
    for piece in pieces:
        x, lengths = split.store.batch(split.idx[b[piece]], dtype=model.dtype)   # (b, T, H)
        if optimizer is not None:
            loss, g, z = model.loss_and_grads(x, lengths, y[piece], batch_size=len(b))
            total += loss * len(b)
            if grads is None:
                grads = g
            else:
                for n, gn in g.items():
                    grads[n] += gn
        else:
            z = model.forward(x, lengths, training=False, cache=False)
            total += float(bce_with_logits(z[:, 0], y[piece]).sum())
        logits.append(z)
    if optimizer is not None:
        optimizer.step(grads)
    return total, model.xp.concatenate(logits)


def run_epoch(head: SentimentHead | TopHead, split: Split, batch_size: int,
              optimizer: Adam | GroupedAdam | None = None, seed: int = 0,
              progress: bool = False, desc: str = "",
              micro_tokens: int = unfreeze.DEFAULT_MICRO_TOKENS, start: int = 0,
              sums: tuple = (0.0, 0, 0), after_batch=None) -> tuple[float, float]:
    """One pass over ``split``: trains when ``optimizer`` is given (shuffled buckets, dropout),
    else evaluates (length-sorted, nothing cached).  Returns (mean loss, accuracy) over examples.
    A :class:`TopHead` runs each batch in micro-batches (:func:`top_batch`).

    An epoch cut short goes on from its batch ``start`` with ``sums`` = (summed loss, correct,
    seen) of the batches before it (the same batches: the order is drawn from ``seed``);
    ``after_batch(done, sums)``, when given, is called after each batch (:func:`fit` saves
    there)."""
    train = optimizer is not None
    batches = bucket_batches(split.store.lengths[split.idx], batch_size, shuffle=train, seed=seed)
    total, correct, seen = sums
    bar = _bar(batches[start:], desc, progress, initial=start, total=len(batches))
    for done, b in enumerate(bar, start + 1):
        if isinstance(head, TopHead):
            y = np.asarray(split.labels[b], dtype=head.dtype)            # (B,)
            loss_sum, logits = top_batch(head, split, b, y, optimizer, micro_tokens)
            total += loss_sum
        else:
            total, logits, y = _head_batch(head, split, b, optimizer, total)
        if not math.isfinite(total):
            raise FloatingPointError(f"{desc}: the loss is not finite ({total}); lower --lr")
        correct += int(((logits[:, 0] > 0) == (y > 0.5)).sum())
        seen += len(b)
        give_back_freed_memory(above=TRAINING_SLACK)       # batches of every length fragment
        if progress:
            bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{correct / seen:.4f}")
        if after_batch is not None:
            after_batch(done, (total, correct, seen))
    return total / seen, correct / seen


def _head_batch(head: SentimentHead, split: Split, b, optimizer, total: float):
    """The frozen recipe's batch: (running loss sum, logits, labels)."""
    x, lengths = split.store.batch(split.idx[b], dtype=head.dtype)       # (B, L, E), (B,)
    y = np.asarray(split.labels[b], dtype=head.dtype)                    # (B,)
    if optimizer is not None:
        loss, grads, logits = head.loss_and_grads(x, lengths, y)
        optimizer.step(grads)
        total += loss * len(b)
    else:
        logits = head(x, lengths, training=False, cache=False)
        total += float(bce_with_logits(logits[:, 0], y).sum())
    return total, logits, y


def fit(head: SentimentHead | TopHead, train: Split, valid: Split, out, *, epochs: int,
        batch_size: int = 128, seed: int = 3407, lr: float = 1e-3, state: dict | None = None,
        config: dict | None = None, progress: bool = False, log=print,
        encoder_lr: float = unfreeze.DEFAULT_ENCODER_LR,
        micro_tokens: int = unfreeze.DEFAULT_MICRO_TOKENS, save_every: int = 0) -> list[dict]:
    """Train for epochs ``1..epochs`` (or continue after ``state``, a :func:`ckpt.load_state`
    dict).  After every epoch: the weights to ``out`` when the validation loss is the best so far
    (:func:`scratch.pipeline.checkpoint.save_weights`), the resume state to
    ``out/last.safetensors``.  A :class:`TopHead` trains its layers at ``encoder_lr``
    (:class:`GroupedAdam`) in micro-batches of ``micro_tokens`` padded tokens.

    ``save_every`` = n > 0 also saves the resume state after every n-th training batch, with
    ``partial`` = {"batches": done, "sums": [summed loss, correct, seen], "seconds": training
    time so far}: an epoch cut short goes on from there on resume, exactly (the batches are
    drawn from ``seed + epoch``; the generator, weights and Adam's moments are those after
    batch ``done``)."""
    top = isinstance(head, TopHead)
    optimizer = GroupedAdam(head, lr, encoder_lr) if top else Adam(head.params, lr=lr)
    history, best, start, partial = [], math.inf, 1, None
    if state is not None:
        head.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        head.set_rng_state(state["rng"])
        history, best, start = list(state["history"]), state["best_valid_loss"], state["epoch"] + 1
        partial = state.get("partial")             # epoch `start` cut short after a batch

    def save(epoch: int, cut: dict | None = None) -> None:
        """The resume state after ``epoch`` whole epochs (and ``cut``: the next one's first
        batches)."""
        ckpt.save_state(out, {"model": head.state_dict(), "optimizer": optimizer.state_dict(),
                              "epoch": epoch, "history": history, "best_valid_loss": best,
                              "rng": head.rng_state(), "config": config or {}}
                        | ({"partial": cut} if cut else {}))

    def save_cut(epoch: int, t0: float, before: float, done: int, sums: tuple) -> None:
        """run_epoch's after_batch: every ``save_every``-th batch of ``epoch``, the state."""
        if save_every and done % save_every == 0:
            save(epoch - 1, {"batches": done, "sums": [float(sums[0]), sums[1], sums[2]],
                             "seconds": round(before + time.perf_counter() - t0, 2)})
            log(f"epoch {epoch}: batch {done} saved (--resume goes on from it)")

    for epoch in range(start, epochs + 1):
        t0 = time.perf_counter()
        done, sums, before = 0, (0.0, 0, 0), 0.0   # an epoch resumed mid-way: the saved ones
        if partial and epoch == start:
            done, sums, before = partial["batches"], tuple(partial["sums"]), partial["seconds"]
        train_loss, train_acc = run_epoch(head, train, batch_size, optimizer, seed + epoch,
                                          progress, f"epoch {epoch}/{epochs} train",
                                          micro_tokens, done, sums,
                                          functools.partial(save_cut, epoch, t0, before))
        t1 = time.perf_counter()
        valid_loss, valid_acc = run_epoch(head, valid, batch_size, None, 0, progress,
                                          f"epoch {epoch}/{epochs} valid", micro_tokens)
        t2 = time.perf_counter()
        rec = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
               "valid_loss": valid_loss, "valid_acc": valid_acc,
               "train_seconds": round(before + t1 - t0, 2), "valid_seconds": round(t2 - t1, 2),
               "best": valid_loss < best}
        if valid_loss < best:
            best = valid_loss
            ckpt.save_weights(out, head, config)
        history.append(rec)
        save(epoch)
        log(f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.2%} | valid loss "
            f"{valid_loss:.4f} acc {valid_acc:.2%} | {rec['train_seconds']:.0f} s + "
            f"{t2 - t1:.0f} s"
            f"{'  (best, saved)' if rec['best'] else ''}")
    return history


# --- features: the reference's cache entry, or computed here ------------------------------------

def features(encoder: Encoder, texts, cache, max_length: int, progress: bool = True,
             desc: str = "features", batch_tokens: int = 16_384, repair_command: str = "",
             unfreeze_top: int = 0):
    """The FeatureStore of ``texts``: the entry either pipeline wrote for these token ids, this
    encoder and ``max_length`` (:func:`scratch.pipeline.features.find_entry`; one that another
    process is still writing is waited for: :func:`scratch.pipeline.features.wait_for_writers`),
    else one computed now by the scratch encoder (float32, stored float16) in the same format.
    A damaged entry is never read: one this function wrote has its damaged shards recomputed
    (saying so), one the reference wrote is refused (:class:`DamagedEntry`) with
    ``repair_command``.
    ``unfreeze_top`` K > 0: the hidden states entering layer ``L-K`` instead of the last ones
    (their own entry; one whose ``index.json`` says another K is refused:
    :class:`scratch.pipeline.unfreeze.EntryMismatch`)."""
    ids = encoder.tokenizer.encode(texts, max_length)
    key = portable_key(encoder.folder, max_length, ids, unfreeze_top)
    try:
        store = find_entry(cache, key)
        if store is None and (waited := wait_for_writers(cache, key, desc)):
            if (store := find_entry(cache, key)) is not None:    # another process's, finished
                store.wait_seconds = waited
        if store is not None:
            unfreeze.check_entry(store.meta, unfreeze_top, encoder.num_layers, store.folder)
            return store
    except DamagedEntry as e:
        if e.folder.name != f"scratch-{key}":
            raise DamagedEntry(e.folder, f"{e.why}; written by reference.pipeline.features, "
                               f"which recomputes just the damaged shards: "
                               f"{repair_command or 'python -m reference.pipeline.features ...'}"
                               + _same_plan_options(e), e.shards, e.index) from None
    bert = encoder.load_bert("float32")
    upto = len(bert.layers) - unfreeze_top

    def encode(batch):                     # one padded batch -> each review's (L_i, H) float16
        input_ids, mask = pad_batch(batch, encoder.tokenizer.pad_id)
        hidden = to_numpy(bert(input_ids, mask, upto=upto))              # (B, T, H)
        return [hidden[b, :len(a)].astype(np.float16) for b, a in enumerate(batch)]

    meta = {"encoder": encoder.name, "source": encoder.folder, "max_length": max_length,
            "autocast_bf16": False, "hidden_size": encoder.hidden_size, "portable_key": key,
            "computed_by": "scratch.bert (float32)",
            **unfreeze.entry_meta(unfreeze_top, len(bert.layers))}
    store = extract(Path(cache) / f"scratch-{key}", ids, encode, key=key, meta=meta,
                    batch_tokens=batch_tokens, progress=progress, desc=desc)
    unfreeze.check_entry(store.meta, unfreeze_top, len(bert.layers), store.folder)
    return store


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
    p.add_argument("--save-every", type=cli.positive(int), default=None, metavar="N",
                   help="also save the resume state every N training batches (default: after "
                        "each epoch only), so that --resume goes on from the middle of an epoch")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="the head's arrays (features are stored float16 either way)")
    p.add_argument("--hidden-dim", type=cli.positive(int), default=256)
    p.add_argument("--n-layers", type=cli.positive(int), default=2)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--init", metavar="DIR", help="start from the head weights of this checkpoint "
                   "folder (e.g. a reference head's initial weights) instead of seeded ones")
    p.add_argument("--lr", type=cli.positive(float), default=1e-3)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    unfreeze.add_args(p)
    cli.add_table_args(p)
    return p


RUN_KEYS = ("encoder", "max_length", "limit_train", "limit_test", "seed", "batch_size", "lr",
            "model", "dtype", "init")


def check_args(parser, args) -> Encoder:
    """Every option before anything slow is read (the encoder's config.json only)."""
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.limit_train is not None and args.limit_train < 10:
        parser.error(f"--limit-train must be >= 10 (train and valid both need reviews), "
                     f"got {args.limit_train}")
    out = cli.check_folder(parser, "--out", args.out)
    cli.check_folder(parser, "--cache", args.cache)
    if args.resume and not (out / ckpt.STATE).exists():
        parser.error(f"--resume: {out / ckpt.STATE} does not exist (nothing to resume)")
    try:
        encoder = Encoder.inspect(args.encoder)
    except (EncoderNameError, OSError, ValueError, KeyError) as e:
        parser.error(cli.one_line(e))
    if not 2 <= args.max_length <= encoder.max_length:
        parser.error(f"--max-length must be in 2..{encoder.max_length} ({encoder.name}'s "
                     f"positions), got {args.max_length}")
    unfreeze.check_args(parser, args, encoder.num_layers, encoder.model_type, args.max_length)
    return encoder


def check_init(parser, args, encoder: Encoder) -> tuple[SentimentHead, dict] | None:
    """The head (and trained layers, if it has them) of ``--init``: read and verified now,
    used once the features are there.  Layers must be the ones this run trains."""
    if not args.init:
        return None
    try:
        init, layers, _ = ckpt.load_checkpoint(args.init, dtype=args.dtype, require_checksum=True)
    except ckpt.CheckpointError as e:
        parser.error(f"--init: {cli.one_line(e)}")
    want = {"emb_dim": encoder.hidden_size, "hidden_dim": args.hidden_dim, "output_dim": 1,
            "n_layers": args.n_layers, "bidirectional": True}
    if diff := {k: v for k, v in want.items() if getattr(init, k) != v}:
        parser.error(f"--init {args.init}: a head with {init.config()}, this run needs {diff}")
    trained = list(range(encoder.num_layers - args.unfreeze_top, encoder.num_layers))
    if layers and sorted(layers) != trained:
        parser.error(f"--init {args.init}: holds trained encoder layers {sorted(layers)}, this "
                     f"run trains {trained or 'none (--unfreeze-top 0)'}")
    return init, layers


@dataclass
class Run:
    """What one ``scratch.pipeline.train`` command works with, once its inputs are checked."""
    args: argparse.Namespace
    encoder: Encoder
    data_path: Path
    reviews: dict                    # {"train": Reviews, "test": Reviews}
    config: dict                     # config.json: RUN_KEYS, encoder_source, ... (+ checksum)
    metrics: dict
    init: tuple | None = None        # --init's (head, trained layers)
    state: dict | None = None        # the resume state of --resume

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    @property
    def out(self) -> Path:
        return Path(self.args.out)


def prepare(parser, args, encoder: Encoder, init: tuple | None = None) -> Run:
    """Data, subsets, the tokenizer, the run's config and (--resume) its saved state."""
    path, data = cli.load_data(parser, args.data, args)
    reviews = {split: cli.check_limit(parser, f"--limit-{split}", data[split], limit, args.seed)
               for split, limit in (("train", args.limit_train), ("test", args.limit_test))}
    try:
        encoder.load_tokenizer()
    except BertError as e:
        parser.error(cli.one_line(e))
    model = {"emb_dim": encoder.hidden_size, "hidden_dim": args.hidden_dim, "output_dim": 1,
             "n_layers": args.n_layers, "bidirectional": True, "dropout": args.dropout}
    config = {"encoder": encoder.name, "encoder_source": encoder.folder,
              "max_length": args.max_length, "limit_train": args.limit_train,
              "limit_test": args.limit_test, "seed": args.seed, "batch_size": args.batch_size,
              "lr": args.lr, "model": model, "dtype": args.dtype, "init": args.init,
              "trained_by": "scratch", **unfreeze.config_entries(args)}
    if reviews["train"].label_names:              # a table's two label values, 0 then 1
        config["labels"] = list(reviews["train"].label_names)
    metrics = {"config": config, "numpy": np.__version__, "feature_seconds": {}}
    run = Run(args, encoder, path, reviews, config, metrics, init)
    if args.resume:
        run.state = resume_state(parser, run)
    print(f"data {path}: {len(reviews['train'])} train / {len(reviews['test'])} test reviews; "
          f"encoder {encoder.name} (hidden {encoder.hidden_size}); scratch head, {args.dtype}",
          flush=True)
    return run


def resume_state(parser, run: Run) -> dict:
    """The state saved in --out, refused when it was trained with other settings."""
    try:
        state = ckpt.load_state(run.out)
    except ckpt.CheckpointError as e:
        parser.error(f"--resume: {cli.one_line(e)}")
    old = state.get("config", {})
    if why := unfreeze.resume_refusal(run.out, old, run.config, RUN_KEYS):
        parser.error(f"--resume: {why}")
    cut = state.get("partial")
    print(f"resuming after epoch {state['epoch']}"
          + (f" and batch {cut['batches']} of epoch {state['epoch'] + 1}" if cut else "")
          + f" from {run.out / ckpt.STATE}", flush=True)
    return state


def repair_command(run: Run) -> str:
    """The reference command that recomputes the damaged shards of a reference entry."""
    a = run.args
    return " ".join(["python -m reference.pipeline.features", "--data", str(run.data_path),
                     "--encoder", a.encoder, "--max-length", str(a.max_length), "--cache", a.cache,
                     *(["--limit-train", str(a.limit_train)] if a.limit_train else []),
                     *(["--limit-test", str(a.limit_test)] if a.limit_test else []),
                     "--seed", str(a.seed)])


def timed_features(parser, run: Run, split: str):
    """:func:`features` of ``run``'s ``split`` reviews; the seconds spent computing (waits
    excluded) go to ``run.metrics``."""
    a, t0 = run.args, time.perf_counter()
    try:
        store = features(run.encoder, run.reviews[split].texts, a.cache, a.max_length,
                         run.progress, split, repair_command=repair_command(run),
                         unfreeze_top=a.unfreeze_top)
    except (EncoderNameError, BertError) as e:
        parser.error(cli.one_line(e))
    seconds = run.metrics["feature_seconds"][split] = round(
        time.perf_counter() - t0 - store.wait_seconds, 1)
    print(f"{split} features: {seconds:.0f} s ({store.folder})", flush=True)
    return store


def train_head(parser, run: Run) -> list[dict]:
    """Train features, the 70/30 split, the head's epochs (best weights saved): history."""
    a = run.args
    store = timed_features(parser, run, "train")
    labels, n = run.reviews["train"].labels, len(run.reviews["train"])
    tr_idx, va_idx = train_valid_split(n, round(n * VALID_FRACTION), a.seed)
    train, valid = Split(store, tr_idx, labels[tr_idx]), Split(store, va_idx, labels[va_idx])
    head = SentimentHead(**run.config["model"], dtype=a.dtype, seed=a.seed)
    if a.unfreeze_top:
        bert = run.encoder.load_bert(a.dtype)
        head = TopHead(TopLayers.from_encoder(bert, a.unfreeze_top, a.dtype, a.seed), head)
        del bert
    if run.init is not None and run.state is None:        # the layers: --init's if it has
        init, layers = run.init                            # them, else the encoder's
        (head.head if a.unfreeze_top else head).load_state_dict(init.params)
        if layers:
            head.top.load_state_dict({f"encoder.layer.{i}.{n}": t for i, sd in layers.items()
                                      for n, t in sd.items()})
    try:
        history = fit(head, train, valid, run.out, epochs=a.epochs, batch_size=a.batch_size,
                      seed=a.seed, lr=a.lr, state=run.state, config=run.config,
                      progress=run.progress, log=lambda msg: print(msg, flush=True),
                      encoder_lr=a.encoder_lr, micro_tokens=a.micro_batch_tokens,
                      save_every=a.save_every or 0)
    except FloatingPointError as e:
        parser.error(str(e))
    run.metrics.update(n_train=len(train), n_valid=len(valid), n_test=len(run.reviews["test"]),
                       epochs=history)
    return history


def evaluate_test(parser, run: Run, history: list[dict]) -> None:
    """Test features, then the best checkpoint (loaded and verified) on them: metrics."""
    a = run.args
    store = timed_features(parser, run, "test")
    best = best_model(run)
    best_epoch = min(history, key=lambda r: r["valid_loss"])["epoch"]
    t0 = time.perf_counter()
    test = Split(store, np.arange(len(store)), run.reviews["test"].labels)
    loss, acc = run_epoch(best, test, a.batch_size, None, 0, run.progress, "test",
                          a.micro_batch_tokens)
    run.metrics.update(best_epoch=best_epoch, test_loss=loss, test_acc=acc,
                       test_seconds=round(time.perf_counter() - t0, 1))
    print(f"test (best epoch {best_epoch}): loss {loss:.4f} acc {acc:.2%} on {len(test)} "
          f"reviews; metrics in {run.out / ckpt.METRICS}", flush=True)


def best_model(run: Run) -> SentimentHead | TopHead:
    """The best checkpoint's head (with its trained layers), loaded and verified."""
    head, layers, _ = ckpt.load_checkpoint(run.out, dtype=run.args.dtype, require_checksum=True)
    if not layers:
        return head
    config = BertConfig.from_folder(run.encoder.folder)
    table = read_position_table(run.encoder.folder, config)          # MPNet's; BERT: None
    return TopHead(TopLayers.from_state(layers, config, run.args.dtype,
                                        position_table=table), head)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    encoder = check_args(parser, args)
    init = check_init(parser, args, encoder)
    run = prepare(parser, args, encoder, init)
    history = train_head(parser, run)
    evaluate_test(parser, run, history)
    run.metrics["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(run.out / ckpt.METRICS, run.metrics)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, "python -m scratch.pipeline.train"))
