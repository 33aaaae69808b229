"""scratch.encoder_layer: one BERT encoder layer's forward (training mode) and backward, against
torch autograd through transformers' own ``BertLayer`` (``model.encoder.layer[i]`` of a random
``BertModel``, eager attention, called with the extended additive mask), central differences
without torch, padding, the additive score bias, and the weights of a ``BertEncoder``.

Dropout: scratch draws and records its masks; torch is run in train mode with the *same* masks
(its two hidden ``nn.Dropout`` modules replaced by "multiply by this mask", and the functional
dropout that ``eager_attention_forward`` calls on the attention probabilities patched to do the
same, after checking it is called with training=True and the module's p).
"""
from __future__ import annotations

import contextlib
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig as TorchBertConfig
from transformers import BertModel

from scratch.activations import ACTIVATIONS
from scratch.backend import to_numpy
from scratch.bert import BertEncoder
from scratch.encoder_layer import (
    ACTIVATION_GRADS,
    DROPOUT_SITES,
    PARAM_NAMES,
    EncoderLayer,
    param_shapes,
)
from tests.helpers import assert_close, central_differences, on

# d b_k is 0 in exact arithmetic (softmax ignores a shift of its row; b_k shifts row i by
# q_i . b_k): rounding noise on every side, compared with an absolute tolerance.
KEY_BIAS = "attention.self.key.bias"
F64_TOL = 1e-9      # float64; the worst seen over 200 random cases was 7e-14
F32_TOL = 2e-5      # float32, both sides in float32 with the same masks (eps 1.2e-7; sums of
                    # <= 24 terms through two LayerNorms): up to ~7e-6 seen on well-conditioned
                    # cases; ill-conditioned ones are bounded by torch's own float32 error
                    # (check_against_torch)


def err(a, b, scale=None) -> float:
    """max |a - b| / max |b| over whole arrays (0 when both are exactly 0); ``scale`` replaces
    max |b| for arrays that are 0 in exact arithmetic."""
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = np.abs(b).max() if scale is None else scale
    diff = np.abs(a - b).max()
    return 0.0 if diff == 0 else float(diff / scale) if scale > 0 else math.inf


# ---------------------------------------------------------------------------------------------
# the torch side
# ---------------------------------------------------------------------------------------------

def random_model(seed, hidden_size, num_attention_heads, intermediate_size, hidden_act="gelu",
                 layer_norm_eps=1e-12, attention_dropout=0.0, hidden_dropout=0.0, layers=1,
                 dtype=torch.float64, scale=0.5, vocab_size=30, max_position=32) -> BertModel:
    """A BertModel (eager attention, the given dropout probabilities) whose every parameter is
    N(0, scale^2) (LayerNorm weights 1 + noise), as tests/bert_fixtures.random_bert."""
    cfg = TorchBertConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                          num_hidden_layers=layers, num_attention_heads=num_attention_heads,
                          intermediate_size=intermediate_size, hidden_act=hidden_act,
                          layer_norm_eps=layer_norm_eps, hidden_dropout_prob=hidden_dropout,
                          attention_probs_dropout_prob=attention_dropout,
                          max_position_embeddings=max_position, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * scale
            p.copy_(1.0 + noise if name.endswith("LayerNorm.weight") else noise)
    assert model.config._attn_implementation == "eager"
    return model


class _Times(torch.nn.Module):
    """Dropout with a given mask: x * mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


@contextlib.contextmanager
def same_masks(layer, masks, dtype):
    """Within: ``layer`` (a transformers BertLayer) applies scratch's ``masks`` instead of
    drawing its own.  The functional dropout of the attention probabilities must be called
    exactly once per forward, in training mode, with the module's p."""
    if not masks or all(m is None for m in masks.values()):
        yield
        return
    t = {k: None if m is None else torch.tensor(to_numpy(m), dtype=dtype) for k, m in masks.items()}
    saved = layer.attention.output.dropout, layer.output.dropout
    layer.attention.output.dropout = (torch.nn.Identity() if t["attention_output"] is None
                                      else _Times(t["attention_output"]))
    layer.output.dropout = torch.nn.Identity() if t["output"] is None else _Times(t["output"])
    calls = []

    def attention_dropout(x, p=0.5, training=True, inplace=False):
        assert training and p == layer.attention.self.dropout.p, (training, p)
        calls.append(tuple(x.shape))
        return x if t["attention"] is None else x * t["attention"]

    try:
        with mock.patch.object(torch.nn.functional, "dropout", attention_dropout):
            yield
    finally:
        layer.attention.output.dropout, layer.output.dropout = saved
    assert len(calls) == 1, calls


def torch_layer_run(layer, x, mask=None, bias=None, d_out=None, training=False, masks=None):
    """(out, d_x, {name: grad}) of transformers' BertLayer, in its parameters' dtype: the
    extended additive mask (1 - mask) * finfo.min (B, 1, 1, T), plus ``bias`` when given."""
    dtype = next(layer.parameters()).dtype
    xt = torch.tensor(np.asarray(x), dtype=dtype, requires_grad=True)
    B, T, _ = xt.shape
    ext = None
    if mask is not None:
        m = torch.tensor(np.asarray(mask), dtype=dtype)
        ext = (1.0 - m)[:, None, None, :] * torch.finfo(dtype).min        # (B, 1, 1, T)
    if bias is not None:
        bt = torch.tensor(np.asarray(bias), dtype=dtype)
        ext = bt.expand(B, *bt.shape[-3:]) if ext is None else ext + bt   # (B, h, T, T)
    layer.zero_grad(set_to_none=True)
    layer.train(training)
    with same_masks(layer, masks if training else None, dtype):
        out = layer(xt, attention_mask=ext)
    layer.eval()
    if d_out is None:
        return out.detach().numpy(), None, None
    out.backward(torch.tensor(np.asarray(d_out), dtype=dtype))
    return (out.detach().numpy(), xt.grad.numpy(),
            {n: p.grad.numpy() for n, p in layer.named_parameters()})


def scratch_layer(model, index=0, dtype="float64", seed=0, xp=np):
    cfg = model.config
    sd = {n: p.detach().double().numpy()
          for n, p in model.encoder.layer[index].state_dict().items()}
    return EncoderLayer(sd, cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps,
                        cfg.attention_probs_dropout_prob, cfg.hidden_dropout_prob, dtype=dtype,
                        seed=seed, xp=xp)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

def padding_mask(rng, B, T, pattern):
    if pattern == "none":
        return None
    if pattern == "right":
        lengths = rng.integers(1, T + 1, B)
        return (np.arange(T) < lengths[:, None]).astype(np.int64)
    mask = rng.integers(0, 2, (B, T))                 # any 0/1 pattern with a token in each row
    mask[np.arange(B), rng.integers(0, T, B)] = 1
    return mask


@st.composite
def layer_cases(draw):
    heads = draw(st.integers(1, 4))
    # H >= 3: LayerNorm over 2 features maps every row to +-1 (times gamma, plus beta), its
    # Jacobian is ~eps / (r_1 - r_2)^2 ~ 0, so every gradient below it is rounding noise on
    # both sides and no relative error means anything.
    d = draw(st.integers(2 if heads > 1 else 3, 6))
    cfg = dict(hidden_size=heads * d, num_attention_heads=heads,
               intermediate_size=draw(st.integers(1, 24)),
               hidden_act=draw(st.sampled_from(sorted(ACTIVATIONS))),
               layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5])),
               attention_dropout=draw(st.sampled_from([0.0, 0.1, 0.5])),
               hidden_dropout=draw(st.sampled_from([0.0, 0.1, 0.5])))
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    mask = padding_mask(rng, B, T, draw(st.sampled_from(["none", "right", "random"])))
    bias = {"none": None, "heads": rng.standard_normal((heads, T, T)),
            "batch": rng.standard_normal((B, heads, T, T))}[
        draw(st.sampled_from(["none", "heads", "batch"]))]
    x = rng.standard_normal((B, T, cfg["hidden_size"]))
    d_out = rng.standard_normal((B, T, cfg["hidden_size"]))
    return cfg, x, mask, bias, d_out, draw(st.booleans()), draw(st.integers(0, 1000))


def grad_errors(out, d_x, grads, t_out, t_dx, t_grads) -> dict:
    """{what: err} for the output, d_x and every parameter gradient (``t_*`` the reference).
    d b_k is 0 in exact arithmetic (see KEY_BIAS): measured against the scale of its
    neighbour d b_q, and checked itself to be that small."""
    errors = {"out": err(out, t_out), "d_x": err(d_x, t_dx)}
    errors |= {n: err(grads[n], t_grads[n]) for n in PARAM_NAMES if n != KEY_BIAS}
    q_scale = np.abs(t_grads["attention.self.query.bias"]).max()
    errors[KEY_BIAS] = err(grads[KEY_BIAS], t_grads[KEY_BIAS], q_scale)
    errors["d b_k itself"] = err(grads[KEY_BIAS], 0 * t_grads[KEY_BIAS], q_scale)
    return errors


def check_against_torch(cfg, x, mask, bias, d_out, training, seed, dtype, tol, xp=np):
    """scratch vs torch on one case: output, d_x and every parameter's gradient within ``tol``
    (relative to each array's largest entry); returns the worst error.

    float32: where torch's own float32 result is further than ``tol / 4`` from the float64
    truth (same weights, inputs and masks; an ill-conditioned case: a LayerNorm row of nearly
    equal features, a saturated softmax), the bound for that array is 4x torch's own error
    instead: scratch must then be about as accurate as torch, not closer to it than float32
    allows."""
    tdt = {"float64": torch.float64, "float32": torch.float32}[dtype]
    model = random_model(seed, dtype=tdt, **cfg)
    layer = scratch_layer(model, dtype=dtype, seed=seed, xp=xp)
    x, d_out = x.astype(dtype), d_out.astype(dtype)
    bias = None if bias is None else bias.astype(dtype)
    out = layer(on(xp, x), attention_mask=mask, bias=on(xp, bias), training=training)
    d_x = layer.backward(on(xp, d_out))
    masks = layer.dropout_masks
    for site in DROPOUT_SITES:                        # a mask exactly where dropout acts
        assert (masks[site] is not None) == (training and layer.p[site] > 0), site
    for n in PARAM_NAMES:
        assert to_numpy(layer.grads[n]).dtype == np.dtype(dtype)
    assert to_numpy(out).dtype == to_numpy(d_x).dtype == np.dtype(dtype)
    ref = torch_layer_run(model.encoder.layer[0], x, mask, bias, d_out, training, masks)
    assert set(layer.grads) == set(ref[2]) == set(PARAM_NAMES)
    errors = grad_errors(out, d_x, layer.grads, *ref)
    bounds = dict.fromkeys(errors, tol)
    if dtype == "float32":
        up = lambda a: None if a is None else to_numpy(a).astype(np.float64)   # noqa: E731
        truth = torch_layer_run(model.double().encoder.layer[0], up(x), mask, up(bias),
                                up(d_out), training, {k: up(m) for k, m in masks.items()})
        own = grad_errors(*ref, *truth)
        bounds = {k: max(tol, 4 * own[k]) if own[k] > tol / 4 else tol for k in errors}
    worst = max(errors, key=lambda k: errors[k] / bounds[k])
    assert errors[worst] <= bounds[worst], (worst, errors[worst], bounds[worst], errors)
    return errors[worst]


# ---------------------------------------------------------------------------------------------
# against transformers' BertLayer
# ---------------------------------------------------------------------------------------------

WORST = {}      # worst errors seen, printed with -s (the report's numbers)


@settings(max_examples=40)
@given(layer_cases())
def test_forward_and_gradients_equal_bert_layer_float64(xp, case):
    """Random small configs (hidden, heads, intermediate, every hidden_act, LayerNorm eps,
    dropout p), batch shapes, lengths, padding patterns (none / right / any), no bias or a
    (h, T, T) or (B, h, T, T) one, eval or training mode (dropout with the same masks):
    output, d_x and all 16 parameter gradients within 1e-9 of torch autograd, float64."""
    e = check_against_torch(*case, dtype="float64", tol=F64_TOL, xp=xp)
    WORST["float64"] = max(WORST.get("float64", 0.0), e)


@settings(max_examples=15)
@given(layer_cases())
def test_forward_and_gradients_equal_bert_layer_float32(xp, case):
    """The same in float32 on both sides (same masks), within F32_TOL.  (Both hypothesis
    tests also run scratch on CuPy where a GPU computes, torch staying on the CPU.)"""
    e = check_against_torch(*case, dtype="float32", tol=F32_TOL, xp=xp)
    WORST["float32"] = max(WORST.get("float32", 0.0), e)


def test_dropout_in_training_with_shared_masks_float64():
    """A fixed case with every dropout on (p = 0.3 and 0.2) and padding: the masks scratch drew
    are what torch applies, and the results agree; the same forward in eval mode differs."""
    cfg = dict(hidden_size=8, num_attention_heads=2, intermediate_size=12, hidden_act="gelu",
               attention_dropout=0.3, hidden_dropout=0.2)
    rng = np.random.default_rng(1)
    x, d_out = rng.standard_normal((3, 5, 8)), rng.standard_normal((3, 5, 8))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    check_against_torch(cfg, x, mask, None, d_out, True, 7, "float64", F64_TOL)
    model = random_model(7, **cfg)
    layer = scratch_layer(model)
    train = layer(x, mask, training=True)
    assert err(train, layer(x, mask)) > 1e-3                        # dropout did something


def test_bias_equals_torch_float_mask():
    """An additive (h, T, T) or (B, h, T, T) bias = torch with the bias added to its additive
    4-D float mask (MPNet's relative position bias enters this way), with padding, float64."""
    cfg = dict(hidden_size=12, num_attention_heads=3, intermediate_size=10, hidden_act="gelu")
    rng = np.random.default_rng(2)
    B, T = 2, 6
    x, d_out = rng.standard_normal((B, T, 12)), rng.standard_normal((B, T, 12))
    mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]])
    for shape in ((3, T, T), (B, 3, T, T)):
        bias = 2.0 * rng.standard_normal(shape)
        check_against_torch(cfg, x, mask, bias, d_out, False, 3, "float64", F64_TOL)
        model = random_model(3, **cfg)
        layer = scratch_layer(model)
        assert err(layer(x, mask, bias=bias), layer(x, mask)) > 1e-3   # the bias matters


# ---------------------------------------------------------------------------------------------
# torch-free checks
# ---------------------------------------------------------------------------------------------

def tiny_layer(seed=0, hidden_act="gelu", H=4, heads=2, I=6, p=0.25):
    rng = np.random.default_rng(seed)
    params = {n: (1.0 if n.endswith("LayerNorm.weight") else 0.0) + 0.5 * rng.standard_normal(s)
              for n, s in param_shapes(H, I).items()}
    return EncoderLayer(params, heads, hidden_act, 1e-12, p, p, dtype="float64", seed=seed)


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "silu"])
def test_gradients_equal_central_differences(hidden_act):
    """Without torch: every entry of every parameter and of x, by central differences
    (float64, h = 1e-6) of L = sum(out * R), in training mode with fixed dropout masks, padding
    and a (B, h, T, T) bias."""
    layer = tiny_layer(hidden_act=hidden_act)
    rng = np.random.default_rng(5)
    B, T, H = 2, 3, 4
    x = rng.standard_normal((B, T, H))
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    bias = rng.standard_normal((B, 2, T, T))
    R = rng.standard_normal((B, T, H))
    layer(x, mask, bias, training=True)
    masks = dict(layer.dropout_masks)
    assert all(m is not None for m in masks.values())

    def loss():
        return float((layer(x, mask, bias, training=True, masks=masks, cache=False) * R).sum())

    layer(x, mask, bias, training=True, masks=masks)
    d_x = layer.backward(R)
    grads = layer.grads
    for name in PARAM_NAMES:               # d b_k is 0 (softmax's shift invariance): atol
        assert_close(grads[name], central_differences(loss, layer.params[name]), 1e-6, name,
                     atol=1e-9 if name == KEY_BIAS else 0.0)
    assert_close(d_x, central_differences(loss, x), 1e-6, "d_x")


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivatives_equal_central_differences(name):
    """act'(z) of every hidden_act against central differences of act, float64 (away from
    relu's kink at 0)."""
    z = np.linspace(-6.0, 6.0, 241) + 0.0123
    act = ACTIVATIONS[name]
    h = 1e-6
    numeric = (act(z + h) - act(z - h)) / (2 * h)
    assert_close(ACTIVATION_GRADS[name](z), numeric, 1e-7, name)


def test_padding_neither_receives_nor_sends_gradient():
    """With d_out = 0 on padded rows (a loss that reads real tokens only): padded positions get
    d_x = 0 exactly (real outputs do not depend on them), and new content at the padded
    positions changes nothing about the real tokens: outputs, d_x, weight gradients."""
    layer = tiny_layer(seed=3, H=6, heads=3, I=8, p=0.2)
    rng = np.random.default_rng(9)
    B, T, H = 3, 5, 6
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 0, 1]])
    real = mask.astype(bool)
    x = rng.standard_normal((B, T, H))
    d_out = rng.standard_normal((B, T, H)) * real[..., None]
    bias = rng.standard_normal((3, T, T))
    out = layer(x, mask, bias, training=True)
    masks = dict(layer.dropout_masks)
    d_x = layer.backward(d_out)
    grads = {n: g.copy() for n, g in layer.grads.items()}
    assert not d_x[~real].any()                                   # exactly 0
    assert np.abs(d_x[real]).min() > 0
    x2 = x.copy()
    x2[~real] = 100.0 * rng.standard_normal(x2[~real].shape)      # other padding content
    out2 = layer(x2, mask, bias, training=True, masks=masks)
    d_x2 = layer.backward(d_out)
    assert np.array_equal(out2[real], out[real])
    assert not np.array_equal(out2[~real], out[~real])            # padded rows are computed
    assert np.array_equal(d_x2, d_x)
    for n in PARAM_NAMES:
        assert_close(layer.grads[n], grads[n], 1e-14, n, atol=1e-12 if n == KEY_BIAS else 0.0)


def test_right_padded_sequence_equals_the_sequence_alone():
    """A right-padded sequence's real tokens: outputs and d_x equal those of the sequence run
    alone without padding (same dropout masks, cut), and the weight gradients of the padded
    batch (d_out = 0 on padding) are the sum of the sequences' own."""
    layer = tiny_layer(seed=4, H=6, heads=2, I=5, p=0.3)
    rng = np.random.default_rng(11)
    B, T, H = 3, 6, 6
    lengths = [6, 4, 1]
    mask = (np.arange(T) < np.array(lengths)[:, None]).astype(int)
    x = rng.standard_normal((B, T, H))
    d_out = rng.standard_normal((B, T, H)) * mask[..., None]
    out = layer(x, mask, training=True)
    masks = dict(layer.dropout_masks)
    d_x = layer.backward(d_out)
    total = {n: np.zeros_like(g) for n, g in layer.grads.items()}
    summed = {n: g.copy() for n, g in layer.grads.items()}
    for b, L in enumerate(lengths):
        cut = {"attention": masks["attention"][b:b + 1, :, :L, :L],
               "attention_output": masks["attention_output"][b:b + 1, :L],
               "output": masks["output"][b:b + 1, :L]}
        alone = layer(x[b:b + 1, :L], None, training=True, masks=cut)
        d_alone = layer.backward(d_out[b:b + 1, :L])
        assert_close(out[b:b + 1, :L], alone, 1e-13, f"out {b}")
        assert_close(d_x[b:b + 1, :L], d_alone, 1e-13, f"d_x {b}")
        for n in PARAM_NAMES:
            total[n] += layer.grads[n]
    for n in PARAM_NAMES:
        assert_close(summed[n], total[n], 1e-12, n, atol=1e-12 if n == KEY_BIAS else 0.0)


def test_dropout_masks_are_recorded_and_injectable():
    """Masks hold 0 or 1/(1-p), keep about 1-p, have the documented shapes; injecting the
    recorded masks reproduces the forward exactly; eval mode draws none and refuses masks."""
    layer = tiny_layer(seed=6, H=8, heads=2, I=8, p=0.4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 10, 8))
    out = layer(x, training=True)
    m = layer.dropout_masks
    shapes = {"attention": (4, 2, 10, 10), "attention_output": (4, 10, 8), "output": (4, 10, 8)}
    for site in DROPOUT_SITES:
        assert m[site].shape == shapes[site]
        assert set(np.unique(m[site])) <= {0.0, 1.0 / 0.6}
        assert abs((m[site] > 0).mean() - 0.6) < 0.1
    again = layer(x, training=True, masks=m)
    assert np.array_equal(again, out)
    layer(x)
    assert all(v is None for v in layer.dropout_masks.values())
    with pytest.raises(ValueError, match="evaluation"):
        layer(x, masks=m)
    with pytest.raises(ValueError, match="shape"):
        layer(x, training=True, masks={"output": m["output"][:, :5]})


# ---------------------------------------------------------------------------------------------
# the BertEncoder's weights
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    model = random_model(21, 12, 3, 20, hidden_act="gelu", layers=3, vocab_size=40)
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    return folder, model


def test_layers_from_the_encoder_equal_its_forward_and_write_back(bert_folder):
    """EncoderLayer.from_encoder reads each BertEncoder layer (stored W^T, Q K V stacked) back
    to transformers' names and layout (= the torch state dict); the layers run in sequence on
    the embeddings reproduce the encoder's output; changed weights written back with write_to
    are what the encoder then runs."""
    folder, model = bert_folder
    enc = BertEncoder.from_pretrained(folder, dtype="float64", backend="numpy")
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 40, (2, 7))
    mask = np.array([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    layers = [EncoderLayer.from_encoder(enc, i) for i in range(3)]
    for i, layer in enumerate(layers):
        want = model.encoder.layer[i].state_dict()
        assert layer.dtype == np.float64 and set(layer.params) == set(want)
        for n, a in layer.state_dict().items():
            assert np.array_equal(a, want[n].numpy()), n
        back = layer.to_layer()
        for field in ("w_qkv", "b_qkv", "w_o", "b_o", "ln1_g", "ln1_b", "w_1", "b_1",
                      "w_2", "b_2", "ln2_g", "ln2_b"):
            assert np.array_equal(getattr(back, field), getattr(enc.layers[i], field)), field
    with torch.no_grad():
        h0 = model.embeddings(input_ids=torch.tensor(ids)).numpy()

    def chain():
        h = h0
        for layer in layers:
            h = layer(h, mask, cache=False)
        return h

    assert err(chain(), enc(ids, mask)) <= 1e-12
    # a step on the top layer's weights, written back
    top = layers[2]
    top(layers[1](layers[0](h0, mask), mask), mask)
    top.backward(rng.standard_normal((2, 7, 12)))
    for n in PARAM_NAMES:
        top.params[n] -= 0.1 * top.grads[n]
    before = enc(ids, mask)
    top.write_to(enc, 2)
    after = enc(ids, mask)
    assert err(after, before) > 1e-3
    assert err(chain(), after) <= 1e-12
    # and transformers agrees with the updated encoder
    model.encoder.layer[2].load_state_dict({n: torch.tensor(a)
                                            for n, a in top.state_dict().items()})
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids),
                    attention_mask=torch.tensor(mask)).last_hidden_state
    assert err(after[mask.astype(bool)], ref.numpy()[mask.astype(bool)]) <= 1e-10


def test_adam_steps_on_the_layer_equal_torch():
    """Fine-tuning's use: scratch.optim.Adam over ``layer.params`` stepping with
    ``layer.grads`` (three steps, dropout with shared masks) gives the weights torch.optim.Adam
    gives the BertLayer, float64."""
    from scratch.optim import Adam

    cfg = dict(hidden_size=8, num_attention_heads=2, intermediate_size=16, hidden_act="gelu",
               attention_dropout=0.1, hidden_dropout=0.1)
    model = random_model(13, **cfg)
    t_layer = model.encoder.layer[0]
    layer = scratch_layer(model, seed=13)
    opt, t_opt = Adam(layer.params, lr=1e-2), torch.optim.Adam(t_layer.parameters(), lr=1e-2)
    rng = np.random.default_rng(4)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    for _ in range(3):
        x, d_out = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
        layer(x, mask, training=True)
        layer.backward(d_out)
        opt.step(layer.grads)
        torch_layer_run(t_layer, x, mask, None, d_out, True, layer.dropout_masks)
        t_opt.step()
    for n, p in t_layer.named_parameters():
        # b_k's gradient is rounding noise (~1e-16, see KEY_BIAS), which Adam turns into steps
        # of ~lr * 1e-16 / eps = 1e-10 that differ between the two: 1e-8 for it
        assert err(layer.params[n], p.detach().numpy()) <= (1e-8 if n == KEY_BIAS else 1e-12), n


def test_bad_inputs_are_clear_errors():
    layer = tiny_layer()
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="no token"):
        layer(x, np.array([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="0 .padding. and 1"):
        layer(x, np.array([[1, 2, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="bias must have shape"):
        layer(x, bias=np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="d_out"):
        layer(x)
        layer.backward(np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="num_heads"):
        EncoderLayer(layer.params, 3)
    with pytest.raises(RuntimeError, match="before backward"):
        tiny_layer().backward(x)


def test_report_worst_errors():
    """Not a check: prints the worst errors the hypothesis tests above saw (run with -s)."""
    print("\nworst relative errors vs torch:", WORST)
