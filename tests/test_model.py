"""reference.model: the assignment's BERT-BiGRU, its three fixes, and the fast exact packing.

Independent references: torch's own ``pack_padded_sequence`` path for the packed semantics, and
the assignment's forward written out literally for ``faithful=True``.
"""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import BertConfig, BertModel

from reference.model import (
    BERTGRUSentiment,
    GRUHead,
    count_parameters,
    freeze_bert,
    reverse_within_length,
)

TINY = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=64, pad_token_id=0)


def tiny_bert(seed=0, **kw):
    torch.manual_seed(seed)
    return BertModel(BertConfig(**(TINY | kw)), add_pooling_layer=False).eval()


def packed_h_n(rnn, x, lengths):
    """torch's packed path: the reference semantics."""
    return rnn(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False))[1]


def assignment_forward(model, text):
    """The assignment's forward, verbatim (bert without mask, GRU over the padding)."""
    with torch.no_grad():
        embedded = model.bert(text)[0]
    _, hidden = model.rnn(embedded)
    hidden = model.dropout(torch.cat((hidden[-2], hidden[-1]), dim=1))
    return model.out(hidden)


def random_ids(lengths, vocab=60, pad_to=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = pad_to or max(lengths)
    text = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        text[i, :n] = torch.randint(1, vocab, (n,), generator=g)
    return text


# --- the assignment's sizes ------------------------------------------------------------------

def test_parameter_counts_of_the_assignment_model():
    torch.manual_seed(0)
    model = BERTGRUSentiment(BertModel(BertConfig()), 256, 1, 2, True, 0.25)
    assert count_parameters(model) == 112_241_409
    freeze_bert(model)
    assert count_parameters(model, trainable_only=True) == 2_759_169
    # the frozen parameters are exactly BERT's
    assert sum(p.numel() for p in model.bert.parameters()) == 112_241_409 - 2_759_169
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"bert", "rnn", "out"}          # the assignment's state_dict names


def test_head_matches_assignment_layout():
    head = GRUHead(384, 256, 1, 2, True, 0.25)
    assert head.rnn.dropout == 0.25 and head.rnn.batch_first and head.rnn.bidirectional
    assert head.out.in_features == 512 and head.dropout.p == 0.25
    assert GRUHead(8, 4, 1, 1, True, 0.25).rnn.dropout == 0      # as nn.GRU wants for 1 layer


# --- fast exact packing vs torch's packed path ------------------------------------------------

@st.composite
def gru_case(draw):
    B = draw(st.integers(1, 6))
    T = draw(st.integers(1, 9))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    return dict(B=B, T=T, lengths=lengths, E=draw(st.integers(1, 6)), H=draw(st.integers(1, 5)),
                layers=draw(st.integers(1, 3)), bi=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@given(gru_case())
def test_fast_path_equals_pack_padded_sequence(case):
    """Final states, logits and every gradient (parameters and input) equal torch's packed path."""
    torch.manual_seed(case["seed"])
    head = GRUHead(case["E"], case["H"], 1, case["layers"], case["bi"], 0.0).double()
    x = torch.randn(case["B"], case["T"], case["E"], dtype=torch.float64, requires_grad=True)
    L = torch.tensor(case["lengths"])

    ours = head._packed(head.rnn, x, L)
    ref = packed_h_n(head.rnn, x, L)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)

    w = torch.randn_like(ref)                      # a generic scalar loss of all final states
    g_ours = torch.autograd.grad((ours * w).sum(), [x, *head.rnn.parameters()])
    g_ref = torch.autograd.grad((ref * w).sum(), [x, *head.rnn.parameters()])
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_fast_path_float32_logits_and_grads_at_assignment_sizes():
    torch.manual_seed(1)
    head = GRUHead(24, 16, 1, 2, True, 0.25).eval()
    x = torch.randn(8, 30, 24)
    L = torch.tensor([30, 29, 28, 5, 1, 17, 30, 12])
    logits = head(x, L)
    hid = packed_h_n(head.rnn, x, L)
    ref = head.out(torch.cat((hid[-2], hid[-1]), 1))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(logits.sum(), list(head.parameters()))
    g2 = torch.autograd.grad(ref.sum(), list(head.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@given(st.integers(1, 5), st.integers(1, 8), st.integers(0, 1000))
def test_reverse_within_length(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3, generator=g)
    L = torch.randint(1, T + 1, (B,), generator=g)
    y = reverse_within_length(x, L)
    for i in range(B):
        n = int(L[i])
        assert torch.equal(y[i, :n], x[i, :n].flip(0))
        assert torch.equal(y[i, n:], x[i, n:])
    assert torch.equal(reverse_within_length(y, L), x)


def test_padding_does_not_change_head_scores():
    torch.manual_seed(2)
    head = GRUHead(6, 5, 1, 2, True, 0.25).eval()
    x = torch.randn(3, 7, 6)
    L = torch.tensor([7, 2, 4])
    more = torch.cat([x, 100 * torch.randn(3, 11, 6)], dim=1)   # any junk after the end
    torch.testing.assert_close(head(more, L), head(x, L), rtol=0, atol=0)
    alone = torch.cat([head(x[i:i + 1, :int(L[i])], None) for i in range(3)])
    torch.testing.assert_close(head(x, L), alone, rtol=1e-6, atol=1e-6)


def test_train_mode_dropout_between_layers_is_active_and_seeded():
    head = GRUHead(6, 5, 1, 2, True, 0.5).train()
    x, L = torch.randn(4, 9, 6), torch.tensor([9, 3, 5, 9])
    torch.manual_seed(0)
    a = head._packed(head.rnn, x, L)
    torch.manual_seed(0)
    b = head._packed(head.rnn, x, L)
    torch.manual_seed(1)
    c = head._packed(head.rnn, x, L)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # layer 0 sees no dropout (nn.GRU drops only between layers): its states match eval
    torch.testing.assert_close(a[:2], head.eval()._packed(head.rnn, x, L)[:2])


def _layer(rnn, k):
    """A 1-layer bidirectional nn.GRU holding layer ``k`` of ``rnn``'s weights."""
    g = torch.nn.GRU(rnn.hidden_size * 2 if k else rnn.input_size, rnn.hidden_size, 1,
                     batch_first=True, bidirectional=True)
    g.load_state_dict({n: getattr(rnn, n.replace("_l0", f"_l{k}")).detach()
                       for n, _ in g.named_parameters()})
    return g


def test_dropout_mask_is_shared_by_both_directions():
    """nn.GRU drops a layer's output sequence once and both directions of the next layer read
    that one dropped sequence.  Rebuilt here from torch's packed path layer by layer, with the
    mask drawn from the same generator state (shape (B, T, 2H), in natural time order)."""
    torch.manual_seed(3)
    head = GRUHead(4, 3, 1, 2, True, 0.3).train()
    x, L = torch.randn(2, 5, 4), torch.tensor([5, 3])
    torch.manual_seed(7)
    ours = head._packed(head.rnn, x, L)
    with torch.no_grad():
        out0 = pad_packed_sequence(_layer(head.rnn, 0)(pack_padded_sequence(
            x, L, batch_first=True, enforce_sorted=False))[0], batch_first=True, total_length=5)[0]
        torch.manual_seed(7)
        keep = torch.empty(2, 5, 6).bernoulli_(0.7) / 0.7
        ref1 = _layer(head.rnn, 1)(pack_padded_sequence(out0 * keep, L, batch_first=True,
                                                        enforce_sorted=False))[1]
    torch.testing.assert_close(ours[2:].detach(), ref1, rtol=1e-5, atol=1e-6)
    assert (keep == 0).any()                         # the mask did drop something


def _uni_layer(rnn, k):
    """A 1-layer unidirectional nn.GRU holding layer ``k`` of ``rnn``'s weights (shared, so
    gradients reach ``rnn``)."""
    g = torch.nn.GRU(rnn.hidden_size if k else rnn.input_size, rnn.hidden_size, 1,
                     batch_first=True, dtype=rnn.weight_hh_l0.dtype)
    for n, _ in list(g.named_parameters()):
        setattr(g, n, getattr(rnn, n.replace("_l0", f"_l{k}")))
    return g


@pytest.mark.parametrize("n_layers", [2, 3])
def test_unidirectional_multilayer_head_reads_the_last_layer(n_layers):
    """bidirectional=False with n_layers >= 2: the readout is hidden[-1], the last layer's final
    state (with one layer hidden[0] and hidden[-1] coincide, so only this case tells them
    apart).  Eval: logits and every gradient equal torch's packed path.  Train: dropout
    between layers and on the readout, against torch's packed path run layer by layer with the
    masks drawn in the same order from the same generator state."""
    torch.manual_seed(n_layers)
    head = GRUHead(5, 4, 1, n_layers, False, 0.3).double().eval()
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    L = torch.tensor([7, 2, 5, 1])
    params = [x.requires_grad_(), *head.parameters()]
    hid = packed_h_n(head.rnn, x, L)
    assert hid.shape == (n_layers, 4, 4)
    ref = head.out(hid[-1])
    assert not torch.allclose(ref, head.out(hid[0]))            # the two readings differ here
    logits = head(x, L)
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-12)
    g_ours = torch.autograd.grad(logits.sum(), params)
    g_ref = torch.autograd.grad(ref.sum(), params)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)

    head.train()
    torch.manual_seed(11)
    logits = head(x, L)
    layers = [_uni_layer(head.rnn, k) for k in range(n_layers)]  # (their init draws numbers)
    torch.manual_seed(11)
    u, p = x, head.rnn.dropout
    for k, layer in enumerate(layers):
        out_k, h_k = layer(pack_padded_sequence(u, L, batch_first=True, enforce_sorted=False))
        if k < n_layers - 1:
            out_k = pad_packed_sequence(out_k, batch_first=True, total_length=7)[0]
            # drawn in (T, B, H) memory order, as the fast path's: it draws with empty_like of
            # a batch_first nn.GRU output, which is a transposed (T, B, H) array
            keep = torch.empty(7, 4, 4, dtype=out_k.dtype).bernoulli_(1 - p).transpose(0, 1)
            u = out_k * keep / (1 - p)
    ref = head.out(head.dropout(h_k[-1]))
    assert not torch.allclose(ref, head.eval().out(h_k[-1]))    # dropout did something
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-12)
    g_ours = torch.autograd.grad(logits.sum(), params)
    g_ref = torch.autograd.grad(ref.sum(), params)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_head_errors_name_the_problem():
    head = GRUHead(6, 5, 1, 1, True, 0.0)
    with pytest.raises(ValueError, match=r"features must be \(batch, time, 6\)"):
        head(torch.randn(2, 3, 7), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=r"lengths must be in 1..3"):
        head(torch.randn(2, 3, 6), torch.tensor([4, 1]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        head(torch.randn(2, 3, 6), torch.tensor([3]))


# --- the full model: mask, packing, eval-mode encoder ------------------------------------------

def test_full_model_score_does_not_change_with_more_padding():
    model = BERTGRUSentiment(tiny_bert(), 8, 1, 2, True, 0.25).eval()
    lengths = [9, 4, 6, 2]
    short = random_ids(lengths)
    long = random_ids(lengths, pad_to=40)            # same ids, 31 more [PAD] columns
    assert torch.equal(long[:, :9], short)
    torch.testing.assert_close(model(long), model(short), rtol=1e-5, atol=1e-6)
    one = torch.cat([model(short[i:i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(model(short), one, rtol=1e-5, atol=1e-6)


def test_faithful_model_is_the_assignment_and_padding_changes_it():
    model = BERTGRUSentiment(tiny_bert(), 8, 1, 2, True, 0.25, faithful=True).eval()
    short, long = random_ids([9, 4, 6]), random_ids([9, 4, 6], pad_to=40)
    torch.testing.assert_close(model(long), assignment_forward(model, long), rtol=0, atol=0)
    assert not torch.allclose(model(long), model(short), atol=1e-4)   # the bug fixed by default


def test_full_model_equals_masked_bert_then_torch_packed_gru():
    """Independent computation: bert with the mask, torch's packed GRU, the assignment readout."""
    model = BERTGRUSentiment(tiny_bert(), 8, 1, 2, True, 0.25).eval()
    text = random_ids([12, 3, 7, 12, 5], pad_to=15)
    mask = (text != 0).long()
    with torch.no_grad():
        emb = model.bert(text, attention_mask=mask)[0]
    hid = packed_h_n(model.rnn, emb, mask.sum(1))
    ref = model.out(torch.cat((hid[-2], hid[-1]), dim=1))
    torch.testing.assert_close(model(text), ref, rtol=1e-5, atol=1e-6)
    # and the cached-features route: features -> head gives the same score
    feats, lengths = model.encode(text)
    torch.testing.assert_close(GRUHead.forward(model, feats, lengths), model(text), rtol=0, atol=0)
    head = GRUHead(16, 8, 1, 2, True, 0.25).eval()
    head.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("bert")})
    torch.testing.assert_close(head(emb, mask.sum(1)), model(text), rtol=1e-6, atol=1e-6)


def test_encoder_stays_in_eval_mode_while_the_head_trains():
    model = BERTGRUSentiment(tiny_bert(hidden_dropout_prob=0.5), 8, 1, 2, True, 0.25)
    model.train()
    assert model.training and model.rnn.training and not model.bert.training
    assert all(not m.training for m in model.bert.modules())
    text = random_ids([9, 4, 6])
    feats1, _ = model.encode(text)
    feats2, _ = model.encode(text)
    assert torch.equal(feats1, feats2)               # no dropout inside BERT
    faithful = BERTGRUSentiment(tiny_bert(hidden_dropout_prob=0.5), 8, 1, 2, True, 0.25,
                                faithful=True).train()
    assert faithful.bert.training                    # the assignment's behaviour, kept on request
    f1, _ = faithful.encode(text)
    f2, _ = faithful.encode(text)
    assert not torch.equal(f1, f2)


def test_frozen_encoder_gets_no_gradient_and_head_does():
    model = freeze_bert(BERTGRUSentiment(tiny_bert(), 8, 1, 2, True, 0.25)).train()
    model(random_ids([9, 4, 6])).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.bert.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if not n.startswith("bert"))


def test_full_model_rejects_bad_input():
    model = BERTGRUSentiment(tiny_bert(), 8, 1, 1, False, 0.0)
    with pytest.raises(ValueError, match="text must be"):
        model(torch.ones(3, dtype=torch.long))
    assert model(random_ids([3, 2])).shape == (2, 1)          # unidirectional works too
    assert np.isfinite(model(random_ids([3, 2])).detach().numpy()).all()
