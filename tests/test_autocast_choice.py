"""bf16 autocast or float32, chosen by a cached probe (reference.pipeline.autocast): the verdict
with a fake clock, no probe without native bf16 or when forced, the cache file (re-used, a
damaged one rewritten), the printed line, and the feature cache key that follows the choice."""
import json
from types import SimpleNamespace

import pytest
import torch

from reference.pipeline import autocast as ac
from reference.pipeline import features as Fe
from reference.pipeline import train as rtrain
from scratch.pipeline import train as strain
from tests.imdb_fixtures import make_tree, review, save_tiny_encoder, tiny_encoder

TEXTS = [review(i, i % 2 == 0) for i in range(6)]


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """A verdict file of this test's, no verdict or printed line from earlier tests, no
    GRU_ATTENTION_AUTOCAST, and a CPU with native bf16 (whatever this machine has)."""
    monkeypatch.setenv(ac.CACHE_ENV, str(tmp_path / "verdicts" / "autocast.json"))
    monkeypatch.delenv(ac.ENV, raising=False)
    monkeypatch.setattr(ac, "_memo", {})
    monkeypatch.setattr(ac, "_said", set())
    monkeypatch.setattr(ac, "bf16_supported", lambda device="cpu": True)
    return tmp_path / "verdicts" / "autocast.json"


class FakeCPU:
    """A clock and a forward: float32 takes 1 s, bf16 1 / ``speedup`` s, plus ``extra`` on the
    first timed forward of each precision (noise that best-of must ignore)."""

    def __init__(self, speedup: float, extra: float = 0.0):
        self.now, self.speedup, self.extra, self.calls = 0.0, speedup, extra, []

    def forward(self, model, ids, mask, bf16):
        self.calls.append(bf16)
        first_timed = self.calls.count(bf16) == 2            # the one after the warm-up
        self.now += (1 / self.speedup if bf16 else 1.0) + (self.extra if first_timed else 0.0)

    def install(self, monkeypatch):
        monkeypatch.setattr(ac, "_clock", lambda: self.now)
        monkeypatch.setattr(ac, "_forward", self.forward)
        return self


@pytest.mark.parametrize("speedup, bf16, words", [
    (1.5, True, "bf16 1.50x faster than float32 here"),
    (ac.MARGIN + 0.01, True, "faster than float32 here"),
    (ac.MARGIN - 0.01, False, f"faster than float32 here, under the {ac.MARGIN:.2f}x margin"),
    (1 / 1.34, False, "bf16 1.34x slower than float32 here"),
])
def test_the_probe_takes_bf16_only_when_it_is_faster_by_the_margin(monkeypatch, fresh, speedup,
                                                                   bf16, words):
    cpu = FakeCPU(speedup, extra=5.0).install(monkeypatch)
    choice = ac.choose_autocast(tiny_encoder(), "cpu")
    assert choice.bf16 is bf16 and choice.name == ("bf16" if bf16 else "float32")
    assert words in choice.why and f"cached in {fresh}" in choice.why
    assert f"{ac.PROBE_SHAPE[0]}x{ac.PROBE_SHAPE[1]} tokens" in choice.why
    # one warm-up each, then interleaved pairs whose order alternates
    assert cpu.calls == [False, True] + [False, True, True, False, False, True][:2 * ac.REPEATS]
    v = next(iter(json.loads(fresh.read_text())["verdicts"].values()))
    assert v["bf16"] is bf16 and v["ratio"] == pytest.approx(speedup, rel=1e-3)   # best of


def test_no_native_bf16_means_float32_without_a_probe(monkeypatch, fresh):
    monkeypatch.setattr(ac, "bf16_supported", lambda device="cpu": False)
    monkeypatch.setattr(ac, "probe", lambda enc: pytest.fail("probed"))
    choice = ac.choose_autocast(tiny_encoder(), "cpu")
    assert not choice.bf16 and choice.why == "this CPU has no native bf16"
    assert not fresh.exists()


def test_cuda_takes_bf16_where_supported_without_a_probe(monkeypatch):
    monkeypatch.setattr(ac, "probe", lambda enc: pytest.fail("probed"))
    assert ac.choose_autocast(tiny_encoder(), "cuda").line() == "autocast: bf16 (CUDA device " \
                                                                "with bf16)"
    monkeypatch.setattr(ac, "bf16_supported", lambda device="cpu": False)
    assert not ac.choose_autocast(tiny_encoder(), "cuda").bf16


def test_the_verdict_is_cached_and_reused(monkeypatch, fresh):
    enc, probes = tiny_encoder(), []
    real = ac.probe
    monkeypatch.setattr(ac, "probe", lambda e: probes.append(1) or real(e))
    FakeCPU(2.0).install(monkeypatch)
    first = ac.choose_autocast(enc, "cpu")
    assert first.bf16 and len(probes) == 1 and first.why.startswith("probe: ")
    ac._memo.clear()                                     # a new process: the file answers
    again = ac.choose_autocast(enc, "cpu")
    assert again.bf16 and len(probes) == 1
    assert again.why.startswith("probe of ") and f"cached in {fresh}" in again.why
    ac._memo.clear()
    saved = torch.get_num_threads()             # the probe runs on one thread: the same verdict
    try:
        torch.set_num_threads(saved + 1)
        ac.choose_autocast(enc, "cpu")
    finally:
        torch.set_num_threads(saved)
    assert len(probes) == 1
    ac._memo.clear()
    monkeypatch.setattr(torch, "__version__", "0.0.0")      # another torch: another verdict
    ac.choose_autocast(enc, "cpu")
    ac._memo.clear()
    ac.choose_autocast(tiny_encoder(hidden=64), "cpu")       # another encoder shape: another
    assert len(probes) == 3 and len(json.loads(fresh.read_text())["verdicts"]) == 3


@pytest.mark.parametrize("damage", [b"{not json", b"\xff\xfe", b"[]", b'{"format": 1}',
                                    b'{"format": 1, "verdicts": {"x": 1}}'])
def test_a_damaged_cache_file_is_ignored_and_rewritten(monkeypatch, fresh, damage):
    fresh.parent.mkdir(parents=True)
    fresh.write_bytes(damage)
    key, _ = ac.verdict_key(enc := tiny_encoder())
    if damage.startswith(b'{"format": 1, "v'):
        fresh.write_text(json.dumps({"format": 1, "verdicts": {key: {"bf16": "yes"}}}))
    FakeCPU(2.0).install(monkeypatch)
    assert ac.choose_autocast(enc, "cpu").why.startswith("probe: ")
    data = json.loads(fresh.read_text())
    assert data["format"] == ac.FORMAT and data["verdicts"][key]["bf16"] is True
    assert [p.name for p in fresh.parent.iterdir()] == ["autocast.json"]     # no temp file


def test_an_unwritable_cache_still_chooses(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(ac.CACHE_ENV, str(tmp_path / "file" / "autocast.json"))
    FakeCPU(2.0).install(monkeypatch)
    choice = ac.choose_autocast(tiny_encoder(), "cpu")
    assert choice.bf16 and "not cached" in choice.why


def test_forcing_either_way_needs_no_probe(monkeypatch):
    monkeypatch.setattr(ac, "probe", lambda enc: pytest.fail("probed"))
    enc = tiny_encoder()
    assert ac.choose_autocast(enc, "cpu", "bf16").line() == "autocast: bf16 (forced: " \
                                                           "--autocast bf16)"
    assert not ac.choose_autocast(enc, "cpu", "float32").bf16
    monkeypatch.setattr(ac, "bf16_supported", lambda device="cpu": False)
    assert ac.choose_autocast(enc, "cpu", "bf16").bf16               # forced is forced
    monkeypatch.setenv(ac.ENV, "bf16")
    assert ac.choose_autocast(enc, "cpu").line() == f"autocast: bf16 (forced: {ac.ENV}=bf16)"
    assert not ac.choose_autocast(enc, "cpu", "float32").bf16       # the option wins
    monkeypatch.setenv(ac.ENV, "fast")
    with pytest.raises(ValueError, match="fast"):
        ac.choose_autocast(enc, "cpu")


def test_the_real_probe_times_both_precisions_on_one_thread(monkeypatch):
    threads, seen = torch.get_num_threads(), set()
    real = ac._forward
    monkeypatch.setattr(ac, "_forward", lambda *a: seen.add(torch.get_num_threads()) or real(*a))
    r = ac.probe(tiny_encoder())
    assert r["float32_s"] > 0 and r["bf16_s"] > 0 and r["ratio"] > 0
    assert r["shape"] == list(ac.PROBE_SHAPE) and r["threads"] == 1 and seen == {1}
    assert torch.get_num_threads() == threads


def test_the_line_is_printed_once_and_the_entry_follows_the_choice(monkeypatch, tmp_path, capsys):
    """A probed bf16 and a forced bf16 share one feature cache entry; float32 has another."""
    enc = tiny_encoder()
    kw = dict(max_length=32, progress=False)
    FakeCPU(1.5).install(monkeypatch)
    probed = Fe.extract_features(enc, TEXTS, tmp_path / "c", **kw)
    Fe.extract_features(enc, TEXTS[:3], tmp_path / "c", **kw)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("autocast:")]
    n, length = ac.PROBE_SHAPE
    assert lines == [f"autocast: bf16 (probe: bf16 1.50x faster than float32 here, {n}x{length} "
                     f"tokens, one thread; cached in {ac.cache_path()})"]
    assert probed.meta["autocast_bf16"] is True
    forced = Fe.extract_features(enc, TEXTS, tmp_path / "c", autocast="bf16", **kw)
    assert Fe.extract_features(enc, TEXTS, tmp_path / "c", autocast=True, **kw).folder \
        == forced.folder == probed.folder
    f32 = Fe.extract_features(enc, TEXTS, tmp_path / "c", autocast="float32", **kw)
    assert f32.folder != probed.folder and f32.meta["autocast_bf16"] is False
    ac._memo.clear()
    FakeCPU(1 / 1.34).install(monkeypatch)
    ac.cache_path().unlink()
    assert Fe.extract_features(enc, TEXTS, tmp_path / "c", **kw).folder == f32.folder
    assert "autocast: float32 (probe: bf16 1.34x slower than float32 here" \
        in capsys.readouterr().err


def test_the_commands_take_autocast_and_no_autocast_as_its_alias(monkeypatch, tmp_path, capsys):
    make_tree(tmp_path / "data", n_per_class=2)
    enc = save_tiny_encoder(tmp_path / "enc")
    argv = ["--data", str(tmp_path / "data"), "--encoder", str(enc), "--cache",
            str(tmp_path / "c"), "--max-length", "32", "--device", "cpu", "--no-progress"]
    monkeypatch.setattr(ac, "probe", lambda e: pytest.fail("probed"))
    assert Fe.main([*argv, "--autocast", "float32"]) == 0
    assert "autocast: float32 (forced: --autocast float32)" in capsys.readouterr().err
    entries = sorted((tmp_path / "c").iterdir())
    assert Fe.main([*argv, "--no-autocast"]) == 0
    assert sorted((tmp_path / "c").iterdir()) == entries                # the same entries
    with pytest.raises(SystemExit) as e:
        Fe.main([*argv, "--no-autocast", "--autocast", "bf16"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    monkeypatch.setenv(ac.ENV, "fast")
    with pytest.raises(SystemExit) as e:
        Fe.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"${ac.ENV}='fast'" in err[0]
    a = rtrain.build_parser().parse_args(["--out", "x", "--autocast", "bf16"])
    assert a.autocast == "bf16"
    assert rtrain.build_parser().parse_args(["--out", "x", "--no-autocast"]).autocast == "float32"


def test_scratch_train_names_the_precision_of_the_entry_to_repair(tmp_path):
    for bf16, option in ((True, " --autocast bf16"), (False, " --no-autocast")):
        entry = SimpleNamespace(meta={"autocast_bf16": bf16}, folder=tmp_path)
        assert strain._same_plan_options(entry) == option
