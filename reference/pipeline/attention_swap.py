r"""``python -m reference.pipeline.attention_swap``: Problem 3 measured inside the pretrained
encoder.

The assignment says Efficient Attention "will not influence model's performance".  This command
measures it: the frozen encoder with its softmax attention replaced (every layer, or only the
top k) by Efficient Attention (softmax or scaling normalisation) or linear attention
(``phi = elu(., alpha) + 1``, alpha 1 as the paper and 0.1), same weights, same projections,
padding respected (:mod:`reference.bert_attention`, through transformers' attention registry).

    python -m reference.pipeline.attention_swap --data PATH [--encoder minilm] [--limit-train 4000]
        [--limit-test 4000] [--max-length 128] [--variants all] [--layers all,top1]
        [--distill-steps 200] [--distill-variants auto] [--distill-drop 2] [--distill-layers all]
        [--epochs 2]
        [--threads N] [--results results/attention_swap.json] [--out runs/attention_swap]

For the softmax baseline and every variant x layer setting (and, with ``--distill-steps``, the
distilled ones), on the same stratified subsets, the same 70/30 train/valid split and seed:

1. token features of train and test reviews (:func:`reference.pipeline.features.extract_features`,
   cached: the key hashes the encoder's config, which carries ``swapped_attention``, and its
   weights, so each variant and each distilled encoder has its own entries);
2. the assignment's head (2-layer BiGRU 256, dropout 0.25, Adam 1e-3, BCEWithLogits, batch 128,
   best-validation checkpoint; :func:`reference.pipeline.train.fit`) from the same seeded init;
3. its test accuracy and loss; the mean cosine similarity of the variant's last hidden states
   to the softmax encoder's over every real test token; the feature time (the encoder's
   seconds on train + test texts, as each cache entry recorded them when it was made).

Distillation (:mod:`reference.pipeline.distill`): only the swapped layers' query/key projections
train, to reproduce the softmax encoder's layer outputs on the head's training reviews (no
validation or test text), then the same measurement.  By default (``--distill-variants auto``) the
rows that need it: those of ``--distill-layers`` whose accuracy fell more than ``--distill-drop``
points below softmax's.  The distilled projections are cached (``CACHE/distilled/``) under a
key of the encoder, variant, settings and texts.

Precision: features use bf16 autocast where :mod:`reference.pipeline.autocast` finds it faster
on this CPU (the main pipeline's default; ``--autocast bf16|float32`` to choose).
``precision_check`` in the results measures what that costs: the cosine of bf16 to float32 last
hidden states per variant on a few test reviews.

Writes the results JSON (``--results``), a Markdown table beside it (``.md``), and prints the
table.  Bad input: one line and exit status 2 (:mod:`reference.pipeline.cli`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from scratch.pipeline.atomic import atomic_write, write_json
from scratch.pipeline.tokenizer import pad_batch

from ..bert_attention import swap_attention
from ..model import GRUHead
from . import checkpoint as ckpt
from . import cli
from .autocast import choose_autocast
from .data import tokenize, train_valid_split
from .distill import distill
from .encoders import Encoder
from .features import encoder_fingerprint, extract_features
from .train import VALID_FRACTION, Split, fit, run_epoch

VARIANTS = {                                  # name -> swap_attention's options
    "efficient-softmax": dict(attention="efficient", normalization="softmax"),
    "efficient-scaling": dict(attention="efficient", normalization="scaling"),
    "linear-alpha1": dict(attention="linear", alpha=1.0),
    "linear-alpha0.1": dict(attention="linear", alpha=0.1),
}
BASELINE = "softmax"
DISTILL_DROP = 2.0          # --distill-variants auto: distil the rows that lost more (points)
HEAD = dict(hidden_dim=256, output_dim=1, n_layers=2, bidirectional=True, dropout=0.25)
PROBE_TEXTS = 64            # validation reviews on which the distillation loss is reported


# --- options -------------------------------------------------------------------------------------

def _names(allowed, what):
    def parse(text):
        names = list(allowed) if text == "all" else [s.strip() for s in text.split(",")]
        if bad := [n for n in names if n not in allowed]:
            raise ValueError(f"unknown {what} {', '.join(bad)}: use all or some of "
                             f"{', '.join(allowed)}")
        return list(dict.fromkeys(names))
    return parse


def _auto(parse):
    return lambda text: "auto" if text == "auto" else parse(text)


def parse_layers(text: str) -> list[str]:
    """``all,top1,top2`` -> ["all", "top1", "top2"] (each ``all`` or ``topK``, K >= 1)."""
    specs = [s.strip() for s in text.split(",")]
    for s in specs:
        if s != "all" and not (s.startswith("top") and s[3:].isdigit() and int(s[3:]) >= 1):
            raise ValueError(f"layers {s!r}: use all or topK (K >= 1), e.g. all,top1,top2")
    return list(dict.fromkeys(specs))


def swap_layers(spec: str):
    """``all`` -> None (every layer), ``topK`` -> K (swap_attention's argument)."""
    return None if spec == "all" else int(spec[3:])


def _arg_type(parse):
    import argparse

    def wrapped(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return wrapped


def build_parser():
    p = cli.Parser(prog="python -m reference.pipeline.attention_swap",
                   description=__doc__.split("\n\n")[1].replace("\n", " "))
    cli.add_feature_args(p)
    p.set_defaults(encoder="minilm", max_length=128, limit_train=4000, limit_test=4000)
    variants = _arg_type(_names(VARIANTS, "variant"))
    p.add_argument("--variants", type=variants, default=list(VARIANTS),
                   help=f"comma-separated, or all (default): {', '.join(VARIANTS)}")
    p.add_argument("--layers", type=_arg_type(parse_layers), default=["all", "top1"],
                   help="where to swap, comma-separated: all | topK (default all,top1)")
    p.add_argument("--epochs", type=cli.positive(int), default=2)
    p.add_argument("--batch-size", type=cli.positive(int), default=128)
    p.add_argument("--lr", type=cli.positive(float), default=1e-3, help="the head's Adam rate")
    p.add_argument("--distill-steps", type=cli.non_negative(int), default=200,
                   help="Adam steps of q/k distillation per distilled variant (0: none)")
    p.add_argument("--distill-variants", type=_arg_type(_auto(_names(VARIANTS, "variant"))),
                   default="auto",
                   help="variants to distill, among --variants, or auto (default): each "
                        "variant x --distill-layers row whose test accuracy fell more than "
                        "--distill-drop points below softmax's")
    p.add_argument("--distill-drop", type=cli.non_negative(float), default=DISTILL_DROP,
                   metavar="PP", help="auto's threshold in accuracy points (default %(default)s)")
    p.add_argument("--distill-layers", type=_arg_type(parse_layers), default=["all"],
                   help="layer settings to distill, among --layers (default all)")
    p.add_argument("--distill-batch", type=cli.positive(int), default=16)
    p.add_argument("--distill-lr", type=cli.positive(float), default=1e-3)
    p.add_argument("--precision-check", type=cli.non_negative(int), default=32, metavar="N",
                   help="test reviews for the bf16-vs-float32 check (0: skip)")
    p.add_argument("--threads", type=cli.positive(int), help="torch threads (default: torch's)")
    p.add_argument("--results", default="results/attention_swap.json",
                   help="results JSON (a .md table is written beside it)")
    p.add_argument("--out", default="runs/attention_swap", help="head checkpoints, one per row")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def check_args(p, a):
    """Everything checkable before data and weights: (device, encoder info)."""
    if a.limit_train < 10:
        p.error(f"--limit-train must be >= 10 (train and valid both need reviews), "
                f"got {a.limit_train}")
    if extra := [s for s in a.distill_layers if s not in a.layers]:
        p.error(f"--distill-layers {','.join(extra)} not among --layers {','.join(a.layers)}")
    if a.distill_variants != "auto" and (
            extra := [v for v in a.distill_variants if v not in a.variants]):
        p.error(f"--distill-variants {','.join(extra)} not among --variants")
    device = cli.check_device(p, a.device)
    if device != "cpu":
        p.error("--device: this experiment runs on the CPU (bf16 autocast is set up for it)")
    cli.check_folder(p, "--cache", a.cache)
    cli.check_autocast(p, a.autocast)
    cli.check_folder(p, "--out", a.out)
    results = Path(a.results)
    if results.suffix != ".json":
        p.error(f"--results must name a .json file, got {a.results}")
    cli.check_folder(p, "--results", results.parent)
    return device, cli.check_encoder(p, a.encoder, a.max_length)


# --- measurements --------------------------------------------------------------------------------

def timed_features(encoder, texts, a, autocast: bool, desc: str):
    """(FeatureStore, timing).  ``seconds``: the encoder's time on these texts as the cache entry
    recorded it when it was made (its ``seconds_this_run``: forward passes and shard writes,
    the same definition for an entry made now or by an earlier run); ``cached``: made by an
    earlier run; ``call_seconds``/``cpu_seconds``: this call's wall and CPU time (tokenizing
    and hashing included, waits for another writer excluded)."""
    t0, c0, start = time.perf_counter(), time.process_time(), time.time()
    store = extract_features(encoder, texts, a.cache, max_length=a.max_length,
                             autocast=autocast, progress=not a.no_progress, desc=desc)
    return store, {"cached": (store.folder / "index.json").stat().st_mtime < start - 1,
                   "entry": store.folder.name, "tokens": int(store.lengths.sum()),
                   "seconds": store.meta.get("seconds_this_run"),
                   "call_seconds": round(time.perf_counter() - t0 - store.wait_seconds, 1),
                   "cpu_seconds": round(time.process_time() - c0, 1)}


def mean_cosine(a, b, batch: int = 256) -> float:
    """Mean over every real token of cos(a_token, b_token): two feature stores of the same
    texts (same lengths)."""
    if not np.array_equal(a.lengths, b.lengths):
        raise ValueError(f"{a.folder} and {b.folder} hold different texts")
    total, count = 0.0, 0
    for s in range(0, len(a), batch):
        idx = np.arange(s, min(s + batch, len(a)))
        (xa, la), (xb, _) = a.batch(idx), b.batch(idx)
        cos = torch.nn.functional.cosine_similarity(xa, xb, dim=-1)            # (B, L)
        real = torch.arange(xa.shape[1])[None, :] < la[:, None]                # (B, L)
        total += float(cos[real].double().sum())
        count += int(real.sum())
    return total / count


def train_and_test(stores, labels, split, a, out: Path, config: dict) -> dict:
    """The assignment's head from the seeded init on ``stores["train"]`` (``split`` = (train,
    valid) indices), best-validation checkpoint in ``out``, then its test loss and accuracy."""
    tr, va = split
    torch.manual_seed(a.seed)
    head = GRUHead(emb_dim=stores["train"].hidden_size, **HEAD)
    t0 = time.perf_counter()
    history = fit(head, Split(stores["train"], tr, labels["train"][tr]),
                  Split(stores["train"], va, labels["train"][va]), out, epochs=a.epochs,
                  batch_size=a.batch_size, seed=a.seed, lr=a.lr, config=config,
                  progress=not a.no_progress, log=lambda msg: print("  " + msg, flush=True))
    best, _ = ckpt.load_head(out)
    test = Split(stores["test"], np.arange(len(stores["test"])), labels["test"])
    loss, acc = run_epoch(best, test, a.batch_size, None, 0, "cpu", not a.no_progress, "test")
    best_rec = min(history, key=lambda r: r["valid_loss"])
    return {"test_acc": acc, "test_loss": loss, "best_epoch": best_rec["epoch"],
            "valid_acc": best_rec["valid_acc"], "head_seconds": round(time.perf_counter() - t0, 1),
            "history": [{k: r[k] for k in ("epoch", "train_loss", "train_acc", "valid_loss",
                                           "valid_acc")} for r in history]}


def precision_check(encoder, texts, a, variants) -> dict:
    """Cosine (mean over real tokens) of bf16-autocast to float32 last hidden states, for the
    softmax encoder and each variant in all layers: the noise bf16 features carry."""
    ids, mask = pad_batch(tokenize(encoder.tokenizer, texts, a.max_length), encoder.pad_id)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    real = mask.bool()
    out = {}
    for name in [BASELINE, *variants]:
        swap_attention(encoder.model, **VARIANTS.get(name, {"attention": "softmax"}))
        with torch.inference_mode():
            f32 = encoder.model(input_ids=ids, attention_mask=mask)[0]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = encoder.model(input_ids=ids, attention_mask=mask)[0].float()
        cos = torch.nn.functional.cosine_similarity(f32[real], bf16[real], dim=-1)
        out[name] = {"mean": float(cos.mean()), "min": float(cos.min())}
    swap_attention(encoder.model, "softmax")
    return out


# --- distillation, cached ------------------------------------------------------------------------

def distilled_encoder(encoder, name: str, spec: str, texts, probe, a, autocast: bool):
    """(a copy of ``encoder`` whose swapped layers' q/k projections are distilled, report).
    The projections are cached in ``CACHE/distilled/<key>.safetensors`` (key: the encoder's
    fingerprint, the variant, the settings and the texts), the report in its metadata."""
    student = copy.deepcopy(encoder.model)
    swap_attention(student, swap_layers=swap_layers(spec), **VARIANTS[name])
    layers = student.config.swapped_attention["layers"]
    settings = {"variant": name, "layers": layers, "steps": a.distill_steps,
                "batch_size": a.distill_batch, "lr": a.distill_lr, "seed": a.seed,
                "autocast": autocast, "max_length": a.max_length}
    h = hashlib.sha256(json.dumps({"encoder": encoder_fingerprint(encoder), **settings},
                                  sort_keys=True).encode())
    for t in (*texts, *probe):
        h.update(len(t).to_bytes(4, "little") + t.astype(np.int32).tobytes())
    path = Path(a.cache) / "distilled" / f"{h.hexdigest()[:24]}.safetensors"
    names = [f"encoder.layer.{layer}.attention.self.{p}.{w}" for layer in layers
             for p in ("query", "key") for w in ("weight", "bias")]
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                report = json.loads(f.metadata()["report"])
                tensors = {n: f.get_tensor(n) for n in f.keys()}
            state = student.state_dict()
            if set(tensors) != set(names) or any(tensors[n].shape != state[n].shape
                                                 for n in names):
                raise ValueError(f"holds {sorted(tensors)}, not the projections of {layers}")
            student.load_state_dict(tensors, strict=False)
            return student, {**report, "cached": True}
        except (OSError, ValueError, KeyError, SafetensorError) as e:   # damaged: again
            print(f"  {path}: unusable cached distillation ({cli.one_line(e)}); running it again")
    teacher = encoder.model
    report = distill(student, teacher, texts, layers, steps=a.distill_steps,
                     batch_size=a.distill_batch, lr=a.distill_lr, seed=a.seed,
                     pad_id=encoder.pad_id, autocast=autocast, probe=probe,
                     progress=not a.no_progress)
    state = student.state_dict()
    atomic_write(path, st_save({n: state[n].contiguous() for n in names},
                               metadata={"report": json.dumps(report)}))
    return student, {**report, "cached": False}


# --- the experiment ------------------------------------------------------------------------------

def row_name(variant: str, spec: str | None, distilled: bool = False) -> str:
    return variant if spec is None else f"{variant} {spec}" + (" distilled" if distilled else "")


@dataclass
class Setup:
    """What every row shares: options, encoder, the subsets, their labels and the split."""
    args: object
    encoder: object
    reviews: dict            # {"train": Reviews, "test": Reviews}
    split: tuple             # (train indices, valid indices) into reviews["train"]
    autocast: bool

    @property
    def labels(self) -> dict:
        return {part: r.labels for part, r in self.reviews.items()}


def measure_row(s: Setup, encoder, row: dict, baseline_test=None):
    """Features, head, test metrics and the cosine to the softmax features (``baseline_test``;
    None: this is the softmax row) for one encoder, written into ``row``; returns the test
    features."""
    a, stores, timing = s.args, {}, {}
    for part in ("train", "test"):
        stores[part], timing[part] = timed_features(encoder, s.reviews[part].texts, a,
                                                    s.autocast, f"{row['name']} {part}")
    config = {"encoder": encoder.name, "encoder_source": encoder.source,
              "max_length": a.max_length, "limit_train": a.limit_train,
              "limit_test": a.limit_test, "seed": a.seed, "batch_size": a.batch_size,
              "lr": a.lr, "model": {"emb_dim": encoder.hidden_size, **HEAD},
              "attention": {k: row[k] for k in ("variant", "layers", "distilled")}}
    out = Path(a.out) / row["name"].replace(" ", "_")
    row.update(train_and_test(stores, s.labels, s.split, a, out, config))
    row["cos_to_softmax"] = mean_cosine(stores["test"], stores["test"] if baseline_test is None
                                        else baseline_test)
    row["features"] = timing
    row["feature_seconds"] = (None if any(t["seconds"] is None for t in timing.values())
                              else round(sum(t["seconds"] for t in timing.values()), 1))
    print(f"  -> test acc {row['test_acc']:.2%}, cos to softmax {row['cos_to_softmax']:.4f}, "
          f"features {row['feature_seconds']} s"
          f"{' (cached)' if all(t['cached'] for t in timing.values()) else ''}", flush=True)
    return stores["test"]


def distill_plan(a, rows: list[dict]) -> list[tuple[str, str]]:
    """(variant, layers) pairs to distil: every ``--distill-variants`` x ``--distill-layers``
    pair, or with ``auto`` those whose row lost more than ``--distill-drop`` accuracy points
    against the softmax row (``rows[0]``)."""
    if not a.distill_steps:
        return []
    pairs = [(v, spec) for spec in a.distill_layers for v in a.variants]
    if a.distill_variants != "auto":
        return [(v, spec) for v, spec in pairs if v in a.distill_variants]
    acc = {(r["variant"], r["layers"]): r["test_acc"] for r in rows}
    return [(v, spec) for v, spec in pairs
            if (rows[0]["test_acc"] - acc[v, spec]) * 100 > a.distill_drop]


def swapped_row(s: Setup, variant: str, spec: str, distilled: bool, label: str,
                baseline_test, distill_texts=None) -> dict:
    """One row: ``variant`` swapped into the ``spec`` layers (of a distilled copy when
    ``distilled``), measured against the softmax features ``baseline_test``."""
    a, encoder = s.args, s.encoder
    name = row_name(variant, spec, distilled)
    print(f"[{label}] {name}", flush=True)
    if distilled:                                       # encoder.model (softmax) teaches a copy
        model, report = distilled_encoder(encoder, variant, spec, *distill_texts, a, s.autocast)
        print(f"  distilled: probe loss {report['probe_loss_before']:.4g} -> "
              f"{report['probe_loss_after']:.4g} in {report['steps']} steps, "
              f"{report['seconds']:.0f} s{' (cached)' if report['cached'] else ''}", flush=True)
        enc = Encoder(model, encoder.tokenizer, encoder.name, encoder.source)
    else:
        swap_attention(encoder.model, swap_layers=swap_layers(spec), **VARIANTS[variant])
        enc, report = encoder, None
    row = {"name": name, "variant": variant, "layers": spec,
           "swapped_layers": enc.model.config.swapped_attention["layers"],
           "distilled": distilled, "distill": report}
    try:
        measure_row(s, enc, row, baseline_test)
    finally:
        swap_attention(encoder.model, "softmax")
    return row


def run_rows(s: Setup) -> list[dict]:
    """The softmax row, every variant x layer setting, then the distilled ones."""
    a = s.args
    plan = [(v, spec) for spec in a.layers for v in a.variants]
    rows = [{"name": BASELINE, "variant": BASELINE, "layers": "none", "swapped_layers": [],
             "distilled": False, "distill": None}]
    print(f"[1/{1 + len(plan)}] {BASELINE}", flush=True)
    baseline_test = measure_row(s, s.encoder, rows[0])
    for k, (variant, spec) in enumerate(plan, 2):
        rows.append(swapped_row(s, variant, spec, False, f"{k}/{1 + len(plan)}", baseline_test))
    distilling = distill_plan(a, rows)
    print(f"to distil: {', '.join(' '.join(p) for p in distilling) or 'nothing'}", flush=True)
    if distilling:
        ids = tokenize(s.encoder.tokenizer, s.reviews["train"].texts, a.max_length)
        texts = [ids[i] for i in s.split[0]]                         # the head's training part
        probe = [ids[i] for i in s.split[1][:PROBE_TEXTS]]           # unlabelled use only
        for k, (variant, spec) in enumerate(distilling, 1):
            rows.append(swapped_row(s, variant, spec, True, f"distil {k}/{len(distilling)}",
                                    baseline_test, (texts, probe)))
    return rows


def table(rows: list[dict]) -> str:
    """The Markdown table of the rows (accuracy change against the first, softmax, row)."""
    base = rows[0]["test_acc"]
    lines = ["| variant | layers swapped | distilled | test acc | vs softmax | cos to softmax "
             "| feature s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        fs = "" if r["feature_seconds"] is None else f"{r['feature_seconds']:.1f}"
        lines.append(f"| {r['variant']} | {r['layers']} | {'yes' if r['distilled'] else 'no'} | "
                     f"{r['test_acc']:.2%} | {(r['test_acc'] - base) * 100:+.1f} pp | "
                     f"{r['cos_to_softmax']:.4f} | {fs} |")
    return "\n".join(lines)


def prepare(p, a) -> Setup:
    """Options, data, subsets, encoder weights (cheapest checks first)."""
    device, info = check_args(p, a)
    if a.threads:
        torch.set_num_threads(a.threads)
    path, data = cli.load_data(p, a.data)
    reviews = {part: cli.check_limit(p, f"--limit-{part}", data[part], limit, a.seed)
               for part, limit in (("train", a.limit_train), ("test", a.limit_test))}
    encoder = cli.load_encoder(p, info, device)
    n_layers = encoder.model.config.num_hidden_layers
    if too_many := [spec for spec in a.layers if spec != "all" and int(spec[3:]) > n_layers]:
        p.error(f"--layers {','.join(too_many)}: {encoder.name} has {n_layers} layers")
    n = len(reviews["train"])
    choice = choose_autocast(encoder, device, a.autocast)
    s = Setup(a, encoder, reviews, train_valid_split(n, round(n * VALID_FRACTION), a.seed),
              choice.bf16)
    print(choice.line(), flush=True)
    print(f"data {path}: {n} train ({len(s.split[0])} train / {len(s.split[1])} valid) and "
          f"{len(reviews['test'])} test reviews, {a.max_length} tokens; encoder {encoder.name} "
          f"({n_layers} layers); bf16 autocast {s.autocast}; {torch.get_num_threads()} threads",
          flush=True)
    return s


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start, c_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()
    p = build_parser()
    a = p.parse_args(argv)
    s = prepare(p, a)
    results = {"config": {k: getattr(a, k) for k in (
        "encoder", "max_length", "limit_train", "limit_test", "seed", "epochs", "batch_size",
        "lr", "variants", "layers", "distill_steps", "distill_variants", "distill_layers",
        "distill_drop", "distill_batch", "distill_lr")},
        "n_train": len(s.split[0]), "n_valid": len(s.split[1]),
        "n_test": len(s.reviews["test"]),
        "encoder_layers": s.encoder.model.config.num_hidden_layers,
        "autocast_bf16": s.autocast, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "variants": VARIANTS, "head": HEAD}
    if s.autocast and a.precision_check:
        results["precision_check"] = precision_check(
            s.encoder, s.reviews["test"].texts[:a.precision_check], a, a.variants)
    rows = run_rows(s)
    results.update(rows=rows, table=table(rows),
                   wall_seconds=round(time.perf_counter() - t_start, 1),
                   cpu_seconds=round(time.process_time() - c_start, 1),
                   loadavg_start=load_start, loadavg_end=os.getloadavg())
    write_json(a.results, results)
    atomic_write(Path(a.results).with_suffix(".md"), (results["table"] + "\n").encode())
    print("\n" + results["table"])
    print(f"\n{results['wall_seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU; "
          f"wrote {a.results} and {Path(a.results).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main, "python -m reference.pipeline.attention_swap"))
