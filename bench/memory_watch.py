"""Peak memory of a long run, watched from outside: every ``--every`` seconds, read
``/proc/PID/status`` of the process and keep the largest

- ``RssAnon``: its own memory (arrays, weights, activations), what a machine must hold;
- ``VmRSS``: that plus the pages of files it has mapped (a run reads its feature cache
  memory-mapped, so this grows with the cache it has touched; those pages are the kernel's to
  drop, not memory the run needs);

and ``VmHWM`` (the kernel's own peak of ``VmRSS``).  Writes them to ``--out`` (JSON, rewritten
atomically at each new peak) until the process ends.  Linux only.

    .venv/bin/python bench/memory_watch.py PID --out runs/k1/memory.json &
    .venv/bin/python bench/memory_watch.py --match "reference.pipeline.train" --out ...

``--match`` waits for a process whose command line contains the text (the newest if several).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scratch.pipeline.atomic import atomic_write  # noqa: E402

FIELDS = ("RssAnon", "VmRSS", "VmHWM")


def status(pid: int) -> dict[str, int] | None:
    """The FIELDS of /proc/PID/status in KiB, or None when the process is gone (or a zombie:
    ended, its parent not yet told)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "State" and value.split()[0] in ("Z", "X"):
            return None
        if name in FIELDS:
            out[name] = int(value.split()[0])
    return out


def find(text: str) -> int | None:
    """The newest process (not this one) whose command line contains ``text``."""
    best = None
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and (best is None or int(d.name) > best):
            best = int(d.name)
    return best


def write(out: Path, record: dict) -> None:
    atomic_write(out, json.dumps(record, indent=1).encode())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pid", nargs="?", type=int, help="the process to watch")
    p.add_argument("--match", help="instead of PID: wait for a process whose command line "
                                   "contains this text")
    p.add_argument("--out", type=Path, required=True, help="JSON file of the peaks")
    p.add_argument("--every", type=float, default=2.0, help="seconds between reads (default 2)")
    a = p.parse_args(argv)
    if (a.pid is None) == (a.match is None):
        p.error("give a PID or --match TEXT, one of them")
    pid = a.pid
    while pid is None:
        pid = find(a.match)
        if pid is None:
            time.sleep(a.every)
    if status(pid) is None:
        p.error(f"no process {pid}")
    peak = {f: 0 for f in FIELDS}
    record = {"pid": pid, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    while (now := status(pid)) is not None:
        if any(now.get(f, 0) > peak[f] for f in FIELDS):
            peak = {f: max(peak[f], now.get(f, 0)) for f in FIELDS}
            record.update({f"{f}_peak_gib": round(peak[f] / 2**20, 3) for f in FIELDS},
                          last=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            write(a.out, record)
        time.sleep(a.every)
    record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write(a.out, record)
    print(json.dumps(record), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
