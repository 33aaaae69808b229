"""bf16 autocast or float32 for the frozen encoder's forward: chosen by measuring, not by a flag.

A CPU that supports bf16 natively is not always faster in it: on one with AVX512-BF16 and no
AMX, MiniLM's forward (16 x 256 tokens, one thread) was reported (in the project's issue) to
take 1.52 s of CPU time in bf16 autocast against 1.13 s in float32.  So on a CPU with native
bf16 :func:`choose_autocast` times a short probe, the encoder's forward on a fixed synthetic
batch of :data:`PROBE_SHAPE` tokens in both precisions (one warm-up each, then
:data:`REPEATS` interleaved pairs, process CPU time, the best of each), and takes bf16 only
when it is at least :data:`MARGIN` times faster.

The probe runs on one thread, whatever the run uses: what it asks is whether a core computes
this encoder faster in bf16, and on a shared machine only a one-thread measurement answers
that.  Here (2 cores, load average about 5.5 from other jobs, MiniLM, 4 x 256) three probes in
a row on one thread measured ratios 2.94-3.09 (CPU time) and 2.93-3.08 (wall); on two threads
0.68-0.92 (CPU time, which then counts the threads' spinning at barriers) and 0.73-1.93 (wall):
a coin toss, where a verdict is cached for good.

Why a margin, and why 1.15: bf16 features are not float32's (cosine about 0.999 to them), and
the scratch pipeline prefers a float32 cache entry, so bf16 has to pay for itself clearly; and
the probe is short and may share the cores with other jobs.  Measured with ``bench/autocast.py``
(one thread, AMX, other jobs on the cores): five probes in a row spread by 2-4% (MiniLM
2.60-2.80, MPNet 3.02-3.16 at 8 x 128), and the probe's batch shape biases the ratio:
at 4 x 256 it was 2.70 (MiniLM) and 2.25 (MPNet) against 3.11 and 2.21 at 16 x 256, while at
8 x 128 MPNet's was 3.20, 45% above.  Hence 256-token sequences, the length of real reviews
(4 of them: the same 1,024 tokens, the same cost, as 8 x 128), and a margin that covers a few
percent of noise and of shape: a gain under 15% is not worth a precision loss that noise could
have produced.

The verdict is cached in ``autocast.json`` under the user cache (``$XDG_CACHE_HOME`` or
``~/.cache``, then ``gru-attention/``; ``GRU_ATTENTION_AUTOCAST_CACHE`` names another file),
keyed by what the measured ratio depends on: the CPU (model name and bf16 flags), torch's
version, the encoder's shape (type, widths, layers, heads, attention implementation) and the
probe itself (not the thread count: the probe runs on one); a damaged file is ignored and
rewritten.  No probe on CUDA (bf16 where the device
supports it) nor on a CPU without native bf16 (float32).  ``GRU_ATTENTION_AUTOCAST=bf16|float32``
or ``--autocast bf16|float32`` force a precision (``--no-autocast``: float32).

The feature cache's key holds only the resulting boolean, so a forced and a probed bf16 share one
entry, and float32 has another.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scratch.pipeline.atomic import write_json

from .encoders import bf16_supported

MODES = ("auto", "bf16", "float32")
ENV = "GRU_ATTENTION_AUTOCAST"
CACHE_ENV = "GRU_ATTENTION_AUTOCAST_CACHE"
PROBE_SHAPE = (4, 256)        # (sequences, tokens) of the synthetic probe batch
REPEATS = 3                   # interleaved (float32, bf16) pairs after one warm-up each
MARGIN = 1.15                 # bf16 only when float32's time / bf16's >= this
FORMAT = 1
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")

_clock = time.process_time    # the probe's timer (tests replace it and _forward)


@dataclass(frozen=True)
class Choice:
    bf16: bool
    why: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "float32"

    def line(self) -> str:
        return f"autocast: {self.name} ({self.why})"


_memo: dict[str, Choice] = {}  # verdicts this process already has
_said: set[str] = set()        # lines already printed by this process


def cache_path() -> Path:
    if p := os.environ.get(CACHE_ENV):
        return Path(p)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gru-attention" / "autocast.json"


def cpu_description() -> dict:
    """The CPU as far as bf16 speed goes: its model name and which bf16 flags it has."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def verdict_key(encoder) -> tuple[str, dict]:
    """(short hash, what it hashes): everything the probe's verdict depends on."""
    c = encoder.model.config
    shape = {k: getattr(c, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                              "num_attention_heads", "intermediate_size")}
    shape["attention"] = getattr(c, "_attn_implementation", None)
    what = {"cpu": cpu_description(), "torch": torch.__version__, "encoder": shape,
            "probe": {"shape": list(PROBE_SHAPE), "repeats": REPEATS, "margin": MARGIN,
                      "threads": 1}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16], what


def _forward(model, ids, mask, bf16: bool) -> None:
    """One forward as :func:`reference.pipeline.features._encode` runs it."""
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), amp:
        model(input_ids=ids, attention_mask=mask)[0].float()


def probe(encoder) -> dict:
    """CPU seconds of the encoder's forward on the synthetic batch on one thread, float32 and
    bf16 autocast (best of :data:`REPEATS` each, interleaved, after one warm-up each), and their
    ratio.  torch's thread count is restored afterwards."""
    n, length = PROBE_SHAPE
    length = min(length, encoder.max_length)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, encoder.model.config.vocab_size, (n, length), generator=g)
    mask = torch.ones_like(ids)
    best = {False: float("inf"), True: float("inf")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for bf16 in (False, True):
            _forward(encoder.model, ids, mask, bf16)             # warm-up (bf16: kernel set-up)
        for r in range(REPEATS):
            for bf16 in ((False, True) if r % 2 == 0 else (True, False)):
                t = _clock()
                _forward(encoder.model, ids, mask, bf16)
                best[bf16] = min(best[bf16], _clock() - t)
    finally:
        torch.set_num_threads(threads)
    f32, b16 = best[False], best[True]
    return {"float32_s": round(f32, 4), "bf16_s": round(b16, 4),
            "ratio": round(f32 / b16, 3) if b16 > 0 else float("inf"),
            "shape": [n, length], "threads": 1}


def _read(path: Path) -> dict:
    """The verdicts in ``path``, {} when it is missing or damaged."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT \
            or not isinstance(data.get("verdicts"), dict):
        return {}
    return data["verdicts"]


def _valid(v) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("bf16"), bool)
            and isinstance(v.get("ratio"), (int, float)))


def _describe(v: dict) -> str:
    r = v["ratio"]
    if r >= 1:
        speed = f"bf16 {r:.2f}x faster than float32 here"
        if not v["bf16"]:
            speed += f", under the {MARGIN:.2f}x margin"
    else:
        speed = f"bf16 {1 / r:.2f}x slower than float32 here"
    return f"{speed}, {v['shape'][0]}x{v['shape'][1]} tokens, one thread"


def probed_choice(encoder, path: Path | None = None) -> Choice:
    """The cached verdict for this machine and encoder, else a new probe (cached)."""
    path = cache_path() if path is None else Path(path)
    key, what = verdict_key(encoder)
    if key in _memo:
        return _memo[key]
    verdicts = _read(path)
    if _valid(v := verdicts.get(key)):
        choice = Choice(v["bf16"], f"probe of {v.get('date', '?')}: {_describe(v)}; "
                                   f"cached in {path}")
    else:
        v = probe(encoder)
        v.update(bf16=v["ratio"] >= MARGIN, date=time.strftime("%Y-%m-%d"), key=what)
        verdicts[key] = v
        try:
            write_json(path, {"format": FORMAT, "verdicts": verdicts})
            where = f"cached in {path}"
        except OSError as e:
            where = f"not cached: {e.strerror or e}"
        choice = Choice(v["bf16"], f"probe: {_describe(v)}; {where}")
    _memo[key] = choice
    return choice


def choose_autocast(encoder, device="cpu", mode: str | None = None,
                    path: Path | None = None) -> Choice:
    """bf16 autocast or float32 for ``encoder`` on ``device``.  ``mode``: auto, bf16 or float32
    (None: ``$GRU_ATTENTION_AUTOCAST``, else auto)."""
    origin = "--autocast"
    if mode is None:
        mode, origin = os.environ.get(ENV) or "auto", ENV
    if mode not in MODES:
        raise ValueError(f"{origin} {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return Choice(mode == "bf16", f"forced: {origin}{'=' if origin == ENV else ' '}{mode}")
    device = torch.device(device)
    if device.type == "cuda":
        return (Choice(True, "CUDA device with bf16") if bf16_supported(device)
                else Choice(False, "this CUDA device has no bf16"))
    if not bf16_supported(device):
        return Choice(False, "this CPU has no native bf16")
    return probed_choice(encoder, path)


def say(choice: Choice) -> None:
    """Print ``choice``'s line, once per process, on stderr (a diagnostic, like the progress
    bars: standard output stays the command's results, e.g. ``reference.compare``'s table)."""
    if (line := choice.line()) not in _said:
        _said.add(line)
        print(line, file=sys.stderr, flush=True)
