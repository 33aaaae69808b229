"""The IMDB data for the reference pipeline: :mod:`scratch.pipeline.data` (torch-free: load,
download, split, bucket) plus tokenization with a Hugging Face tokenizer, and
``python -m reference.pipeline.data``.
"""
from __future__ import annotations

import numpy as np

from scratch.pipeline.data import (  # noqa: F401
    DEFAULT_CACHE,
    HOW_TO_GET,
    IMDB_SHA256,
    IMDB_URL,
    LABELS,
    MEMBER,
    SPLITS,
    ImdbError,
    Reviews,
    bucket_batches,
    download_imdb,
    find_imdb,
    load_imdb,
    sha256_file,
    stratified_subset,
    train_valid_split,
)


def tokenize(tokenizer, texts, max_length: int = 512) -> list[np.ndarray]:
    """WordPiece ids ``[CLS] tokens[:max_length-2] [SEP]`` for each text (int32 arrays)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length,
                    add_special_tokens=True, return_attention_mask=False)
    return [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]


def main(argv=None) -> int:
    from scratch.pipeline import cli

    p = cli.Parser(prog="python -m reference.pipeline.data",
                   description="Find, download or summarise the IMDB data.")
    p.add_argument("--data", help="aclImdb directory or .tar.gz (default: $IMDB_PATH or the cache)")
    p.add_argument("--download", action="store_true", help=f"download {IMDB_URL} if missing")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="download cache directory")
    args = p.parse_args(argv)
    try:
        path = find_imdb(args.data, download=args.download, cache_dir=args.cache_dir)
        data = load_imdb(path)
    except ImdbError as e:
        p.error(cli.one_line(e))
    for split, r in data.items():
        print(f"{split}: {len(r)} reviews, {int(r.labels.sum())} positive  ({path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
