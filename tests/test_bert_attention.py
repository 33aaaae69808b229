"""The attention switch: scratch.bert with Efficient / linear attention in all or some layers
== the torch mirror (reference.bert_attention, transformers' attention registry) in float64, on
random small BERTs and on MiniLM with real reviews; the mirror itself gets the padding mask,
leaves unswapped layers to SDPA, and restores.  The random-BERT comparison runs on each backend
(``xp``: NumPy beside torch on the CPU, CuPy beside torch on CUDA)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.bert_attention import NAME, key_mask, swap_attention, top_layers
from reference.pipeline.encoders import load_encoder, minilm_path
from scratch.backend import to_numpy
from scratch.bert import BertEncoder
from tests.bert_fixtures import minilm_torch, random_bert, rel_err, review_batches, torch_hidden

VARIANTS = [dict(attention="efficient", normalization="softmax"),
            dict(attention="efficient", normalization="scaling"),
            dict(attention="linear", alpha=1.0),
            dict(attention="linear", alpha=0.1)]


@st.composite
def swap_cases(draw):
    heads, layers = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    cfg = dict(vocab_size=40, hidden_size=heads * draw(st.integers(1, 6)),
               num_hidden_layers=layers, num_attention_heads=heads,
               intermediate_size=draw(st.integers(1, 16)),
               hidden_act=draw(st.sampled_from(["gelu", "relu", "gelu_new"])),
               max_position_embeddings=16)
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 16))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = rng.integers(0, 40, (B, T))
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T) < lengths[:, None]).astype(np.int64) if draw(st.booleans()) else None
    swap = draw(st.one_of(st.none(), st.integers(0, layers),
                          st.sets(st.integers(0, layers - 1))))
    return cfg, ids, mask, swap, draw(st.sampled_from(VARIANTS)), draw(st.integers(0, 1000))


@settings(max_examples=40)
@given(swap_cases())
def test_swapped_random_berts_equal_the_torch_mirror(xp, device, tmp_path_factory, case):
    cfg, ids, mask, swap, variant, seed = case
    model = random_bert(seed, **cfg)
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    enc = BertEncoder.from_pretrained(folder, dtype="float64", swap_layers=swap,
                                      backend=xp.__name__, **variant)
    swap_attention(model.double().to(device), swap_layers=swap, **variant)
    assert rel_err(to_numpy(enc(ids, mask)), torch_hidden(model, ids, mask)) <= 1e-10


@pytest.fixture(scope="module")
def short_reviews(imdb_path):
    return review_batches(imdb_path, load_encoder("minilm").tokenizer)[0]


@pytest.fixture(scope="module")
def minilm_pair():
    return (BertEncoder.from_pretrained(minilm_path(), dtype="float64"),
            minilm_torch(torch.float64))


@pytest.mark.imdb
@pytest.mark.parametrize("swap", [None, 2], ids=["all-layers", "top-2"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_swapped_minilm_equals_the_torch_mirror_on_real_reviews(short_reviews, minilm_pair,
                                                                variant, swap):
    enc, model = minilm_pair
    swap_attention(model, swap_layers=swap, **variant)
    ours = enc.with_attention(swap_layers=swap, **variant)
    name, ids, mask = short_reviews
    out, ref = ours(ids, mask), torch_hidden(model, ids, mask)
    assert rel_err(out, ref) <= 1e-10
    # the swap changed something: not the softmax encoder's output
    assert rel_err(enc(ids, mask), ref) > 1e-3


def test_mirror_gets_the_padding_mask_and_keeps_unswapped_layers_on_sdpa():
    torch.manual_seed(0)
    model = random_bert(1, vocab_size=40, hidden_size=8, num_hidden_layers=3,
                        num_attention_heads=2, intermediate_size=8,
                        max_position_embeddings=16).double()
    ids = np.random.default_rng(0).integers(0, 40, (2, 9))
    mask = np.ones((2, 9), dtype=np.int64)
    mask[1, 4:] = 0
    plain = torch_hidden(model, ids, mask)
    for variant in VARIANTS:
        swap_attention(model, **variant)
        assert model.config._attn_implementation == NAME
        batch = torch_hidden(model, ids, mask)
        alone = torch_hidden(model, ids[1:, :4])
        # without the registered mask builder the padded keys would leak into row 1
        assert np.abs(batch[1, :4] - alone[0]).max() <= 1e-12
        assert rel_err(batch, plain) > 1e-3
        swap_attention(model, swap_layers=0, **variant)     # nothing swapped: SDPA everywhere
        assert rel_err(torch_hidden(model, ids, mask), plain) <= 1e-14
    swap_attention(model, "softmax")
    assert model.config._attn_implementation == "sdpa"
    assert rel_err(torch_hidden(model, ids, mask), plain) == 0


def test_mirror_layer_selection_and_mask_checks():
    assert top_layers(4, None) == [0, 1, 2, 3]
    assert top_layers(4, 1) == [3]
    assert top_layers(4, {2, 0}) == [0, 2]
    with pytest.raises(ValueError):
        top_layers(4, 5)
    causal = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="not a key-padding mask"):
        key_mask(causal, 1, 3)
    pad = torch.tensor([True, True, False]).expand(1, 1, 3, 3)
    assert key_mask(pad, 1, 3).tolist() == [[[True, True, False]]]
    assert key_mask(None, 1, 3) is None
