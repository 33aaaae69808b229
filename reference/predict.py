"""``python -m reference.predict --checkpoint DIR "review text" ...``: the probability that each
review is positive, from a head trained by :mod:`reference.train` on the encoder it names.

:func:`predict_sentiment` is the assignment's function::

    model.eval()
    tokens = tokenizer.tokenize(sentence)[:max_input_length - 2]
    ids = [cls] + tokenizer.convert_tokens_to_ids(tokens) + [sep]
    return torch.sigmoid(model(torch.LongTensor(ids).unsqueeze(0))).item()
"""
from __future__ import annotations

import argparse
import os

import torch

from . import checkpoint as ckpt


def predict_sentiment(model, tokenizer, sentence: str, max_input_length: int = 512) -> float:
    """P(positive) of ``sentence`` under a BERTGRUSentiment ``model`` (a float in [0, 1])."""
    model.eval()
    tokens = tokenizer.tokenize(sentence)[:max_input_length - 2]
    ids = [tokenizer.cls_token_id] + tokenizer.convert_tokens_to_ids(tokens) + [tokenizer.sep_token_id]
    device = next(model.parameters()).device
    tensor = torch.LongTensor(ids).to(device).unsqueeze(0)
    with torch.no_grad():
        return torch.sigmoid(model(tensor)).item()


def load_model(folder, device: str = "cpu"):
    """(BERTGRUSentiment, tokenizer, config) from a reference.train checkpoint directory; the
    encoder is loaded by the name (or folder) saved in its config.json."""
    from .encoders import load_encoder

    config = ckpt.read_config(folder)
    source = config.get("encoder_source")
    name = source if source and os.path.isdir(source) else config["encoder"]
    encoder = load_encoder(name, device)
    return ckpt.load_full_model(folder, encoder.model, device), encoder.tokenizer, config


def main(argv=None) -> int:
    from .encoders import EncoderError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m reference.predict",
                                description="P(positive) of each review under a trained checkpoint.")
    p.add_argument("--checkpoint", required=True, help="directory written by reference.train --out")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("sentences", nargs="+", metavar="TEXT", help="review text(s) to score")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    try:
        model, tokenizer, config = load_model(a.checkpoint, a.device)
    except (ckpt.CheckpointError, EncoderError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    for s in a.sentences:
        prob = predict_sentiment(model, tokenizer, s, config.get("max_length", 512))
        print(f"{prob:.4f}  {'positive' if prob > 0.5 else 'negative'}  {s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
