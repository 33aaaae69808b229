"""What travels to the GPU machine for ``bench/gpu_check.sh``, in compact forms, and how it is
read back there.

The GPU machine has no internet and no copy of the data or of the packaged encoder, and the
working tree that travels (with the carried, git-ignored folders) may hold 64 MiB in all.  So:

* the encoder (``--encoder``, default the packaged all-MiniLM-L6-v2) as a model folder whose
  weights are **float16** safetensors (45 MB instead of 91 MB), with its ``config.json`` and
  tokenizer files: ``reference.pipeline.encoders.load_encoder(FOLDER)`` loads it like any folder;
* the IMDB reviews as **token ids**, tokenized here exactly as the reference pipeline does
  (:func:`reference.pipeline.data.tokenize` with the encoder's tokenizer, ``[CLS] ... [SEP]``,
  truncated to ``--max-length``), in :func:`reference.pipeline.data.load_imdb`'s order (so seed
  3407's split is the same reviews as on the CPU): per split the ids of all reviews concatenated
  (uint16: the vocabulary has 30,522 ids), their lengths and labels, in one compressed ``.npz``.

    python bench/gpu_travel.py --out .gpu [--data PATH] [--encoder minilm] [--max-length 512]
                               [--limit-train N --limit-test N]
    python bench/gpu_travel.py --size .whl .gpu      what would travel, against the 64 MiB

:func:`load_tokens` reads the ``.npz`` back, checked (lengths add up, ids inside the
vocabulary, labels 0/1), as ``{split: (list of int64 id arrays, labels)}``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENCODER_DIR, TOKENS = "encoder-f16", "imdb_tokens.npz"
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt")
SPLITS = ("train", "test")


class TravelError(ValueError):
    """A travel file is missing, damaged or not what it claims (message names it)."""


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def convert_encoder(source, out) -> Path:
    """Copy the model folder ``source`` to ``out`` with every float weight stored as float16
    (other dtypes unchanged) and its config and tokenizer files; returns ``out``."""
    from safetensors.numpy import load_file, save_file

    source, out = Path(source), Path(out)
    weights = load_file(source / "model.safetensors")
    half = {}
    for name, w in weights.items():
        if w.dtype.kind == "f":
            if np.abs(w).max(initial=0) > np.finfo(np.float16).max:
                raise TravelError(f"{name}: values beyond the float16 range")
            w = w.astype(np.float16)
        half[name] = np.ascontiguousarray(w)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(half, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in TOKENIZER_FILES:
        if (source / f).exists():
            shutil.copy2(source / f, tmp / f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def pack_tokens(data: dict, tokenizer, max_length: int, out, encoder_name: str = "") -> dict:
    """Tokenize ``data`` ({split: reference.pipeline.data.Reviews}) and write the compressed
    ``.npz``; returns its metadata."""
    from reference.pipeline.data import tokenize

    arrays, meta = {}, {"max_length": max_length, "encoder": encoder_name,
                        "vocab_size": len(tokenizer), "splits": {}}
    for split, reviews in data.items():
        ids = tokenize(tokenizer, reviews.texts, max_length)
        lengths = np.array([len(a) for a in ids], dtype=np.uint16)
        flat = np.concatenate(ids)
        if flat.min() < 0 or flat.max() > np.iinfo(np.uint16).max:
            raise TravelError(f"{split}: token ids outside uint16")
        arrays[f"{split}_ids"] = flat.astype(np.uint16)
        arrays[f"{split}_lengths"] = lengths
        arrays[f"{split}_labels"] = np.asarray(reviews.labels, dtype=np.uint8)
        meta["splits"][split] = {"reviews": len(ids), "tokens": int(flat.size)}
    arrays["meta"] = np.array(json.dumps(meta))
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out)
    return meta


def load_tokens(path) -> tuple[dict, dict]:
    """``({split: (ids: list of int64 arrays, labels: int64 array)}, meta)`` from
    :func:`pack_tokens`' file, checked; a :class:`TravelError` naming the problem otherwise."""
    path = Path(path)
    if not path.exists():
        raise TravelError(f"{path}: no such file (run bench/gpu_prepare.sh first)")
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            out = {}
            for split in meta["splits"]:
                flat = z[f"{split}_ids"].astype(np.int64)
                lengths = z[f"{split}_lengths"].astype(np.int64)
                labels = z[f"{split}_labels"].astype(np.int64)
                if lengths.sum() != flat.size or len(labels) != len(lengths):
                    raise TravelError(f"{path}: {split} lengths and ids do not add up")
                if flat.size and flat.max() >= meta["vocab_size"]:
                    raise TravelError(f"{path}: {split} has ids beyond the vocabulary")
                if not np.isin(labels, (0, 1)).all() or lengths.min(initial=1) < 1:
                    raise TravelError(f"{path}: {split} labels or lengths out of range")
                out[split] = (np.split(flat, np.cumsum(lengths)[:-1]), labels)
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, TravelError):
            raise
        raise TravelError(f"{path}: not a readable token file ({e})") from e
    return out, meta


def tree_bytes(root=".") -> int:
    """Bytes of what travels besides the carried folders: tracked files and untracked files
    git does not ignore (``git ls-files -co --exclude-standard``)."""
    import subprocess

    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum(os.path.getsize(Path(root) / n.decode()) for n in names
               if n and (Path(root) / n.decode()).is_file())


def folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


LIMIT = 64 * 2**20          # the working tree that travels, carried folders included


def size_report(carried) -> int:
    """Print what travels (the git tree's files, each carried folder) against :data:`LIMIT`;
    returns 0 if it fits, 1 if not."""
    parts = [("tracked + untracked-not-ignored files", tree_bytes())]
    parts += [(f"carried {c}", folder_bytes(c)) for c in carried]
    for name, n in parts:
        print(f"  {n / 2**20:8.2f} MiB  {name}")
    total = sum(n for _, n in parts)
    fits = total <= LIMIT
    print(f"  {total / 2**20:8.2f} MiB  in all, limit {LIMIT / 2**20:.0f} MiB: "
          f"{'fits' if fits else 'TOO LARGE'} ({(LIMIT - total) / 2**20:+.2f} MiB to spare)")
    return 0 if fits else 1


def main(argv=None) -> int:
    from reference.pipeline.data import ImdbError, find_imdb, load_imdb, stratified_subset
    from reference.pipeline.encoders import EncoderError, load_encoder, resolve

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".gpu", help="folder to write (default %(default)s)")
    p.add_argument("--data", help="aclImdb directory or .tar.gz (default: $IMDB_PATH)")
    p.add_argument("--encoder", default="minilm", help="minilm | FOLDER (default %(default)s)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--limit-train", type=int, metavar="N", help="stratified subset (tests)")
    p.add_argument("--limit-test", type=int, metavar="N", help="stratified subset (tests)")
    p.add_argument("--seed", type=int, default=3407, help="seed of the subsets")
    p.add_argument("--size", nargs="*", metavar="FOLDER",
                   help="only report what would travel with these carried folders")
    a = p.parse_args(argv)
    if a.size is not None:
        missing = [c for c in a.size if not Path(c).is_dir()]
        if missing:
            p.exit(2, f"{p.prog}: error: no folder {', '.join(missing)}\n")
        return size_report(a.size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        name, source = resolve(a.encoder)
        encoder = load_encoder(a.encoder)                    # checks the tokenizer too
        data = load_imdb(find_imdb(a.data))
    except (ImdbError, EncoderError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    for split, limit in (("train", a.limit_train), ("test", a.limit_test)):
        if limit:
            data[split] = data[split].subset(stratified_subset(data[split].labels, limit, a.seed))
    enc_dir = convert_encoder(source, out / ENCODER_DIR)
    print(f"encoder {name}: {folder_bytes(enc_dir) / 2**20:.1f} MiB as float16 at {enc_dir}",
          flush=True)
    meta = pack_tokens(data, encoder.tokenizer, a.max_length, out / TOKENS, name)
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    print(f"tokens: {tokens:,} ids of {sum(s['reviews'] for s in meta['splits'].values()):,} "
          f"reviews at <= {a.max_length}: {(out / TOKENS).stat().st_size / 2**20:.1f} MiB at "
          f"{out / TOKENS} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
