"""Gather the full ``--unfreeze-top K`` runs into ``results/imdb_unfreeze_full.json`` (what the
README's IMDB table and tutorial 05 section 9 show), beside the frozen run they are measured
against.

    .venv/bin/python bench/unfreeze_full_summary.py [--runs runs/k1 runs/k2]
        [--out results/imdb_unfreeze_full.json]

Each run folder is one ``ENCODER=mpnet OUT=runs/kK bash bench/imdb_full.sh --unfreeze-top K``
(its ``metrics.json``; the peak memory that ``bench/memory_watch.py`` wrote beside it as
``runs/kK.memory*.json``, one file per process of a resumed run: the largest is taken).  Per
run: test accuracy and loss, the best epoch, every epoch's numbers and seconds, the test
evaluation's seconds, the two feature entries it read (size on disk, tokens, and where each
came from: extracted, or computed from a deeper entry), the peak memory.  A run without its
test result yet is written with ``test_acc`` null.  A K already in ``--out`` whose run
folder is not given (or has no ``metrics.json`` any more) keeps its row there.  The frozen
row is the committed full MPNet run (``results/imdb_runs.json``, its epochs from
``results/imdb_mpnet_epochs.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scratch.pipeline.atomic import atomic_write  # noqa: E402

EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "train_seconds",
              "valid_seconds", "best")


def entry(folder: str) -> dict:
    """Size, tokens and origin of a feature entry (its index.json and shard files)."""
    path = Path(folder)
    if not path.is_absolute():
        path = ROOT / path
    meta = json.loads((path / "index.json").read_text())
    size = sum(f.stat().st_size for f in path.glob("shard_*.safetensors"))
    return {"key": path.name, "gib": round(size / 2**30, 2), "tokens": meta.get("tokens"),
            "input_layer": meta.get("input_layer"),
            "computed_from": meta.get("computed_from"),
            "seconds_last_writer": meta.get("seconds_this_run")}


def run_record(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    k = m["config"].get("unfreeze_top", 0)
    watched = [json.loads(f.read_text())                  # one file per process of the run
               for f in sorted(folder.parent.glob(folder.name + ".memory*.json"))]
    peak = {key: max(w.get(key, 0.0) for w in watched)
            for key in ("RssAnon_peak_gib", "VmHWM_peak_gib")} if watched else None
    shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    return {
        "unfreeze_top": k,
        "encoder_lr": m["config"].get("encoder_lr"),
        "micro_batch_tokens": m["config"].get("micro_batch_tokens"),
        "test_acc": m.get("test_acc"), "test_loss": m.get("test_loss"),
        "best_epoch": m.get("best_epoch"),
        "epochs": [{key: e[key] for key in EPOCH_KEYS if key in e} for e in m["epochs"]],
        "test_seconds": m.get("test_seconds"),
        "threads": m.get("threads"), "device": m.get("device"), "torch": m.get("torch"),
        "n_train": m.get("n_train"), "n_valid": m.get("n_valid"), "n_test": m.get("n_test"),
        "entries": {split: entry(f) for split, f in m.get("feature_entries", {}).items()},
        "peak_memory_gib": None if peak is None else {
            "anonymous": peak.get("RssAnon_peak_gib"), "resident": peak.get("VmHWM_peak_gib")},
        "command": f"ENCODER=mpnet OUT={shown} bash bench/imdb_full.sh --unfreeze-top {k}",
    }


def frozen_record() -> dict:
    runs = json.loads((ROOT / "results/imdb_runs.json").read_text())["runs"]
    mpnet = next(r for r in runs if r["encoder"] == "all-mpnet-base-v2")
    curve = json.loads((ROOT / "results/imdb_mpnet_epochs.json").read_text())
    return {"unfreeze_top": 0, "test_acc": mpnet["test_acc"], "test_loss": mpnet["test_loss"],
            "epochs": [{key: e[key] for key in EPOCH_KEYS if key in e}
                       for e in curve["epochs"][:2]],
            "cache_gib": mpnet.get("cache_gib"),
            "source": "results/imdb_runs.json (MPNet), epochs 1-2 of "
                      "results/imdb_mpnet_epochs.json"}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, default=[ROOT / "runs/k1", ROOT / "runs/k2"])
    p.add_argument("--out", type=Path, default=ROOT / "results/imdb_unfreeze_full.json")
    a = p.parse_args(argv)
    runs = [run_record(f.resolve()) for f in a.runs if (f / "metrics.json").exists()]
    if not runs:
        p.error("no run folder with a metrics.json among " + ", ".join(map(str, a.runs)))
    kept = []                  # a K measured earlier whose run folder is not here any more
    if a.out.exists():
        gathered = {r["unfreeze_top"] for r in runs}
        kept = [r for r in json.loads(a.out.read_text())["runs"]
                if r["unfreeze_top"] not in gathered]
    runs = sorted(runs + kept, key=lambda r: r["unfreeze_top"])
    out = {"note": "Full MPNet runs with --unfreeze-top K (bench/imdb_full.sh): 25,000 train "
                   "(17,500 / 7,500, seed 3407) and 25,000 test reviews, 512 tokens, the "
                   "assignment's head, batch 128, 2 epochs, best-validation checkpoint, on "
                   "this machine's CPU.  Gathered by bench/unfreeze_full_summary.py.",
           "machine": machine(), "frozen": frozen_record(), "runs": runs}
    atomic_write(a.out, (json.dumps(out, indent=1) + "\n").encode())
    for r in runs:
        acc = "not yet" if r["test_acc"] is None else f"{r['test_acc']:.2%}"
        print(f"K = {r['unfreeze_top']}: {len(r['epochs'])} epochs, test {acc}"
              + (f" (kept from {a.out})" if r in kept else ""))
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
