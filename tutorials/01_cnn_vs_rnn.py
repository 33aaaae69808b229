# %% [markdown]
# # Part 1: CNNs vs RNNs on sequences, measured
#
# The assignment's first question: what does a convolutional network trade against a
# recurrent one when the input is a sequence?  Two differences matter, and both can be
# *measured* rather than asserted:
#
# 1. **Receptive field.**  A stack of `L` 1-D convolutions with kernel `k` sees
#    `1 + L (k - 1)` neighbouring steps; anything further away cannot influence an output,
#    whatever the weights.  An RNN's state `h_t = f(x_t, h_{t-1})` depends on *every* earlier
#    input: its receptive field is the whole prefix (in practice limited by vanishing
#    gradients, not by the architecture).
# 2. **Parallelism.**  A convolution computes all `T` positions at once (one big matrix
#    product per layer, `L` sequential steps in all); an RNN must take `T` sequential steps,
#    because `h_t` needs `h_{t-1}`.  On parallel hardware the CNN wins on wall time as `T` grows.
#
# Also: a CNN shares weights across positions (translation equivariance), has a fixed cost
# per position and no notion of order beyond its window; an RNN carries a fixed-size state
# (a bottleneck for long contexts, but constant memory at inference), and handles any length.

# %%
import os
from pathlib import Path

import matplotlib
matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import torch
from torch import nn

from reference.timing import best_time, pin_threads

OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorials/_build"))
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
pin_threads(1)                    # one core each, so the comparison is about steps, not threads
T, C, L, K = 64, 16, 4, 3

cnn = nn.Sequential(*[m for _ in range(L) for m in (nn.Conv1d(C, C, K, padding=K - 1), nn.Tanh())])
rnn = nn.GRU(C, C, batch_first=True)


def cnn_last(x):            # causal convolutions: pad left, crop right, read the last step
    h = x.transpose(1, 2)
    for m in cnn:
        h = m(h)[..., : x.shape[1]] if isinstance(m, nn.Conv1d) else m(h)
    return h[:, :, -1]


def rnn_last(x):
    return rnn(x)[0][:, -1]

# %% [markdown]
# ## Receptive field: which inputs can move the last output?
# We ask autograd for |d y_T / d x_t| at every step t.  The CNN's gradient is exactly zero
# before step `T - L (k - 1)`; the GRU's is not.

# %%
def saliency(f):
    x = torch.randn(1, T, C, requires_grad=True)
    f(x).sum().backward()
    return x.grad.abs().sum(-1)[0]


s_cnn, s_rnn = saliency(cnn_last), saliency(rnn_last)
field = 1 + L * (K - 1)
assert (s_cnn[: T - field] == 0).all() and (s_cnn[T - field:] > 0).all()
assert (s_rnn[: T - field] > 0).all()
print(f"CNN receptive field: {field} steps; the GRU's last output depends on all {T} steps")

# %% [markdown]
# ## Parallelism: wall time against sequence length
# Forward pass, batch 8, one thread, on this machine's CPU.  The GRU's time grows with `T` through `T`
# sequential steps; the CNN's through the size of `L` parallel products.

# %%
lengths, t_cnn, t_rnn = [32, 128, 512, 1024], [], []
with torch.no_grad():
    for n in lengths:
        x = torch.randn(8, n, C)
        for f, acc in ((cnn_last, t_cnn), (rnn_last, t_rnn)):
            acc.append(best_time(lambda: f(x), repeat=5)[1])    # best of 5: the least disturbed run
for n, a, b in zip(lengths, t_cnn, t_rnn):
    print(f"T={n:5d}  CNN {a * 1e3:7.2f} ms   GRU {b * 1e3:7.2f} ms   GRU/CNN {b / a:5.1f}x")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
ax1.plot(s_cnn.numpy(), label=f"CNN ({L} layers, k={K})")
ax1.plot(s_rnn.numpy(), label="GRU")
ax1.axvline(T - field, color="gray", ls=":", label="edge of CNN receptive field")
ax1.set(xlabel="input step t", ylabel="|d y_T / d x_t|", yscale="symlog", title="What the last output can see")
ax1.legend()
ax2.loglog(lengths, t_cnn, "o-", label="CNN")
ax2.loglog(lengths, t_rnn, "s-", label="GRU")
ax2.set(xlabel="sequence length T", ylabel="forward time (s)", title="Sequential steps cost time")
ax2.legend()
fig.tight_layout()
fig.savefig(OUT / "part1_cnn_vs_rnn.png", dpi=110)
print("figure:", OUT / "part1_cnn_vs_rnn.png")
