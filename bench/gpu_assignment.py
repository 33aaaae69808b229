"""The whole assignment on one device, from the travelling token ids: the frozen encoder's
features of every review, two epochs of the BiGRU head, the best epoch's test accuracy, and the
wall time of each stage (stage e of ``bench/gpu_check.sh``).

    python bench/gpu_assignment.py --tokens .gpu/imdb_tokens.npz --encoder .gpu/encoder-f16
        [--device cuda|cpu] [--epochs 2] [--batch-size 128] [--batch-tokens 65536]
        [--seed 3407] [--json PATH] [--tiny]

Exactly the reference pipeline's recipe (:mod:`reference.pipeline.train`): the same 17,500 / 7,500
split of the train reviews (seed 3407, the reviews in
:func:`reference.pipeline.data.load_imdb`'s order),
``GRUHead(384, 256, 1, 2, bidirectional, 0.25)`` seeded with ``torch.manual_seed(seed)``, Adam,
``BCEWithLogits``, length-bucketed batches of 128, the best-validation-loss epoch evaluated on
all 25,000 test reviews, through
:func:`reference.pipeline.train.fit` and :func:`reference.pipeline.train.run_epoch`.

What differs from ``python -m reference.pipeline.train`` is where the features live: the encoder
runs once per split (length-sorted batches of at most ``--batch-tokens`` tokens, bf16 autocast
where the device has it, as :mod:`reference.pipeline.features`) and the features stay on the device
in one flat float16 tensor (:class:`DeviceFeatureStore`, about 10 GB for both splits at 512
tokens), not in the on-disk cache.  The encoder's weights are the travelling float16 copy,
computed in float32 (``model.float()``) under the autocast.  ``--tiny``: 48 train / 24 test
reviews (stratified), batch 16, for checking the plumbing on a CPU (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_travel import TravelError, load_tokens
from reference.model import GRUHead
from reference.pipeline import checkpoint as ckpt
from reference.pipeline.data import stratified_subset, train_valid_split
from reference.pipeline.encoders import EncoderError, bf16_supported, load_encoder
from reference.pipeline.features import token_batches
from reference.pipeline.train import VALID_FRACTION, Split, fit, run_epoch


class DeviceFeatureStore:
    """:mod:`reference.pipeline.train`'s feature-store interface (``lengths``,
    ``batch(indices)``) over one flat (tokens, H) float16 tensor on the device: review i is rows
    ``offsets[i] : offsets[i] + lengths[i]``; batches are gathered there, never via the host."""

    def __init__(self, feats: torch.Tensor, offsets: np.ndarray, lengths: np.ndarray):
        self.feats, self.offsets, self.lengths = feats, offsets, lengths
        self.hidden_size = feats.shape[1]

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, indices, dtype=torch.float32):
        """Zero-padded ``x`` (B, L_max, H) on the device and ``lengths`` (B,) int64 (host), as
        :meth:`reference.pipeline.features.FeatureStore.batch`."""
        idx = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[idx]
        t = np.arange(int(lengths.max()))
        valid = t[None, :] < lengths[:, None]                               # (B, L_max)
        rows = np.where(valid, self.offsets[idx][:, None] + t[None, :], 0)  # (B, L_max)
        dev = self.feats.device
        x = self.feats[torch.from_numpy(rows).to(dev)].to(dtype)            # (B, L_max, H)
        x *= torch.from_numpy(valid).to(dev)[..., None]                     # padding: exact 0
        return x, torch.from_numpy(lengths)


def encode(encoder, ids: list[np.ndarray], device, batch_tokens: int, autocast: bool
           ) -> DeviceFeatureStore:
    """The encoder's last hidden states of every review, float16, in a :class:`DeviceFeatureStore`
    (reviews encoded in length-sorted batches; rows laid out in that order, so each batch's
    real tokens, taken row by row, fill one contiguous block)."""
    lengths = np.array([len(a) for a in ids], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    offsets = np.empty(len(ids), dtype=np.int64)
    offsets[order] = np.concatenate([[0], np.cumsum(lengths[order])[:-1]])
    feats = torch.empty((int(lengths.sum()), encoder.hidden_size), dtype=torch.float16,
                        device=device)
    amp = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
           if autocast else contextlib.nullcontext())
    with torch.no_grad(), amp:
        for start, stop in token_batches(lengths[order], batch_tokens):
            members = order[start:stop]
            L = lengths[members]
            input_ids = np.full((len(members), int(L.max())), encoder.pad_id, dtype=np.int64)
            for b, i in enumerate(members):
                input_ids[b, :L[b]] = ids[i]
            mask = torch.from_numpy(np.arange(input_ids.shape[1])[None, :] < L[:, None]
                                    ).to(device)                              # (B, T)
            hidden = encoder.model(input_ids=torch.from_numpy(input_ids).to(device),
                                   attention_mask=mask.long())[0]           # (B, T, H)
            first = int(offsets[members[0]])
            feats[first:first + int(L.sum())] = hidden[mask].to(torch.float16)
    return DeviceFeatureStore(feats, offsets, lengths)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default=".gpu/imdb_tokens.npz", help="bench/gpu_travel.py's file")
    p.add_argument("--encoder", default=".gpu/encoder-f16", help="encoder folder")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (16 with --tiny)")
    p.add_argument("--batch-tokens", type=int, default=65_536, help="tokens per encoder batch")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--tiny", action="store_true", help="48 train / 24 test reviews, batch 16")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    batch_size = a.batch_size or (16 if a.tiny else 128)
    stages, t_all = {}, time.perf_counter()

    def stage(name, t0):
        synchronize(a.device)
        stages[name] = round(time.perf_counter() - t0, 2)
        print(f"[{name}] {stages[name]:.1f} s", flush=True)

    t0 = time.perf_counter()
    try:
        data, meta = load_tokens(a.tokens)
        encoder = load_encoder(a.encoder, a.device)
    except (TravelError, EncoderError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    encoder.model.float()              # float16-rounded weights, float32 arithmetic (+ autocast)
    if a.tiny:
        for split, n in (("train", 48), ("test", 24)):
            ids, labels = data[split]
            keep = stratified_subset(labels, min(n, len(labels)), a.seed)
            data[split] = ([ids[i] for i in keep], labels[keep])
    autocast = bf16_supported(a.device)
    stage("load tokens and encoder", t0)
    where = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    print(f"{meta['encoder']} (float16 weights) on {where}; bf16 autocast {autocast}; "
          f"{len(data['train'][0])} train / {len(data['test'][0])} test reviews", flush=True)

    stores = {}
    for split in ("train", "test"):
        t0 = time.perf_counter()
        stores[split] = encode(encoder, data[split][0], a.device, a.batch_tokens, autocast)
        stage(f"features {split}", t0)
    tokens = {s: int(st.lengths.sum()) for s, st in stores.items()}
    del encoder
    if a.device == "cuda":
        torch.cuda.empty_cache()

    labels = data["train"][1]
    n = len(labels)
    tr_idx, va_idx = train_valid_split(n, round(n * VALID_FRACTION), a.seed)
    train = Split(stores["train"], tr_idx, labels[tr_idx])
    valid = Split(stores["train"], va_idx, labels[va_idx])
    model_args = {"emb_dim": stores["train"].hidden_size, "hidden_dim": 256, "output_dim": 1,
                  "n_layers": 2, "bidirectional": True, "dropout": 0.25}
    config = {"encoder": meta["encoder"] + " (float16 weights)", "max_length": meta["max_length"],
              "seed": a.seed, "batch_size": batch_size, "lr": 1e-3, "model": model_args}
    torch.manual_seed(a.seed)
    head = GRUHead(**model_args).to(a.device)
    with tempfile.TemporaryDirectory() as out:         # the checkpoint stays off $OUT
        ckpt.write_json(Path(out) / ckpt.CONFIG, config)
        t0 = time.perf_counter()
        history = fit(head, train, valid, out, epochs=a.epochs, batch_size=batch_size,
                      seed=a.seed, lr=1e-3, device=a.device, config=config, progress=False,
                      log=lambda msg: print(msg, flush=True))
        stage(f"train {a.epochs} epochs (+ validation)", t0)
        t0 = time.perf_counter()
        best, _ = ckpt.load_head(out, a.device)
        test_ids = data["test"][1]
        test_loss, test_acc = run_epoch(best, Split(stores["test"], np.arange(len(test_ids)),
                                                    test_ids), batch_size, None, 0, a.device)
        stage("test", t0)
    best_epoch = min(history, key=lambda r: r["valid_loss"])["epoch"]
    total = round(time.perf_counter() - t_all, 2)
    result = {
        "device": where, "torch": torch.__version__, "autocast_bf16": autocast,
        "encoder": config["encoder"], "max_length": meta["max_length"],
        "n_train": len(train), "n_valid": len(valid), "n_test": len(test_ids),
        "tokens": tokens, "feature_tokens_per_s": {
            s: round(tokens[s] / stages[f"features {s}"]) for s in tokens},
        "epochs": history, "best_epoch": best_epoch, "test_loss": test_loss,
        "test_acc": test_acc, "stage_seconds": stages, "total_seconds": total,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if a.device == "cuda" else None,
        "tiny": a.tiny, "config": config}
    print(f"test (best epoch {best_epoch}): loss {test_loss:.4f} acc {test_acc:.2%} on "
          f"{len(test_ids)} reviews; total {total:.0f} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
