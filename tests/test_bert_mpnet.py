"""scratch.bert on MPNet folders (:class:`scratch.bert.MPNetEncoder`) == transformers'
MPNetModel: on random small MPNets (hypothesis; float64 and float32), long enough inputs to reach
every bucket of the relative position bias, the installed all-mpnet-base-v2 on real IMDB
reviews; padding (pad id 1, left or right) never changes a real token's output; the attention
switch drops the bias in swapped layers only; bad MPNet folders and inputs are one BertError
each; scratch.pipeline.train computes MPNet features and scratch.pipeline.predict scores an MPNet
checkpoint as the reference pipeline does."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import MPNetConfig, MPNetForMaskedLM, MPNetModel
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder as TorchMPNetEncoder

from reference import attention as ref_attention
from reference.pipeline.data import load_imdb
from scratch.activations import ACTIVATIONS
from scratch.bert import BertEncoder, BertError, MPNetEncoder, relative_position_bucket
from scratch.bert_folder import MPNET_BUCKETS
from scratch.pipeline.encoder_names import MPNET_FOLDER, installed
from scratch.pipeline.tokenizer import BertTokenizer, pad_batch
from tests.bert_fixtures import (
    edit_config,
    edit_weights,
    random_bert,
    random_mpnet,
    rel_err,
    torch_hidden,
)

PAD = 1                                   # MPNet's pad id (transformers' padding_idx)


def saved(model, folder) -> Path:
    model.save_pretrained(folder)                        # config.json + model.safetensors
    return Path(folder)


def padded(rng, ids, pattern):
    """(ids, mask) with ``pattern`` padding: none, right or left (pad id 1, mask 0, as a
    tokenizer pads), or any 0/1 mask with a token in each row (ids left as they are)."""
    B, T = ids.shape
    if pattern == "none":
        return ids, None
    if pattern == "random":
        mask = rng.integers(0, 2, (B, T))
        mask[np.arange(B), rng.integers(0, T, B)] = 1
        return ids, mask
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T) < lengths[:, None]).astype(np.int64)          # right
    if pattern == "left":
        mask = mask[:, ::-1].copy()
    return np.where(mask == 1, ids, PAD), mask


# ---------------------------------------------------------------------------------------------
# the bucket function
# ---------------------------------------------------------------------------------------------

@settings(max_examples=30)
@given(st.integers(2, 40).map(lambda n: 2 * n), st.integers(1, 600))
def test_buckets_equal_transformers(half_buckets, max_distance):
    """Every distance -3000..3000 gets transformers' bucket, for bucket counts N (even, N/4 >=
    1) and max distances D > N/4 (MPNet itself: N = 32, D = 128)."""
    exact = half_buckets // 2                  # N/4
    max_distance = exact + max_distance        # D > N/4: the logarithm's base exceeds 1
    r = np.arange(-3000, 3001)
    want = TorchMPNetEncoder.relative_position_bucket(torch.from_numpy(r), half_buckets * 2,
                                                      max_distance).numpy()
    np.testing.assert_array_equal(relative_position_bucket(r, half_buckets * 2, max_distance),
                                  want)


def test_mpnet_buckets_by_distance():
    """N = 32, D = 128: distances 0..7 a bucket each, 8..127 logarithmic, >= 128 one bucket;
    keys after the query (r > 0) in the upper 16 (so bucket 16, "after, at distance 0", is never
    used)."""
    b = relative_position_bucket(np.arange(-200, 201))
    at = dict(zip(range(-200, 201), b.tolist(), strict=True))
    assert [at[-r] for r in range(8)] == list(range(8))
    assert [at[r] for r in range(1, 8)] == list(range(17, 24))
    assert (at[-8], at[-16], at[-32], at[-64], at[-127], at[-128], at[-200]) == (
        8, 10, 12, 14, 15, 15, 15)
    assert at[200] == 31 and set(b.tolist()) == set(range(MPNET_BUCKETS)) - {16}


# ---------------------------------------------------------------------------------------------
# equal to transformers: random MPNets
# ---------------------------------------------------------------------------------------------

@st.composite
def mpnet_cases(draw):
    heads = draw(st.integers(1, 4))
    cfg = dict(vocab_size=draw(st.integers(3, 60)), hidden_size=heads * draw(st.integers(1, 8)),
               num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=heads,
               intermediate_size=draw(st.integers(1, 24)),
               hidden_act=draw(st.sampled_from(sorted(ACTIVATIONS))),
               max_position_embeddings=draw(st.integers(3, 40)),
               relative_attention_num_buckets=draw(st.sampled_from([32, 33, 48, 64])),
               layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5, 0.1])))
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, cfg["max_position_embeddings"] - 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids, mask = padded(rng, rng.integers(0, cfg["vocab_size"], (B, T)),
                       draw(st.sampled_from(["none", "right", "left", "random"])))
    return cfg, ids, mask, draw(st.sampled_from(["float32", "float64"])), draw(
        st.integers(0, 1000))


@settings(max_examples=30)
@given(mpnet_cases())
def test_random_mpnets_equal_transformers_float64(tmp_path_factory, case):
    cfg, ids, mask, saved_dtype, seed = case
    model = random_mpnet(seed, **cfg).to(getattr(torch, saved_dtype))
    enc = BertEncoder.from_pretrained(saved(model, tmp_path_factory.mktemp("mpnet")),
                                      dtype="float64")
    assert isinstance(enc, MPNetEncoder)
    out = enc(ids, mask)
    assert out.dtype == np.float64 and out.shape == ids.shape + (cfg["hidden_size"],)
    assert rel_err(out, torch_hidden(model.double(), ids, mask)) <= 1e-10


@settings(max_examples=15)
@given(mpnet_cases())
def test_random_mpnets_equal_transformers_float32(tmp_path_factory, case):
    cfg, ids, mask, _, seed = case
    model = random_mpnet(seed, **cfg)
    enc = BertEncoder.from_pretrained(saved(model, tmp_path_factory.mktemp("mpnet")),
                                      dtype="float32")
    out = enc(ids, mask)
    assert out.dtype == np.float32
    assert rel_err(out, torch_hidden(model, ids, mask)) <= 1e-4


@pytest.fixture(scope="module")
def long_mpnet(tmp_path_factory):
    """A small random MPNet with 300 positions: distances past 128 reach every bucket."""
    cfg = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=12, max_position_embeddings=302)
    model = random_mpnet(1, **cfg).double()
    return model, saved(model, tmp_path_factory.mktemp("long"))


@pytest.mark.parametrize("pattern", ["none", "right", "left"])
def test_long_inputs_reach_every_bucket_and_equal_transformers(long_mpnet, pattern):
    model, folder = long_mpnet
    rng = np.random.default_rng(0)
    ids, mask = padded(rng, rng.integers(2, 40, (3, 300)), pattern)
    if mask is not None:
        mask[0] = 1                                  # one row of all 300 tokens
        ids[0] = rng.integers(2, 40, 300)
    out = BertEncoder.from_pretrained(folder, dtype="float64")(ids, mask)
    assert rel_err(out, torch_hidden(model, ids, mask)) <= 1e-10


@pytest.mark.parametrize("pattern", ["right", "left"])
def test_padding_never_changes_a_real_tokens_output(long_mpnet, pattern):
    """Pad id 1 with mask 0 on either side: positions skip the pads, the bias depends on
    distances only, padded keys are masked out."""
    enc = BertEncoder.from_pretrained(long_mpnet[1], dtype="float64")
    rng = np.random.default_rng(1)
    ids, mask = padded(rng, rng.integers(2, 40, (4, 150)), pattern)
    batch = enc(ids, mask)
    for b in range(len(ids)):
        real = mask[b] == 1
        alone = enc(ids[b:b + 1, real])
        assert np.abs(batch[b, real] - alone[0]).max() <= 1e-12 * np.abs(alone).max()


def test_a_masked_lm_checkpoint_reads_as_its_mpnet(tmp_path):
    """MPNetForMaskedLM saves its encoder under ``mpnet.``: read all the same."""
    cfg = MPNetConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=12, max_position_embeddings=20,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    lm = MPNetForMaskedLM(cfg).eval()
    lm.save_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, 30, (2, 9))
    out = BertEncoder.from_pretrained(tmp_path, dtype="float64")(ids)
    assert rel_err(out, torch_hidden(lm.mpnet.double(), ids)) <= 1e-10


# ---------------------------------------------------------------------------------------------
# the attention switch: swapped layers drop the bias
# ---------------------------------------------------------------------------------------------

def swap_torch_mpnet(model, attention, layers, keep, **options):
    """transformers' MPNetModel with the self-attention of ``layers`` replaced by
    reference.attention's ``attention`` on the raw per-head Q, K, V, padded keys (``keep (B,
    T)``) removed, and no relative position bias (what scratch's swapped layers compute); the
    other layers run transformers' own code, bias included."""
    mask = None if keep is None else torch.as_tensor(np.asarray(keep, dtype=bool))[:, None, :]
    fn = {"efficient": ref_attention.efficient_attention,
          "linear": ref_attention.linear_attention}[attention]
    for i in layers:
        sa = model.encoder.layer[i].attention.attn

        def forward(hidden_states, attention_mask=None, position_bias=None, sa=sa, **kw):
            B, T, H = hidden_states.shape
            heads = lambda x: x.view(B, T, -1, sa.attention_head_size).transpose(1, 2)  # noqa: E731
            q, k, v = heads(sa.q(hidden_states)), heads(sa.k(hidden_states)), heads(
                sa.v(hidden_states))                                       # (B, h, T, d)
            c = fn(q, k, v, key_mask=mask, **options)                      # (B, h, T, d)
            return (sa.o(c.transpose(1, 2).reshape(B, T, H)),)

        sa.forward = forward
    return model


@pytest.mark.parametrize("attention, options", [("efficient", {"normalization": "softmax"}),
                                                ("efficient", {"normalization": "scaling"}),
                                                ("linear", {"alpha": 0.5, "eps": 1e-6})])
@pytest.mark.parametrize("swap_layers, layers", [(None, [0, 1, 2]), (1, [2]), ({0, 2}, [0, 2])])
def test_swapped_mpnet_layers_drop_the_bias_and_equal_the_torch_mirror(
        tmp_path, attention, options, swap_layers, layers):
    cfg = dict(vocab_size=40, hidden_size=12, num_hidden_layers=3, num_attention_heads=3,
               intermediate_size=10, max_position_embeddings=40)
    model = random_mpnet(2, **cfg).double()
    folder = saved(model, tmp_path / "mpnet")
    rng = np.random.default_rng(2)
    ids, mask = padded(rng, rng.integers(2, 40, (3, 30)), "right")
    mask[0] = 1
    enc = BertEncoder.from_pretrained(folder, "float64", attention, swap_layers=swap_layers,
                                      **options)
    out = enc(ids, mask)
    mirror = swap_torch_mpnet(model, attention, layers, mask, **options)
    assert rel_err(out, torch_hidden(mirror, ids, mask)) <= 1e-10
    # the bias matters: the softmax encoder differs (the swap is not a no-op)
    assert rel_err(enc.with_attention("softmax")(ids, mask), out) > 1e-3


def test_softmax_layers_keep_the_bias(long_mpnet):
    """With a zero table the output changes: the bias is really added to the scores."""
    enc = BertEncoder.from_pretrained(long_mpnet[1], dtype="float64")
    ids = np.random.default_rng(3).integers(2, 40, (2, 20))
    flat = enc.with_attention("softmax")
    flat.rel = np.zeros_like(enc.rel)
    assert rel_err(flat(ids), enc(ids)) > 1e-3
    swapped = enc.with_attention("linear")
    no_bias = swapped.with_attention("linear")
    no_bias.rel = np.zeros_like(enc.rel)
    assert np.array_equal(swapped(ids), no_bias(ids))       # every layer swapped: no bias at all


# ---------------------------------------------------------------------------------------------
# the installed all-mpnet-base-v2 on real reviews
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_mpnet():
    folder = installed(MPNET_FOLDER)
    if folder is None:
        pytest.skip("mpnet is not installed (python -m reference.pipeline.encoders install mpnet): "
                    "the real-review MPNet comparison did not run")
    return folder


@pytest.fixture(scope="module")
def mpnet_reviews(real_mpnet, imdb_path):
    """Real test-split reviews as right-padded batches (pad id 1): the 4 shortest, and the
    longest (cut to 512 tokens: every position) beside a short one."""
    tok = BertTokenizer.from_pretrained(real_mpnet, vocabulary="mpnet")
    texts = load_imdb(imdb_path, splits=("test",))["test"].texts[:400]
    ids = tok.encode(texts, max_length=512)
    order = np.argsort([len(i) for i in ids])
    short, mixed = [ids[i] for i in order[:4]], [ids[order[-1]], ids[order[5]]]
    assert len(mixed[0]) == 512
    return [("short", *pad_batch(short, tok.pad_id)), ("mixed", *pad_batch(mixed, tok.pad_id))]


@pytest.fixture(scope="module")
def real_mpnet_torch(real_mpnet):
    return MPNetModel.from_pretrained(real_mpnet, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def real_mpnet_float64(real_mpnet, mpnet_reviews):
    """The float64 scratch encoder and its output for each batch (computed once)."""
    enc = BertEncoder.from_pretrained(real_mpnet, dtype="float64")
    return enc, [enc(ids, mask) for _, ids, mask in mpnet_reviews]


@pytest.mark.imdb
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_real_mpnet_equals_transformers_on_real_reviews(real_mpnet, real_mpnet_torch,
                                                        real_mpnet_float64, mpnet_reviews,
                                                        dtype, tol):
    if dtype == "float64":
        outs = real_mpnet_float64[1]
    else:
        enc = BertEncoder.from_pretrained(real_mpnet, dtype=dtype)
        outs = [enc(ids, mask) for _, ids, mask in mpnet_reviews]
    ref = real_mpnet_torch.to(getattr(torch, dtype))
    for (name, ids, mask), out in zip(mpnet_reviews, outs, strict=True):
        assert out.dtype == np.dtype(dtype) and out.shape == ids.shape + (768,)
        err = rel_err(out, torch_hidden(ref, ids, mask))
        assert err <= tol, f"{name} batch {ids.shape}: relative error {err:.2e} > {tol}"


@pytest.mark.imdb
def test_real_mpnet_padding_never_changes_a_real_tokens_output(real_mpnet_float64,
                                                               mpnet_reviews):
    enc, outs = real_mpnet_float64
    padded_rows = 0
    for (_, ids, mask), batch in zip(mpnet_reviews, outs, strict=True):
        for b in range(len(ids)):
            n = int(mask[b].sum())
            if n == ids.shape[1]:
                continue                                 # not padded in this batch
            padded_rows += 1
            alone = enc(ids[b:b + 1, :n])
            assert np.abs(batch[b, :n] - alone[0]).max() <= 1e-12 * np.abs(alone).max()
    assert padded_rows >= 2


# ---------------------------------------------------------------------------------------------
# bad MPNet folders and inputs: one BertError each
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_mpnet(tmp_path_factory):
    return saved(random_mpnet(0, vocab_size=50, hidden_size=8, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=12,
                              max_position_embeddings=18), tmp_path_factory.mktemp("small"))


@pytest.fixture
def folder(small_mpnet, tmp_path):
    return Path(shutil.copytree(small_mpnet, tmp_path / "copy"))


TABLE = "encoder.relative_attention_bias.weight"


def _bert_labelled_mpnet(folder):
    for f in folder.iterdir():
        f.unlink()
    random_bert(0, vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=12, max_position_embeddings=16).save_pretrained(folder)
    edit_config(folder, model_type="mpnet")


@pytest.mark.parametrize("break_it, message", [
    (lambda f: edit_weights(f, lambda w: w.pop(TABLE)), f"tensor '{TABLE}' is missing$"),
    (lambda f: edit_config(f, relative_attention_num_buckets=40),
     rf"'{TABLE}' has shape \(32, 2\), expected \(40, 2\)"),
    (lambda f: edit_weights(f, lambda w: w.update({TABLE: w[TABLE][:, :1].copy()})),
     rf"'{TABLE}' has shape \(32, 1\), expected \(32, 2\)"),
    (lambda f: edit_config(f, relative_attention_num_buckets=16),
     "relative_attention_num_buckets must be an integer >= 32"),
    (lambda f: edit_config(f, max_position_embeddings=2), "max_position_embeddings must be >= 3"),
    (_bert_labelled_mpnet, rf"'{TABLE}' is missing \(the tensors are bert's: config.json says "
                           "model_type 'mpnet'\\)"),
    (lambda f: edit_weights(f, lambda w: w.pop("encoder.layer.1.attention.attn.k.weight")),
     "'encoder.layer.1.attention.attn.k.weight' is missing"),
])
def test_bad_mpnet_folder_is_a_one_line_error(folder, break_it, message):
    break_it(folder)
    with pytest.raises(BertError, match=message) as e:
        BertEncoder.from_pretrained(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("call, message", [
    (lambda e: e(np.ones((1, 17), dtype=int)), "17 tokens exceed MPNet's 16 positions"),
    (lambda e: e(np.ones((1, 3), int), None, np.zeros((1, 3), int)), "MPNet has no token types"),
    (lambda e: e(np.array([[0, 50]])), "token id 50 is outside the vocabulary 0..49"),
])
def test_bad_mpnet_inputs_are_clear_errors(small_mpnet, call, message):
    enc = BertEncoder.from_pretrained(small_mpnet)
    assert enc(np.ones((1, 16), dtype=int)).shape == (1, 16, 8)          # 16 tokens fit
    with pytest.raises(BertError, match=message):
        call(enc)


# ---------------------------------------------------------------------------------------------
# the scratch pipeline with an MPNet encoder
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mpnet_world(tmp_path_factory):
    """A tiny random MPNet folder (hidden 16, the real MPNet vocabulary's tokenizer, as
    tests/test_encoders.py builds it) and a tiny aclImdb tree."""
    from tests.imdb_fixtures import make_tree
    from tests.test_encoders import mpnet_tokenizer

    root = tmp_path_factory.mktemp("mpnet-world")
    make_tree(root, n_per_class=6)
    folder = saved(random_mpnet(4, scale=0.2, vocab_size=30_527, hidden_size=16,
                                num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                                max_position_embeddings=514), root / "tiny-mpnet")
    mpnet_tokenizer(folder).save_pretrained(folder)
    return root, folder


def test_scratch_computes_missing_mpnet_features_equal_to_the_reference(mpnet_world, tmp_path):
    from reference.pipeline import features as rfeatures
    from reference.pipeline.encoders import load_encoder
    from scratch.pipeline import train as strain
    from scratch.pipeline.encoder_names import Encoder
    from tests.imdb_fixtures import review

    _, folder = mpnet_world
    texts = [review(i, i % 2 == 0) for i in range(8)] + ["A fine film. " * 30]
    enc = Encoder.inspect(str(folder))
    enc.load_tokenizer()
    mine = strain.features(enc, texts, tmp_path / "s", 32, False)
    assert mine.meta["computed_by"].startswith("scratch")
    ref = rfeatures.extract_features(load_encoder(str(folder)), texts, tmp_path / "r",
                                     max_length=32, autocast=False, progress=False)
    np.testing.assert_array_equal(mine.lengths, ref.lengths)
    for i in range(len(texts)):
        a, b = mine.get(i).astype(np.float64), ref.get(i).astype(np.float64)
        # float16 storage (2^-11 relative) of two float32 encoders: at most 2 ulps apart
        assert np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)) <= 2 * 2.0 ** -11


def test_scratch_train_and_predict_run_an_mpnet_encoder_as_the_reference(mpnet_world, tmp_path,
                                                                         capsys):
    """scratch.pipeline.train --encoder (an MPNet folder) computes its features and trains; both
    pipelines' predict score that checkpoint alike (whole models: encoder + head)."""
    from reference.pipeline import predict as rpredict
    from scratch.pipeline import predict as spredict
    from scratch.pipeline import train as strain

    root, folder = mpnet_world
    out = tmp_path / "run"
    assert strain.main(["--data", str(root / "aclImdb"), "--encoder", str(folder), "--out",
                        str(out), "--cache", str(tmp_path / "cache"), "--max-length", "32",
                        "--epochs", "1", "--batch-size", "4", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["encoder_source"] == str(folder)
    texts = ["great wonderful superb", "awful boring dull terrible waste", "x",
             "A long, slow and dull film " * 9]
    model, tok, config = rpredict.load_model(out)
    want = rpredict.predict_batch(model, tok, texts, config["max_length"], batch_size=3)
    enc, stok, head, sconfig = spredict.load_model(out)
    assert isinstance(enc, MPNetEncoder)
    got = spredict.predict_batch(enc, stok, head, texts, sconfig["max_length"], batch_size=2)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    capsys.readouterr()
    assert spredict.main(["--checkpoint", str(out), *texts]) == 0
    printed = [float(line.split()[0]) for line in capsys.readouterr().out.splitlines()]
    assert printed == pytest.approx(want, abs=1e-4)          # printed to 4 decimals
