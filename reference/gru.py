"""torch's GRU beside :mod:`scratch.gru`: build a ``torch.nn.GRU`` with the same weights, run it
(packed when there are lengths, layer by layer with given dropout masks), and take every
gradient from autograd.  Used by the tests, the benchmark and ``python -m reference.compare``.
The torch side runs where its module's parameters are (``device=`` of :func:`torch_gru_like`:
the CPU, or CUDA beside a CuPy scratch GRU); arrays come in as NumPy or CuPy and go out as NumPy.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def to_numpy(a) -> np.ndarray:
    """A host NumPy array of ``a``: a torch tensor (any device), a CuPy array (``.get()``; a
    mirror imports no scratch module, nor CuPy), or anything ``np.asarray`` takes."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.asarray(a)


def torch_gru_like(gru, copy_weights: bool = True, device="cpu") -> nn.GRU:
    """A ``torch.nn.GRU`` with scratch ``gru``'s configuration (and weights) on ``device``."""
    ref = nn.GRU(gru.input_size, gru.hidden_size, gru.num_layers, bias=gru.bias,
                 batch_first=gru.batch_first, dropout=gru.dropout,
                 bidirectional=gru.bidirectional, dtype=TORCH_DTYPES[gru.dtype])
    if copy_weights:
        ref.load_state_dict({k: torch.from_numpy(to_numpy(v)) for k, v in
                             gru.state_dict().items()})
    return ref.to(device)


def run_packed(module, x, h0=None, lengths=None, enforce_sorted: bool = False):
    """``module(x, h0)``; with lengths, through ``pack_padded_sequence`` and back, padded to
    x's full length (``total_length``) so the shapes match the unpacked call."""
    if lengths is None:
        return module(x, h0)
    t_axis = 1 if module.batch_first else 0
    packed = pack_padded_sequence(x, torch.as_tensor(to_numpy(lengths), dtype=torch.int64),
                                  batch_first=module.batch_first, enforce_sorted=enforce_sorted)
    out, h_n = module(packed, h0)
    out, _ = pad_packed_sequence(out, batch_first=module.batch_first,
                                 total_length=x.shape[t_axis])
    return out, h_n


def run_layerwise(ref: nn.GRU, x, h0, lengths=None, masks=None):
    """``ref`` one layer at a time, multiplying layer k's output by ``masks[k]`` (scratch's
    recorded dropout masks) before layer k + 1: torch with scratch's dropout, exactly.
    Gradients flow to ``ref``'s own parameters (``functional_call``)."""
    D, H = 2 if ref.bidirectional else 1, ref.hidden_size
    params = dict(ref.named_parameters())
    u, h_ns = x, []
    for k in range(ref.num_layers):
        single = nn.GRU(u.shape[-1], H, 1, bias=ref.bias, batch_first=ref.batch_first,
                        bidirectional=ref.bidirectional, dtype=x.dtype, device=x.device)
        mapping = {name: params[name.replace("_l0", f"_l{k}")]
                   for name, _ in single.named_parameters()}
        h0_k = None if h0 is None else h0[k * D:(k + 1) * D]
        out, h_n = _call(single, mapping, u, h0_k, lengths)
        h_ns.append(h_n)
        u = out * masks[k] if (masks and k < ref.num_layers - 1) else out
    return u, torch.cat(h_ns, dim=0)


def _call(single, mapping, u, h0, lengths):
    class _Packed(nn.Module):              # functional_call needs the packing inside a module
        def __init__(self):
            super().__init__()
            self.gru = single

        def forward(self, u, h0):
            return run_packed(self.gru, u, h0, lengths)
    wrapper = _Packed()
    return functional_call(wrapper, {f"gru.{k}": v for k, v in mapping.items()}, (u, h0))


def torch_forward_backward(ref: nn.GRU, x, h0, d_out, d_hn=None, lengths=None, masks=None):
    """Everything scratch's forward + backward return, from torch autograd.

    x, h0, d_out, d_hn: arrays (h0 is required: pass zeros to get d_h0); masks: scratch's
    ``dropout_masks`` (then the model runs layer by layer, see :func:`run_layerwise`).
    Returns dict(output, h_n, d_x, d_h0, grads={name: array}) as NumPy arrays.  Runs on the
    device of ``ref``'s parameters.
    """
    ref.zero_grad(set_to_none=True)
    ref.eval()                     # torch's own dropout off: masks, if any, are scratch's
    dev = next(ref.parameters()).device

    def on_dev(a, **kw):
        return torch.tensor(to_numpy(a), device=dev, **kw)

    xt, ht = on_dev(x, requires_grad=True), on_dev(h0, requires_grad=True)
    if masks:
        out, h_n = run_layerwise(ref, xt, ht, lengths, [on_dev(m) for m in masks])
    else:
        out, h_n = run_packed(ref, xt, ht, lengths)
    loss = (out * on_dev(d_out)).sum()
    if d_hn is not None:
        loss = loss + (h_n * on_dev(d_hn)).sum()
    loss.backward()
    return dict(output=to_numpy(out), h_n=to_numpy(h_n), d_x=to_numpy(xt.grad),
                d_h0=to_numpy(ht.grad),
                grads={k: (to_numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape)))
                       for k, p in ref.named_parameters()})

