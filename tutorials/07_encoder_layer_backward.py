# %% [markdown]
# # 7. One transformer encoder layer, backward, derived beside the code
#
# `--unfreeze-top K` trains the top K layers of the encoder together with the sentiment head.
# Nothing in NumPy does that for us: every gradient of a BERT layer (two LayerNorms, a GELU,
# multi-head attention with a padding mask, two residuals, three dropouts) is written by hand.
# This tutorial derives each piece, shows the lines of code that implement it, and checks it
# twice on the spot: against torch autograd (float64) and, without torch, against central
# differences.  Then it assembles the whole layer and checks it against transformers' own
# `BertLayer`.
#
# **What you will learn**
#
# * the layer's forward as equations with shapes, and the line of code behind each;
# * the backward of LayerNorm, of GELU, of softmax and of attention with a padding mask,
#   derived and checked; why a padded key gets *exactly* zero gradient, and why the key bias
#   `b_k` has no gradient at all (what the code computes for it is rounding noise);
# * the two rules that glue the pieces: residual branches *add* gradients, inverted dropout
#   *multiplies* the gradient by the very mask of the forward;
# * the assembled backward against transformers' `BertLayer`, parameter by parameter;
# * where the gradient goes: to which tokens, through which branch, in a random layer and in
#   a pretrained one (MiniLM's top layer);
# * why MPNet's relative position bias changes nothing in the backward.
#
# The code explained here: [`scratch/encoder_layer.py`](../scratch/encoder_layer.py) (the layer,
# its pieces, the equations in its docstring), [`scratch/activations.py`](../scratch/activations.py)
# (GELU), [`scratch/top_layers.py`](../scratch/top_layers.py) (what `--unfreeze-top K` trains)
# and MPNet's bias in [`scratch/bert.py`](../scratch/bert.py) (`relative_position_bias`).  The
# tests that prove the layer on random configurations: `tests/test_bert_layer_backward.py`.
#
# Sizes are tiny on purpose (a few tokens, a hidden size of 16): the maths is the point, and
# central differences need two forwards per number.

# %%
import inspect
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import LogNorm
from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel
from tutorial_kit import pick, plt, show, table

from reference.pipeline.encoders import quiet_transformers
from reference.timing import pin_threads
from reference.top_layers import TopLayers as TorchTopLayers
from scratch.activations import ACTIVATIONS
from scratch.bert import BertEncoder
from scratch.encoder_layer import (
    ACTIVATION_GRADS,
    PARAM_NAMES,
    EncoderLayer,
    attention_backward,
    attention_forward,
    gelu_grad,
    layer_norm_backward,
    layer_norm_forward,
    param_shapes,
)
from scratch.pipeline.encoder_names import minilm_path
from scratch.pipeline.tokenizer import BertTokenizer
from scratch.top_layers import TopLayers, checkpoint_names, layer_param

pin_threads(1)
rng = np.random.default_rng(0)
B, T, H, heads, I_ff = 3, pick(8, 5), pick(16, 8), pick(4, 2), pick(32, 16)
d = H // heads
lengths = np.array([T, T - 3, 2])                     # sequence 0 full, 1 and 2 right-padded
keep = np.arange(T)[None, :] < lengths[:, None]       # (B, T): True = a real token
EPS = 1e-12                                           # BERT's LayerNorm eps
P_DROP = 0.2


def rel(got, want, scale=None) -> float:
    """max |got - want| / max |want| (or / scale): the relative error of a whole array."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max() if scale is None else scale
    return float(np.abs(got - want).max() / scale)


def autograd(fn, inputs, d_out):
    """torch autograd in float64: the gradients of sum(fn(*inputs) * d_out), one per input."""
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in inputs]
    fn(*ts).backward(torch.as_tensor(d_out, dtype=torch.float64))
    return [t.grad.numpy() for t in ts]


def numeric(loss, a, h=1e-6):
    """d loss / d a by central differences, entry by entry, no torch (a is nudged in place and
    restored): truncation error O(h^2), rounding O(eps |loss| / h), about 1e-10 relative."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        saved = a[i]
        a[i] = saved + h
        up = loss()
        a[i] = saved - h
        grad[i] = (up - loss()) / (2 * h)
        a[i] = saved
    return grad


def check(piece, mine, torch_fn, loss, inputs, d_out, names):
    """Print, for each gradient of ``mine``, its relative error against torch autograd of
    ``torch_fn`` and against central differences of ``loss`` (NumPy); return torch's."""
    theirs = autograd(torch_fn, inputs, d_out)
    table([{"piece": piece, "gradient": n, "shape": str(a.shape),
            "vs torch autograd": rel(m, t), "vs central differences": rel(m, numeric(loss, a))}
           for n, m, t, a in zip(names, mine, theirs, inputs, strict=True)], floatfmt="{:.1e}")
    return theirs


def show_code(fn, first, last):
    """Print the source lines of ``fn`` from the one containing ``first`` to the one containing
    ``last``, numbered as in their file."""
    lines, start = inspect.getsourcelines(fn)
    i = next(n for n, s in enumerate(lines) if first in s)
    j = next(n for n in range(i, len(lines)) if last in lines[n])
    path = Path(inspect.getsourcefile(fn))
    print(f"{path.relative_to(path.parents[1])}, lines {start + i}-{start + j}:")
    for n in range(i, j + 1):
        print(f"{start + n:4d} | {lines[n].rstrip()}")


# %% [markdown]
# ## 1. The forward, with shapes
#
# `B` sequences of `T` tokens, hidden size `H`, `h` heads of `d = H / h` features, feed-forward
# width `I`; `x` is the layer's input `(B, T, H)` and `keep (B, T)` says which tokens are real.
# BERT's layer is *post*-LayerNorm (the residual sum is normalised):
#
# $$
# \begin{aligned}
# Q &= x W_q^\top + b_q,\quad K = x W_k^\top + b_k,\quad V = x W_v^\top + b_v
#   && (B, T, H) \to \text{heads } (B, h, T, d) \\
# S &= Q K^\top / \sqrt{d} + \beta + \text{mask}, \quad
#   \text{mask}_{j} = 0 \text{ (real key } j\text{)},\ -\infty \text{ (padded)} && (B, h, T, T) \\
# P &= \operatorname{softmax}(S) \text{ over keys}, \qquad \tilde P = P \odot M_{att}
#   && (B, h, T, T) \\
# C &= \tilde P V, \text{ heads joined};\qquad o = (C W_o^\top + b_o) \odot M_1 && (B, T, H) \\
# a &= \mathrm{LN}_1(x + o) && (B, T, H) \\
# z &= a W_1^\top + b_1,\qquad f = \mathrm{GELU}(z) && (B, T, I) \\
# y &= (f W_2^\top + b_2) \odot M_2;\qquad \text{out} = \mathrm{LN}_2(a + y) && (B, T, H)
# \end{aligned}
# $$
#
# `beta` is an additive score bias that is not trained (none in BERT; MPNet's relative position
# bias, section 5); `M_att, M_1, M_2` are dropout masks (sections 2.5, 2.6), all ones outside
# training.  In the code, line for line (`lin(u, n)` is `u W^T + b`, `heads` splits `H` into
# `h x d`):

# %%
show_code(EncoderLayer.forward, "q, k, v = (heads(", 'p["output.LayerNorm.bias"], self.layer_norm')

# %% [markdown]
# A layer with random weights (LayerNorm gains near 1, everything else N(0, 0.5^2)), its 16
# parameters named as in transformers' `BertLayer`, run on a padded batch.  What the forward
# records for the backward, and the shapes:

# %%
params = {n: (1.0 if n.endswith("LayerNorm.weight") else 0.0) + 0.5 * rng.standard_normal(s)
          for n, s in param_shapes(H, I_ff).items()}
layer = EncoderLayer(params, heads, "gelu", EPS, attention_dropout=P_DROP,
                     hidden_dropout=P_DROP, dtype="float64", seed=0)
x = rng.standard_normal((B, T, H))
mask = keep.astype(np.int64)                          # attention_mask: 1 = token, 0 = padding
out = layer(x, mask)
record = layer._cache                                 # what backward() reads
meaning = {"x": "input", "q": "queries, per head", "k": "keys", "v": "values",
           "prob": "attention probabilities P", "c": "attention context C, heads joined",
           "a": "LN_1(x + o)", "z": "feed-forward pre-activation", "f": "GELU(z)"}
table([(n, str(record[n].shape), m) for n, m in meaning.items()] + [("out", str(out.shape),
      "LN_2(a + y)")], ["name", "shape", "what"])
print(layer)

# %% [markdown]
# ## 2. The pieces, derived and checked
#
# Notation: `d_u` is $\partial L / \partial u$ for a scalar loss `L`; upstream we are handed
# `G = d_out`.  Each check prints the relative error `max |mine - reference| / max |reference|`
# against torch autograd (float64) and against central differences of the NumPy forward
# (float64, `h = 1e-6`: expect about 1e-9 there, the differences' own accuracy).
#
# ### 2.1 LayerNorm
#
# Per row $r \in \mathbb{R}^H$ (one token):
# $\mu = \overline{r}$, $\sigma^2 = \overline{(r - \mu)^2}$ (bars: means over the `H` features),
# $s = (\sigma^2 + \epsilon)^{-1/2}$, $\hat r = (r - \mu)\, s$,
# $\mathrm{LN}(r) = \gamma \odot \hat r + \beta_{LN}$.
#
# The parameters first: $d\gamma = \sum_{\text{rows}} G \odot \hat r$,
# $d\beta_{LN} = \sum_{\text{rows}} G$, and $g = G \odot \gamma$ is $d\hat r$.  Then two
# derivatives of the statistics: $\partial\mu / \partial r_i = 1/H$, and
# $\partial \sigma^2 / \partial r_i = \tfrac{2}{H}(r_i - \mu)$ (the path through $\mu$ drops
# out because $\sum_j (r_j - \mu) = 0$), so
# $\partial s / \partial r_i = -\tfrac12 s^3 \cdot \tfrac2H (r_i - \mu) = -\tfrac{s^2}{H}\hat r_i$.
# Hence
#
# $$
# \frac{\partial \hat r_j}{\partial r_i}
#   = s\Big(\delta_{ij} - \frac1H\Big) + (r_j - \mu)\frac{\partial s}{\partial r_i}
#   = s\Big(\delta_{ij} - \frac1H - \frac1H \hat r_i \hat r_j\Big),
# \qquad
# d r_i = \sum_j g_j \frac{\partial \hat r_j}{\partial r_i}
#   = s\,\big(g_i - \overline{g} - \hat r_i\, \overline{g \odot \hat r}\big).
# $$
#
# Read it as a projection: `d_r` is `g` with its mean and its component along `r^` removed,
# times `s`.  LayerNorm forgets a shift and a scale of its input, so the gradient has nothing
# along those two directions: `mean(d_r) = 0`, and `d_r . r^ = s (g . r^) eps / (sigma^2 + eps)`,
# zero up to `eps`.  The code:

# %%
show_code(layer_norm_backward, "d_gamma = (g_out", "d_r *= s")

# %%
r, G_ln = rng.standard_normal((B, T, H)), rng.standard_normal((B, T, H))
gamma, beta_ln = 1.0 + 0.5 * rng.standard_normal(H), 0.5 * rng.standard_normal(H)
_, r_hat, s = layer_norm_forward(r, gamma, beta_ln, EPS)
d_r, d_gamma, d_beta = layer_norm_backward(G_ln, r_hat, s, gamma)
check("LayerNorm", (d_r, d_gamma, d_beta), lambda r, g, b: F.layer_norm(r, (H,), g, b, EPS),
      lambda: float((layer_norm_forward(r, gamma, beta_ln, EPS)[0] * G_ln).sum()),
      (r, gamma, beta_ln), G_ln, ("d_r", "d_gamma", "d_beta"))
cosine = (d_r * r_hat).sum(-1) / np.linalg.norm(d_r, axis=-1) / np.linalg.norm(r_hat, axis=-1)
print(f"max |mean of d_r| over rows: {np.abs(d_r.mean(-1)).max():.1e} (0: LN ignores a shift)")
print(f"max |cosine(d_r, r^)| over rows: {np.abs(cosine).max():.1e} (0: LN ignores a scale)")

# %% [markdown]
# ### 2.2 GELU
#
# BERT's activation is the exact GELU, $\mathrm{GELU}(z) = z\,\Phi(z)$ with
# $\Phi(z) = \tfrac12\big(1 + \operatorname{erf}(z / \sqrt2)\big)$ the normal CDF.  The product
# rule gives
#
# $$
# \mathrm{GELU}'(z) = \Phi(z) + z\,\varphi(z), \qquad
# \varphi(z) = \frac{e^{-z^2/2}}{\sqrt{2\pi}},
# $$
#
# and in the layer $d z = d f \odot \mathrm{GELU}'(z)$, element by element.  Unlike ReLU's 0 or
# 1, it goes above 1 and below 0 (GELU has a minimum at negative `z`), and since
# $\Phi(-z) = 1 - \Phi(z)$ and $\varphi$ is even, $\mathrm{GELU}'(z) + \mathrm{GELU}'(-z) = 1$:
# the overshoot above 1 mirrors the dip below 0.  `hidden_act` values like `gelu_new` use the
# tanh approximation: another function, another derivative (`ACTIVATION_GRADS` holds one per
# activation).

# %%
show_code(gelu_grad, "phi_cdf = _erf(", "phi_cdf += zz * xp.exp")
z = np.linspace(-4.0, 4.0, pick(801, 161))
G_z = rng.standard_normal(z.shape)
gelu = ACTIVATIONS["gelu"]
check("GELU", (G_z * gelu_grad(z),), F.gelu, lambda: float((gelu(z) * G_z).sum()), (z,), G_z,
      ("d_z",))
slope = gelu_grad(z)
i0 = np.flatnonzero(np.diff(np.sign(slope)))[0]       # GELU' changes sign between i0, i0 + 1
crossing = z[i0] - slope[i0] * (z[i0 + 1] - z[i0]) / (slope[i0 + 1] - slope[i0])
print(f"GELU' ranges over [{slope.min():.3f}, {slope.max():.3f}]: minimum at z = "
      f"{z[slope.argmin()]:.2f}, maximum at z = {z[slope.argmax()]:.2f}, changes sign at z = "
      f"{crossing:.2f}; max |GELU'(z) + GELU'(-z) - 1| = "
      f"{np.abs(slope + gelu_grad(-z) - 1).max():.1e}")
print(f"max |exact - tanh-approximated GELU'| on [-4, 4]: "
      f"{np.abs(slope - ACTIVATION_GRADS['gelu_new'](z)).max():.1e}")

fig, ax = plt.subplots(figsize=(7, 3.6))
ax.plot(z, gelu(z), label="GELU(z) = z Phi(z)")
ax.plot(z, slope, label="GELU'(z) = Phi(z) + z phi(z)")
ax.plot(z, (z > 0).astype(float), ":", color="grey", label="ReLU'(z)")
ax.axhline(0.0, color="black", lw=0.6)
ax.set(xlabel="z", ylim=(-0.5, 2.0), title="GELU and the factor it puts on the gradient")
ax.legend()
show(fig, "07_gelu")

# %% [markdown]
# *GELU's derivative is a smooth ReLU' that overshoots: negative (the gradient changes sign)
# for z below about -0.75, above 1 for z above about 0.75, peaking at 1.13 at z = sqrt(2).*

# %% [markdown]
# ### 2.3 Softmax
#
# One row: $p_j = e^{s_j} / \sum_k e^{s_k}$, so $\partial p_j / \partial s_i = p_j(\delta_{ij} -
# p_i)$ and
#
# $$
# d s_i = \sum_j d p_j\, p_j(\delta_{ij} - p_i) = p_i\Big(d p_i - \sum_j d p_j\, p_j\Big),
# \qquad\text{i.e.}\qquad d S = P \odot \big(dP - \operatorname{rowsum}(dP \odot P)\big).
# $$
#
# Two consequences the layer relies on:
# (i) $\sum_i d s_i = \sum_i p_i\, d p_i - \big(\sum_i p_i\big)\sum_j d p_j\, p_j = 0$: every row
# of `d_S` sums to zero (softmax ignores a constant added to its row);
# (ii) where $p_i = 0$, a masked key with score $-\infty$, $d s_i = 0$ *exactly*, whatever
# $d p_i$ is.  In `attention_backward`:

# %%
show_code(attention_backward, "d_p -= (d_p * p)", "d_s *= p")


def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


S = np.where(keep[:, None, None, :], 2.0 * rng.standard_normal((B, heads, T, T)), -np.inf)
d_P = rng.standard_normal(S.shape)
P = softmax(S)
d_S = P * (d_P - (d_P * P).sum(axis=-1, keepdims=True))
check("softmax", (d_S,), lambda s: torch.softmax(s, -1),
      lambda: float((softmax(S) * d_P).sum()), (S,), d_P, ("d_S",))
print(f"max |rowsum(d_S)|: {np.abs(d_S.sum(-1)).max():.1e};  nonzero d_S at masked keys: "
      f"{np.count_nonzero(d_S[np.isneginf(S)])} of {np.isneginf(S).sum()}")

# %% [markdown]
# ### 2.4 Attention with a padding mask
#
# Per sequence and head, with $S = Q K^\top/\sqrt d + \beta + \text{mask}$, $P = \operatorname
# {softmax}(S)$ and $C = P V$ (dropout on `P` waits until 2.6), the matrix products give
# $d(AB) \to (dA = dX\, B^\top,\ dB = A^\top dX)$:
#
# $$
# dV = P^\top dC, \qquad dP = dC\, V^\top, \qquad
# dS = P \odot \big(dP - \operatorname{rowsum}(dP \odot P)\big), \qquad
# dQ = \frac{dS\, K}{\sqrt d}, \qquad dK = \frac{dS^\top Q}{\sqrt d}.
# $$
#
# `beta` and the mask are constants added to `S`: they have no gradient and appear in the
# backward only through the values of `P`.
#
# **Padded keys get exactly zero gradient.**  A padded key `j` has $S_{ij} = -\infty$, so
# $P_{ij} = 0$ for every query `i`; by 2.3, $dS_{ij} = 0$; then
# $dK_j = \sum_i dS_{ij} Q_i / \sqrt d = 0$ and $dV_j = \sum_i P_{ij}\, dC_i = 0$: products with
# exact zeros, not small numbers.  (A padded *query* row is computed as transformers does, and
# gets gradient only if the loss reads it.)
#
# **The key bias has no gradient.**  $K = x W_k^\top + b_k$ adds $Q_i \cdot b_k / \sqrt d$ to
# every score of row `i`: a shift of the row, which softmax ignores.  In the algebra:
# $d b_k = \sum_j dK_j = \sum_i \big(\sum_j dS_{ij}\big) Q_i / \sqrt d = 0$ by 2.3 (i).  The code
# computes `d b_k` as `sum over rows of d_K` like any other bias; what comes out is the rounding
# error of rows that sum to zero in exact arithmetic.  (`b_q` is different: it adds
# $b_q \cdot K_j / \sqrt d$, which varies along the row.)

# %%
show_code(attention_backward, "d_v = pd.swapaxes", "return d_s @ k")
q, k, v = (rng.standard_normal((B, heads, T, d)) for _ in range(3))
d_C = rng.standard_normal((B, heads, T, d))
_, P, P_dropped = attention_forward(q, k, v, keep)
d_q, d_k, d_v = attention_backward(d_C, q, k, v, P, P_dropped)
padded_key = torch.from_numpy(~keep)[:, None, None, :]


def torch_attention(q, k, v, drop=None):
    """softmax(Q K^T / sqrt(d), padded keys -inf) [* drop] V, in torch."""
    p = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(padded_key, -math.inf),
                      dim=-1)
    return (p if drop is None else p * drop) @ v


t_dq, t_dk, t_dv = check("attention", (d_q, d_k, d_v), torch_attention,
                         lambda: float((attention_forward(q, k, v, keep)[0] * d_C).sum()),
                         (q, k, v), d_C, ("d_Q", "d_K", "d_V"))
for name, ours, theirs in (("d_K", d_k, t_dk), ("d_V", d_v, t_dv)):
    at_pad = [g.transpose(0, 2, 1, 3)[~keep] for g in (ours, theirs)]    # (padded keys, h, d)
    print(f"{name} at the {(~keep).sum()} padded keys: {np.count_nonzero(at_pad[0])} nonzero "
          f"entries (torch: {np.count_nonzero(at_pad[1])}) of {at_pad[0].size}")

rows = []
for dt in (np.float64, np.float32):
    qq, kk, vv, dc = (u.astype(dt) for u in (q, k, v, d_C))
    _, pp, ppd = attention_forward(qq, kk, vv, keep)
    dq_, dk_, _ = attention_backward(dc, qq, kk, vv, pp, ppd)
    d_bq, d_bk = dq_.sum(axis=(0, 2)), dk_.sum(axis=(0, 2))     # (h, d): sums over all rows
    rows.append((np.dtype(dt).name, np.abs(d_bq).max(), np.abs(d_bk).max(),
                 np.abs(d_bk).max() / np.abs(d_bq).max(), np.finfo(dt).eps))
table(rows, ["dtype", "max |d b_q|", "max |d b_k|", "ratio", "machine eps"], floatfmt="{:.1e}")

# %% [markdown]
# The ratio `|d b_k| / |d b_q|` follows the machine epsilon of the dtype (the last column),
# whatever the data: `d b_k` is rounding noise, and torch's is different noise.  That
# is why the tests compare `d b_k` on the scale of its neighbour `d b_q`, never on its own.
#
# ### 2.5 Residuals add gradients; dropout multiplies them by its mask
#
# The feed-forward sub-layer, with its residual and its dropout:
# $z = a W_1^\top + b_1$, $f = \mathrm{GELU}(z)$, $y = (f W_2^\top + b_2)\odot M_2$,
# $\text{out} = \mathrm{LN}_2(a + y)$.
#
# **Residual.**  `a` is used twice: by the branch and, unchanged, by the sum `a + y`.  The
# multivariate chain rule adds the gradients of every path a variable feeds:
#
# $$
# d r_2 = \mathrm{LN}_2'(G), \qquad
# d a = \underbrace{d r_2}_{\text{residual: identity}} +
#       \underbrace{d z\, W_1}_{\text{through the branch}} .
# $$
#
# The residual path hands `d_r2` down untouched; the branch's share is added to it.  (The same
# happens at `x + o` under `LN_1`, and at `x`, which feeds `Q`, `K`, `V` *and* the residual.)
#
# **Inverted dropout.**  In training, $M_2$ holds 0 (dropped, probability `p`) or
# $1/(1 - p)$ (kept, scaled so that the expected output is unchanged); it is drawn in the
# forward and is a constant of the step.  An element-wise product with a constant
# differentiates into the same product: $d u = d y \odot M_2$.  Dropped units get exactly
# zero gradient, kept ones the same `1/(1 - p)` as in the forward; to compare with torch, both
# sides must use the same masks (section 3).  The rest is the chain rule:
# $dW_2 = du^\top f$, $db_2 = \sum_{\text{rows}} du$, $dz = (du\, W_2) \odot \mathrm{GELU}'(z)$,
# $dW_1 = dz^\top a$, $db_1 = \sum_{\text{rows}} dz$.  In `EncoderLayer.backward`:

# %%
show_code(EncoderLayer.backward, "# LN_2 and the second residual", "d_a += d_z @ p[")
a = rng.standard_normal((B, T, H))
W1, b1 = 0.5 * rng.standard_normal((I_ff, H)), 0.5 * rng.standard_normal(I_ff)
W2, b2 = 0.5 * rng.standard_normal((H, I_ff)), 0.5 * rng.standard_normal(H)
M2 = (rng.random((B, T, H)) >= P_DROP) / (1.0 - P_DROP)          # 0 or 1 / (1 - p)
G_ffn = rng.standard_normal((B, T, H))


def ffn_sublayer(a, W1, b1, W2, b2):
    """LN_2(a + dropout(GELU(a W1^T + b1) W2^T + b2)) -> (out, z, r^, s)."""
    z = a @ W1.T + b1
    y = (gelu(z) @ W2.T + b2) * M2
    out, o_hat, o_s = layer_norm_forward(a + y, gamma, beta_ln, EPS)
    return out, z, o_hat, o_s


_, z, o_hat, o_s = ffn_sublayer(a, W1, b1, W2, b2)
d_r2 = layer_norm_backward(G_ffn, o_hat, o_s, gamma)[0]
d_u = d_r2 * M2                                       # dropout: the forward's mask
d_z = (d_u @ W2) * gelu_grad(z)
residual_share, branch_share = d_r2, d_z @ W1         # `a` feeds both: the gradients add
grads = (residual_share + branch_share, np.einsum("bti,bth->ih", d_z, a), d_z.sum((0, 1)),
         np.einsum("bth,bti->hi", d_u, gelu(z)), d_u.sum((0, 1)))
check("FFN + residual + dropout", grads,
      lambda a, W1, b1, W2, b2: F.layer_norm(
          a + F.linear(F.gelu(F.linear(a, W1, b1)), W2, b2) * torch.from_numpy(M2), (H,),
          torch.from_numpy(gamma), torch.from_numpy(beta_ln), EPS),
      lambda: float((ffn_sublayer(a, W1, b1, W2, b2)[0] * G_ffn).sum()),
      (a, W1, b1, W2, b2), G_ffn, ("d_a", "d_W_1", "d_b_1", "d_W_2", "d_b_2"))
print(f"mask values {np.unique(M2)}; {(M2 == 0).sum()} dropped units, their d_u all exactly 0: "
      f"{not d_u[M2 == 0].any()}")
print(f"d_a = residual share (norm {np.linalg.norm(residual_share):.2f}) + branch share "
      f"(norm {np.linalg.norm(branch_share):.2f})")

# %% [markdown]
# ### 2.6 Dropout on the attention probabilities
#
# Here the mask sits between the softmax and `V`: $\tilde P = P \odot M_{att}$, $C = \tilde P V$.
# Backward: $dV = \tilde P^\top dC$ (a dropped probability carries no value gradient),
# $d\tilde P = dC\, V^\top$, $dP = d\tilde P \odot M_{att}$, and then the softmax backward of
# 2.3 *at P*, not at $\tilde P$: the softmax's Jacobian belongs to the softmax, which saw no
# dropout.  That is why the forward keeps both `P` and `P~`.  (Each row of `d_S` still sums to
# zero, so `d b_k` stays 0.)  The third mask, `M_1` on the attention output, follows 2.5's
# rule: `d_o = d_r1 * M_1`.

# %%
M_att = (rng.random((B, heads, T, T)) >= P_DROP) / (1.0 - P_DROP)
_, P, P_dropped = attention_forward(q, k, v, keep, drop=M_att)
d_q, d_k, d_v = attention_backward(d_C, q, k, v, P, P_dropped, M_att)
check("attention + dropout", (d_q, d_k, d_v),
      lambda q, k, v: torch_attention(q, k, v, torch.from_numpy(M_att)),
      lambda: float((attention_forward(q, k, v, keep, drop=M_att)[0] * d_C).sum()),
      (q, k, v), d_C, ("d_Q", "d_K", "d_V"))
print(f"max |d b_k| / max |d b_q| with dropout: "
      f"{np.abs(d_k.sum((0, 2))).max() / np.abs(d_q.sum((0, 2))).max():.1e}")

# %% [markdown]
# ## 3. The whole layer against transformers' `BertLayer`
#
# `EncoderLayer.backward` chains the pieces in reverse order of the forward: `LN_2`, the second
# residual and dropout, the feed-forward branch (2.5), `LN_1`, the first residual and dropout,
# the attention output projection, the attention (2.4, 2.6), and the three input projections,
# whose gradients add into `d_x` on top of the residual's:

# %%
show_code(EncoderLayer.backward, "# LN_1 and the first residual", "self.grads = {n: g[n]")

# %% [markdown]
# The reference is transformers' own `BertLayer` with the same 16 weights.  Dropout needs care:
# torch would draw its own masks.  Scratch draws its masks in the training forward and records
# them (`layer.dropout_masks`); `reference.top_layers.TopLayers` (the torch side of
# `--unfreeze-top`) holds copies of `BertLayer` whose dropouts multiply by given masks instead
# of drawing (as `tests/test_bert_layer_backward.py` does with a patched `dropout`).  Both run
# in training mode on the padded batch, `G` random on every row; float64 and float32 (each side
# in that precision, the same masks).  Third column: central differences of the scratch layer
# itself, no torch (two forwards per number).  `d b_k` (starred) is measured on
# the scale of `d b_q`, being noise.

# %%
cfg = BertConfig(vocab_size=30, hidden_size=H, num_hidden_layers=1, num_attention_heads=heads,
                 intermediate_size=I_ff, hidden_act="gelu", layer_norm_eps=EPS,
                 hidden_dropout_prob=P_DROP, attention_probs_dropout_prob=P_DROP)
bert = BertModel(cfg, add_pooling_layer=False).double()
bert.encoder.layer[0].load_state_dict({n: torch.from_numpy(w) for n, w in params.items()})
G = rng.standard_normal((B, T, H))

out = layer(x, mask, training=True)                   # draws and records the dropout masks
masks = layer.dropout_masks
d_x = layer.backward(G)
mine = {"out": out, "d_x": d_x, **layer.grads}
layer32 = EncoderLayer(params, heads, "gelu", EPS, P_DROP, P_DROP, dtype="float32")
out32 = layer32(x, mask, training=True, masks=masks)  # the same masks, in float32
d_x32 = layer32.backward(G)
mine32 = {"out": out32, "d_x": d_x32, **layer32.grads}


def torch_layer(dtype):
    """out, d_x and every parameter's gradient of BertLayer, with scratch's dropout masks."""
    top = TorchTopLayers.from_bert(bert, 1).to(dtype).train()
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    out = top(xt, torch.from_numpy(lengths), masks=[masks])
    out.backward(torch.tensor(G, dtype=dtype))
    return {"out": out.detach().numpy(), "d_x": xt.grad.numpy(),
            **{n.removeprefix("layer.0."): w.grad.numpy() for n, w in top.named_parameters()}}


theirs, theirs32 = torch_layer(torch.float64), torch_layer(torch.float32)


def scratch_loss():
    return float((layer(x, mask, training=True, masks=masks, cache=False) * G).sum())


numeric_grads = {"d_x": numeric(scratch_loss, x)} | {n: numeric(scratch_loss, layer.params[n])
                                                     for n in PARAM_NAMES}
print(f"central differences: {sum(g.size for g in numeric_grads.values())} numbers, two "
      "forwards each")
KEY_BIAS = "attention.self.key.bias"
rows = []
for n, m in mine.items():
    scale = np.abs(theirs["attention.self.query.bias"]).max() if n == KEY_BIAS else None
    scale32 = np.abs(theirs32["attention.self.query.bias"]).max() if n == KEY_BIAS else None
    rows.append({"tensor": n + (" *" if n == KEY_BIAS else ""), "shape": str(m.shape),
                 "float64 vs BertLayer": rel(m, theirs[n], scale),
                 "float64 vs central diff.": rel(m, numeric_grads[n], scale) if n != "out" else "",
                 "float32 vs BertLayer": rel(mine32[n], theirs32[n], scale32)})
table(rows, floatfmt="{:.1e}")
worst = {c: max(r[c] for r in rows if r[c] != "") for c in list(rows[0])[2:]}
print("worst:", {c: f"{e:.1e}" for c, e in worst.items()})
assert worst["float64 vs BertLayer"] < 1e-12 and worst["float64 vs central diff."] < 1e-7

# %% [markdown]
# Every gradient of the layer agrees with torch autograd to about 1e-15 in float64 (the last
# bits of the sums, taken in another order), and to within 1e-6 in float32; against central
# differences to a few 1e-9, the accuracy of the differences themselves.  A wrong sign or
# a missing term would show as an error of order 1.
#
# ## 4. Where the gradient goes
#
# In evaluation mode (no dropout: the picture is the layer's, not one draw's), two questions.
#
# **Which inputs does one token's output depend on?**  Take one real token `i` of the padded
# sequence 1 and the loss `L_i = w . out_i` (a fixed random `w`): its gradient `d_x_j` says how
# much input token `j` moves it.  The residual path reaches only `j = i`; attention reaches the
# other real tokens; a padded token `j` gets exactly 0 (2.4: its key and value receive nothing,
# and its own row carries no loss).

# %%
b = 1                                                 # the sequence with 3 padded tokens
w = rng.standard_normal(H)
reach = np.zeros((lengths[b], T))
for i in range(lengths[b]):
    G_i = np.zeros((B, T, H))
    G_i[b, i] = w
    layer(x, mask)
    reach[i] = np.linalg.norm(layer.backward(G_i)[b], axis=-1)
diagonal = np.diag(reach[:, :lengths[b]])
off = reach[:, :lengths[b]][~np.eye(lengths[b], dtype=bool)]
print(f"|d x_j|, own token (residual + attention): mean {diagonal.mean():.3f}; other real tokens "
      f"(attention only): mean {off.mean():.3f}; padded tokens: all exactly 0: "
      f"{not reach[:, lengths[b]:].any()}")

fig, ax = plt.subplots(figsize=(6.5, 4))
shown = np.ma.masked_equal(reach, 0.0)
cmap = plt.get_cmap("viridis").copy()
cmap.set_bad("lightgrey")
im = ax.imshow(shown, cmap=cmap, norm=LogNorm(), aspect="auto")
for j in range(lengths[b], T):
    ax.text(j, (lengths[b] - 1) / 2, "0", ha="center", va="center")
ax.set(xlabel="input token j (grey: padding)", ylabel="output token i of the loss",
       title=f"|dL_i / dx_j| for sequence {b} ({lengths[b]} real tokens of {T})")
ax.grid(False)
fig.colorbar(im, ax=ax, label="norm of the gradient (log scale)")
show(fig, "07_gradient_reach")

# %% [markdown]
# *Row i: how much each input token moves output token i.  The residual path adds to the
# diagonal; attention spreads the gradient over the other real tokens, sometimes more of it to
# a token that many queries attend to than to the token itself; the padded columns are exactly
# zero, not small.*
#
# **How does the gradient split between the residual paths and the branches?**  For a loss
# reading every real token (`G` random on real rows, 0 on padding) we redo the backward by hand
# from the pieces of section 2, keeping the two shares at each sum: `d_a = d_r2 + d_z W_1`
# (feed-forward) and `d_x = d_r1 + (d_Q W_q + d_K W_k + d_V W_v)` (attention).  The hand-made
# total must equal `layer.backward`.  Besides our random layer, a pretrained one: the top layer
# of the packaged MiniLM (`all-MiniLM-L6-v2`, hidden 384, 12 heads, no download), on the hidden
# states that two short sentences reach below it.

# %%
def gradient_split(layer, x, mask, G):
    """{sum: (residual share, branch share)} of the backward of ``layer`` (eval mode) from
    d_out = G, by hand from the pieces; their total is checked against ``layer.backward``."""
    layer(x, mask)
    d_x = layer.backward(G)
    c, p = layer._cache, layer.params
    nb, nt, nh = x.shape
    d_r2 = layer_norm_backward(G, c["o_hat"], c["o_s"], p["output.LayerNorm.weight"])[0]
    d_z = (d_r2 @ p["output.dense.weight"]) * gelu_grad(c["z"])
    ffn_share = d_z @ p["intermediate.dense.weight"]
    d_r1 = layer_norm_backward(d_r2 + ffn_share, c["a_hat"], c["a_s"],
                               p["attention.output.LayerNorm.weight"])[0]
    d_ctx = (d_r1 @ p["attention.output.dense.weight"]).reshape(nb, nt, layer.num_heads, -1)
    by_head = attention_backward(d_ctx.transpose(0, 2, 1, 3), c["q"], c["k"], c["v"], c["prob"],
                                 c["pd"])
    attention_share = sum(g.transpose(0, 2, 1, 3).reshape(nb, nt, nh)
                          @ p[f"attention.self.{n}.weight"]
                          for n, g in zip(("query", "key", "value"), by_head, strict=True))
    print(f"{layer}: by hand vs layer.backward {rel(d_r1 + attention_share, d_x):.1e}")
    return {"feed-forward (at a)": (d_r2, ffn_share), "attention (at x)": (d_r1, attention_share)}


minilm = BertEncoder.from_pretrained(minilm_path(), "float64", backend="numpy")
ids, minilm_mask = BertTokenizer.from_pretrained(minilm_path())(
    ["The film was a quiet delight from start to finish.", "Dull, long and badly acted."])
top_index = len(minilm.layers) - 1
h_top = minilm(ids, minilm_mask, upto=top_index)     # the hidden states entering the top layer
cases = {"random layer": (layer, x, keep),
         "MiniLM's top layer": (EncoderLayer.from_encoder(minilm, top_index, dtype="float64"),
                                h_top, minilm_mask.astype(bool))}
splits, rows = {}, []
for name, (lay, inputs, real) in cases.items():
    G_real = rng.standard_normal(inputs.shape) * real[..., None]
    splits[name] = gradient_split(lay, inputs, real.astype(np.int64), G_real)
    for where, (res, branch) in splits[name].items():
        res, branch = res[real], branch[real]                    # (real tokens, H)
        norms = np.linalg.norm(res, axis=-1) * np.linalg.norm(branch, axis=-1)
        cos = (res * branch).sum(-1) / norms
        rows.append((name, where, np.linalg.norm(res), np.linalg.norm(branch),
                     np.linalg.norm(res + branch), cos.mean()))
table(rows, ["layer", "sum", "|residual share|", "|branch share|", "|total|", "mean cosine"],
      floatfmt="{:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
for ax, (name, split) in zip(axes, splits.items(), strict=True):
    real = cases[name][2][0]
    for where, (res, branch) in split.items():
        ratio = np.linalg.norm(branch[0], axis=-1) / np.linalg.norm(res[0], axis=-1)
        ax.semilogy(np.flatnonzero(real), ratio[real], marker="o", label=where)
    ax.axhline(1.0, color="grey", ls=":")
    ax.set(xlabel="token position (sequence 0)", title=name)
axes[0].set(ylabel="|branch share| / |residual share|")
axes[0].legend()
show(fig, "07_gradient_split")

# %% [markdown]
# *Per token, the branch's share of the gradient over the residual path's, at the two residual
# sums: above 1 the branch carries more of the gradient than the identity path beside it.*
#
# In the pretrained layer the residual paths carry more of the gradient than the branches
# beside them (ratios mostly below 1); in the random one, whose weights are far larger than trained
# ones, the branches dominate.  In both, the two shares are nearly orthogonal (mean cosines
# near 0), so the total's size is about the root of the sum of their squares.  And every path,
# the residual one included, passes through the LayerNorms' Jacobians (the projections of 2.1):
# in a post-LN layer no path hands the gradient down untouched.
#
# ## 5. MPNet: a constant bias, the same backward
#
# MPNet's attention adds a relative position bias to the scores:
# $\beta_{h,i,j} = E_{rel}[\mathrm{bucket}(j - i), h]$, a table of 32 buckets x `h` heads that
# pre-training learnt (`scratch.bert.relative_position_bias`).  `--unfreeze-top K` keeps the
# table frozen, so in the trained layers $\beta$ depends on nothing that is trained and on
# nothing that comes from `x`: it is a constant added to `S`, like the mask.  The derivative of
# `S` with respect to `Q` and `K` does not change, so section 2's backward holds as it is;
# `beta` acts only through the values of `P`.  The code says so by its signature:
# `attention_backward` has no bias argument.

# %%
print("attention_forward" + str(inspect.signature(attention_forward)))
print("attention_backward" + str(inspect.signature(attention_backward)))

# %% [markdown]
# The check: a tiny random MPNet (one layer, every weight and the position table N(0, 0.5^2)),
# saved and read back by scratch as an `MPNetEncoder`; scratch's `TopLayers` for its top layer
# (what `--unfreeze-top 1` trains) against transformers' own `MPNetLayer`, called with the
# bias transformers computes (`MPNetEncoder.compute_position_bias`) and the padding mask, in
# evaluation mode (dropout was section 3's business), `G` as in section 3.

# %%
mcfg = MPNetConfig(vocab_size=30, hidden_size=H, num_hidden_layers=1, num_attention_heads=heads,
                   intermediate_size=I_ff, max_position_embeddings=64)
mpnet = MPNetModel(mcfg, add_pooling_layer=False).double().eval()
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, weight in mpnet.named_parameters():
        weight.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, 0.5, generator=generator)
with tempfile.TemporaryDirectory() as folder, quiet_transformers():
    mpnet.save_pretrained(folder)
    top = TopLayers.from_encoder(BertEncoder.from_pretrained(folder, "float64", backend="numpy"),
                                 1, "float64")
print(top)

xt = torch.tensor(x, requires_grad=True)
bias = mpnet.encoder.compute_position_bias(xt)        # (B, h, T, T), from the table
additive_mask = torch.from_numpy(~keep)[:, None, None, :].double() * torch.finfo(xt.dtype).min
out_t = mpnet.encoder.layer[0](xt, attention_mask=additive_mask, position_bias=bias)[0]
out_t.backward(torch.from_numpy(G))
out_s = top(x, lengths)
d_x_s = top.backward(G)

t_grads = {n: w.grad.numpy() for n, w in mpnet.encoder.layer[0].named_parameters()}
key_bias, query_bias = (checkpoint_names("mpnet")[f"attention.self.{n}.bias"]
                        for n in ("key", "query"))
errors = {"out": rel(out_s, out_t.detach()), "d_x": rel(d_x_s, xt.grad)}
errors |= {own: rel(top.grads[layer_param(0, own)], t_grads[own],
                    np.abs(t_grads[query_bias]).max() if own == key_bias else None)
           for own in checkpoint_names("mpnet").values()}
table(list(errors.items()), ["tensor (MPNet's names)", "float64 vs MPNetLayer"], floatfmt="{:.1e}")
assert max(errors.values()) < 1e-12
print(f"the table's gradient, which torch computes because the table is a parameter there: "
      f"norm {mpnet.encoder.relative_attention_bias.weight.grad.norm():.2f} (frozen here)")
top.position_table[...] = 0.0                         # MPNet without its bias
print(f"the same layer without the bias: output changes by {rel(top(x, lengths), out_s):.2f} "
      "(relative): the bias shapes the forward, not the backward's code")

# %% [markdown]
# ## Takeaways
#
# * A layer's backward is a handful of pieces chained in reverse: LayerNorm
#   (`d_r = s (g - mean g - r^ mean(g r^))`, a projection), GELU (`Phi(z) + z phi(z)`, element
#   by element), softmax (`d_S = P (d_P - rowsum(d_P P))`), and matrix products.
# * Two rules glue them: a residual *adds* the gradient of its identity path to the branch's;
#   inverted dropout *multiplies* the gradient by the forward's own mask (so a comparison with
#   torch needs both sides to share the masks).
# * Padding costs nothing in correctness: a padded key's softmax weight is exactly 0, so it
#   sends and receives exactly zero gradient; `d b_k` is zero by the softmax's shift
#   invariance, and what is computed for it is rounding noise at the dtype's epsilon.
# * Each piece agrees with torch autograd to the last bits in float64 and with central
#   differences to their own accuracy; the assembled layer agrees with transformers' `BertLayer`
#   (and `MPNetLayer`: a frozen additive bias changes `P`, not the backward).
#
# ## Exercises
#
# 1. Train MPNet's position table: the bias' gradient is `d_S` summed over the batch, and the
#    table's is that summed over all `(i, j)` in each bucket.  Compute `d_S` as
#    `attention_backward` does, and compare with section 5's
#    `mpnet.encoder.relative_attention_bias.weight.grad`.
# 2. A pre-LayerNorm layer computes `x + o(LN(x))`: derive its backward and show that the
#    residual path then hands `d_out` to `d_x` unchanged, where the post-LN layer above passes
#    every path through a LayerNorm's projection.  Which makes deep stacks easier to train?
# 3. Repeat section 2.4's `d b_k` measurement with `T` from 4 to 512 tokens in float32: how does
#    the noise grow with the number of terms summed?
