"""scratch.bert (the BERT encoder in NumPy) == transformers' BertModel: on the packaged MiniLM
with real IMDB reviews, on random small BERTs (hypothesis), with padding; bad folders and
inputs are clear errors; the module never imports torch; the tokenizer's ids equal the
reference pipeline's.  The random-BERT and activation comparisons run on each backend (``xp``:
NumPy beside torch on the CPU, CuPy beside torch on CUDA); MiniLM on CuPy against transformers
on CUDA and against NumPy."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import ndtr
from transformers.activations import ACT2FN

from reference.pipeline.data import load_imdb, tokenize
from reference.pipeline.encoders import load_encoder, minilm_path
from scratch.activations import ACTIVATIONS, gelu_exact, gelu_float32
from scratch.backend import to_numpy
from scratch.bert import BertEncoder, BertError, swapped_layers
from scratch.pipeline.tokenizer import BertTokenizer, pad_batch
from tests.bert_fixtures import (
    edit_config,
    edit_weights,
    minilm_torch,
    random_bert,
    rel_err,
    review_batches,
    torch_hidden,
)
from tests.helpers import CUPY, on, tensor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm():
    """The MiniLM folder: ``$MINILM_FOLDER`` if set (the GPU machine has only the travelling
    float16 copy, bench/gpu_travel.py), else the packaged one."""
    return os.environ.get("MINILM_FOLDER") or minilm_path()


@pytest.fixture(scope="module")
def reviews(imdb_path):
    return review_batches(imdb_path, load_encoder("minilm").tokenizer)


# ---------------------------------------------------------------------------------------------
# equal to transformers
# ---------------------------------------------------------------------------------------------

@pytest.mark.imdb
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10),
                                        # float32: both sides round differently (BLAS order,
                                        # erf vs the float32 GELU fit) through 6 layers
                                        ("float32", 1e-4)])
def test_minilm_equals_transformers_on_real_reviews(minilm, reviews, dtype, tol):
    enc = BertEncoder.from_pretrained(minilm, dtype=dtype)
    ref = minilm_torch(getattr(torch, dtype))
    for name, ids, mask in reviews:
        out = enc(ids, mask)
        assert out.dtype == np.dtype(dtype) and out.shape == ids.shape + (384,)
        err = rel_err(out, torch_hidden(ref, ids, mask))
        assert err <= tol, f"{name} batch {ids.shape}: relative error {err:.2e} > {tol}"


@pytest.mark.imdb
def test_padding_never_changes_a_real_tokens_output(minilm, reviews):
    enc = BertEncoder.from_pretrained(minilm, dtype="float64")
    for _, ids, mask in reviews:
        batch = enc(ids, mask)
        for b in range(len(ids)):
            n = int(mask[b].sum())
            if n == ids.shape[1]:
                continue                                 # not padded in this batch
            alone = enc(ids[b:b + 1, :n])
            assert np.abs(batch[b, :n] - alone[0]).max() <= 1e-12 * np.abs(alone).max()


@st.composite
def bert_cases(draw):
    heads = draw(st.integers(1, 4))
    cfg = dict(vocab_size=draw(st.integers(5, 60)), hidden_size=heads * draw(st.integers(1, 8)),
               num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=heads,
               intermediate_size=draw(st.integers(1, 24)),
               hidden_act=draw(st.sampled_from(sorted(ACTIVATIONS))),
               max_position_embeddings=draw(st.integers(4, 24)),
               type_vocab_size=draw(st.integers(1, 3)),
               layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5, 0.1])))
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, cfg["max_position_embeddings"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = rng.integers(0, cfg["vocab_size"], (B, T))
    pattern = draw(st.sampled_from(["none", "right", "random"]))
    if pattern == "none":
        mask = None
    else:
        lengths = rng.integers(1, T + 1, B)
        mask = (np.arange(T) < lengths[:, None]).astype(np.int64)
        if pattern == "random":                   # any 0/1 pattern with a token in each row
            mask = rng.integers(0, 2, (B, T))
            mask[np.arange(B), rng.integers(0, T, B)] = 1
    types = rng.integers(0, cfg["type_vocab_size"], (B, T)) if draw(st.booleans()) else None
    return cfg, ids, mask, types, draw(st.sampled_from(["float32", "float64"])), draw(
        st.integers(0, 1000))


@settings(max_examples=40)
@given(bert_cases())
def test_random_berts_equal_transformers_float64(xp, device, tmp_path_factory, case):
    cfg, ids, mask, types, saved_dtype, seed = case
    model = random_bert(seed, **cfg).to(getattr(torch, saved_dtype))
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)                        # config.json + model.safetensors
    enc = BertEncoder.from_pretrained(folder, dtype="float64", backend=xp.__name__)
    out = to_numpy(enc(*on(xp, ids, mask, types)))
    ref = torch_hidden(model.double().to(device), ids, mask, types)
    assert out.shape == ids.shape + (cfg["hidden_size"],)
    assert rel_err(out, ref) <= 1e-10


@pytest.mark.parametrize("block", [1, 40, 300, 1 << 30])
@pytest.mark.parametrize("attention", ["softmax", "efficient", "linear"])
def test_cache_blocks_do_not_change_the_result(small_folder, monkeypatch, block, attention):
    """Attention over blocks of heads / batch items and the feed-forward over blocks of rows
    give the one-block result (block 1: one head or one row at a time)."""
    enc = BertEncoder.from_pretrained(small_folder, dtype="float64", attention=attention)
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(0, 50, (3, 11)), (np.arange(11) < np.array([[11], [4], [7]]))
    whole = enc(ids, mask)
    monkeypatch.setattr("scratch.bert.CACHE_BLOCK", block)
    np.testing.assert_allclose(enc(ids, mask), whole, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------

@settings(max_examples=60)
@given(st.sampled_from(sorted(ACTIVATIONS)),
       st.lists(st.floats(-60, 60, allow_nan=False), min_size=1, max_size=50))
def test_activations_equal_transformers_float64(xp, device, name, xs):
    x = np.array(xs, dtype=np.float64)
    ref = to_numpy(ACT2FN[name](tensor(x, device)))
    # the GELU forms compute 1 + erf or 1 + tanh, which cancels for negative x (in torch as
    # here, in another order): there the bound is absolute, a few ulps of |x|
    np.testing.assert_allclose(to_numpy(ACTIVATIONS[name](on(xp, x))), ref, rtol=1e-13,
                               atol=1e-15 * max(1.0, np.abs(x).max()))


@pytest.mark.parametrize("xp", [CUPY], indirect=True)
def test_cupy_float32_gelu_is_the_exact_gelu(xp):
    """CuPy's float32 GELU takes cupyx's erf (NumPy's takes the tanh fit): within float32
    rounding of x Phi(x) computed in float64."""
    x = np.concatenate([np.linspace(-12, 12, 200_001), [-3e38, -60, 0.0, 60, 3e38]])
    x32 = x.astype(np.float32)
    got = to_numpy(ACTIVATIONS["gelu"](on(xp, x32)))
    assert got.dtype == np.float32
    exact = x32.astype(np.float64) * ndtr(x32.astype(np.float64))
    assert (np.abs(got - exact) / np.maximum(1.0, np.abs(x32))).max() <= 4e-7


def test_float32_gelu_fit_is_within_2e_7_of_exact_gelu():
    x = np.concatenate([np.linspace(-12, 12, 2_000_001),
                        [-3e38, -1e30, -60, -5.66, 0.0, 5.66, 60, 1e30, 3e38]]).astype(np.float32)
    x64 = x.astype(np.float64)
    exact = x64 * ndtr(x64)                               # x Phi(x) in float64
    fast = gelu_float32(x)
    assert fast.dtype == np.float32
    err = np.abs(fast.astype(np.float64) - exact)
    assert (err / np.maximum(1.0, np.abs(x64))).max() <= 2e-7   # measured 1.43e-7
    assert np.all(fast[x64 < -6] == 0) and np.all(fast[x64 > 6] == x[x64 > 6])


def test_exact_gelu_is_x_phi_x():
    x = np.linspace(-10, 10, 10001)
    # 1 + erf(x / sqrt 2) cancels for negative x (torch's formula too): an absolute bound there
    np.testing.assert_allclose(gelu_exact(x), x * ndtr(x), rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------

@pytest.mark.imdb
@pytest.mark.parametrize("max_length", [512, 64, 2])
def test_tokenizer_ids_equal_reference_pipeline_on_real_reviews(minilm, imdb_path, max_length):
    texts = load_imdb(imdb_path, splits=("test",))["test"].texts[:300]
    ours = BertTokenizer.from_pretrained(minilm).encode(texts, max_length=max_length)
    ref = tokenize(load_encoder("minilm").tokenizer, texts, max_length=max_length)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == np.int32 and np.array_equal(a, b)
    assert max(len(a) for a in ours) == max_length       # some review was truncated


def test_tokenizer_pads_right_and_ignores_the_files_padding(minilm):
    tok = BertTokenizer.from_pretrained(minilm)        # its tokenizer.json pads to 128
    ids, mask = tok(["Hello WORLD how ARE yoU?", "a"])
    assert ids.tolist() == [[101, 7592, 2088, 2129, 2024, 2017, 1029, 102],
                            [101, 1037, 102, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]
    ids2, mask2 = pad_batch([np.array([5, 6]), np.array([7])])
    assert ids2.tolist() == [[5, 6], [7, 0]] and mask2.tolist() == [[1, 1], [1, 0]]


def _write_tokenizer(folder, vocab):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.save(str(Path(folder) / "tokenizer.json"))


def test_tokenizer_not_the_uncased_vocabulary_is_an_error(minilm, tmp_path):
    _write_tokenizer(tmp_path, {"[PAD]": 0, "[UNK]": 1, "hello": 2})
    with pytest.raises(BertError, match="3 tokens, expected .*30522"):
        BertTokenizer.from_pretrained(tmp_path)
    # the right size, but ids shifted by one (a different vocabulary)
    vocab = json.loads((Path(minilm) / "tokenizer.json").read_text())["model"]["vocab"]
    shifted = {t: (i + 1) % len(vocab) for t, i in vocab.items()}
    _write_tokenizer(tmp_path, shifted)
    with pytest.raises(BertError, match=r"maps \[PAD\] to 1, expected 0"):
        BertTokenizer.from_pretrained(tmp_path)
    # the real vocabulary without BERT's [CLS] ... [SEP] post-processor
    _write_tokenizer(tmp_path, vocab)
    with pytest.raises(BertError, match=r"\[CLS\] hello \[SEP\]"):
        BertTokenizer.from_pretrained(tmp_path)
    with pytest.raises(BertError, match="tokenizer.json: missing"):
        BertTokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(BertError, match="not a readable tokenizers file"):
        BertTokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# bad folders, options and inputs: one BertError each, naming the problem
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    random_bert(0, vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=12, max_position_embeddings=16).save_pretrained(folder)
    return folder


@pytest.fixture
def folder(small_folder, tmp_path):
    return Path(shutil.copytree(small_folder, tmp_path / "copy"))


NAME = "encoder.layer.1.attention.self.key.weight"


@pytest.mark.parametrize("break_it, message", [
    (lambda f: (f / "config.json").unlink(), "config.json: missing"),
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors: missing"),
    (lambda f: (f / "config.json").write_text("{oops"), "not readable JSON"),
    (lambda f: edit_config(f, model_type="roberta"), "model_type 'roberta' is neither BERT nor"),
    (lambda f: edit_config(f, hidden_act="laplace"), "unknown hidden_act 'laplace'"),
    (lambda f: edit_config(f, num_attention_heads=3), "not a multiple of num_attention_heads"),
    (lambda f: edit_config(f, is_decoder=True), "is_decoder=True is not supported"),
    (lambda f: edit_config(f, position_embedding_type="relative_key"),
     "position_embedding_type='relative_key'"),
    (lambda f: edit_weights(f, lambda w: w.pop(NAME)), f"tensor '{NAME}' is missing"),
    (lambda f: edit_weights(f, lambda w: w.update({NAME: w[NAME][:, :4].copy()})),
     rf"'{NAME}' has shape \(8, 4\), expected \(8, 8\)"),
    (lambda f: edit_weights(f, lambda w: w[NAME].__setitem__((0, 0), np.nan)),
     "contains NaN or inf"),
    (lambda f: edit_weights(f, lambda w: w.update({NAME: w[NAME].astype(np.int32)})),
     "dtype I32"),
    (lambda f: (f / "model.safetensors").write_bytes(b"garbage"), "not a readable safetensors"),
])
def test_bad_folder_is_a_clear_error(folder, break_it, message):
    break_it(folder)
    with pytest.raises(BertError, match=message):
        BertEncoder.from_pretrained(folder)


def test_bad_options_are_clear_errors(folder):
    with pytest.raises(BertError, match="not a folder"):
        BertEncoder.from_pretrained(folder / "nowhere")
    with pytest.raises(BertError, match="unknown attention 'performer'"):
        BertEncoder.from_pretrained(folder, attention="performer")
    with pytest.raises(BertError, match="dtype must be float32 or float64"):
        BertEncoder.from_pretrained(folder, dtype="float16")
    with pytest.raises(BertError, match="unknown normalization"):
        BertEncoder.from_pretrained(folder, attention="efficient", normalization="l2")
    with pytest.raises(BertError, match="alpha must be in"):
        BertEncoder.from_pretrained(folder, attention="linear", alpha=0.0)
    with pytest.raises(BertError, match="swap_layers needs attention"):
        BertEncoder.from_pretrained(folder, swap_layers=1)
    with pytest.raises(BertError, match="0 <= k <= 2"):
        BertEncoder.from_pretrained(folder, attention="linear", swap_layers=3)
    with pytest.raises(BertError, match="must lie in 0..1"):
        BertEncoder.from_pretrained(folder, attention="linear", swap_layers={2})


def test_swap_layers_selects_all_top_k_or_a_set():
    assert swapped_layers(6, "linear", None) == (0, 1, 2, 3, 4, 5)
    assert swapped_layers(6, "linear", 2) == (4, 5)
    assert swapped_layers(6, "linear", 0) == ()
    assert swapped_layers(6, "efficient", {3, 0}) == (0, 3)
    assert swapped_layers(6, "softmax", None) == ()


@pytest.mark.parametrize("call, message", [
    (lambda e: e(np.array([[1, 50]])), "token id 50 is outside the vocabulary 0..49"),
    (lambda e: e(np.array([[1, -1]])), "token id -1 is outside"),
    (lambda e: e(np.ones((1, 17), dtype=int)), "17 tokens exceed max_position_embeddings 16"),
    (lambda e: e(np.ones((2,), dtype=int)), r"shape \(batch, tokens\)"),
    (lambda e: e(np.ones((1, 3))), "input_ids must be integers"),
    (lambda e: e(np.ones((2, 3), int), np.ones((2, 4), int)), "attention_mask must have"),
    (lambda e: e(np.ones((2, 3), int), np.full((2, 3), 2)), "0 \\(padding\\) and 1"),
    (lambda e: e(np.ones((2, 3), int), np.array([[1, 0, 0], [0, 0, 0]])),
     "sequence 1 has no token"),
    (lambda e: e(np.ones((1, 3), int), None, np.array([[0, 2, 0]])), "token_type_ids must lie"),
])
def test_bad_inputs_are_clear_errors(small_folder, call, message):
    with pytest.raises(BertError, match=message):
        call(BertEncoder.from_pretrained(small_folder))


@pytest.mark.parametrize("xp", [CUPY], indirect=True)
@pytest.mark.parametrize("attention", ["softmax", "efficient", "linear"])
def test_cupy_encoder_equals_numpy_encoder(xp, device, minilm, attention):
    """MiniLM on CuPy == on NumPy (float64), and, for softmax attention, == transformers'
    BertModel in float64 on CUDA; float32 on CuPy within 1e-4 of it."""
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(1000, 30000, (3, 70)), np.arange(70) < np.array([[70], [9], [33]])
    on_gpu = BertEncoder.from_pretrained(minilm, "float64", attention, backend="cupy")
    on_cpu = BertEncoder.from_pretrained(minilm, "float64", attention, backend="numpy")
    out = on_gpu(ids, mask)
    assert type(out).__module__.startswith("cupy")
    assert rel_err(to_numpy(out), on_cpu(ids, mask)) <= 1e-10
    if attention == "softmax":
        ref = minilm_torch(torch.float64, minilm).to(device)
        want = torch_hidden(ref, ids, mask.astype(np.int64))
        assert rel_err(to_numpy(out), want) <= 1e-10
        out32 = BertEncoder.from_pretrained(minilm, "float32", backend="cupy")(ids, mask)
        assert rel_err(to_numpy(out32), want) <= 1e-4


# ---------------------------------------------------------------------------------------------
# torch-free
# ---------------------------------------------------------------------------------------------

def test_scratch_bert_never_imports_torch(minilm):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None   # any 'import torch' now raises ImportError\n"
        "from scratch.bert import BertEncoder\n"
        "from scratch.pipeline.tokenizer import BertTokenizer\n"
        "folder = sys.argv[1]\n"
        "ids, mask = BertTokenizer.from_pretrained(folder)(['A torch-free sentence.'])\n"
        "h = BertEncoder.from_pretrained(folder)(ids, mask)\n"
        "assert not any(m.split('.')[0] in ('torch', 'transformers') and sys.modules[m]\n"
        "               for m in sys.modules)\n"
        "print(h.shape, h.dtype)\n")
    r = subprocess.run([sys.executable, "-c", code, minilm], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env=dict(os.environ, SCRATCH_BACKEND="numpy"))
    assert r.returncode == 0, r.stderr[-3000:]
    # [CLS] a torch - free sentence . [SEP]
    assert r.stdout.strip() == "(1, 8, 384) float32"
