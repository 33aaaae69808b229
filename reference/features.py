"""Frozen-encoder token features, computed once and cached on disk.

The encoder is frozen, so its output for a review never changes: the assignment recomputed it
every epoch; here it is computed once, in length-sorted batches (almost no padding), under
``torch.inference_mode`` (bf16 autocast where the hardware has native bf16; ``autocast=False``
turns it off), and stored as float16:

    CACHE_ROOT/<key>/plan.json                     what the shards will hold (written first)
    CACHE_ROOT/<key>/shard_00000.safetensors ...   features (T, H) f16, lengths (k,), index (k,)
    CACHE_ROOT/<key>/index.json                    written last: the cache is complete

``key`` hashes the encoder (name, config, every weight), ``max_length``, the autocast choice
and the token ids of every text, so a stale cache is never used.  Each shard is written to a
temporary file and renamed, so a shard on disk is whole; an interrupted run resumes at the
first missing shard; without ``index.json`` a cache is never read as complete.  One writer per
entry at a time (an ``flock`` on ``<key>/.lock``): a second process asking for the same
features waits for the first and then reads its cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from scratch import features as scratch_features

from .atomic import atomic_write
from .data import tokenize
from .encoders import Encoder, bf16_supported

FORMAT = 1
log = logging.getLogger(__name__)
DEFAULT_ROOT = Path(".cache/features")


def encoder_fingerprint(encoder: Encoder) -> str:
    """sha256 over the encoder's name, config and every parameter's bytes."""
    h = hashlib.sha256(encoder.name.encode())
    h.update(encoder.model.config.to_json_string(use_diff=False).encode())
    for name, t in sorted(encoder.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(encoder: Encoder, ids: list[np.ndarray], max_length: int, autocast: bool) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, "encoder": encoder_fingerprint(encoder),
                                   "max_length": max_length, "autocast": autocast}).encode())
    for a in ids:
        h.update(len(a).to_bytes(4, "little"))
        h.update(a.astype(np.int32).tobytes())
    return h.hexdigest()[:24]


class FeatureStore(scratch_features.FeatureStore):
    """:class:`scratch.features.FeatureStore` whose batches are torch tensors."""

    def batch(self, indices, dtype=torch.float32):
        """Zero-padded ``x`` (B, L_max, H) and ``lengths`` (B,) int64 for reviews ``indices``."""
        x, lengths = super().batch(indices)
        return torch.from_numpy(x).to(dtype), torch.from_numpy(lengths)


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


def _encode(encoder: Encoder, ids: list[np.ndarray], autocast: bool, device) -> list[np.ndarray]:
    """Run the encoder on one padded batch; return each review's (L_i, H) float16 features."""
    lengths = [len(a) for a in ids]
    input_ids = torch.full((len(ids), max(lengths)), encoder.pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, a in enumerate(ids):
        input_ids[b, :len(a)] = torch.from_numpy(a.astype(np.int64))
        mask[b, :len(a)] = 1
    amp = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
           if autocast else contextlib.nullcontext())
    with torch.inference_mode(), amp:
        hidden = encoder.model(input_ids=input_ids.to(device), attention_mask=mask.to(device))[0]
    hidden = hidden.float().cpu().numpy()
    return [hidden[b, :n].astype(np.float16) for b, n in enumerate(lengths)]


def extract_features(encoder: Encoder, texts, cache_root=DEFAULT_ROOT, max_length: int = 512,
                     batch_tokens: int = 16_384, shard_size: int = 2_048,
                     autocast: bool | None = None, device: str = "cpu", progress: bool = True,
                     desc: str = "features") -> FeatureStore:
    """Token features of ``texts`` from the frozen encoder: from the cache if there, else
    computed (resuming a partial cache) and stored.  ``autocast=None``: bf16 if supported."""
    autocast = bf16_supported(device) if autocast is None else autocast
    ids = tokenize(encoder.tokenizer, texts, max_length)
    key = cache_key(encoder, ids, max_length, autocast)
    folder = Path(cache_root) / key
    if (folder / "index.json").exists():
        return FeatureStore(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with writer_lock(folder, desc) as waited:       # one writer per entry; others wait here
        if not (folder / "index.json").exists():     # (and find it complete afterwards)
            _extract(encoder, ids, folder, key, max_length, batch_tokens, shard_size, autocast,
                     device, progress, desc)
    store = FeatureStore(folder)
    store.wait_seconds = waited
    return store


@contextlib.contextmanager
def writer_lock(folder: Path, desc: str = "features"):
    """Exclusive ``flock`` on ``folder/.lock`` while an entry is written; yields the seconds
    spent waiting for another process (or thread) that held it.  The kernel drops the lock
    when its holder exits, so a killed run never leaves a stale lock behind."""
    import fcntl

    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    t0 = time.perf_counter()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is extracting %s; waiting for it", desc, folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.perf_counter() - t0
    finally:
        os.close(fd)


def _extract(encoder, ids, folder: Path, key: str, max_length: int, batch_tokens: int,
             shard_size: int, autocast: bool, device, progress: bool, desc: str) -> None:
    """Write the shards still missing, then ``index.json`` (caller holds the writer lock)."""
    lengths = np.array([len(a) for a in ids])
    order = np.argsort(lengths, kind="stable")
    shards = [order[i:i + shard_size] for i in range(0, len(order), shard_size)]
    plan = {"key": key, "shard_size": shard_size, "n": len(ids)}
    plan_file = folder / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != plan:
        for old in folder.glob("shard_*.safetensors"):   # a different plan: its shards don't fit
            old.unlink()
    atomic_write(plan_file, json.dumps(plan).encode())

    names = [f"shard_{s:05d}.safetensors" for s in range(len(shards))]
    todo = [s for s in range(len(shards)) if not (folder / names[s]).exists()]
    t0 = time.perf_counter()
    bar = tqdm(total=int(sum(lengths[shards[s]].sum() for s in todo)), unit="tok", unit_scale=True,
               desc=f"{desc} ({encoder.name}, {len(todo)}/{len(shards)} shards to go)",
               disable=not progress)
    for s in todo:
        feats = []
        members = shards[s]
        for start, stop in token_batches(lengths[members], batch_tokens):
            feats += _encode(encoder, [ids[i] for i in members[start:stop]], autocast, device)
            bar.update(int(lengths[members[start:stop]].sum()))
        tmp = folder / f".{names[s]}.tmp{os.getpid()}"
        save_file({"features": np.concatenate(feats), "lengths": lengths[members].astype(np.int64),
                   "index": members.astype(np.int64)}, str(tmp))
        os.replace(tmp, folder / names[s])
    bar.close()
    meta = {"key": key, "n": len(ids), "hidden_size": encoder.hidden_size, "encoder": encoder.name,
            "source": encoder.source, "max_length": max_length, "autocast_bf16": autocast,
            "dtype": "float16", "shards": names, "tokens": int(lengths.sum()),
            "seconds_this_run": round(time.perf_counter() - t0, 1)}
    atomic_write(folder / "index.json", json.dumps(meta, indent=1).encode())


def imdb_features(encoder: Encoder, data: dict, cache_root=DEFAULT_ROOT, **kw) -> dict:
    """``{split: FeatureStore}`` for each split of :func:`reference.data.load_imdb`'s result."""
    return {split: extract_features(encoder, reviews.texts, cache_root, desc=split, **kw)
            for split, reviews in data.items()}


def main(argv=None) -> int:
    import argparse
    import logging

    from .data import ImdbError, find_imdb, load_imdb, stratified_subset
    from .encoders import load_encoder

    p = argparse.ArgumentParser(
        prog="python -m reference.features",
        description="Compute (or find in the cache) the frozen encoder's token features of "
                    "every IMDB review.")
    p.add_argument("--data", help="aclImdb directory or .tar.gz (default: $IMDB_PATH)")
    p.add_argument("--encoder", default="auto", help="auto | bert-base-uncased | minilm | FOLDER")
    p.add_argument("--cache", default=str(DEFAULT_ROOT), help="cache root (default %(default)s)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=16_384, help="tokens per encoder batch")
    p.add_argument("--limit-train", type=int, help="stratified subset of the train split")
    p.add_argument("--limit-test", type=int, help="stratified subset of the test split")
    p.add_argument("--seed", type=int, default=3407, help="seed of the subsets")
    p.add_argument("--no-autocast", action="store_true", help="no bf16 autocast (float32)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        data = load_imdb(find_imdb(args.data))
    except ImdbError as e:
        p.exit(2, f"error: {e}\n")
    for split, limit in (("train", args.limit_train), ("test", args.limit_test)):
        if limit:
            data[split] = data[split].subset(stratified_subset(data[split].labels, limit, args.seed))
    encoder = load_encoder(args.encoder, args.device)
    t0 = time.perf_counter()
    stores = imdb_features(encoder, data, args.cache, max_length=args.max_length,
                           batch_tokens=args.batch_tokens, device=args.device,
                           autocast=False if args.no_autocast else None)
    for split, st in stores.items():
        size = sum(f.stat().st_size for f in st.folder.glob("shard_*.safetensors"))
        print(f"{split}: {len(st)} reviews, {int(st.lengths.sum())} tokens, "
              f"{size / 2**30:.2f} GiB at {st.folder}")
    print(f"total time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
