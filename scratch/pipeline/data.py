"""The Large Movie Review Dataset (aclImdb, Maas et al. 2011): load, download, split and batch
by length -- torch-free, so that both pipelines (``reference`` and ``scratch``) use the very same
reviews, split and batches.

Layout (the original): ``aclImdb/{train,test}/{pos,neg}/ID_RATING.txt``, one review per file,
UTF-8.  :func:`load_imdb` reads it from a directory or straight from a ``.tar.gz`` (streamed,
nothing extracted); other members (``train/unsup``, ``*.feat``, ``imdb.vocab``, ...) are ignored.
Without a local copy :func:`download_imdb` fetches Stanford's ``aclImdb_v1.tar.gz`` into a
cache directory with a progress bar, resumes an interrupted download, checks the sha256, and
only then moves the file to its final name.  Tokenization is each pipeline's own
(:func:`reference.pipeline.data.tokenize`, :mod:`scratch.pipeline.tokenizer`).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
DEFAULT_CACHE = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                 / "gru-attention" / "imdb")
SPLITS, LABELS = ("train", "test"), ("neg", "pos")
MEMBER = re.compile(r"^(?:\./)?aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
HOW_TO_GET = (
    "The IMDB data was not found. Pass --data PATH (an aclImdb directory or .tar.gz), set "
    "IMDB_PATH, or download it: python -m reference.pipeline.data --download "
    f"(fetches {IMDB_URL}).")


class ImdbError(ValueError):
    """The data is missing, corrupt, or not in the aclImdb layout (message names the file)."""


@dataclass
class Reviews:
    """One split: ``texts[i]`` with ``labels[i]`` (1 = positive) from file ``names[i]``;
    ``label_names``: what 0 and 1 stand for, when a table named them (else None: negative,
    positive)."""
    texts: list[str]
    labels: np.ndarray
    names: list[str] = field(default_factory=list)
    label_names: tuple[str, str] | None = None

    def __len__(self):
        return len(self.texts)

    def subset(self, idx) -> Reviews:
        idx = np.asarray(idx, dtype=np.int64)
        return Reviews([self.texts[i] for i in idx], self.labels[idx],
                       [self.names[i] for i in idx], self.label_names)


def _decode(raw: bytes, name: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImdbError(f"{name}: not valid UTF-8 ({e})") from e
    if not text.strip():
        raise ImdbError(f"{name}: empty review")
    return text


def _iter_archive(path: Path):
    """Stream the reviews out of a (gzipped) tar.  A gzip stream is read to its end, so a
    truncated or corrupt archive fails its length/CRC check instead of silently yielding part
    of the data (tarfile alone stops quietly at a damaged header)."""
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f, \
                tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if m.isfile() and MEMBER.match(m.name):
                    yield m.name, tar.extractfile(m).read()
            if gz:
                while f.read(1 << 20):               # to the end: EOFError/BadGzipFile if damaged
                    pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ImdbError(f"{path}: corrupt or unreadable archive ({type(e).__name__}: {e})") from e


def _iter_directory(path: Path):
    root = path if path.name == "aclImdb" else path / "aclImdb"
    if not root.is_dir():
        raise ImdbError(f"{path}: no aclImdb/ folder "
                        f"(expected aclImdb/{{train,test}}/{{pos,neg}}/ID_RATING.txt)")
    for split in SPLITS:
        for label in LABELS:
            for f in sorted((root / split / label).glob("*.txt")):
                name = f"aclImdb/{split}/{label}/{f.name}"
                if MEMBER.match(name):
                    try:
                        yield name, f.read_bytes()
                    except OSError as e:
                        raise ImdbError(f"{f}: unreadable ({e})") from e


def load_imdb(path, splits=SPLITS) -> dict[str, Reviews]:
    """Read aclImdb from a directory or a .tar.gz -> ``{"train": Reviews, "test": Reviews}``.

    Reviews are ordered neg then pos, each by numeric ID (deterministic whatever the archive
    order).  A missing path, a corrupt archive, a wrong layout (a split or label folder with no
    reviews), or an empty/undecodable review raises :class:`ImdbError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise ImdbError(f"{path}: no such file or directory. {HOW_TO_GET}")
    items = _iter_directory(path) if path.is_dir() else _iter_archive(path)
    found: dict[tuple, list] = {(s, label): [] for s in splits for label in LABELS}
    for name, raw in items:
        split, label, rid, _rating = MEMBER.match(name).groups()
        if split in splits:
            found[split, label].append((int(rid), name, _decode(raw, f"{path}:{name}")))
    out = {}
    for split in splits:
        texts, labels, names = [], [], []
        for y, label in enumerate(LABELS):
            rows = sorted(found[split, label])
            if not rows:
                raise ImdbError(f"{path}: no reviews under aclImdb/{split}/{label}/ "
                                "(not the aclImdb layout?)")
            texts += [r[2] for r in rows]
            names += [r[1] for r in rows]
            labels += [y] * len(rows)
        out[split] = Reviews(texts, np.array(labels, dtype=np.int64), names)
    return out


def train_valid_split(n: int = 25_000, n_valid: int = 7_500, seed: int = 3407):
    """Seeded split of ``range(n)`` -> (train_idx, valid_idx), each sorted; 17,500/7,500 default."""
    if not 0 < n_valid < n:
        raise ValueError(f"need 0 < n_valid < n, got n_valid={n_valid}, n={n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def stratified_subset(labels, n: int, seed: int = 3407) -> np.ndarray:
    """``n`` indices (sorted) with the classes in the same proportions as ``labels``."""
    labels = np.asarray(labels)
    if not 0 < n <= len(labels):
        raise ValueError(f"subset size must be in 1..{len(labels)}, got {n}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    take = np.floor(counts / counts.sum() * n).astype(int)
    take[np.argsort(-(counts / counts.sum() * n - take))[: n - take.sum()]] += 1
    idx = [rng.choice(np.flatnonzero(labels == c), k, replace=False)
           for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(idx))


def bucket_batches(lengths, batch_size: int, shuffle: bool = True, seed: int = 0,
                   pool_factor: int = 50) -> list[np.ndarray]:
    """Index batches of similar lengths (torchtext's BucketIterator, rebuilt).

    shuffle=False: sort everything by length and cut.  shuffle=True: shuffle, cut into pools
    of ``batch_size * pool_factor``, sort each pool by length, cut into batches, shuffle the
    batches: little padding, yet random order from epoch to epoch (vary ``seed``).
    """
    lengths = np.asarray(lengths)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng(seed)
    perm, pool = rng.permutation(len(lengths)), batch_size * max(1, pool_factor)
    batches = []
    for p in range(0, len(perm), pool):
        chunk = perm[p:p + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_imdb(cache_dir=DEFAULT_CACHE, url: str = IMDB_URL, sha256: str | None = IMDB_SHA256,
                  progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` into ``cache_dir`` and return the verified archive's path.

    Bytes go to ``NAME.part``; an existing ``.part`` is resumed with an HTTP Range request (a
    server that answers 200 instead of 206 restarts it from zero).  The sha256 is checked
    before ``os.replace`` gives the file its final name, so a half or corrupt download never
    sits under that name; a mismatch deletes the part file and raises :class:`ImdbError`.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / url.rsplit("/", 1)[-1]
    if final.exists() and (sha256 is None or sha256_file(final) == sha256):
        return final
    part = final.with_name(final.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416:                       # 416: the .part is already whole (or bogus)
            raise ImdbError(f"download of {url} failed: HTTP {e.code}") from e
        resp = None
    except urllib.error.URLError as e:
        raise ImdbError(f"download of {url} failed: {e.reason}") from e
    if resp is not None:
        with resp:
            resumed = resp.status == 206
            total = resp.headers.get("Content-Length")
            total = int(total) + (have if resumed else 0) if total else None
            with open(part, "ab" if resumed else "wb") as f, tqdm(
                    total=total, initial=have if resumed else 0, unit="B", unit_scale=True,
                    desc=f"download {final.name}", disable=not progress) as bar:
                while block := resp.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
    if sha256 is not None and (got := sha256_file(part)) != sha256:
        part.unlink()
        raise ImdbError(f"{url}: sha256 mismatch (got {got}, expected {sha256}); "
                        "the partial file was deleted, run again to restart")
    os.replace(part, final)
    return final


def find_imdb(path=None, download: bool = False, cache_dir=DEFAULT_CACHE) -> Path:
    """The archive/directory to read: ``path``, else ``$IMDB_PATH``, else the download cache
    (downloading when ``download=True``).  Missing everywhere: :class:`ImdbError` saying how
    to get it."""
    path = path or os.environ.get("IMDB_PATH")
    if path:
        if not Path(path).exists():
            raise ImdbError(f"{path}: no such file or directory. {HOW_TO_GET}")
        return Path(path)
    cached = Path(cache_dir) / IMDB_URL.rsplit("/", 1)[-1]
    if cached.exists():
        return cached
    if download:
        return download_imdb(cache_dir)
    raise ImdbError(HOW_TO_GET)
