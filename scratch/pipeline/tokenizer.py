"""BERT's uncased WordPiece tokenizer, torch-free: the ``tokenizers`` library on the folder's
``tokenizer.json``, checked to be the real 30,522-token uncased vocabulary (or, for an MPNet
folder, MPNet's 30,527-token one: BERT's with ``<s> <pad> </s> <unk>`` in front and ``<mask>``
at the end, so every WordPiece id is BERT's + 4).

    tok = BertTokenizer.from_pretrained(folder)          # vocabulary="bert" | "mpnet"
    ids = tok.encode(texts, max_length=512)      # [CLS] tokens[:max_length-2] [SEP], int32 each
    input_ids, attention_mask = tok(texts)       # right-padded (B, T) int64 arrays, 1 = token

Why the check: a ``tokenizer.json`` is easy to get wrong without noticing (another model's
vocabulary, a cased one, a stub); every id would then mean another word to the encoder.  So
loading verifies the vocabulary size, the special tokens' ids, the encoding of a probe sentence
and that single texts come out as ``[CLS] ... [SEP]``.  The truncation and padding settings
stored in a ``tokenizer.json`` (sentence-transformers folders store 128) are ignored: each call
truncates to its own ``max_length`` and pads to the longest text of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bert_folder import BertError

TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class Vocabulary:
    """What a real vocabulary looks like: its size, special tokens' ids, the ids of a probe
    sentence (lower-cased, "?" split off), and the tokens wrapping a single text."""
    name: str
    size: int
    special_ids: dict = field(hash=False)
    probe: tuple = field(hash=False)
    cls: str
    sep: str
    pad: str


# the ids are read off each vocabulary file (vocab.txt: line number = id)
VOCABULARIES = {
    "bert": Vocabulary("uncased BERT", 30_522,
                       {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103},
                       ("Hello WORLD how ARE yoU?", [7592, 2088, 2129, 2024, 2017, 1029]),
                       "[CLS]", "[SEP]", "[PAD]"),
    "mpnet": Vocabulary("MPNet", 30_527, {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3},
                        ("Hello WORLD how ARE yoU?", [7596, 2092, 2133, 2028, 2021, 1033]),
                        "<s>", "</s>", "<pad>"),
}
BERT = VOCABULARIES["bert"]


def pad_batch(ids: list, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id sequences to the longest: ``(input_ids, attention_mask)``, both (B, T)
    int64, mask 1 on tokens and 0 on padding."""
    if not len(ids):
        raise BertError("no sequences to pad")
    T = max(len(s) for s in ids)
    input_ids = np.full((len(ids), T), pad_id, dtype=np.int64)      # (B, T)
    mask = np.zeros((len(ids), T), dtype=np.int64)                  # (B, T)
    for b, s in enumerate(ids):
        input_ids[b, :len(s)] = s
        mask[b, :len(s)] = 1
    return input_ids, mask


class BertTokenizer:
    """A checked uncased-BERT WordPiece tokenizer (see the module docstring)."""

    def __init__(self, tokenizer, source: str = "?", vocabulary: Vocabulary = BERT):
        self._tok = tokenizer
        self.source = source
        self.vocabulary = vocabulary
        tokenizer.no_padding()          # the file's own settings (e.g. pad everything to 128)
        tokenizer.no_truncation()
        check_vocabulary(tokenizer, source, vocabulary)
        self.pad_id = tokenizer.token_to_id(vocabulary.pad)

    @classmethod
    def from_pretrained(cls, folder, vocabulary: str = "bert") -> BertTokenizer:
        if vocabulary not in VOCABULARIES:
            raise BertError(f"vocabulary must be one of {sorted(VOCABULARIES)}, got {vocabulary!r}")
        from tokenizers import Tokenizer

        path = Path(folder) / TOKENIZER
        if not path.is_file():
            raise BertError(f"{path}: missing (the tokenizer is read from {TOKENIZER})")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception on a malformed file
            raise BertError(f"{path}: not a readable tokenizers file ({e})") from None
        return cls(tok, str(path), VOCABULARIES[vocabulary])

    def encode(self, texts, max_length: int = 512) -> list[np.ndarray]:
        """``[CLS] tokens[:max_length - 2] [SEP]`` per text, int32 arrays (unpadded; MPNet:
        ``<s> ... </s>``)."""
        if isinstance(texts, str):
            raise BertError("texts must be a list of strings, not one string")
        if int(max_length) != max_length or max_length < 2:
            raise BertError(f"max_length must be an integer >= 2 ([CLS] and [SEP]), "
                            f"got {max_length!r}")
        self._tok.enable_truncation(max_length=int(max_length))
        encs = self._tok.encode_batch(list(texts), add_special_tokens=True)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def tokens(self, ids) -> list[str]:
        """The token strings of ``ids`` (word pieces as ``##piece``, specials as ``[CLS]``)."""
        return [self._tok.id_to_token(int(i)) for i in ids]

    def __call__(self, texts, max_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` (B, T), right-padded with the pad id ([PAD] = 0)."""
        return pad_batch(self.encode(texts, max_length), self.pad_id)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __repr__(self):
        return f"BertTokenizer({self.source!r}, vocab={len(self)})"


def check_vocabulary(tok, source: str = "?", vocabulary: Vocabulary = BERT) -> None:
    """Fail (:class:`BertError`) unless ``tok`` (a ``tokenizers.Tokenizer``) is ``vocabulary``
    (default: the real uncased BERT vocabulary) and wraps single texts in [CLS] ... [SEP]."""
    v = vocabulary
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != v.size:
        raise BertError(f"{source}: the tokenizer has {size} tokens, expected the {v.name} "
                        f"vocabulary's {v.size}")
    for token, want in v.special_ids.items():
        if (got := tok.token_to_id(token)) != want:
            raise BertError(f"{source}: the tokenizer maps {token} to {got}, expected {want}")
    text, want = v.probe
    got = tok.encode(text, add_special_tokens=False).ids
    if got != want:
        raise BertError(f"{source}: the tokenizer encodes {text!r} as {got}, expected {want} "
                        f"(not the {v.name} vocabulary?)")
    got = tok.encode("hello", add_special_tokens=True).ids
    wrap = [tok.token_to_id(v.cls), want[0], tok.token_to_id(v.sep)]
    if got != wrap:
        raise BertError(f"{source}: the tokenizer encodes 'hello' as {got}, expected "
                        f"{v.cls} hello {v.sep} = {wrap} (no post-processor?)")
