"""Tiny synthetic aclImdb archives and a tiny random encoder, made by the tests themselves."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from reference.pipeline.encoders import Encoder, minilm_path

POS_WORDS = "great wonderful superb moving brilliant loved".split()
NEG_WORDS = "awful boring dull terrible waste hated".split()


def review(i: int, positive: bool) -> str:
    words = POS_WORDS if positive else NEG_WORDS
    return f"Review {i}: " + " ".join(words[(i + k) % len(words)] for k in range(3 + i % 7)) + "."


def make_tree(root: Path, n_per_class: int = 6, splits=("train", "test")) -> Path:
    """aclImdb/{split}/{pos,neg}/{id}_{rating}.txt under ``root``; returns root / "aclImdb"."""
    for split in splits:
        for label in ("pos", "neg"):
            d = root / "aclImdb" / split / label
            d.mkdir(parents=True)
            for i in range(n_per_class):
                rating = 8 if label == "pos" else 2
                (d / f"{i}_{rating}.txt").write_text(review(i, label == "pos"), encoding="utf-8")
    return root / "aclImdb"


def make_archive(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tree_files(n_per_class: int = 6, splits=("train", "test")) -> dict[str, bytes]:
    files = {}
    for split in splits:
        for label in ("pos", "neg"):
            for i in range(n_per_class):
                rating = 8 if label == "pos" else 2
                name = f"aclImdb/{split}/{label}/{i}_{rating}.txt"
                files[name] = review(i, label == "pos").encode()
    return files


def tokenizer() -> BertTokenizerFast:
    return BertTokenizerFast.from_pretrained(minilm_path())


def tiny_encoder(seed: int = 0, hidden: int = 32) -> Encoder:
    """A random 2-layer BERT (hidden 32) with the real uncased vocabulary's tokenizer."""
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    model = BertModel(cfg, add_pooling_layer=False).eval().requires_grad_(False)
    return Encoder(model, tokenizer(), f"tiny-{seed}", "random")


def save_tiny_encoder(folder: Path, seed: int = 0, hidden: int = 16) -> Path:
    """A tiny random BERT (1 layer) with the real uncased tokenizer, saved as a model folder."""
    torch.manual_seed(seed)
    BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32), add_pooling_layer=False).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def save_tiny_checkpoint(folder: Path, encoder_folder: Path, hidden: int = 16, seed: int = 0,
                         max_length: int = 32) -> Path:
    """A reference.pipeline.train-style checkpoint of a random head for ``encoder_folder``'s
    features."""
    from reference.model import GRUHead
    from reference.pipeline import checkpoint as ckpt

    model = dict(emb_dim=hidden, hidden_dim=5, output_dim=1, n_layers=2, bidirectional=True,
                 dropout=0.25)
    torch.manual_seed(seed)
    ckpt.save_weights(folder, GRUHead(**model), {
        "encoder": encoder_folder.name, "encoder_source": str(encoder_folder),
        "max_length": max_length, "model": model})
    return folder
