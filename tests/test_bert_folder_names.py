"""Model folders as bert-base-uncased ships them are read equal to transformers: weights named
``bert.…`` with LayerNorm ``gamma``/``beta``, and a config.json that leaves fields at their
defaults (no layer_norm_eps, hidden_act, …)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from scratch.bert import BertEncoder
from scratch.bert_folder import BertConfig as ScratchConfig


def shipped_name(name: str) -> str:
    """A BertModel name as the original bert-base-uncased checkpoint spells it."""
    if "LayerNorm." in name:
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                            "LayerNorm.beta")
    return "bert." + name


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert-as-shipped")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=40)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():                        # LayerNorms away from 1/0, so names matter
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    state = {shipped_name(k): v.contiguous() for k, v in model.state_dict().items()
             if "position_ids" not in k}
    assert any(k.endswith(".gamma") for k in state) and all(k.startswith("bert.") for k in state)
    save_file(state, str(folder / "model.safetensors"))
    minimal = {"model_type": "bert", "vocab_size": 120, "hidden_size": 16,
               "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
               "max_position_embeddings": 40}               # everything else at its default
    (folder / "config.json").write_text(json.dumps(minimal))
    return folder, model


def test_a_config_with_fields_left_out_reads_transformers_defaults(shipped):
    folder, model = shipped
    ours = ScratchConfig.from_folder(folder)
    theirs = BertConfig.from_pretrained(folder)
    assert "layer_norm_eps" not in json.loads((folder / "config.json").read_text())
    assert ours.layer_norm_eps == theirs.layer_norm_eps == 1e-12
    assert ours.hidden_act == theirs.hidden_act
    assert ours.type_vocab_size == theirs.type_vocab_size


def test_gamma_beta_and_bert_prefix_read_equal_to_transformers(shipped):
    folder, model = shipped
    theirs = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 120, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0]
        loaded = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0]
    torch.testing.assert_close(loaded, want)                     # transformers reads it so
    got = np.asarray(BertEncoder.from_pretrained(folder, dtype="float64")(ids, mask))
    np.testing.assert_allclose(got[mask == 1], want.numpy()[mask == 1], rtol=1e-4, atol=1e-5)
