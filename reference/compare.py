"""``python -m reference.compare``: every scratch component beside its torch reference.

One row per component: the largest |scratch - reference| over its outputs (and gradients where
the row says so), the best-of-N wall time of each side measured in this run
(:func:`reference.timing.best_time`), and their ratio (scratch / torch; below 1 means scratch
is faster).

This module owns the rows: it imports both sides (``scratch`` and the torch mirrors
``reference.recurrence``, ``reference.attention``, ``reference.gru``, which hold torch maths
only).  A suite is a function ``rows(repeat) -> list[Row]`` registered with ``@suite(name)``;
the table lists the suites in the order they are registered here.  Adding one::

    @suite("adam")
    def adam_rows(repeat):
        ...
        return [compare_row("Adam: 100 steps", scratch_fn, torch_fn, repeat)]

The encoder and sentiment rows run on real text: the IMDB archive when it is given (``--data``
or ``$IMDB_PATH``), else the 16 short reviews the project ships (``reference/reviews.json``),
so that the table needs no download.  The table's first line says which were used.  Sizes are
a demonstration's (a few seconds a row); ``bench/`` measures the full sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from importlib import resources

import numpy as np
import torch

from scratch.backend import to_numpy
from scratch.pipeline import cli

from .timing import best_time, pin_threads


@dataclass
class Row:
    component: str
    max_abs_err: float
    scratch_s: float
    torch_s: float

    @property
    def ratio(self) -> float:
        return self.scratch_s / self.torch_s if self.torch_s > 0 else float("inf")


def max_abs_diff(a, b) -> float:
    """max |a - b| over paired arrays/tensors (tuples are zipped)."""
    if isinstance(a, (tuple, list)):
        return max(max_abs_diff(x, y) for x, y in zip(a, b, strict=True))
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def compare_row(component: str, scratch_fn, torch_fn, repeat: int = 3) -> Row:
    """Time both sides and compare their outputs."""
    s_out, s_t = best_time(scratch_fn, repeat)
    t_out, t_t = best_time(torch_fn, repeat)
    return Row(component, max_abs_diff(s_out, t_out), s_t, t_t)


# --------------------------------------------------------------------------------------------
# The suites, in table order.
# --------------------------------------------------------------------------------------------

SUITES: dict = {}          # name -> rows(repeat) -> list[Row], in registration (table) order


def suite(name: str):
    """Register ``rows(repeat) -> list[Row]`` as the suite ``name`` (``--only name``)."""
    def register(rows):
        SUITES[name] = rows
        return rows
    return register


@suite("recurrence")
def recurrence_rows(repeat: int = 3) -> list[Row]:
    """The toy recurrence: loop and closed form vs the torch module."""
    from scratch import recurrence as S

    from . import recurrence as R

    x = np.random.default_rng(0).standard_normal((256, 200))
    xt = torch.from_numpy(x)
    ref, rnn = R.AlternatingRNN(), S.AlternatingRNN()

    def torch_h():
        with torch.no_grad():
            return ref(xt)

    return [
        compare_row("toy recurrence: loop y, h (256x200, f64)", lambda: rnn(x), torch_h, repeat),
        compare_row("toy recurrence: closed form h (256x200, f64)",
                    lambda: S.closed_form(x), lambda: torch_h()[1], repeat),
    ]


@suite("attention")
def attention_rows(repeat: int = 3) -> list[Row]:
    """Each variant's output and its three gradients (scratch forward + backward vs torch
    forward + autograd), batch 4 x 256 x 64, float64; then recurrent decoding."""
    from scratch import attention as A

    from . import attention as R

    rng = np.random.default_rng(0)
    q, k, v, d_out = (rng.standard_normal((4, 256, 64)) for _ in range(4))
    tq, tk, tv, td = (torch.from_numpy(x) for x in (q, k, v, d_out))
    variants = [
        ("softmax", A.softmax_attention, A.softmax_attention_backward, R.softmax_attention, {}),
        ("softmax causal", A.softmax_attention, A.softmax_attention_backward,
         R.softmax_attention, {"causal": True}),
        ("efficient (Shen)", A.efficient_attention, A.efficient_attention_backward,
         R.efficient_attention, {}),
        ("linear", A.linear_attention, A.linear_attention_backward, R.linear_attention, {}),
        ("linear causal", A.linear_attention, A.linear_attention_backward, R.linear_attention,
         {"causal": True}),
    ]
    rows = []
    for name, fwd, bwd, ref, kw in variants:
        rows.append(compare_row(
            f"attention {name}: out+3 grads",
            lambda fwd=fwd, bwd=bwd, kw=kw: (fwd(q, k, v, **kw), *bwd(q, k, v, d_out, **kw)),
            lambda ref=ref, kw=kw: R.with_grads(ref, tq, tk, tv, td, **kw), repeat))
    state = A.LinearAttentionState(64, 64, batch_shape=(4,), dtype="float64")

    def recurrent():
        state.reset()
        return np.stack([state.step(q[:, t], k[:, t], v[:, t]) for t in range(q.shape[1])], 1)

    def torch_causal():
        with torch.no_grad():
            return R.linear_attention(tq, tk, tv, causal=True)

    rows.append(compare_row("attention linear recurrent: 256 steps", recurrent,
                            torch_causal, repeat))
    return rows


# The assignment's head GRU (the time length is cut in the rows below).
ASSIGNMENT = dict(batch=128, input_size=768, hidden_size=256, num_layers=2, bidirectional=True)


@suite("gru")
def gru_rows(repeat: int = 3) -> list[Row]:
    """GRU rows at the assignment's head shape (batch 128, 768 -> 256, 2 layers, bidirectional,
    float32), with the time length cut to 16 steps (of up to 512) to keep the table quick;
    ``bench/gru.py`` times the full shape."""
    from scratch.gru import GRU

    from .gru import torch_forward_backward, torch_gru_like

    a, T = ASSIGNMENT, 16
    gru = GRU(a["input_size"], a["hidden_size"], a["num_layers"], batch_first=True,
              bidirectional=True, dtype="float32", seed=0)
    ref = torch_gru_like(gru)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a["batch"], T, a["input_size"])).astype(np.float32)
    d_out = rng.standard_normal((a["batch"], T, 2 * a["hidden_size"])).astype(np.float32)
    xt = torch.from_numpy(x)
    h0 = np.zeros((2 * a["num_layers"], a["batch"], a["hidden_size"]), np.float32)

    def torch_forward():
        with torch.no_grad():
            return ref(xt)

    def scratch_both():
        out, h_n = gru(x)
        d_x, _ = gru.backward(d_out)
        return [out, h_n, d_x] + [gru.grads[k] for k in sorted(gru.grads)]

    def torch_both():
        r = torch_forward_backward(ref, x, h0, d_out)
        return [r["output"], r["h_n"], r["d_x"]] + [r["grads"][k] for k in sorted(r["grads"])]

    shape = f"B128 T{T} 768->256 2L bi f32"
    return [
        compare_row(f"GRU forward ({shape})", lambda: gru(x), torch_forward, repeat),
        compare_row(f"GRU fwd+bwd, all grads ({shape})", scratch_both, torch_both, repeat),
    ]



# ---- the sentiment model: encoder, head, Adam, a training epoch ------------------------------

SHIPPED = "reviews.json"           # reference/reviews.json: 16 reviews written for the project
EPOCH_REVIEWS = 256                # the epoch row's training reviews when IMDB is given


@dataclass
class ReviewSource:
    """The reviews of the encoder and sentiment rows: IMDB (``path``) or the shipped ones."""
    path: str | None = None

    @property
    def label(self) -> str:
        if self.path is None:
            return (f"reviews: the {len(shipped_reviews()[0])} shipped with the project "
                    f"(reference/{SHIPPED}); --data PATH or IMDB_PATH for IMDB's")
        return f"reviews: IMDB ({self.path})"

    def texts(self, n: int) -> list[str]:
        """The first ``n`` test reviews (IMDB) or shipped reviews."""
        if self.path is None:
            return shipped_reviews()[0][:n]
        return _imdb(self.path)["test"].texts[:n]

    def training(self):
        """(texts, labels, batch size, what they are) for the epoch row: IMDB: the first 256
        training reviews of ``make demo``'s subset; shipped: all 16, batch 4."""
        if self.path is None:
            texts, labels = shipped_reviews()
            return texts, labels, 4, f"{len(texts)} shipped reviews"
        from .pipeline import demo
        from .pipeline import train as rtrain
        from .pipeline.data import stratified_subset, train_valid_split

        reviews = _imdb(self.path)["train"]
        reviews = reviews.subset(stratified_subset(reviews.labels, demo.LIMIT_TRAIN, demo.SEED))
        n = len(reviews)
        tr, _ = train_valid_split(n, round(n * rtrain.VALID_FRACTION), demo.SEED)
        reviews = reviews.subset(tr[:EPOCH_REVIEWS])
        return reviews.texts, reviews.labels, 32, f"{len(reviews)} IMDB demo reviews"


SOURCE = ReviewSource()            # set by collect()
_LOADED: dict = {}


def _imdb(path: str) -> dict:
    """Both splits of the archive at ``path``, read once per process."""
    if path not in _LOADED:
        from .pipeline.data import load_imdb

        _LOADED[path] = load_imdb(path)
    return _LOADED[path]


def shipped_reviews() -> tuple[list[str], np.ndarray]:
    """(texts, labels) of the reviews shipped in ``reference/reviews.json`` (1 = positive)."""
    rows = json.loads(resources.files(__package__).joinpath(SHIPPED).read_text("utf-8"))
    rows = rows["reviews"]
    return [r["text"] for r in rows], np.array([r["label"] for r in rows], dtype=np.int64)


@suite("encoder")
def encoder_rows(repeat: int = 3, n: int = 8, max_length: int = 128) -> list[Row]:
    """The frozen encoder's forward on ``n`` reviews (MiniLM, <= ``max_length`` tokens,
    right-padded, masked): :class:`scratch.bert.BertEncoder` against transformers' BertModel
    (float32 and float64), and two swapped attentions against :mod:`reference.bert_attention`."""
    from scratch.bert import BertEncoder
    from scratch.pipeline.tokenizer import pad_batch

    from .bert_attention import swap_attention
    from .pipeline.data import tokenize
    from .pipeline.encoders import load_encoder

    ref = load_encoder("minilm")                                   # BertModel, frozen, eval
    ids, mask = pad_batch(tokenize(ref.tokenizer, SOURCE.texts(n), max_length))   # (n, T)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)

    def reference():
        with torch.no_grad():
            return ref.model(ids_t, attention_mask=mask_t).last_hidden_state

    rows, shape = [], f"{n} reviews x {ids.shape[1]} tok"
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        enc = BertEncoder.from_pretrained(ref.source, dtype=name)
        ref.model.to(dtype)
        rows.append(compare_row(f"encoder MiniLM {name}: {shape}", lambda enc=enc: enc(ids, mask),
                                reference, repeat))
    for variant, label in ((dict(attention="efficient"), "efficient, all layers"),
                           (dict(attention="linear", swap_layers=2), "linear, top 2 layers")):
        swap_attention(ref.model, **variant)                      # the float64 model
        swapped = enc.with_attention(**variant)
        rows.append(compare_row(f"encoder {label}, f64: {shape}",
                                lambda swapped=swapped: swapped(ids, mask), reference, repeat))
    swap_attention(ref.model, "softmax")
    return rows


def _head_pair(emb_dim: int, dropout: float = 0.25, seed: int = 0):
    """The assignment's head in torch and the same weights in scratch (float32)."""
    from scratch.sentiment import SentimentHead

    from .model import GRUHead

    torch.manual_seed(seed)
    ref = GRUHead(emb_dim, 256, 1, 2, True, dropout)
    mine = SentimentHead(emb_dim, 256, 1, 2, True, dropout, dtype="float32")
    mine.load_state_dict(ref.state_dict())
    return mine, ref


@suite("sentiment")
def sentiment_rows(repeat: int = 3) -> list[Row]:
    """The head (forward + backward through the BCE loss, B32, up to 128 steps, MiniLM's 384
    wide), Adam on its 2.1M parameters, and one training epoch on cached MiniLM features
    (:meth:`ReviewSource.training`; dropout off so that both sides take the same steps)."""
    from scratch.optim import Adam

    rng = np.random.default_rng(0)
    B, T, E = 32, 128, 384
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    lengths = rng.integers(T // 4, T + 1, B)
    lengths[0] = T
    y = rng.integers(0, 2, B).astype(np.float32)
    mine, ref = _head_pair(E, dropout=0.0)
    xt, lt, yt = torch.from_numpy(x), torch.from_numpy(lengths), torch.from_numpy(y)

    def scratch_step():
        loss, grads, _ = mine.loss_and_grads(x, lengths, y, training=True)
        return [np.float32(loss)] + [grads[k] for k in sorted(grads)]

    def torch_step():
        ref.zero_grad()
        z = ref(xt, lt).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yt)
        loss.backward()
        named = dict(ref.named_parameters())
        return [loss.detach()] + [named[k].grad for k in sorted(named)]

    rows = [compare_row(f"head fwd+bwd+BCE, all grads (B{B} T<={T} {E}->256)", scratch_step,
                        torch_step, repeat)]

    params = {k: v.copy() for k, v in mine.params.items()}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    tparams = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
    for k, t in tparams.items():
        t.grad = torch.from_numpy(grads[k])

    def scratch_adam():
        opt = Adam(params)
        for _ in range(10):
            opt.step(grads)
        return [params[k] for k in sorted(params)]

    def torch_adam():
        opt = torch.optim.Adam(list(tparams.values()))
        for _ in range(10):
            opt.step()
        return [tparams[k] for k in sorted(tparams)]

    # each side is timed from the same start only once (they update in place): repeat 1
    n = sum(v.size for v in params.values())
    rows.append(compare_row(f"Adam: 10 steps on {n / 1e6:.2f}M head parameters", scratch_adam,
                            torch_adam, 1))
    rows.append(_epoch_row())
    return rows


def _epoch_row() -> Row:
    """One training epoch on cached MiniLM features (128 tokens), from the same weights,
    dropout off: both sides' final weights compared (timed once each)."""
    from scratch.optim import Adam
    from scratch.pipeline import train as strain
    from scratch.pipeline.features import FeatureStore

    from .pipeline import demo
    from .pipeline import train as rtrain
    from .pipeline.encoders import load_encoder
    from .pipeline.features import extract_features

    texts, labels, batch, what = SOURCE.training()
    store = extract_features(load_encoder("minilm"), texts, max_length=demo.MAX_LENGTH,
                             progress=False)
    mine, ref = _head_pair(store.hidden_size, dropout=0.0)
    sstore = FeatureStore(store.folder)                 # the same entry, NumPy batches
    tr, labels = np.arange(len(texts)), np.asarray(labels)

    def scratch_epoch():
        strain.run_epoch(mine, strain.Split(sstore, tr, labels), batch, Adam(mine.params),
                         seed=demo.SEED + 1)
        return [mine.params[k] for k in sorted(mine.params)]

    def torch_epoch():
        opt = torch.optim.Adam(ref.parameters())
        rtrain.run_epoch(ref, rtrain.Split(store, tr, labels), batch, opt, seed=demo.SEED + 1)
        named = dict(ref.named_parameters())
        return [named[k] for k in sorted(named)]

    return compare_row(f"training epoch: {what}, B{batch}, no dropout", scratch_epoch,
                       torch_epoch, 1)


# --------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------

def suite_name(name: str) -> str:
    """A suite's name; the old module spelling ``reference.gru`` still works for ``gru``."""
    short = name.removeprefix("reference.")
    if short not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return short


def collect(suites=None, repeat: int = 3, data: str | None = None) -> list[Row]:
    """The rows of ``suites`` (names; all of them, in table order, if None); the encoder and
    sentiment rows on IMDB at ``data`` (an archive or folder) or, if None, the shipped reviews."""
    global SOURCE
    SOURCE = ReviewSource(None if data is None else str(data))
    rows: list[Row] = []
    for name in (SUITES if suites is None else [suite_name(s) for s in suites]):
        rows.extend(SUITES[name](repeat=repeat))
    return rows


def format_table(rows: list[Row], reviews: str | None = None) -> str:
    head = (f"{'component':<56} {'max|scratch-ref|':>16} {'scratch s':>10} {'torch s':>10} "
            f"{'scratch/torch':>13}")
    lines = ([reviews] if reviews else []) + [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.component:<56} {r.max_abs_err:>16.3e} {r.scratch_s:>10.4f} "
                     f"{r.torch_s:>10.4f} {r.ratio:>13.2f}")
    lines.append("sizes are a demonstration's (GRU: 16 steps; encoder: 8 reviews; epoch: a few "
                 "hundred reviews at most); bench/ measures the full sizes")
    lines.append("scratch/torch = scratch s / torch s, both measured in this run "
                 "(below 1: scratch is faster)")
    return "\n".join(lines)


def suite_list(text: str) -> list[str]:
    """argparse type of ``--only``: a comma list of suite names."""
    try:
        names = [suite_name(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not names:
        raise argparse.ArgumentTypeError(f"no suite named in {text!r}")
    return names


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = cli.Parser(
        prog="python -m reference.compare",
        description="Run every scratch component beside its torch reference and print "
                    "max |scratch - reference|, both times and their ratio (scratch / torch).")
    p.add_argument("--data", metavar="PATH",
                   help="aclImdb directory or .tar.gz for the encoder and sentiment rows "
                        "(default: $IMDB_PATH, else the 16 reviews shipped with the project)")
    p.add_argument("--repeat", type=cli.positive(int), default=3,
                   help="timing repeats, best kept (default 3)")
    p.add_argument("--only", type=suite_list, action="append", metavar="SUITE[,SUITE...]",
                   help=f"run only these suites (default: all of {', '.join(SUITES)})")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    p.add_argument("--threads", type=cli.positive(int), metavar="N",
                   help="limit both sides to N threads (BLAS and torch); default: libraries' own")
    args = p.parse_args(argv)
    suites = None if not args.only else list(dict.fromkeys(s for o in args.only for s in o))
    if args.json:
        cli.check_file(p, "--json", args.json)
    data = args.data or os.environ.get("IMDB_PATH")
    needs_reviews = suites is None or {"encoder", "sentiment"} & set(suites)
    if data and needs_reviews:
        from .pipeline.data import ImdbError, find_imdb

        try:
            data = str(find_imdb(data))
            _imdb(data)
        except ImdbError as e:
            p.error(cli.one_line(e))
    if args.threads:
        pin_threads(args.threads)
    rows = collect(suites, args.repeat, data)
    print(format_table(rows, SOURCE.label if needs_reviews else None))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ratio": r.ratio} for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, "python -m reference.compare"))
