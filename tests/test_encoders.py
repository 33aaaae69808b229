"""Encoder resolution and the tokenizer-vocabulary guard."""
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertModel, BertTokenizerFast, MPNetConfig, MPNetModel, MPNetTokenizerFast
from transformers.utils import logging as hf_logging

from reference.model import BERTGRUSentiment, count_parameters, freeze_bert
from reference.pipeline import encoders as E
from reference.pipeline import install as I
from scratch.pipeline import encoder_names as names
from tests.imdb_fixtures import tiny_encoder, tokenizer


def test_packaged_minilm_tokenizer_passes_the_check():
    E.check_tokenizer(tokenizer())


def test_tiny_tokenizer_is_refused(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tiny = BertTokenizerFast(vocab_file=str(vocab))
    with pytest.raises(E.EncoderError, match="has 5 tokens, expected 30522"):
        E.check_tokenizer(tiny)


def test_wrong_casing_is_refused():
    wrong = dataclasses.replace(E.BERT, vocabulary=dataclasses.replace(
        E.BERT.vocabulary, probe=("Hello WORLD how ARE yoU?", [1, 2, 3])))
    with pytest.raises(E.EncoderError, match="encodes 'Hello WORLD how ARE yoU\\?'"):
        E.check_tokenizer(tokenizer(), wrong)


def test_auto_falls_back_to_minilm_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(names, "local_bert_base", lambda: None)
    with caplog.at_level(logging.WARNING, logger="scratch.pipeline.encoder_names"):
        name, path = E.resolve("auto")
    assert name == E.MINILM and path == E.minilm_path()
    said = [r for r in caplog.records if "using the packaged all-MiniLM-L6-v2" in r.message]
    assert len(said) == 1


def test_auto_prefers_a_cached_bert_base(monkeypatch, tmp_path):
    monkeypatch.setattr(names, "local_bert_base", lambda: str(tmp_path))
    assert E.resolve("auto") == (E.BERT_BASE, str(tmp_path))


def test_bert_base_offline_and_unknown_names_are_clear_errors(monkeypatch):
    monkeypatch.setattr(names, "local_bert_base", lambda: None)
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


# --- MPNet (all-mpnet-base-v2): its family, and the wrong-class guard ------------------------

def mpnet_vocab(folder) -> Path:
    """MPNet's vocabulary as published: BERT's uncased vocab.txt with <s> <pad> </s> <unk> in
    front and <mask> at the end (checked line by line against the real all-mpnet-base-v2)."""
    bert = (Path(E.minilm_path()) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    path = Path(folder) / "vocab.txt"
    path.write_text("\n".join(["<s>", "<pad>", "</s>", "<unk>", *bert, "<mask>"]) + "\n",
                    encoding="utf-8")
    return path


def mpnet_tokenizer(folder):
    tokens = mpnet_vocab(folder).read_text(encoding="utf-8").splitlines()
    return MPNetTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})


def tiny_mpnet_folder(folder: Path) -> Path:
    """A random 2-layer MPNet (hidden 32) saved with an MPNet tokenizer: the layout of the real
    one."""
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=30_527, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=514)
    MPNetModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    mpnet_tokenizer(folder).save_pretrained(folder)
    return folder


def test_mpnet_tokenizer_passes_its_family_check_and_fails_bert_s(tmp_path):
    tok = mpnet_tokenizer(tmp_path)
    E.check_tokenizer(tok, E.FAMILIES["mpnet"])
    with pytest.raises(E.EncoderError, match="has 30527 tokens, expected 30522"):
        E.check_tokenizer(tok)


def test_a_bert_model_on_an_mpnet_folder_is_refused(tmp_path):
    folder = tiny_mpnet_folder(tmp_path / "mpnet")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:   # the trap: BertModel loads this folder without an error, its weights random
        bert, info = BertModel.from_pretrained(folder, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    assert info["missing_keys"], "the trap this guard exists for has gone away"
    with pytest.raises(E.EncoderError, match="declares 'mpnet', loaded as BertModel \\(bert\\); "
                                             "expected mpnet"):
        E.check_model(bert, info, E.FAMILIES["mpnet"], str(folder))
    with pytest.raises(E.EncoderError, match="declares 'mpnet', loaded as BertModel"):
        E.check_model(bert, info, E.BERT, str(folder))


def test_a_checkpoint_lacking_weights_is_refused(tmp_path):
    folder = tmp_path / "bert"
    enc = tiny_encoder()
    enc.model.save_pretrained(folder)
    enc.tokenizer.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    del weights["encoder.layer.1.output.dense.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(E.EncoderError,
                       match="1 weights are not in the checkpoint and would be "
                             "random \\(e.g. encoder.layer.1.output.dense.weight\\)"):
        E.load_encoder(str(folder))


def test_an_mpnet_folder_loads_as_mpnet_with_its_own_pad_id(tmp_path):
    enc = E.load_encoder(str(tiny_mpnet_folder(tmp_path / "mpnet")))
    assert type(enc.model).__name__ == "MPNetModel" and enc.model.config.model_type == "mpnet"
    assert enc.pad_id == 1 and enc.max_length == 512 and enc.hidden_size == 32
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training


def test_unsupported_model_type_and_missing_config_are_clear_errors(tmp_path):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(E.EncoderError, match="model_type 'gpt2' is not supported"):
        E.load_encoder(str(tmp_path / "gpt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(E.EncoderError, match="no readable config.json"):
        E.load_encoder(str(tmp_path / "empty"))


def test_mpnet_not_installed_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(names, "HOME", tmp_path)
    with pytest.raises(E.EncoderError, match="python -m reference.pipeline.encoders install mpnet"):
        E.resolve("mpnet")


def mpnet_parameters(c) -> int:
    """MPNetModel without pooler, counted from its config by the architecture's formula."""
    H, F, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    embeddings = (c.vocab_size + c.max_position_embeddings) * H + 2 * H        # + LayerNorm
    layer = 4 * (H * H + H) + 2 * H + (H * F + F) + (F * H + H) + 2 * H        # attn, LN, FFN, LN
    return embeddings + L * layer + c.relative_attention_num_buckets * c.num_attention_heads


@pytest.mark.skipif(I.installed(I.MPNET) is None,
                    reason="mpnet is not installed "
                           "(python -m reference.pipeline.encoders install mpnet; "
                           "400 MB, too large for CI)")
def test_real_mpnet_loads_and_counts_as_the_assignments_model():
    enc = E.load_encoder("mpnet")
    assert (enc.name, enc.hidden_size, enc.pad_id, len(enc.tokenizer)) == ("mpnet", 768, 1, 30_527)
    model = BERTGRUSentiment(enc.model, 256, 1, 2, True, 0.25)
    freeze_bert(model)
    assert count_parameters(model, trainable_only=True) == 2_759_169      # the assignment's head
    assert count_parameters(enc.model) == mpnet_parameters(enc.model.config) == 108_895_872
    assert count_parameters(model) == 108_895_872 + 2_759_169


def test_mpnet_features_do_not_depend_on_the_padding(tmp_path):
    """A review's features alone and inside a right-padded batch (MPNet pads with id 1 and
    derives its positions from the non-pad tokens)."""
    from reference.pipeline.data import tokenize
    from reference.pipeline.features import _encode

    enc = E.load_encoder(str(tiny_mpnet_folder(tmp_path / "mpnet")))
    short, long = tokenize(enc.tokenizer, ["A fine film.", "A long, slow and dull film " * 9])
    assert short[0] == 0 and short[-1] == 2                     # <s> ... </s>
    alone = _encode(enc, [short], autocast=False, device="cpu")[0]
    batched = _encode(enc, [short, long], autocast=False, device="cpu")[0]
    assert alone.shape == (len(short), 32)
    assert abs(alone.astype(float) - batched.astype(float)).max() <= 1e-3   # float16 storage
