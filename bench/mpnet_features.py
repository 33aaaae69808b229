"""MPNet features on real reviews: the scratch encoder (scratch.bert, NumPy, float32) against the
torch encoder (transformers, float32, no autocast) and against the feature cache (what
reference.pipeline.features stored: bf16 autocast where it chose it, float16 on disk), one
thread per side.

    python bench/mpnet_features.py [--data PATH] [--split test|train] [--reviews 500]
        [--seed 3407] [--limit N] [--max-length 512] [--batch 8] [--repeat 3]
        [--time-reviews 32] [--encoder mpnet] [--cache .cache/features] [--no-verify]
        [--checkpoint DIR] [--json bench/results/mpnet_features.json]

Reviews.  The split (``--data``, default ``$IMDB_PATH``; ``--limit N``: the stratified subset
``reference.pipeline.features --limit-train/--limit-test N --seed`` takes of it) is tokenized at
``--max-length`` as the pipelines tokenize it (:func:`reference.pipeline.data.tokenize`; the
scratch tokenizer, :mod:`scratch.pipeline.tokenizer`, is checked to give the same ids); then
``--reviews`` of it are drawn (:func:`scratch.pipeline.data.stratified_subset`, ``--seed``),
sorted by length and cut into batches of ``--batch`` (``bucket_batches(shuffle=False)``), each
right-padded with the pad id and its attention mask, as both pipelines feed their encoders.

Differences, over real tokens only (padding never counts): ``max|d|`` is the largest
|a - b| over every real token's every hidden unit; ``rel`` = max|d| / max|b| over the same
entries (b: the second side named, the reference); ``token rel`` = the largest
||a_t - b_t||_2 / ||b_t||_2 over real tokens t.

Speed.  The full pass computes every batch once on each side, interleaved batch by batch
(scratch first); then ``--repeat`` passes over about ``--time-reviews`` of the reviews (whole
batches of the full pass, evenly spaced in length order, so their lengths and padding are the
sample's), the side that goes first alternating from pass to pass.  Each side's time is process
CPU time (one thread per side: ``BENCH_THREADS``, default 1, pins NumPy's BLAS and torch
alike), which load from other jobs on the machine hardly moves; wall time is reported too.
tokens/s = real tokens / best CPU seconds; ratio = scratch / torch CPU seconds (below 1:
scratch faster), best of the passes, with the min-max of the per-pass ratios as its spread.

Cache.  An entry is named by the key reference.pipeline.features computes
(:func:`reference.pipeline.features.cache_key`: the encoder's weights, ``--max-length``, the
autocast choice and the token ids of the WHOLE split, or of its ``--limit`` subset): the bench
recomputes that key for both autocast choices (bf16 and float32) and opens the folders so
named; it never guesses an entry from its size or its date.  A complete entry is read as
:class:`scratch.pipeline.features.FeatureStore` reads it; a partial one (``plan.json`` and some
shards, no ``index.json``: extraction under way) shard by shard, each shard checked to hold the
reviews of the entry's plan and (unless ``--no-verify``) its bytes against the sha256 written
beside it; the reviews whose shard is not written yet are left out and counted.
``--checkpoint DIR`` (a reference or scratch checkpoint of a head trained on these features):
each review's P(positive) from that head (scratch.sentiment, float32) on the scratch, torch and
cached features; how many labels differ and the largest |dP|.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference.pipeline import cli  # noqa: E402
from reference.pipeline.data import bucket_batches, stratified_subset, tokenize  # noqa: E402
from reference.pipeline.features import DEFAULT_ROOT, cache_key  # noqa: E402
from reference.timing import bench_threads, pin_threads  # noqa: E402
from scratch.backend import to_numpy  # noqa: E402
from scratch.bert import BertEncoder, BertError  # noqa: E402
from scratch.pipeline import checkpoint as ckpt  # noqa: E402
from scratch.pipeline import features as sfeatures  # noqa: E402
from scratch.pipeline.cli import check_file  # noqa: E402
from scratch.pipeline.encoder_names import Encoder as ScratchEncoder  # noqa: E402
from scratch.pipeline.encoder_names import EncoderNameError  # noqa: E402
from scratch.pipeline.tokenizer import pad_batch  # noqa: E402

PROG = "bench/mpnet_features.py"
GOAL = 1.5                     # issue 19: scratch within 1.5x torch's CPU time


# ---- the two encoders, one padded batch at a time --------------------------------------------

def scratch_side(enc: BertEncoder, pad_id: int):
    def encode(batch):
        ids, mask = pad_batch(batch, pad_id)                            # (B, T) int64
        hidden = to_numpy(enc(ids, mask))                               # (B, T, H) float32
        return [hidden[b, :len(a)] for b, a in enumerate(batch)]
    return encode


def torch_side(model, pad_id: int):
    """reference.pipeline.features' forward (inference mode), float32, no autocast."""
    def encode(batch):
        ids, mask = pad_batch(batch, pad_id)
        with torch.inference_mode():
            hidden = model(input_ids=torch.from_numpy(ids),
                           attention_mask=torch.from_numpy(mask))[0].numpy()
        return [hidden[b, :len(a)] for b, a in enumerate(batch)]
    return encode


def timed(fn, *args):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.process_time() - c0, time.perf_counter() - t0


def run_pass(sides: dict, ids, batches, first: str = "scratch", keep: bool = False):
    """Every batch through each side, interleaved batch by batch (``first`` side first):
    ({side: [CPU s per batch]}, {side: [wall s per batch]}, {side: {review: features}} if keep;
    ``keep`` also prints a line per batch)."""
    order = [first] + [s for s in sides if s != first]
    cpu = {s: [] for s in sides}
    wall = {s: [] for s in sides}
    feats = {s: {} for s in sides}
    for rows in batches:
        batch = [ids[i] for i in rows]
        for side in order:
            out, c, w = timed(sides[side], batch)
            cpu[side].append(c)
            wall[side].append(w)
            if keep:
                feats[side].update(zip(rows.tolist(), out, strict=True))
        if keep:
            print(f"  batch {len(cpu[first])}/{len(batches)} {len(batch)}x"
                  f"{max(len(x) for x in batch)}: "
                  + ", ".join(f"{side} {cpu[side][-1]:.2f} s CPU" for side in sides), flush=True)
    return cpu, wall, feats


# ---- differences over real tokens --------------------------------------------------------------

def diff_stats(got: dict, want: dict, reviews) -> dict:
    """max|d|, rel and token rel (module docstring), and the mean |d|, of ``got[i]`` against
    ``want[i]`` over ``reviews``, in float64."""
    max_abs = max_ref = token_rel = total = 0.0
    n = tokens = entries = 0
    for i in reviews:
        a, b = np.asarray(got[i], np.float64), np.asarray(want[i], np.float64)   # (L, H)
        d = a - b
        max_abs = max(max_abs, float(np.abs(d).max()))
        max_ref = max(max_ref, float(np.abs(b).max()))
        norms = np.maximum(np.linalg.norm(b, axis=1), 1e-30)
        token_rel = max(token_rel, float((np.linalg.norm(d, axis=1) / norms).max()))
        total += float(np.abs(d).sum())
        n, tokens, entries = n + 1, tokens + len(b), entries + b.size
    return dict(reviews=n, tokens=tokens, max_abs=max_abs, max_ref=max_ref,
                rel=max_abs / max_ref if max_ref else float("nan"), token_rel=token_rel,
                mean_abs=total / max(1, entries))


# ---- the feature cache -----------------------------------------------------------------------

def entry_candidates(root: Path, n: int) -> bool:
    """Whether any entry under ``root`` was planned for ``n`` reviews (cheap: plan.json only);
    if none is, the split's key need not be computed."""
    for plan in root.glob("*/plan.json"):
        try:
            if json.loads(plan.read_text()).get("n") == n:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def read_partial(folder: Path, split_ids, wanted, verify: bool):
    """{review: float16 (L, H)} of the ``wanted`` reviews whose shard is on disk in the partial
    entry ``folder`` (its plan.json's shard size; each shard checked against the plan, and its
    sha256 against the one written beside it), and (shards on disk, shards planned)."""
    plan_json = json.loads((folder / "plan.json").read_text())
    if plan_json.get("key") != folder.name or plan_json.get("n") != len(split_ids):
        raise sfeatures.DamagedEntry(folder, f"plan.json {plan_json} is not this entry's",
                                     index=True)
    plan = sfeatures.Plan.of(split_ids, folder.name, int(plan_json["shard_size"]))
    shard_of = np.empty(len(split_ids), dtype=np.int64)
    for s, members in enumerate(plan.shards):
        shard_of[members] = s
    out, on_disk = {}, 0
    for s, name in enumerate(plan.names):
        path = folder / name
        if not path.exists():
            continue
        on_disk += 1
        need = [i for i in wanted if shard_of[i] == s]
        try:
            record = json.loads(sfeatures.sum_path(folder, name).read_text())
        except (OSError, ValueError):
            record = None
        lengths, index, feats = sfeatures.read_shard(path, record=record)
        if not (np.array_equal(index, plan.shards[s])
                and np.array_equal(lengths, plan.lengths[plan.shards[s]])):
            raise sfeatures.DamagedEntry(folder, "does not hold the reviews of its plan", [name])
        if verify and need:
            if record is None:
                raise sfeatures.DamagedEntry(folder, "no checksum beside it", [name])
            if sfeatures.verified_sha256(path) != record["sha256"]:
                raise sfeatures.DamagedEntry(folder, "sha256 mismatch", [name])
        offsets = dict(zip(index.tolist(), np.concatenate([[0], np.cumsum(lengths)[:-1]]),
                           strict=True))
        for i in need:
            start = int(offsets[i])
            out[i] = feats[start:start + int(plan.lengths[i])]
    return out, (on_disk, len(plan.names))


def cached_features(root: Path, encoder, split_ids, max_length: int, picked, verify: bool):
    """One dict per entry found for the split (module docstring: by recomputing its key):
    label, folder, complete, shards, and ``features`` {position in the sample: float16}."""
    found = []
    for bf16 in (True, False):
        key = cache_key(encoder, split_ids, max_length, bf16)
        folder = root / key
        label = "cache bf16" if bf16 else "cache float32"
        if not (folder / "plan.json").exists() and not (folder / "index.json").exists():
            continue
        row = dict(label=label, folder=str(folder), key=key, autocast_bf16=bf16)
        try:
            if (folder / "index.json").exists():
                store = sfeatures.FeatureStore(folder, verify=verify)
                if store.meta.get("key") != key or len(store) != len(split_ids):
                    raise sfeatures.DamagedEntry(folder, "index.json is not this entry's",
                                                 index=True)
                got = {j: store.get(int(i)) for j, i in enumerate(picked)}
                row.update(complete=True, shards=[len(store.meta["shards"])] * 2)
            else:
                by_review, shards = read_partial(folder, split_ids, picked.tolist(), verify)
                got = {j: by_review[int(i)] for j, i in enumerate(picked) if int(i) in by_review}
                row.update(complete=False, shards=list(shards))
        except (sfeatures.CacheError, OSError, ValueError) as e:
            row.update(error=cli.one_line(e))
            got = {}
        row["features"] = got
        found.append(row)
    return found


# ---- the head's predictions ----------------------------------------------------------------------

def probabilities(head, feats: dict, reviews, batch: int = 32) -> dict:
    reviews = list(reviews)
    lengths = np.array([len(feats[i]) for i in reviews])
    probs = {}
    for rows in bucket_batches(lengths, batch, shuffle=False):
        T = int(lengths[rows].max())
        x = np.zeros((len(rows), T, head.emb_dim), dtype=np.float32)     # (B, T, E), 0 padded
        for b, r in enumerate(rows):
            x[b, :lengths[r]] = feats[reviews[r]]
        p = to_numpy(head.predict(x, lengths[rows]))[:, 0]
        probs.update(zip([reviews[r] for r in rows], p.tolist(), strict=True))
    return probs


def compare_probs(a: dict, b: dict, labels, reviews) -> dict:
    reviews = list(reviews)
    pa, pb = np.array([a[i] for i in reviews]), np.array([b[i] for i in reviews])
    y = np.array([labels[i] for i in reviews])
    return dict(reviews=len(reviews), labels_differ=int(((pa > 0.5) != (pb > 0.5)).sum()),
                max_abs_dp=float(np.abs(pa - pb).max()) if reviews else 0.0,
                accuracy=[float(((pa > 0.5) == y).mean()), float(((pb > 0.5) == y).mean())]
                if reviews else [])


# ---- command line -----------------------------------------------------------------------------

def build_parser():
    first, _, rest = __doc__.partition("\n\n")
    p = cli.Parser(prog=PROG, description=first, epilog=rest,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="aclImdb directory or .tar.gz, or a labelled table "
                   "(default: $IMDB_PATH)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--reviews", type=cli.positive(int), default=500, metavar="N",
                   help="reviews of the split to encode (default %(default)s)")
    p.add_argument("--seed", type=cli.non_negative(int), default=3407,
                   help="seed of the sample and of --limit's subset (default %(default)s)")
    p.add_argument("--limit", type=cli.positive(int), metavar="N",
                   help="the split is the stratified subset of N reviews that "
                        "reference.pipeline.features --limit-train/--limit-test N takes")
    p.add_argument("--max-length", type=int, default=512,
                   help="tokens per review, specials included (default %(default)s)")
    p.add_argument("--batch", type=cli.positive(int), default=8,
                   help="reviews per encoder batch, length-sorted (default %(default)s)")
    p.add_argument("--repeat", type=cli.positive(int), default=3,
                   help="timed passes over --time-reviews (default %(default)s)")
    p.add_argument("--time-reviews", type=cli.non_negative(int), default=32, metavar="K",
                   help="reviews of the sample the timed passes encode (at most --reviews; "
                        "0: the full pass only; default %(default)s)")
    p.add_argument("--encoder", default="mpnet", help="mpnet | minilm | FOLDER (default mpnet)")
    p.add_argument("--cache", default=str(DEFAULT_ROOT),
                   help="feature cache root (default %(default)s)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not hash the cached shards against their recorded sha256")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a head checkpoint trained on these features: compare its predictions")
    p.add_argument("--json", default="bench/results/mpnet_features.json",
                   help="where the results go (default %(default)s)")
    return p


def load_checkpoint(p, folder: str, info, max_length: int):
    """(head, config) of ``--checkpoint``, checked to be a head for these features."""
    try:
        head, config = ckpt.load_head(folder)
    except (ckpt.CheckpointError, ValueError) as e:
        p.error(f"--checkpoint {folder}: {cli.one_line(e)}")
    if config.get("encoder") != info.name:
        p.error(f"--checkpoint {folder}: trained on {config.get('encoder')!r} features, the "
                f"bench computes {info.name!r}'s")
    if config.get("max_length", 512) != max_length:
        p.error(f"--checkpoint {folder}: trained at max_length {config.get('max_length')}, "
                f"the bench runs --max-length {max_length}")
    return head, config


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = build_parser()
    a = p.parse_args(argv)
    threads = pin_threads(bench_threads())
    info = cli.check_encoder(p, a.encoder, a.max_length)        # config only: says how to
    json_path = Path(a.json)
    if json_path.parent.is_dir():
        check_file(p, "--json", json_path)
    else:
        cli.check_folder(p, "--json", json_path.parent)         # made at the end
    head = config = None
    if a.checkpoint:
        head, config = load_checkpoint(p, a.checkpoint, info, a.max_length)
    data_path, data = cli.load_data(p, a.data, a)
    reviews = cli.check_limit(p, "--limit", data[a.split], a.limit, a.seed)
    if a.reviews > len(reviews):
        p.error(f"--reviews {a.reviews} is larger than the {a.split} split "
                f"({len(reviews)} reviews)")
    picked = stratified_subset(reviews.labels, a.reviews, a.seed)      # positions in the split
    try:
        sinfo = ScratchEncoder.inspect(a.encoder)
        stok = sinfo.load_tokenizer()
        enc = BertEncoder.from_pretrained(info.source, dtype="float32", backend="numpy")
    except (EncoderNameError, BertError) as e:
        p.error(cli.one_line(e))
    encoder = cli.load_encoder(p, info, "cpu")
    root = Path(a.cache)
    look = root.is_dir() and entry_candidates(root, len(reviews))
    t0 = time.perf_counter()
    split_ids = tokenize(encoder.tokenizer, reviews.texts if look else
                         [reviews.texts[i] for i in picked], a.max_length)
    ids = [split_ids[i] for i in picked] if look else split_ids
    scratch_ids = stok.encode([reviews.texts[i] for i in picked], a.max_length)
    tok_differ = sum(not np.array_equal(x, y) for x, y in zip(ids, scratch_ids, strict=True))
    found = (cached_features(root, encoder, split_ids, a.max_length, picked, a.verify)
             if look else [])
    prep_s = time.perf_counter() - t0
    model = encoder.model.float()
    sides = {"scratch": scratch_side(enc, encoder.pad_id),
             "torch": torch_side(model, encoder.pad_id)}
    lengths = np.array([len(x) for x in ids])
    batches = bucket_batches(lengths, a.batch, shuffle=False)
    padded = int(sum(len(r) * lengths[r].max() for r in batches))
    head_line = (f"{info.name} ({info.source}); {a.split} split of {data_path}"
                 + (f" (--limit {a.limit})" if a.limit else "") + f": {a.reviews} of "
                 f"{len(reviews)} reviews (seed {a.seed}), {int(lengths.sum())} real tokens "
                 f"({padded} padded) at --max-length {a.max_length}, batches of {a.batch}; "
                 f"float32, {threads} thread(s) per side; torch {torch.__version__}, numpy "
                 f"{np.__version__}")
    print(head_line, flush=True)
    print("tokenizers: scratch and reference ids "
          + ("agree on every review" if not tok_differ else
             f"DIFFER on {tok_differ} reviews (the reference ids are used)"), flush=True)
    print(f"full pass: {len(batches)} batches ...", flush=True)
    cpu, wall, feats = run_pass(sides, ids, batches, keep=True)
    toks = int(lengths.sum())
    full = {s: dict(cpu_s=sum(cpu[s]), wall_s=sum(wall[s]), tokens_per_cpu_s=toks / sum(cpu[s]),
                    tokens_per_wall_s=toks / sum(wall[s])) for s in sides}
    per_batch = [c / t for c, t in zip(cpu["scratch"], cpu["torch"], strict=True)]
    full["cpu_ratio"] = full["scratch"]["cpu_s"] / full["torch"]["cpu_s"]
    full["cpu_ratio_per_batch"] = [min(per_batch), max(per_batch)]
    timed_rows = (time_passes(sides, ids, lengths, batches, a) if a.time_reviews and a.repeat
                  else None)
    everyone = range(a.reviews)
    diffs = {"scratch f32 vs torch f32": diff_stats(feats["scratch"], feats["torch"], everyone)}
    cache_rows = []
    for row in found:
        got = row.pop("features")
        row["reviews_present"] = len(got)
        if got:
            diffs[f"{row['label']} vs scratch f32"] = diff_stats(got, feats["scratch"], got)
            diffs[f"{row['label']} vs torch f32"] = diff_stats(got, feats["torch"], got)
        row["_got"] = got
        cache_rows.append(row)
    preds = None
    if head is not None:
        labels = reviews.labels[picked]
        probs = {s: probabilities(head, feats[s], everyone) for s in sides}
        preds = {"scratch f32 vs torch f32": compare_probs(probs["scratch"], probs["torch"],
                                                           labels, everyone)}
        for row in cache_rows:
            if row["_got"]:
                pc = probabilities(head, {i: f.astype(np.float32) for i, f in row["_got"].items()},
                                   row["_got"])
                preds[f"scratch f32 vs {row['label']}"] = compare_probs(
                    probs["scratch"], pc, labels, row["_got"])
    for row in cache_rows:
        row.pop("_got")
    report(a, diffs, full, timed_rows, cache_rows, preds, root, look)
    results = dict(meta=dict(prog=PROG, argv=sys.argv[1:] if argv is None else list(argv),
                             encoder=info.name, source=info.source,
                             data=str(Path(data_path).resolve()), split=a.split, limit=a.limit,
                             reviews=a.reviews, seed=a.seed, max_length=a.max_length,
                             batch=a.batch, threads=threads, tokens=toks, padded_tokens=padded,
                             tokenizers_differ=tok_differ, prepare_s=prep_s,
                             torch=torch.__version__, numpy=np.__version__,
                             machine=platform.machine(), processor=platform.processor(),
                             loadavg_end=os.getloadavg(), checkpoint=a.checkpoint,
                             checkpoint_encoder=config.get("encoder") if config else None),
                   differences=diffs, full_pass=full, timed=timed_rows, cache=cache_rows,
                   predictions=preds)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {json_path}")
    return 0


def time_passes(sides, ids, lengths, batches, a) -> dict:
    """``--repeat`` passes over ``--time-reviews`` of the sample: whole batches of the full
    pass, evenly spaced in length order, each in the middle of its share of them (so their lengths
    and padding are the sample's; one batch: the median one), the side that goes first
    alternating."""
    k = min(len(batches), -(-a.time_reviews // a.batch))
    chosen = [batches[int((i + 0.5) * len(batches) / k)] for i in range(k)]   # k of them
    toks = int(sum(lengths[r].sum() for r in chosen))
    cpu = {s: [] for s in sides}
    wall = {s: [] for s in sides}
    for r in range(a.repeat):
        c, w, _ = run_pass(sides, ids, chosen, first="scratch" if r % 2 == 0 else "torch")
        print(f"  timed pass {r + 1}/{a.repeat}: scratch {sum(c['scratch']):.2f} s CPU, torch "
              f"{sum(c['torch']):.2f} s CPU", flush=True)
        for s in sides:
            cpu[s].append(sum(c[s]))
            wall[s].append(sum(w[s]))
    ratios = [x / y for x, y in zip(cpu["scratch"], cpu["torch"], strict=True)]
    return dict(reviews=int(sum(len(r) for r in chosen)), batches=len(chosen), tokens=toks,
                padded_tokens=int(sum(len(r) * lengths[r].max() for r in chosen)),
                repeat=a.repeat, cpu_s=cpu, wall_s=wall,
                tokens_per_cpu_s={s: toks / min(cpu[s]) for s in sides},
                tokens_per_wall_s={s: toks / min(wall[s]) for s in sides},
                cpu_ratio=min(cpu["scratch"]) / min(cpu["torch"]), cpu_ratio_per_pass=ratios,
                cpu_ratio_median=statistics.median(ratios))


def report(a, diffs, full, timed_rows, cache_rows, preds, root, looked) -> None:
    print("\ndifferences over real tokens (rel = max|d| / max|ref|; token rel = max over tokens "
          "of ||d|| / ||ref||):")
    print(f"  {'a vs ref':34s} {'reviews':>7s} {'tokens':>8s} {'max|d|':>9s} {'max|ref|':>9s} "
          f"{'rel':>9s} {'token rel':>9s}")
    for name, d in diffs.items():
        print(f"  {name:34s} {d['reviews']:>7d} {d['tokens']:>8d} {d['max_abs']:>9.2e} "
              f"{d['max_ref']:>9.2f} {d['rel']:>9.2e} {d['token_rel']:>9.2e}")
    print("\nspeed (tokens/s = real tokens / CPU s; ratio = scratch / torch CPU s):")
    s, t = full["scratch"], full["torch"]
    print(f"  full pass, once:   scratch {s['tokens_per_cpu_s']:8.1f} tok/s "
          f"({s['cpu_s']:.1f} s CPU, {s['wall_s']:.1f} s wall)   torch "
          f"{t['tokens_per_cpu_s']:8.1f} tok/s ({t['cpu_s']:.1f} s CPU, {t['wall_s']:.1f} s "
          f"wall)   ratio {full['cpu_ratio']:.2f} (per batch {full['cpu_ratio_per_batch'][0]:.2f}"
          f"-{full['cpu_ratio_per_batch'][1]:.2f})")
    if timed_rows:
        r, tps = timed_rows, timed_rows["tokens_per_cpu_s"]
        per = r["cpu_ratio_per_pass"]
        print(f"  best of {r['repeat']} passes over {r['batches']} of those batches, "
              f"{r['reviews']} reviews ({r['tokens']} tokens): "
              f"scratch {tps['scratch']:8.1f} tok/s   torch {tps['torch']:8.1f} tok/s   ratio "
              f"{r['cpu_ratio']:.2f} (per pass {min(per):.2f}-{max(per):.2f}, median "
              f"{r['cpu_ratio_median']:.2f})")
        ratio = r["cpu_ratio"]
    else:
        ratio = full["cpu_ratio"]
    print(f"  goal scratch <= {GOAL}x torch: {'met' if ratio <= GOAL else 'NOT met'} "
          f"({ratio:.2f}x)")
    print("\ncache:")
    if not looked:
        print(f"  no entry under {root} was planned for this split's "
              f"{'subset' if a.limit else 'reviews'}: nothing to compare")
    elif not cache_rows:
        print(f"  no entry under {root} has this split's key (neither bf16 nor float32)")
    for row in cache_rows:
        state = "complete" if row["complete"] else "partial (extraction under way?)"
        print(f"  {row['label']}: {row['folder']}: {state}, {row['shards'][0]} of "
              f"{row['shards'][1]} shards on disk; {row['reviews_present']} of {a.reviews} "
              f"sampled reviews present" + (f"; NOT READ: {row['error']}" if "error" in row
                                             else ""))
    if preds is not None:
        print(f"\npredictions of --checkpoint {a.checkpoint} (labels at P > 0.5):")
        for name, d in preds.items():
            acc = (f"; accuracy {d['accuracy'][0]:.3f} / {d['accuracy'][1]:.3f}"
                   if d["accuracy"] else "")
            print(f"  {name:34s} {d['reviews']:>5d} reviews: {d['labels_differ']} labels differ, "
                  f"max |dP| {d['max_abs_dp']:.2e}{acc}")


if __name__ == "__main__":
    raise SystemExit(cli.run(main, PROG))
