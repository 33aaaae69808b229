"""Encoder resolution and the tokenizer-vocabulary guard."""
import dataclasses
import logging

import pytest
from transformers import BertTokenizerFast

from reference import encoders as E
from tests.imdb_fixtures import tokenizer


def test_packaged_minilm_tokenizer_passes_the_check():
    E.check_tokenizer(tokenizer())


def test_tiny_tokenizer_is_refused(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tiny = BertTokenizerFast(vocab_file=str(vocab))
    with pytest.raises(E.EncoderError, match="has 5 tokens, expected 30522"):
        E.check_tokenizer(tiny)


def test_wrong_casing_is_refused():
    wrong = dataclasses.replace(E.BERT, probe=("Hello WORLD how ARE yoU?", [1, 2, 3]))
    with pytest.raises(E.EncoderError, match="encodes 'Hello WORLD how ARE yoU\\?'"):
        E.check_tokenizer(tokenizer(), wrong)


def test_auto_falls_back_to_minilm_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(E, "local_bert_base", lambda: None)
    with caplog.at_level(logging.WARNING, logger="reference.encoders"):
        name, path = E.resolve("auto")
    assert name == E.MINILM and path == E.minilm_path()
    assert len([r for r in caplog.records if "using the packaged all-MiniLM-L6-v2" in r.message]) == 1


def test_auto_prefers_a_cached_bert_base(monkeypatch, tmp_path):
    monkeypatch.setattr(E, "local_bert_base", lambda: str(tmp_path))
    assert E.resolve("auto") == (E.BERT_BASE, str(tmp_path))


def test_bert_base_offline_and_unknown_names_are_clear_errors(monkeypatch):
    monkeypatch.setattr(E, "local_bert_base", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(E.EncoderError, match="not in the local Hugging Face cache"):
        E.resolve(E.BERT_BASE)
    with pytest.raises(E.EncoderError, match="unknown encoder 'bert-large-cased'"):
        E.resolve("bert-large-cased")


def test_load_minilm_frozen_in_eval_mode():
    enc = E.load_encoder("minilm")
    assert enc.name == "minilm" and enc.hidden_size == 384
    assert not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())
    assert enc.model.config.num_hidden_layers == 6
