"""Frozen-encoder token features, computed once and cached on disk.

The encoder is frozen, so its output for a review never changes: the assignment recomputed it
every epoch; here it is computed once, in length-sorted batches (almost no padding), under
``torch.inference_mode`` (bf16 autocast where :mod:`reference.pipeline.autocast` finds it
faster; ``autocast=False`` turns it off), and stored as float16:

    CACHE_ROOT/<key>/plan.json                     what the shards will hold (written first)
    CACHE_ROOT/<key>/shard_00000.safetensors ...   features (T, H) f16, lengths (k,), index (k,)
    CACHE_ROOT/<key>/index.json                    written last: the cache is complete

``key`` hashes the encoder (name, config, every weight), ``max_length``, the autocast choice
and the token ids of every text, so a stale cache is never used.  ``unfreeze_top=K > 0``
(``reference.pipeline.train --unfreeze-top K``): the hidden states entering layer ``L-K``
instead of the last ones, in entries of their own (``K`` in the keys; ``K = 0`` keys are those
of before; :mod:`scratch.pipeline.unfreeze`).  Where the entry for a larger K' of the same
reviews is complete and none for K is begun, the K entry is computed from it, running only the
layers ``L-K' .. L-K-1`` (:func:`deeper_entry`: with K = 2 cached, K = 1 costs one layer per
token instead of 11), keyed apart and saying so in ``index.json`` (``computed_from``): its
values differ from a direct extraction by the deeper entry's float16 rounding carried through
those layers (a float16 step or two: ``bench/unfreeze_derived_entry.py``).  Each shard is
written to a temporary file and renamed, so a shard on disk is whole; an interrupted run
resumes at the first missing shard (saying "resuming: 3 of 6 shards done"); without
``index.json`` a cache is never read as complete.  One writer per entry at a time (an
``flock`` on ``<key>/.lock``): a second process asking for the same features waits for the
first and then reads its cache.

Under ``torchrun --nproc-per-node N -m reference.pipeline.features ...`` the N ranks split the
shards of each entry (:func:`scratch.pipeline.ranks.extract_together`): the same cache, tensor
for tensor; rank 0 holds the entry's lock for the whole job, so the rule becomes one job (or one
process) per entry.  Each rank runs the encoder on ``OMP_NUM_THREADS`` threads (torchrun sets 1).

What a failed run leaves behind (only entries with a finished shard survive, to resume): see
:mod:`scratch.pipeline.features`, which writes the entries for both pipelines.
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

from scratch.pipeline import features as scratch_features
from scratch.pipeline import ranks as scratch_ranks
from scratch.pipeline import unfreeze
from scratch.pipeline.atomic import atomic_write
from scratch.pipeline.features import token_batches, writer_lock  # noqa: F401  (re-exported)

from . import distributed
from .autocast import choose_autocast, say
from .data import tokenize
from .encoders import Encoder

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


def cache_key(encoder: Encoder, ids: list[np.ndarray], max_length: int, autocast: bool,
              unfreeze_top: int = 0, from_top: int = 0, fingerprint: str | None = None) -> str:
    """The entry's name.  ``from_top`` K' > K: the entry computed from the one for
    ``--unfreeze-top K'`` (:func:`deeper_entry`), a key of its own.  ``fingerprint``: the
    encoder's, if already computed (:func:`encoder_fingerprint` reads every weight)."""
    fields = {"format": FORMAT, "encoder": fingerprint or encoder_fingerprint(encoder),
              "max_length": max_length, "autocast": autocast}
    if unfreeze_top:
        fields["unfreeze_top"] = unfreeze_top
    if from_top:
        fields["from_top"] = from_top
    h = hashlib.sha256(json.dumps(fields).encode())
    for a in ids:
        h.update(len(a).to_bytes(4, "little"))
        h.update(scratch_features.int32_ids(a).tobytes())
    return h.hexdigest()[:24]


class FeatureStore(scratch_features.FeatureStore):
    """:class:`scratch.pipeline.features.FeatureStore` whose batches are torch tensors."""

    def batch(self, indices, dtype=torch.float32):
        """Zero-padded ``x`` (B, L_max, H) and ``lengths`` (B,) int64 for reviews ``indices``."""
        x, lengths = super().batch(indices)
        return torch.from_numpy(x).to(dtype), torch.from_numpy(lengths)


@contextlib.contextmanager
def bottom_layers(model, upto: int | None):
    """Within: ``model`` (a transformers encoder) runs its layers ``0 .. upto-1`` only, so its
    output is the hidden states entering layer ``upto`` (None: every layer)."""
    layers = model.encoder.layer
    if upto is None or upto == len(layers):
        yield model
        return
    model.encoder.layer = torch.nn.ModuleList(list(layers)[:upto])
    try:
        yield model
    finally:
        model.encoder.layer = layers


def _encode(encoder: Encoder, ids: list[np.ndarray], autocast: bool, device,
            upto: int | None = None) -> list[np.ndarray]:
    """Run the encoder (its layers below ``upto``) on one padded batch; return each review's
    (L_i, H) float16 features."""
    lengths = [len(a) for a in ids]
    input_ids = torch.full((len(ids), max(lengths)), encoder.pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, a in enumerate(ids):
        input_ids[b, :len(a)] = torch.from_numpy(a.astype(np.int64))
        mask[b, :len(a)] = 1
    with torch.inference_mode(), _amp(autocast, device), \
            bottom_layers(encoder.model, upto) as model:
        hidden = model(input_ids=input_ids.to(device), attention_mask=mask.to(device))[0]
    return _per_review(hidden, lengths)


def _amp(autocast: bool, device):
    """bf16 autocast on ``device``'s type, or nothing."""
    return (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
            if autocast else contextlib.nullcontext())


def _per_review(hidden: torch.Tensor, lengths) -> list[np.ndarray]:
    """A padded batch's (B, T, H) output -> each review's (L_i, H) float16 rows."""
    hidden = hidden.float().cpu().numpy()
    return [hidden[b, :n].astype(np.float16) for b, n in enumerate(lengths)]


def deeper_entry(encoder: Encoder, ids, max_length: int, autocast: bool, unfreeze_top: int,
                 cache_root, fingerprint: str, desc: str = "features"):
    """A complete entry of these reviews for ``--unfreeze-top K'`` > ``unfreeze_top`` (the
    smallest such K'), as ``(K', its FeatureStore, seconds waited)``, or None.  From it the
    hidden states entering layer ``L-K`` cost only layers ``L-K' .. L-K-1``
    (:func:`_encode_from`), not the ``L-K`` layers below: the K = 1 entry from the K = 2 one is
    one layer per token, not 11.  With none complete but one being written by another process
    (``python -m reference.pipeline.features --unfreeze-top K'`` in the background), this waits
    for it: its remaining layers plus ours cost the machine less than our ``L-K`` layers beside
    it."""
    root = Path(cache_root)
    keys = {deeper: cache_key(encoder, ids, max_length, autocast, deeper, fingerprint=fingerprint)
            for deeper in range(unfreeze_top + 1, encoder.model.config.num_hidden_layers + 1)}
    for deeper, key in keys.items():
        store, _ = scratch_features.open_entry(root / key)
        if store is not None:
            return deeper, store, 0.0
    for deeper, key in keys.items():
        if scratch_features.being_written(root / key):
            log.info("%s: the entry for --unfreeze-top %d is being written by another process; "
                     "waiting for it, to compute this one from it", desc, deeper)
            with scratch_features.writer_lock(root / key, desc) as waited:
                store, _ = scratch_features.open_entry(root / key)
            if store is not None:
                return deeper, store, waited
    return None


def derived_entry(encoder: Encoder, ids, max_length: int, autocast: bool, unfreeze_top: int,
                  cache_root, fingerprint: str):
    """A complete entry of these reviews for ``--unfreeze-top K`` computed before from a
    deeper one (:func:`deeper_entry`), or None: found by its own key, without opening (and
    checksumming, 10 GB for IMDB's train split with MPNet) the deeper entry again."""
    for deeper in range(unfreeze_top + 1, encoder.model.config.num_hidden_layers + 1):
        key = cache_key(encoder, ids, max_length, autocast, unfreeze_top, deeper, fingerprint)
        store, _ = scratch_features.open_entry(Path(cache_root) / key)
        if store is not None:
            return store
    return None


def middle_layers(encoder: Encoder, first: int, stop: int):
    """The encoder's layers ``first .. stop-1`` in eval mode, with MPNet's relative position
    bias (:class:`reference.top_layers.TopLayers`, the module the trained layers run in),
    weights copied."""
    from ..top_layers import TopLayers, position_table

    top = TopLayers(encoder.model.config, first, position_table(encoder.model))
    top.layer = torch.nn.ModuleDict({i: m for i, m in top.layer.items() if int(i) < stop})
    return top.copy_from(encoder.model).eval().requires_grad_(False)


def _encode_from(layers, source, position: dict, ids: list[np.ndarray], autocast: bool,
                 device) -> list[np.ndarray]:
    """Run ``layers`` (:func:`middle_layers`) on one batch of the hidden states ``source`` (a
    deeper entry) holds for the reviews ``ids`` (found by identity in ``position``: these are
    the id arrays the plan was made of); each review's (L_i, H) float16 output."""
    idx = [position[id(a)] for a in ids]
    x, lengths = source.batch(idx)                                  # (B, T, H) f32, (B,)
    with torch.inference_mode(), _amp(autocast, device):
        hidden = layers(torch.from_numpy(x).to(device), torch.from_numpy(lengths).to(device))
    return _per_review(hidden, lengths)


def extract_features(encoder: Encoder, texts, cache_root=DEFAULT_ROOT, max_length: int = 512,
                     batch_tokens: int = 16_384, shard_size: int = 2_048,
                     autocast: bool | str | None = None, device: str = "cpu",
                     progress: bool = True, desc: str = "features", ranks=None,
                     unfreeze_top: int = 0) -> FeatureStore:
    """Token features of ``texts`` from the frozen encoder: from the cache if there, else
    computed (resuming a partial cache) and stored.  ``autocast``: True (bf16) or False, or
    auto | bf16 | float32 | None (:func:`reference.pipeline.autocast.choose_autocast`, rank 0's
    choice on every rank, its line printed once).
    A batch holds at most ``batch_tokens`` padded tokens, a shard ``shard_size`` reviews.
    ``ranks`` (default: the torchrun job this process belongs to, if any): every rank calls
    this with the same texts and computes its share of the shards
    (:func:`scratch.pipeline.ranks.extract_together`).  ``unfreeze_top`` K > 0: the hidden
    states entering layer ``L-K`` (an entry of their own; one whose ``index.json`` says another
    K is refused: :class:`scratch.pipeline.unfreeze.EntryMismatch`)."""
    ranks = distributed.current() if ranks is None else ranks
    if not isinstance(autocast, bool):
        choice = ranks.share(choose_autocast(encoder, device, autocast) if ranks.main else None)
        if ranks.main:
            say(choice)
        autocast = choice.bf16
    ids = tokenize(encoder.tokenizer, texts, max_length)
    n_layers = encoder.model.config.num_hidden_layers
    fingerprint = encoder_fingerprint(encoder) if ids else None
    key = (cache_key(encoder, ids, max_length, autocast, unfreeze_top, fingerprint=fingerprint)
           if ids else "none")
    portable = (scratch_features.portable_key(encoder.source, max_length, ids, unfreeze_top)
                if ids and Path(encoder.source).is_dir() else None)
    meta = {"encoder": encoder.name, "source": encoder.source, "max_length": max_length,
            "autocast_bf16": autocast, "hidden_size": encoder.hidden_size,
            "portable_key": portable, **unfreeze.entry_meta(unfreeze_top, n_layers)}
    upto = n_layers - unfreeze_top
    encode = lambda batch: _encode(encoder, batch, autocast, device, upto)   # noqa: E731
    derive = unfreeze_top and ids and not (Path(cache_root) / key).exists()
    if derive and (done := derived_entry(encoder, ids, max_length, autocast, unfreeze_top,
                                         cache_root, fingerprint)):
        unfreeze.check_entry(done.meta, unfreeze_top, n_layers, done.folder)
        return FeatureStore(done.folder)
    found = (deeper_entry(encoder, ids, max_length, autocast, unfreeze_top, cache_root,
                          fingerprint, desc) if derive else None)
    waited = 0.0
    if found:                      # no entry of this K begun: start from a deeper one's states
        deeper, source, waited = found
        key = cache_key(encoder, ids, max_length, autocast, unfreeze_top, deeper, fingerprint)
        meta["computed_from"] = {"unfreeze_top": deeper, "entry": source.folder.name}
        if ranks.main:
            log.info("%s: the hidden states entering layer %d from those entering layer %d "
                     "(cached in %s): layers %d..%d only", desc, upto, n_layers - deeper,
                     source.folder, n_layers - deeper, upto - 1)
        layers = middle_layers(encoder, n_layers - deeper, upto).to(device)
        position = {id(a): i for i, a in enumerate(ids)}
        encode = lambda batch: _encode_from(layers, source, position, batch,  # noqa: E731
                                            autocast, device)
    store = scratch_ranks.extract(
        Path(cache_root) / key, ids, encode,
        key=key, meta=meta, batch_tokens=batch_tokens, shard_size=shard_size,
        progress=progress and ranks.main, desc=desc, ranks=ranks)
    if portable and store.meta.get("portable_key") != portable and ranks.main:  # an entry made
        store.meta["portable_key"] = portable                # before the portable key existed
        atomic_write(store.folder / "index.json", json.dumps(store.meta, indent=1).encode())
    unfreeze.check_entry(store.meta, unfreeze_top, n_layers, store.folder)
    return FeatureStore(store.folder, wait_seconds=store.wait_seconds + waited)


def imdb_features(encoder: Encoder, data: dict, cache_root=DEFAULT_ROOT, **kw) -> dict:
    """``{split: FeatureStore}`` for each split of :func:`reference.pipeline.data.load_imdb`'s
    result."""
    return {split: extract_features(encoder, reviews.texts, cache_root, desc=split, **kw)
            for split, reviews in data.items()}


def build_parser():
    from . import cli

    p = cli.Parser(prog="python -m reference.pipeline.features",
                   description="Compute (or find in the cache) the frozen encoder's token "
                               "features of every IMDB review (or of stratified subsets).")
    cli.add_feature_args(p, str(DEFAULT_ROOT))
    cli.add_dist_args(p)
    p.add_argument("--batch-tokens", type=cli.positive(int), default=16_384,
                   help="padded tokens per encoder batch, >= --max-length (default %(default)s)")
    p.add_argument("--shard-size", type=cli.positive(int), default=2_048,
                   help="reviews per shard, the unit an interrupted run resumes from "
                        "(default %(default)s)")
    p.add_argument("--unfreeze-top", type=cli.non_negative(int), default=0, metavar="K",
                   help="the entry a training run with --unfreeze-top K reads: the hidden states "
                        "entering layer L-K (default 0: the last hidden states); computed from "
                        "a cached entry of a larger K where there is one")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    from . import cli

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = build_parser()
    a = p.parse_args(argv)
    device = cli.check_device(p, a.device)                     # options alone, then the
    info = cli.check_encoder(p, a.encoder, a.max_length)       # encoder's config: no weights
    cli.check_batch_tokens(p, a.batch_tokens, a.max_length)
    if a.unfreeze_top > info.num_layers:
        p.error(f"--unfreeze-top {a.unfreeze_top} is more than the encoder's {info.num_layers} "
                "layers")
    cli.check_autocast(p, a.autocast)
    cli.check_folder(p, "--cache", a.cache)
    _, data = cli.load_data(p, a.data, a)
    for split, limit in (("train", a.limit_train), ("test", a.limit_test)):
        data[split] = cli.check_limit(p, f"--limit-{split}", data[split], limit, a.seed)
    with distributed.session(p.prog, device, a.dist_timeout) as ranks:
        encoder = cli.load_encoder(p, info, device)
        t0 = time.perf_counter()
        stores = imdb_features(encoder, data, a.cache, max_length=a.max_length,
                               batch_tokens=a.batch_tokens, shard_size=a.shard_size,
                               device=device, autocast=a.autocast,
                               progress=not a.no_progress, ranks=ranks,
                               unfreeze_top=a.unfreeze_top)
        if not ranks.main:
            return 0
        for split, st in stores.items():
            size = sum(f.stat().st_size for f in st.folder.glob("shard_*.safetensors"))
            print(f"{split}: {len(st)} reviews, {int(st.lengths.sum())} tokens, "
                  f"{size / 2**30:.2f} GiB at {st.folder}")
        print(f"total time {time.perf_counter() - t0:.0f} s"
              + (f" ({ranks.size} processes)" if ranks.size > 1 else ""))
    return 0


if __name__ == "__main__":
    from .cli import run

    raise SystemExit(run(main, "python -m reference.pipeline.features"))
