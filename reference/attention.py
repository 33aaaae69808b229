r"""The three attentions in torch; autograd gives the gradients.  Same maths, shapes and mask
convention (True = keep) as :mod:`scratch.attention`, written independently of it (masks go to
the device of ``q``, so the same functions run on the CPU or on CUDA):

* softmax: the explicit formula, and :func:`softmax_attention_sdpa` through
  ``torch.nn.functional.scaled_dot_product_attention`` (the library's own kernel);
* efficient (Shen et al.): ``rho_q(Q) (rho_k(K)^T V)``, softmax or scaling normalisation;
* linear (Katharopoulos et al.): non-causal ``phi(Q) (phi(K)^T V)``; causal as the paper's
  cumulative sums of outer products ``S_i = cumsum_j phi(K_j) V_j^T`` (memory O(n d_k d_v), no
  chunking, unlike scratch) and :func:`linear_attention_masked`, the explicit O(n^2) formula.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _causal(n: int, device=None) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def softmax_attention(q, k, v, mask=None, causal=False):
    """softmax(Q K^T / sqrt(d_k)) V with masked scores set to -inf."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(~_causal(q.shape[-2], q.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~torch.as_tensor(mask, device=q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def softmax_attention_sdpa(q, k, v, mask=None, causal=False):
    """The same through ``F.scaled_dot_product_attention`` (its boolean mask: True = attend)."""
    if mask is None and causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mask is not None:
        mask = torch.as_tensor(mask, device=q.device)
        if causal:
            mask = mask & _causal(q.shape[-2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def efficient_attention(q, k, v, key_mask=None, normalization="softmax"):
    """rho_q(Q) (rho_k(K)^T V); ``key_mask`` (..., m), True = keep."""
    keep = None if key_mask is None else torch.as_tensor(key_mask, device=q.device)[..., None]
    if normalization == "softmax":
        if keep is not None:
            k = k.masked_fill(~keep, float("-inf"))
        rho_q, rho_k = torch.softmax(q, dim=-1), torch.softmax(k, dim=-2)
    elif normalization == "scaling":
        m = float(k.shape[-2]) if keep is None else keep.sum(dim=-2, keepdim=True).to(q.dtype)
        if keep is not None:
            k = k * keep
        rho_q, rho_k = q / m ** 0.5, k / m ** 0.5
    else:
        raise ValueError(f"unknown normalization {normalization!r}")
    return rho_q @ (rho_k.transpose(-1, -2) @ v)


def feature_map(x, alpha=1.0):
    """phi(x) = elu(x) + 1."""
    return F.elu(x, alpha) + 1


def linear_attention(q, k, v, causal=False, eps=1e-6, alpha=1.0, key_mask=None):
    """phi(Q_i)^T S / (phi(Q_i)^T Z + eps); causal with cumulative sums over positions."""
    f_q, f_k = feature_map(q, alpha), feature_map(k, alpha)
    if key_mask is not None:
        f_k = f_k * torch.as_tensor(key_mask, device=q.device)[..., None]
    if not causal:
        s = f_k.transpose(-1, -2) @ v                                  # (..., d_k, d_v)
        z = f_k.sum(dim=-2)                                            # (..., d_k)
        return (f_q @ s) / ((f_q * z[..., None, :]).sum(-1, keepdim=True) + eps)
    s = torch.cumsum(f_k[..., :, None] * v[..., None, :], dim=-3)      # (..., n, d_k, d_v)
    z = torch.cumsum(f_k, dim=-2)                                      # (..., n, d_k)
    num = (f_q[..., None, :] @ s)[..., 0, :]
    return num / ((f_q * z).sum(-1, keepdim=True) + eps)


def linear_attention_masked(q, k, v, causal=False, eps=1e-6, alpha=1.0, key_mask=None):
    """The explicit formula sum_j A_ij V_j / (sum_j A_ij + eps), A_ij = phi(Q_i).phi(K_j)."""
    a = feature_map(q, alpha) @ feature_map(k, alpha).transpose(-1, -2)
    if causal:
        a = a * _causal(q.shape[-2], q.device)
    if key_mask is not None:
        a = a * torch.as_tensor(key_mask, device=q.device)[..., None, :]
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def with_grads(fn, q, k, v, d_out, **kw):
    """(out, d_q, d_k, d_v) of ``fn(q, k, v, **kw)`` for the upstream gradient ``d_out``."""
    q, k, v = (torch.as_tensor(x).detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(torch.as_tensor(d_out))
    return out.detach(), q.grad, k.grad, v.grad

