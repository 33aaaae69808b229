# %% [markdown]
# # Part 3: attention three ways
#
# Attention mixes the rows of a value matrix `V` (m x d_v) with weights that say how well each
# query (a row of `Q`, n x d_k) matches each key (a row of `K`, m x d_k).  This tutorial builds
# three versions from scratch in NumPy (`scratch/attention.py`), checks each against torch, and
# shows why two of them scale linearly with the sequence length.
#
# | variant | output | time | memory |
# |---|---|---|---|
# | softmax (Vaswani et al.) | `softmax(Q K^T / sqrt(d_k)) V` | O(n m d) | O(n m) |
# | Efficient Attention (Shen et al. 2018) | `rho_q(Q) (rho_k(K)^T V)` | O((n + m) d_k d_v) | O(d_k d_v) |
# | linear (Katharopoulos et al. 2020) | `phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)` | O((n + m) d_k d_v) | O(d_k d_v) |
#
# Masks everywhere: **True = keep**.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from reference import attention as R
from reference.timing import best_time
from scratch import attention as A

OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorials/_build"))
OUT.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# %% [markdown]
# ## 1. Softmax attention
#
# `P = softmax(Q K^T / sqrt(d_k))` is an n x m matrix whose rows sum to 1; `out = P V`.  Every
# output row is therefore a *convex combination* of value rows.  The softmax subtracts each
# row's max before `exp` (no overflow); masked scores become `-inf`, i.e. weight exactly 0.
# With `causal=True` query i only sees keys `j <= i`.  Backward (see
# `softmax_attention_backward`): `dV = P^T dout`, `dP = dout V^T`,
# `dS = P * (dP - rowsum(dP * P))`, `dQ = dS K / sqrt(d_k)`, `dK = dS^T Q / sqrt(d_k)`.

# %%
n, d = 12, 8
q, k, v, d_out = (rng.standard_normal((2, n, d)) for _ in range(4))   # batch of 2
out = A.softmax_attention(q, k, v, causal=True)
grads = A.softmax_attention_backward(q, k, v, d_out, causal=True)
t_out, *t_grads = R.with_grads(R.softmax_attention_sdpa, *map(torch.from_numpy, (q, k, v, d_out)),
                               causal=True)
print("softmax causal vs torch SDPA: out", max_err(out, t_out),
      " grads", max(max_err(a, b) for a, b in zip(grads, t_grads)))

# %% [markdown]
# ## 2. The associativity trick: Efficient Attention
#
# `(A B) C == A (B C)`, but the cost is not the same.  With `A = rho_q(Q)` (n x d_k),
# `B = rho_k(K)^T` (d_k x m), `C = V` (m x d_v):
#
# * `(A B) C` builds an n x m matrix: O(n m d) time, O(n m) memory;
# * `A (B C)` builds a d_k x d_v matrix: O((n + m) d_k d_v) time, O(d_k d_v) memory.
#
# Softmax attention cannot be re-bracketed (the softmax sits between `Q K^T` and `V`).  Shen et
# al. move the normalisation *onto* Q and K separately: `rho_q` = softmax over each query's
# features, `rho_k` = softmax over positions.  Each of the d_k columns of `rho_k(K)^T V` is a
# "global context vector", a convex combination of value rows; each query mixes them.

# %%
m = 30
q, k, v = rng.standard_normal((n, d)), rng.standard_normal((m, d)), rng.standard_normal((m, d))
fast = A.efficient_attention(q, k, v)          # rho_q (rho_k^T V)
slow = A.efficient_attention_naive(q, k, v)    # (rho_q rho_k^T) V
print("efficient: fast == naive bracketing:", max_err(fast, slow))
print("efficient vs torch:", max_err(fast, R.efficient_attention(*map(torch.from_numpy, (q, k, v)))))
# the scaling normalisation (Q/sqrt(m), K/sqrt(m)) is exactly dot-product attention without softmax
scaling = A.efficient_attention(q, k, v, normalization="scaling")
print("scaling variant vs (Q K^T) V / m:", max_err(scaling, (q @ k.T) @ v / m))

# %% [markdown]
# ## 3. Linear attention, and attention as an RNN
#
# Katharopoulos et al. replace `exp(q . k)` by a kernel `phi(q) . phi(k)` with
# `phi(x) = elu(x) + 1 > 0`.  Then (numerator and denominator re-bracketed)
#
# `out_i = phi(Q_i)^T S / phi(Q_i)^T Z`,  `S = sum_j phi(K_j) V_j^T`,  `Z = sum_j phi(K_j)`.
#
# **Causal**: the sums run over `j <= i`: prefix sums `S_i = S_{i-1} + phi(K_i) V_i^T`.  That is
# an RNN whose hidden state is the d_k x d_v matrix `S_i` (and the vector `Z_i`):
# `LinearAttentionState.step` costs the same for token 1 and token 10 000.  The parallel form
# (`linear_attention(..., causal=True)`) computes the same prefix sums chunk by chunk, never
# forming an n x n matrix.

# %%
n = 40
q, k, v, d_out = (rng.standard_normal((n, d)) for _ in range(4))
parallel = A.linear_attention(q, k, v, causal=True, chunk_size=8)
state = A.LinearAttentionState(d, d, dtype="float64")
recurrent = np.stack([state.step(q[t], k[t], v[t]) for t in range(n)])
naive = A.linear_attention_naive(q, k, v, causal=True)       # the explicit O(n^2) formula
print("causal linear: chunked prefix sums vs RNN steps:", max_err(parallel, recurrent))
print("causal linear: chunked prefix sums vs explicit formula:", max_err(parallel, naive))
mine = (parallel, *A.linear_attention_backward(q, k, v, d_out, causal=True, chunk_size=8))
theirs = R.with_grads(R.linear_attention, *map(torch.from_numpy, (q, k, v, d_out)), causal=True)
print("causal linear vs torch autograd (out, dq, dk, dv):",
      [f"{max_err(a, b):.1e}" for a, b in zip(mine, theirs)])

# %% [markdown]
# ## 4. What the three attend to
#
# The implied n x m weights of each variant for one causal sequence (for efficient attention
# the non-causal weights `rho_q rho_k^T`).  We read them off by using the identity matrix as V:
# output row i is then row i of the weight matrix.

# %%
n = 24
q, k = rng.standard_normal((n, d)), rng.standard_normal((n, d))
eye = np.eye(n)
maps = {
    "softmax (causal)": A.softmax_attention(q, k, eye, causal=True),
    "efficient (non-causal)": A.efficient_attention_naive(q, k, eye),
    "linear (causal)": A.linear_attention_naive(q, k, eye, causal=True, eps=0.0),
}
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
for ax, (name, w) in zip(axes, maps.items()):
    im = ax.imshow(w, cmap="viridis")
    ax.set(title=name, xlabel="key j", ylabel="query i")
    fig.colorbar(im, ax=ax, fraction=0.046)
    assert np.allclose(w.sum(1), 1.0)                      # rows are convex weights
fig.tight_layout()
fig.savefig(OUT / "part3_attention_maps.png", dpi=100)
print("softmax is sharper; the kernel phi(q).phi(k) of linear attention spreads weight more evenly")

# %% [markdown]
# ## 5. Time against n
#
# A small sweep (the full one, up to n = 16384 and with memory, is `bench/attention.py`):
# softmax grows like n^2, the other two like n.

# %%
sizes = [64, 128, 256, 512, 1024, 2048]
fns = {
    "softmax": lambda q, k, v: A.softmax_attention(q, k, v),
    "softmax causal": lambda q, k, v: A.softmax_attention(q, k, v, causal=True),
    "efficient": A.efficient_attention,
    "linear": A.linear_attention,
    "linear causal": lambda q, k, v: A.linear_attention(q, k, v, causal=True),
}
times = {name: [] for name in fns}
for n in sizes:
    q, k, v = (rng.standard_normal((n, 64), dtype=np.float32) for _ in range(3))
    for name, f in fns.items():
        times[name].append(best_time(lambda: f(q, k, v), repeat=5)[1])
fig, ax = plt.subplots(figsize=(6.5, 4.5))
for name, ts in times.items():
    ax.loglog(sizes, ts, "-o", label=name, ms=4)
ax.set(xlabel="sequence length n", ylabel="forward time (s)", title="scratch attention, d=64, float32")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "part3_time_vs_n.png", dpi=100)
print(f"n grows {sizes[-1] // sizes[2]}x from {sizes[2]} to {sizes[-1]}; time grows (noisy on a busy machine):")
for name, ts in times.items():
    print(f"  {name:<15} {ts[2] * 1e3:7.2f} ms -> {ts[-1] * 1e3:7.2f} ms   x{ts[-1] / ts[2]:.0f}")

# %% [markdown]
# ## Take-aways
#
# * Softmax attention needs the whole n x m matrix, so its cost is quadratic in length.
# * Efficient and linear attention normalise Q and K *separately* (or replace `exp` by a
#   kernel), which lets `K^T V` be computed first: linear in length.
# * Causal linear attention is an RNN with a matrix-valued state: constant cost per generated
#   token, where softmax attention re-reads a growing cache.
# * Every function here has a hand-written backward, equal to torch autograd (see
#   `tests/test_attention.py`).
