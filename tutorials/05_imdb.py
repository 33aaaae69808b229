# %% [markdown]
# # Part 4: the assignment's BERT + BiGRU sentiment model on IMDB
#
# The assignment's model: a **frozen** pretrained BERT turns a review into one vector per
# token; a 2-layer bidirectional GRU (hidden 256) reads those vectors; the last forward state
# and the last backward state are concatenated, dropped out (p = 0.25) and mapped to one
# logit by a linear layer.  Training: Adam, `BCEWithLogitsLoss`, 2 epochs, best validation
# loss kept.  Its forward, verbatim:
#
# ```python
# with torch.no_grad():
#     embedded = self.bert(text)[0]
# _, hidden = self.rnn(embedded)
# hidden = self.dropout(torch.cat((hidden[-2], hidden[-1]), dim=1))
# return self.out(hidden)
# ```
#
# This tutorial rebuilds it (`reference.model.BERTGRUSentiment`), shows the three things that
# forward gets wrong for padded batches and how they are fixed, explains why the encoder's
# output is cached on disk, and trains the head briefly: on a small real IMDB subset if
# `IMDB_PATH` is set, else on a tiny synthetic set of reviews.  Encoder: the packaged
# all-MiniLM-L6-v2 (a real 6-layer BERT, hidden 384, the same WordPiece vocabulary as
# bert-base-uncased), so it runs offline.

# %%
import os
import time
from pathlib import Path

import matplotlib
matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from transformers import BertConfig, BertModel

from reference.encoders import load_encoder
from reference.model import BERTGRUSentiment, GRUHead, count_parameters, freeze_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorials/_build"))
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

# %% [markdown]
# ## The model and its size
# With bert-base-uncased (`BertConfig()`: 12 layers, hidden 768) the whole model has
# 112,241,409 parameters; after the assignment's freezing loop (every parameter whose name
# starts with `bert`) only the GRU and the linear layer learn: 2,759,169.  (Built on the
# `meta` device: shapes only, no memory.)

# %%
with torch.device("meta"):
    big = BERTGRUSentiment(BertModel(BertConfig()), 256, 1, 2, True, 0.25)
total = count_parameters(big)
trainable = count_parameters(freeze_bert(big), trainable_only=True)
print(f"bert-base + BiGRU: {total:,} parameters, {trainable:,} trainable")
assert (total, trainable) == (112_241_409, 2_759_169)

enc = load_encoder("minilm")
model = freeze_bert(BERTGRUSentiment(enc.model, 256, 1, 2, True, 0.25)).eval()
print(f"minilm + BiGRU: {count_parameters(model):,} parameters, "
      f"{count_parameters(model, trainable_only=True):,} trainable")

# %% [markdown]
# ## Padding changed the assignment's scores
# In a batch, short reviews are padded with `[PAD]` up to the longest.  The assignment's
# forward (1) let BERT attend to the `[PAD]` tokens (no attention mask), (2) ran the GRU over
# the padding, so the "last" forward state is the state after the padding and the backward
# direction *starts* in the padding, and (3) left BERT's dropout on during training
# (`model.train()` reaches the frozen encoder too).  So a review's score depended on which
# other reviews shared its batch.  `faithful=True` reproduces that; the default fixes it:
# the mask goes to BERT, the GRU reads each review only up to its length (the semantics of
# `pack_padded_sequence`), and `model.train()` leaves the encoder in eval mode.

# %%
faithful = BERTGRUSentiment(enc.model, 256, 1, 2, True, 0.25, faithful=True).eval()
faithful.load_state_dict(model.state_dict())                 # the same weights
ids = enc.tokenizer("An uneven film, but the ending is wonderful.", return_tensors="pt")["input_ids"]
padded = torch.cat([ids, torch.zeros(1, 30, dtype=torch.long)], dim=1)   # 30 more [PAD]
with torch.no_grad():
    for name, m in (("faithful", faithful), ("fixed", model)):
        a, b = torch.sigmoid(m(ids)).item(), torch.sigmoid(m(padded)).item()
        print(f"{name:>8}: P(pos) alone {a:.4f}, with 30 [PAD] {b:.4f}, change {b - a:+.2e}")
        if name == "fixed":
            assert abs(a - b) < 1e-5

# %% [markdown]
# ## Packing, exactly and fast
# `pack_padded_sequence` gives the right semantics but on CPU its backward pass is about 9x
# slower than the padded kernel.  `reference.model.PackedGRU` gets the same numbers from the
# padded kernel: the forward direction is causal, so it runs over the padded batch and its
# final state is *read* at each review's last real token; the backward direction runs over
# each review's real tokens reversed in place (padding left at the tail, never read back).
# With batches bucketed by length there is little padding to waste work on.

# %%
head = GRUHead(enc.hidden_size, 256, 1, 2, True, 0.25).eval()
x = torch.randn(16, 60, enc.hidden_size)
lengths = torch.randint(50, 61, (16,))


def timed(f):
    t0 = time.perf_counter()
    y = f()
    y.sum().backward()
    return y.detach(), time.perf_counter() - t0


def torch_packed():
    _, h = head.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    return head.out(torch.cat((h[-2], h[-1]), dim=1))


y_ref, t_ref = timed(torch_packed)
y_fast, t_fast = timed(lambda: head(x, lengths))
print(f"max |fast - packed| = {(y_fast - y_ref).abs().max():.2e}; forward+backward "
      f"{t_ref:.2f} s packed, {t_fast:.2f} s fast exact")
assert torch.allclose(y_fast, y_ref, atol=1e-5)

# %% [markdown]
# ## Why the encoder's output is cached
# The encoder is frozen: a review's token vectors are the same in every epoch.  The
# assignment recomputed them anyway, every batch of every epoch.  Computing them once and
# storing them (`reference.features`: float16 safetensors shards) makes every epoch cost only
# the GRU, and lets validation, test and later runs reuse them.  The price is disk space:
# about tokens x hidden x 2 bytes, e.g. 25,000 reviews x ~275 tokens x 384 x 2 B = 5.3 GB per
# split for MiniLM (2x that for bert-base, hidden 768).  Timing one batch of 16 reviews x 128
# tokens, and counting the encoder's cost per token (about 2 multiply-adds per weight outside
# the embedding tables):

# %%
text = torch.randint(1000, 30000, (16, 128))
with torch.no_grad():
    t0 = time.perf_counter()
    feats = enc.model(text, attention_mask=torch.ones_like(text))[0]
    t_enc = time.perf_counter() - t0
head.train()
t0 = time.perf_counter()
head(feats, torch.full((16,), 128)).sum().backward()
t_head = time.perf_counter() - t0


def flops_per_token(m):
    return 2 * sum(p.numel() for n, p in m.named_parameters() if "embeddings" not in n)


ratio = flops_per_token(big.bert) / flops_per_token(enc.model)
print(f"MiniLM forward {t_enc:.2f} s, head forward+backward {t_head:.2f} s: caching removes "
      f"{t_enc / (t_enc + t_head):.0%} of each later epoch's work here; bert-base needs "
      f"{ratio:.1f}x MiniLM's operations per token, so about "
      f"{ratio * t_enc / (ratio * t_enc + t_head):.0%} with the assignment's encoder")

# %% [markdown]
# ## A short training
# With `IMDB_PATH` set: 300 real training reviews (210 train / 90 valid) and 150 test
# reviews, first 128 tokens each.  Without it: a tiny synthetic set of template reviews.
# Features go through the cache (`reference.features.extract_features`); the loop is
# `reference.train.fit`, the one `python -m reference.train` uses.

# %%
from reference.data import find_imdb, load_imdb, stratified_subset, train_valid_split  # noqa: E402
from reference.features import extract_features  # noqa: E402
from reference.train import Split, fit, run_epoch  # noqa: E402


def synthetic_reviews(n, seed):
    rng = np.random.default_rng(seed)
    good = ["wonderful", "great", "moving", "brilliant", "a delight", "superb", "funny"]
    bad = ["awful", "boring", "dull", "a mess", "terrible", "painful", "lifeless"]
    things = ["the acting", "the plot", "the music", "the ending", "this film", "the script"]
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = [f"{rng.choice(things)} was {rng.choice(good if y else bad)}" for _ in range(3)]
        words.insert(int(rng.integers(0, 3)), f"{rng.choice(things)} was {rng.choice(good if not y else bad)}")
        texts.append(", ".join(words) + ".")
        labels.append(y)
    return texts, np.array(labels)


cache = Path(".cache/features")
if os.environ.get("IMDB_PATH") and Path(os.environ["IMDB_PATH"]).exists():
    data = load_imdb(find_imdb())
    tr = data["train"].subset(stratified_subset(data["train"].labels, 300, 3407))
    te = data["test"].subset(stratified_subset(data["test"].labels, 150, 3407))
    (train_texts, train_labels), (test_texts, test_labels) = (tr.texts, tr.labels), (te.texts, te.labels)
    source, epochs, max_length = "real IMDB subset", 4, 128
else:
    (train_texts, train_labels), (test_texts, test_labels) = synthetic_reviews(120, 0), synthetic_reviews(60, 1)
    source, epochs, max_length = "synthetic reviews", 4, 64
print(f"{source}: {len(train_texts)} train, {len(test_texts)} test; e.g. {train_texts[0][:100]!r}")

store = extract_features(enc, train_texts, cache, max_length=max_length, progress=False)
test_store = extract_features(enc, test_texts, cache, max_length=max_length, progress=False)
tr_idx, va_idx = train_valid_split(len(train_texts), round(0.3 * len(train_texts)), 3407)
train_split = Split(store, tr_idx, train_labels[tr_idx])
valid_split = Split(store, va_idx, train_labels[va_idx])
torch.manual_seed(3407)
head = GRUHead(enc.hidden_size, 256, 1, 2, True, 0.25)
t0 = time.perf_counter()
history = fit(head, train_split, valid_split, OUT / "part4_run", epochs=epochs, batch_size=16,
              seed=3407)
print(f"{epochs} epochs in {time.perf_counter() - t0:.0f} s")
test_loss, test_acc = run_epoch(head.eval(), Split(test_store, np.arange(len(test_texts)), test_labels), 64)
print(f"test loss {test_loss:.4f}, accuracy {test_acc:.2%} (last epoch's weights)")

# %%
ep = [r["epoch"] for r in history]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
for split in ("train", "valid"):
    ax1.plot(ep, [r[f"{split}_loss"] for r in history], "o-", label=split)
    ax2.plot(ep, [r[f"{split}_acc"] for r in history], "o-", label=split)
ax1.set(xlabel="epoch", ylabel="BCE loss (mean over reviews)", title=f"loss, {source}")
ax2.set(xlabel="epoch", ylabel="accuracy", title=f"accuracy, {source}", ylim=(0, 1))
ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
for ax in (ax1, ax2):
    ax.legend()
fig.tight_layout()
fig.savefig(OUT / "part4_training.png", dpi=120)
print(f"saved {OUT / 'part4_training.png'}")

# %% [markdown]
# ## The assignment's `predict_sentiment`
# The trained head goes back behind the encoder: `BERTGRUSentiment` holds the head's
# parameters under the same names (`rnn.*`, `out.*`), so a head checkpoint loads into it.

# %%
from reference.predict import predict_sentiment  # noqa: E402

full = BERTGRUSentiment(enc.model, 256, 1, 2, True, 0.25)
full.load_state_dict(head.state_dict(), strict=False)
for s in ("This film is terrible", "This film is great"):
    print(f"{s!r}: P(positive) = {predict_sentiment(full, enc.tokenizer, s, max_length):.3f}")

# %% [markdown]
# The full run (all 25,000 + 25,000 reviews, 2 epochs) is `bench/imdb_full.sh`; its numbers
# are in the README's results table beside the assignment's 91.21% with bert-base-uncased.
