"""The feature cache is checked when it is read: every kind of damage, through the real commands
(reference.pipeline.features and .train repair it, scratch.pipeline.train repairs its own entries
and refuses the reference's with the command that repairs them), entries written before
checksums, and a full disk (a real tmpfs when this process may mount one, else ENOSPC raised
in-process)."""
import errno
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from reference.pipeline import features as rfeatures
from reference.pipeline import train as rtrain
from scratch.pipeline import features as sfeatures
from scratch.pipeline import train as strain
from scratch.pipeline.cli import run
from tests.imdb_fixtures import make_tree, save_tiny_encoder

SHARDS = [f"shard_{s:05d}.safetensors" for s in range(5)]       # 20 reviews, 4 to a shard


@pytest.fixture(autouse=True)
def float32_features(monkeypatch):
    """The pristine entry is float32 (``--no-autocast``); the train commands, which may choose
    bf16 autocast (a CPU where bf16 is faster), must look for that same entry on every
    machine."""
    monkeypatch.setenv("GRU_ATTENTION_AUTOCAST", "float32")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    make_tree(root, n_per_class=10)
    save_tiny_encoder(root / "tiny-bert")
    pristine = root / "pristine"
    assert run(lambda: rfeatures.main(features_argv(root, pristine)), "features") == 0
    return root


def features_argv(root, cache, *extra):
    return ["--data", str(root / "aclImdb"), "--encoder", str(root / "tiny-bert"),
            "--max-length", "32", "--cache", str(cache), "--shard-size", "4", "--no-progress",
            "--device", "cpu", "--no-autocast", *extra]


def train_argv(root, cache, out, *extra):
    return ["--data", str(root / "aclImdb"), "--encoder", str(root / "tiny-bert"),
            "--max-length", "32", "--cache", str(cache), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--no-progress", *extra]


def fresh_cache(world, tmp_path) -> tuple[Path, Path]:
    """A copy of the pristine cache: (cache root, its one entry)."""
    cache = tmp_path / "cache"
    shutil.copytree(world / "pristine", cache)
    (entry,) = cache.iterdir()
    return cache, entry


def regions(path: Path) -> dict:
    """Byte ranges of a shard's header and tensors."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return {"header": (8, 8 + n), **{k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                                      for k, v in header.items() if k != "__metadata__"}}


def patch(path: Path, offset: int, new: bytes):
    data = bytearray(path.read_bytes())
    data[offset:offset + len(new)] = new
    path.write_bytes(bytes(data))


# Each damage: (name, function of the entry folder, what the one line names)
def overwrite_features(entry):
    f = entry / SHARDS[1]
    a, b = regions(f)["features"]
    patch(f, (a + b) // 2, b"\x12\x34\x56\x78")


def nan_in_features(entry):
    f = entry / SHARDS[2]
    patch(f, regions(f)["features"][0] + 6, np.array([np.nan, np.nan], np.float16).tobytes())


def corrupt_index(entry):
    f = entry / SHARDS[3]
    patch(f, regions(f)["index"][0], np.array([10**6], np.int64).tobytes())


def swap_index(entry):                   # still a valid permutation: only the checksum sees it
    f = entry / SHARDS[3]
    a, b = regions(f)["index"]
    idx = np.frombuffer(f.read_bytes()[a:b], np.int64)[::-1].copy()
    patch(f, a, idx.tobytes())


def corrupt_lengths(entry):
    f = entry / SHARDS[0]
    patch(f, regions(f)["lengths"][0], np.array([99], np.int64).tobytes())


def truncate_shard(entry):
    f = entry / SHARDS[4]
    f.write_bytes(f.read_bytes()[:-40])


def delete_shard(entry):
    (entry / SHARDS[1]).unlink()


def garble_shard_header(entry):
    patch(entry / SHARDS[2], 9, b"\xff\xfe{{")


def truncate_index_json(entry):
    f = entry / "index.json"
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])


def garble_index_json(entry):
    patch(entry / "index.json", 0, b"\xff\xfe\x00")


def edit_index_json(**changes):
    def damage(entry):
        meta = json.loads((entry / "index.json").read_text())
        for k, v in changes.items():
            meta[k] = v(meta) if callable(v) else v
        (entry / "index.json").write_text(json.dumps(meta))
    return damage


DAMAGE = {
    "overwritten bytes": (overwrite_features, SHARDS[1]),
    "NaN in features": (nan_in_features, SHARDS[2]),
    "index out of range": (corrupt_index, SHARDS[3]),
    "index reordered": (swap_index, SHARDS[3]),
    "lengths": (corrupt_lengths, SHARDS[0]),
    "truncated shard": (truncate_shard, SHARDS[4]),
    "deleted shard": (delete_shard, SHARDS[1]),
    "garbled shard header": (garble_shard_header, SHARDS[2]),
    "truncated index.json": (truncate_index_json, "index.json"),
    "garbled index.json": (garble_index_json, "index.json"),
    "index.json: n": (edit_index_json(n=21), "index.json"),
    "index.json: shards": (edit_index_json(shards=lambda m: m["shards"][:-1]), "index.json"),
    "index.json: tokens": (edit_index_json(tokens=lambda m: m["tokens"] + 1), "index.json"),
    "index.json: hidden": (edit_index_json(hidden_size=17), "index.json"),
    "index.json: a sum": (edit_index_json(shard_sums=lambda m: {
        **m["shard_sums"], SHARDS[0]: {**m["shard_sums"][SHARDS[0]], "sha256": "0" * 64}}),
        SHARDS[0]),
}


def snapshot(entry) -> dict:
    return {f.name: f.read_bytes() for f in sorted(entry.glob("shard_*.safetensors"))}


def err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("kind", DAMAGE)
def test_reference_features_recomputes_just_the_damaged_shard(world, tmp_path, capsys, kind):
    damage, named = DAMAGE[kind]
    cache, entry = fresh_cache(world, tmp_path)
    before, index_before = snapshot(entry), json.loads((entry / "index.json").read_text())
    sfeatures._VERIFIED.clear()                    # a new process: nothing checked yet
    damage(entry)
    untouched = {n: os.stat(entry / n).st_mtime_ns for n in SHARDS
                 if n != named and (entry / n).exists()}
    assert run(lambda: rfeatures.main(features_argv(world, cache)), "features") == 0
    lines = err_lines(capsys)
    assert len(lines) == 1, lines
    assert f"damaged feature cache entry {entry}: {named}" in lines[0]
    assert ("rebuilding index.json" if named == "index.json" else "recomputing") in lines[0]
    assert snapshot(entry) == before                          # as it was written
    assert json.loads((entry / "index.json").read_text())["shard_sums"] == \
        index_before["shard_sums"]
    if named != "index.json":                                 # only the damaged one recomputed
        assert {n: os.stat(entry / n).st_mtime_ns for n in untouched} == untouched
    sfeatures._VERIFIED.clear()
    assert sfeatures.verify(entry).startswith("sound")


@pytest.mark.parametrize("kind", ["overwritten bytes", "deleted shard", "index.json: tokens"])
def test_scratch_train_refuses_a_damaged_reference_entry_with_the_repair_command(
        world, tmp_path, capsys, kind):
    damage, named = DAMAGE[kind]
    cache, entry = fresh_cache(world, tmp_path)
    sfeatures._VERIFIED.clear()
    damage(entry)
    before = sorted(p.name for p in entry.iterdir())
    assert run(lambda: strain.main(train_argv(world, cache, tmp_path / "out")), "train") == 1
    lines = err_lines(capsys)
    assert len(lines) == 1, lines
    assert f"damaged feature cache entry {entry}: {named}" in lines[0]
    command = lines[0].split("which recomputes just the damaged shards: ")[1]
    assert command.startswith("python -m reference.pipeline.features ")
    assert sorted(p.name for p in entry.iterdir()) == before        # left for the repair
    assert not (tmp_path / "out" / "model.safetensors").exists()
    argv = command.split()[3:]                                      # the command, run
    assert "--shard-size 4 --no-autocast" in command or "--no-autocast --shard-size 4" in command
    assert run(lambda: rfeatures.main([*argv, "--no-progress", "--device", "cpu"]),
               "features") == 0
    capsys.readouterr()
    sfeatures._VERIFIED.clear()
    assert run(lambda: strain.main(train_argv(world, cache, tmp_path / "out")), "train") == 0


def test_scratch_train_never_reads_an_entry_whose_index_json_is_unreadable(world, tmp_path):
    """Its portable key cannot be read, so it is not found: scratch computes its own entry."""
    cache, entry = fresh_cache(world, tmp_path)
    garble_index_json(entry)
    before = snapshot(entry)
    assert run(lambda: strain.main(train_argv(world, cache, tmp_path / "out")), "train") == 0
    assert sorted(p.name for p in cache.iterdir() if p != entry)[0].startswith("scratch-")
    assert snapshot(entry) == before


def test_scratch_train_recomputes_damaged_shards_of_its_own_entry(world, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert run(lambda: strain.main(train_argv(world, cache, tmp_path / "a")), "train") == 0
    (entry,) = cache.iterdir()
    assert entry.name.startswith("scratch-")
    shards = sorted(entry.glob("shard_*.safetensors"))
    before = {f.name: f.read_bytes() for f in shards}
    overwrite = shards[0]
    a, b = regions(overwrite)["features"]
    patch(overwrite, a + 2, b"\x00\x7e")                                # a NaN
    capsys.readouterr()
    sfeatures._VERIFIED.clear()
    assert run(lambda: strain.main(train_argv(world, cache, tmp_path / "b")), "train") == 0
    lines = [x for x in err_lines(capsys) if "damaged" in x]
    assert len(lines) == 1 and f"{entry}: {overwrite.name}" in lines[0]
    assert "recomputing that shard" in lines[0]
    assert {f.name: f.read_bytes() for f in shards} == before
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["test_loss"] == mb["test_loss"]                # trained on the same features


@pytest.mark.parametrize("kind", ["NaN in features", "truncated index.json"])
def test_reference_train_repairs_a_damaged_entry(world, tmp_path, capsys, kind):
    damage, named = DAMAGE[kind]
    cache, entry = fresh_cache(world, tmp_path)
    clean = tmp_path / "clean"
    assert run(lambda: rtrain.main([*train_argv(world, cache, clean), "--device", "cpu"]),
               "train") == 0
    sfeatures._VERIFIED.clear()
    damage(entry)
    capsys.readouterr()
    out = tmp_path / "out"
    assert run(lambda: rtrain.main([*train_argv(world, cache, out), "--device", "cpu"]),
               "train") == 0
    lines = [x for x in err_lines(capsys) if "damaged" in x]
    assert len(lines) == 1 and f"{entry}: {named}" in lines[0]
    m0 = json.loads((clean / "metrics.json").read_text())
    m1 = json.loads((out / "metrics.json").read_text())
    assert m0["test_loss"] == m1["test_loss"]


def test_a_damaged_entry_is_never_read(world, tmp_path):
    """The library itself: opening raises DamagedEntry (one line naming entry and shard)."""
    for kind, (damage, named) in DAMAGE.items():
        _, entry = fresh_cache(world, tmp_path / kind.replace(" ", "_").replace(":", ""))
        sfeatures._VERIFIED.clear()
        damage(entry)
        with pytest.raises(sfeatures.DamagedEntry) as e:
            sfeatures.FeatureStore(entry)
        assert str(e.value).count("\n") == 0 and f"{entry}: {named}" in str(e.value), kind


# ---- entries written before checksums ----------------------------------------------------------

def unstamp(entry):
    meta = json.loads((entry / "index.json").read_text())
    del meta["shard_sums"]
    (entry / "index.json").write_text(json.dumps(meta))
    shutil.rmtree(entry / "sums")


def test_an_entry_without_checksums_works_says_how_to_stamp_it_and_stamp_adds_them(
        world, tmp_path, capsys):
    cache, entry = fresh_cache(world, tmp_path)
    unstamp(entry)
    sfeatures._UNSTAMPED.clear()
    assert run(lambda: rfeatures.main(features_argv(world, cache)), "features") == 0
    lines = err_lines(capsys)
    assert lines == [f"{entry}: written before feature checksums, so its shards' content is not "
                     f"checked; python -m scratch.pipeline.features stamp {entry} adds them"]
    assert run(lambda: sfeatures.main(["stamp", str(entry)]), "stamp") == 0
    assert capsys.readouterr().out.strip() == f"{entry}: checksums added for its 5 shards"
    assert json.loads((entry / "index.json").read_text())["shard_sums"] == json.loads(
        (world / "pristine" / entry.name / "index.json").read_text())["shard_sums"]
    overwrite_features(entry)                                       # now damage is seen
    sfeatures._VERIFIED.clear()
    assert run(lambda: sfeatures.main(["verify", str(entry)]), "verify") == 1
    assert "sha256 mismatch" in capsys.readouterr().err


def test_stamp_refuses_non_finite_features(world, tmp_path, capsys):
    _, entry = fresh_cache(world, tmp_path)
    unstamp(entry)
    nan_in_features(entry)
    assert run(lambda: sfeatures.main(["stamp", str(entry)]), "stamp") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{entry}: {SHARDS[2]}: non-finite features" in err
    assert "shard_sums" not in json.loads((entry / "index.json").read_text())


def test_a_partial_entry_without_checksums_resumes(world, tmp_path, capsys):
    """Shards an older run finished (no checksum beside them) are adopted by structure."""
    cache, entry = fresh_cache(world, tmp_path)
    (entry / "index.json").unlink()
    (entry / SHARDS[4]).unlink()
    shutil.rmtree(entry / "sums")
    assert run(lambda: rfeatures.main(features_argv(world, cache)), "features") == 0
    assert "resuming: 4 of 5 shards done" in capsys.readouterr().err
    assert snapshot(entry) == snapshot(world / "pristine" / entry.name)


def test_the_encoder_giving_nan_writes_nothing(world, tmp_path, monkeypatch, capsys):
    real = rfeatures._encode

    def nan_encode(*a, **k):
        out = real(*a, **k)
        out[0][0, 0] = np.nan
        return out
    monkeypatch.setattr(rfeatures, "_encode", nan_encode)
    cache = tmp_path / "cache"
    assert run(lambda: rfeatures.main(features_argv(world, cache)), "features") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite features" in err
    assert not cache.exists() or not any(cache.iterdir())


# ---- a full disk -----------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on ``mnt``."""
    filler = mnt / "filler"
    free = shutil.disk_usage(mnt).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_features_on_a_full_disk_say_so_and_resume_once_there_is_space(world, small_disk,
                                                                        capsys):
    cache = small_disk / "cache"
    filler = fill(small_disk, 4096)
    assert run(lambda: rfeatures.main(features_argv(world, cache)), "features") == 1
    lines = err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("features: error: no space left in ")
    assert str(cache) in lines[0] and "needs about" in lines[0]
    assert not cache.exists() or not list(cache.rglob("*.safetensors*"))    # nothing half-written
    filler.unlink()
    assert run(lambda: rfeatures.main(features_argv(world, cache)), "features") == 0
    (entry,) = cache.iterdir()
    assert snapshot(entry) == snapshot(world / "pristine" / entry.name)


def test_a_disk_filling_up_mid_extraction_keeps_finished_shards_and_resumes(
        world, tmp_path, monkeypatch, capsys):
    """ENOSPC raised in-process at the third shard's write (another program filled the disk
    after the free-space check)."""
    real, calls = sfeatures.write_shard, []

    def full_at_third(path, *a):
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as f:
                f.write(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a)
    monkeypatch.setattr(sfeatures, "write_shard", full_at_third)
    cache = tmp_path / "cache"
    assert run(lambda: rfeatures.main(features_argv(world, cache)), "features") == 1
    lines = err_lines(capsys)
    assert len(lines) == 1 and "no space left in " in lines[0] and "3 shards still to write" \
        in lines[0], lines
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir() if not p.name.startswith(".lock")) == [
        "plan.json", "portable_key", SHARDS[0], SHARDS[1], "sums"]   # no temporary file
    assert sorted(p.name for p in (entry / "sums").iterdir()) == [f"{n}.json" for n in SHARDS[:2]]
    monkeypatch.setattr(sfeatures, "write_shard", real)
    assert run(lambda: rfeatures.main(features_argv(world, cache)), "features") == 0
    assert "resuming: 2 of 5 shards done" in capsys.readouterr().err
    assert snapshot(entry) == snapshot(world / "pristine" / entry.name)


def test_out_on_a_full_disk_is_one_line_and_leaves_nothing_half_written(world, small_disk,
                                                                        tmp_path, capsys):
    cache, _ = fresh_cache(world, tmp_path)
    out = small_disk / "run"
    filler = fill(small_disk, 2048)
    argv = [*train_argv(world, cache, out), "--hidden-dim", "8"]      # a 30 KiB head
    assert run(lambda: strain.main(argv), "train") == 1
    lines = err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"train: error: no space left in {out}"), lines
    assert not [p for p in small_disk.rglob(".*tmp*")]
    filler.unlink()
    assert run(lambda: strain.main(argv), "train") == 0
    assert (out / "metrics.json").exists()
