# %% [markdown]
# # 3. torch's GRU, from scratch, forward and backward
#
# The assignment's sentiment model (Problem 4) puts a 2-layer bidirectional GRU (hidden 256) on
# top of BERT.  This tutorial rebuilds `torch.nn.GRU` in NumPy, including backpropagation
# through time, and checks it against torch to the last digits.
#
# **What you will learn**
#
# * torch's GRU equations, and how they differ from the textbook GRU;
# * the backward pass of one step, derived and checked against autograd;
# * how a whole multi-layer, bidirectional GRU runs over padded batches (`lengths`, the
#   semantics of `pack_padded_sequence`);
# * what the update gate does, and how far back the gradient reaches (vanishing gradients);
# * where a vanishing float32 gradient ends up (denormal numbers, which some CPUs compute many
#   times slower) and how the backward keeps them out (the CPU's flush-to-zero mode).
#
# The code explained here: [`scratch/gru_cell.py`](../scratch/gru_cell.py) (one step, for
# reading) and [`scratch/gru.py`](../scratch/gru.py) (the full, fast GRU); the tests that prove
# them are in [`tests/test_gru.py`](../tests/test_gru.py).
#
# **torch's equations** (gates stacked r | z | n in every weight and bias):
#
# $$
# \begin{aligned}
# r_t &= \sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr}) \\
# z_t &= \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}) \\
# n_t &= \tanh\big(W_{in} x_t + b_{in} + r_t \odot (W_{hn} h_{t-1} + b_{hn})\big) \\
# h_t &= (1 - z_t) \odot n_t + z_t \odot h_{t-1}
# \end{aligned}
# $$
#
# The textbook GRU (d2l) resets *before* the product, $\tanh(W_{in} x + W_{hn}(r \odot h) + b)$.
# torch (like cuDNN) resets *after* it, so `b_hn` ends up inside the reset gate, and all three
# recurrent products become **one** $(B, H) \times (H, 3H)$ matrix product per step. The two
# are different functions: weights trained in one do not work in the other.

# %%
import numpy as np
import torch
from tutorial_kit import pick, plt, show

import scratch.gru as gru_module
from reference.gru import run_packed, torch_forward_backward
from scratch.flush_to_zero import flush_to_zero, supported
from scratch.gru import GRU
from scratch.gru_cell import gru_cell_backward, gru_cell_forward

rng = np.random.default_rng(0)

# %% [markdown]
# ## One step, by hand
#
# `gru_cell_forward` is the four equations above, line for line. Against `torch.nn.GRUCell`:

# %%
cell = torch.nn.GRUCell(5, 4, dtype=torch.float64)
w = [p.detach().numpy() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
x1, h = rng.standard_normal((3, 5)), rng.standard_normal((3, 4))
h_new, cache = gru_cell_forward(x1, h, *w)
with torch.no_grad():
    h_torch = cell(torch.from_numpy(x1), torch.from_numpy(h)).numpy()
print("one step, max |scratch - torch| =", np.abs(h_new - h_torch).max())

# %% [markdown]
# ## The backward pass of one step
#
# Write $a$ for pre-activations and use the outputs to get the derivatives
# ($\tanh' = 1 - n^2$, $\sigma' = s(1 - s)$). Given $\delta = \partial L / \partial h_t$:
#
# $$
# \begin{aligned}
# \partial a_n &= \delta \odot (1 - z) \odot (1 - n^2) \\
# \partial a_z &= \delta \odot (h_{t-1} - n) \odot z (1 - z) \\
# \partial a_r &= \partial a_n \odot (W_{hn} h_{t-1} + b_{hn}) \odot r (1 - r) \\
# \partial h_{t-1} &= \delta \odot z + [\partial a_r, \partial a_z, \partial a_n \odot r]\, W_{hh}
# \end{aligned}
# $$
#
# The input side sees $[\partial a_r, \partial a_z, \partial a_n]$, the recurrent side
# $[\partial a_r, \partial a_z, \partial a_n \odot r]$: the reset gate scales only the recurrent
# product. Weight gradients are outer products summed over the batch (and, through time,
# over the steps). The code spells every gradient `d_<quantity>` (`d_a_n` is $\partial a_n$,
# `d_h` is $\partial h_{t-1}$, `d_W_hh` is $\partial L / \partial W_{hh}$). Against autograd:

# %%
d_h_new = rng.standard_normal((3, 4))
xt = torch.tensor(x1, requires_grad=True)
ht = torch.tensor(h, requires_grad=True)
(cell(xt, ht) * torch.from_numpy(d_h_new)).sum().backward()
d_x1, d_h, d_w_ih, d_w_hh, d_b_ih, d_b_hh = gru_cell_backward(d_h_new, cache, w[0], w[1])
for name, ours, theirs in [("d_x", d_x1, xt.grad), ("d_h", d_h, ht.grad),
                           ("d_W_ih", d_w_ih, cell.weight_ih.grad),
                           ("d_W_hh", d_w_hh, cell.weight_hh.grad),
                           ("d_b_hh", d_b_hh, cell.bias_hh.grad)]:
    print(f"{name:6s} max |scratch - autograd| = {np.abs(ours - theirs.numpy()).max():.1e}")

# %% [markdown]
# ## Whole sequences, layers, both directions
#
# `scratch.gru.GRU` has torch's constructor, parameter names (`weight_ih_l0_reverse`, ...) and
# shapes, so a torch state_dict loads as it is. Its forward computes the input projections of
# all steps (both directions) as one matrix product, then runs only $h W_{hh}^T$ and the
# element-wise gate maths per step, in place; the backward walks the steps in reverse and
# leaves the big weight-gradient products until after the loop. A small version of the
# assignment's head, in float64:

# %%
torch.manual_seed(0)
ref = torch.nn.GRU(12, 8, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
gru = GRU(12, 8, num_layers=2, bidirectional=True, batch_first=True, dtype="float64")
gru.load_state_dict(ref.state_dict())
B, T = 4, pick(30, 12)
x = rng.standard_normal((B, T, 12))
h0 = np.zeros((4, B, 8))
d_out = rng.standard_normal((B, T, 16))
out, h_n = gru(x)
d_x, d_h0 = gru.backward(d_out)
r = torch_forward_backward(ref, x, h0, d_out)
errs = {"output": np.abs(out - r["output"]).max(), "h_n": np.abs(h_n - r["h_n"]).max(),
        "d_x": np.abs(d_x - r["d_x"]).max(),
        "all weight grads": max(np.abs(gru.grads[k] - r["grads"][k]).max() for k in gru.grads)}
for k, v in errs.items():
    print(f"{k:17s} max |scratch - torch| = {v:.1e}")
assert max(errs.values()) < 1e-12

# %% [markdown]
# ## Padded batches: `lengths` = `pack_padded_sequence`
#
# Reviews have different lengths. torch packs them; scratch takes `lengths`, sorts the batch
# by length once, and at step $t$ runs only the sequences still going (a prefix of the sorted
# batch). The forward direction's $h_n$ is taken at each sequence's last real step; the
# reverse direction *starts* there. Outputs past the end are zero, exactly as torch's
# `pad_packed_sequence`; running the padded batch without lengths would be wrong for the
# reverse direction and for $h_n$:

# %%
lengths = np.array([T, T // 2, T - 5, 5])
out_l, h_l = gru(x, lengths=lengths)
with torch.no_grad():
    t_out, t_h = run_packed(ref, torch.from_numpy(x), None, lengths)
print("packed: max |scratch - torch| =", max(np.abs(out_l - t_out.numpy()).max(),
                                             np.abs(h_l - t_h.numpy()).max()))
print("h_n of the padded batch without lengths differs by", np.abs(gru(x)[1] - h_l).max())

# %% [markdown]
# ## What the gates do, and where the gradient goes
#
# Left: the update gate $z$ of the first layer's forward direction for the first sequence
# ($z \approx 1$ keeps the old state, $z \approx 0$ writes the candidate). Right: how much of
# the last output's gradient reaches each earlier input, for the same GRU with its weights
# scaled: it decays geometrically with the distance (the vanishing gradient), at a rate set by
# the weights through the $\delta \odot z$ path and $W_{hh}$.

# %%
p = gru.state_dict()                     # layer 0, forward direction, step by step
h, z_gate = np.zeros((1, 8)), []
for t in range(T):
    h, c = gru_cell_forward(x[:1, t], h, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"],
                            p["bias_hh_l0"])
    z_gate.append(c.z[0])
z_gate = np.array(z_gate)


def grad_reach(scale):
    """|dL/dx_t| for L = sum of the last step's output: how far back the gradient reaches."""
    g = GRU(12, 8, dtype="float64", seed=1)
    g.load_state_dict({k: v * scale for k, v in g.state_dict().items()})
    g(rng.standard_normal((T, 1, 12)))
    d = np.zeros((T, 1, 8))
    d[-1] = 1.0
    d_x_t, _ = g.backward(d)
    return np.linalg.norm(d_x_t[:, 0], axis=1)


fig, ax = plt.subplots(figsize=(7, 3.6))
im = ax.imshow(z_gate.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
ax.set(xlabel="time step t", ylabel="hidden unit",
       title="update gate z (layer 0, forward direction)")
ax.grid(False)
fig.colorbar(im, ax=ax, label="z (0 = write the candidate, 1 = keep the old state)")
show(fig, "03_update_gate")

# %% [markdown]
# *Each row is one hidden unit's update gate along the first sequence: with random (untrained)
# weights the gates hover around 0.5 and move with every input; training is what sets them
# (tutorial 2's trained GRU holds its gate near 0).*

# %%
fig, ax = plt.subplots(figsize=(7, 3.6))
for scale in (0.5, 1.0, 3.0):
    ax.semilogy(range(1, T + 1), grad_reach(scale), marker=".", label=f"weights x{scale}")
ax.set(xlabel="input step t", ylabel="|dL/dx_t| (log scale)",
       title=f"gradient of the last output (step {T}), backpropagated through time")
ax.legend()
show(fig, "03_gradient_reach")

# %% [markdown]
# *How much of the last output's gradient reaches each earlier input: it falls geometrically
# with the distance, at a rate set by the size of the weights.*

# %% [markdown]
# ## Below float32's smallest number: denormals
#
# Over hundreds of steps the vanishing gradient does not stop at "small". float32's smallest
# *normal* number is $2^{-126} \approx 1.2 \times 10^{-38}$; below it lie the **denormals**
# (subnormals), down to $2^{-149} \approx 1.4 \times 10^{-45}$, with fewer and fewer
# significant bits, and then 0. Numerically they change nothing that matters here: a
# gradient of $10^{-40}$ moves no weight. But x86 CPUs compute on them through microcode
# assists, and on some cores that is many times slower: on an Intel Xeon, one training step of
# the sentiment head on 480-512-token reviews took 2.03x the reference's time, and 0.91x once
# the CPU's flush-to-zero mode was on (README, `bench/head.py --ftz`). torch has a switch for
# that mode (`torch.set_flush_denormal`, which `reference.pipeline.train.fit` uses); NumPy has
# none.
#
# Below: a float32 GRU over a long sequence, the loss on the last output only, so the
# gradient of every earlier input is the vanishing gradient alone. Once with nothing flushed
# (`scratch.gru.FLUSH_DENORMALS = False`), once as scratch runs by default.

# %%
tiny = np.finfo(np.float32).tiny                 # 1.2e-38, the smallest normal float32
T_long = pick(600, 300)
x_long = rng.standard_normal((T_long, 4, 16)).astype(np.float32)
d_long = np.zeros((T_long, 4, 16), np.float32)
d_long[-1] = 1.0                                 # dL/d output: the last step only


def input_gradient(flush: bool) -> np.ndarray:
    """dL/dx_t (T, B, I) of a 1-layer float32 GRU, with or without the denormal flush."""
    gru_module.FLUSH_DENORMALS = flush
    try:
        g = GRU(16, 16, dtype="float32", seed=0)
        g.load_state_dict({k: v * 0.5 for k, v in g.state_dict().items()})
        g(x_long)
        return g.backward(d_long)[0]
    finally:
        gru_module.FLUSH_DENORMALS = True


raw, flushed = input_gradient(False), input_gradient(True)


def denormal(a):
    return (a != 0) & (np.abs(a) < tiny)


print(f"nothing flushed: {denormal(raw).sum():,} of {raw.size:,} entries of dL/dx are denormal")
print(f"flushed:         {denormal(flushed).sum():,} are denormal; "
      f"{(flushed == 0).sum():,} are exactly 0")
print(f"largest |flushed - unflushed| anywhere: {np.abs(flushed - raw).max():.1e}")
far = np.abs(raw) > 1e6 * tiny                   # a million times above the denormal range
print(f"entries above 1.2e-32: {far.sum():,}, bit-identical: {(flushed[far] == raw[far]).sum():,}")

fig, ax = plt.subplots(figsize=(7, 3.6))
for a, label in ((raw, "nothing flushed"), (flushed, "flushed (scratch's default)")):
    peak = np.abs(a).max(axis=(1, 2))
    ax.semilogy(np.arange(T_long), np.where(peak > 0, peak, np.nan), label=label)
ax.axhspan(2.0 ** -149, tiny, color="tab:red", alpha=0.15, label="float32 denormals")
ax.set(xlabel="input step t", ylabel="max |dL/dx_t| (log scale)",
       title=f"a float32 GRU's gradient, {T_long} steps back")
ax.legend()
show(fig, "03_denormals")

# %% [markdown]
# *The largest entry of each step's input gradient: geometric decay through the normal range,
# then the red band of denormals and 0 (nothing flushed); flushed, the gradient is 0 as soon
# as it would leave the normal range. The two differ by at most the size of what was flushed
# (about 1e-38); well above that range they are bit for bit the same, and just above it they
# differ in the last bits, which the denormals had already lost.*
#
# *The flushed gradient may still hold a few hundred denormals (the count above): they come
# from the very last product, $\partial x = \partial g_i W_{ih}$, which OpenBLAS splits over
# its worker threads, and a worker thread keeps its own floating-point mode (set when it
# started). None of its operands is denormal, and nothing computes on its result afterwards;
# with one BLAS thread (`OPENBLAS_NUM_THREADS=1`) the count is 0.*
#
# **How scratch flushes.** Two bits of the SSE control register (MXCSR) of the thread that
# computes switch denormals off: FTZ (results below $2^{-126}$ are written as 0) and DAZ
# (denormal operands are read as 0). [`scratch/flush_to_zero.py`](../scratch/flush_to_zero.py)
# sets them through the C library's `fegetenv` / `fesetenv` (ctypes, no compiled code) while
# the GRU's backward runs, and restores the thread's previous mode afterwards, on Linux with
# glibc on x86-64. Elsewhere `scan_backward` flushes, at every step, the arrays that carry the
# gradient (`scratch.gru.denormal_flush`): that keeps denormals out of every matrix product,
# but an element-wise product of two normal numbers can still *produce* one, which is why the
# CPU's mode is the better tool where it can be set.

# %%
a, b = np.float32(1e-30), np.float32(1e-10)
print("outside the block: 1e-30 * 1e-10 =", a * b, "(a denormal)")
with flush_to_zero() as on:
    print(f"inside (mode on: {on}): 1e-30 * 1e-10 =", a * b)
print("after the block:   1e-30 * 1e-10 =", a * b, "| mode settable here:", supported())

# %% [markdown]
# ## Takeaways
#
# * torch's GRU is not the textbook one: $b_{hn}$ sits inside the reset gate.
# * The backward of a GRU step is a handful of element-wise products and one matrix product;
#   through time it is the same step, run backwards, with $\partial h$ carried along.
# * With the input projections batched over time and the weight gradients left until after
#   the loop, plain NumPy keeps pace with `torch.nn.GRU` on the CPU (`bench/gru.py`), and
#   packed sequences cost no more than padded ones.
# * A vanishing float32 gradient ends in denormal numbers; the backward flushes them to 0 (the
#   CPU's flush-to-zero mode), which changes nothing above $1.2 \times 10^{-38}$.
# * Every claim above is a property test in `tests/test_gru.py`, against torch autograd
#   (float64 to 1e-10, float32 to 1e-5) and against finite differences.
#
# ## Exercises
#
# 1. Write the textbook GRU step (reset *before* the product: `tanh(W_in x + W_hn (r * h) + b)`)
#    and show, with the same weights, that its outputs differ from `torch.nn.GRUCell`'s.
# 2. Derive `d_W_hh` for one step from the equations above and check it against
#    `gru_cell_backward`'s output with a finite difference.
# 3. In `grad_reach`, which weights decide the rate of decay?  Scale only `weight_hh_l0` and
#    see whether the gradient still vanishes.
