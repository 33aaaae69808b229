"""The README's GPU tables, in Markdown, from what ``bench/gpu_check.sh`` wrote under ``$OUT``:
``pytest.xml`` (the CuPy tests), ``gru.json``, ``attention.json`` and ``assignment.json``.
A missing or unreadable file is named and skipped; nothing here measures anything.

    python bench/gpu_summary.py OUT
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def tests(out: Path) -> list[str]:
    root = ET.parse(out / "pytest.xml").getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                             "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    lines = [f"CuPy tests (`pytest -m gpu`): {passed} passed, {n['failures']} failed, "
             f"{n['errors']} errors, {n['skipped']} skipped"]
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            message = (bad.get("message") or "").strip().splitlines() or [""]
            lines.append(f"  {bad.tag.upper()}: {case.get('classname')}::{case.get('name')}: "
                         f"{message[0][:160]}")
    return lines


def gru(out: Path) -> list[str]:
    data = json.loads((out / "gru.json").read_text())
    backend = data["meta"].get("backend", "numpy")
    ours, theirs = ("scratch fused", "torch cuDNN") if backend == "cupy" else ("scratch", "torch")
    lines = [f"GRU, float32, {data['meta'].get('where', '')} (`bench/gru.py --backend "
             f"{backend}`)", "",
             f"| shape | case | pass | {ours} s | scratch unfused s | {theirs} s "
             f"| {ours} / torch | unfused / fused | max rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        unfused = r.get("scratch_unfused_s")
        u_s, gain = ("", "") if unfused is None else (f"{unfused:.4f}",
                                                       f"{unfused / r['scratch_s']:.2f}")
        lines.append(
            f"| {r['shape']} | {r['case']} | {r['pass_']} | {r['scratch_s']:.4f} | {u_s} | "
            f"{r['torch_s']:.4f} | {r['ratio']:.2f} | {gain} | {r['max_rel_err']:.1e} |")
    return lines


def attention(out: Path) -> list[str]:
    data = json.loads((out / "attention.json").read_text())
    rows = data["rows"]
    cols = [("softmax", "scratch"), ("linear", "scratch"), ("efficient", "scratch"),
            ("linear causal", "scratch"), ("softmax causal", "scratch"), ("softmax", "torch"),
            ("softmax", "torch SDPA"), ("linear", "torch")]
    by = {(r["variant"], r["side"], r["n"]): r for r in rows}
    ns = sorted({r["n"] for r in rows})
    lines = [f"Attention forward, d = 64, float32, {data.get('where', '')} (`bench/attention.py "
             f"--backend {data.get('backend', 'numpy')}`): ms (peak extra MiB)", "",
             "| n | " + " | ".join(f"{v} ({s})" for v, s in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for n in ns:
        if n not in (ns[0], ns[-1]) and n not in (1024, 4096, 16384):
            continue
        cells = []
        for v, s in cols:
            r = by.get((v, s, n))
            no_mem = r is None or r["peak_bytes"] is None
            mem = "" if no_mem else f" ({r['peak_bytes'] / 2**20:.0f})"
            cells.append("-" if r is None else f"{r['seconds'] * 1e3:.2f}{mem}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, s in data["summary"].items():
        lines.append(f"{key}: crossover n = {s['crossover_n']}, {s['speedup']:.1f}x at n = "
                     f"{s['at_n']}")
    dec = data.get("decode") or []
    if dec:
        lines.append(f"decoding one token: linear state {dec[0]['linear_s'] * 1e6:.0f} us at "
                     f"{dec[0]['tokens']} token(s) to {dec[-1]['linear_s'] * 1e6:.0f} us at "
                     f"{dec[-1]['tokens']}; softmax over the cache {dec[0]['softmax_s'] * 1e6:.0f}"
                     f" to {dec[-1]['softmax_s'] * 1e6:.0f} us")
    return lines


def assignment(out: Path) -> list[str]:
    a = json.loads((out / "assignment.json").read_text())
    lines = [f"The whole assignment on {a['device']} (`bench/gpu_assignment.py`): "
             f"{a['encoder']}, {a['n_train']} train / {a['n_valid']} valid / {a['n_test']} test "
             f"reviews, <= {a['max_length']} tokens, bf16 autocast {a['autocast_bf16']}", "",
             "| stage | seconds |", "|---|---|"]
    for name, sec in a["stage_seconds"].items():
        lines.append(f"| {name} | {sec:.1f} |")
    for e in a["epochs"]:
        lines.append(f"| epoch {e['epoch']}: train / validation | {e['train_seconds']:.1f} / "
                     f"{e['valid_seconds']:.1f} |")
    lines.append(f"| total | {a['total_seconds']:.1f} |")
    lines.append("")
    lines.append(f"test accuracy {a['test_acc']:.2%} (loss {a['test_loss']:.4f}, best epoch "
                 f"{a['best_epoch']}); validation accuracy by epoch: "
                 + ", ".join(f"{e['valid_acc']:.2%}" for e in a["epochs"])
                 + f"; features {a['feature_tokens_per_s']} tokens/s")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    for name, part in (("pytest.xml", tests), ("gru.json", gru), ("attention.json", attention),
                       ("assignment.json", assignment)):
        print()
        try:
            print("\n".join(part(out)))
        except (OSError, ValueError, KeyError, ET.ParseError) as e:
            print(f"({name}: not summarised: {type(e).__name__}: {e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
